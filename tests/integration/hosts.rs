//! Steps on hosts through the real binary against real OpenSSH `sshd`s on 127.0.0.1: fan-out,
//! one connection per host across steps, per-host logs, an upload with a redacted secret, a
//! block with a local sub-step, auth and host-key failures, and the Ansible hand-off.

/// The real-sshd harness, shared with the other modules that need hosts (`crate::hosts::sshd`).
#[path = "../../steps/tests/support/sshd.rs"]
pub(crate) mod sshd;

use std::process::Command;

use sshd::Sshd;

use crate::common::Test;

/// An inventory of `servers` (first half) and `agents` (the rest), one sshd each.
fn inventory(sshds: &[Sshd]) -> String {
    let mut t = String::new();
    for (i, s) in sshds.iter().enumerate() {
        let group = if i < sshds.len().div_ceil(2) {
            "servers"
        } else {
            "agents"
        };
        t.push_str(&format!(
            "[hosts.node-{i:02}]\naddress = \"127.0.0.1\"\nport = {}\nuser = \"{}\"\nidentity_file = \"{}\"\nknown_hosts = \"{}\"\ngroups = [\"{group}\"]\nvars = {{ code = {} }}\n",
            s.port(),
            s.user(),
            s.client_key_path().display(),
            s.known_hosts_path().display(),
            if i == 2 { 7 } else { 0 },
        ));
    }
    t
}

#[test]
fn fan_out_reuses_one_connection_per_host_and_keeps_per_host_evidence() {
    let sshds = Sshd::start_many(20);
    let out = Test::new()
        .file("inventory.toml", &inventory(&sshds))
        .runbook(
            r#"
[runbook]
name = "hosts"
inventory = "inventory.toml"
allow_env = ["OUT"]
[params]
token = { secret = true, env = "JOIN_TOKEN" }
[[steps]]
id = "hello"
on = "all"
run = "echo hello from {{ host.name }}; echo oops >&2; exit {{ host.vars.code }}"
strategy = { parallel = 20, max_failures = 1 }
[[steps]]
id = "config"
needs = ["hello"]
on = "servers[0]"
upload = { dest = "{{ env.OUT }}/config.yaml", content = "token: {{ params.token }}\n", mode = "0600" }
[[steps]]
id = "block"
needs = ["config"]
on = "servers[:2]"
steps = [
  { id = "local-side", local = true, run = "echo drain {{ host.name }}" },
  { id = "remote-side", run = "cat {{ env.OUT }}/config.yaml | wc -c" },
]
[[steps]]
id = "summary"
needs = ["block"]
script = "let h = steps.hello.hosts; log(`${h.len()} hosts, node-02: ${h[\"node-02\"].status}`); #{ n: h.len() }"
"#,
        )
        .env("JOIN_TOKEN", "s3cr3t-join-token-value")
        .args(["run", "runbook.toml", "--no-progress"]);
    let dir = out.path().to_path_buf();
    let out = out.env("OUT", dir.to_str().expect("utf-8 path")).run();
    out.assert_code(0);
    let bundle = out.bundle();
    let m = out.manifest();
    let hello = crate::common::step(&m, "hello");
    assert_eq!(hello["targets"].as_array().map(Vec::len), Some(20));
    assert!(hello["reason"]
        .as_str()
        .unwrap_or_default()
        .contains("node-02"));
    let log =
        std::fs::read_to_string(bundle.join("steps/hello/node-05/attempt-1.log")).expect("log");
    assert!(
        log.contains("hello from node-05") && log.contains("oops"),
        "{log}"
    );
    let block =
        std::fs::read_to_string(bundle.join("steps/block/node-01/local-side/attempt-1.log"))
            .expect("block log");
    assert!(block.contains("drain node-01"), "{block}");
    // One authenticated connection per host, across every step.
    for (i, s) in sshds.iter().enumerate() {
        assert_eq!(s.accepted_logins(), 1, "node-{i:02}: {}", s.log());
    }
    // The uploaded file has the token; the bundle never does.
    let uploaded = std::fs::read_to_string(dir.join("config.yaml")).expect("uploaded");
    assert_eq!(uploaded, "token: s3cr3t-join-token-value\n");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("config.yaml"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    crate::common::assert_bundle_lacks(&bundle, &["s3cr3t-join-token-value"]);
}

#[test]
fn auth_and_host_key_failures_are_specific_and_not_retried() {
    let mut s = Sshd::start();
    let wrong = s.new_client_key("id_wrong", "ed25519", "", false);
    let inv = format!(
        "[hosts.bad-key]\naddress = \"127.0.0.1\"\nport = {p}\nuser = \"{u}\"\nidentity_file = \"{w}\"\nknown_hosts = \"{k}\"\nuse_agent = false\n\
         [hosts.changed]\naddress = \"127.0.0.1\"\nport = {p}\nuser = \"{u}\"\nidentity_file = \"{c}\"\nknown_hosts = \"{k}\"\n",
        p = s.port(),
        u = s.user(),
        w = wrong.display(),
        c = s.client_key_path().display(),
        k = s.known_hosts_path().display(),
    );
    let rb = r#"
[runbook]
name = "fail"
inventory = "inventory.toml"
[[steps]]
id = "try"
on = "ON"
run = "true"
retry = { attempts = 3, delay = "100ms" }
"#;
    let out = Test::new()
        .file("inventory.toml", &inv)
        .runbook(&rb.replace("ON", "bad-key"))
        .args(["run", "runbook.toml", "--no-progress"])
        .run();
    out.assert_code(1);
    let m = out.manifest();
    let a = &crate::common::step(&m, "try")["attempts"];
    assert_eq!(
        a.as_array().map(Vec::len),
        Some(1),
        "auth failures are not retried"
    );
    assert_eq!(a[0]["outcome"]["failure"], "auth", "{a}");
    assert_eq!(
        a[0]["cwd"], "~",
        "a remote attempt records the host's home directory, not a local path"
    );
    // The server's key changes: refused before any credential is offered.
    s.restart_with_new_host_key();
    let before = s.log().matches("publickey").count();
    let out = Test::new()
        .file("inventory.toml", &inv)
        .runbook(&rb.replace("ON", "changed"))
        .args(["run", "runbook.toml", "--no-progress"])
        .run();
    out.assert_code(1);
    let m = out.manifest();
    let a = &crate::common::step(&m, "try")["attempts"];
    assert_eq!(a[0]["outcome"]["failure"], "host_key", "{a}");
    assert_eq!(a.as_array().map(Vec::len), Some(1));
    assert_eq!(
        s.log().matches("publickey").count(),
        before,
        "no key offered"
    );
}

#[test]
fn the_exported_inventory_drives_a_real_ansible_playbook() {
    let sshds = Sshd::start_many(2);
    let ansible = ["ansible-playbook"]
        .iter()
        .map(|b| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".local/bin")
                .join(b)
        })
        .find(|p| p.exists())
        .map_or_else(
            || "ansible-playbook".to_owned(),
            |p| p.display().to_string(),
        );
    let out = Test::new()
        .file("inventory.toml", &inventory(&sshds))
        .file(
            "site.yml",
            "- hosts: servers\n  gather_facts: false\n  tasks:\n    - raw: echo ansible-was-here\n",
        )
        .runbook(&format!(
            r#"
[runbook]
name = "handoff"
inventory = "inventory.toml"
[[steps]]
id = "export"
run = "'{bin}' inventory export inventory.toml --format ansible > hosts.ini"
[[steps]]
id = "playbook"
needs = ["export"]
run = "'{ansible}' -i hosts.ini site.yml"
"#,
            bin = crate::common::BIN,
        ))
        .env("ANSIBLE_NOCOLOR", "1")
        .args(["run", "runbook.toml", "--no-progress"])
        .run();
    let log = std::fs::read_to_string(out.bundle().join("steps/playbook/local/attempt-1.log"))
        .unwrap_or_default();
    assert_eq!(
        out.code, 0,
        "install ansible-core (scripts/test does): {log}\n{}",
        out.stderr
    );
    assert!(log.contains("ok=1") && log.contains("node-00"), "{log}");
    let _ = Command::new("true").status();
}

/// One `[hosts.<name>]` table per sshd, in the order given (not alphabetical, so "inventory
/// order" cannot be confused with name order), with `extra` lines appended to each.
fn named_inventory(sshds: &[Sshd], names: &[&str], extra: impl Fn(usize) -> String) -> String {
    let mut t = String::new();
    for (i, (s, name)) in sshds.iter().zip(names).enumerate() {
        t.push_str(&format!(
            "[hosts.{name}]\naddress = \"127.0.0.1\"\nport = {}\nuser = \"{}\"\nidentity_file = \"{}\"\nknown_hosts = \"{}\"\nuse_agent = false\n{}\n",
            s.port(),
            s.user(),
            s.client_key_path().display(),
            s.known_hosts_path().display(),
            extra(i),
        ));
    }
    t
}

/// Journal events of `kind` for `step`, as (line number, target, timestamp).
fn attempt_events(
    journal: &[serde_json::Value],
    kind: &str,
    step: &str,
) -> Vec<(usize, String, chrono::DateTime<chrono::FixedOffset>)> {
    journal
        .iter()
        .enumerate()
        .filter(|(_, e)| e["event"] == kind && e["step"] == step)
        .map(|(n, e)| {
            let at = e["at"].as_str().expect("at");
            (
                n,
                e["target"].as_str().expect("target").to_owned(),
                chrono::DateTime::parse_from_rfc3339(at).expect("RFC 3339 timestamp"),
            )
        })
        .collect()
}

#[test]
fn rolling_one_runs_hosts_strictly_one_after_another_in_inventory_order() {
    let names = ["web-3", "db-1", "cache-9", "app-2", "lb-0"];
    let sshds = Sshd::start_many(names.len());
    let t = Test::new().file(
        "inventory.toml",
        &named_inventory(&sshds, &names, |_| String::new()),
    );
    let dir = t.path().to_path_buf();
    // Each host appends its start and end to one shared file: with any overlap, the lines of
    // two hosts would interleave. The short sleep makes an overlap, if there were one, show.
    let out = t
        .runbook(
            r#"
[runbook]
name = "rolling"
inventory = "inventory.toml"
allow_env = ["OUT"]
[[steps]]
id = "upgrade"
on = "all"
strategy = { rolling = 1 }
run = "echo start {{ host.name }} >> {{ env.OUT }}/order.log; sleep 0.2; echo end {{ host.name }} >> {{ env.OUT }}/order.log"
"#,
        )
        .env("OUT", dir.to_str().expect("utf-8 path"))
        .args(["run", "runbook.toml", "--no-progress"])
        .run();
    out.assert_code(0);
    let order = std::fs::read_to_string(dir.join("order.log")).expect("order.log");
    let expected: String = names
        .iter()
        .map(|n| format!("start {n}\nend {n}\n"))
        .collect();
    assert_eq!(
        order, expected,
        "remote commands overlapped or ran out of order"
    );

    // The journal agrees: host i+1's attempt starts after host i's finished, by position in
    // the journal and by timestamp.
    let journal = out.journal();
    let started = attempt_events(&journal, "attempt_started", "upgrade");
    let finished = attempt_events(&journal, "attempt_finished", "upgrade");
    let targets = |v: &[(usize, String, _)]| v.iter().map(|e| e.1.clone()).collect::<Vec<_>>();
    assert_eq!(
        targets(&started),
        names,
        "attempts started in inventory order"
    );
    assert_eq!(
        targets(&finished),
        names,
        "attempts finished in inventory order"
    );
    for i in 0..names.len() {
        assert!(started[i].0 < finished[i].0 && started[i].2 <= finished[i].2);
        if i + 1 < names.len() {
            assert!(
                finished[i].0 < started[i + 1].0 && finished[i].2 <= started[i + 1].2,
                "{} started before {} finished",
                names[i + 1],
                names[i]
            );
        }
    }
    // One batch per host, numbered in order.
    let batches: Vec<(u64, Vec<String>)> = journal
        .iter()
        .filter(|e| e["event"] == "batch")
        .map(|e| {
            (
                e["number"].as_u64().expect("number"),
                serde_json::from_value(e["hosts"].clone()).expect("hosts"),
            )
        })
        .collect();
    let expected: Vec<(u64, Vec<String>)> = names
        .iter()
        .zip(1..)
        .map(|(n, i)| (i, vec![(*n).to_owned()]))
        .collect();
    assert_eq!(batches, expected);
}

#[test]
fn max_failures_stops_a_rolling_step_before_the_remaining_hosts() {
    let names = ["node-a", "node-b", "node-c", "node-d", "node-e"];
    let sshds = Sshd::start_many(names.len());
    // node-b and node-c fail; with max_failures = 1 the second failure stops the step.
    let inv = named_inventory(&sshds, &names, |i| {
        format!(
            "vars = {{ code = {} }}",
            if i == 1 || i == 2 { 3 } else { 0 }
        )
    });
    let t = Test::new().file("inventory.toml", &inv);
    let dir = t.path().to_path_buf();
    let out = t
        .runbook(
            r#"
[runbook]
name = "budget"
inventory = "inventory.toml"
allow_env = ["OUT"]
[[steps]]
id = "upgrade"
on = "all"
strategy = { rolling = 1, max_failures = 1 }
run = "touch {{ env.OUT }}/ran-{{ host.name }}; echo 'upgrade stopped'; exit {{ host.vars.code }}"
[[steps]]
id = "after"
needs = ["upgrade"]
run = "touch {{ env.OUT }}/after-ran"
"#,
        )
        .env("OUT", dir.to_str().expect("utf-8 path"))
        .args(["run", "runbook.toml", "--no-progress"])
        .run();
    out.assert_code(1);
    for n in &names[..3] {
        assert!(dir.join(format!("ran-{n}")).exists(), "{n} should have run");
    }
    for (n, s) in names.iter().zip(&sshds).skip(3) {
        assert!(!dir.join(format!("ran-{n}")).exists(), "{n} ran");
        assert_eq!(s.accepted_logins(), 0, "{n} was connected to: {}", s.log());
    }
    assert!(!dir.join("after-ran").exists(), "the dependent step ran");

    let m = out.manifest();
    assert_eq!(m["status"], "failed");
    let step = crate::common::step(&m, "upgrade");
    assert_eq!(step["status"], "failed");
    let reason = step["reason"].as_str().unwrap_or_default();
    for part in [
        "2 of 5 host(s) failed",
        // Hosts that failed the same way are listed together.
        "node-b, node-c (exit code 3: upgrade stopped)",
        "2 host(s) not started",
        "more than `max_failures` (1)",
    ] {
        assert!(reason.contains(part), "{part:?} not in {reason:?}");
    }
    let targets: Vec<(String, String)> = step["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .map(|t| {
            (
                t["target"].as_str().unwrap_or_default().to_owned(),
                t["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = names
        .iter()
        .zip(["succeeded", "failed", "failed", "skipped", "skipped"])
        .map(|(n, s)| ((*n).to_owned(), s.to_owned()))
        .collect();
    assert_eq!(targets, expected);
    for t in &step["targets"].as_array().expect("targets")[3..] {
        assert!(
            t["reason"]
                .as_str()
                .unwrap_or_default()
                .starts_with("not started: 2 host(s) failed"),
            "{t}"
        );
        assert_eq!(t["attempts"], 0, "{t}");
    }
    // No attempt was even started on them.
    let attempted: Vec<String> = step["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .map(|a| a["target"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(attempted, names[..3]);
    assert_eq!(crate::common::step(&m, "after")["status"], "skipped");
    out.assert_stderr_contains("more than `max_failures` (1)");
    // The console ends with the tail of each failed host's log (text only, no log tags), and
    // of no host that succeeded.
    for n in ["node-b", "node-c"] {
        out.assert_stderr_contains(&format!("  {n}:\n  log: "));
        out.assert_stderr_contains(&format!("steps/upgrade/{n}/attempt-1.log"));
        out.assert_stderr_contains("  | upgrade stopped");
    }
    assert!(!out.stderr.contains("  | out "), "{}", out.stderr);
    assert!(!out.stderr.contains("  node-a:"), "{}", out.stderr);
}

#[test]
fn a_host_whose_sshd_dies_mid_run_fails_after_its_retries_and_the_others_go_on() {
    use std::time::{Duration, Instant};

    let names = ["node-00", "node-01", "node-02"];
    let mut sshds = Sshd::start_many(names.len());
    let t = Test::new().file(
        "inventory.toml",
        &named_inventory(&sshds, &names, |_| String::new()),
    );
    let dir = t.path().to_path_buf();
    // `first` connects to every host (the connections stay open in the pool); its first
    // attempt fails once on every host, so that all hosts retry at the same time. `pause` then
    // tells the test it may stop node-01's sshd and waits until it has (bounded, in case the
    // test died); `second` runs on every host with retries.
    let (child, tmp) = t
        .runbook(
            r#"
[runbook]
name = "lost"
inventory = "inventory.toml"
allow_env = ["OUT"]
[[steps]]
id = "first"
on = "all"
run = "f='{{ env.OUT }}/flaky-{{ host.name }}'; [ -e \"$f\" ] || { touch \"$f\"; exit 1; }; echo connected to {{ host.name }}"
retry = { attempts = 2, delay = "10ms" }
[[steps]]
id = "pause"
needs = ["first"]
run = '''
touch '{{ env.OUT }}/first-done'
i=0
while [ ! -e '{{ env.OUT }}/sshd-stopped' ]; do
  i=$((i + 1)); [ "$i" -gt 400 ] && exit 9
  sleep 0.05
done
'''
[[steps]]
id = "second"
needs = ["pause"]
on = "all"
run = "echo still there: {{ host.name }}"
retry = { attempts = 3, delay = "100ms" }
"#,
        )
        .env("OUT", dir.to_str().expect("utf-8 path"))
        .args(["run", "runbook.toml", "--no-progress"])
        .spawn();
    let give_up = Instant::now() + Duration::from_secs(20);
    while !dir.join("first-done").exists() {
        assert!(Instant::now() < give_up, "`first` never finished");
        std::thread::sleep(Duration::from_millis(20));
    }
    let victim_logins = sshds[1].accepted_logins();
    // The listener and the connection process serving runbook's pooled connection.
    sshds[1].stop();
    std::fs::write(dir.join("sshd-stopped"), "").expect("write marker");
    let out = child.wait_with_output().expect("wait for runbook");
    let (code, stderr) = (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(victim_logins, 1, "node-01 was connected to once by `first`");

    let bundle = crate::common::find_bundle(tmp.path());
    let m = crate::common::read_json(&bundle.join("manifest.json"));
    let first = crate::common::step(&m, "first");
    assert_eq!(first["status"], "succeeded");
    // Each host's retry is recorded on that host's first attempt (hosts retry concurrently:
    // the latest attempt 1 in the list is usually another host's).
    let retried: Vec<(String, u64, bool)> = first["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .map(|a| {
            (
                a["target"].as_str().unwrap_or_default().to_owned(),
                a["attempt"].as_u64().unwrap_or(0),
                a["retry_delay_seconds"].is_number(),
            )
        })
        .collect();
    for n in names {
        assert!(
            retried.contains(&(n.to_owned(), 1, true)),
            "{n}: {retried:?}"
        );
        assert!(
            retried.contains(&(n.to_owned(), 2, false)),
            "{n}: {retried:?}"
        );
    }
    let second = crate::common::step(&m, "second");
    assert_eq!(second["status"], "failed");
    let targets = second["targets"].as_array().expect("targets");
    let status_of = |n: &str| {
        targets
            .iter()
            .find(|t| t["target"] == n)
            .map(|t| {
                (
                    t["status"].clone(),
                    t["attempts"].clone(),
                    t["reason"].clone(),
                )
            })
            .expect("target")
    };
    for n in ["node-00", "node-02"] {
        let (status, attempts, _) = status_of(n);
        assert_eq!((status, attempts), ("succeeded".into(), 1.into()), "{n}");
        let log = std::fs::read_to_string(bundle.join(format!("steps/second/{n}/attempt-1.log")))
            .expect("log");
        assert!(log.contains(&format!("still there: {n}")), "{log}");
    }
    let (status, attempts, reason) = status_of("node-01");
    assert_eq!((status, attempts), ("failed".into(), 3.into()));
    let reason = reason.as_str().unwrap_or_default().to_owned();
    assert!(
        reason.contains("connection to `node-01` (127.0.0.1:") && reason.contains("refused"),
        "{reason}"
    );
    assert!(reason.ends_with("(after 3 attempts)"), "{reason}");
    // The step's reason names the host, and the console line names the step.
    let step_reason = second["reason"].as_str().unwrap_or_default();
    assert!(
        step_reason.starts_with("1 of 3 host(s) failed: node-01 (connection to `node-01`"),
        "{step_reason}"
    );
    for line in [
        "second on node-01 attempt 1: connection to `node-01`",
        "second retrying on node-01 in 100ms (attempt 2 next)",
        "second failed",
    ] {
        assert!(stderr.contains(line), "{line:?} not in\n{stderr}");
    }
    // Every attempt on node-01 is a connection failure, and each of the first two was
    // followed by a retry recorded on node-01's own attempt, not on another host's.
    let attempts = second["attempts"].as_array().expect("attempts");
    for a in attempts {
        let victim = a["target"] == "node-01";
        if victim {
            let failure = a["outcome"]["failure"].as_str().unwrap_or_default();
            assert!(
                failure == "refused" || failure == "channel" || failure == "io",
                "{a}"
            );
            assert!(
                a["error"].as_str().unwrap_or_default().contains("node-01"),
                "{a}"
            );
        }
        let retried = victim && a["attempt"].as_u64() < Some(3);
        assert_eq!(
            a["retry_delay_seconds"].is_number(),
            retried,
            "retry delay on the wrong attempt: {a}"
        );
    }
    // The journal says whose attempt each retry is for.
    let journal = crate::common::read_journal(&bundle);
    let retries: Vec<(String, u64)> = journal
        .iter()
        .filter(|e| e["event"] == "retry_scheduled" && e["step"] == "second")
        .map(|e| {
            (
                e["target"].as_str().unwrap_or_default().to_owned(),
                e["next_attempt"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        retries,
        [("node-01".to_owned(), 2), ("node-01".to_owned(), 3)]
    );
    // The last attempt could not reconnect: nothing listens any more.
    let last = attempts
        .iter()
        .rfind(|a| a["target"] == "node-01")
        .expect("node-01 attempts");
    assert_eq!(last["outcome"]["failure"], "refused", "{last}");
    // The healthy hosts kept their one connection.
    for i in [0, 2] {
        assert_eq!(sshds[i].accepted_logins(), 1, "{}", sshds[i].log());
    }
}

/// A host whose only key is encrypted, with no `passphrase_env`.
fn locked_key_setup() -> (Sshd, Test) {
    let sshd = Sshd::start();
    let key = sshd.new_client_key("locked_ed25519", "ed25519", "correct horse", true);
    let t = Test::new()
        .file(
            "inventory.toml",
            &format!(
                "[hosts.vm-1]\naddress = \"127.0.0.1\"\nport = {}\nuser = \"{}\"\nidentity_file = \"{}\"\nknown_hosts = \"{}\"\n",
                sshd.port(),
                sshd.user(),
                key.display(),
                sshd.known_hosts_path().display(),
            ),
        )
        .runbook(
            "[runbook]\nname = \"locked\"\ninventory = \"inventory.toml\"\n[[steps]]\nid = \"hello\"\non = \"all\"\nrun = \"echo hello from $(hostname)\"\n",
        );
    (sshd, t)
}

#[test]
fn an_encrypted_key_is_asked_for_at_a_terminal_and_named_without_one() {
    // No terminal (Jenkins): nothing is asked; the key error says how to give the passphrase.
    let (sshd, t) = locked_key_setup();
    let out = t.run_args().run();
    assert_eq!(out.code, 1, "{}", out.stderr);
    let m = out.manifest();
    let why = crate::common::step(&m, "hello")["reason"].to_string();
    assert!(
        why.contains("encrypted") && why.contains("run from a terminal to be asked"),
        "{why}"
    );
    assert_eq!(sshd.accepted_logins(), 0);

    // At a terminal (a pty from `script`): asked once, a wrong answer is asked again, the right
    // one opens the key; the passphrase is in no file of the bundle.
    let (sshd, t) = locked_key_setup();
    let dir = t.path().to_path_buf();
    let command = format!(
        "{} run runbook.toml --evidence-dir proof --no-progress",
        crate::common::BIN
    );
    let mut child = Command::new("script")
        .args(["-qefc", &command, "/dev/null"])
        .current_dir(&dir)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script(1) from bsdutils");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        // Typed ahead: the terminal holds the lines until the prompts read them.
        stdin
            .write_all(b"wrong guess\ncorrect horse\n")
            .expect("type the passphrases");
    }
    let out = child.wait_with_output().expect("script");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text.matches("Enter passphrase for key").count(),
        2,
        "{text}"
    );
    assert!(text.contains("Bad passphrase, try again."), "{text}");
    assert_eq!(sshd.accepted_logins(), 1);
    let bundle = crate::common::find_bundle(&dir);
    crate::common::assert_bundle_lacks(&bundle, &["correct horse"]);
    drop(t);
}

/// `become_password = "{{ params.sudo_pw }}"`: sudo's password comes from a secret param,
/// reaches sudo only through its prompt, and is in no file of the bundle; a sudo step without
/// it is refused once (never retried) with a hint naming the key.
#[test]
fn sudo_takes_its_password_from_a_secret_param_and_never_writes_it() {
    let Some(user) = sshd::TempUser::create() else {
        eprintln!("not root (or no useradd): cannot make a sudo user; skipped");
        return;
    };
    let password = "pw-7c1e-become-runbook";
    user.set_password(password);
    let u = &user.name;
    let Some(_rule) = sshd::SudoersRule::install(
        u,
        &format!("Defaults:{u} !lecture, timestamp_timeout=0\n{u} ALL=(ALL) ALL\n"),
    ) else {
        eprintln!("no sudo: skipped");
        return;
    };
    let sshds = vec![Sshd::start_for_user(&user)];
    let out = Test::new()
        .file("inventory.toml", &inventory(&sshds))
        .runbook(
            r#"
[runbook]
name = "become"
inventory = "inventory.toml"
[params]
sudo_pw = { secret = true, env = "RB_TEST_SUDO_PW" }
[[steps]]
id = "as-root"
on = "servers"
sudo = true
become_password = "{{ params.sudo_pw }}"
run = "id -un; echo \"uid=$(id -u)\""
[[steps]]
id = "in-a-block"
needs = ["as-root"]
on = "servers"
steps = [
  { id = "root-again", sudo = true, become_password = "{{ params.sudo_pw }}", run = "id -un" },
]
[[steps]]
id = "no-password"
needs = ["in-a-block"]
on = "servers"
sudo = true
retry = { attempts = 3, delay = "10ms" }
continue_on_failure = true
run = "id -un"
"#,
        )
        .env("RB_TEST_SUDO_PW", password)
        .args(["run", "runbook.toml", "--no-progress"])
        .run();
    out.assert_code(0);
    let bundle = out.bundle();
    let log = std::fs::read_to_string(bundle.join("steps/as-root/node-00/attempt-1.log"))
        .expect("as-root log");
    assert!(log.contains("root") && log.contains("uid=0"), "{log}");
    let block =
        std::fs::read_to_string(bundle.join("steps/in-a-block/node-00/root-again/attempt-1.log"))
            .expect("block log");
    assert!(block.contains("root"), "{block}");
    let m = out.manifest();
    let refused = crate::common::step(&m, "no-password");
    assert_eq!(refused["targets"][0]["attempts"], 1, "{refused}");
    assert_eq!(
        refused["attempts"][0]["outcome"]["failure"], "sudo",
        "{refused}"
    );
    let reason = refused["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("sudo") && reason.contains("become_password"),
        "{refused}"
    );
    crate::common::assert_bundle_lacks(&bundle, &[password]);
    assert!(!sshds[0].log().contains(password));
}

/// A password written in the runbook, or one on a step without `sudo`, is refused by `check`
/// at its line and column, without echoing the line.
#[test]
fn become_password_must_come_from_a_param_and_needs_sudo() {
    let out = Test::new()
        .runbook(
            r#"[runbook]
name = "become"
[[steps]]
id = "a"
on = "all"
sudo = true
become_password = "hunter2-literal"
run = "true"
[[steps]]
id = "b"
on = "all"
become_password = "{{ params.pw }}"
run = "true"
[params]
pw = { secret = true, default = "" }
"#,
        )
        .file("inventory.toml", "[hosts.h]\naddress = \"127.0.0.1\"\n")
        .args(["check", "runbook.toml", "--inventory", "inventory.toml"])
        .run();
    out.assert_code(2);
    let err = &out.stderr;
    assert!(
        err.contains("runbook.toml:7:19: `become_password` is written in the runbook"),
        "{err}"
    );
    assert!(!err.contains("hunter2-literal"), "{err}");
    assert!(
        err.contains("`become_password` on a step without `sudo = true`") && err.contains(":12:"),
        "{err}"
    );
}
