//! What an assessor relies on: secrets never reach disk in any form, the bundle verifies and
//! any change to it is named, signatures verify with the real `minisign`, transcripts are valid
//! asciicast v2, JUnit and metrics pass the real checkers, and bundles can be listed, shown and
//! exported.

use std::path::Path;
use std::process::Command;

use crate::common::{all_files, find_bundle, read_json, step, Test, BIN};

fn runbook(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .output()
        .expect("runbook")
}

const SECRET: &str = "tok_9f8e7d6c5b4a/x+y";

/// Prints the secret one byte at a time with pauses, then base64-, URL- and JSON-encoded.
const LEAKY: &str = r#"[runbook]
name = "leaky"
[params]
token = { secret = true, env = "API_TOKEN" }
[[steps]]
id = "leak"
env = { T = "{{ params.token }}" }
run = '''
printf '%s\n' "$T" | fold -w1 | while read -r c; do printf '%s' "$c"; sleep 0.01; done; echo
printf '%s' "$T" | base64
printf 'Authorization: Basic %s\n' "$(printf 'admin:%s' "$T" | base64)"
python3 -c 'import json,os,urllib.parse; t=os.environ["T"]; print(urllib.parse.quote(t, safe="")); print(json.dumps({"t": t}))'
echo "$T" > token.txt
'''
collect = ["token.txt"]
"#;

#[test]
fn a_secret_never_reaches_any_bundle_file_in_any_form() {
    let t = Test::new().runbook(LEAKY);
    let dir = t.path().to_path_buf();
    let out = Command::new(BIN)
        .args([
            "run",
            "runbook.toml",
            "--evidence-dir",
            "proof",
            "--no-progress",
            "-v",
        ])
        .current_dir(&dir)
        .env("API_TOKEN", SECRET)
        .env("NO_COLOR", "1")
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bundle = find_bundle(&dir);
    let forms = [
        "tok_9f8e7d6c5b4a",
        "dG9rXzlmOGU3ZDZjNWI0YS94K3k",
        "tok_9f8e7d6c5b4a%2Fx%2By",
        "9f8e7d6c",
    ];
    crate::common::assert_bundle_lacks(&bundle, &forms);
    let console = String::from_utf8_lossy(&out.stderr);
    assert!(
        !console.contains("9f8e7d6c"),
        "the terminal is redacted too: {console}"
    );
    let m = read_json(&bundle.join("manifest.json"));
    let count = m["redactions"]["token"].as_u64().unwrap_or(0);
    assert!(count >= 5, "every printed form was counted: {count}");
    let log = std::fs::read_to_string(bundle.join("steps/leak/local/attempt-1.log")).expect("log");
    assert!(log.contains("out Authorization: Basic [REDACTED:"), "{log}");

    // --fail-on-leak turns the leak into a failed run.
    let out = Command::new(BIN)
        .args([
            "run",
            "runbook.toml",
            "--evidence-dir",
            "proof2",
            "--no-progress",
            "--fail-on-leak",
        ])
        .current_dir(&dir)
        .env("API_TOKEN", SECRET)
        .env("NO_COLOR", "1")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("--fail-on-leak: secrets appeared in step output"));
    let b2 = std::fs::read_dir(dir.join("proof2/leaky"))
        .expect("dir")
        .flatten()
        .find(|e| e.path().is_dir())
        .expect("bundle")
        .path();
    assert_eq!(read_json(&b2.join("manifest.json"))["status"], "failed");
    let v = runbook(&dir, &["evidence", "verify", b2.to_str().expect("utf-8")]);
    assert_eq!(
        v.status.code(),
        Some(0),
        "a leak-failed bundle still verifies: {}",
        String::from_utf8_lossy(&v.stderr)
    );
}

fn simple_bundle() -> (Test, std::path::PathBuf) {
    let t = Test::new().runbook(
        "[runbook]\nname = \"t\"\n[evidence]\nfacts = [\"echo tool 1.2.3\"]\n[[steps]]\nid = \"ok\"\nrun = \"echo hello; echo warn >&2\"\n[[steps]]\nid = \"bad\"\nneeds = [\"ok\"]\nrun = \"echo boom >&2; exit 3\"\ncontinue_on_failure = true\n",
    );
    let out = runbook(
        t.path(),
        &[
            "run",
            "runbook.toml",
            "--evidence-dir",
            "proof",
            "--no-progress",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b = find_bundle(t.path());
    (t, b)
}

#[test]
fn verify_names_every_change() {
    let (t, bundle) = simple_bundle();
    let b = bundle.to_str().expect("utf-8");
    let ok = runbook(t.path(), &["evidence", "verify", b]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let log = bundle.join("steps/ok/local/attempt-1.log");
    let mut data = std::fs::read(&log).expect("log");
    data[40] ^= 1;
    std::fs::write(&log, &data).expect("tamper");
    std::fs::remove_file(bundle.join("junit.xml")).expect("delete");
    std::fs::write(bundle.join("steps/extra.txt"), "added").expect("add");
    let bad = runbook(t.path(), &["evidence", "verify", b]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("steps/ok/local/attempt-1.log: modified"),
        "{stderr}"
    );
    assert!(stderr.contains("junit.xml"), "{stderr}");
    assert!(stderr.contains("steps/extra.txt"), "{stderr}");
}

// Regression: `evidence verify` of a mistyped path or of a plain file said the bundle was
// "never sealed" and exited 3, the code scripts treat as a tampered bundle.
#[test]
fn verify_of_a_path_that_is_not_a_bundle_is_a_usage_error() {
    let t = Test::new()
        .file("plain.toml", "x = 1\n")
        .file("empty/.keep", "");
    for (path, message) in [
        ("nonexist", "error: `nonexist`: no such directory"),
        (
            "plain.toml",
            "error: `plain.toml` is not an evidence bundle (not a directory)",
        ),
        (
            "empty",
            "error: `empty` is not an evidence bundle (no manifest.json, journal.jsonl or SHA256SUMS)",
        ),
    ] {
        let out = runbook(t.path(), &["evidence", "verify", path]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{path}: {stderr}");
        assert!(stderr.contains(message), "{path}: {stderr}");
        assert!(!stderr.contains("never sealed"), "{path}: {stderr}");
    }
}

#[test]
fn signatures_verify_with_minisign_and_with_runbook() {
    let t = Test::new()
        .runbook("[runbook]\nname = \"t\"\n[[steps]]\nid = \"a\"\nrun = \"echo signed\"\n");
    let dir = t.path();
    let k = runbook(dir, &["keygen", "-s", "k.key", "-p", "k.pub"]);
    assert_eq!(
        k.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&k.stderr)
    );
    let run = runbook(
        dir,
        &[
            "run",
            "runbook.toml",
            "--evidence-dir",
            "proof",
            "--sign-key",
            "k.key",
        ],
    );
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let bundle = find_bundle(dir);
    let pubkey = dir.join("k.pub");
    let mini = Command::new("minisign")
        .args(["-Vm", "SHA256SUMS", "-p"])
        .arg(&pubkey)
        .current_dir(&bundle)
        .output()
        .expect("minisign is installed by scripts/test (apt-get install minisign)");
    assert!(
        mini.status.success(),
        "{}",
        String::from_utf8_lossy(&mini.stderr)
    );
    assert!(
        String::from_utf8_lossy(&mini.stdout).contains("run:"),
        "trusted comment names the run"
    );
    let b = bundle.to_str().expect("utf-8");
    let p = pubkey.to_str().expect("utf-8");
    let ok = runbook(dir, &["evidence", "verify", b, "--pubkey", p]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stderr).contains("signature verified"));
    // Rewriting SHA256SUMS consistently with a tampered file still breaks the signature.
    std::fs::write(bundle.join("manifest.json"), "{}").expect("tamper");
    let sums = Command::new("sh").args(["-c", "grep -v ' manifest.json$' SHA256SUMS > s && sha256sum manifest.json >> s && mv s SHA256SUMS"]).current_dir(&bundle).status().expect("sh");
    assert!(sums.success());
    let bad = runbook(dir, &["evidence", "verify", b, "--pubkey", p]);
    assert_eq!(bad.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .to_lowercase()
            .contains("signature"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

// Regression: `keygen -s a.key -p a.key --force` wrote the secret key, overwrote it with the
// public key and exited 0, reporting both as written.
#[test]
fn keygen_refuses_the_same_file_for_both_keys() {
    let t = Test::new();
    let dir = t.path();
    for args in [
        &["keygen", "-s", "a.key", "-p", "a.key", "--force"][..],
        &["keygen", "-s", "a.key", "-p", "./a.key"][..],
    ] {
        let out = runbook(dir, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("`--secret-key` and `--public-key` are the same file"),
            "{stderr}"
        );
        assert!(!dir.join("a.key").exists(), "{args:?}: nothing written");
    }
}

// Regression: with the public key file already there, keygen exited 2 but left the new secret
// key behind, and the next attempt was then refused because of that leftover.
#[test]
fn keygen_writes_both_keys_or_neither() {
    use std::os::unix::fs::PermissionsExt;
    let t = Test::new().file("b.pub", "ORIGINAL\n");
    let dir = t.path();
    let out = runbook(dir, &["keygen", "-s", "b.key", "-p", "b.pub"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("`b.pub` already exists; pass `--force` to overwrite it"),
        "{stderr}"
    );
    assert!(!dir.join("b.key").exists(), "no secret key left behind");
    assert_eq!(
        std::fs::read_to_string(dir.join("b.pub")).expect("read"),
        "ORIGINAL\n"
    );
    let out = runbook(dir, &["keygen", "-s", "b.key", "-p", "b.pub", "--force"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = std::fs::read_to_string(dir.join("b.pub")).expect("read");
    assert!(public.contains("minisign public key"), "{public}");
    let mode = std::fs::metadata(dir.join("b.key"))
        .expect("secret key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

// Regression: `evidence repair` of a sound, sealed and signed bundle rebuilt it, removed its
// signature (which cannot be made again without the key) and exited 0.
#[test]
fn repair_refuses_a_sealed_bundle_and_says_when_it_drops_a_signature() {
    let t = Test::new()
        .runbook("[runbook]\nname = \"t\"\n[[steps]]\nid = \"a\"\nrun = \"echo signed\"\n");
    let dir = t.path();
    let ok = |out: &std::process::Output| {
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(&runbook(dir, &["keygen", "-s", "k.key", "-p", "k.pub"]));
    ok(&runbook(
        dir,
        &[
            "run",
            "runbook.toml",
            "--evidence-dir",
            "proof",
            "--sign-key",
            "k.key",
        ],
    ));
    let bundle = find_bundle(dir);
    let b = bundle.to_str().expect("utf-8");
    let verify = || runbook(dir, &["evidence", "verify", b, "--pubkey", "k.pub"]);

    let refused = runbook(dir, &["evidence", "repair", b]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    for needle in [
        "has nothing to repair",
        "`repair` is for interrupted bundles",
        "drop the bundle's signature",
        "--force",
    ] {
        assert!(stderr.contains(needle), "{needle:?} in {stderr}");
    }
    ok(&verify());

    // --force with the key: repaired and signed again.
    ok(&runbook(
        dir,
        &["evidence", "repair", b, "--force", "--sign-key", "k.key"],
    ));
    ok(&verify());

    // --force without it: repaired, and loud about the signature it dropped.
    let forced = runbook(dir, &["evidence", "repair", b, "--force"]);
    ok(&forced);
    let stderr = String::from_utf8_lossy(&forced.stderr);
    assert!(
        stderr.contains("warning: the bundle's signature was REMOVED")
            && stderr.contains("--sign-key KEY"),
        "{stderr}"
    );
    assert!(!bundle.join("SHA256SUMS.minisig").exists());
    assert_eq!(
        verify().status.code(),
        Some(3),
        "a key was given, no signature"
    );
    ok(&runbook(dir, &["evidence", "verify", b]));
}

#[test]
fn transcripts_are_asciicast_v2() {
    let (_t, bundle) = simple_bundle();
    for id in ["ok", "bad"] {
        let text = std::fs::read_to_string(bundle.join(format!("steps/{id}/local/attempt-1.cast")))
            .expect("cast");
        let mut lines = text.lines();
        let header: serde_json::Value =
            serde_json::from_str(lines.next().expect("header")).expect("header JSON");
        assert_eq!(header["version"], 2);
        assert!(
            header["width"].as_u64().is_some()
                && header["height"].as_u64().is_some()
                && header["timestamp"].as_u64().is_some()
        );
        let mut last = 0.0;
        let mut all = String::new();
        for l in lines {
            let ev: serde_json::Value = serde_json::from_str(l).expect("event JSON");
            let t = ev[0].as_f64().expect("time");
            assert!(t >= last, "time goes forward");
            last = t;
            assert_eq!(ev[1], "o");
            all.push_str(ev[2].as_str().expect("data"));
        }
        let first = all.lines().next().unwrap_or("");
        assert!(
            first.contains('$') && first.contains("echo"),
            "the command comes first: {all:?}"
        );
        if id == "bad" {
            assert!(
                all.contains("\u{1b}[31mboom"),
                "stderr is shown in red: {all:?}"
            );
        }
    }
    let out = Command::new("script")
        .arg("-qec")
        .arg(format!(
            "asciinema cat '{}'",
            bundle.join("steps/ok/local/attempt-1.cast").display()
        ))
        .arg("/dev/null")
        .output()
        .expect("asciinema is installed by scripts/test (apt-get install asciinema)");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hello"),
        "{out:?}"
    );
}

#[test]
fn junit_and_metrics_pass_the_real_checkers() {
    let (_t, bundle) = simple_bundle();
    let junit = bundle.join("junit.xml");
    let x = Command::new("xmllint")
        .arg("--noout")
        .arg(&junit)
        .output()
        .expect("xmllint (apt-get install libxml2-utils)");
    assert!(x.status.success(), "{}", String::from_utf8_lossy(&x.stderr));
    let text = std::fs::read_to_string(&junit).expect("junit");
    assert_eq!(text.matches("<testcase ").count(), 2);
    assert!(text.contains("<failure") && text.contains("boom"), "{text}");
    let metrics = std::fs::read(bundle.join("metrics.prom")).expect("metrics");
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus)");
    std::io::Write::write_all(&mut p.stdin.take().expect("stdin"), &metrics).expect("feed");
    let out = p.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&metrics);
    assert!(
        text.contains("runbook_step_duration_seconds{runbook=\"t\",step=\"ok\"}"),
        "{text}"
    );
    let report = std::fs::read_to_string(bundle.join("report.html")).expect("report");
    assert!(
        report.contains("<html") && !report.contains("http://") && !report.contains("https://"),
        "self-contained"
    );
}

#[test]
fn context_records_facts_and_the_git_commit() {
    let t = Test::new().runbook("[runbook]\nname = \"t\"\n[evidence]\nfacts = [\"echo tool 1.2.3\"]\n[[steps]]\nid = \"a\"\nrun = \"true\"\n");
    let dir = t.path();
    for args in [
        vec!["init", "-q"],
        vec!["add", "runbook.toml"],
        vec![
            "-c",
            "user.email=a@b",
            "-c",
            "user.name=a",
            "commit",
            "-qm",
            "x",
        ],
    ] {
        assert!(Command::new("git")
            .args(&args)
            .current_dir(dir)
            .status()
            .expect("git")
            .success());
    }
    let run = runbook(dir, &["run", "runbook.toml", "--evidence-dir", "proof"]);
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let m = read_json(&find_bundle(dir).join("manifest.json"));
    assert_eq!(m["context"]["facts"][0]["output"], "tool 1.2.3");
    assert_eq!(
        m["context"]["git"]["commit"].as_str().map(str::len),
        Some(40)
    );
    assert!(m["context"]["time"]["local_offset"].is_string());
}

#[test]
fn bundles_can_be_listed_shown_and_exported() {
    let (t, bundle) = simple_bundle();
    let dir = t.path();
    let list = runbook(dir, &["evidence", "list", "proof"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("succeeded") && text.contains("1 bundle(s)"),
        "{text}"
    );
    let b = bundle.to_str().expect("utf-8");
    let show = runbook(dir, &["evidence", "show", b]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains("bad") && text.contains("exit code 3"),
        "{text}"
    );
    let export = runbook(dir, &["evidence", "export", b, "-o", "out.tar.gz"]);
    assert_eq!(
        export.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    std::fs::create_dir(dir.join("unpacked")).expect("mkdir");
    assert!(Command::new("tar")
        .args(["-xzf", "out.tar.gz", "-C", "unpacked"])
        .current_dir(dir)
        .status()
        .expect("tar")
        .success());
    let name = bundle.file_name().expect("name");
    let sums = Command::new("sha256sum")
        .args(["--quiet", "-c", "SHA256SUMS"])
        .current_dir(dir.join("unpacked").join(name))
        .status()
        .expect("sha256sum");
    assert!(sums.success());
    let _ = step(&read_json(&bundle.join("manifest.json")), "ok");
}

// Regression: `evidence export -o FILE` silently replaced an existing FILE.
#[test]
fn export_does_not_overwrite_a_file_without_force() {
    let (t, bundle) = simple_bundle();
    let dir = t.path();
    std::fs::write(dir.join("out.tar.gz"), "precious").expect("write");
    let b = bundle.to_str().expect("utf-8");
    let out = runbook(dir, &["evidence", "export", b, "-o", "out.tar.gz"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("`out.tar.gz` already exists; pass `--force` to overwrite it"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("out.tar.gz")).expect("read"),
        "precious"
    );
    let out = runbook(
        dir,
        &["evidence", "export", b, "-o", "out.tar.gz", "--force"],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = std::fs::read(dir.join("out.tar.gz")).expect("read");
    assert_eq!(&data[..2], b"\x1f\x8b", "a gzip file replaced it");
}

#[test]
fn the_report_opens_in_headless_chromium_and_shows_the_verdict() {
    let (t, bundle) = simple_bundle();
    let profile = t.path().join("chromium-profile");
    let url = format!("file://{}", bundle.join("report.html").display());
    let flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ];
    let dom = Command::new("chromium")
        .args(flags)
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", &url])
        .output()
        .expect("chromium is installed by scripts/test (apt-get install chromium)");
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    // The run tolerated its failing step: the verdict says succeeded, and the failure is shown.
    assert!(
        html.to_uppercase().contains("SUCCEEDED"),
        "verdict rendered"
    );
    assert!(html.contains("exit code 3"), "the failed step is explained");
    let shot = t.path().join("report.png");
    let png = Command::new("chromium")
        .args(flags)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", shot.display()))
        .args(["--window-size=1280,1000", &url])
        .output()
        .expect("chromium");
    assert!(
        png.status.success(),
        "{}",
        String::from_utf8_lossy(&png.stderr)
    );
    let data = std::fs::read(&shot).expect("screenshot written");
    assert!(
        data.starts_with(b"\x89PNG") && data.len() > 20_000,
        "a real, non-blank screenshot"
    );
}

#[test]
fn secrets_recognised_by_shape_are_redacted_everywhere() {
    let toml = r#"[runbook]
name = "shapes"
[evidence]
redact = ['db_password=(?P<v>\S+)']
[[steps]]
id = "print"
run = '''
echo "curl -H 'Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.sig123' https://api"
printf -- '-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUtc2VjcmV0\nQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSU5vdA\n-----END OPENSSH PRIVATE KEY-----\n'
echo "connecting with db_password=Tr0ub4dor&3 now"
echo visible
'''
"#;
    let t = Test::new().runbook(toml);
    let out = runbook(
        t.path(),
        &[
            "run",
            "runbook.toml",
            "--evidence-dir",
            "proof",
            "--no-progress",
            "-v",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bundle = find_bundle(t.path());
    // The runbook copy is exact (its sha256 is the evidence); here it holds the literals itself.
    for f in all_files(&bundle)
        .into_iter()
        .filter(|f| !f.starts_with(bundle.join("runbook")))
    {
        let text = String::from_utf8_lossy(&std::fs::read(&f).expect("read")).into_owned();
        for leaked in [
            "eyJhbGciOiJIUzI1NiJ9",
            "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUtc2VjcmV0",
            "QUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSU5vdA",
            "Tr0ub4dor",
        ] {
            assert!(!text.contains(leaked), "`{leaked}` in {}", f.display());
        }
    }
    let console = String::from_utf8_lossy(&out.stderr);
    assert!(
        !console.contains("Tr0ub4dor") && !console.contains("eyJhbGci"),
        "{console}"
    );
    let log = std::fs::read_to_string(bundle.join("steps/print/local/attempt-1.log")).expect("log");
    assert!(log.contains("out visible"), "{log}");
    assert!(
        log.contains("[REDACTED:private-key]") && log.contains("[REDACTED:pattern-1]"),
        "{log}"
    );
    let m = read_json(&bundle.join("manifest.json"));
    assert!(
        m["redactions"]["private-key"].as_u64().unwrap_or(0) >= 1,
        "{}",
        m["redactions"]
    );

    let bad = Test::new()
        .runbook("[runbook]\nname = \"t\"\n[evidence]\nredact = ['(unclosed']\n[[steps]]\nid = \"a\"\nrun = \"true\"\n")
        .args(["check", "runbook.toml"])
        .run();
    bad.assert_code(2)
        .assert_stderr_contains("runbook.toml:4:11")
        .assert_stderr_contains("not a valid regular expression");
}
