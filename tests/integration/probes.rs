//! Probes and screenshots through the real binary against real servers on 127.0.0.1: `until`
//! polling an endpoint that becomes ready, a deadline that expires, a TCP port that opens
//! late, HTTPS with a private CA, a screenshot of a page behind a bearer token — and the token
//! absent from every file of every bundle.

#[path = "../../steps/tests/support/httpd.rs"]
mod httpd;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use httpd::{Httpd, Pki, Response, Server};
use serde_json::Value;

use crate::common::{all_files, step, Output, Test};

const TOKEN: &str = "tok-9f8e7d6c5b4a-probe-sekrit";

/// A server running on its own runtime while the test blocks on the binary.
struct Running {
    server: Server,
    _rt: tokio::runtime::Runtime,
}

fn serve(httpd: Httpd) -> Running {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let server = rt.block_on(httpd.start());
    Running { server, _rt: rt }
}

/// `runbook run runbook.toml` with the token in `API_TOKEN` and `--set` pairs.
fn run(toml: &str, sets: &[(&str, &str)]) -> Output {
    let mut t = Test::new().runbook(toml).env("API_TOKEN", TOKEN).run_args();
    for (k, v) in sets {
        t = t.args(["--set".to_owned(), format!("{k}={v}")]);
    }
    t.run()
}

/// Neither stdout, stderr nor any file of the bundle holds `secret` (binary files too).
#[track_caller]
fn assert_absent(out: &Output, secret: &str) {
    assert!(!out.stdout.contains(secret), "stdout leaks the secret");
    assert!(!out.stderr.contains(secret), "stderr leaks the secret");
    let files = all_files(&out.bundle());
    assert!(files.len() > 3, "bundle has files: {files:?}");
    for f in files {
        let bytes = std::fs::read(&f).expect("read bundle file");
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{} leaks the secret",
            f.display()
        );
    }
}

fn attempts(manifest: &Value, id: &str) -> Vec<Value> {
    step(manifest, id)["attempts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

const POLL: &str = r#"
[runbook]
name = "probes"
[params]
url = {}
token = { secret = true, env = "API_TOKEN" }
[[steps]]
id = "ready"
http = { url = "{{ params.url }}", bearer = "{{ params.token }}" }
retry = { attempts = 1000, delay = "50ms", deadline = "{{ params.deadline }}" }
until = 'output.json.ready == true'
outputs = { version = 'output.json.version' }
[[steps]]
id = "after"
needs = ["ready"]
run = "echo ready at version {{ steps.ready.outputs.version }}"
"#;

#[test]
fn until_polls_an_endpoint_that_becomes_ready_and_the_token_stays_out_of_the_evidence() {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let srv = serve(Httpd::new().route("/readyz", move |req| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        // The server echoes the credential back, as some APIs do in errors.
        let auth = req.header("authorization").unwrap_or("").to_owned();
        if n < 5 {
            Response::json(
                200,
                &serde_json::json!({ "ready": false, "seen": auth, "n": n }),
            )
        } else {
            Response::json(
                200,
                &serde_json::json!({ "ready": true, "version": "v1.31.4", "seen": auth }),
            )
            .header("x-echo", &auth)
        }
    }));
    let toml = POLL.replace("{{ params.deadline }}", "60s");
    let out = run(&toml, &[("url", &srv.server.url("/readyz"))]);
    out.assert_code(0);

    let reqs = srv.server.requests();
    assert_eq!(reqs.len(), 5, "polled until ready, then stopped");
    for r in &reqs {
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {TOKEN}").as_str())
        );
    }
    let m = out.manifest();
    let tries = attempts(&m, "ready");
    assert_eq!(tries.len(), 5, "one attempt per request: {tries:#?}");
    // Polling is recorded compactly: every attempt in the manifest and journal, but only the
    // final response keeps its log file, in full.
    let logs: Vec<_> = all_files(&out.bundle().join("steps/ready"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    assert_eq!(logs.len(), 1, "one log for five probe attempts: {logs:?}");
    let last = std::fs::read_to_string(&logs[0]).expect("final log");
    assert!(last.contains("v1.31.4"), "final body kept in full:\n{last}");
    assert!(
        last.contains("<redacted>"),
        "credential shown redacted:\n{last}"
    );
    let started = out
        .journal()
        .iter()
        .filter(|e| e["event"] == "attempt_started" && e["step"] == "ready")
        .count();
    assert_eq!(started, 5, "one journal event per attempt");
    assert!(
        std::fs::read_to_string(out.bundle().join("steps/after/local/attempt-1.log"))
            .expect("after log")
            .contains("ready at version v1.31.4"),
        "outputs of the final response reach later steps"
    );
    assert_absent(&out, TOKEN);
}

#[test]
fn a_deadline_ends_the_polling_with_a_clear_failure() {
    let srv = serve(Httpd::new().route("/readyz", |_| {
        Response::json(200, &serde_json::json!({ "ready": false }))
    }));
    let toml = POLL.replace("{{ params.deadline }}", "1500ms");
    let out = run(&toml, &[("url", &srv.server.url("/readyz"))]);
    assert_ne!(out.code, 0, "a missed deadline fails the run");
    let n = srv.server.requests().len();
    // 50 ms apart for 1.5 s: it polled more than once and stopped long before 1000 attempts.
    assert!((2..200).contains(&n), "{n} requests");
    let m = out.manifest();
    let ready = step(&m, "ready");
    assert_eq!(ready["status"], "failed", "{ready:#}");
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.contains("deadline") && text.contains("ready"),
        "the failure names the step and the deadline:\n{text}"
    );
    assert_eq!(step(&m, "after")["status"], "skipped");
    // The console shows the wait, not every poll: the first attempt and its failure, then
    // the end (a line every 30 s while the same failure repeats).
    let shown = out.stderr.matches("! ready attempt").count();
    assert_eq!(shown, 1, "{n} polls, one failure line:\n{}", out.stderr);
    assert_eq!(out.stderr.matches("▶ ready attempt").count(), 1);
    assert_absent(&out, TOKEN);
}

#[test]
fn a_tcp_probe_waits_for_a_port_that_opens_later() {
    let port = httpd::closed_port();
    let (done, finished) = std::sync::mpsc::channel::<()>();
    // Open the port after the first probes have certainly been refused, and keep it open
    // (the kernel completes the handshake from the backlog) until the run is over.
    let opener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind late");
        let _ = finished.recv();
        drop(listener);
    });
    let out = Test::new()
        .runbook(&format!(
            r#"
[runbook]
name = "tcp"
[[steps]]
id = "ssh-port"
tcp = {{ host = "127.0.0.1", port = {port}, timeout = "1s" }}
retry = {{ attempts = 400, delay = "50ms", deadline = "30s" }}
"#
        ))
        .run_args()
        .run();
    drop(done);
    let _ = opener.join();
    out.assert_code(0);
    let m = out.manifest();
    let tries = attempts(&m, "ssh-port");
    assert!(
        tries.len() >= 2,
        "refused first, then connected: {tries:#?}"
    );
    let first = &tries[0];
    assert_eq!(first["outcome"]["failure"], "refused", "{first:#}");
}

#[test]
fn https_with_a_private_ca_records_the_peer_and_without_it_fails_as_tls() {
    let pki = Pki::new("runbook test CA");
    let leaf = pki.server("server", &["127.0.0.1"]);
    let srv = serve(
        Httpd::new()
            .route("/healthz", |_| Response::text(200, "ok"))
            .tls(&leaf),
    );
    let toml = format!(
        r#"
[runbook]
name = "tls"
[params]
url = {{}}
[[steps]]
id = "with-ca"
http = {{ url = "{{{{ params.url }}}}", ca_file = "{}" }}
check = 'output.tls.subject != ""'
[[steps]]
id = "without-ca"
http = {{ url = "{{{{ params.url }}}}" }}
retry = {{ attempts = 3, delay = "10ms" }}
"#,
        pki.ca_file.display()
    );
    let out = run(&toml, &[("url", &srv.server.url("/healthz"))]);
    assert_ne!(out.code, 0);
    let m = out.manifest();
    assert_eq!(step(&m, "with-ca")["status"], "succeeded");
    let log = std::fs::read_to_string(out.bundle().join("steps/with-ca/local/attempt-1.log"))
        .expect("with-ca log");
    assert!(log.contains("* tls peer: subject"), "{log}");
    assert!(log.contains("sha256"), "{log}");
    let without = attempts(&m, "without-ca");
    assert_eq!(
        without.len(),
        1,
        "a TLS failure is not retried: {without:#?}"
    );
    assert_eq!(without[0]["outcome"]["failure"], "tls");
    let why = without[0]["outcome"]["message"].as_str().unwrap_or("");
    assert!(why.contains("unknown issuer"), "{why}");
}

/// A page that renders its content late, behind a bearer token.
const LATE_PAGE: &str = r#"<!doctype html><html><body style="margin:0;background:#fff">
<p>loading…</p>
<script>
setTimeout(() => {
  const d = document.createElement('div');
  d.id = 'late';
  d.style = 'position:fixed;left:0;top:0;width:100vw;height:100vh;background:rgb(30,120,200)';
  document.body.appendChild(d);
}, 800);
</script></body></html>"#;

/// A decoded PNG: width, height and the RGB of its centre pixel.
fn decode_png(path: &Path) -> (u32, u32, [u8; 3]) {
    let file = std::fs::File::open(path).expect("png");
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .expect("a valid PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("frame");
    let channels = info.color_type.samples();
    let (w, h) = (info.width, info.height);
    let at = ((h / 2) * w + w / 2) as usize * channels;
    (w, h, [buf[at], buf[at + 1], buf[at + 2]])
}

#[test]
fn a_screenshot_behind_a_token_lands_in_the_bundle_dated_and_digested() {
    let srv = serve(Httpd::new().route("/dashboard", |req| {
        if req.header("authorization") == Some(&format!("Bearer {TOKEN}")) {
            Response::new(200)
                .header("content-type", "text/html")
                .body(LATE_PAGE.as_bytes().to_vec())
        } else {
            Response::text(401, "no token")
        }
    }));
    let toml = r##"
[runbook]
name = "shots"
[params]
url = {}
token = { secret = true, env = "API_TOKEN" }
[[steps]]
id = "panel"
screenshot = { url = "{{ params.url }}", width = 640, height = 360, wait_for = "#late",
               headers = { Authorization = "Bearer {{ params.token }}" }, timeout = "40s" }
"##;
    let out = run(toml, &[("url", &srv.server.url("/dashboard"))]);
    out.assert_code(0);
    let dir = out.bundle().join("steps/panel/local");
    let png = dir.join("attempt-1.png");
    let (w, h, centre) = decode_png(&png);
    assert_eq!((w, h), (640, 360));
    // The blue block appears 0.8 s after load: it is in the picture only if `wait_for` waited.
    assert_eq!(centre, [30, 120, 200], "the late content was captured");
    let sidecar: Value = all_files(&dir)
        .into_iter()
        .find(|p| p.to_string_lossy().ends_with(".png.json"))
        .map(|p| crate::common::read_json(&p))
        .expect("sidecar next to the PNG");
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(std::fs::read(&png).expect("png")));
    assert_eq!(sidecar["sha256"], digest, "{sidecar:#}");
    assert_eq!(sidecar["http_status"], 200, "{sidecar:#}");
    assert!(sidecar["captured_at"].is_string(), "{sidecar:#}");
    // The report shows it inline, and the manifest digests it like every other file.
    let report = std::fs::read_to_string(out.bundle().join("report.html")).expect("report");
    assert!(
        report.contains("attempt-1.png") && report.contains("<img"),
        "report shows the screenshot"
    );
    let manifest = std::fs::read_to_string(out.bundle().join("manifest.json")).expect("m");
    assert!(manifest.contains(&digest), "manifest digests the PNG");
    assert_absent(&out, TOKEN);
}

#[test]
fn a_screenshot_that_times_out_leaves_no_browser_behind() {
    let srv = serve(Httpd::new().route("/slow", |_| {
        Response::new(200)
            .header("content-type", "text/html")
            .body(b"<!doctype html><p>never ready</p>".to_vec())
    }));
    let tmp = tempfile::tempdir().expect("tmp");
    let out = Test::new()
        .runbook(
            r##"
[runbook]
name = "shots"
[params]
url = {}
[[steps]]
id = "panel"
screenshot = { url = "{{ params.url }}", wait_for = "#never", timeout = "3s" }
retry = { attempts = 2, delay = "10ms" }
"##,
        )
        // Chromium's throwaway profile lives under TMPDIR, so its processes are findable.
        .env("TMPDIR", tmp.path().to_str().expect("utf-8"))
        .run_args()
        .args(["--set", &format!("url={}", srv.server.url("/slow"))])
        .run();
    assert_ne!(out.code, 0);
    let m = out.manifest();
    let tries = attempts(&m, "panel");
    assert_eq!(tries.len(), 2, "a wait timeout is retried: {tries:#?}");
    let why = tries[1]["outcome"]["message"].as_str().unwrap_or("");
    assert!(why.contains("#never"), "names the selector: {why}");
    let left = crate::common::processes_matching(&tmp.path().to_string_lossy());
    assert!(left.is_empty(), "browser processes left behind: {left:?}");
    let profiles: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("tmp")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(profiles.is_empty(), "profiles left behind: {profiles:?}");
}

#[test]
fn check_warns_when_a_runbook_takes_screenshots_and_no_browser_is_found() {
    let out = Test::new()
        .runbook(
            r#"
[runbook]
name = "shots"
[[steps]]
id = "panel"
screenshot = { url = "http://127.0.0.1:9/" }
"#,
        )
        .env("PATH", "/nonexistent")
        .env("RUNBOOK_CHROMIUM", "")
        .args(["check", "runbook.toml"])
        .run();
    out.assert_code(0);
    out.assert_stderr_contains("takes screenshots but no browser was found");
    out.assert_stderr_contains("apt-get install chromium");
}
