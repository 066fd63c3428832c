//! Per-attempt log files: one record per output line, `<UTC time> <tag> <bytes>\n`, where the
//! tag is `out` or `err` for a complete line and `out+`/`err+` for a fragment that continues in
//! the next record of that stream (a line longer than the fragment limit, or the last bytes
//! before the process ended without a newline). Bytes are written as the process wrote them
//! (invalid UTF-8 included), after secret redaction.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use runbook_engine::event::Stream;

use crate::fs::HashingFile;
use crate::redact::{ByteRedactor, PemFilter, RedactFile as _, WrapHold};
use crate::{write_err, EvidenceError};

/// Longest fragment kept in memory while waiting for a newline.
const MAX_FRAGMENT: usize = 64 * 1024;

struct Pending {
    bytes: Vec<u8>,
    /// When the first byte of `bytes` arrived.
    since: Option<DateTime<Utc>>,
}

pub struct LogWriter {
    path: PathBuf,
    file: BufWriter<HashingFile>,
    /// The last time stamp formatted, and its text: a read's lines share one time, so the
    /// stamp is formatted once per read rather than once per line.
    stamp: Option<(DateTime<Utc>, String)>,
    pending: [Pending; 2],
    /// Per stream: inside a private key block?
    pem: [PemFilter; 2],
    /// Per stream: lines that may be wrapped base64, held until the text ends so a secret's
    /// base64 form broken over lines is found (see [`WrapHold`]). Records of the other stream
    /// can be written meanwhile; each keeps its own time.
    hold: [WrapHold<DateTime<Utc>>; 2],
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

impl LogWriter {
    pub fn create(path: &Path, redactor: ByteRedactor) -> Result<Self, EvidenceError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(write_err(parent))?;
        }
        let file = File::create(path).map_err(write_err(path))?;
        Ok(Self {
            path: path.to_owned(),
            file: BufWriter::with_capacity(64 * 1024, HashingFile::new(file)),
            stamp: None,
            pending: [
                Pending {
                    bytes: Vec::new(),
                    since: None,
                },
                Pending {
                    bytes: Vec::new(),
                    since: None,
                },
            ],
            redactor,
            pem: Default::default(),
            hold: Default::default(),
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
        mut data: &[u8],
    ) -> Result<(), EvidenceError> {
        let i = index(stream);
        let mut joined: Vec<u8>;
        while let Some(nl) = data.iter().position(|&b| b == b'\n') {
            let since = self.pending[i].since.take().unwrap_or(at);
            // A line that started in an earlier read is joined to its start; the others are
            // used where they are, without a copy.
            let mut line: &[u8] = if self.pending[i].bytes.is_empty() {
                &data[..nl]
            } else {
                joined = std::mem::take(&mut self.pending[i].bytes);
                joined.extend_from_slice(&data[..nl]);
                &joined
            };
            let filtered;
            if let Some(r) = self.pem[i].line(line) {
                filtered = r.to_vec();
                line = &filtered;
            }
            for (since, line) in self.hold[i].line(&self.redactor, since, line) {
                self.record_redacted(since, stream.tag(), &line)?;
            }
            data = &data[nl + 1..];
        }
        if !data.is_empty() {
            let p = &mut self.pending[i];
            p.since.get_or_insert(at);
            p.bytes.extend_from_slice(data);
            if p.bytes.len() > MAX_FRAGMENT && self.pem[i].inside() {
                // Inside a private key block: nothing of it may be written.
                p.bytes = b"[REDACTED:private-key]".to_vec();
            } else if p.bytes.len() > MAX_FRAGMENT {
                // Held lines go out first, with this line's start to look into.
                self.release_hold(stream)?;
                let p = &mut self.pending[i];
                // Redact what can be decided now; a secret that may continue past the end stays
                // in the buffer until more arrives, so no cut ever splits one.
                let cut = fragment_cut(&p.bytes, self.redactor.overlap());
                let (head, used) = self.redactor.redact_prefix(&p.bytes, cut);
                p.bytes.drain(..used);
                let since = p.since.replace(at).unwrap_or(at);
                let tag = format!("{}+", stream.tag());
                self.record_redacted(since, &tag, &head)?;
            }
        }
        Ok(())
    }

    /// Writes out the held lines of `stream`, looking into the unfinished line after them (a
    /// secret's form may run into it): what that consumed of it is written as its first piece.
    fn release_hold(&mut self, stream: Stream) -> Result<(), EvidenceError> {
        let i = index(stream);
        if self.hold[i].is_empty() {
            return Ok(());
        }
        let (mut lines, into) = self.hold[i].release(&self.redactor, &self.pending[i].bytes);
        let piece = (into > 0).then(|| lines.pop()).flatten();
        for (since, line) in lines {
            self.record_redacted(since, stream.tag(), &line)?;
        }
        if let Some((since, piece)) = piece {
            self.pending[i].bytes.drain(..into);
            self.record_redacted(since, &format!("{}+", stream.tag()), &piece)?;
        }
        Ok(())
    }

    fn record(&mut self, at: DateTime<Utc>, tag: &str, line: &[u8]) -> Result<(), EvidenceError> {
        let line = self.redactor.redact(line);
        self.record_redacted(at, tag, &line)
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
        self.file = BufWriter::with_capacity(64 * 1024, HashingFile::unhashed(file));
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

    fn flush_partial(&mut self) -> Result<(), EvidenceError> {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let i = index(stream);
            if !self.pending[i].bytes.is_empty() {
                if let Some(r) = self.pem[i].line(&self.pending[i].bytes) {
                    self.pending[i].bytes = r.to_vec();
                }
            }
            self.release_hold(stream)?;
            if !self.pending[i].bytes.is_empty() {
                let bytes = std::mem::take(&mut self.pending[i].bytes);
                let since = self.pending[i].since.take().unwrap_or_else(Utc::now);
                self.record(since, &format!("{}+", stream.tag()), &bytes)?;
            }
        }
        Ok(())
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
        let file = self
            .file
            .into_inner()
            .map_err(|e| write_err(&path)(e.into_error()))?;
        Ok(file.digest())
    }
}

/// Where to cut a long unfinished line: keep back what a secret value could still continue
/// in, and never cut between a shape trigger (`authorization`, `bearer`) and the value after
/// it, so redaction by shape sees both in the same piece.
fn fragment_cut(bytes: &[u8], overlap: usize) -> usize {
    const KEEP: usize = 256;
    let len = bytes.len();
    let mut cut = len.saturating_sub(overlap.max(KEEP));
    let window = cut.saturating_sub(KEEP);
    let lower = bytes[window..].to_ascii_lowercase();
    for trigger in [&b"authorization"[..], b"bearer"] {
        if let Some(pos) = lower.windows(trigger.len()).rposition(|w| w == trigger) {
            cut = cut.min(window + pos);
        }
    }
    cut.max(1)
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
}
