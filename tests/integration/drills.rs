//! `[drill]` end to end: measured RTO against the truth, the exit status of a missed
//! objective, RPO from a step's output, and the verdict in the manifest, report, JUnit and
//! metrics (checked with promtool and xmllint).

use std::process::{Command, Stdio};

use crate::common::run_runbook;

fn drill(rto: &str) -> String {
    format!(
        r#"
[runbook]
name = "restore-drill"
[drill]
rto = "{rto}"
rpo = "2h"
clock_start = "declare-disaster"
clock_stop = "service-healthy"
restored_data_time = 'steps["restore"].outputs.backup_time'
[[steps]]
id = "prepare"
run = "sleep 0.3"
[[steps]]
id = "declare-disaster"
needs = ["prepare"]
run = "sleep 0.4"
[[steps]]
id = "restore"
needs = ["declare-disaster"]
run = "sleep 0.6; date -u -d '-30 minutes' +%Y-%m-%dT%H:%M:%SZ"
outputs = {{ backup_time = "output.stdout.trim()" }}
[[steps]]
id = "service-healthy"
needs = ["restore"]
run = "sleep 0.2"
"#
    )
}

fn promtool_ok(text: &[u8]) {
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus)");
    std::io::Write::write_all(&mut p.stdin.take().expect("stdin"), text).expect("feed");
    let out = p.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_drill_within_its_objectives_passes_with_measured_values() {
    let out = run_runbook(&drill("1m"), &[]);
    out.assert_code(0);
    let m = out.manifest();
    let d = &m["drill"];
    assert_eq!(d["verdict"], "pass", "{d}");
    let rto = d["rto"]["measured_seconds"].as_f64().expect("measured");
    // declare (0.4 s) + restore (0.6 s) + healthy (0.2 s) = 1.2 s of the truth; `prepare`
    // runs before the clock. Generous upper bound: process start-up on a busy machine.
    assert!((1.2..4.0).contains(&rto), "measured RTO {rto}");
    assert_eq!(d["rto"]["target_seconds"], 60.0);
    let rpo = d["rpo"]["measured_seconds"].as_f64().expect("rpo");
    assert!(
        (1790.0..1900.0).contains(&rpo),
        "RPO {rpo} (backup 30 min old)"
    );
    assert_eq!(d["rpo"]["verdict"], "pass");
    let bundle = out.bundle();
    let metrics = std::fs::read(bundle.join("metrics.prom")).expect("metrics");
    promtool_ok(&metrics);
    let text = String::from_utf8_lossy(&metrics);
    for name in [
        "runbook_drill_rto_seconds{runbook=\"restore-drill\"}",
        "runbook_drill_rto_target_seconds{runbook=\"restore-drill\"} 60",
        "runbook_drill_rpo_seconds{runbook=\"restore-drill\"}",
        "runbook_drill_verdict{runbook=\"restore-drill\",verdict=\"pass\"} 1",
        "runbook_drill_last_success_timestamp_seconds{runbook=\"restore-drill\"}",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    let report = std::fs::read_to_string(bundle.join("report.html")).expect("report");
    assert!(
        report.contains("<section id=\"drill\">"),
        "no drill section"
    );
    let junit = std::fs::read_to_string(bundle.join("junit.xml")).expect("junit");
    assert!(junit.contains("name=\"drill RTO\""), "{junit}");
    assert!(!junit.contains("type=\"objective\""), "{junit}");
}

#[test]
fn a_missed_rto_is_a_failed_drill_with_exit_code_5() {
    let out = run_runbook(&drill("500ms"), &[]);
    out.assert_code(5)
        .assert_stderr_contains("recovery objectives were not met");
    let m = out.manifest();
    assert_eq!(m["status"], "succeeded", "every step succeeded");
    assert_eq!(m["drill"]["verdict"], "fail");
    assert_eq!(m["drill"]["rto"]["verdict"], "fail");
    let why = m["drill"]["rto"]["why"].as_str().unwrap_or_default();
    assert!(why.contains("over the target"), "{why}");
    let bundle = out.bundle();
    let junit = std::fs::read_to_string(bundle.join("junit.xml")).expect("junit");
    assert!(junit.contains("type=\"objective\""), "{junit}");
    let x = Command::new("xmllint")
        .args(["--noout"])
        .arg(bundle.join("junit.xml"))
        .output()
        .expect("xmllint (apt-get install libxml2-utils)");
    assert!(x.status.success(), "{}", String::from_utf8_lossy(&x.stderr));
    let metrics = std::fs::read(bundle.join("metrics.prom")).expect("metrics");
    promtool_ok(&metrics);
    assert!(String::from_utf8_lossy(&metrics)
        .contains("runbook_drill_verdict{runbook=\"restore-drill\",verdict=\"fail\"} 1"));
}

#[test]
fn a_drill_that_fails_a_step_is_a_failed_run_and_says_why_nothing_was_measured() {
    let rb = drill("1m").replace("run = \"sleep 0.2\"", "run = \"exit 3\"");
    let out = run_runbook(&rb, &[]);
    out.assert_code(1);
    let m = out.manifest();
    assert_eq!(m["drill"]["verdict"], "not_measured");
    let why = m["drill"]["rto"]["why"].as_str().unwrap_or_default();
    assert!(why.contains("never stopped"), "{why}");
}

#[test]
fn hook_calls_start_and_stop_the_clock() {
    let out = run_runbook(
        r#"
[runbook]
name = "hook-clock"
[drill]
rto = "1m"
[hooks]
before_step = 'if step.id == "b" { drill.start_clock() }'
after_step = 'if step.id == "c" { drill.stop_clock() }'
[[steps]]
id = "a"
run = "sleep 0.3"
[[steps]]
id = "b"
needs = ["a"]
run = "sleep 0.3"
[[steps]]
id = "c"
needs = ["b"]
run = "sleep 0.3"
"#,
        &[],
    );
    out.assert_code(0);
    let m = out.manifest();
    let rto = m["drill"]["rto"]["measured_seconds"]
        .as_f64()
        .expect("measured");
    assert!((0.6..3.0).contains(&rto), "{rto}");
    let clocks = out
        .journal()
        .iter()
        .filter(|e| e["event"] == "clock")
        .count();
    assert_eq!(clocks, 2);
}
