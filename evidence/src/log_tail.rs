//! Reading attempt logs back for people: the records of `steps/<step>/<target>/attempt-<n>.log`
//! (`<time> <tag> <bytes>`, written by `log.rs`), the last part of a long one, and which lines
//! of a failure to show. Used by the report, the JUnit file and the console's failure tails.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use runbook_engine::event::{RunEvent, StepStatus};

/// One record of an attempt log (`<time> <tag> <bytes>`, see log.rs).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LogLine {
    /// RFC 3339 UTC, as written.
    pub time: String,
    /// `out`, `err`, `out+`, `err+`, `---`, or empty when the line is not a log record.
    pub tag: String,
    /// The bytes, decoded lossily.
    pub text: String,
}

impl LogLine {
    pub fn is_err(&self) -> bool {
        self.tag.starts_with("err")
    }
    pub fn is_meta(&self) -> bool {
        self.tag == "---"
    }
}

/// The end of an attempt log.
#[derive(Debug, Clone, Default)]
pub(crate) struct LogTail {
    pub lines: Vec<LogLine>,
    /// Size of the whole file.
    pub total_bytes: u64,
    /// Lines before `lines` were left out.
    pub truncated: bool,
}

/// The tags of attempt-log records.
const TAGS: [&str; 5] = ["out", "err", "out+", "err+", "---"];

/// The one reader of the attempt-log record format: a line (without its newline) split into
/// time, tag and bytes as written, or `None` when the line is not a record. The bytes stay
/// bytes: a character cut between an `out+` record and the next is whole once joined.
pub(crate) fn split_record(raw: &[u8]) -> Option<(&str, &'static str, &[u8])> {
    let mut parts = raw.splitn(3, |&b| b == b' ');
    let (time, tag, rest) = (parts.next()?, parts.next()?, parts.next());
    let time = std::str::from_utf8(time).ok()?;
    let tag = TAGS.iter().find(|t| t.as_bytes() == tag)?;
    (time.len() >= 20 && time.as_bytes()[4] == b'-').then_some((time, *tag, rest.unwrap_or(b"")))
}

pub(crate) fn parse_log_line(raw: &[u8]) -> LogLine {
    match split_record(raw) {
        Some((time, tag, rest)) => LogLine {
            time: time.to_owned(),
            tag: tag.to_owned(),
            text: String::from_utf8_lossy(rest).into_owned(),
        },
        None => LogLine {
            time: String::new(),
            tag: String::new(),
            text: String::from_utf8_lossy(raw).into_owned(),
        },
    }
}

/// Reads the last `max_lines` records of a log, looking at no more than its last `max_bytes`.
pub(crate) fn read_log_tail(
    path: &Path,
    max_lines: usize,
    max_bytes: u64,
) -> std::io::Result<LogTail> {
    let mut file = std::fs::File::open(path)?;
    let total_bytes = file.metadata()?.len();
    let mut truncated = false;
    let start = total_bytes.saturating_sub(max_bytes);
    if start > 0 {
        file.seek(SeekFrom::Start(start))?;
        truncated = true;
    }
    let mut data = Vec::new();
    file.take(max_bytes).read_to_end(&mut data)?;
    let mut body: &[u8] = &data;
    if start > 0 {
        // Drop the partial first record.
        body = match body.iter().position(|&b| b == b'\n') {
            Some(n) => &body[n + 1..],
            None => &[],
        };
    }
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    let mut records: Vec<&[u8]> = if body.is_empty() {
        Vec::new()
    } else {
        body.split(|&b| b == b'\n').collect()
    };
    if records.len() > max_lines {
        records.drain(..records.len() - max_lines);
        truncated = true;
    }
    Ok(LogTail {
        lines: records.into_iter().map(parse_log_line).collect(),
        total_bytes,
        truncated,
    })
}

/// Indices of the lines to show for a failure: the last `last` lines plus the last `errs`
/// stderr lines (a process's stderr is often read before its last stdout), in log order.
pub(crate) fn excerpt(lines: &[&LogLine], last: usize, errs: usize) -> Vec<usize> {
    let mut keep: Vec<usize> = (lines.len().saturating_sub(last)..lines.len()).collect();
    let err_idx: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].is_err()).collect();
    keep.extend(err_idx.iter().rev().take(errs));
    keep.sort_unstable();
    keep.dedup();
    keep
}

/// The end of one failed target's last attempt log (see [`failed_tails`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FailedTail {
    /// `local`, a host, or `host/sub-step` for a block.
    pub target: String,
    pub log: PathBuf,
    /// The last lines of its output (stdout and stderr, without the `---` records).
    pub lines: Vec<String>,
}

/// For a step that failed, the last attempt log of each target that failed (the step itself
/// when it ran here; each failed host, down to the block sub-step it failed in), as the
/// journal records them, with up to `max_lines` of output each.
pub fn failed_tails(bundle: &Path, step: &str, max_lines: usize) -> Vec<FailedTail> {
    let Ok(journal) = crate::journal::read(&bundle.join("journal.jsonl")) else {
        return Vec::new();
    };
    let mut failed_hosts: Option<Vec<String>> = None;
    // The last attempt of each target (and whether it exited 0), in the order targets first
    // finished one.
    let mut last: Vec<(String, u32, bool)> = Vec::new();
    for (_, event) in &journal.events {
        match event {
            RunEvent::AttemptFinished {
                step: s,
                target,
                attempt,
                outcome,
                ..
            } if s.as_str() == step => {
                let t = target.to_string();
                let ok = outcome.succeeded();
                match last.iter_mut().find(|(x, _, _)| *x == t) {
                    Some(entry) => (entry.1, entry.2) = (*attempt, ok),
                    None => last.push((t, *attempt, ok)),
                }
            }
            RunEvent::StepFinished {
                step: s, targets, ..
            } if s.as_str() == step && !targets.is_empty() => {
                failed_hosts = Some(
                    targets
                        .iter()
                        .filter(|t| t.status == StepStatus::Failed)
                        .map(|t| t.target.clone())
                        .collect(),
                );
            }
            _ => {}
        }
    }
    let failed = |target: &str| match &failed_hosts {
        None => true,
        Some(hosts) => hosts
            .iter()
            .any(|h| target == h || target.starts_with(&format!("{h}/"))),
    };
    // One tail per host: for a block, the last sub-step whose last attempt did not exit 0 (an
    // `always` uncordon after it succeeds), else the last sub-step that ran.
    let mut picked: Vec<(String, u32, bool)> = Vec::new();
    for (target, attempt, ok) in last.into_iter().filter(|(t, _, _)| failed(t)) {
        let host = target.split('/').next().unwrap_or(&target).to_owned();
        match picked
            .iter_mut()
            .find(|(t, _, _)| t.split('/').next() == Some(host.as_str()))
        {
            Some(p) if ok && !p.2 => {}
            Some(p) => *p = (target, attempt, ok),
            None => picked.push((target, attempt, ok)),
        }
    }
    let mut out: Vec<FailedTail> = Vec::new();
    for (target, attempt, _) in picked {
        let log = bundle.join(format!("steps/{step}/{target}/attempt-{attempt}.log"));
        let lines = read_log_tail(&log, max_lines * 4, 256 * 1024)
            .map(|t| {
                let text: Vec<String> = t
                    .lines
                    .into_iter()
                    .filter(|l| !l.is_meta())
                    .map(|l| l.text)
                    .collect();
                text[text.len().saturating_sub(max_lines)..].to_vec()
            })
            .unwrap_or_default();
        out.push(FailedTail { target, log, lines });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_split_into_time_tag_and_the_bytes_as_written() {
        let t = "2026-01-02T03:04:05.000006Z";
        let line = [format!("{t} out+ a").as_bytes(), &[0xc3]].concat();
        assert_eq!(split_record(&line), Some((t, "out+", &b"a\xc3"[..])));
        assert_eq!(
            split_record(format!("{t} ---").as_bytes()),
            Some((t, "---", &b""[..]))
        );
        assert_eq!(split_record(format!("{t} in x").as_bytes()), None);
        assert_eq!(split_record(b"not a record"), None);
        assert_eq!(split_record(b"short out x"), None);
    }

    #[test]
    fn log_tail_reads_only_the_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.log");
        let mut text = String::new();
        for i in 0..1000 {
            text.push_str(&format!("2026-08-20T10:00:00.000Z err line {i}\n"));
        }
        std::fs::write(&p, &text).expect("w");
        let t = read_log_tail(&p, 10_000, 400).expect("tail");
        assert!(t.truncated);
        assert_eq!(t.total_bytes, text.len() as u64);
        assert_eq!(t.lines.last().expect("line").text, "line 999");
        assert!(t
            .lines
            .iter()
            .all(|l| l.tag == "err" && l.text.starts_with("line ")));
        let t = read_log_tail(&p, 3, 1 << 20).expect("tail");
        assert_eq!(t.lines.len(), 3);
        assert_eq!(t.lines[0].text, "line 997");
    }
}
