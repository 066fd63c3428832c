//! Secrets recognised by their shape rather than their value: `Authorization:` values, bearer
//! tokens, private key blocks and a runbook's own `[evidence] redact` patterns.

use std::sync::Arc;

use super::placeholder;

/// Secrets recognised by their shape rather than their value: `Authorization:` header values,
/// bearer tokens, private key blocks, and the runbook's own `[evidence] redact` patterns.
#[derive(Debug, Clone)]
pub struct ShapeRules {
    /// (name, pattern); a pattern with a group named `v` has only that group replaced.
    rules: Arc<Vec<(String, regex::bytes::Regex)>>,
}

impl Default for ShapeRules {
    fn default() -> Self {
        Self::new(&[]).unwrap_or(Self {
            rules: Arc::default(),
        })
    }
}

const BUILTIN_SHAPES: &[(&str, &str)] = &[
    (
        "authorization",
        r#"(?i)\bauthorization["']?\s*[:=]\s*["']?(?:(?:basic|bearer|token|digest|negotiate)\s+)?(?P<v>[^\s"',;]{4,})"#,
    ),
    (
        "bearer-token",
        r"(?i)\bbearer\s+(?P<v>[A-Za-z0-9._~+/=-]{8,})",
    ),
    (
        "private-key",
        r"(?s)-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\z)",
    ),
];

/// A literal every match of the built-in shape of the same index contains, ASCII case aside
/// (also in the matcher's one-pass prefilter, see `ByteRedactor::redact_after`).
pub(crate) const TRIGGERS: [&str; 3] = ["authorization", "bearer", "-----begin "];
const _: () = assert!(TRIGGERS.len() == BUILTIN_SHAPES.len());

static TRIGGER_MATCHER: std::sync::LazyLock<Option<aho_corasick::AhoCorasick>> =
    std::sync::LazyLock::new(|| {
        // A DFA: one table step per byte whatever the text (base64 output defeats the
        // prefilters, and this runs over every byte of output).
        aho_corasick::AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .kind(Some(aho_corasick::AhoCorasickKind::DFA))
            .build(TRIGGERS)
            .ok()
    });

impl ShapeRules {
    /// No rules at all: for text whose shapes are someone else's business (the engine's own
    /// messages, which evidence and the console redact again).
    pub fn none() -> Self {
        Self {
            rules: Arc::default(),
        }
    }

    /// The built-in shapes plus `custom` regular expressions (named `pattern-1`, …).
    pub fn new(custom: &[String]) -> Result<Self, regex::Error> {
        let mut rules = Vec::new();
        for (name, re) in BUILTIN_SHAPES {
            rules.push(((*name).to_owned(), regex::bytes::Regex::new(re)?));
        }
        for (i, re) in custom.iter().enumerate() {
            rules.push((format!("pattern-{}", i + 1), regex::bytes::Regex::new(re)?));
        }
        Ok(Self {
            rules: Arc::new(rules),
        })
    }

    /// Applies every rule; returns the text and the names of the rules that matched. A built-in
    /// rule runs only when its literal (see [`TRIGGERS`]) is in the text: one pass over the text
    /// finds which are, so output without any costs one scan, not a regex per rule.
    /// `no_triggers`: the caller's own pass already found no trigger in the text (the built-in
    /// rules are skipped without a scan).
    pub(crate) fn apply(
        &self,
        data: Vec<u8>,
        found: &mut Vec<String>,
        no_triggers: bool,
    ) -> Vec<u8> {
        let mut text = data;
        if self.rules.is_empty() || (no_triggers && self.rules.len() == BUILTIN_SHAPES.len()) {
            return text;
        }
        let mut present = [false; TRIGGERS.len()];
        if no_triggers {
            // Known absent: only the runbook's own patterns run.
        } else if let Some(ac) = TRIGGER_MATCHER.as_ref() {
            // No trigger can overlap another (none ends with the start of one), so the
            // non-overlapping search sees every one that is there.
            for m in ac.find_iter(&text[..]) {
                present[m.pattern().as_usize()] = true;
                if present.iter().all(|&p| p) {
                    break;
                }
            }
        } else {
            present = [true; TRIGGERS.len()];
        }
        for (n, (name, re)) in self.rules.iter().enumerate() {
            if n < BUILTIN_SHAPES.len() && !present[n] {
                continue;
            }
            if !re.is_match(&text) {
                continue;
            }
            let placeholder = placeholder(name);
            let mut out = Vec::with_capacity(text.len());
            let mut last = 0;
            for caps in re.captures_iter(&text) {
                let Some(m) = caps.name("v").or_else(|| caps.get(0)) else {
                    continue;
                };
                // Already redacted by value: keep the more precise name.
                if m.as_bytes().starts_with(b"[REDACTED:") {
                    continue;
                }
                out.extend_from_slice(&text[last..m.start()]);
                out.extend_from_slice(placeholder.as_bytes());
                last = m.end();
                found.push(name.clone());
            }
            out.extend_from_slice(&text[last..]);
            text = out;
        }
        text
    }
}

impl ShapeRules {
    /// The start of a match of any rule that starts before `cut` and ends after it, if any:
    /// a streaming caller cutting `data` there would split it (and leave part of the secret
    /// in the clear).
    pub fn match_across(&self, data: &[u8], cut: usize) -> Option<usize> {
        self.rules
            .iter()
            .filter_map(|(_, re)| {
                re.find_iter(data)
                    .take_while(|m| m.start() < cut)
                    .find(|m| m.end() > cut)
                    .map(|m| m.start())
            })
            .min()
    }
}

/// Follows private key blocks across lines of one stream: every line from a `BEGIN … PRIVATE
/// KEY` line to its `END` line is replaced whole.
#[derive(Debug, Clone, Default)]
pub struct PemFilter {
    inside: bool,
}

impl PemFilter {
    /// A complete line (without its newline): `Some(replacement)` when it belongs to a block.
    pub fn line(&mut self, line: &[u8]) -> Option<&'static [u8]> {
        let has = |needle: &[u8]| contains(line, needle);
        let marker = has(b"PRIVATE KEY-----");
        if marker && has(b"-----BEGIN ") {
            self.inside = !has(b"-----END ");
            return Some(b"[REDACTED:private-key]");
        }
        if self.inside {
            if marker && has(b"-----END ") {
                self.inside = false;
            }
            return Some(b"[REDACTED:private-key]");
        }
        None
    }

    pub fn inside(&self) -> bool {
        self.inside
    }
}

/// Whether `needle` (not empty) is in `hay`: a scan for its first byte, compared only there
/// (every marker starts with `-`, rare in output; a window compare at every byte is not).
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    let Some((&first, _)) = needle.split_first() else {
        return true;
    };
    let mut from = 0;
    while let Some(p) = hay[from..].iter().position(|&b| b == first) {
        if hay[from + p..].starts_with(needle) {
            return true;
        }
        from += p + 1;
    }
    false
}

pub static KEY_BEGIN: std::sync::LazyLock<Option<regex::bytes::Regex>> =
    std::sync::LazyLock::new(|| {
        regex::bytes::Regex::new("-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----").ok()
    });
pub static KEY_END: std::sync::LazyLock<Option<regex::bytes::Regex>> =
    std::sync::LazyLock::new(|| {
        regex::bytes::Regex::new("-----END [A-Z0-9 ]*PRIVATE KEY-----").ok()
    });

/// The first private key BEGIN or END marker at or after `from`: (start, end).
pub fn key_marker(
    re: &std::sync::LazyLock<Option<regex::bytes::Regex>>,
    data: &[u8],
    from: usize,
) -> Option<(usize, usize)> {
    let m = re.as_ref()?.find_at(data, from)?;
    Some((m.start(), m.end()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_found_wherever_they_are() {
        assert!(contains(b"-----BEGIN ", b"-----BEGIN "));
        assert!(contains(b"x--------BEGIN y", b"-----BEGIN "));
        assert!(!contains(b"----BEGIN ", b"-----BEGIN "));
        assert!(!contains(b"", b"-"));
        let mut f = PemFilter::default();
        assert_eq!(f.line(b"text - with -- dashes"), None);
        assert!(f.line(b"--------BEGIN RSA PRIVATE KEY-----").is_some());
        assert!(f.inside());
        assert!(f.line(b"MIIEow").is_some());
        assert!(f.line(b"-----END RSA PRIVATE KEY-----").is_some());
        assert!(!f.inside());
    }
}
