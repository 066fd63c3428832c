//! The report's tests (fixtures: `crate::test_support`).

use super::test_support::*;
use super::*;

#[test]
fn report_shows_verdict_failures_and_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = failed_run(dir.path());
    let html = render_report(&m, dir.path()).expect("render");
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("<header class=\"verdict v-fail\">"));
    assert!(html.contains("<div class=\"badge-big\">FAILED</div>"));
    // Title escaped.
    assert!(html.contains("DB restore drill &lt;prod&gt; &amp; &quot;friends&quot;"));
    assert!(!html.contains("<prod>"));
    // What failed: the failed and cancelled steps, with reasons, linked to their details.
    let failures = &html[html.find("id=\"failures\"").expect("failures")..];
    let failures = &failures[..failures.find("</section>").expect("end")];
    assert!(failures.contains("href=\"#step-restore\""));
    assert!(failures.contains("exit code 3 (after 2 attempts)"));
    assert!(failures.contains("href=\"#step-notify\""));
    assert!(failures.contains("relation &quot;orders&quot; does not exist"));
    assert!(!failures.contains("href=\"#step-fetch\""));
    // Details: failed steps open, logs escaped, stderr marked, control chars made visible.
    assert!(html.contains("<details id=\"step-restore\" class=\"step c-fail\" open>"));
    assert!(html.contains("<details id=\"step-fetch\" class=\"step c-ok\">"));
    assert!(html.contains("&lt;42 MB&gt; &amp; verified"));
    assert!(html.contains("<span class=\"l e\">"));
    assert!(html.contains("café \u{fffd}\u{fffd} ^A^Gbell green ]]&gt; &lt;/pre&gt;"));
    assert!(!html.contains('\x1b'));
    // Timeline bars: restore's first attempt starts at 2.1 s of 10.25 s.
    assert!(html.contains("left:20.488%"));
    // Params (already redacted), collected files, notes, footer.
    assert!(html.contains("[REDACTED:token]"));
    assert!(html.contains(&"cd".repeat(32)));
    assert!(html.contains("No such file or directory"));
    assert!(html.contains("logs under steps/restore/"));
    assert!(html.contains("sha256sum -c SHA256SUMS"));
    assert!(html.contains("@media print"));
    // Nothing is fetched: no external URLs other than the ref link, a CSP forbids loading.
    assert!(html.contains("default-src 'none'"));
    for bad in [
        "src=\"http",
        "url(http",
        "@import",
        "<link rel=\"stylesheet\"",
    ] {
        assert!(!html.contains(bad), "{bad}");
    }
    assert!(!html.contains("id=\"drill\""));
}

#[test]
fn report_for_a_succeeded_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = succeeded_run(dir.path());
    let html = render_report(&m, dir.path()).expect("render");
    assert!(html.contains("<div class=\"badge-big\">SUCCEEDED</div>"));
    assert!(html.contains("1 of 1 steps succeeded."));
    assert!(!html.contains("id=\"failures\""));
    assert!(html.contains("No files were collected."));
}

#[test]
fn missing_logs_are_noted_not_fatal_and_long_logs_are_truncated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut m = succeeded_run(dir.path());
    m.steps[0].attempts[0].log = "steps/only/local/missing.log".into();
    let html = render_report(&m, dir.path()).expect("render");
    assert!(html.contains("The log file steps/only/local/missing.log is not in the bundle."));

    let m = succeeded_run(dir.path());
    let mut big = String::new();
    for i in 0..3000 {
        big.push_str(&format!("2026-08-20T10:00:00.000Z out line {i}\n"));
    }
    std::fs::write(dir.path().join("steps/only/local/attempt-1.log"), big).expect("w");
    let html = render_report(&m, dir.path()).expect("render");
    assert!(html.contains("only the last 2000 lines"));
    assert!(html.contains("line 2999"));
    assert!(html.contains(">line 1000\n<"));
    assert!(!html.contains(">line 999\n<"));
}

#[test]
fn extra_manifest_sections_render_when_present() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = succeeded_run(dir.path());
    let mut v = serde_json::to_value(&m).expect("json");
    v["approvals"] = serde_json::json!([
        {"at": "2026-08-20T10:00:00Z", "step": "only", "by": "carol", "granted": true}
    ]);
    if let Ok(m2) = serde_json::from_value::<Manifest>(v) {
        let html = render_report(&m2, dir.path()).expect("render");
        if serde_json::to_value(&m2)
            .expect("json")
            .get("approvals")
            .is_some()
        {
            assert!(html.contains("<section id=\"approvals\">"));
            assert!(html.contains("carol"));
        }
    }
}
