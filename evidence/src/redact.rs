//! Byte-level secret redaction for streamed output. A secret split across two reads is still
//! found because callers keep the last `overlap()` bytes of a chunk back until more arrives.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aho_corasick::{AhoCorasick, MatchKind};

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

impl ShapeRules {
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

    /// Applies every rule; returns the text and the names of the rules that matched.
    fn apply(&self, data: &[u8], found: &mut Vec<String>) -> Vec<u8> {
        let mut text = data.to_vec();
        for (name, re) in self.rules.iter() {
            if !re.is_match(&text) {
                continue;
            }
            let placeholder = format!("[REDACTED:{name}]");
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

/// Follows private key blocks across lines of one stream: every line from a `BEGIN … PRIVATE
/// KEY` line to its `END` line is replaced whole.
#[derive(Debug, Clone, Default)]
pub struct PemFilter {
    inside: bool,
}

impl PemFilter {
    /// A complete line (without its newline): `Some(replacement)` when it belongs to a block.
    pub fn line(&mut self, line: &[u8]) -> Option<&'static [u8]> {
        let has = |needle: &[u8]| line.windows(needle.len()).any(|w| w == needle);
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

/// Replaces every secret value — and the forms it takes when a tool re-encodes it — with
/// `[REDACTED:<name>]`, and secrets recognised by shape (see [`ShapeRules`]). Counts how often
/// each was found.
#[derive(Debug, Clone, Default)]
pub struct ByteRedactor {
    shapes: ShapeRules,
    /// (name, pattern): each secret's value and its encodings.
    patterns: Vec<(String, Vec<u8>)>,
    matcher: Option<Arc<AhoCorasick>>,
    longest: usize,
    /// Shared by clones; `None` for redactors whose matches must not be counted again.
    counts: Option<Arc<Mutex<BTreeMap<String, u64>>>>,
}

/// Secret values shorter than this are not redacted (a 1-character "secret" would match
/// everywhere).
pub const MIN_SECRET: usize = 4;

/// Encodings shorter than this are not redacted on their own: they would match ordinary text.
const MIN_VARIANT: usize = 6;

/// A line of a multi-line secret shorter than this (after trimming) is not redacted on its own.
/// Each line is searched for everywhere, and the short lines of real multi-line secrets are
/// ordinary text (`{`, `-----`, `  "type": "x",`, a short name): redacting them would mangle
/// unrelated output all over the bundle. The whole value is still matched whatever its lines.
pub const MIN_SECRET_LINE: usize = 8;

/// The forms a secret takes in output besides itself: JSON-escaped (see [`json_forms`]),
/// URL-encoded, base64
/// (standard and URL-safe, whole and as it appears inside a longer base64 stream at each of the
/// three byte alignments), and each line of a multi-line secret (a private key printed line by
/// line). This is the leak class peers keep reopening bugs for.
pub fn variants(value: &str) -> Vec<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    use base64::Engine as _;
    let raw = value.as_bytes();
    let mut out: Vec<Vec<u8>> = vec![raw.to_vec()];
    for json in json_forms(value) {
        out.push(json.into_bytes());
    }
    out.push(percent_encode(raw, false));
    out.push(percent_encode(raw, true));
    for engine in [&STANDARD, &URL_SAFE] {
        out.push(engine.encode(raw).into_bytes());
    }
    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        for k in 0..3usize {
            let mut data = vec![0u8; k];
            data.extend_from_slice(raw);
            let enc = engine.encode(&data).into_bytes();
            // Characters that depend on the secret's bits only.
            let start = (8 * k).div_ceil(6);
            let end = (8 * (k + raw.len())) / 6;
            if start < end && end <= enc.len() {
                out.push(enc[start..end].to_vec());
            }
        }
    }
    if value.contains('\n') {
        for line in value.lines() {
            let line = line.trim();
            if line.len() >= MIN_SECRET_LINE {
                out.push(line.as_bytes().to_vec());
            }
        }
    }
    out.retain(|v| v.len() >= MIN_VARIANT.min(raw.len()) && !v.is_empty());
    out.sort();
    out.dedup();
    out
}

/// The ways a JSON encoder writes `value` inside a string literal (without the quotes):
/// serde_json's (UTF-8 as is), the ASCII-only form with every other character as `\uXXXX`
/// (Python's `json.dumps` default, `jq -a`, .NET) in lower- and upper-case hex, and each of
/// those with `/` escaped as `\/` (PHP's `json_encode`, some Java encoders). All are valid JSON
/// for the same string, so a tool may print any of them.
fn json_forms(value: &str) -> Vec<String> {
    let plain = serde_json::to_string(value).unwrap_or_default();
    let plain = plain
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(&plain)
        .to_owned();
    let mut forms = vec![plain];
    if value.chars().any(|c| !(' '..='~').contains(&c)) {
        forms.push(json_ascii(value, false));
        forms.push(json_ascii(value, true));
    }
    if value.contains('/') {
        let slashed: Vec<String> = forms.iter().map(|f| f.replace('/', "\\/")).collect();
        forms.extend(slashed);
    }
    forms.sort();
    forms.dedup();
    forms
}

/// `value` JSON-escaped with only printable ASCII left as is, the way Python's `json.dumps`
/// writes it (`\n`, `\"`, … for the usual escapes; `\u00e4`; a surrogate pair above U+FFFF).
fn json_ascii(value: &str, upper: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(value.len() * 2);
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = if upper {
                        write!(out, "\\u{unit:04X}")
                    } else {
                        write!(out, "\\u{unit:04x}")
                    };
                }
            }
        }
    }
    out
}

fn percent_encode(data: &[u8], form: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * 3);
    for &b in data {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else if form && b == b' ' {
            out.push(b'+');
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

impl ByteRedactor {
    pub fn new(secrets: &[(String, String)]) -> Self {
        Self::with_counts(secrets, None)
    }

    /// A redactor that counts its matches in `counts` (shared with its clones).
    /// Uses `shapes` (built-in plus the runbook's patterns) instead of the built-ins alone.
    #[must_use]
    pub fn with_shapes(mut self, shapes: ShapeRules) -> Self {
        self.shapes = shapes;
        self
    }

    pub fn shapes(&self) -> &ShapeRules {
        &self.shapes
    }

    pub fn with_counts(
        secrets: &[(String, String)],
        counts: Option<Arc<Mutex<BTreeMap<String, u64>>>>,
    ) -> Self {
        let mut patterns: Vec<(String, Vec<u8>)> = Vec::new();
        // A value shorter than this would be "found" all over ordinary text (and inside the
        // placeholders themselves), destroying the bundle instead of protecting anything.
        for (name, value) in secrets.iter().filter(|(_, v)| v.len() >= MIN_SECRET) {
            for v in variants(value) {
                if !patterns.iter().any(|(_, p)| *p == v) {
                    patterns.push((name.clone(), v));
                }
            }
        }
        let longest = patterns.iter().map(|p| p.1.len()).max().unwrap_or(0);
        let matcher = if patterns.is_empty() {
            None
        } else {
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(patterns.iter().map(|p| &p.1))
                .ok()
                .map(Arc::new)
        };
        Self {
            shapes: ShapeRules::default(),
            patterns,
            matcher,
            longest,
            counts,
        }
    }

    /// The same secrets, without counting (for rewriting what was already counted).
    pub fn uncounted(&self) -> Self {
        Self {
            counts: None,
            ..self.clone()
        }
    }

    /// The shared counter, to carry over when the redactor is rebuilt with more secrets.
    pub fn counts_handle(&self) -> Option<Arc<Mutex<BTreeMap<String, u64>>>> {
        self.counts.clone()
    }

    /// How many times each secret was found (names only).
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.counts
            .as_ref()
            .and_then(|c| c.lock().ok().map(|m| m.clone()))
            .unwrap_or_default()
    }

    /// Whether there is nothing to redact by value (shapes always apply).
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Bytes a streaming caller must hold back so that a secret cut by a chunk boundary is
    /// still seen whole.
    pub fn overlap(&self) -> usize {
        self.longest.saturating_sub(1)
    }

    pub fn redact(&self, data: &[u8]) -> Vec<u8> {
        self.redact_prefix(data, data.len()).0
    }

    /// Redacts matches that start before `cut`; returns the output and how many input bytes it
    /// covers (a match straddling `cut` is taken whole). Callers streaming a file keep the rest
    /// for the next chunk; with `cut = len - overlap()` no match is ever split.
    pub fn redact_prefix(&self, data: &[u8], cut: usize) -> (Vec<u8>, usize) {
        let mut out = Vec::with_capacity(data.len());
        let mut pos = 0;
        let mut found: Vec<String> = Vec::new();
        if let Some(matcher) = &self.matcher {
            for m in matcher.find_iter(data) {
                if m.start() >= cut {
                    break;
                }
                out.extend_from_slice(&data[pos..m.start()]);
                let name = &self.patterns[m.pattern().as_usize()].0;
                out.extend_from_slice(format!("[REDACTED:{name}]").as_bytes());
                found.push(name.clone());
                pos = m.end();
            }
        }
        let end = pos.max(cut);
        out.extend_from_slice(&data[pos..end]);
        let out = self.shapes.apply(&out, &mut found);
        if let (Some(counts), false) = (&self.counts, found.is_empty()) {
            if let Ok(mut c) = counts.lock() {
                for name in found {
                    *c.entry(name).or_insert(0) += 1;
                }
            }
        }
        (out, end)
    }

    /// Rewrites a file with every known secret redacted, streaming in chunks. Used when a
    /// secret is registered after output that contains it was already written.
    pub fn redact_file(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::{Read, Write};
        if self.patterns.is_empty() {
            return Ok(());
        }
        let tmp = path.with_extension("redacting");
        let mut input = std::fs::File::open(path)?;
        let mut output = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 1024 * 1024];
        loop {
            let n = input.read(&mut chunk)?;
            buf.extend_from_slice(&chunk[..n]);
            let cut = if n == 0 {
                buf.len()
            } else {
                buf.len().saturating_sub(self.overlap())
            };
            let (out, used) = self.redact_prefix(&buf, cut);
            output.write_all(&out)?;
            buf.drain(..used);
            if n == 0 {
                break;
            }
        }
        output.flush()?;
        output.get_ref().sync_all()?;
        drop(output);
        std::fs::rename(&tmp, path)
    }

    /// Redacts every string (and key) in a JSON value, before it is serialised.
    pub fn redact_json(&self, value: &mut serde_json::Value) {
        use serde_json::Value;
        match value {
            Value::String(s) => {
                let r = self.redact_str(s);
                if r != *s {
                    *s = r;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.redact_json(v)),
            Value::Object(map) => {
                let old = std::mem::take(map);
                for (k, mut v) in old {
                    self.redact_json(&mut v);
                    map.insert(self.redact_str(&k), v);
                }
            }
            _ => {}
        }
    }

    pub fn redact_str(&self, text: &str) -> String {
        String::from_utf8_lossy(&self.redact(text.as_bytes())).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacting_a_file_in_chunks_equals_redacting_it_whole() {
        let r = ByteRedactor::new(&[("t".into(), "s3cr3t-token".into())]);
        let mut data = Vec::new();
        for i in 0..300_000 {
            data.extend_from_slice(format!("line {i} s3cr3t-token\n").as_bytes());
        }
        let dir = std::env::temp_dir().join(format!("rb-redact-{}", std::process::id()));
        std::fs::write(&dir, &data).expect("write");
        r.redact_file(&dir).expect("redact");
        let got = std::fs::read(&dir).expect("read");
        let _ = std::fs::remove_file(&dir);
        assert_eq!(got, r.redact(&data));
        assert!(!String::from_utf8_lossy(&got).contains("s3cr3t"));
    }

    /// Regression: a secret with a quote in it was stored as written in manifest.json, because
    /// redaction ran on the JSON text where the quote is escaped.
    #[test]
    fn secrets_with_json_special_characters_are_redacted_in_json() {
        let r = ByteRedactor::new(&[("pw".into(), "pa\"ss\\word".into())]);
        let mut v = serde_json::json!({"command_line": ["runbook", "--set", "pw=pa\"ss\\word"]});
        r.redact_json(&mut v);
        assert!(!v.to_string().contains("pa\\\"ss"), "{v}");
        assert_eq!(v["command_line"][2], "pw=[REDACTED:pw]");
    }

    #[test]
    fn encoded_forms_of_a_secret_are_redacted() {
        use base64::Engine as _;
        let secret = "hunter2-Secret/Value+x";
        let r = ByteRedactor::new(&[("pw".into(), secret.into())]);
        let b64 = base64::engine::general_purpose::STANDARD;
        let cases = [
            format!(
                "Authorization: Basic {}",
                b64.encode(format!("admin:{secret}"))
            ),
            format!("token={}", b64.encode(secret)),
            format!(
                "{{\"pw\": {}}}",
                serde_json::to_string(secret).unwrap_or_default()
            ),
            "url?pw=hunter2-Secret%2FValue%2Bx&x=1".to_owned(),
            format!("x{}y", b64.encode(format!("ab{secret}cd"))),
        ];
        for case in cases {
            let out = String::from_utf8_lossy(&r.redact(case.as_bytes())).into_owned();
            assert!(out.contains("[REDACTED:"), "{case} -> {out}");
            assert!(!out.contains("hunter2"), "{out}");
        }
        let key = "-----BEGIN KEY-----\nAAAAB3NzaC1yc2EAAAADAQAB\nQmFzZTY0LWVuY29kZWQtbGluZQ\n-----END KEY-----";
        let r = ByteRedactor::new(&[("key".into(), key.into())]);
        let out =
            String::from_utf8_lossy(&r.redact(b"line: QmFzZTY0LWVuY29kZWQtbGluZQ\n")).into_owned();
        assert_eq!(out, "line: [REDACTED:key]\n");
    }

    /// Regression: only serde_json's escaping was matched, so `json.dumps` (ASCII-only, with
    /// `\u00e4`) and PHP's `\/` printed the secret in the clear.
    #[test]
    fn every_json_escaping_of_a_secret_is_redacted() {
        let cases = [
            // Python `json.dumps`, `jq -a`: non-ASCII as \uXXXX, lower-case hex.
            (
                "pässwörd-ünïcode-€-secret",
                r"p\u00e4ssw\u00f6rd-\u00fcn\u00efcode-\u20ac-secret",
            ),
            // .NET writes the same with upper-case hex.
            (
                "pässwörd-ünïcode-€-secret",
                r"p\u00E4ssw\u00F6rd-\u00FCn\u00EFcode-\u20AC-secret",
            ),
            // Above U+FFFF: a surrogate pair.
            ("emoji-\u{1F600}-secret", r"emoji-\ud83d\ude00-secret"),
            // PHP `json_encode`, Java: `/` as `\/`.
            ("abc/def+ghi=jkl:mno@pqr", r"abc\/def+ghi=jkl:mno@pqr"),
            // Both at once, with a quote.
            ("ä/\"quoted\"-secret", r#"\u00e4\/\"quoted\"-secret"#),
        ];
        for (secret, printed) in cases {
            let r = ByteRedactor::new(&[("pw".into(), secret.into())]);
            let line = format!("{{\"password\":\"{printed}\"}}");
            assert_eq!(
                r.redact_str(&line),
                "{\"password\":\"[REDACTED:pw]\"}",
                "{secret} printed as {printed}"
            );
        }
        // What Python itself prints, if it is here.
        let secret = "pässwörd/ünïcode-€-secret";
        if let Ok(out) = std::process::Command::new("python3")
            .args([
                "-c",
                "import json,sys; print(json.dumps(sys.argv[1]))",
                secret,
            ])
            .output()
        {
            let r = ByteRedactor::new(&[("pw".into(), secret.into())]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert_eq!(r.redact_str(&text), "\"[REDACTED:pw]\"\n", "{text}");
        }
    }

    /// Each line of a multi-line secret is found on its own, from `MIN_SECRET_LINE` bytes
    /// (docs/evidence.md says so); shorter lines only as part of the whole value.
    #[test]
    fn lines_of_a_multi_line_secret_are_found_from_eight_bytes() {
        let secret = "first-line-of-it\nshort\n8bytes!!\n}";
        let r = ByteRedactor::new(&[("ml".into(), secret.into())]);
        assert_eq!(
            r.redact_str(&format!("whole: {secret}.")),
            "whole: [REDACTED:ml]."
        );
        assert_eq!(
            r.redact_str("first-line-of-it short 8bytes!! }"),
            "[REDACTED:ml] short [REDACTED:ml] }"
        );
        assert_eq!(MIN_SECRET_LINE, "8bytes!!".len());
    }

    #[test]
    fn matches_are_counted_per_secret() {
        let counts = Arc::new(Mutex::new(BTreeMap::new()));
        let r = ByteRedactor::with_counts(&[("a".into(), "alpha-1".into())], Some(counts));
        let _ = r.redact(b"alpha-1 and alpha-1");
        assert_eq!(r.clone().counts().get("a"), Some(&2));
        let _ = r.uncounted().redact(b"alpha-1");
        assert_eq!(r.counts().get("a"), Some(&2));
    }

    #[test]
    fn secrets_are_found_by_shape() {
        let r = ByteRedactor::new(&[]);
        let out = |s: &str| String::from_utf8_lossy(&r.redact(s.as_bytes())).into_owned();
        assert_eq!(
            out("Authorization: Bearer abc.def-123_xyz"),
            "Authorization: Bearer [REDACTED:authorization]"
        );
        assert_eq!(
            out("curl -H 'authorization: token ghp_abcdef123456'"),
            "curl -H 'authorization: token [REDACTED:authorization]'"
        );
        assert_eq!(
            out("using bearer eyJhbGciOiJIUzI1NiJ9.x"),
            "using bearer [REDACTED:bearer-token]"
        );
        let pem = "key:\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\nafter";
        assert_eq!(out(pem), "key:\n[REDACTED:private-key]\nafter");
        let custom = ByteRedactor::new(&[])
            .with_shapes(ShapeRules::new(&["password=(?P<v>\\S+)".into()]).expect("regex"));
        assert_eq!(
            String::from_utf8_lossy(&custom.redact(b"password=hunter2 ok")),
            "password=[REDACTED:pattern-1] ok"
        );
        let mut f = PemFilter::default();
        let lines: Vec<Option<&[u8]>> = [
            "x",
            "-----BEGIN RSA PRIVATE KEY-----",
            "MIIE",
            "-----END RSA PRIVATE KEY-----",
            "y",
        ]
        .iter()
        .map(|l| f.line(l.as_bytes()))
        .collect();
        assert_eq!(lines.iter().filter(|l| l.is_some()).count(), 3);
        assert!(lines[0].is_none() && lines[4].is_none());
    }

    #[test]
    fn replaces_longest_first() {
        let r = ByteRedactor::new(&[("a".into(), "toke".into()), ("b".into(), "token123".into())]);
        assert_eq!(
            r.redact_str("x token123 toke"),
            "x [REDACTED:b] [REDACTED:a]"
        );
    }
}
