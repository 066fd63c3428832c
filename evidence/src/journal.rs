//! Reading `journal.jsonl` back: the source of truth for `resume`, `repair` and `verify`. A
//! crash can leave a torn last line (written partly, never synced); it is detected and left out,
//! and [`truncate_torn`] cuts it off before anything is appended after it.

use std::path::Path;

use runbook_engine::event::RunEvent;

use crate::EvidenceError;

#[derive(Debug, Default)]
pub struct JournalRead {
    /// (sequence number, event), in file order.
    pub events: Vec<(u64, RunEvent)>,
    /// Byte length of the complete, valid prefix of the file.
    pub valid_len: u64,
    /// A last line that was cut off mid-write: its length in bytes.
    pub torn_bytes: Option<u64>,
    /// Lines (1-based) in the middle that are not valid events: real damage, not a crash.
    pub bad_lines: Vec<usize>,
}

impl JournalRead {
    pub fn last_seq(&self) -> u64 {
        self.events.last().map_or(0, |(s, _)| *s)
    }
}

pub fn read(path: &Path) -> Result<JournalRead, EvidenceError> {
    let data = std::fs::read(path).map_err(|source| EvidenceError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(parse(&data))
}

pub fn parse(data: &[u8]) -> JournalRead {
    let mut out = JournalRead::default();
    let mut offset = 0usize;
    let lines: Vec<&[u8]> = data.split_inclusive(|&b| b == b'\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let last = i + 1 == lines.len();
        let complete = line.ends_with(b"\n");
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        let parsed = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| {
                let seq = v.get("seq")?.as_u64()?;
                serde_json::from_value::<RunEvent>(v).ok().map(|e| (seq, e))
            });
        match parsed {
            Some(ev) if complete => {
                out.events.push(ev);
                offset += line.len();
                out.valid_len = offset as u64;
            }
            // A last line without its newline was being written when the writer died.
            _ if last && (!complete || parsed.is_none()) => {
                out.torn_bytes = Some(line.len() as u64);
            }
            _ => {
                out.bad_lines.push(i + 1);
                offset += line.len();
                out.valid_len = offset as u64;
            }
        }
    }
    out
}

/// Cuts a torn last line off so that appending continues on a clean line boundary.
pub fn truncate_torn(path: &Path, read: &JournalRead) -> Result<(), EvidenceError> {
    if read.torn_bytes.is_none() {
        return Ok(());
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(crate::write_err(path))?;
    file.set_len(read.valid_len)
        .map_err(crate::write_err(path))?;
    file.sync_all().map_err(crate::write_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"at":"2026-11-25T18:24:51.080098857Z","event":"run_started","run_id":"4015d72d","runbook":"x","seq":1,"steps":1}"#;
    const NOTE: &str =
        r#"{"at":"2026-11-25T18:24:51.080098857Z","event":"note","message":"hi","seq":2}"#;

    #[test]
    fn a_torn_last_line_is_left_out() {
        let data = format!("{GOOD}\n{NOTE}\n{{\"at\":\"2026-11-25T18:2");
        let r = parse(data.as_bytes());
        assert_eq!(r.events.len(), 2);
        assert_eq!(r.last_seq(), 2);
        assert_eq!(r.torn_bytes, Some(22));
        assert_eq!(r.valid_len as usize, GOOD.len() + NOTE.len() + 2);
        assert!(r.bad_lines.is_empty());
    }

    #[test]
    fn damage_in_the_middle_is_reported() {
        let data = format!("{GOOD}\nnot json\n{NOTE}\n");
        let r = parse(data.as_bytes());
        assert_eq!(r.events.len(), 2);
        assert_eq!(r.bad_lines, vec![2]);
        assert_eq!(r.torn_bytes, None);
    }
}
