//! Streaming redaction: drives the engine's matcher ([`runbook_engine::redact`]) over output as
//! it arrives and over files, holding back what a secret cut between two reads needs, so that
//! every writer of the bundle (log, cast, collected files, rewrites) redacts exactly what
//! redacting the whole stream at once would. The rules themselves (forms, shapes, placeholder)
//! live in the engine.

pub use runbook_engine::redact::{
    ends_wrapped, lead_at, next_lead, variants, ByteRedactor, PemFilter, ShapeRules, MIN_SECRET,
    MIN_SECRET_LINE, NOT_SEARCHED, SEARCHED_FORMS, WRAP_MIN,
};
use runbook_engine::redact::{key_marker, KEY_BEGIN, KEY_END};

/// Rewriting a file in place with a redactor (I/O, so here rather than in the engine).
pub trait RedactFile {
    /// Rewrites a file with every known secret redacted, streaming in chunks. Used when a
    /// secret is registered after output that contains it was already written.
    fn redact_file(&self, path: &std::path::Path) -> std::io::Result<()>;
}

impl RedactFile for ByteRedactor {
    fn redact_file(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::{Read, Write};
        if self.is_empty() {
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
const MAX_HOLD: usize = 64 * 1024;

impl<M: Clone> WrapHold<M> {
    pub fn is_empty(&self) -> bool {
        self.metas.is_empty()
    }

    /// Takes a complete line (without its `\n`); returns the redacted lines that can go out
    /// now, in order, each with its `meta`.
    pub fn line(&mut self, redactor: &ByteRedactor, meta: M, line: &[u8]) -> Vec<(M, Vec<u8>)> {
        // Nothing to join lines for without a secret value: no line waits.
        if self.is_empty() && (redactor.is_empty() || !ends_wrapped(&[], line)) {
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
    // No secret value (overlap 0): nothing to join lines for.
    if overlap == 0 {
        return end;
    }
    let limit = MAX_HOLD.max(2 * overlap);
    let mut hold = end;
    // Walking back further than `limit` changes nothing (the cut below applies): stopping
    // there keeps the work per read bounded however long the run of wrapped lines is.
    while hold > 0 && end - hold <= limit {
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
    if end - hold > limit {
        let keep = end - overlap.max(1);
        hold = data[..keep]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(keep, |n| n + 1)
            .max(hold);
    }
    hold
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
        let r = r.with_shapes(ShapeRules::none());
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
}
