//! Arbitrary output (invalid UTF-8, NUL, CR, lone newlines) in arbitrary reads on both streams,
//! at arbitrary (even backwards) times, through the attempt log and the asciicast writer.
//! Properties: no panic; every log record is `<time> <tag> <bytes>` and each stream read back
//! from the log is the stream's bytes (only shape rules redact here: no secret values);
//! the cast's first line is the header and every later line is a JSON `[time, "o", text]`
//! event with times that never go backwards.
#![no_main]

use arbitrary::Arbitrary;
use chrono::TimeDelta;
use libfuzzer_sys::fuzz_target;
use runbook_engine::event::Stream;
use runbook_evidence::cast::CastWriter;
use runbook_evidence::log::LogWriter;
use runbook_evidence::redact::ByteRedactor;
use runbook_fuzz::{parse_log, redact_lines, scratch, stream_bytes};

#[derive(Arbitrary, Debug)]
struct Input {
    title: String,
    command: String,
    meta: String,
    /// (stderr?, milliseconds from the start, bytes)
    reads: Vec<(bool, i32, Vec<u8>)>,
    outcome: String,
}

/// Built once: a redactor compiles its shape rules (regular expressions) when it is made.
fn redactor() -> &'static ByteRedactor {
    static R: std::sync::OnceLock<ByteRedactor> = std::sync::OnceLock::new();
    R.get_or_init(|| ByteRedactor::new(&[]))
}

fuzz_target!(|input: Input| {
    let t0 = chrono::DateTime::UNIX_EPOCH + TimeDelta::days(20_000);
    let redactor = redactor();
    let log_path = scratch("writer.log");
    let cast_path = scratch("writer.cast");
    let mut log = LogWriter::create(&log_path, redactor.clone()).expect("create log");
    let mut cast =
        CastWriter::create(&cast_path, t0, &input.title, &input.command, redactor.clone())
            .expect("create cast");
    log.meta(t0, &input.meta).expect("meta");
    let mut streams: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    for (stderr, ms, bytes) in &input.reads {
        let at = t0 + TimeDelta::milliseconds(i64::from(*ms));
        let stream = if *stderr { Stream::Stderr } else { Stream::Stdout };
        streams[usize::from(*stderr)].extend_from_slice(bytes);
        log.write(at, stream, bytes).expect("log write");
        cast.write(at, stream, bytes).expect("cast write");
    }
    log.finish_with(t0, &input.outcome).expect("log finish");
    cast.finish(t0, &input.outcome).expect("cast finish");

    let log_bytes = std::fs::read(&log_path).expect("read log");
    let records = parse_log(&log_bytes);
    for (tag, data) in [("out", &streams[0]), ("err", &streams[1])] {
        let got = stream_bytes(&records, tag);
        let want = redact_lines(redactor, data);
        assert!(got == want, "{tag} read back from the log differs from what was written");
    }

    let cast_text = std::fs::read_to_string(&cast_path).expect("cast is UTF-8");
    let mut lines = cast_text.lines();
    let header: serde_json::Value =
        serde_json::from_str(lines.next().expect("header")).expect("header is JSON");
    assert_eq!(header["version"], 2);
    let mut last = 0.0f64;
    for line in lines {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("cast line is not JSON ({e}): {line:?}"));
        let a = event.as_array().expect("event is an array");
        assert_eq!(a.len(), 3, "{line}");
        let t = a[0].as_f64().expect("time is a number");
        assert!(t >= last, "time went backwards: {t} after {last}");
        last = t;
        assert_eq!(a[1], "o");
        assert!(a[2].is_string());
    }
});
