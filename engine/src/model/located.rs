//! Positions inside a runbook's string values, for errors found after parsing.

use crate::source::{Source, Span};

/// Where a string value sits in the runbook file, to turn positions inside it into
/// `file:line:col` for errors found while running.
#[derive(Debug, Clone)]
pub struct Located {
    /// The TOML string token.
    pub span: Span,
    /// Byte offset of the value's first character, when the token holds it verbatim.
    pub origin: Option<usize>,
}

impl Located {
    /// The span of byte `offset` inside the value (the whole token when escapes blur it).
    pub fn at(&self, offset: usize) -> Span {
        match self.origin {
            Some(o) => o + offset..o + offset + 1,
            None => self.span.clone(),
        }
    }

    /// Offset inside the value of a 1-based line/column position inside it.
    pub fn offset_of(text: &str, line: usize, column: usize) -> usize {
        let mut l = 1;
        let mut c = 1;
        for (i, ch) in text.char_indices() {
            if l == line && c == column {
                return i;
            }
            if ch == '\n' {
                l += 1;
                c = 1;
            } else {
                c += 1;
            }
        }
        text.len()
    }

    /// `file:line:col` of a 1-based position inside the value.
    pub fn describe(
        &self,
        source: &Source,
        text: &str,
        line: Option<usize>,
        column: Option<usize>,
    ) -> String {
        let offset = match (line, column) {
            (Some(l), Some(c)) => Self::offset_of(text, l, c),
            _ => 0,
        };
        let lc = source.line_col(self.at(offset).start);
        format!("{}:{}:{}", source.path().display(), lc.line, lc.column)
    }
}
