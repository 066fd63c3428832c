//! Steps on hosts through the real binary against real OpenSSH `sshd`s on 127.0.0.1: fan-out,
//! one connection per host across steps, per-host logs, an upload with a redacted secret, a
//! block with a local sub-step, auth and host-key failures, and the Ansible hand-off.

/// The real-sshd harness, shared with the other modules that need hosts (`crate::hosts::sshd`).
#[path = "../../steps/tests/support/sshd.rs"]
pub(crate) mod sshd;

use std::process::Command;

use sshd::Sshd;

use crate::common::{all_files, Test};

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
    for f in all_files(&bundle) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains("s3cr3t-join-token-value"),
            "token in {}",
            f.display()
        );
    }
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
