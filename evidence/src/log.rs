//! Per-attempt log files: one record per output line, `<UTC time> <tag> <bytes>\n`, where the
//! tag is `out` or `err` for a complete line and `out+`/`err+` for a fragment that continues in
//! the next record of that stream (a line longer than the fragment limit, or the last bytes
//! before the process ended without a newline). Bytes are written as the process wrote them
//! (invalid UTF-8 included), after secret redaction.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use runbook_engine::event::Stream;

use crate::fs::HashingFile;
use crate::redact::{ByteRedactor, RedactFile as _, Released, StreamRedactor};
use crate::{write_err, EvidenceError};
use sink::Sink;

pub(crate) mod sink;

/// Longest start of a line kept in memory while waiting for its newline: past it, the start
/// is written as a fragment record.
const MAX_FRAGMENT: usize = 64 * 1024;

/// One output stream of the attempt.
#[derive(Debug)]
struct StreamLog {
    /// Holds back what redaction needs (the one driver; its result is also the transcript's).
    driver: StreamRedactor<DateTime<Utc>>,
    /// The redacted start of the current line.
    partial: Vec<u8>,
    /// When the current line's first byte (or, after a fragment record, its next byte)
    /// arrived.
    since: Option<DateTime<Utc>>,
}

impl Default for StreamLog {
    fn default() -> Self {
        Self {
            driver: StreamRedactor::lines(),
            partial: Vec::new(),
            since: None,
        }
    }
}

pub struct LogWriter {
    path: PathBuf,
    file: Sink,
    /// The last time stamp formatted, and its text: a read's lines share one time, so the
    /// stamp is formatted once per read rather than once per line.
    stamp: Option<(DateTime<Utc>, String)>,
    streams: [StreamLog; 2],
    /// Secrets as known when the last bytes arrived; the recorder updates it when a secret is
    /// registered mid-run.
    pub redactor: ByteRedactor,
}

fn index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

/// What a stream's driver gave out at its end.
pub type StreamRest = (Stream, Released<DateTime<Utc>>);

/// The tag of a fragment record of `stream`.
fn fragment_tag(stream: Stream) -> &'static str {
    match stream {
        Stream::Stdout => "out+",
        Stream::Stderr => "err+",
    }
}

impl LogWriter {
    pub fn create(path: &Path, redactor: ByteRedactor) -> Result<Self, EvidenceError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(write_err(parent))?;
        }
        let file = File::create(path).map_err(write_err(path))?;
        Ok(Self {
            path: path.to_owned(),
            file: Sink::new(HashingFile::new(file)),
            stamp: None,
            streams: Default::default(),
            redactor,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A header line that is not process output (the command, notes from the engine).
    pub fn meta(&mut self, at: DateTime<Utc>, text: &str) -> Result<(), EvidenceError> {
        let text = self.redactor.redact_str(text);
        for line in text.trim_end_matches('\n').split('\n') {
            self.record_redacted(at, "---", line.as_bytes())?;
        }
        Ok(())
    }

    pub fn write(
        &mut self,
        at: DateTime<Utc>,
        stream: Stream,
        data: &[u8],
    ) -> Result<(), EvidenceError> {
        self.write_output(at, stream, data).map(drop)
    }

    /// [`LogWriter::write`], returning the redacted output given out now: the transcript
    /// writes the same bytes (see [`crate::cast::CastWriter::write_redacted`]), so output is
    /// redacted once.
    pub fn write_output(
        &mut self,
        at: DateTime<Utc>,
        stream: Stream,
        data: &[u8],
    ) -> Result<Released<DateTime<Utc>>, EvidenceError> {
        let released = self.streams[index(stream)]
            .driver
            .push(&self.redactor, at, data);
        self.record_released(at, stream, &released)?;
        Ok(released)
    }

    /// Writes the records of what the driver gave out: a complete line as one record with
    /// the time its first byte arrived, the start of a long one as fragment records.
    fn record_released(
        &mut self,
        at: DateTime<Utc>,
        stream: Stream,
        released: &Released<DateTime<Utc>>,
    ) -> Result<(), EvidenceError> {
        let i = index(stream);
        for piece in released.pieces() {
            if piece.line_end {
                let since = self.streams[i].since.take().unwrap_or(*piece.meta);
                if self.streams[i].partial.is_empty() {
                    self.record_redacted(since, stream.tag(), piece.text)?;
                } else {
                    let mut line = std::mem::take(&mut self.streams[i].partial);
                    line.extend_from_slice(piece.text);
                    self.record_redacted(since, stream.tag(), &line)?;
                }
                continue;
            }
            let s = &mut self.streams[i];
            s.since.get_or_insert(*piece.meta);
            s.partial.extend_from_slice(piece.text);
            if s.partial.len() > MAX_FRAGMENT {
                let since = s.since.replace(at).unwrap_or(at);
                let head = std::mem::take(&mut s.partial);
                self.record_redacted(since, fragment_tag(stream), &head)?;
            }
        }
        Ok(())
    }

    fn record_redacted(
        &mut self,
        at: DateTime<Utc>,
        tag: &str,
        line: &[u8],
    ) -> Result<(), EvidenceError> {
        if self.stamp.as_ref().is_none_or(|(t, _)| *t != at) {
            self.stamp = Some((at, stamp(at)));
        }
        let text = self.stamp.as_ref().map_or("", |(_, s)| s.as_str());
        let f = &mut self.file;
        f.write_all(text.as_bytes())
            .and_then(|()| f.write_all(b" "))
            .and_then(|()| f.write_all(tag.as_bytes()))
            .and_then(|()| f.write_all(b" "))
            .and_then(|()| f.write_all(line))
            .and_then(|()| f.write_all(b"\n"))
            .map_err(write_err(&self.path))
    }

    /// Hands buffered bytes to the kernel, so a crash of the runner loses none of them.
    pub fn flush_buffer(&mut self) -> Result<(), EvidenceError> {
        self.file.flush().map_err(write_err(&self.path))
    }

    /// Re-redacts what was already written (a secret registered after it was printed).
    pub fn rewrite_redacted(&mut self) -> Result<(), EvidenceError> {
        self.file.flush().map_err(write_err(&self.path))?;
        self.redactor
            .redact_file(&self.path)
            .map_err(write_err(&self.path))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(write_err(&self.path))?;
        // Rewritten elsewhere: sealing reads this file.
        self.file = Sink::new(HashingFile::unhashed(file));
        // The redacted starts of unfinished lines are not in the file yet.
        for s in &mut self.streams {
            if !s.partial.is_empty() {
                s.partial = self.redactor.redact(&s.partial);
            }
        }
        Ok(())
    }

    /// Writes out partial lines, then a closing engine line, and closes the file.
    pub fn finish_with(self, at: DateTime<Utc>, text: &str) -> Result<(), EvidenceError> {
        self.close_with(at, text).map(drop)
    }

    /// [`LogWriter::finish_with`], returning the file's SHA-256 when this writer wrote all of it.
    pub fn close_with(
        mut self,
        at: DateTime<Utc>,
        text: &str,
    ) -> Result<Option<String>, EvidenceError> {
        self.flush_partial()?;
        self.meta(at, text)?;
        self.close()
    }

    /// Ends both output streams: writes out what their drivers held and the starts of
    /// unfinished lines (as fragment records), and returns what the drivers gave out, for the
    /// transcript.
    pub fn finish_output(&mut self) -> Result<[StreamRest; 2], EvidenceError> {
        let mut out = [
            (Stream::Stdout, Released::empty()),
            (Stream::Stderr, Released::empty()),
        ];
        for (stream, rest) in &mut out {
            let i = index(*stream);
            let released = self.streams[i].driver.finish(&self.redactor);
            let at = released.pieces().last().map_or_else(Utc::now, |p| *p.meta);
            self.record_released(at, *stream, &released)?;
            let s = &mut self.streams[i];
            if !s.partial.is_empty() {
                let bytes = std::mem::take(&mut s.partial);
                let since = s.since.take().unwrap_or(at);
                self.record_redacted(since, fragment_tag(*stream), &bytes)?;
            }
            *rest = released;
        }
        Ok(out)
    }

    fn flush_partial(&mut self) -> Result<(), EvidenceError> {
        self.finish_output().map(drop)
    }

    /// Writes out partial lines and closes the file.
    /// (Synced by the recorder together with the journal: group commit.)
    pub fn finish(self) -> Result<(), EvidenceError> {
        self.close().map(drop)
    }

    /// [`LogWriter::finish`], returning the file's SHA-256 when this writer wrote all of it.
    pub fn close(mut self) -> Result<Option<String>, EvidenceError> {
        self.flush_partial()?;
        let path = self.path;
        let file = self.file.close().map_err(write_err(&path))?;
        Ok(file.digest())
    }
}

pub fn stamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a secret straddling the cut of a long line was written half in each piece.
    #[test]
    fn a_secret_across_a_fragment_cut_is_redacted() {
        let secret = "s3cr3t-straddling-value";
        let r = ByteRedactor::new(&[("tok".into(), secret.into())]);
        for shift in 0..secret.len() {
            let dir = std::env::temp_dir().join(format!("rb-log-{}-{shift}", std::process::id()));
            let mut w = LogWriter::create(&dir, r.clone()).expect("create");
            let mut data = vec![b'x'; MAX_FRAGMENT + 1 - shift];
            data.extend_from_slice(secret.as_bytes());
            data.extend_from_slice(&[b'y'; 100]);
            // Deliver in 1000-byte reads, as a pipe would.
            for chunk in data.chunks(1000) {
                w.write(Utc::now(), Stream::Stdout, chunk).expect("write");
            }
            w.finish().expect("finish");
            let text = std::fs::read_to_string(&dir).expect("read");
            let _ = std::fs::remove_file(&dir);
            assert!(!text.contains("s3cr3t"), "leaked with shift {shift}");
            assert!(
                text.contains("[REDACTED:tok]"),
                "redacted with shift {shift}"
            );
        }
    }

    /// The transcript written from the log's result (as the recorder does) shows exactly the
    /// bytes the log records, redacted once, whatever the reads.
    #[test]
    fn the_transcript_written_from_the_log_shows_the_same_redacted_output() {
        use base64::Engine as _;
        let secret = "long-secret/with+special chars&=?~ and more text to exceed 57 bytes";
        let r = ByteRedactor::new(&[("pw".into(), secret.into())]);
        let enc = base64::engine::general_purpose::STANDARD.encode(format!("admin:{secret}"));
        let mut out = String::from("start\nprogress 10%\rprogress 20%\rprogress done\n");
        for line in enc.as_bytes().chunks(76) {
            out.push_str(std::str::from_utf8(line).expect("ascii"));
            out.push('\n');
        }
        out.push_str(&format!(
            "token {secret} end\nAuthorization: Bearer abcdefgh12345678\n"
        ));
        out.push_str(&"x".repeat(70_000));
        out.push_str(" tail");
        let dir = tempfile::tempdir().expect("tempdir");
        for size in [1, 7, 100, 4096, 65536] {
            let log_path = dir.path().join(format!("a-{size}.log"));
            let cast_path = dir.path().join(format!("a-{size}.cast"));
            let at = Utc::now();
            let mut log = LogWriter::create(&log_path, r.clone()).expect("log");
            let mut cast = crate::cast::CastWriter::create(&cast_path, at, "t", "x", r.uncounted())
                .expect("cast");
            for chunk in out.as_bytes().chunks(size) {
                let rel = log.write_output(at, Stream::Stdout, chunk).expect("write");
                cast.write_redacted(at, Stream::Stdout, &rel.text)
                    .expect("cast");
            }
            for (stream, rest) in log.finish_output().expect("finish") {
                cast.write_redacted(at, stream, &rest.text).expect("cast");
            }
            log.finish().expect("log");
            cast.finish(at, "done").expect("cast");
            // The log's stdout records, joined back.
            let text = std::fs::read(&log_path).expect("read log");
            let mut from_log = Vec::new();
            for rec in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let mut parts = rec.splitn(3, |&b| b == b' ');
                let (_, tag) = (parts.next(), parts.next().unwrap_or_default());
                let body = parts.next().unwrap_or_default();
                match tag {
                    b"out" => {
                        from_log.extend_from_slice(body);
                        from_log.push(b'\n');
                    }
                    b"out+" => from_log.extend_from_slice(body),
                    _ => {}
                }
            }
            let want = r.redact(out.as_bytes());
            assert!(from_log == want, "log differs, reads of {size}");
            let cast_text = std::fs::read_to_string(&cast_path).expect("read cast");
            let mut shown = String::new();
            for line in cast_text.lines().skip(2) {
                let v: serde_json::Value = serde_json::from_str(line).expect("event");
                shown.push_str(v[2].as_str().unwrap_or_default());
            }
            let shown = shown.replace("\r\n", "\n");
            let want = String::from_utf8_lossy(&want).into_owned();
            assert!(shown.starts_with(&want), "cast differs, reads of {size}");
            assert!(!shown.contains("long-secret") && !shown.contains("abcdefgh"));
        }
    }
}
