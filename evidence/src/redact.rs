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

/// A line that ends in at least this many base64 characters may be wrapped base64 continuing on
/// the next line: GNU `base64` wraps at 76 columns, `openssl base64` and PEM at 64. Shorter
/// wraps (`base64 -w 20`) are not followed: ordinary text ends in short words all the time.
pub const WRAP_MIN: usize = 64;

/// Characters of standard and URL-safe base64 (padding ends a wrapped text, it does not continue).
fn is_base64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_')
}

/// Whether a line (`line`, without its `\n`; `lead` is what came before it on the same line
/// when `line` is only its end) ends in at least [`WRAP_MIN`] base64 characters, before a `\r`
/// if it ends in one (CRLF line breaks).
fn ends_wrapped(lead: &[u8], line: &[u8]) -> bool {
    let (lead, line) = match line.split_last() {
        Some((b'\r', rest)) => (lead, rest),
        Some(_) => (lead, line),
        None => (lead.strip_suffix(b"\r").unwrap_or(lead), line),
    };
    let run = line.iter().rev().take_while(|&&b| is_base64(b)).count();
    if run >= WRAP_MIN || run < line.len() {
        return run >= WRAP_MIN;
    }
    run + lead.iter().rev().take_while(|&&b| is_base64(b)).count() >= WRAP_MIN
}

/// What a caller streaming data keeps as `lead` for the bytes after `consumed` (which came
/// after `lead`): the end of the current line, at most [`WRAP_MIN`] bytes of it.
pub fn next_lead(lead: &[u8], consumed: &[u8]) -> Vec<u8> {
    let line = match consumed.iter().rposition(|&b| b == b'\n') {
        Some(n) => consumed[n + 1..].to_vec(),
        None => [lead, consumed].concat(),
    };
    line[line.len().saturating_sub(WRAP_MIN)..].to_vec()
}

/// The `lead` for data starting at `pos` of `data` (see [`ByteRedactor::redact_after`]).
pub fn lead_at(data: &[u8], pos: usize) -> &[u8] {
    let line_start = data[..pos]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |n| n + 1);
    &data[line_start.max(pos.saturating_sub(WRAP_MIN + 1))..pos]
}

/// The data with the line breaks of wrapped base64 taken out, to match a secret's base64 forms
/// across them.
struct Wrapped {
    flat: Vec<u8>,
    /// For each byte of `flat`, its position in the data.
    at: Vec<usize>,
}

/// A match found in the data with wrapped lines joined: data positions, pattern, and the line
/// breaks it spanned (put back after the placeholder, so no line goes missing).
struct Spanned {
    start: usize,
    end: usize,
    pattern: usize,
    breaks: Vec<u8>,
}

impl Wrapped {
    /// None when no line of `data` ends wrapped (the usual case: nothing to do).
    fn new(lead: &[u8], data: &[u8]) -> Option<Self> {
        // The line breaks (`\n` or `\r\n`) after lines that end wrapped.
        let mut joins: Vec<(usize, usize)> = Vec::new();
        let mut line_start = 0;
        for (n, _) in data.iter().enumerate().filter(|(_, &b)| b == b'\n') {
            let before: &[u8] = if line_start == 0 { lead } else { &[] };
            if ends_wrapped(before, &data[line_start..n]) {
                let cr = n > line_start && data[n - 1] == b'\r';
                joins.push((if cr { n - 1 } else { n }, n + 1));
            }
            line_start = n + 1;
        }
        if joins.is_empty() {
            return None;
        }
        let mut flat = Vec::with_capacity(data.len());
        let mut at = Vec::with_capacity(data.len());
        let mut joins = joins.into_iter().peekable();
        let mut i = 0;
        while i < data.len() {
            if let Some(&(from, to)) = joins.peek() {
                if i == from {
                    joins.next();
                    i = to;
                    continue;
                }
            }
            flat.push(data[i]);
            at.push(i);
            i += 1;
        }
        Some(Self { flat, at })
    }

    /// The leftmost-longest match starting at or after data position `pos`.
    fn find(&self, matcher: &AhoCorasick, data: &[u8], pos: usize) -> Option<Spanned> {
        let from = self.at.partition_point(|&i| i < pos);
        let m = matcher.find(aho_corasick::Input::new(&self.flat).range(from..))?;
        let mut breaks = Vec::new();
        for k in m.start()..m.end() - 1 {
            breaks.extend_from_slice(&data[self.at[k] + 1..self.at[k + 1]]);
        }
        Some(Spanned {
            start: self.at[m.start()],
            end: self.at[m.end() - 1] + 1,
            pattern: m.pattern().as_usize(),
            breaks,
        })
    }
}

/// Redacts a stream of bytes piece by piece (a file being copied or rewritten) with the same
/// result as redacting it whole: a secret, a wrapped base64 form of one, or a private key block
/// is never cut between two pieces.
pub struct StreamRedactor<'a> {
    redactor: &'a ByteRedactor,
    /// Bytes not redacted yet.
    pending: Vec<u8>,
    /// The end of the line before `pending` (see [`next_lead`]).
    lead: Vec<u8>,
    /// Inside a private key block longer than [`MAX_KEY_BLOCK`]: dropped up to its END line.
    in_key: bool,
}

/// [`StreamRedactor`] gives out whole lines; one longer than this goes out in pieces.
const MAX_LINE: usize = 1024 * 1024;

/// A private key block is held whole until its END line, up to this size; a longer one (or one
/// that never ends) is replaced from its BEGIN line on, as redacting the whole file would.
const MAX_KEY_BLOCK: usize = 1024 * 1024;

impl<'a> StreamRedactor<'a> {
    pub fn new(redactor: &'a ByteRedactor) -> Self {
        Self {
            redactor,
            pending: Vec::new(),
            lead: Vec::new(),
            in_key: false,
        }
    }

    /// Takes the next bytes; returns the redacted output that can be written now.
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(data);
        let len = self.pending.len();
        let cut = len.saturating_sub(self.redactor.overlap());
        // Pieces end at a line break: the shapes (`Authorization: …`, `Bearer …`) are matched
        // within a line and must see it whole. A line longer than MAX_LINE is cut anyway,
        // keeping back what a trigger and its value could span.
        let cut = match self.pending[..cut].iter().rposition(|&b| b == b'\n') {
            Some(n) => n + 1,
            None if len > MAX_LINE => cut.min(len - MAX_LINE / 2),
            None => 0,
        };
        self.take(cut, false)
    }

    /// The rest of the output, at the end of the stream.
    pub fn finish(mut self) -> Vec<u8> {
        let len = self.pending.len();
        self.take(len, true)
    }

    fn take(&mut self, cut: usize, last: bool) -> Vec<u8> {
        let mut out = Vec::new();
        if self.in_key {
            match key_marker(&KEY_END, &self.pending, 0) {
                Some((_, end)) => {
                    self.lead = next_lead(&self.lead, &self.pending[..end]);
                    self.pending.drain(..end);
                    self.in_key = false;
                }
                None if last => {
                    self.pending.clear();
                    return out;
                }
                None => {
                    // Keep the last bytes: this read may have cut the END line.
                    let drop = self.pending.len().saturating_sub(64);
                    self.pending.drain(..drop);
                    return out;
                }
            }
        }
        let wanted = cut.min(self.pending.len());
        let cut = if last {
            self.pending.len()
        } else {
            self.key_safe_cut(wanted)
        };
        if cut == 0 && !last {
            // Held back for a key block starting at the very beginning: wait for its END line,
            // up to a bound.
            if wanted > 0 && self.pending.len() > MAX_KEY_BLOCK {
                // A key block that does not end: replaced from its BEGIN line on (the rule's
                // `\z` branch), and the rest dropped up to an END line.
                let len = self.pending.len();
                let (red, _) = self.redactor.redact_after(&self.lead, &self.pending, len);
                out.extend_from_slice(&red);
                self.lead.clear();
                self.pending.clear();
                self.in_key = true;
            }
            return out;
        }
        let (red, used) = self.redactor.redact_after(&self.lead, &self.pending, cut);
        out.extend_from_slice(&red);
        self.lead = next_lead(&self.lead, &self.pending[..used]);
        self.pending.drain(..used);
        out
    }

    /// `cut`, moved back to the start of a private key block that begins before it and does not
    /// end before it, or on to the block's end when that is already here, so the block is
    /// redacted in one piece (the rule is a regular expression from BEGIN to END).
    fn key_safe_cut(&self, cut: usize) -> usize {
        let data = &self.pending;
        let mut begin = None;
        let mut from = 0;
        while let Some((b, e)) = key_marker(&KEY_BEGIN, data, from) {
            if b >= cut {
                break;
            }
            begin = Some((b, e));
            from = e;
        }
        let Some((b, e)) = begin else {
            return cut;
        };
        match key_marker(&KEY_END, data, e) {
            Some((_, end)) => cut.max(end),
            None => b,
        }
    }
}

/// Complete lines of one output stream, held back while they may be wrapped base64, for
/// writers that redact line by line (the attempt log, the terminal): a run of lines ending in
/// [`WRAP_MIN`] base64 characters is redacted together with the line that ends it, so a secret's
/// base64 form broken over lines is found. Other lines pass straight through. `M` is what the
/// caller keeps with each line (its time stamp).
#[derive(Debug)]
pub struct WrapHold<M> {
    /// The raw held lines, each followed by `\n`.
    text: Vec<u8>,
    /// One per line in `text`, in order.
    metas: Vec<M>,
    /// What came before `text` on its first line (see [`next_lead`]).
    lead: Vec<u8>,
    /// The redacted start of the first line of `text`, given out when the line is complete.
    carry: Vec<u8>,
}

impl<M> Default for WrapHold<M> {
    fn default() -> Self {
        Self {
            text: Vec::new(),
            metas: Vec::new(),
            lead: Vec::new(),
            carry: Vec::new(),
        }
    }
}

/// Held lines past this many bytes go out, except the last `overlap()` bytes (a base64 dump
/// of several megabytes is not held whole).
const MAX_HOLD: usize = 256 * 1024;

impl<M: Clone> WrapHold<M> {
    pub fn is_empty(&self) -> bool {
        self.metas.is_empty()
    }

    /// Takes a complete line (without its `\n`); returns the redacted lines that can go out
    /// now, in order, each with its `meta`.
    pub fn line(&mut self, redactor: &ByteRedactor, meta: M, line: &[u8]) -> Vec<(M, Vec<u8>)> {
        if self.is_empty() && !ends_wrapped(&[], line) {
            return vec![(meta, redactor.redact(line))];
        }
        self.text.extend_from_slice(line);
        self.text.push(b'\n');
        self.metas.push(meta);
        if !ends_wrapped(&[], line) {
            return self.release(redactor, &[]).0;
        }
        if self.text.len() > MAX_HOLD.max(2 * redactor.overlap()) {
            let keep = self.text.len() - redactor.overlap().max(1);
            // The last line start at or before `keep`: lines go out whole when they can.
            let cut = self.text[..keep]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(keep, |n| n + 1);
            return self.take(redactor, cut, &[]).0;
        }
        Vec::new()
    }

    /// Gives out every held line, as the end of the stream or before output that does not
    /// continue them. `next` is what follows on the stream, if known (the start of a long line
    /// being written in pieces): a secret's form running into it is found, and the returned
    /// count says how many of its bytes that consumed (their redacted text is the last element
    /// of the returned lines, when not empty, and is not a complete line).
    pub fn release(&mut self, redactor: &ByteRedactor, next: &[u8]) -> (Vec<(M, Vec<u8>)>, usize) {
        let cut = self.text.len();
        self.take(redactor, cut, next)
    }

    fn take(
        &mut self,
        redactor: &ByteRedactor,
        cut: usize,
        next: &[u8],
    ) -> (Vec<(M, Vec<u8>)>, usize) {
        if self.is_empty() {
            return (Vec::new(), 0);
        }
        let held = self.text.len();
        let mut data = std::mem::take(&mut self.text);
        data.extend_from_slice(next);
        let (red, used) = redactor.redact_after(&self.lead, &data, cut);
        let into_next = used.saturating_sub(held);
        let used_held = used.min(held);
        let complete = data[..used_held].iter().filter(|&&b| b == b'\n').count();
        let mut lines: Vec<&[u8]> = red.split(|&b| b == b'\n').collect();
        let tail = lines.pop().unwrap_or_default();
        let mut out = Vec::with_capacity(lines.len() + 1);
        // Output lines match input lines one to one, unless a secret containing a line break
        // was replaced whole: then the later lines take the last stamp.
        for (n, l) in lines.into_iter().enumerate() {
            let meta = self.metas[n.min(complete.saturating_sub(1))].clone();
            let mut text = std::mem::take(&mut self.carry);
            text.extend_from_slice(l);
            out.push((meta, text));
        }
        self.lead = next_lead(&self.lead, &data[..used]);
        self.metas.drain(..complete.min(self.metas.len()));
        data.truncate(held);
        data.drain(..used_held);
        self.text = data;
        if into_next > 0 {
            // Ran into `next`: the held lines are all out, the rest belongs to the caller.
            let meta = out.last().map(|(m, _)| m.clone());
            let mut text = std::mem::take(&mut self.carry);
            text.extend_from_slice(tail);
            if let Some(meta) = meta.or_else(|| self.metas.first().cloned()) {
                out.push((meta, text));
            }
            self.metas.clear();
            self.text.clear();
            self.lead.clear();
        } else {
            self.carry.extend_from_slice(tail);
            if self.metas.is_empty() {
                self.lead.clear();
                self.carry.clear();
            }
        }
        (out, into_next)
    }
}

/// For writers that give out whole lines as they come (the transcript): where to stop in
/// `data[..end]` (`end` just after a line break) so that the trailing lines that end wrapped
/// (see [`WrapHold`]) wait for the line that ends them. A last line ending in `\r` counts (its
/// `\n` may be in the next read). At most [`MAX_HOLD`] bytes wait; past that, all but the last
/// `overlap` bytes go out (a match starting before the cut is taken whole: none is missed).
pub fn hold_wrapped(lead: &[u8], data: &[u8], end: usize, overlap: usize) -> usize {
    let mut hold = end;
    while hold > 0 {
        let brk = data[hold - 1];
        if brk != b'\n' && !(brk == b'\r' && hold == end) {
            break;
        }
        let content_end = hold - 1;
        let start = data[..content_end]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |n| n + 1);
        let before: &[u8] = if start == 0 { lead } else { &[] };
        if !ends_wrapped(before, &data[start..content_end]) {
            break;
        }
        hold = start;
    }
    if end - hold > MAX_HOLD.max(2 * overlap) {
        let keep = end - overlap.max(1);
        hold = data[..keep]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(keep, |n| n + 1)
            .max(hold);
    }
    hold
}

static KEY_BEGIN: std::sync::LazyLock<Option<regex::bytes::Regex>> =
    std::sync::LazyLock::new(|| {
        regex::bytes::Regex::new("-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----").ok()
    });
static KEY_END: std::sync::LazyLock<Option<regex::bytes::Regex>> = std::sync::LazyLock::new(|| {
    regex::bytes::Regex::new("-----END [A-Z0-9 ]*PRIVATE KEY-----").ok()
});

/// The first private key BEGIN or END marker at or after `from`: (start, end).
fn key_marker(
    re: &std::sync::LazyLock<Option<regex::bytes::Regex>>,
    data: &[u8],
    from: usize,
) -> Option<(usize, usize)> {
    let m = re.as_ref()?.find_at(data, from)?;
    Some((m.start(), m.end()))
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
    /// still seen whole: the longest form, plus the line breaks of a wrapped base64 form
    /// (`\n` or `\r\n`; every line it crosses but the first and last is at least
    /// [`WRAP_MIN`] bytes long).
    pub fn overlap(&self) -> usize {
        if self.longest == 0 {
            return 0;
        }
        self.longest - 1 + 2 * (self.longest / WRAP_MIN + 1)
    }

    pub fn redact(&self, data: &[u8]) -> Vec<u8> {
        self.redact_prefix(data, data.len()).0
    }

    /// Redacts matches that start before `cut`; returns the output and how many input bytes it
    /// covers (a match straddling `cut` is taken whole). Callers streaming a file keep the rest
    /// for the next chunk; with `cut = len - overlap()` no match is ever split.
    pub fn redact_prefix(&self, data: &[u8], cut: usize) -> (Vec<u8>, usize) {
        self.redact_after(&[], data, cut)
    }

    /// [`ByteRedactor::redact_prefix`] for data that continues a stream: `lead` is what came
    /// just before `data` on the same line (see [`next_lead`]), needed only to tell whether the
    /// first line of `data` continues a wrapped base64 text.
    ///
    /// Besides the secrets' forms found in `data` as it is, a form is found across the line
    /// breaks of wrapped base64 (GNU `base64` wraps at 76 columns, `openssl base64` at 64): a
    /// line that ends in at least [`WRAP_MIN`] base64 characters (before a `\r`, for CRLF) is
    /// read as continuing on the next line. Such a match is replaced by one placeholder followed by the line breaks it
    /// spanned, so the output has as many lines as the input (logs keep one record per line).
    pub fn redact_after(&self, lead: &[u8], data: &[u8], cut: usize) -> (Vec<u8>, usize) {
        let mut out = Vec::with_capacity(data.len());
        let mut pos = 0;
        let mut found: Vec<String> = Vec::new();
        if let Some(matcher) = &self.matcher {
            let wrapped = Wrapped::new(lead, data);
            // Leftmost match in either view, the longer on a tie; the next match of each view
            // is kept while it still starts at or after `pos` (it is then still the leftmost).
            let mut raw: Option<Spanned> = None;
            let mut flat: Option<Spanned> = None;
            loop {
                if raw.as_ref().is_none_or(|m| m.start < pos) {
                    raw = matcher
                        .find(aho_corasick::Input::new(data).range(pos..))
                        .map(|m| Spanned {
                            start: m.start(),
                            end: m.end(),
                            pattern: m.pattern().as_usize(),
                            breaks: Vec::new(),
                        });
                }
                if let Some(w) = &wrapped {
                    if flat.as_ref().is_none_or(|m| m.start < pos) {
                        flat = w.find(matcher, data, pos);
                    }
                }
                let use_flat = match (&raw, &flat) {
                    (Some(r), Some(f)) => {
                        f.start < r.start || (f.start == r.start && f.end > r.end)
                    }
                    (None, Some(_)) => true,
                    _ => false,
                };
                let Some(m) = (if use_flat { &flat } else { &raw }) else {
                    break;
                };
                if m.start >= cut {
                    break;
                }
                out.extend_from_slice(&data[pos..m.start]);
                let name = &self.patterns[m.pattern].0;
                out.extend_from_slice(format!("[REDACTED:{name}]").as_bytes());
                out.extend_from_slice(&m.breaks);
                found.push(name.clone());
                pos = m.end;
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
        let mut stream = StreamRedactor::new(self);
        let mut chunk = vec![0u8; 1024 * 1024];
        loop {
            let n = input.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            output.write_all(&stream.push(&chunk[..n]))?;
        }
        output.write_all(&stream.finish())?;
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

    /// `data` base64-encoded and wrapped at `width` columns, as `base64 -w width` prints it.
    fn wrapped_base64(data: &[u8], width: usize) -> String {
        use base64::Engine as _;
        let enc = base64::engine::general_purpose::STANDARD.encode(data);
        let lines: Vec<&str> = enc
            .as_bytes()
            .chunks(width)
            .map(|c| std::str::from_utf8(c).unwrap_or_default())
            .collect();
        lines.join("\n") + "\n"
    }

    const LONG: &str =
        "long-secret/with+special chars&=?~ and more text to exceed fifty seven bytes!!";

    /// Regression: GNU `base64` wraps at 76 columns, and only unwrapped base64 was matched.
    #[test]
    fn base64_wrapped_over_lines_is_redacted() {
        let r = ByteRedactor::new(&[("pw".into(), LONG.into())]);
        let cases = [
            wrapped_base64(LONG.as_bytes(), 76),
            wrapped_base64(format!("admin:{LONG}").as_bytes(), 76),
            wrapped_base64(format!("a:{LONG}").as_bytes(), 76),
            wrapped_base64(LONG.as_bytes(), 64),
            wrapped_base64(format!("{LONG}{LONG}{LONG}").as_bytes(), 76),
            format!("token={}", wrapped_base64(LONG.as_bytes(), 76)),
            // In the middle of a long base64 dump, at each alignment.
            wrapped_base64(
                format!("{}{LONG}{}", "x".repeat(200), "y".repeat(100)).as_bytes(),
                76,
            ),
            wrapped_base64(
                format!("{}{LONG}{}", "x".repeat(201), "y".repeat(100)).as_bytes(),
                76,
            ),
            wrapped_base64(
                format!("{}{LONG}{}", "x".repeat(202), "y".repeat(100)).as_bytes(),
                76,
            ),
        ];
        for case in cases {
            let out = r.redact(case.as_bytes());
            let text = String::from_utf8_lossy(&out);
            assert!(text.contains("[REDACTED:pw]"), "{case}-> {text}");
            // Line structure is kept: one output line per input line.
            assert_eq!(
                text.lines().count(),
                case.lines().count(),
                "{case} -> {text}"
            );
            // No 8 characters of the secret's encodings are left on any line.
            for line in text.lines() {
                let clean = line.replace("[REDACTED:pw]", " ");
                for v in variants(LONG) {
                    for w in v.windows(12) {
                        assert!(
                            !clean.as_bytes().windows(12).any(|c| c == w),
                            "{case} -> {text}"
                        );
                    }
                }
            }
        }
        // Unrelated wrapped base64 is left alone.
        let other = wrapped_base64(&[7u8; 300], 76);
        assert_eq!(r.redact(other.as_bytes()), other.as_bytes());
    }

    #[test]
    fn streaming_equals_redacting_whole() {
        let r = ByteRedactor::new(&[
            ("pw".into(), LONG.into()),
            ("t".into(), "tok-123456".into()),
        ]);
        let mut data = Vec::new();
        for i in 0..40 {
            data.extend_from_slice(format!("line {i} tok-123456\n").as_bytes());
            data.extend_from_slice(wrapped_base64(format!("{i}:{LONG}").as_bytes(), 76).as_bytes());
            if i % 7 == 0 {
                data.extend_from_slice(
                    b"-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\nqq\n-----END RSA PRIVATE KEY-----\n",
                );
            }
        }
        let whole = r.redact(&data);
        assert!(!String::from_utf8_lossy(&whole).contains("MIIE"));
        for size in [1, 3, 7, 64, 77, 1000, 4096] {
            let mut s = StreamRedactor::new(&r);
            let mut out = Vec::new();
            for chunk in data.chunks(size) {
                out.extend_from_slice(&s.push(chunk));
            }
            out.extend_from_slice(&s.finish());
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&whole),
                "chunks of {size}"
            );
        }
        // Held lines: the same result line by line (without the private key rule, which is the
        // log's own line filter there: see `PemFilter`).
        let r = r.with_shapes(ShapeRules {
            rules: Arc::default(),
        });
        assert_same_lines(&held_lines(&r, &data), &whole_lines(&r, &data), 0);
    }

    #[track_caller]
    fn assert_same_lines(got: &[String], want: &[String], case: usize) {
        if let Some(n) = (0..got.len().max(want.len())).find(|&n| got.get(n) != want.get(n)) {
            panic!(
                "case {case}: line {n} differs:\n got {:?}\nwant {:?}",
                got.get(n),
                want.get(n)
            );
        }
    }

    /// Regression (found while streaming collected files): a chunk cut between `Bearer` and
    /// its token left the token's end in the clear.
    #[test]
    fn streaming_never_cuts_a_shape_in_two() {
        let r = ByteRedactor::new(&[]);
        let mut data = Vec::new();
        for i in 0..2000 {
            data.extend_from_slice(
                format!("{i} Authorization: Bearer tok-{i:06}-abcdefgh\n").as_bytes(),
            );
        }
        let whole = r.redact(&data);
        for size in [7, 100, 4096] {
            let mut s = StreamRedactor::new(&r);
            let mut out = Vec::new();
            for chunk in data.chunks(size) {
                out.extend_from_slice(&s.push(chunk));
            }
            out.extend_from_slice(&s.finish());
            assert!(out == whole, "chunks of {size}");
        }
        assert!(!String::from_utf8_lossy(&whole).contains("abcdefgh"));
    }

    /// `data` through a [`WrapHold`] line by line.
    fn held_lines(r: &ByteRedactor, data: &[u8]) -> Vec<String> {
        let mut hold = WrapHold::default();
        let mut got = Vec::new();
        let text = |(_, l): (usize, Vec<u8>)| String::from_utf8_lossy(&l).into_owned();
        for (n, line) in data.split(|&b| b == b'\n').enumerate() {
            got.extend(hold.line(r, n, line).into_iter().map(text));
        }
        got.extend(hold.release(r, &[]).0.into_iter().map(text));
        got
    }

    fn whole_lines(r: &ByteRedactor, data: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(&r.redact(data))
            .split('\n')
            .map(str::to_owned)
            .collect()
    }

    /// A base64 dump longer than the hold limit goes out in pieces; a secret across a piece
    /// boundary is still found.
    #[test]
    fn a_long_held_dump_is_released_in_pieces_without_missing_a_secret() {
        let r = ByteRedactor::new(&[("pw".into(), LONG.into())]);
        // Where the first piece ends: 3 bytes are 4 characters, 76 of them a 77-byte line.
        let around = MAX_HOLD * 3 / 4 * 76 / 77;
        for shift in (0..400).step_by(7) {
            let mut raw = vec![b'x'; around - 200 + shift];
            // Twice: the second may start on the line where the first, cut, ended.
            raw.extend_from_slice(LONG.as_bytes());
            raw.extend_from_slice(LONG.as_bytes());
            raw.extend_from_slice(&[b'y'; 5000]);
            let data = format!("start\n{}end\n", wrapped_base64(&raw, 76));
            let got = held_lines(&r, data.as_bytes());
            assert_same_lines(&got, &whole_lines(&r, data.as_bytes()), shift);
            assert!(got.concat().contains("[REDACTED:pw]"), "shift {shift}");
        }
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
