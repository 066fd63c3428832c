//! `runbook schedule`: the scheduler firing real `runbook run` children on per-second crons,
//! overlap and catch-up, shutdown on SIGTERM, metrics (textfile and HTTP, checked by
//! `promtool`), webhooks to a loopback server, `list`, and exports checked by
//! `systemd-analyze verify` and a YAML parser. No assertion depends on timing beyond ranges
//! that hold on a loaded machine.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{processes_matching, read_json, unique_marker, Test};

fn runbook(name: &str, run: &str) -> String {
    format!("[runbook]\nname = \"{name}\"\n\n[[steps]]\nid = \"work\"\nrun = \"{run}\"\n")
}

/// Every bundle under `dir/proof/*/`.
fn bundles(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rbs) = std::fs::read_dir(dir.join("proof")) else {
        return out;
    };
    for rb in rbs {
        for b in std::fs::read_dir(rb.expect("entry").path()).expect("runbook dir") {
            let p = b.expect("entry").path();
            if p.is_dir() {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn lines_with(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

#[track_caller]
fn promtool_accepts(text: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        panic!("promtool is not installed: `apt-get install prometheus` (scripts/test does)");
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool: {}{}\n--- metrics\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_per_second_cron_fires_once_a_second() {
    let out = Test::new()
        .file("drill.toml", &runbook("tick", "echo tick"))
        .file(
            "schedules.toml",
            "[[schedule]]\nname = \"every-second\"\nrunbook = \"drill.toml\"\ncron = \"*/1 * * * * *\"\n",
        )
        .args(["schedule", "run", "schedules.toml", "--stop-after", "3500ms"])
        .run();
    out.assert_code(0);
    // 3.5 s hold 3 or 4 whole seconds; a fire time that came while a slow run was still going
    // is logged as skipped rather than fired.
    let fired = lines_with(&out.stderr, "every-second: firing");
    let skipped = lines_with(&out.stderr, "every-second: skipped");
    assert!(
        (3..=4).contains(&(fired + skipped)),
        "{fired} fired + {skipped} skipped\n{}",
        out.stderr
    );
    let found = bundles(out.dir.path());
    assert_eq!(found.len(), fired, "{}", out.stderr);
    for b in &found {
        assert_eq!(read_json(&b.join("manifest.json"))["status"], "succeeded");
    }
    assert_eq!(
        lines_with(&out.stderr, "finished: succeeded (exit 0)"),
        fired,
        "{}",
        out.stderr
    );
    let state = read_json(&out.dir.path().join("schedules.state.json"));
    assert!(
        state["entries"]["every-second"]["last_fire"].is_string(),
        "{state}"
    );
    assert_eq!(
        state["entries"]["every-second"]["last_outcome"]["status"],
        "succeeded"
    );
}

#[test]
fn overlap_skip_skips_while_a_slow_drill_runs_and_metrics_say_so() {
    let t = Test::new()
        .file("slow.toml", &runbook("slow-drill", "sleep 3"))
        .file(
            "schedules.toml",
            "textfile_dir = \"textfile\"\n\n[[schedule]]\nname = \"slow\"\nrunbook = \"slow.toml\"\ncron = \"*/1 * * * * *\"\noverlap = \"skip\"\n",
        )
        .file("textfile/.keep", "")
        .args(["schedule", "run", "schedules.toml", "--stop-after", "2500ms"]);
    let out = t.run();
    out.assert_code(0);
    assert_eq!(lines_with(&out.stderr, "slow: firing"), 1, "{}", out.stderr);
    assert!(
        lines_with(&out.stderr, "slow: skipped: previous still running") >= 1,
        "{}",
        out.stderr
    );
    // Shutdown waited for the running drill (within the default grace).
    let found = bundles(out.dir.path());
    assert_eq!(found.len(), 1);
    assert_eq!(
        read_json(&found[0].join("manifest.json"))["status"],
        "succeeded"
    );

    let text = std::fs::read_to_string(
        out.dir
            .path()
            .join("textfile/runbook_schedule_schedules.prom"),
    )
    .expect("metrics textfile");
    promtool_accepts(&text);
    let labels = "{schedule=\"slow\",runbook=\"slow-drill\"}";
    assert!(
        text.contains(&format!("runbook_schedule_firings_total{labels} 1")),
        "{text}"
    );
    let skipped: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("runbook_schedule_skipped_total{labels} ")))
        .expect("skipped counter")
        .parse()
        .expect("number");
    assert!(skipped >= 1.0, "{text}");
    assert!(text.contains(
        "runbook_run_last_status{schedule=\"slow\",runbook=\"slow-drill\",status=\"succeeded\"} 1"
    ));
    assert!(text.contains("runbook_drill_last_success_timestamp_seconds{schedule=\"slow\""));
    // The step families of the last bundle, relabelled with the entry.
    assert!(
        text.contains(
            "runbook_step_duration_seconds{schedule=\"slow\",runbook=\"slow-drill\",step=\"work\"}"
        ),
        "{text}"
    );
    // Only the textfile itself: the temporary file was renamed over it.
    let names: Vec<String> = std::fs::read_dir(out.dir.path().join("textfile"))
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

const CATCH_UP: &str = "[[schedule]]\nname = \"latest\"\nrunbook = \"drill.toml\"\ncron = \"0 0 1 1 *\"\ncatch_up = \"latest\"\n\n[[schedule]]\nname = \"none\"\nrunbook = \"drill.toml\"\ncron = \"0 0 1 1 *\"\ncatch_up = \"none\"\n";

#[test]
fn catch_up_latest_fires_once_after_downtime_and_none_does_not() {
    // The state says both last fired in 2020: several 1 January fire times were missed since.
    let out = Test::new()
        .file("drill.toml", &runbook("yearly", "echo restored"))
        .file("schedules.toml", CATCH_UP)
        .file(
            "schedules.state.json",
            r#"{"entries": {"latest": {"last_fire": "2020-01-01T00:00:00Z"}, "none": {"last_fire": "2020-01-01T00:00:00Z"}}}"#,
        )
        .args(["schedule", "run", "schedules.toml", "--stop-after", "1s"])
        .run();
    out.assert_code(0);
    assert_eq!(
        lines_with(&out.stderr, "latest: catching up"),
        1,
        "{}",
        out.stderr
    );
    assert_eq!(
        lines_with(&out.stderr, "latest: firing"),
        1,
        "{}",
        out.stderr
    );
    assert_eq!(lines_with(&out.stderr, "none: firing"), 0, "{}", out.stderr);
    assert_eq!(bundles(out.dir.path()).len(), 1);
    let state = read_json(&out.dir.path().join("schedules.state.json"));
    let slot = state["entries"]["latest"]["last_slot"]
        .as_str()
        .expect("last_slot");
    assert!(slot.contains("-01-01T00:00:00"), "{slot}");
    assert_eq!(
        state["entries"]["none"]["last_fire"],
        "2020-01-01T00:00:00Z"
    );
}

#[test]
fn sigterm_cancels_a_running_drill_which_seals_its_bundle() {
    let marker = unique_marker();
    let t = Test::new()
        .file("drill.toml", &runbook("long-drill", &format!("sleep {marker}")))
        .file(
            "schedules.toml",
            "shutdown_grace = \"0s\"\nkill_grace = \"5s\"\n\n[[schedule]]\nname = \"long\"\nrunbook = \"drill.toml\"\ncron = \"*/1 * * * * *\"\n",
        )
        .args(["schedule", "run", "schedules.toml"]);
    let dir = t.path().to_path_buf();
    let (child, _keep) = t.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    while processes_matching(&format!("sleep {marker}")).is_empty() {
        assert!(Instant::now() < deadline, "the drill never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("long: finished: cancelled (exit 130)"),
        "{stderr}"
    );
    assert_eq!(
        processes_matching(&format!("sleep {marker}")),
        Vec::<i32>::new()
    );
    let found = bundles(&dir);
    assert_eq!(found.len(), 1, "{stderr}");
    let m = read_json(&found[0].join("manifest.json"));
    assert_eq!(m["status"], "cancelled");
    assert!(m["finished_at"].is_string());
}

#[test]
fn metrics_are_served_over_http() {
    let t = Test::new()
        .file("drill.toml", &runbook("served", "echo ok"))
        .file(
            "schedules.toml",
            "[[schedule]]\nname = \"served\"\nrunbook = \"drill.toml\"\ncron = \"*/1 * * * * *\"\n",
        )
        .args([
            "schedule",
            "run",
            "schedules.toml",
            "--metrics-addr",
            "127.0.0.1:0",
        ]);
    let (mut child, _keep) = t.spawn();
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut addr = None;
    let mut finished = false;
    let mut log = String::new();
    while (addr.is_none() || !finished) && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            if let Some(a) = line.split("metrics: http://").nth(1) {
                addr = a.strip_suffix("/metrics").map(str::to_owned);
            }
            finished |= line.contains("served: finished:");
            log.push_str(&line);
            log.push('\n');
        }
    }
    let addr = addr.unwrap_or_else(|| panic!("no metrics address logged\n{log}"));
    assert!(finished, "no firing finished\n{log}");
    let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    conn.read_to_string(&mut response).expect("response");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(child.wait().expect("wait").code(), Some(0));

    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert!(body.contains("runbook_schedule_firings_total{schedule=\"served\",runbook=\"served\"}"));
    promtool_accepts(body);
}

/// Accepts HTTP requests on loopback; answers 500 to the first and 200 to the rest; sends
/// each (headers, body) back.
fn webhook_server() -> (u16, std::sync::mpsc::Receiver<(String, String)>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate().take(5) {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut head = String::new();
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                head.push_str(&line);
            }
            let mut body = vec![0u8; length];
            let _ = reader.read_exact(&mut body);
            let status = if n == 0 {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = conn.write_all(
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
            let _ = tx.send((head, String::from_utf8_lossy(&body).into_owned()));
        }
    });
    (port, rx)
}

#[test]
fn a_webhook_gets_the_outcome_with_secrets_redacted_after_a_retry() {
    let (port, requests) = webhook_server();
    let drill = "[runbook]\nname = \"restore\"\n\n[params]\napi_token = { secret = true }\ncluster = { default = \"dev\" }\n\n[[steps]]\nid = \"boom\"\nrun = \"exit 3\"\n";
    let schedules = format!(
        "[notify]\nurl = \"http://127.0.0.1:{port}/hook\"\non = [\"failure\"]\nheaders = {{ X-Api-Key = \"hdr-key-123456\" }}\ntimeout = \"5s\"\nretries = 2\n\n[[schedule]]\nname = \"nightly\"\nrunbook = \"drill.toml\"\ncron = \"0 0 1 1 *\"\ncatch_up = \"latest\"\nparams = {{ api_token = \"hunter2-very-secret\", cluster = \"staging\" }}\n"
    );
    let out = Test::new()
        .file("drill.toml", drill)
        .file("schedules.toml", &schedules)
        .file(
            "schedules.state.json",
            r#"{"entries": {"nightly": {"last_fire": "2020-01-01T00:00:00Z"}}}"#,
        )
        .args(["schedule", "run", "schedules.toml", "--stop-after", "1s"])
        .run();
    out.assert_code(0);
    assert!(out.stderr.contains("nightly: notified"), "{}", out.stderr);
    let (_, first) = requests
        .recv_timeout(Duration::from_secs(5))
        .expect("first attempt");
    let (head, body) = requests
        .recv_timeout(Duration::from_secs(5))
        .expect("retry");
    assert_eq!(first, body, "the retry sends the same payload");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-api-key: hdr-key-123456"),
        "{head}"
    );
    assert!(!body.contains("hunter2"), "{body}");
    let p: Value = serde_json::from_str(&body).expect("JSON payload");
    assert_eq!(p["runbook"], "restore");
    assert_eq!(p["schedule"], "nightly");
    assert_eq!(p["status"], "failed");
    assert_eq!(p["exit_code"], 1);
    assert_eq!(p["failed_steps"], serde_json::json!(["boom"]));
    assert_eq!(p["params"]["api_token"], "[REDACTED:api_token]");
    assert_eq!(p["params"]["cluster"], "staging");
    let bundle = p["bundle"].as_str().expect("bundle path");
    assert!(
        Path::new(bundle).join("manifest.json").is_file(),
        "{bundle}"
    );
}

#[test]
fn list_prints_next_fire_times_in_the_entry_time_zone() {
    let out = Test::new()
        .file("drill.toml", &runbook("berlin", "true"))
        .file(
            "schedules.toml",
            "[[schedule]]\nname = \"berlin\"\nrunbook = \"drill.toml\"\ncron = \"30 2 * * *\"\ntimezone = \"Europe/Berlin\"\ncatch_up = \"latest\"\n",
        )
        .file(
            "schedules.state.json",
            r#"{"entries": {"berlin": {"last_fire": "2026-01-10T01:30:02Z", "last_outcome": {"status": "drill_failed", "started": "2026-01-10T01:30:02Z", "finished": "2026-01-10T01:31:02Z", "duration_seconds": 60.0}}}}"#,
        )
        .args(["schedule", "list", "schedules.toml", "-n", "3"])
        .run();
    out.assert_code(0);
    assert!(
        out.stdout
            .contains("berlin: `drill.toml` cron `30 2 * * *` in Europe/Berlin"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("last fire: 2026-01-10 02:30:02 CET (+01:00) — drill_failed"),
        "{}",
        out.stdout
    );
    let next: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains("next: "))
        .collect();
    assert_eq!(next.len(), 3, "{}", out.stdout);
    for l in next {
        assert!(l.contains(" 02:30:00 CE"), "{l}");
    }
}

#[test]
fn schedule_file_errors_point_at_the_value() {
    let out = Test::new()
        .file("drill.toml", &runbook("x", "true"))
        .file(
            "schedules.toml",
            "[[schedule]]\nname = \"x\"\nrunbook = \"drill.toml\"\ncron = \"0 2 * *\"\ncatch_up = \"all\"\n",
        )
        .args(["schedule", "list", "schedules.toml"])
        .run();
    out.assert_code(2);
    out.assert_stderr_contains("schedules.toml:4:8")
        .assert_stderr_contains("invalid `cron`")
        .assert_stderr_contains("schedules.toml:5:12")
        .assert_stderr_contains("`catch_up` must be `none` or `latest`");
}

/// What `schedule run` would refuse, `list` refuses too, at the entry in the schedule file:
/// a missing runbook, a parameter the runbook does not have, a second entry of the same name,
/// a cron expression that never fires.
#[test]
fn list_refuses_entries_that_cannot_run_and_says_where() {
    let cases = [
        (
            "[[schedule]]\nname = \"a\"\nrunbook = \"missing.toml\"\ncron = \"* * * * *\"\n",
            "entry `a`: cannot read",
            "schedules.toml:3:11",
        ),
        (
            "[[schedule]]\nname = \"a\"\nrunbook = \"drill.toml\"\ncron = \"* * * * *\"\nparams = { nope = 1 }\n",
            "entry `a`: `--set nope=…` names no parameter of this runbook",
            "schedules.toml:5:10",
        ),
        (
            "[[schedule]]\nname = \"a\"\nrunbook = \"drill.toml\"\ncron = \"* * * * *\"\n[[schedule]]\nname = \"a\"\nrunbook = \"drill.toml\"\ncron = \"* * * * *\"\n",
            "two schedule entries are named `a`",
            "schedules.toml:6:8",
        ),
        (
            "[[schedule]]\nname = \"a\"\nrunbook = \"drill.toml\"\ncron = \"0 0 31 2 *\"\n",
            "`cron = \"0 0 31 2 *\"` never fires",
            "schedules.toml:4:8",
        ),
    ];
    for (file, message, at) in cases {
        let out = Test::new()
            .file("drill.toml", &runbook("a", "true"))
            .file("schedules.toml", file)
            .args(["schedule", "list", "schedules.toml"])
            .run();
        out.assert_code(2)
            .assert_stderr_contains(message)
            .assert_stderr_contains(at);
        assert!(!out.stdout.contains("next:"), "{}", out.stdout);
    }
}

const WITH_CLUSTER: &str = "[runbook]\nname = \"restore\"\n\n[params]\ncluster = { default = \"dev\" }\n\n[[steps]]\nid = \"work\"\nrun = \"true\"\n";

const EXPORTED: &str = "kill_grace = \"10s\"\n\n[[schedule]]\nname = \"weekday-restore\"\nrunbook = \"drill.toml\"\ncron = \"0 2 * * 1-5\"\ntimezone = \"Europe/Berlin\"\njitter = \"5m\"\ncatch_up = \"latest\"\nmax_duration = \"1h\"\nparams = { cluster = \"staging eu\" }\n\n[[schedule]]\nname = \"half-minute\"\nrunbook = \"drill.toml\"\ncron = \"*/30 * * * * *\"\n";

#[test]
fn exported_systemd_units_verify() {
    let out = Test::new()
        .file("drill.toml", WITH_CLUSTER)
        .file("schedules.toml", EXPORTED)
        .args(["schedule", "export", "schedules.toml", "--systemd", "units"])
        .run();
    out.assert_code(0);
    let dir = out.dir.path().join("units");
    let timer = std::fs::read_to_string(dir.join("runbook-weekday-restore.timer")).expect("timer");
    assert!(
        timer.contains("OnCalendar=Mon..Fri *-*-* 02:00:00 Europe/Berlin\n"),
        "{timer}"
    );
    assert!(timer.contains("Persistent=true\n"), "{timer}");
    assert!(timer.contains("RandomizedDelaySec=300\n"), "{timer}");
    let service =
        std::fs::read_to_string(dir.join("runbook-weekday-restore.service")).expect("service");
    assert!(service.contains("RuntimeMaxSec=3600\n"), "{service}");
    assert!(service.contains("\"cluster=staging eu\""), "{service}");
    let half = std::fs::read_to_string(dir.join("runbook-half-minute.timer")).expect("timer");
    assert!(half.contains("OnCalendar=*-*-* *:*:00,30 UTC\n"), "{half}");
    assert!(half.contains("Persistent=false\n"), "{half}");

    let mut units: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .collect();
    units.sort();
    assert_eq!(units.len(), 4);
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output();
    let Ok(verify) = verify else {
        panic!("systemd-analyze is not installed: `apt-get install systemd` (scripts/test does)");
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(verify.status.success(), "systemd-analyze verify:\n{text}");
    // Warnings about the units themselves count as failures too.
    for u in &units {
        let name = u.file_name().expect("name").to_string_lossy().into_owned();
        assert!(!text.contains(&name), "systemd-analyze verify:\n{text}");
    }
    // And systemd reads the calendar the way the scheduler does.
    let next = Command::new("systemd-analyze")
        .args(["calendar", "Mon..Fri *-*-* 02:00:00 Europe/Berlin"])
        .output()
        .expect("systemd-analyze calendar");
    assert!(next.status.success());
}

#[test]
fn exported_cronjobs_parse_and_seconds_are_refused() {
    let out = Test::new()
        .file("drill.toml", WITH_CLUSTER)
        .file(
            "schedules.toml",
            &EXPORTED.replace("*/30 * * * * *", "0 */30 * * * *"),
        )
        .args([
            "schedule",
            "export",
            "schedules.toml",
            "--cronjob",
            "k8s",
            "--image",
            "registry.example/runbook:0.1.0",
        ])
        .run();
    out.assert_code(0);
    out.assert_stderr_contains("a CronJob has no jitter");
    let text = std::fs::read_to_string(out.dir.path().join("k8s/runbook-weekday-restore.yaml"))
        .expect("yaml");
    let y: serde_norway::Value = serde_norway::from_str(&text).expect("YAML parses");
    let j: Value = serde_json::to_value(&y).expect("as JSON");
    assert_eq!(j["apiVersion"], "batch/v1");
    assert_eq!(j["kind"], "CronJob");
    assert_eq!(j["metadata"]["name"], "runbook-weekday-restore");
    let spec = &j["spec"];
    assert_eq!(spec["schedule"], "0 2 * * 1-5");
    assert_eq!(spec["timeZone"], "Europe/Berlin");
    assert_eq!(spec["concurrencyPolicy"], "Forbid");
    // catch_up = latest: one period (a day between weekday runs).
    assert_eq!(spec["startingDeadlineSeconds"], 86_400);
    let job = &spec["jobTemplate"]["spec"];
    assert_eq!(job["activeDeadlineSeconds"], 3600);
    assert_eq!(job["backoffLimit"], 0);
    let pod = &job["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "registry.example/runbook:0.1.0");
    assert_eq!(
        c["args"],
        serde_json::json!([
            "run",
            "/runbooks/drill.toml",
            "--set",
            "cluster=staging eu",
            "--evidence-dir",
            "/evidence",
            "--no-progress"
        ])
    );
    assert_eq!(c["volumeMounts"][0]["mountPath"], "/evidence");
    assert_eq!(
        pod["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "runbook-evidence"
    );
    let half =
        std::fs::read_to_string(out.dir.path().join("k8s/runbook-half-minute.yaml")).expect("yaml");
    let y: serde_norway::Value = serde_norway::from_str(&half).expect("YAML parses");
    assert_eq!(
        serde_json::to_value(&y).expect("json")["spec"]["schedule"],
        "*/30 * * * *".replace("*/30", "0,30")
    );

    let refused = Test::new()
        .file("drill.toml", WITH_CLUSTER)
        .file("schedules.toml", EXPORTED)
        .args([
            "schedule",
            "export",
            "schedules.toml",
            "--cronjob",
            "k8s",
            "--image",
            "x",
        ])
        .run();
    refused.assert_code(2);
    refused
        .assert_stderr_contains("entry `half-minute`")
        .assert_stderr_contains("minute resolution")
        .assert_stderr_contains("nothing was written");
    assert!(!refused.dir.path().join("k8s").exists());
}

#[test]
fn dashboard_queries_parse_and_use_metrics_that_exist() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/runbook-drills.json");
    let d = read_json(&path);
    assert_eq!(d["schemaVersion"], 39);
    assert_eq!(d["templating"]["list"][0]["type"], "datasource");
    // Names the scheduler writes (src/schedule/metrics.rs) or a bundle's metrics.prom has.
    let known = [
        "runbook_drill_verdict",
        "runbook_drill_rto_seconds",
        "runbook_drill_rto_target_seconds",
        "runbook_drill_rpo_seconds",
        "runbook_drill_rpo_target_seconds",
        "runbook_drill_last_success_timestamp_seconds",
        "runbook_run_last_status",
        "runbook_run_duration_seconds",
        "runbook_step_duration_seconds",
        "runbook_schedule_firings_total",
        "runbook_schedule_skipped_total",
    ];
    let mut rules = String::from("groups:\n- name: dashboard\n  rules:\n");
    let mut n = 0;
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("runbook_") {
                    assert!(
                        known.contains(&word),
                        "panel {} uses unknown {word}",
                        p["title"]
                    );
                }
            }
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$runbook", ".*");
            n += 1;
            rules.push_str(&format!(
                "  - record: dashboard:q{n}\n    expr: {}\n",
                serde_json::to_string(&expr).expect("quote")
            ));
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rules.yml");
    std::fs::write(&file, rules).expect("write");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap_or_else(|_| panic!("promtool is not installed: `apt-get install prometheus`"));
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_example_schedule_file_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("runbooks/schedules.toml");
    let out = Test::new()
        .args(["schedule", "list", path.to_str().expect("utf-8"), "-n", "1"])
        .run();
    out.assert_code(0);
    assert!(
        out.stdout.contains("local-drill-nightly:"),
        "{}",
        out.stdout
    );
}
