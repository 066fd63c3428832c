//! `on = "…"` selectors: which hosts a step runs on, as written and parsed. Picking the hosts
//! out of an inventory is the inventory's (`Inventory::select`).

use std::fmt;

use super::StepId;

/// Which hosts a step runs on: `on = "servers[0]"`, `"workers"`, `"all,!bastion"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    pub text: String,
    pub terms: Vec<Term>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    pub op: TermOp,
    pub pattern: Pattern,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TermOp {
    Union,
    Intersect,
    Exclude,
}

/// A host, a group or `all`, optionally indexed or sliced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    pub name: String,
    pub slice: Option<Slice>,
}

impl Pattern {
    /// As written: `servers[1:]`.
    pub fn text(&self) -> String {
        let num = |i: Option<i64>| i.map(|i| i.to_string()).unwrap_or_default();
        match self.slice {
            None => self.name.clone(),
            Some(Slice::Index(i)) => format!("{}[{i}]", self.name),
            Some(Slice::Range(a, b)) => format!("{}[{}:{}]", self.name, num(a), num(b)),
        }
    }
}

/// `[i]` or `[start:end]`; negative numbers count from the end, like Python.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slice {
    Index(i64),
    Range(Option<i64>, Option<i64>),
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Selector {
    /// Parses a selector; the error says what was expected.
    pub fn parse(text: &str) -> Result<Selector, String> {
        let mut terms = Vec::new();
        for (i, raw) in text.split(',').enumerate() {
            let raw = raw.trim();
            let (op, rest) = if let Some(r) = raw.strip_prefix('!') {
                (TermOp::Exclude, r)
            } else if let Some(r) = raw.strip_prefix('&') {
                (TermOp::Intersect, r)
            } else {
                (TermOp::Union, raw)
            };
            if i == 0 && op != TermOp::Union {
                return Err(format!(
                    "`{raw}`: a selector starts with a host or group; `!`/`&` narrow what comes before (`all,!{}`)",
                    rest
                ));
            }
            let (name, slice) = match rest.find('[') {
                None => (rest, None),
                Some(open) => {
                    let Some(inner) = rest[open + 1..].strip_suffix(']') else {
                        return Err(format!(
                            "`{rest}`: expected `name[index]` or `name[start:end]`"
                        ));
                    };
                    (
                        &rest[..open],
                        Some(parse_slice(inner).map_err(|e| format!("`{rest}`: {e}"))?),
                    )
                }
            };
            if name.is_empty() {
                return Err(format!(
                    "empty term in `{text}`: expected host or group names separated by commas"
                ));
            }
            if !StepId::is_valid(name) {
                return Err(format!("`{name}` is not a host or group name"));
            }
            terms.push(Term {
                op,
                pattern: Pattern {
                    name: name.to_owned(),
                    slice,
                },
            });
        }
        Ok(Selector {
            text: text.trim().to_owned(),
            terms,
        })
    }

    /// The names the selector mentions (to check them against an inventory).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.terms.iter().map(|t| t.pattern.name.as_str())
    }
}

fn parse_slice(inner: &str) -> Result<Slice, String> {
    let num = |s: &str| -> Result<Option<i64>, String> {
        let s = s.trim();
        if s.is_empty() {
            Ok(None)
        } else {
            s.parse::<i64>()
                .map(Some)
                .map_err(|_| format!("`{s}` is not an index"))
        }
    };
    match inner.split_once(':') {
        None => num(inner)?
            .map(Slice::Index)
            .ok_or_else(|| "empty index: expected `[0]`, `[1:]`, `[:2]` or `[-1]`".to_owned()),
        Some((a, b)) => {
            let (a, b) = (num(a)?, num(b)?);
            // Only same-sign bounds can be judged without knowing the group's size.
            if let (Some(x), Some(y)) = (a, b) {
                if (x >= 0) == (y >= 0) && x >= y {
                    return Err(format!(
                        "`[{inner}]` selects nothing: the start must be before the end"
                    ));
                }
            }
            Ok(Slice::Range(a, b))
        }
    }
}
