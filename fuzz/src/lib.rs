//! Helpers shared by the fuzz targets: reading back attempt logs and casts.

use runbook_evidence::redact::ByteRedactor;

/// One record of an attempt log: `<RFC 3339 time> <tag> <bytes>`.
pub struct Record<'a> {
    pub stamp: &'a [u8],
    pub tag: &'a [u8],
    pub payload: &'a [u8],
}

/// Splits an attempt log into records, checking the framing of each (panics otherwise).
pub fn parse_log(log: &[u8]) -> Vec<Record<'_>> {
    assert!(
        log.is_empty() || log.ends_with(b"\n"),
        "log does not end with a newline"
    );
    let mut out = Vec::new();
    let body = log.strip_suffix(b"\n").unwrap_or(log);
    if log.is_empty() {
        return out;
    }
    for line in body.split(|&b| b == b'\n') {
        let mut parts = line.splitn(3, |&b| b == b' ');
        let stamp = parts.next().unwrap_or_default();
        let tag = parts.next().unwrap_or_else(|| panic!("record without a tag: {line:?}"));
        let payload = parts
            .next()
            .unwrap_or_else(|| panic!("record without a payload separator: {line:?}"));
        let stamp_text = std::str::from_utf8(stamp).expect("time stamp is text");
        assert!(
            chrono::DateTime::parse_from_rfc3339(stamp_text).is_ok(),
            "bad time stamp {stamp_text:?}"
        );
        assert!(
            matches!(tag, b"out" | b"err" | b"out+" | b"err+" | b"---"),
            "unknown tag {:?}",
            String::from_utf8_lossy(tag)
        );
        out.push(Record {
            stamp,
            tag,
            payload,
        });
    }
    out
}

/// The bytes of one stream (`out` or `err`) as the log records them: `+` records joined to
/// the next, complete lines followed by their newline.
pub fn stream_bytes(records: &[Record<'_>], tag: &str) -> Vec<u8> {
    let full = tag.as_bytes();
    let plus = format!("{tag}+");
    let mut out = Vec::new();
    for r in records {
        if r.tag == full {
            out.extend_from_slice(r.payload);
            out.push(b'\n');
        } else if r.tag == plus.as_bytes() {
            out.extend_from_slice(r.payload);
        }
    }
    out
}

/// What the log must hold for `data`: each line redacted on its own (the log is line-oriented;
/// secret values contain no newline, so for them this equals redacting the whole).
pub fn redact_lines(redactor: &ByteRedactor, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    for (i, line) in data.split(|&b| b == b'\n').enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        out.extend_from_slice(&redactor.redact(line));
    }
    out
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// A unique scratch file path for this process.
pub fn scratch(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("runbook-fuzz-{}-{name}", std::process::id()))
}
