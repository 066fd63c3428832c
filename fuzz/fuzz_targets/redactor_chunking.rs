//! Streaming redaction: arbitrary bytes, arbitrary secrets and arbitrary read sizes through the
//! attempt log writer must give exactly what redacting the data at once gives, and no secret
//! value may survive. `pad` inserts up to 71 KiB of filler so lines cross the log's 64 KiB
//! fragment limit, where the writer cuts a long line into `out+` records. (Values shorter than
//! `MIN_SECRET` bytes are not redacted by design; they are still fed in, for the equality.)
//!
//! The reference is `ByteRedactor::redact` applied to each line (`redact_lines`): the log is
//! line-oriented, and a secret value here never contains a newline, so for secret values that is
//! the same as redacting the whole data.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use runbook_engine::event::Stream;
use runbook_evidence::log::LogWriter;
use runbook_evidence::redact::{ByteRedactor, MIN_SECRET};
use runbook_fuzz::{contains, parse_log, redact_lines, scratch, stream_bytes};

#[derive(Arbitrary, Debug)]
struct Input {
    secrets: Vec<String>,
    data: Vec<u8>,
    chunks: Vec<u16>,
    pad: u8,
    pad_at: u16,
    pad_byte: u8,
}

/// Redactors by their secrets. Making one compiles its shape rules (regular expressions), which
/// would dominate every run; most mutations change the data, not the secrets.
fn redactor_for(secrets: &[(String, String)]) -> ByteRedactor {
    type Cache = std::collections::HashMap<Vec<(String, String)>, ByteRedactor>;
    static CACHE: std::sync::OnceLock<std::sync::Mutex<Cache>> = std::sync::OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if cache.len() > 512 {
        cache.clear();
    }
    cache
        .entry(secrets.to_vec())
        .or_insert_with(|| ByteRedactor::new(secrets))
        .clone()
}

fuzz_target!(|input: Input| {
    let secrets: Vec<(String, String)> = input
        .secrets
        .iter()
        .filter(|s| !s.is_empty() && !s.contains('\n'))
        .take(4)
        .enumerate()
        .map(|(i, s)| (format!("s{i}"), s.chars().take(64).collect()))
        .collect();
    let mut data = input.data.clone();
    if input.pad > 0 {
        let at = usize::from(input.pad_at).min(data.len());
        // Up to 71 KiB: enough to cross the 64 KiB fragment limit once or twice.
        let filler = vec![input.pad_byte; usize::from(input.pad % 72) * 1024];
        data.splice(at..at, filler);
    }
    let redactor = redactor_for(&secrets);
    let path = scratch("redactor.log");
    let at = chrono::DateTime::UNIX_EPOCH;
    let mut w = LogWriter::create(&path, redactor.clone()).expect("create log");
    let mut rest = &data[..];
    let mut sizes = input.chunks.iter().cycle();
    while !rest.is_empty() {
        let n = match sizes.next() {
            Some(&n) => usize::from(n).max(1),
            None => rest.len(),
        };
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        w.write(at, Stream::Stdout, chunk).expect("write");
        rest = tail;
    }
    w.finish().expect("finish");
    let log = std::fs::read(&path).expect("read log");
    let records = parse_log(&log);
    let got = stream_bytes(&records, "out");
    let want = redact_lines(&redactor, &data);
    assert!(
        got == want,
        "streamed redaction differs from redacting at once\nsecrets: {secrets:?}\n--- got\n{}\n--- want\n{}",
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want)
    );
    let placeholders: Vec<String> = secrets
        .iter()
        .map(|(n, _)| format!("[REDACTED:{n}]"))
        .chain(
            ["authorization", "bearer-token", "private-key"]
                .iter()
                .map(|n| format!("[REDACTED:{n}]")),
        )
        .collect();
    for (name, value) in &secrets {
        // Values shorter than MIN_SECRET are not redacted by design, and a value made of
        // placeholder text can be formed by the placeholders themselves.
        if value.len() < MIN_SECRET
            || value.contains(['[', ']'])
            || placeholders.iter().any(|p| p.contains(value.as_str()))
        {
            continue;
        }
        assert!(
            !contains(&got, value.as_bytes()),
            "secret {name} = {value:?} survived in the log"
        );
    }
});
