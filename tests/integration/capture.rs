//! Capture at volume (issue #19): a step printing hundreds of MiB of wrapped base64 — the shape
//! that makes the redactor hold lines back — with a secret param set, so the redactor really
//! works. The runner's peak memory must stay bounded whatever the output size; it is read by a
//! later step from the runner's own `/proc/<pid>/status` (VmHWM: the peak so far), so nothing
//! samples from outside and no timing is involved. The bundle must pass `evidence verify`:
//! its `SHA256SUMS` now comes from the writers' running digests, verify reads the files.

use std::process::Command;

use crate::common::{read_json, step, Test, BIN};

const SECRET: &str = "capture-secret-value-0123456789";

/// 128 MiB in, 171 MiB of base64 out (plus one newline per 76 characters): well over the
/// memory bound, so a runner that kept the output would fail; larger sizes only make the
/// debug-build suite slower (`bench/capture.sh` measures 768 MiB on a release build).
const INPUT: u64 = 128 * 1024 * 1024;

fn base64_len(input: u64) -> u64 {
    let chars = input.div_ceil(3) * 4;
    chars + chars.div_ceil(76)
}

#[test]
fn a_step_printing_171_mib_keeps_the_runner_under_64_mib() {
    let toml = format!(
        r#"[runbook]
name = "capture"

[params]
token = {{ secret = true, env = "CAPTURE_TOKEN" }}

[[steps]]
id = "produce"
run = "head -c {INPUT} /dev/zero | base64; echo {{{{ params.token }}}}"

[[steps]]
id = "peak"
needs = ["produce"]
run = "grep VmHWM /proc/$PPID/status"
"#
    );
    let out = Test::new()
        .runbook(&toml)
        .env("CAPTURE_TOKEN", SECRET)
        .run_args()
        .run();
    out.assert_code(0);
    let bundle = out.bundle();
    let m = read_json(&bundle.join("manifest.json"));
    let printed = base64_len(INPUT) + SECRET.len() as u64 + 1;
    assert_eq!(
        step(&m, "produce")["attempts"][0]["output"]["stdout"],
        printed,
        "every byte was counted"
    );

    // `VmHWM:     12345 kB` in the second step's log.
    let log = std::fs::read_to_string(bundle.join("steps/peak/local/attempt-1.log")).expect("log");
    let kib: u64 = log
        .lines()
        .find_map(|l| l.split_once("VmHWM:"))
        .and_then(|(_, rest)| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM line in the peak step's log:\n{log}"));
    eprintln!(
        "capture of {printed} bytes: runner peak RSS {} MiB",
        kib / 1024
    );
    assert!(
        kib < 64 * 1024,
        "the runner's peak RSS stays under 64 MiB: {kib} KiB for {printed} bytes of output"
    );

    // The secret never reaches the bundle, in the log or in the transcript.
    let produce = bundle.join("steps/produce/local");
    for name in ["attempt-1.log", "attempt-1.cast"] {
        let text = std::fs::read(produce.join(name)).expect("read");
        let tail = &text[text.len().saturating_sub(4096)..];
        let tail = String::from_utf8_lossy(tail);
        assert!(!tail.contains(SECRET), "{name} shows the secret");
        assert!(
            tail.contains("[REDACTED:token]"),
            "{name} redacted it:\n{tail}"
        );
    }

    let verify = Command::new(BIN)
        .args(["evidence", "verify"])
        .arg(&bundle)
        .env("NO_COLOR", "1")
        .output()
        .expect("run evidence verify");
    assert!(
        verify.status.success(),
        "evidence verify failed:\n{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}
