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
        use std::io::Write;
        if self.is_empty() {
            return Ok(());
        }
        let mut input = std::fs::File::open(path)?;
        // The one atomic write (engine::fs): a temporary name `leftovers` knows, synced, renamed.
        runbook_engine::fs::stage(path, 0o666, |file| {
            let mut output = std::io::BufWriter::new(file);
            copy_redacted(self, &mut input, &mut output, &mut vec![0u8; 1024 * 1024])?;
            output.flush()
        })?
        .commit()
    }
}

/// Copies a whole file's bytes from `input` to `output`, redacted (a secret cut between two
/// reads of `buf`'s size is still found): rewritten files and collected files.
pub fn copy_redacted(
    redactor: &ByteRedactor,
    input: &mut impl std::io::Read,
    output: &mut impl std::io::Write,
    buf: &mut [u8],
) -> std::io::Result<()> {
    let mut stream = StreamRedactor::<()>::whole();
    loop {
        let n = input.read(buf)?;
        if n == 0 {
            break;
        }
        output.write_all(&stream.push(redactor, (), &buf[..n]).text)?;
    }
    output.write_all(&stream.finish(redactor).text)
}

/// The one streaming driver: takes a stream's output chunk by chunk and gives out what can be
/// written now, redacted, holding back what a secret cut between two chunks needs, so that the
/// result is what redacting the whole stream at once would give. Every writer of the bundle
/// and the terminal uses it: the attempt log and the transcript (one driver per stream, whose
/// result both write), the console, collected files and files rewritten in place.
///
/// Two ways of treating private key blocks, chosen at construction:
/// - [`StreamRedactor::lines`] (output of a process, shown line by line): each line of a
///   block is replaced by `[REDACTED:private-key]` as it completes ([`PemFilter`]), so a block
///   is never held; complete lines (and progress lines ending in `\r`) go out at once, except
///   a run of lines that may be wrapped base64, held until the line that ends it; an
///   unfinished line goes out in pieces past [`HOLD_UNFINISHED`] bytes. `M` is what the caller
///   keeps with each line (its time stamp): each piece carries the `M` of the chunk in which
///   its line started.
/// - [`StreamRedactor::whole`] (files): the stream is redacted exactly as the whole file would
///   be (a key block from BEGIN to END is one placeholder), in pieces that end at line breaks.
#[derive(Debug)]
pub struct StreamRedactor<M = ()> {
    whole: bool,
    /// Bytes not redacted yet.
    pending: Vec<u8>,
    /// The end of the line before `pending` (see [`next_lead`]).
    lead: Vec<u8>,
    /// Lines: how many bytes at the start of `pending` are complete lines already through
    /// `pem`.
    filtered: usize,
    /// Lines: inside a private key block?
    pem: PemFilter,
    /// Lines: the index of the line `pending` starts in (lines counted from the stream's start).
    line: u64,
    /// Lines: the index of the line the next byte pushed falls in, and whether it starts it.
    next_line: u64,
    at_line_start: bool,
    /// Lines: `(first line, meta)` for the chunks lines in `pending` started in, in order; the
    /// first covers `line`.
    runs: std::collections::VecDeque<(u64, M)>,
    /// Lines: `pending[..wrapped]` are complete lines already found to end wrapped (held).
    wrapped: usize,
    /// Whole: inside a private key block longer than [`MAX_KEY_BLOCK`]: dropped up to its END
    /// line.
    in_key: bool,
}

/// What a [`StreamRedactor`] gives out for one chunk: redacted text, whole lines and possibly
/// the start of an unfinished one (or a line ended by `\r` so far).
#[derive(Debug)]
pub struct Released<M> {
    /// The redacted bytes, in order.
    pub text: Vec<u8>,
    /// `(line within this release, meta)`: the meta of line `n` is the last entry at or before
    /// `n` (lines mode; empty for whole files).
    metas: Vec<(usize, M)>,
    /// Line breaks in the input this covers (the output has the same number, unless a secret
    /// spanning lines was replaced whole).
    lines_in: usize,
}

/// One piece of a [`Released`]: a line (without its `\n`) or the start of an unfinished one.
#[derive(Debug)]
pub struct Piece<'a, M> {
    pub meta: &'a M,
    pub text: &'a [u8],
    /// The piece ends its line (a `\n` followed it).
    pub line_end: bool,
}

impl<M> Released<M> {
    pub fn empty() -> Self {
        Self {
            text: Vec::new(),
            metas: Vec::new(),
            lines_in: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// The text line by line, each piece with the meta of the chunk its line started in
    /// (lines mode).
    pub fn pieces(&self) -> impl Iterator<Item = Piece<'_, M>> {
        let mut rest: &[u8] = &self.text;
        let mut n = 0usize;
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let (text, line_end, meta_line) = match first_newline(rest) {
                Some(nl) => {
                    let t = &rest[..nl];
                    rest = &rest[nl + 1..];
                    // A secret spanning lines replaced whole: later lines take the last meta.
                    (t, true, n.min(self.lines_in.saturating_sub(1)))
                }
                None => {
                    let t = rest;
                    rest = &[];
                    (t, false, self.lines_in)
                }
            };
            n += 1;
            let meta = self
                .metas
                .iter()
                .rev()
                .find(|(first, _)| *first <= meta_line)
                .or(self.metas.first())
                .map(|(_, m)| m)?;
            Some(Piece {
                meta,
                text,
                line_end,
            })
        })
    }
}

/// Whole files: pieces end at a line break; a line longer than this goes out in pieces.
const MAX_LINE: usize = 1024 * 1024;

/// Whole files: a private key block is held whole until its END line, up to this size; a
/// longer one (or one that never ends) is replaced from its BEGIN line on, as redacting the
/// whole file would.
const MAX_KEY_BLOCK: usize = 1024 * 1024;

/// Lines: an unfinished line is held back up to this many bytes (beyond what a secret value
/// needs), because secrets recognised by shape (`Authorization: Bearer …` printed in two
/// writes) can only be matched whole; past it, all but the end a secret or a shape could still
/// be continuing in goes out.
pub const HOLD_UNFINISHED: usize = 4096;

/// Lines: held wrapped lines past this many bytes go out, except the last `overlap()` bytes
/// (a base64 dump of several megabytes is not held whole); an unfinished line holding the
/// start of a private key block is held up to this size.
const MAX_HOLD: usize = 64 * 1024;

static PEM_MARKER: std::sync::LazyLock<Option<regex::bytes::Regex>> =
    std::sync::LazyLock::new(|| regex::bytes::Regex::new("PRIVATE KEY-----").ok());
static BEGIN_MARKER: std::sync::LazyLock<Option<regex::bytes::Regex>> =
    std::sync::LazyLock::new(|| regex::bytes::Regex::new("-----BEGIN ").ok());

fn has(re: &std::sync::LazyLock<Option<regex::bytes::Regex>>, data: &[u8]) -> bool {
    re.as_ref().is_none_or(|re| re.is_match(data))
}

impl<M: Clone> StreamRedactor<M> {
    fn new(whole: bool) -> Self {
        Self {
            whole,
            pending: Vec::new(),
            lead: Vec::new(),
            filtered: 0,
            pem: PemFilter::default(),
            line: 0,
            next_line: 0,
            at_line_start: true,
            runs: std::collections::VecDeque::new(),
            wrapped: 0,
            in_key: false,
        }
    }

    /// For a process's output, shown line by line (see the type).
    pub fn lines() -> Self {
        Self::new(false)
    }

    /// For a file (see the type).
    pub fn whole() -> Self {
        Self::new(true)
    }

    /// Nothing held back.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Takes the next chunk (`meta`: what the caller keeps with the lines that start in it);
    /// returns what can be written now.
    pub fn push(&mut self, redactor: &ByteRedactor, meta: M, data: &[u8]) -> Released<M> {
        if data.is_empty() {
            return Released::empty();
        }
        if self.whole {
            self.pending.extend_from_slice(data);
            let len = self.pending.len();
            let cut = len.saturating_sub(redactor.overlap());
            // Pieces end at a line break: the shapes (`Authorization: …`, `Bearer …`) are
            // matched within a line and must see it whole. A line longer than MAX_LINE is cut
            // anyway, keeping back what a trigger and its value could span.
            let cut = match last_newline(&self.pending[..cut]) {
                Some(n) => n + 1,
                None if len > MAX_LINE => cut.min(len - MAX_LINE / 2),
                None => 0,
            };
            return self.take_whole(redactor, cut, false);
        }
        self.count_lines(meta, data);
        self.pending.extend_from_slice(data);
        self.filter_complete();
        let complete = self.filtered;
        let len = self.pending.len();
        if self.pem.inside() {
            // Nothing of an unfinished line inside a key block goes out; its last bytes are
            // kept, where its END marker may be.
            if len - complete > MAX_HOLD {
                self.pending.drain(complete..len - 64);
            }
            self.wrapped = 0;
            return self.release(redactor, complete);
        }
        let after_eol = self
            .pending
            .iter()
            .rposition(|&b| b == b'\n' || b == b'\r')
            .map_or(0, |n| n + 1);
        let overlap = redactor.overlap();
        let mut cut = if len - after_eol > HOLD_UNFINISHED.max(2 * overlap) {
            after_eol + fragment_cut(&self.pending[after_eol..], overlap, redactor.shapes())
        } else {
            hold_wrapped(&self.lead, &self.pending, after_eol, overlap, self.wrapped)
        };
        // What stays held of the checked lines is not checked again at the next read (a long
        // base64 dump would be walked over at every read).
        let held_checked = (cut < after_eol
            && self.pending[after_eol - 1] == b'\n'
            && (cut == 0 || self.pending[cut - 1] == b'\n'))
            .then_some((cut, after_eol));
        // The start of an unfinished line going out (up to a `\r`, or a long one): never in
        // the middle of a shape's match (`Authorization:` and its value on both sides of a
        // `\r`). Past MAX_HOLD, `fragment_cut` has looked at the end it keeps, and a key block
        // goes to the line filter below.
        while cut > complete && len - complete <= MAX_HOLD {
            match redactor
                .shapes()
                .match_across(&self.pending[complete..], cut - complete)
            {
                Some(start) if complete + start < cut => cut = complete + start,
                _ => break,
            }
        }
        if cut > complete && has(&BEGIN_MARKER, &self.pending[complete..cut]) {
            // The start of an unfinished line goes out: a key block starting in it must be
            // seen by the line filter, whole, first.
            if len - complete <= MAX_HOLD {
                cut = complete;
            } else if let Some(r) = self.pem.line(&self.pending[complete..cut]) {
                self.pending.splice(complete..cut, r.iter().copied());
                cut = complete + r.len();
            }
        }
        let before = self.pending.len();
        let released = self.release(redactor, cut);
        let used = before - self.pending.len();
        self.wrapped = match held_checked {
            Some((hold, end)) if used == hold => end - hold,
            _ => 0,
        };
        released
    }

    /// The rest, at the end of the stream. The driver is empty afterwards.
    pub fn finish(&mut self, redactor: &ByteRedactor) -> Released<M> {
        let out = if self.whole {
            let len = self.pending.len();
            self.take_whole(redactor, len, true)
        } else {
            if self.pending.len() > self.filtered {
                if let Some(r) = self.pem.line(&self.pending[self.filtered..]) {
                    self.pending.truncate(self.filtered);
                    self.pending.extend_from_slice(r);
                }
            }
            let len = self.pending.len();
            self.release(redactor, len)
        };
        self.pending.clear();
        self.lead.clear();
        self.filtered = 0;
        self.wrapped = 0;
        out
    }

    /// Lines: notes the meta of the lines that start in `data` (about to be appended).
    fn count_lines(&mut self, meta: M, data: &[u8]) {
        let breaks = data.iter().filter(|&&b| b == b'\n').count() as u64;
        let first = if self.at_line_start {
            self.next_line
        } else {
            self.next_line + 1
        };
        self.next_line += breaks;
        self.at_line_start = data.last() == Some(&b'\n');
        let last = if self.at_line_start {
            self.next_line.checked_sub(1)
        } else {
            Some(self.next_line)
        };
        if last.is_some_and(|last| last >= first) {
            self.runs.push_back((first, meta));
        }
    }

    /// Lines: passes the complete lines not seen yet through the private key filter.
    fn filter_complete(&mut self) {
        let complete = last_newline(&self.pending).map_or(0, |n| n + 1);
        let from = self.filtered;
        if complete <= from {
            return;
        }
        if !self.pem.inside() && !has(&PEM_MARKER, &self.pending[from..complete]) {
            self.filtered = complete;
            return;
        }
        // Rebuilt only from the first line the filter replaces.
        let mut out: Option<Vec<u8>> = None;
        let mut at = from;
        for line in self.pending[from..complete].split_inclusive(|&b| b == b'\n') {
            match self.pem.line(&line[..line.len() - 1]) {
                Some(r) => {
                    let o = out.get_or_insert_with(|| self.pending[from..at].to_vec());
                    o.extend_from_slice(r);
                    o.push(b'\n');
                }
                None => {
                    if let Some(o) = &mut out {
                        o.extend_from_slice(line);
                    }
                }
            }
            at += line.len();
        }
        match out {
            Some(o) => {
                self.filtered = from + o.len();
                self.pending.splice(from..complete, o);
            }
            None => self.filtered = complete,
        }
    }

    /// Lines: redacts and gives out `pending[..cut]` (or more, to the end of a match that
    /// starts before `cut`).
    fn release(&mut self, redactor: &ByteRedactor, cut: usize) -> Released<M> {
        if cut == 0 {
            return Released::empty();
        }
        let (text, used) = redactor.redact_after(&self.lead, &self.pending, cut);
        let consumed = &self.pending[..used];
        self.lead = next_lead(&self.lead, consumed);
        let lines_in = consumed.iter().filter(|&&b| b == b'\n').count();
        let last = self.line + lines_in as u64;
        let mut metas = Vec::new();
        for (k, (first, meta)) in self.runs.iter().enumerate() {
            if *first > last {
                break;
            }
            let covers_start = self.runs.get(k + 1).is_none_or(|(f, _)| *f > self.line);
            if *first >= self.line || covers_start {
                let rel = first.saturating_sub(self.line) as usize;
                metas.push((rel, meta.clone()));
            }
        }
        self.line = last;
        // Runs that end before the line `pending` now starts in are done with.
        while self.runs.len() > 1 && self.runs[1].0 <= self.line {
            self.runs.pop_front();
        }
        self.pending.drain(..used);
        self.filtered = self.filtered.saturating_sub(used);
        Released {
            text,
            metas,
            lines_in,
        }
    }

    /// Whole files: redacts up to `cut` (all of it when `last`), keeping key blocks whole.
    fn take_whole(&mut self, redactor: &ByteRedactor, cut: usize, last: bool) -> Released<M> {
        let mut out = Released::empty();
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
                let (red, _) = redactor.redact_after(&self.lead, &self.pending, len);
                out.text = red;
                self.lead.clear();
                self.pending.clear();
                self.in_key = true;
            }
            return out;
        }
        let (red, used) = redactor.redact_after(&self.lead, &self.pending, cut);
        out.text = red;
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

/// Where to cut a long unfinished line: keep back what a secret value could still continue
/// in, and never inside a match of a shape (`Authorization: Bearer …`, a private key block
/// from its BEGIN marker), so redaction by shape and the key filter see it in one piece.
/// 0: nothing can go out yet.
fn fragment_cut(bytes: &[u8], overlap: usize, shapes: &ShapeRules) -> usize {
    const KEEP: usize = 256;
    let len = bytes.len();
    let mut cut = len.saturating_sub(overlap.max(KEEP));
    let window = cut.saturating_sub(KEEP);
    // Moving the cut back to a match's start can put it inside an earlier match: again.
    while let Some(start) = shapes.match_across(&bytes[window..], cut - window) {
        if window + start >= cut {
            break;
        }
        cut = window + start;
    }
    cut
}

/// Lines: where to stop in `data[..end]` (`end` just after a line break) so that the trailing
/// lines that end wrapped (see [`ends_wrapped`]) wait for the line that ends them. A last line
/// ending in `\r` counts (its `\n` may be in the next read); the lines in `data[..known]` are
/// known to end wrapped. At most [`MAX_HOLD`] bytes wait;
/// past that, all but the last `overlap` bytes go out (a match starting before the cut is taken
/// whole: none is missed).
fn hold_wrapped(lead: &[u8], data: &[u8], end: usize, overlap: usize, known: usize) -> usize {
    // No secret value (overlap 0): nothing to join lines for.
    if overlap == 0 {
        return end;
    }
    let limit = MAX_HOLD.max(2 * overlap);
    let mut hold = end;
    // Walking back further than `limit` changes nothing (the cut below applies): stopping
    // there keeps the work per read bounded however long the run of wrapped lines is.
    while hold > 0 && end - hold <= limit {
        if hold <= known {
            // Checked at the last read (`known`: see `StreamRedactor::wrapped`).
            hold = 0;
            break;
        }
        let brk = data[hold - 1];
        if brk != b'\n' && !(brk == b'\r' && hold == end) {
            break;
        }
        let content_end = hold - 1;
        let start = last_newline(&data[..content_end]).map_or(0, |n| n + 1);
        let before: &[u8] = if start == 0 { lead } else { &[] };
        if !ends_wrapped(before, &data[start..content_end]) {
            break;
        }
        hold = start;
    }
    if end - hold > limit {
        let keep = end - overlap.max(1);
        hold = last_newline(&data[..keep])
            .map_or(keep, |n| n + 1)
            .max(hold);
    }
    hold
}

/// The first `\n` in `hay`: every line of output goes through here (SIMD `memchr`).
pub(crate) fn first_newline(hay: &[u8]) -> Option<usize> {
    memchr::memchr(b'\n', hay)
}

/// The last `\n` in `hay`.
pub(crate) fn last_newline(hay: &[u8]) -> Option<usize> {
    memchr::memrchr(b'\n', hay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newline_search_finds_what_a_byte_loop_finds() {
        let mut hay = vec![b'A'; 40];
        assert_eq!(first_newline(&hay), None);
        assert_eq!(last_newline(&hay), None);
        // Bytes next to `\n` in value (0x0a ± 1, 0x8a) must not be taken for one.
        hay.extend_from_slice(&[0x09, 0x0b, 0x8a, 0x0a ^ 0x80]);
        for len in 0..hay.len() {
            for a in 0..len {
                for b in [None, Some(a.saturating_add(3).min(len - 1))] {
                    let mut h = hay[..len].to_vec();
                    h[a] = b'\n';
                    if let Some(b) = b {
                        h[b] = b'\n';
                    }
                    assert_eq!(
                        first_newline(&h),
                        h.iter().position(|&x| x == b'\n'),
                        "{h:?}"
                    );
                    assert_eq!(
                        last_newline(&h),
                        h.iter().rposition(|&x| x == b'\n'),
                        "{h:?}"
                    );
                }
            }
        }
    }

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
            let out = whole_stream(&r, &data, size);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&whole),
                "chunks of {size}"
            );
        }
        // Held lines: the same result line by line (without the private key rule, which is the
        // log's own line filter there: see `PemFilter`).
        let r = r.with_shapes(ShapeRules::none());
        let filtered = pem_filtered(&data);
        assert_same_lines(&held_lines(&r, &data), &whole_lines(&r, &filtered), 0);
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
            let out = whole_stream(&r, &data, size);
            assert!(out == whole, "chunks of {size}");
        }
        assert!(!String::from_utf8_lossy(&whole).contains("abcdefgh"));
    }

    /// `data` through a lines driver, line by line (each line and its `\n` one chunk).
    fn held_lines(r: &ByteRedactor, data: &[u8]) -> Vec<String> {
        let mut d = StreamRedactor::<usize>::lines();
        let mut got = Vec::new();
        let mut line = Vec::new();
        let mut take = |rel: Released<usize>, got: &mut Vec<String>| {
            for p in rel.pieces() {
                line.extend_from_slice(p.text);
                if p.line_end {
                    got.push(String::from_utf8_lossy(&std::mem::take(&mut line)).into_owned());
                }
            }
        };
        for (n, l) in data.split_inclusive(|&b| b == b'\n').enumerate() {
            take(d.push(r, n, l), &mut got);
        }
        take(d.finish(r), &mut got);
        got.push(String::from_utf8_lossy(&line).into_owned());
        got
    }

    /// `data` in chunks of `size` through a whole-file driver (the one copy loop).
    fn whole_stream(r: &ByteRedactor, data: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        copy_redacted(r, &mut &data[..], &mut out, &mut vec![0u8; size]).expect("in memory");
        out
    }

    /// `data` in chunks of `size` through a lines driver: the text given out.
    fn lines_stream(r: &ByteRedactor, data: &[u8], size: usize) -> Vec<u8> {
        let mut s = StreamRedactor::<()>::lines();
        let mut out = Vec::new();
        for chunk in data.chunks(size) {
            out.extend_from_slice(&s.push(r, (), chunk).text);
        }
        out.extend_from_slice(&s.finish(r).text);
        out
    }

    /// `data` with each line of a private key block replaced, as the lines driver does.
    fn pem_filtered(data: &[u8]) -> Vec<u8> {
        let mut f = PemFilter::default();
        let mut out = Vec::new();
        for line in data.split_inclusive(|&b| b == b'\n') {
            let (body, nl) = match line.split_last() {
                Some((b'\n', body)) => (body, true),
                _ => (line, false),
            };
            out.extend_from_slice(f.line(body).unwrap_or(body));
            if nl {
                out.push(b'\n');
            }
        }
        out
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

    /// The driver itself: a secret cut at every byte offset between two chunks is found, in
    /// both modes, and the text given out is what redacting the whole stream gives.
    #[test]
    fn a_secret_split_at_every_offset_between_two_chunks_is_redacted() {
        let secret = "s3cr3t-token-value";
        let r = ByteRedactor::new(&[("tok".into(), secret.into())]);
        let data = format!("first line\ntoken is {secret} ok\nprogress {secret}\rdone {secret}");
        let want = r.redact(data.as_bytes());
        assert!(!String::from_utf8_lossy(&want).contains("s3cr3t"));
        for split in 0..=data.len() {
            let (a, b) = data.as_bytes().split_at(split);
            for whole in [false, true] {
                let mut d = if whole {
                    StreamRedactor::<()>::whole()
                } else {
                    StreamRedactor::<()>::lines()
                };
                let mut got = d.push(&r, (), a).text;
                got.extend_from_slice(&d.push(&r, (), b).text);
                got.extend_from_slice(&d.finish(&r).text);
                assert_eq!(
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&want),
                    "split at {split}, whole {whole}"
                );
                assert!(d.is_empty());
            }
        }
    }

    /// The one pass (`ByteRedactor::may_match`): output without a candidate (a base64 dump of
    /// zeros, as `bench/capture.sh` prints) takes the fast path, and a secret, its base64 form
    /// wrapped over lines, or a shape placed at every offset of a chunk in such output is still
    /// redacted, in both modes, as redacting the whole stream does.
    #[test]
    fn a_secret_at_every_chunk_offset_is_caught_with_the_one_pass_on() {
        let secret = "capture-secret-value-0123456789";
        let r = ByteRedactor::new(&[("token".into(), secret.into())]);
        let filler = wrapped_base64(&[0u8; 3000], 76);
        assert!(
            !r.may_match(filler.as_bytes()),
            "the filler takes the fast path"
        );
        assert!(r.may_match(secret.as_bytes()));
        const CHUNK: usize = 97;
        for k in 0..CHUNK {
            let mut raw = vec![0u8; 1000 + k];
            raw.extend_from_slice(format!("admin:{secret}").as_bytes());
            raw.extend_from_slice(&[0u8; 1000]);
            let cases = [
                format!("{}{secret}\n{filler}", &filler[..1500 + k]),
                format!(
                    "{}Authorization: Bearer abcdefgh12345\n{filler}",
                    &filler[..1500 + k]
                ),
                format!("{filler}{}", wrapped_base64(&raw, 76)),
            ];
            for (n, data) in cases.iter().enumerate() {
                let want = r.redact(data.as_bytes());
                assert!(
                    String::from_utf8_lossy(&want).contains("[REDACTED:"),
                    "case {n}, offset {k}"
                );
                for size in [CHUNK, 4096] {
                    for (mode, got) in [
                        ("lines", lines_stream(&r, data.as_bytes(), size)),
                        ("whole", whole_stream(&r, data.as_bytes(), size)),
                    ] {
                        assert!(
                            got == want,
                            "case {n}, offset {k}, chunks of {size}, {mode}:\n{}",
                            String::from_utf8_lossy(&got)
                        );
                    }
                }
            }
        }
    }

    /// Wrapped base64 forms (76 and 64 columns, CRLF too) are found whatever the chunks, and
    /// complete lines that cannot be part of one go out at once.
    #[test]
    fn wrapped_base64_forms_are_found_across_chunks() {
        let r = ByteRedactor::new(&[("pw".into(), LONG.into())]);
        let mut data = String::from("start\n");
        data.push_str(&wrapped_base64(format!("admin:{LONG}").as_bytes(), 76));
        data.push_str("middle\n");
        data.push_str(
            &wrapped_base64(format!("{LONG}{LONG}").as_bytes(), 64).replace('\n', "\r\n"),
        );
        data.push_str("end\n");
        let want = r.redact(data.as_bytes());
        assert!(
            String::from_utf8_lossy(&want)
                .matches("[REDACTED:pw]")
                .count()
                >= 3
        );
        for size in [1, 2, 5, 63, 64, 65, 76, 77, 78, 200, 4096] {
            let got = lines_stream(&r, data.as_bytes(), size);
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want),
                "chunks of {size}"
            );
            assert_eq!(whole_stream(&r, data.as_bytes(), size), want, "{size}");
        }
        // A line that does not end wrapped is not held.
        let mut d = StreamRedactor::<()>::lines();
        assert_eq!(d.push(&r, (), b"plain line\nnext").text, b"plain line\n");
        // One that does waits for the line that ends it.
        let line = wrapped_base64(&[1u8; 57], 76);
        assert!(d.push(&r, (), format!(" {line}").as_bytes()).is_empty());
        let rel = d.push(&r, (), b"ok\n");
        assert_eq!(rel.text, format!("next {line}ok\n").as_bytes());
    }

    /// A private key block cut anywhere between two chunks: each of its lines is replaced in
    /// lines mode (nothing of it goes out, not even while the BEGIN line is unfinished), and
    /// the block is one placeholder in whole mode.
    #[test]
    fn a_private_key_block_across_chunks_never_goes_out() {
        let r = ByteRedactor::new(&[]);
        let block = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAsecretbody\nqqsecondline\n-----END RSA PRIVATE KEY-----\n";
        for crlf in [false, true] {
            let block = if crlf {
                block.replace('\n', "\r\n")
            } else {
                block.to_owned()
            };
            let data = format!("before\n{block}after\n");
            let lines_want =
                String::from_utf8_lossy(&r.redact(&pem_filtered(data.as_bytes()))).into_owned();
            for split in 0..=data.len() {
                let (a, b) = data.as_bytes().split_at(split);
                let mut d = StreamRedactor::<()>::lines();
                let first = d.push(&r, (), a).text;
                let first = String::from_utf8_lossy(&first).into_owned();
                assert!(
                    !first.contains("MIIE") && !first.contains("-----BEGIN"),
                    "{first:?}"
                );
                let mut got = first;
                got.push_str(&String::from_utf8_lossy(&d.push(&r, (), b).text));
                got.push_str(&String::from_utf8_lossy(&d.finish(&r).text));
                assert_eq!(got, lines_want, "split at {split}, crlf {crlf}");
                assert!(!got.contains("secretbody") && !got.contains("secondline"));
                assert_eq!(got.matches("[REDACTED:private-key]").count(), 4);
            }
            let whole = r.redact(data.as_bytes());
            for size in [1, 7, 40, 4096] {
                assert_eq!(whole_stream(&r, data.as_bytes(), size), whole, "{size}");
            }
        }
    }

    /// `finish` gives out what was held: an unfinished line (redacted, a secret in it found),
    /// wrapped lines waiting for their end, and the inside of an unfinished key block as a
    /// placeholder.
    #[test]
    fn finish_gives_out_the_held_tail() {
        let r = ByteRedactor::new(&[("pw".into(), LONG.into())]);
        let mut d = StreamRedactor::<u32>::lines();
        assert_eq!(d.push(&r, 1, b"done\nno newline, ").text, b"done\n");
        assert!(d.push(&r, 2, &LONG.as_bytes()[..20]).is_empty());
        assert!(d.push(&r, 3, &LONG.as_bytes()[20..]).is_empty());
        let rel = d.finish(&r);
        let pieces: Vec<_> = rel.pieces().collect();
        assert_eq!(pieces.len(), 1);
        assert_eq!(pieces[0].text, b"no newline, [REDACTED:pw]");
        assert!(!pieces[0].line_end);
        // The meta of the chunk the line started in.
        assert_eq!(*pieces[0].meta, 1);
        assert!(d.is_empty());
        // Held wrapped lines.
        let text = wrapped_base64(format!("x:{LONG}").as_bytes(), 76);
        let mut d = StreamRedactor::<u32>::lines();
        let text = text.trim_end();
        assert!(d.push(&r, 1, text.as_bytes()).is_empty());
        let rel = d.finish(&r);
        assert_eq!(rel.text, r.redact(text.as_bytes()));
        assert!(String::from_utf8_lossy(&rel.text).contains("[REDACTED:pw]"));
        // An unfinished key block.
        let mut d = StreamRedactor::<u32>::lines();
        let rel = d.push(&r, 1, b"-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEI");
        assert_eq!(rel.text, b"[REDACTED:private-key]\n");
        assert_eq!(d.finish(&r).text, b"[REDACTED:private-key]");
    }

    /// Each line given out carries the meta of the chunk it started in.
    #[test]
    fn pieces_carry_the_meta_of_the_chunk_their_line_started_in() {
        let r = ByteRedactor::new(&[]);
        let mut d = StreamRedactor::<u32>::lines();
        let mut got = Vec::new();
        for (meta, chunk) in [(1, "a\nb"), (2, "c\nd\ne"), (3, "\n"), (4, "f\n")] {
            let rel = d.push(&r, meta, chunk.as_bytes());
            got.extend(rel.pieces().map(|p| {
                (
                    *p.meta,
                    String::from_utf8_lossy(p.text).into_owned(),
                    p.line_end,
                )
            }));
        }
        let want = [
            (1, "a", true),
            (1, "bc", true),
            (2, "d", true),
            (2, "e", true),
            (4, "f", true),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|(m, t, e)| (*m, (*t).to_owned(), *e))
            .collect();
        // "b" and "c" arrive in two chunks but the driver gives the line out once complete.
        let joined: Vec<_> = got.iter().filter(|p| p.2).cloned().collect();
        assert_eq!(joined, want);
    }

    /// A long line without a newline goes out in pieces (bounded memory), never cutting a
    /// secret, a shape trigger from its value, or a private key marker.
    #[test]
    fn a_long_unfinished_line_goes_out_in_safe_pieces() {
        let r = ByteRedactor::new(&[("tok".into(), "s3cr3t-straddling-value".into())]);
        let mut data = Vec::new();
        for i in 0..3000 {
            data.extend_from_slice(
                format!("{i} s3cr3t-straddling-value Authorization: Bearer abc{i:08}defgh ")
                    .as_bytes(),
            );
        }
        let want = r.redact(&data);
        for size in [1000, 4097, 65536] {
            let mut d = StreamRedactor::<()>::lines();
            let mut got = Vec::new();
            let mut most = 0;
            for chunk in data.chunks(size) {
                let t = d.push(&r, (), chunk).text;
                got.extend_from_slice(&t);
                most = most.max(d.pending.len());
            }
            got.extend_from_slice(&d.finish(&r).text);
            assert!(most < HOLD_UNFINISHED + size + 1024, "held {most}");
            if let Some(n) = (0..got.len().min(want.len())).find(|&n| got[n] != want[n]) {
                panic!(
                    "chunks of {size}: differs at {n}: got {:?} want {:?}",
                    String::from_utf8_lossy(&got[n.saturating_sub(80)..(n + 80).min(got.len())]),
                    String::from_utf8_lossy(&want[n.saturating_sub(80)..(n + 80).min(want.len())])
                );
            }
            assert!(got == want, "chunks of {size}: output differs");
        }
    }
}
