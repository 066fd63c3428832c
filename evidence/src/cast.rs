//! Terminal transcripts: one asciicast v2 file per attempt (`asciinema play attempt-1.cast`).
//!
//! The cast is a *view* of an attempt for people; the attempt log stays the record (raw bytes,
//! both streams apart). Here:
//! - line 1 is the header, then `[seconds since start, "o", text]` events whose times never
//!   go backwards, even if the wall clock does;
//! - the first event shows the command prompt-style (`$ cmd`, continuation lines `> …`);
//! - output is decoded as UTF-8 lossily, but a multi-byte character cut by a read boundary is
//!   held back until its remaining bytes arrive, never split across events;
//! - `\n` becomes `\r\n` so the transcript replays in a terminal;
//! - stderr is wrapped in red (`\x1b[31m` … `\x1b[0m`): the format has one output stream;
//! - secrets are redacted before anything is written, by the one streaming driver
//!   ([`crate::redact::StreamRedactor`]; in a run, the attempt log's, whose result this writes
//!   too). Output is streamed: complete lines and progress lines (ending in `\r`) go out at
//!   once, an unfinished line after a bound, lines that may be wrapped base64 when the line
//!   that ends them arrives. A secret value containing a newline is not supported by that rule
//!   (tokens and passwords don't have one). [`CastWriter::rewrite_redacted`] redacts what was already written when a
//!   secret becomes known mid-run, like the attempt log's `rewrite_redacted`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use runbook_engine::event::Stream;

use crate::fs::HashingFile;
use crate::log::sink::Sink;
use crate::redact::{ByteRedactor, StreamRedactor};
use crate::{write_err, EvidenceError};

pub const WIDTH: u32 = 120;
pub const HEIGHT: u32 = 40;

const RED: &str = "\x1b[31m";
const RESET: &str = "\x1b[0m";

struct StreamState {
    /// Holds back what redaction needs when this writer is given raw output
    /// ([`CastWriter::write`]); the recorder gives it the log's result instead
    /// ([`CastWriter::write_redacted`]).
    driver: StreamRedactor<()>,
    /// Redacted bytes of an incomplete UTF-8 sequence at the end of the last event.
    carry: Vec<u8>,
    /// The last character written for this stream was `\r` (so a following `\n` stays as is).
    last_cr: bool,
}

impl Default for StreamState {
    fn default() -> Self {
        Self {
            driver: StreamRedactor::lines(),
            carry: Vec::new(),
            last_cr: false,
        }
    }
}

pub struct CastWriter {
    path: PathBuf,
    file: Sink,
    /// The event line being built (reused: no allocation per event).
    line: Vec<u8>,
    started: DateTime<Utc>,
    /// Time of the last event, in microseconds since `started`.
    last_us: i64,
    /// Whether the terminal cursor is at the start of a line (for the closing marker).
    at_line_start: bool,
    streams: [StreamState; 2],
    /// Secrets as known when the last bytes arrived; the owner replaces it when a secret is
    /// registered mid-run (and then calls [`CastWriter::rewrite_redacted`]).
    pub redactor: ByteRedactor,
}

fn index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

impl CastWriter {
    /// Creates the file (and its directory), writes the header and the command as the first
    /// event.
    pub fn create(
        path: &Path,
        started: DateTime<Utc>,
        title: &str,
        command_line: &str,
        redactor: ByteRedactor,
    ) -> Result<Self, EvidenceError> {
        // Usually made for the attempt's log just before: a look, not a `mkdir`.
        if let Some(parent) = path.parent().filter(|p| !p.is_dir()) {
            std::fs::create_dir_all(parent).map_err(write_err(parent))?;
        }
        let file = File::create(path).map_err(write_err(path))?;
        let mut w = Self {
            path: path.to_owned(),
            file: Sink::new(HashingFile::new(file)),
            line: Vec::new(),
            started,
            last_us: 0,
            at_line_start: true,
            streams: Default::default(),
            redactor,
        };
        let title = w.redactor.redact_str(title);
        let header = header_line(started.timestamp(), &title);
        w.file
            .write_all(header.as_bytes())
            .map_err(write_err(&w.path))?;
        let command = w.redactor.redact_str(command_line);
        let prompt = prompt_text(&command);
        w.event(started, &prompt)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends output of one stream, redacting it here.
    pub fn write(
        &mut self,
        at: DateTime<Utc>,
        stream: Stream,
        data: &[u8],
    ) -> Result<(), EvidenceError> {
        let released = self.streams[index(stream)]
            .driver
            .push(&self.redactor, (), data);
        self.emit(at, stream, &released.text, false)
    }

    /// Appends output of one stream already redacted by the attempt log's driver (what
    /// [`crate::log::LogWriter::write_output`] returns): the same bytes, redacted once.
    pub fn write_redacted(
        &mut self,
        at: DateTime<Utc>,
        stream: Stream,
        text: &[u8],
    ) -> Result<(), EvidenceError> {
        self.emit(at, stream, text, false)
    }

    /// Writes out what is still held back, a closing line (`outcome_text`, e.g. `attempt 2:
    /// exit code 3`), and closes the file, synced to disk.
    pub fn finish(self, at: DateTime<Utc>, outcome_text: &str) -> Result<(), EvidenceError> {
        self.close(at, outcome_text).map(drop)
    }

    /// [`CastWriter::finish`], returning the file's SHA-256 when this writer wrote all of it.
    pub fn close(
        mut self,
        at: DateTime<Utc>,
        outcome_text: &str,
    ) -> Result<Option<String>, EvidenceError> {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let released = self.streams[index(stream)].driver.finish(&self.redactor);
            self.emit(at, stream, &released.text, true)?;
        }
        self.note(at, outcome_text)?;
        // Synced by the recorder together with the journal (group commit).
        let path = self.path;
        let file = self.file.close().map_err(write_err(&path))?;
        Ok(file.digest())
    }

    /// A line from the engine, not from the process (`[runbook] …`, dim): the closing line, or
    /// a note about the attempt. Output still held back for redaction follows it.
    pub fn note(&mut self, at: DateTime<Utc>, text: &str) -> Result<(), EvidenceError> {
        let text = self.redactor.redact_str(text);
        let mut marker = String::new();
        if !self.at_line_start {
            marker.push_str("\r\n");
        }
        marker.push_str("\x1b[1;2m[runbook] ");
        marker.push_str(&text.replace('\n', "\r\n"));
        marker.push_str(RESET);
        marker.push_str("\r\n");
        self.at_line_start = true;
        self.event(at, &marker)
    }

    /// Hands buffered bytes to the kernel, so a crash of the runner loses none of them.
    pub fn flush_buffer(&mut self) -> Result<(), EvidenceError> {
        self.file.flush().map_err(write_err(&self.path))
    }

    /// Re-redacts what was already written, with the current `redactor` (a secret registered
    /// after it was printed). Consecutive events of one stream are joined for matching, so a
    /// value printed in several reads is still found; the events it spanned are merged.
    pub fn rewrite_redacted(&mut self) -> Result<(), EvidenceError> {
        if self.redactor.is_empty() {
            return Ok(());
        }
        self.file.flush().map_err(write_err(&self.path))?;
        redact_cast_file(&self.path, &self.redactor)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(write_err(&self.path))?;
        // Rewritten elsewhere: sealing reads this file.
        self.file = Sink::new(HashingFile::unhashed(file));
        Ok(())
    }

    /// Decodes redacted bytes (keeping an incomplete trailing UTF-8 sequence for later unless
    /// `last`), converts newlines and writes one event.
    fn emit(
        &mut self,
        at: DateTime<Utc>,
        stream: Stream,
        bytes: &[u8],
        last: bool,
    ) -> Result<(), EvidenceError> {
        let state = &mut self.streams[index(stream)];
        // Valid UTF-8 with nothing carried over (almost every read): used where it is, not
        // copied twice more.
        let owned: String;
        let decoded: &str = match std::str::from_utf8(bytes) {
            Ok(s) if state.carry.is_empty() => s,
            _ => {
                let mut buf = std::mem::take(&mut state.carry);
                buf.extend_from_slice(bytes);
                let (d, carry) = decode_utf8(&buf, last);
                state.carry = carry;
                owned = d;
                &owned
            }
        };
        if decoded.is_empty() {
            return Ok(());
        }
        // Converted and escaped straight into the event line in one pass (no converted copy of
        // the text first).
        let us = (at - self.started).num_microseconds().unwrap_or(i64::MAX);
        self.last_us = self.last_us.max(us);
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        line.reserve(decoded.len() + decoded.len() / 16 + 48);
        let _ = write!(
            line,
            "[{}.{:06}, \"o\", \"",
            self.last_us / 1_000_000,
            self.last_us % 1_000_000
        );
        if stream == Stream::Stderr {
            push_json_escaped(&mut line, RED);
        }
        push_json_escaped_crlf(&mut line, decoded, &mut state.last_cr);
        if stream == Stream::Stderr {
            push_json_escaped(&mut line, RESET);
        }
        line.extend_from_slice(b"\"]\n");
        self.at_line_start = decoded.ends_with('\n');
        let r = self.file.write_all(&line).map_err(write_err(&self.path));
        self.line = line;
        r
    }

    fn event(&mut self, at: DateTime<Utc>, text: &str) -> Result<(), EvidenceError> {
        let us = (at - self.started).num_microseconds().unwrap_or(i64::MAX);
        self.last_us = self.last_us.max(us);
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        push_event_line(&mut line, self.last_us, text);
        let r = self.file.write_all(&line).map_err(write_err(&self.path));
        self.line = line;
        r
    }
}

/// Rewrites a transcript on disk with `redactor` (a secret registered after it was written),
/// keeping it a valid asciicast: the header's title and each event's text are redacted as JSON
/// values, never as the escaped bytes of the file. Replaces the file atomically.
pub fn redact_cast_file(path: &Path, redactor: &ByteRedactor) -> Result<(), EvidenceError> {
    if redactor.is_empty() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|source| EvidenceError::Read {
        path: path.to_owned(),
        source,
    })?;
    let rewritten = redact_cast_text(&text, redactor);
    runbook_engine::fs::write_atomic(path, rewritten.as_bytes()).map_err(write_err(path))
}

fn header_line(timestamp: i64, title: &str) -> String {
    format!(
        "{{\"version\": 2, \"width\": {WIDTH}, \"height\": {HEIGHT}, \"timestamp\": {timestamp}, \
         \"title\": {}, \"env\": {{\"SHELL\": \"/bin/bash\", \"TERM\": \"xterm-256color\"}}}}\n",
        json_string(title)
    )
}

fn event_line(us: i64, text: &str) -> String {
    format!(
        "[{}.{:06}, \"o\", {}]\n",
        us / 1_000_000,
        us % 1_000_000,
        json_string(text)
    )
}

/// [`event_line`] appended to `out`.
fn push_event_line(out: &mut Vec<u8>, us: i64, text: &str) {
    let _ = write!(out, "[{}.{:06}, \"o\", ", us / 1_000_000, us % 1_000_000);
    push_json_string(out, text);
    out.extend_from_slice(b"]\n");
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// `s` as a JSON string, byte for byte what `serde_json` writes (short escapes for `\b \t \n
/// \f \r " \\`, `\u00xx` for other control characters, everything else as it is), without
/// going through a formatter per character.
fn push_json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    push_json_escaped(out, s);
    out.push(b'"');
}

/// The inside of [`push_json_string`]: `s` escaped, without the quotes.
fn push_json_escaped(out: &mut Vec<u8>, s: &str) {
    escape_into(out, s, None);
}

/// [`push_json_escaped`] of `s` with each `\n` turned into `\r\n` unless a `\r` is already
/// before it (`last_cr`: the previous event of the stream ended in one; updated), so a
/// transcript replays in a terminal.
fn push_json_escaped_crlf(out: &mut Vec<u8>, s: &str, last_cr: &mut bool) {
    escape_into(out, s, Some(last_cr));
}

/// The one escaper: JSON string escapes, and with `crlf` the line-break conversion in the same
/// pass (the line break is one of the bytes the escaper stops at anyway).
fn escape_into(out: &mut Vec<u8>, s: &str, crlf: Option<&mut bool>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + bytes.len() / 16 + 2);
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        // Eight bytes at a time past runs that need no escape (most output).
        if let Some(word) = bytes.get(i..i + 8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            if !may_need_escape(u64::from_le_bytes(w)) {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        i += 1;
        let short: &[u8] = match b {
            b'\n' => {
                let cr_before = match (i, crlf.as_deref()) {
                    (1, Some(&last_cr)) => last_cr,
                    (1, None) => true,
                    _ => bytes[i - 2] == b'\r',
                };
                if crlf.is_some() && !cr_before {
                    b"\\r\\n"
                } else {
                    b"\\n"
                }
            }
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => {
                out.extend_from_slice(&bytes[start..i - 1]);
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
                start = i;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i - 1]);
        out.extend_from_slice(short);
        start = i;
    }
    out.extend_from_slice(&bytes[start..]);
    if let (Some(last_cr), Some(&b)) = (crlf, bytes.last()) {
        *last_cr = b == b'\r';
    }
}

/// Whether any of the eight bytes of `x` is a control character, `"` or `\\` (what JSON
/// escapes). Exact when false, which is all the caller relies on (a true sends it byte by byte).
fn may_need_escape(x: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte below 0x20, and a zero byte after xor with `"` or `\\` (bit tricks: "has less",
    // "has zero byte").
    let below = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
    let q = x ^ (ONES * u64::from(b'"'));
    let quote = q.wrapping_sub(ONES) & !q & HIGH;
    let b = x ^ (ONES * u64::from(b'\\'));
    let backslash = b.wrapping_sub(ONES) & !b & HIGH;
    (below | quote | backslash) != 0
}

/// `$ first line`, then `> next line` for each further line of a multi-line command.
fn prompt_text(command: &str) -> String {
    let mut out = String::new();
    for (n, line) in command.trim_end_matches('\n').split('\n').enumerate() {
        out.push_str(if n == 0 {
            "\x1b[1m$\x1b[0m "
        } else {
            "\x1b[1m>\x1b[0m "
        });
        out.push_str(line.trim_end_matches('\r'));
        out.push_str("\r\n");
    }
    out
}

/// Lossy UTF-8 decoding that returns an incomplete sequence at the end separately (unless
/// `last`, when it becomes U+FFFD like any other invalid byte).
fn decode_utf8(mut bytes: &[u8], last: bool) -> (String, Vec<u8>) {
    let mut out = String::with_capacity(bytes.len());
    loop {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                out.push_str(s);
                return (out, Vec::new());
            }
            Err(e) => {
                let (valid, rest) = bytes.split_at(e.valid_up_to());
                // `valid` is valid UTF-8 by construction.
                out.push_str(&String::from_utf8_lossy(valid));
                match e.error_len() {
                    Some(n) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        bytes = &rest[n..];
                    }
                    None if last => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        return (out, Vec::new());
                    }
                    None => return (out, rest.to_vec()),
                }
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Out,
    Err,
}

struct Event {
    us: i64,
    kind: Kind,
    text: String,
}

/// Applies `redactor` to a whole cast file's text (header title and event data).
fn redact_cast_text(text: &str, redactor: &ByteRedactor) -> String {
    let mut lines = text.lines();
    let mut out = String::with_capacity(text.len());
    if let Some(header) = lines.next() {
        match serde_json::from_str::<serde_json::Value>(header) {
            Ok(v) => {
                let ts = v.get("timestamp").and_then(|t| t.as_i64()).unwrap_or(0);
                let title = v.get("title").and_then(|t| t.as_str()).unwrap_or("");
                out.push_str(&header_line(ts, &redactor.redact_str(title)));
            }
            Err(_) => {
                out.push_str(&redactor.redact_str(header));
                out.push('\n');
            }
        }
    }
    let mut events: Vec<Event> = Vec::new();
    for line in lines {
        let Ok(serde_json::Value::Array(a)) = serde_json::from_str::<serde_json::Value>(line)
        else {
            continue;
        };
        let (Some(t), Some(data)) = (a.first().and_then(|t| t.as_f64()), a.get(2)) else {
            continue;
        };
        let data = data.as_str().unwrap_or_default();
        let us = (t * 1_000_000.0).round() as i64;
        let (kind, inner) = match data.strip_prefix(RED).and_then(|d| d.strip_suffix(RESET)) {
            Some(inner) => (Kind::Err, inner),
            None => (Kind::Out, data),
        };
        events.push(Event {
            us,
            kind,
            text: inner.to_owned(),
        });
    }
    let longest = redactor.overlap() + 1;
    let mut start = 0;
    while start < events.len() {
        let kind = events[start].kind;
        let end = events[start..]
            .iter()
            .position(|e| e.kind != kind)
            .map_or(events.len(), |n| start + n);
        let run = &events[start..end];
        let mut joined: Vec<u8> = Vec::new();
        let mut bounds = Vec::with_capacity(run.len());
        for e in run {
            bounds.push(joined.len());
            joined.extend_from_slice(e.text.as_bytes());
        }
        let mut pos = 0;
        for (n, e) in run.iter().enumerate() {
            let ev_end = bounds.get(n + 1).copied().unwrap_or(joined.len());
            if ev_end <= pos {
                continue; // swallowed whole by a secret that started in an earlier event
            }
            let from = pos.max(bounds[n]);
            let window = (ev_end + longest).min(joined.len());
            let lead = crate::redact::lead_at(&joined, from);
            let (red, used) = redactor.redact_after(lead, &joined[from..window], ev_end - from);
            pos = from + used;
            let text = String::from_utf8_lossy(&red);
            let data = match kind {
                Kind::Err => format!("{RED}{text}{RESET}"),
                Kind::Out => text.into_owned(),
            };
            out.push_str(&event_line(e.us, &data));
        }
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    /// The hand-written escaper writes exactly what serde_json writes, for every ASCII byte
    /// and for multi-byte characters around them.
    #[test]
    fn json_strings_are_escaped_as_serde_json_escapes_them() {
        let mut all: String = (0u8..=0x7f).map(char::from).collect();
        all.push_str("é→😀\u{2028}\u{feff}");
        let mut cases = vec![String::new(), all.clone()];
        for (i, c) in all.char_indices() {
            cases.push(format!("{c}"));
            cases.push(format!("ab{}cd", &all[i..]));
        }
        for case in cases {
            let mut got = Vec::new();
            push_json_string(&mut got, &case);
            assert_eq!(
                String::from_utf8(got).expect("utf-8"),
                json_string(&case),
                "{case:?}"
            );
        }
        // The eight-byte test never misses a byte to escape, wherever it is in the word and
        // whatever is around it (ASCII, UTF-8 continuation and lead bytes).
        for fill in [b'x', 0x80, 0xbf, 0xe2, 0xff, b' ', b'!', b'#', b']'] {
            for at in 0..8 {
                for v in 0u8..=0xff {
                    let mut w = [fill; 8];
                    w[at] = v;
                    let escape = v < 0x20 || v == b'"' || v == b'\\';
                    if escape {
                        assert!(may_need_escape(u64::from_le_bytes(w)), "{v:#x} at {at}");
                    }
                }
                if !(fill < 0x20 || fill == b'"' || fill == b'\\') {
                    assert!(!may_need_escape(u64::from_le_bytes([fill; 8])), "{fill:#x}");
                }
            }
        }
        let long = format!(
            "{}\"{}\\{}\n{}",
            "x".repeat(13),
            "é".repeat(9),
            "y".repeat(7),
            "z".repeat(30)
        );
        for i in 0..long.len() {
            if let Some(case) = long.get(i..) {
                let mut got = Vec::new();
                push_json_string(&mut got, case);
                assert_eq!(String::from_utf8(got).expect("utf-8"), json_string(case));
            }
        }
        let mut line = Vec::new();
        push_event_line(&mut line, 3_000_042, "a\r\nb\"");
        assert_eq!(
            String::from_utf8(line).expect("utf-8"),
            event_line(3_000_042, "a\r\nb\"")
        );
    }

    /// `\n` gains a `\r` unless one is before it, also across events and streams' own state.
    #[test]
    fn newlines_become_crlf_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.cast");
        let mut w =
            CastWriter::create(&path, t0(), "t", "cmd", ByteRedactor::new(&[])).expect("create");
        for piece in ["a\n", "b\r", "\n", "\n\n", "c\r\nd\r", "\r\ne\n"] {
            w.write(t0(), Stream::Stdout, piece.as_bytes())
                .expect("write");
        }
        w.finish(t0(), "done").expect("finish");
        let (_, events) = check_cast(&path);
        let text: String = events.iter().skip(1).map(|(_, t)| t.as_str()).collect();
        assert!(
            text.starts_with("a\r\nb\r\n\r\n\r\nc\r\nd\r\r\ne\r\n"),
            "{text:?}"
        );
    }

    /// An output event is byte for byte what formatting the converted text (`\n` to `\r\n`
    /// once, stderr in red) and escaping it with serde_json gives: the event line is escaped
    /// piece by piece between line breaks, straight into the line.
    #[test]
    fn output_events_are_the_converted_text_escaped_as_serde_json_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.cast");
        let mut w =
            CastWriter::create(&path, t0(), "t", "cmd", ByteRedactor::new(&[])).expect("create");
        let pieces: [(Stream, &str); 9] = [
            (Stream::Stdout, "plain line\n"),
            (Stream::Stderr, "err \"quoted\" \\ back\tslash\r"),
            (Stream::Stderr, "\nnext\n\n"),
            (
                Stream::Stdout,
                "ctl \u{1}\u{1f}\u{7f} \u{1b}[1mbold\u{1b}[0m r\u{e9}sum\u{e9} \u{1f600}\r",
            ),
            (Stream::Stdout, "\r\n"),
            (Stream::Stdout, "\n"),
            (
                Stream::Stdout,
                "a fairly long line past a few words of eight bytes\nno end",
            ),
            (Stream::Stderr, "\r"),
            (Stream::Stdout, " tail\n"),
        ];
        // The conversion, a character at a time, per stream.
        let mut last_cr = [false, false];
        let mut want = Vec::new();
        for (stream, text) in pieces {
            // Given as redacted output (the recorder's way): one event per write.
            w.write_redacted(t0(), stream, text.as_bytes())
                .expect("write");
            let i = index(stream);
            let mut out = String::new();
            for c in text.chars() {
                if c == '\n' && !last_cr[i] {
                    out.push('\r');
                }
                out.push(c);
                last_cr[i] = c == '\r';
            }
            if stream == Stream::Stderr {
                out = format!("{RED}{out}{RESET}");
            }
            want.push(out);
        }
        w.finish(t0(), "done").expect("finish");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().skip(2).collect();
        for (n, want) in want.iter().enumerate() {
            assert_eq!(format!("{}\n", lines[n]), event_line(0, want), "event {n}");
        }
    }

    /// The one-pass conversion and escaping equals converting a character at a time and
    /// escaping with serde_json, for every string of up to four pieces (pieces that put line
    /// breaks, `\r`s and escapes on both sides of an eight-byte word), whatever the previous
    /// event ended with.
    #[test]
    fn crlf_escaping_in_one_pass_equals_converting_then_escaping() {
        let alphabet = ["a", "\n", "\r", "\"", "\\", "\u{1}", "\u{e9}", "xxxxxxx"];
        let n = alphabet.len();
        for len in 0..=4u32 {
            for code in 0..n.pow(len) {
                let mut text = String::new();
                let mut c = code;
                for _ in 0..len {
                    text.push_str(alphabet[c % n]);
                    c /= n;
                }
                for before in [false, true] {
                    let mut want = String::new();
                    let mut last_cr = before;
                    for ch in text.chars() {
                        if ch == '\n' && !last_cr {
                            want.push('\r');
                        }
                        want.push(ch);
                        last_cr = ch == '\r';
                    }
                    let mut got = Vec::new();
                    let mut cr = before;
                    push_json_escaped_crlf(&mut got, &text, &mut cr);
                    let want_json = serde_json::to_string(&want).expect("json");
                    assert_eq!(
                        format!("\"{}\"", String::from_utf8_lossy(&got)),
                        want_json,
                        "{text:?} after a \\r: {before}"
                    );
                    if !text.is_empty() {
                        assert_eq!(cr, last_cr, "{text:?}");
                    } else {
                        assert_eq!(cr, before);
                    }
                }
            }
        }
    }

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-08-20T10:15:00.000Z")
            .expect("time")
            .with_timezone(&Utc)
    }

    /// Parses a cast; checks the header and that every event is `[number, "o", string]` with
    /// non-decreasing times. Returns the event data.
    fn check_cast(path: &Path) -> (serde_json::Value, Vec<(f64, String)>) {
        let text = std::fs::read_to_string(path).expect("read cast");
        assert!(text.ends_with('\n'));
        let mut lines = text.lines();
        let header: serde_json::Value =
            serde_json::from_str(lines.next().expect("header")).expect("header json");
        assert_eq!(header["version"], 2);
        assert_eq!(header["width"], 120);
        assert_eq!(header["height"], 40);
        assert!(header["timestamp"].is_i64());
        assert_eq!(header["env"]["TERM"], "xterm-256color");
        let mut events = Vec::new();
        let mut last = 0.0f64;
        for line in lines {
            let v: serde_json::Value = serde_json::from_str(line).expect("event json");
            let a = v.as_array().expect("event is an array");
            assert_eq!(a.len(), 3, "{line}");
            let t = a[0].as_f64().expect("time is a number");
            assert!(t >= last, "time went back: {t} < {last}");
            assert!(t >= 0.0);
            last = t;
            assert_eq!(a[1], "o");
            events.push((t, a[2].as_str().expect("data is a string").to_owned()));
        }
        (header, events)
    }

    fn all_output(events: &[(f64, String)]) -> String {
        events.iter().map(|e| e.1.as_str()).collect()
    }

    #[test]
    fn writes_a_replayable_cast() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("steps/x/local/attempt-1.cast");
        let mut w = CastWriter::create(
            &path,
            t0(),
            "drill / restore [local] attempt 1",
            "echo one\necho two >&2\n",
            ByteRedactor::default(),
        )
        .expect("create");
        w.write(t0() + Duration::milliseconds(250), Stream::Stdout, b"one\n")
            .expect("write");
        w.write(t0() + Duration::milliseconds(500), Stream::Stderr, b"two\n")
            .expect("write");
        // Clock went back: the event keeps the previous time.
        w.write(
            t0() + Duration::milliseconds(100),
            Stream::Stdout,
            b"three\n",
        )
        .expect("write");
        w.finish(t0() + Duration::seconds(2), "attempt 1: exit code 3")
            .expect("finish");
        let (header, events) = check_cast(&path);
        assert_eq!(header["timestamp"], t0().timestamp());
        assert_eq!(header["title"], "drill / restore [local] attempt 1");
        assert_eq!(events[0].0, 0.0);
        assert_eq!(
            events[0].1,
            "\x1b[1m$\x1b[0m echo one\r\n\x1b[1m>\x1b[0m echo two >&2\r\n"
        );
        assert_eq!(events[1], (0.25, "one\r\n".into()));
        assert_eq!(events[2], (0.5, "\x1b[31mtwo\r\n\x1b[0m".into()));
        assert_eq!(events[3], (0.5, "three\r\n".into()));
        let last = events.last().expect("marker");
        assert_eq!(last.0, 2.0);
        assert!(
            last.1.contains("[runbook] attempt 1"),
            "closing marker: {last:?}"
        );
        assert!(last.1.contains("[runbook] attempt 1: exit code 3"));
    }

    #[test]
    fn never_splits_a_multibyte_character_and_replaces_invalid_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.cast");
        let mut w =
            CastWriter::create(&path, t0(), "t", "printf", ByteRedactor::default()).expect("c");
        // "é" = C3 A9, "€" = E2 82 AC: cut inside each; FF is invalid everywhere.
        let at = t0() + Duration::milliseconds(1);
        w.write(at, Stream::Stdout, b"caf\xc3").expect("w");
        w.write(at, Stream::Stdout, b"\xa9 \xe2").expect("w");
        w.write(at, Stream::Stdout, b"\x82").expect("w");
        w.write(at, Stream::Stdout, b"\xac \xff!\n").expect("w");
        // An incomplete sequence at the very end is replaced, not lost or left raw.
        w.write(at, Stream::Stderr, b"end\xe2\x82").expect("w");
        w.finish(at, "done").expect("finish");
        let (_, events) = check_cast(&path);
        let data: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
        // An unfinished line is held until its end (for redaction by shape), so the whole line
        // is one event, with every character intact.
        assert_eq!(data[1], "café € \u{fffd}!\r\n");
        assert_eq!(data[2], "\x1b[31mend\u{fffd}\x1b[0m");
    }

    #[test]
    fn crlf_is_kept_and_lf_is_converted_across_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.cast");
        let mut w = CastWriter::create(&path, t0(), "t", "x", ByteRedactor::default()).expect("c");
        w.write(t0(), Stream::Stdout, b"a\r").expect("w");
        w.write(t0(), Stream::Stdout, b"\nb\n\n").expect("w");
        w.finish(t0(), "ok").expect("finish");
        let (_, events) = check_cast(&path);
        assert_eq!(events[1].1, "a\r");
        assert_eq!(events[2].1, "\nb\r\n\r\n");
    }

    #[test]
    fn redacts_secrets_split_across_reads() {
        let secret = "s3cr3t-token-value";
        let redactor = ByteRedactor::new(&[("token".into(), secret.into())]);
        for split in 1..secret.len() {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("a.cast");
            let mut w = CastWriter::create(
                &path,
                t0(),
                &format!("title {secret}"),
                &format!("curl -H 'Authorization: {secret}'"),
                redactor.clone(),
            )
            .expect("c");
            let data = format!("line one\ntoken is {secret} ok\n");
            let cut = "line one\ntoken is ".len() + split;
            w.write(t0(), Stream::Stdout, &data.as_bytes()[..cut])
                .expect("w");
            w.write(t0(), Stream::Stdout, &data.as_bytes()[cut..])
                .expect("w");
            w.write(t0(), Stream::Stderr, secret.as_bytes()).expect("w");
            w.finish(t0(), &format!("failed: {secret}"))
                .expect("finish");
            let raw = std::fs::read_to_string(&path).expect("read");
            assert!(!raw.contains("s3cr3t"), "leaked at split {split}: {raw}");
            let (header, events) = check_cast(&path);
            assert_eq!(header["title"], "title [REDACTED:token]");
            let all = all_output(&events);
            assert!(all.contains("line one\r\ntoken is [REDACTED:token] ok\r\n"));
            assert!(all.contains("\x1b[31m[REDACTED:token]\x1b[0m"));
            assert!(all.contains("Authorization: [REDACTED:token]"));
        }
    }

    #[test]
    fn complete_lines_are_not_held_back_when_secrets_exist() {
        let redactor = ByteRedactor::new(&[("t".into(), "a-rather-long-secret-value".into())]);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.cast");
        let mut w = CastWriter::create(&path, t0(), "t", "x", redactor).expect("c");
        w.write(t0(), Stream::Stdout, b"ok\nprogress 10%")
            .expect("w");
        w.file.flush().expect("flush");
        let (_, events) = check_cast(&path);
        // The complete line is out; of the unfinished one, only what cannot start a secret.
        assert_eq!(events[1].1, "ok\r\n");
        w.write(t0() + Duration::seconds(1), Stream::Stdout, b" 20%\n")
            .expect("w");
        w.finish(t0() + Duration::seconds(1), "ok").expect("f");
        let (_, events) = check_cast(&path);
        assert_eq!(all_output(&events[1..3]), "ok\r\nprogress 10% 20%\r\n");
    }

    #[test]
    fn rewrite_redacts_a_secret_registered_after_it_was_printed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.cast");
        let secret = "late-secret-123";
        let mut w = CastWriter::create(&path, t0(), "t", "issue-token", ByteRedactor::default())
            .expect("c");
        let at = |ms| t0() + Duration::milliseconds(ms);
        w.write(at(10), Stream::Stdout, b"token: late-se")
            .expect("w");
        w.write(at(20), Stream::Stdout, b"cret-").expect("w");
        w.write(at(30), Stream::Stdout, b"123\nnext\n").expect("w");
        w.write(at(40), Stream::Stderr, b"err late-secret-123\n")
            .expect("w");
        w.redactor = ByteRedactor::new(&[("tok".into(), secret.into())]);
        w.rewrite_redacted().expect("rewrite");
        w.write(at(50), Stream::Stdout, b"after late-secret-123\n")
            .expect("w");
        w.finish(at(60), "ok").expect("finish");
        let raw = std::fs::read_to_string(&path).expect("read");
        assert!(!raw.contains("late-se"), "{raw}");
        let (_, events) = check_cast(&path);
        let all = all_output(&events);
        assert!(all.contains("token: [REDACTED:tok]\r\nnext\r\n"), "{all}");
        assert!(
            all.contains("\x1b[31merr [REDACTED:tok]\r\n\x1b[0m"),
            "{all}"
        );
        assert!(all.contains("after [REDACTED:tok]\r\n"), "{all}");
        // The unfinished line was held back until its end, so it went out as one event.
        assert_eq!(
            events[1],
            (0.03, "token: [REDACTED:tok]\r\nnext\r\n".into())
        );
    }

    /// Regression: a secret's base64 wrapped by `base64` at 76 columns was written to the
    /// transcript, line by line as it arrived, and so never matched.
    #[test]
    fn wrapped_base64_of_a_secret_is_redacted_whatever_the_reads() {
        use base64::Engine as _;
        let secret = "long-secret/with+special chars&=?~ and more text to exceed 57 bytes";
        let enc = base64::engine::general_purpose::STANDARD.encode(format!("admin:{secret}"));
        let mut out = String::from("encoded:\n");
        for line in enc.as_bytes().chunks(76) {
            out.push_str(std::str::from_utf8(line).expect("ascii"));
            out.push('\n');
        }
        out.push_str("done\n");
        let redactor = ByteRedactor::new(&[("pw".into(), secret.into())]);
        let want = String::from_utf8_lossy(&redactor.redact(out.as_bytes())).replace('\n', "\r\n");
        assert!(want.contains("[REDACTED:pw]"), "{want}");
        for size in [1, 5, 40, 76, 77, 80, 1000] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("a.cast");
            let mut w = CastWriter::create(&path, t0(), "t", "x", redactor.clone()).expect("c");
            for chunk in out.as_bytes().chunks(size) {
                w.write(t0(), Stream::Stdout, chunk).expect("w");
            }
            w.finish(t0(), "ok").expect("finish");
            let (_, events) = check_cast(&path);
            let all = all_output(&events[1..events.len() - 1]);
            assert_eq!(all, want, "reads of {size}");
        }
        // Registered after it was printed: the rewrite finds it across events too.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.cast");
        let mut w = CastWriter::create(&path, t0(), "t", "x", ByteRedactor::default()).expect("c");
        for chunk in out.as_bytes().chunks(50) {
            w.write(t0(), Stream::Stdout, chunk).expect("w");
        }
        w.finish(t0(), "ok").expect("finish");
        redact_cast_file(&path, &redactor).expect("rewrite");
        let (_, events) = check_cast(&path);
        assert_eq!(all_output(&events[1..events.len() - 1]), want);
    }

    /// `asciinema cat` accepts a cast with every kind of content.
    #[test]
    fn asciinema_cat_accepts_it() {
        let Ok(out) = std::process::Command::new("asciinema")
            .arg("--version")
            .output()
        else {
            panic!("asciinema is not installed: `apt-get install asciinema` (scripts/test does)");
        };
        assert!(out.status.success(), "asciinema does not run: {out:?}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.cast");
        let mut w = CastWriter::create(&path, t0(), "t \"q\"", "echo hi", ByteRedactor::default())
            .expect("c");
        w.write(t0(), Stream::Stdout, b"hi \xff caf\xc3")
            .expect("w");
        w.write(t0(), Stream::Stdout, b"\xa9\n\x1b[32mgreen\x1b[0m\n")
            .expect("w");
        w.write(t0(), Stream::Stderr, b"oops\n").expect("w");
        w.finish(t0() + Duration::seconds(1), "exit code 1")
            .expect("f");
        // asciinema 2.x `cat` opens /dev/tty (to set raw mode): give it a pseudo-terminal.
        let out = std::process::Command::new("script")
            .arg("-qec")
            .arg(format!("asciinema cat '{}'", path.display()))
            .arg("/dev/null")
            .stdin(std::process::Stdio::null())
            .output();
        let Ok(out) = out else {
            panic!("`script` is missing: `apt-get install bsdutils` (scripts/test does)");
        };
        assert!(
            out.status.success(),
            "asciinema cat failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("hi \u{fffd} café\r\n"), "{text}");
        assert!(text.contains("\x1b[31moops\r\n\x1b[0m"), "{text}");
    }
}
