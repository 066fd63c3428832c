//! The SSH transport against real OpenSSH `sshd` instances on 127.0.0.1.

#[path = "support/sshd.rs"]
mod sshd;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use runbook_engine::event::{RunEvent, Stream};
use runbook_engine::runbook::StepId;
use runbook_engine::runner::OutputSink;
use runbook_steps::ssh::{
    ExecOutcome, ExecRequest, HostKeyCheck, SshError, SshHost, SshPool, UploadRequest,
};
use tokio_util::sync::CancellationToken;

use sshd::Sshd;

/// An output sink whose events are drained (so writes never block) and that can cancel a
/// token once stdout contains a marker, which is how tests learn a command has started.
struct Capture {
    sink: OutputSink,
    stdout: Arc<Mutex<String>>,
}

impl Capture {
    fn new() -> Self {
        Self::cancel_on(None)
    }

    fn cancel_on(trigger: Option<(&'static str, CancellationToken)>) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let stdout = Arc::new(Mutex::new(String::new()));
        let seen = stdout.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                if let RunEvent::Output {
                    stream: Stream::Stdout,
                    data,
                    ..
                } = event
                {
                    let mut all = seen.lock().expect("lock");
                    all.push_str(&String::from_utf8_lossy(&data));
                    if let Some((marker, token)) = &trigger {
                        if all.contains(marker) {
                            token.cancel();
                        }
                    }
                }
            }
        });
        Self {
            sink: OutputSink::new(tx, StepId::new("step"), Arc::from("host"), 1),
            stdout,
        }
    }

    fn out(&self) -> String {
        self.sink.tail(Stream::Stdout)
    }

    fn err(&self) -> String {
        self.sink.tail(Stream::Stderr)
    }
}

fn cmd(command: &str) -> ExecRequest {
    ExecRequest {
        command: command.to_string(),
        ..ExecRequest::default()
    }
}

async fn exec(pool: &SshPool, host: &SshHost, req: &ExecRequest) -> (ExecOutcome, Capture) {
    let mut cap = Capture::new();
    let outcome = pool
        .exec(host, req, &mut cap.sink, &CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("exec `{}` failed: {e}", req.command));
    (outcome, cap)
}

async fn exec_err(pool: &SshPool, host: &SshHost, command: &str) -> SshError {
    let mut cap = Capture::new();
    match pool
        .exec(
            host,
            &cmd(command),
            &mut cap.sink,
            &CancellationToken::new(),
        )
        .await
    {
        Ok(outcome) => panic!("expected an error, got {outcome:?}"),
        Err(e) => e,
    }
}

/// Waits (bounded) until no process matches `pattern`; returns whether they went.
fn processes_gone(pattern: &str) -> bool {
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let found = Command::new("pgrep")
            .args(["-f", pattern])
            .output()
            .expect("pgrep")
            .status
            .success();
        if !found {
            return true;
        }
        if Instant::now() > give_up {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A marker unique to this test process and call, for finding remote processes with pgrep.
fn unique_sleep() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "sleep 1000.{}{:03}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

fn fingerprint_of(public_key: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(public_key)
        .output()
        .expect("ssh-keygen -lf");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn output_exit_code_and_separate_stderr() {
    let sshd = Sshd::start();
    let pool = SshPool::new();
    let host = sshd.host("web1");
    let (outcome, cap) = exec(&pool, &host, &cmd("echo out; echo err >&2; exit 3")).await;
    assert_eq!(outcome, ExecOutcome::Exited(3));
    assert_eq!(cap.out(), "out\n");
    assert_eq!(cap.err(), "err\n");
    let (outcome, _) = exec(&pool, &host, &cmd("true")).await;
    assert_eq!(outcome, ExecOutcome::Exited(0));
}

#[tokio::test]
async fn env_is_exported_and_quoted() {
    let sshd = Sshd::start();
    let pool = SshPool::new();
    let req = ExecRequest {
        command: r#"printf '%s|%s' "$GREETING" "$OTHER""#.into(),
        env: vec![
            ("GREETING".into(), "it's a \"test\" $HOME".into()),
            ("OTHER".into(), "2".into()),
        ],
        ..ExecRequest::default()
    };
    let (outcome, cap) = exec(&pool, &sshd.host("web1"), &req).await;
    assert_eq!(outcome, ExecOutcome::Exited(0));
    assert_eq!(cap.out(), "it's a \"test\" $HOME|2");
}

#[tokio::test]
async fn exit_by_signal_is_reported_by_name() {
    let sshd = Sshd::start();
    let pool = SshPool::new();
    let (outcome, _) = exec(&pool, &sshd.host("web1"), &cmd("kill -KILL $$")).await;
    assert_eq!(outcome, ExecOutcome::Signaled("KILL".into()));
}

#[tokio::test]
async fn one_connection_per_host_is_reused() {
    let sshd = Sshd::start();
    let pool = SshPool::new();
    let host = sshd.host("web1");
    for i in 0..3 {
        let (outcome, cap) = exec(&pool, &host, &cmd(&format!("echo {i}"))).await;
        assert_eq!(outcome, ExecOutcome::Exited(0));
        assert_eq!(cap.out(), format!("{i}\n"));
    }
    assert_eq!(pool.connections_opened(), 1);
    assert_eq!(sshd.accepted_logins(), 1, "log:\n{}", sshd.log());

    // After close_all the next use connects again.
    pool.close_all().await;
    let (outcome, _) = exec(&pool, &host, &cmd("true")).await;
    assert_eq!(outcome, ExecOutcome::Exited(0));
    assert_eq!(pool.connections_opened(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_one_connection_beyond_max_sessions() {
    // sshd allows 10 sessions per connection (MaxSessions); 15 at once must all still run.
    let sshd = Sshd::start();
    let pool = SshPool::new();
    let host = sshd.host("web1");
    let runs = (0..15).map(|i| {
        let (pool, host) = (pool.clone(), host.clone());
        tokio::spawn(async move {
            let (outcome, cap) = exec(&pool, &host, &cmd(&format!("sleep 0.2; echo {i}"))).await;
            (outcome, cap.out())
        })
    });
    for (i, run) in runs.collect::<Vec<_>>().into_iter().enumerate() {
        let (outcome, out) = run.await.expect("task");
        assert_eq!(outcome, ExecOutcome::Exited(0));
        assert_eq!(out, format!("{i}\n"));
    }
    assert_eq!(pool.connections_opened(), 1);
    assert_eq!(sshd.accepted_logins(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_hosts_in_parallel() {
    let servers = Sshd::start_many(5);
    let pool = SshPool::new();
    let runs: Vec<_> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (pool, host) = (pool.clone(), s.host(&format!("host{i}")));
            tokio::spawn(async move {
                let (outcome, cap) = exec(&pool, &host, &cmd(&format!("echo host{i}"))).await;
                (outcome, cap.out())
            })
        })
        .collect();
    for (i, run) in runs.into_iter().enumerate() {
        let (outcome, out) = run.await.expect("task");
        assert_eq!(outcome, ExecOutcome::Exited(0));
        assert_eq!(out, format!("host{i}\n"));
    }
    assert_eq!(pool.connections_opened(), 5);
    for s in &servers {
        assert_eq!(s.accepted_logins(), 1);
    }
}

#[tokio::test]
async fn wrong_key_fails_auth_listing_what_was_tried() {
    let sshd = Sshd::start();
    let stranger = sshd.new_client_key("stranger", "ed25519", "", false);
    let mut host = sshd.host("web1");
    host.identity_files = vec![stranger.clone()];
    let err = exec_err(&SshPool::new(), &host, "true").await;
    match &err {
        SshError::Auth { user, tried, .. } => {
            assert_eq!(user, sshd.user());
            assert_eq!(tried.len(), 1, "{tried:?}");
            assert!(
                tried[0].contains(&stranger.display().to_string()),
                "{tried:?}"
            );
            assert!(tried[0].contains("SHA256:"), "{tried:?}");
        }
        other => panic!("expected Auth, got {other:?}"),
    }
    assert_eq!(err.kind(), "auth");
    assert!(!err.retryable());
    assert_eq!(sshd.accepted_logins(), 0);
}

#[tokio::test]
async fn changed_host_key_is_refused_before_auth() {
    let mut sshd = Sshd::start();
    let old_fingerprint = fingerprint_of(&sshd.host_key_path().with_extension("pub"));
    sshd.restart_with_new_host_key();
    let new_fingerprint = fingerprint_of(&sshd.host_key_path().with_extension("pub"));
    // known_hosts still holds the old key.
    for check in [HostKeyCheck::Strict, HostKeyCheck::AcceptNew] {
        let mut host = sshd.host("web1");
        host.host_key_check = check;
        let err = exec_err(&SshPool::new(), &host, "true").await;
        match &err {
            SshError::HostKeyMismatch {
                host,
                known_hosts_line,
                expected_fingerprint,
                got_fingerprint,
            } => {
                assert_eq!(host, "web1");
                assert!(
                    known_hosts_line.ends_with("known_hosts:1"),
                    "{known_hosts_line}"
                );
                assert_eq!(expected_fingerprint, &old_fingerprint);
                assert_eq!(got_fingerprint, &new_fingerprint);
            }
            other => panic!("expected HostKeyMismatch, got {other:?}"),
        }
        assert_eq!(err.kind(), "host_key_mismatch");
        assert!(!err.retryable());
    }
    // No credential was ever offered: sshd logs every publickey attempt at VERBOSE.
    let log = sshd.log();
    assert!(
        !log.contains("publickey"),
        "sshd saw an auth attempt:\n{log}"
    );
    let known = std::fs::read_to_string(sshd.known_hosts_path()).expect("known_hosts");
    assert_eq!(
        known.lines().count(),
        1,
        "accept-new must not add a changed key"
    );
}

#[tokio::test]
async fn unknown_host_key_is_refused_when_strict() {
    let sshd = Sshd::start();
    let mut host = sshd.host("web1");
    host.known_hosts = sshd.dir().join("empty_known_hosts");
    let err = exec_err(&SshPool::new(), &host, "true").await;
    match &err {
        SshError::HostKeyUnknown {
            fingerprint,
            known_hosts,
            ..
        } => {
            assert_eq!(
                fingerprint,
                &fingerprint_of(&sshd.host_key_path().with_extension("pub"))
            );
            assert_eq!(known_hosts, &host.known_hosts);
        }
        other => panic!("expected HostKeyUnknown, got {other:?}"),
    }
    assert!(!sshd.log().contains("publickey"));
    assert!(!host.known_hosts.exists());
}

#[tokio::test]
async fn accept_new_records_the_key_and_reports_it() {
    let sshd = Sshd::start();
    let pool = SshPool::new();
    let mut host = sshd.host("web1");
    host.known_hosts = sshd.dir().join("tofu").join("known_hosts");
    host.host_key_check = HostKeyCheck::AcceptNew;
    let (outcome, _) = exec(&pool, &host, &cmd("true")).await;
    assert_eq!(outcome, ExecOutcome::Exited(0));

    let accepted = pool.take_accepted_keys();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].host, "web1");
    assert_eq!(
        accepted[0].fingerprint,
        fingerprint_of(&sshd.host_key_path().with_extension("pub"))
    );
    assert_eq!(accepted[0].known_hosts, host.known_hosts);
    assert!(pool.take_accepted_keys().is_empty());

    let written = std::fs::read_to_string(&host.known_hosts).expect("known_hosts written");
    assert_eq!(written, sshd.known_hosts_line());

    // The recorded key is now trusted strictly, by a fresh pool.
    host.host_key_check = HostKeyCheck::Strict;
    let fresh = SshPool::new();
    let (outcome, _) = exec(&fresh, &host, &cmd("true")).await;
    assert_eq!(outcome, ExecOutcome::Exited(0));
    assert!(fresh.take_accepted_keys().is_empty());
}

#[tokio::test]
async fn hashed_known_hosts_entries_match() {
    let sshd = Sshd::start();
    let status = Command::new("ssh-keygen")
        .arg("-H")
        .arg("-f")
        .arg(sshd.known_hosts_path())
        .output()
        .expect("ssh-keygen -H");
    assert!(status.status.success());
    let hashed = std::fs::read_to_string(sshd.known_hosts_path()).expect("known_hosts");
    assert!(hashed.starts_with("|1|"), "{hashed}");
    let (outcome, _) = exec(&SshPool::new(), &sshd.host("web1"), &cmd("true")).await;
    assert_eq!(outcome, ExecOutcome::Exited(0));
}

#[tokio::test]
async fn encrypted_key_uses_the_passphrase_variable() {
    let sshd = Sshd::start();
    let key = sshd.new_client_key("encrypted", "ed25519", "correct horse", true);
    let mut host = sshd.host("web1");
    host.identity_files = vec![key.clone()];

    host.passphrase_env = None;
    let err = exec_err(&SshPool::new(), &host, "true").await;
    assert!(
        matches!(&err, SshError::Key { path, reason } if path == &key && reason.contains("encrypted")),
        "{err:?}"
    );
    assert!(!err.retryable());

    // Only this test touches these variables; std serialises environment access.
    std::env::set_var("RUNBOOK_TEST_SSH_PASS_GOOD", "correct horse");
    std::env::set_var("RUNBOOK_TEST_SSH_PASS_BAD", "battery staple");
    host.passphrase_env = Some("RUNBOOK_TEST_SSH_PASS_UNSET".into());
    let err = exec_err(&SshPool::new(), &host, "true").await;
    assert!(
        matches!(&err, SshError::Key { reason, .. } if reason.contains("RUNBOOK_TEST_SSH_PASS_UNSET")),
        "{err:?}"
    );
    host.passphrase_env = Some("RUNBOOK_TEST_SSH_PASS_BAD".into());
    let err = exec_err(&SshPool::new(), &host, "true").await;
    assert!(matches!(&err, SshError::Key { .. }), "{err:?}");
    assert_eq!(sshd.accepted_logins(), 0);

    host.passphrase_env = Some("RUNBOOK_TEST_SSH_PASS_GOOD".into());
    let (outcome, _) = exec(&SshPool::new(), &host, &cmd("true")).await;
    assert_eq!(outcome, ExecOutcome::Exited(0));
}

#[tokio::test]
async fn rsa_and_ecdsa_client_keys() {
    let sshd = Sshd::start();
    for kind in ["rsa", "ecdsa"] {
        let key = sshd.new_client_key(&format!("id_{kind}"), kind, "", true);
        let mut host = sshd.host(kind);
        host.identity_files = vec![key];
        let (outcome, cap) = exec(&SshPool::new(), &host, &cmd("echo ok")).await;
        assert_eq!(outcome, ExecOutcome::Exited(0), "{kind}");
        assert_eq!(cap.out(), "ok\n");
    }
    // OpenSSH refuses SHA-1 `ssh-rsa` signatures, so the RSA login proves rsa-sha2 was used.
    let log = sshd.log();
    assert!(
        log.contains("Accepted publickey") && log.contains("RSA SHA256:"),
        "{log}"
    );
    assert!(log.contains("ECDSA SHA256:"), "{log}");
}

#[tokio::test]
async fn rsa_and_ecdsa_host_keys() {
    for kind in ["rsa", "ecdsa"] {
        let sshd = Sshd::start_with_host_key(kind);
        let (outcome, _) = exec(&SshPool::new(), &sshd.host("web1"), &cmd("true")).await;
        assert_eq!(outcome, ExecOutcome::Exited(0), "{kind}");
    }
}

/// RHEL/Rocky 9 under the FIPS crypto policy offer no curve25519 and no ed25519: the NIST
/// curves are what is left besides slow finite-field Diffie-Hellman.
#[tokio::test]
async fn fips_policy_server_negotiates_nist_ecdh() {
    let sshd = Sshd::start_with(
        "ecdsa",
        "KexAlgorithms ecdh-sha2-nistp256,ecdh-sha2-nistp384,diffie-hellman-group14-sha256\n\
         HostKeyAlgorithms ecdsa-sha2-nistp256\n\
         LogLevel DEBUG1",
    );
    let (outcome, _) = exec(&SshPool::new(), &sshd.host("web1"), &cmd("true")).await;
    assert_eq!(outcome, ExecOutcome::Exited(0));
    let log = sshd.log();
    assert!(log.contains("kex: algorithm: ecdh-sha2-nistp256"), "{log}");
}

#[tokio::test]
async fn no_common_key_exchange_names_both_sides_and_is_not_retried() {
    // SHA-1 group 14: OpenSSH still has it, runbook (like OpenSSH's client) does not offer it.
    let sshd = Sshd::start_with("ed25519", "KexAlgorithms diffie-hellman-group14-sha1");
    let err = exec_err(&SshPool::new(), &sshd.host("web1"), "true").await;
    match &err {
        SshError::Negotiation {
            what, theirs, ours, ..
        } => {
            assert_eq!(*what, "key exchange");
            assert_eq!(theirs, &["diffie-hellman-group14-sha1"], "{err}");
            assert!(ours.iter().any(|a| a == "curve25519-sha256"), "{err}");
            assert!(ours.iter().any(|a| a == "ecdh-sha2-nistp256"), "{err}");
            assert!(!ours.iter().any(|a| a.starts_with("kex-strict")), "{err}");
        }
        other => panic!("expected Negotiation, got {other:?}"),
    }
    assert_eq!(err.kind(), "negotiation");
    assert!(!err.retryable());
    assert!(
        err.to_string().starts_with(
            "no key exchange algorithm in common with `web1`: the server offers \
             diffie-hellman-group14-sha1; runbook offers "
        ),
        "{err}"
    );
    assert_eq!(sshd.accepted_logins(), 0);
}

#[tokio::test]
async fn agent_keys_are_offered() {
    let sshd = Sshd::start();
    let socket = sshd.dir().join("agent.sock");
    let mut agent = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&socket)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ssh-agent");
    let give_up = Instant::now() + Duration::from_secs(10);
    while !socket.exists() && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(20));
    }
    let added = Command::new("ssh-add")
        .arg(sshd.client_key_path())
        .env("SSH_AUTH_SOCK", &socket)
        .output()
        .expect("ssh-add");
    assert!(added.status.success(), "{added:?}");

    let mut host = sshd.host("web1");
    host.identity_files = vec![sshd.new_client_key("not_authorized", "ed25519", "", false)];
    host.use_agent = true;
    let pool = SshPool::with_agent_socket(&socket);
    let result = pool
        .exec(
            &host,
            &cmd("echo via-agent"),
            &mut Capture::new().sink,
            &CancellationToken::new(),
        )
        .await;
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(result.expect("agent auth"), ExecOutcome::Exited(0));
}

#[tokio::test]
async fn upload_is_atomic_with_mode() {
    let sshd = Sshd::start();
    let pool = SshPool::new();
    let host = sshd.host("web1");
    let target_dir = sshd.dir().join("etc app");
    std::fs::create_dir(&target_dir).expect("dir");
    let dest = target_dir.join("it's.conf");
    std::fs::write(&dest, "old").expect("old file");
    let content = Bytes::from(
        (0..200_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let req = UploadRequest {
        content: content.clone(),
        dest: dest.display().to_string(),
        mode: Some(0o640),
        sudo: false,
    };
    pool.upload(&host, &req, &CancellationToken::new())
        .await
        .expect("upload");
    assert_eq!(std::fs::read(&dest).expect("read back"), content.to_vec());
    let (outcome, cap) = exec(
        &pool,
        &host,
        &cmd(&format!(
            "stat -c %a '{}'",
            dest.display().to_string().replace('\'', r"'\''")
        )),
    )
    .await;
    assert_eq!(outcome, ExecOutcome::Exited(0));
    assert_eq!(cap.out(), "640\n");
    let leftovers: Vec<_> = std::fs::read_dir(&target_dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "temporary files left: {leftovers:?}");

    let missing = UploadRequest {
        dest: sshd.dir().join("no/such/dir/file").display().to_string(),
        ..req
    };
    let err = pool
        .upload(&host, &missing, &CancellationToken::new())
        .await
        .expect_err("no directory");
    assert!(
        matches!(&err, SshError::Upload { status: Some(s), .. } if *s != 0),
        "{err:?}"
    );
    assert_eq!(pool.connections_opened(), 1);
}

#[tokio::test]
async fn sudo_runs_as_root_or_fails_without_prompting() {
    let sshd = Sshd::start();
    let pool = SshPool::new();
    let host = sshd.host("web1");
    let req = ExecRequest {
        command: "id -un; echo \"$X\"".into(),
        sudo: true,
        env: vec![("X".into(), "kept".into())],
        ..ExecRequest::default()
    };
    let sudo_works = Command::new("sudo")
        .args(["-n", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !sudo_works {
        // A refused sudo is its own failure (it used to be a plain exit 1).
        let err = exec_result(&pool, &host, &req)
            .await
            .0
            .expect_err("sudo refused");
        assert!(matches!(err, SshError::SudoRefused { .. }), "{err:?}");
        return;
    }
    let (outcome, cap) = exec(&pool, &host, &req).await;
    if sudo_works {
        assert_eq!(outcome, ExecOutcome::Exited(0), "{}", cap.err());
        assert_eq!(cap.out(), "root\nkept\n");
        let dest = sshd.dir().join("by-root");
        let upload = UploadRequest {
            content: Bytes::from_static(b"x"),
            dest: dest.display().to_string(),
            mode: Some(0o600),
            sudo: true,
        };
        pool.upload(&host, &upload, &CancellationToken::new())
            .await
            .expect("sudo upload");
        assert_eq!(std::fs::read(&dest).expect("uploaded"), b"x");
    } else {
        // Without passwordless sudo, `-n` makes sudo fail at once instead of prompting.
        eprintln!("passwordless sudo unavailable: checking that sudo -n fails without a prompt");
        drop((outcome, cap));
    }
}

/// An sshd not running as root cannot hand a pty to the user where `/dev/pts` needs a chown
/// (containers): it refuses the request, which must then surface as a channel error.
fn pty_refused_to_non_root_sshd(sshd: &Sshd, result: &Result<ExecOutcome, SshError>) -> bool {
    let refused = matches!(result, Err(SshError::Channel { reason, .. }) if reason.contains("pty"));
    if refused && sshd.log().contains("chown(/dev/pts") && !sshd::is_root() {
        eprintln!("sshd runs as a normal user and cannot allocate a pty here: checked the refusal");
        return true;
    }
    false
}

#[tokio::test]
async fn pty_is_allocated_on_request() {
    let sshd = Sshd::start();
    let pool = SshPool::new();
    let host = sshd.host("web1");
    let probe = "if [ -t 1 ]; then echo tty; else echo no-tty; fi";
    let (_, cap) = exec(&pool, &host, &cmd(probe)).await;
    assert_eq!(cap.out(), "no-tty\n");
    let req = ExecRequest {
        pty: true,
        ..cmd(probe)
    };
    let mut cap = Capture::new();
    let result = pool
        .exec(&host, &req, &mut cap.sink, &CancellationToken::new())
        .await;
    if pty_refused_to_non_root_sshd(&sshd, &result) {
        return;
    }
    let outcome = result.unwrap_or_else(|e| panic!("{e}; sshd log:\n{}", sshd.log()));
    assert_eq!(outcome, ExecOutcome::Exited(0));
    assert_eq!(cap.out(), "tty\n");
}

#[tokio::test]
async fn timeout_stops_the_remote_process() {
    let sshd = Sshd::start();
    let pool = SshPool::new();
    let host = sshd.host("web1");
    let mut pty_refused = false;
    for pty in [false, true] {
        let sleep = unique_sleep();
        let req = ExecRequest {
            command: format!("{sleep}; echo never"),
            pty,
            timeout: Some(Duration::from_millis(500)),
            ..ExecRequest::default()
        };
        let mut cap = Capture::new();
        let result = pool
            .exec(&host, &req, &mut cap.sink, &CancellationToken::new())
            .await;
        if pty && pty_refused_to_non_root_sshd(&sshd, &result) {
            // That sshd also drops the connection ("aborting").
            pty_refused = true;
            continue;
        }
        let outcome = result.unwrap_or_else(|e| panic!("{e}; sshd log:\n{}", sshd.log()));
        assert_eq!(outcome, ExecOutcome::TimedOut(Duration::from_millis(500)));
        assert!(!cap.out().contains("never"));
        assert!(
            processes_gone(&sleep),
            "`{sleep}` still runs (pty: {pty}); sshd log:\n{}",
            sshd.log()
        );
    }
    // The connection survives a stopped command.
    let (outcome, _) = exec(&pool, &host, &cmd("true")).await;
    assert_eq!(outcome, ExecOutcome::Exited(0));
    assert_eq!(pool.connections_opened(), if pty_refused { 2 } else { 1 });
}

#[tokio::test]
async fn timeout_stops_loops_and_processes_that_left_the_group() {
    // A shell loop survives its child's death, and `setsid` escapes the session's process
    // group: neither may outlive the step.
    let sshd = Sshd::start();
    let pool = SshPool::new();
    let host = sshd.host("web1");
    let looped = unique_sleep();
    let escaped = unique_sleep();
    let req = ExecRequest {
        command: format!(
            "setsid sh -c '{escaped}' </dev/null >/dev/null 2>&1 & \
             while :; do {looped}; done"
        ),
        timeout: Some(Duration::from_millis(500)),
        kill_grace: Duration::from_secs(1),
        ..ExecRequest::default()
    };
    let (outcome, _) = exec(&pool, &host, &req).await;
    assert_eq!(outcome, ExecOutcome::TimedOut(Duration::from_millis(500)));
    assert!(processes_gone(&looped), "the loop still runs");
    assert!(processes_gone(&escaped), "the setsid child still runs");
}

#[tokio::test]
async fn cancel_stops_the_remote_process() {
    let sshd = Sshd::start();
    let pool = SshPool::new();
    let host = sshd.host("web1");
    let sleep = unique_sleep();
    let cancel = CancellationToken::new();
    let mut cap = Capture::cancel_on(Some(("started", cancel.clone())));
    let outcome = pool
        .exec(
            &host,
            &cmd(&format!("echo started; {sleep}")),
            &mut cap.sink,
            &cancel,
        )
        .await
        .expect("exec");
    assert_eq!(outcome, ExecOutcome::Cancelled);
    assert!(cap.stdout.lock().expect("lock").contains("started"));
    assert!(processes_gone(&sleep), "`{sleep}` still runs");

    // Already cancelled: nothing starts.
    let outcome = pool
        .exec(&host, &cmd("true"), &mut Capture::new().sink, &cancel)
        .await
        .expect("exec");
    assert_eq!(outcome, ExecOutcome::Cancelled);
}

#[tokio::test]
async fn stopped_server_is_refused_then_reconnected_after_restart() {
    let mut sshd = Sshd::start();
    let pool = SshPool::new();
    let host = sshd.host("web1");
    let (outcome, _) = exec(&pool, &host, &cmd("true")).await;
    assert_eq!(outcome, ExecOutcome::Exited(0));

    sshd.stop();
    let err = exec_err(&pool, &host, "true").await;
    assert!(matches!(err, SshError::ConnectRefused { .. }), "{err:?}");
    assert_eq!(err.kind(), "connect_refused");
    assert!(err.retryable());

    sshd.restart();
    let (outcome, _) = exec(&pool, &host, &cmd("echo back")).await;
    assert_eq!(outcome, ExecOutcome::Exited(0));
    assert_eq!(pool.connections_opened(), 2);
}

#[tokio::test]
async fn silent_server_times_out_the_connect() {
    // Accepts TCP (the kernel backlog does) but never speaks SSH.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let sshd = Sshd::start();
    let mut host = sshd.host("silent");
    host.port = listener.local_addr().expect("addr").port();
    host.connect_timeout = Duration::from_millis(300);
    let err = exec_err(&SshPool::new(), &host, "true").await;
    assert!(matches!(err, SshError::ConnectTimeout { .. }), "{err:?}");
    assert!(err.retryable());
}

#[tokio::test]
async fn proxy_jump_tunnels_through_the_bastion() {
    let bastion = Sshd::start();
    let target = Sshd::start();
    let pool = SshPool::new();
    let mut host = target.host("app1");
    host.proxy_jump = Some(Box::new(bastion.host("bastion")));
    for _ in 0..2 {
        let (outcome, cap) = exec(&pool, &host, &cmd("echo $SSH_CONNECTION")).await;
        assert_eq!(outcome, ExecOutcome::Exited(0));
        // The target sees the connection come from the bastion's forwarding, on its own port.
        assert!(
            cap.out().contains(&format!(" {}", target.port())),
            "{}",
            cap.out()
        );
    }
    assert_eq!(
        pool.connections_opened(),
        2,
        "bastion + tunnelled target, each once"
    );
    assert_eq!(bastion.accepted_logins(), 1);
    assert_eq!(target.accepted_logins(), 1);
}

#[tokio::test]
async fn proxy_jump_loop_is_refused() {
    let sshd = Sshd::start();
    let mut a = sshd.host("a");
    let mut b = sshd.host("b");
    b.proxy_jump = Some(Box::new(a.clone()));
    a.proxy_jump = Some(Box::new(b));
    let err = exec_err(&SshPool::new(), &a, "true").await;
    assert!(matches!(err, SshError::InvalidRequest { .. }), "{err:?}");
}

#[tokio::test]
async fn dropped_connection_is_a_channel_error_then_reopened() {
    let sshd = Sshd::start();
    let pool = SshPool::new();
    let host = sshd.host("web1");
    // The command's parent is sshd's process for this connection: killing it ends the
    // connection with no exit status sent.
    let err = exec_err(&pool, &host, "kill -KILL $PPID; sleep 5").await;
    assert!(
        matches!(&err, SshError::Channel { reason, .. } if reason.contains("without an exit status")),
        "{err:?}"
    );
    assert!(err.retryable());
    let (outcome, cap) = exec(&pool, &host, &cmd("echo again")).await;
    assert_eq!(outcome, ExecOutcome::Exited(0));
    assert_eq!(cap.out(), "again\n");
    assert_eq!(pool.connections_opened(), 2);
}

// ---- ssh_config -------------------------------------------------------------------------

/// `ssh -G` for `name` with only `config` read: keyword → values (one per line).
fn ssh_g(config: &Path, name: &str) -> std::collections::HashMap<String, Vec<String>> {
    let out = Command::new("ssh")
        .arg("-G")
        .arg("-F")
        .arg(config)
        .arg(name)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("ssh -G");
    assert!(out.status.success(), "ssh -G {name}: {out:?}");
    let mut map: std::collections::HashMap<String, Vec<String>> = Default::default();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some((k, v)) = line.split_once(' ') {
            map.entry(k.to_string()).or_default().push(v.to_string());
        }
    }
    map
}

/// A config corpus with aliases, wildcards and negation, `Include` with a glob, and `Match`
/// on host, original host and user, all paths absolute (`ssh -G` prints them unexpanded).
fn write_ssh_config(dir: &Path) -> std::path::PathBuf {
    let d = dir.display();
    std::fs::create_dir_all(dir.join("conf.d")).expect("conf.d");
    std::fs::write(
        dir.join("conf.d/10-db.conf"),
        "Host db1\n    HostName db1.internal.example.com\n    User postgres\n",
    )
    .expect("include");
    std::fs::write(
        dir.join("conf.d/20-other.conf"),
        "Host app9\n  HostName=10.9.9.9\n",
    )
    .expect("include");
    let main = dir.join("config");
    std::fs::write(
        &main,
        format!(
            "# operators' config\n\
             Include {d}/conf.d/*.conf\n\
             Host app1\n\
             \x20   HostName 10.1.0.1\n\
             \x20   User deploy\n\
             \x20   Port 2201\n\
             \x20   IdentityFile {d}/id_app\n\
             \x20   IdentityFile \"{d}/id_app2\"\n\
             \x20   CertificateFile {d}/id_app-cert.pub\n\
             Match final originalhost app2\n\
             \x20   ConnectTimeout 3\n\
             \x20   Port 2299\n\
             Host app* !app9\n\
             \x20   User ops\n\
             \x20   IdentitiesOnly yes\n\
             \x20   ConnectTimeout 7\n\
             Match host 10.1.0.* user deploy\n\
             \x20   ProxyJump bastion\n\
             \x20   UserKnownHostsFile {d}/kh_lab {d}/kh_other\n\
             Match originalhost db*\n\
             \x20   Port 5522\n\
             \x20   StrictHostKeyChecking accept-new\n\
             Match !host *.example.com\n\
             \x20   ServerAliveInterval 1m30s\n\
             Host *.example.com\n\
             \x20   StrictHostKeyChecking no\n\
             Host *\n\
             \x20   StrictHostKeyChecking yes\n\
             \x20   User fallback\n"
        ),
    )
    .expect("config");
    main
}

#[test]
fn ssh_config_resolves_like_ssh_g() {
    use runbook_steps::ssh::config::SshConfigReader;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_ssh_config(dir.path());
    let reader = SshConfigReader::new();
    for name in [
        "app1",
        "app2",
        "app9",
        "db1",
        "db2",
        "web.example.com",
        "other",
    ] {
        let ours = reader
            .resolve(std::slice::from_ref(&config), name, None, None)
            .expect("resolve");
        let g = ssh_g(&config, name);
        let one = |k: &str| {
            g.get(k)
                .and_then(|v| v.first())
                .cloned()
                .unwrap_or_default()
        };
        let show = |v: &[runbook_steps::ssh::config::Sourced<std::path::PathBuf>]| {
            v.iter()
                .map(|s| s.value.display().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ours.host_name
                .as_ref()
                .map_or(name.to_string(), |h| h.value.clone()),
            one("hostname"),
            "{name}: hostname"
        );
        let local = sshd::run(Command::new("id").arg("-un")).trim().to_string();
        assert_eq!(
            ours.user.as_ref().map_or(local, |u| u.value.clone()),
            one("user"),
            "{name}: user"
        );
        assert_eq!(
            ours.port.as_ref().map_or(22, |p| p.value).to_string(),
            one("port"),
            "{name}: port"
        );
        if !ours.identity_files.is_empty() {
            assert_eq!(
                show(&ours.identity_files),
                g["identityfile"],
                "{name}: identityfile"
            );
        }
        assert_eq!(
            show(&ours.certificate_files),
            g.get("certificatefile").cloned().unwrap_or_default(),
            "{name}: certificatefile"
        );
        assert_eq!(
            if ours.identities_only.as_ref().is_some_and(|s| s.value) {
                "yes"
            } else {
                "no"
            },
            one("identitiesonly"),
            "{name}: identitiesonly"
        );
        assert_eq!(
            ours.proxy_jump.as_ref().map(|p| p.value.clone()),
            g.get("proxyjump").and_then(|v| v.first()).cloned(),
            "{name}: proxyjump"
        );
        if let Some(files) = &ours.user_known_hosts_file {
            let files: Vec<String> = files
                .value
                .iter()
                .map(|f| f.display().to_string())
                .collect();
            assert_eq!(files.join(" "), one("userknownhostsfile"), "{name}");
        }
        let strict = match ours
            .strict_host_key_checking
            .as_ref()
            .map(|s| s.value.as_str())
        {
            None => "ask",
            Some("yes") => "true",
            Some("no") => "false",
            Some(other) => other,
        };
        assert_eq!(strict, one("stricthostkeychecking"), "{name}: strict");
        assert_eq!(
            ours.connect_timeout
                .as_ref()
                .map_or("none".to_string(), |c| c.value.to_string()),
            one("connecttimeout"),
            "{name}: connecttimeout"
        );
        assert_eq!(
            ours.server_alive_interval
                .as_ref()
                .map_or(0, |c| c.value)
                .to_string(),
            one("serveraliveinterval"),
            "{name}: serveraliveinterval"
        );
    }
    // Where values came from, as `inventory show --settings` prints it.
    let app1 = reader
        .resolve(std::slice::from_ref(&config), "app1", None, None)
        .expect("resolve");
    assert_eq!(
        app1.port.expect("port").origin,
        format!("{}:6", config.display())
    );
    let db1 = reader
        .resolve(std::slice::from_ref(&config), "db1", None, None)
        .expect("resolve");
    assert_eq!(
        db1.user.expect("user").origin,
        format!("{}/conf.d/10-db.conf:3", dir.path().display())
    );
}

/// An inventory that names hosts by their ssh_config alias only: address, port, user, key,
/// known_hosts and the bastion all come from the config; the inventory wins where it sets
/// a key.
#[tokio::test]
async fn inventory_hosts_take_unset_settings_from_ssh_config() {
    let target = Sshd::start();
    let bastion = Sshd::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let known = dir.path().join("known_hosts");
    std::fs::write(
        &known,
        format!(
            "{}{}",
            target.known_hosts_line(),
            bastion.known_hosts_line()
        ),
    )
    .expect("known_hosts");
    let config = dir.path().join("ssh_config");
    std::fs::write(
        &config,
        format!(
            "Host jump\n  HostName 127.0.0.1\n  Port {bport}\n  IdentityFile {bkey}\n\
             Host app*\n  HostName 127.0.0.1\n  User {user}\n\
             Match originalhost app1\n  Port {port}\n  ProxyJump jump\n\
             Host *\n  IdentityFile {key}\n  UserKnownHostsFile {known}\n  IdentitiesOnly yes\n",
            bport = bastion.port(),
            bkey = bastion.client_key_path().display(),
            port = target.port(),
            user = target.user(),
            key = target.client_key_path().display(),
            known = known.display(),
        ),
    )
    .expect("ssh_config");
    let inventory = format!(
        "[defaults]\nssh_config = \"{}\"\n\n[hosts.app1]\n\n[hosts.app2]\nport = {}\nuser = \"{}\"\n",
        config.display(),
        target.port(),
        target.user()
    );
    let mut inv = runbook_engine::inventory::parse_str("inventory.toml", &inventory)
        .unwrap_or_else(|d| panic!("{d:?}"));
    inv.use_ssh_config(runbook_steps::ssh::config::inventory_lookup())
        .expect("ssh_config applies");
    let app1 = inv.host("app1").expect("app1").clone();
    assert_eq!(app1.address, "127.0.0.1");
    assert_eq!(app1.port, target.port());
    assert_eq!(app1.known_hosts, known);
    assert!(!app1.use_agent, "IdentitiesOnly turns the agent off");
    assert_eq!(app1.proxy_jump.as_deref(), Some("jump"));
    assert_eq!(
        app1.sources["port"],
        format!("ssh_config {}:9", config.display())
    );
    // The bastion from the config is reachable as a jump but not an inventory host.
    assert!(inv.host("jump").is_none());
    let chain = inv.jump_chain(&app1);
    assert_eq!(chain.len(), 1);
    assert_eq!(chain[0].port, bastion.port());
    let app2 = inv.host("app2").expect("app2").clone();
    assert_eq!(app2.sources["port"], "inventory");
    assert!(app2.proxy_jump.is_none());

    let pool = SshPool::new();
    for host in [&app1, &app2] {
        let ssh_host = SshHost::from_inventory(host, &inv.jump_chain(host));
        let (outcome, cap) = exec(&pool, &ssh_host, &cmd("echo via-config")).await;
        assert_eq!(outcome, ExecOutcome::Exited(0), "{}", cap.err());
        assert_eq!(cap.out(), "via-config\n");
    }
    assert_eq!(
        bastion.accepted_logins(),
        1,
        "app1 went through the bastion"
    );
}

// ---- certificates -----------------------------------------------------------------------

fn ca_key(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    sshd::keygen(&path, "ed25519", "");
    path
}

fn public_line(key: &Path) -> String {
    let text = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
    let mut f = text.split_whitespace();
    format!("{} {}", f.next().unwrap_or(""), f.next().unwrap_or(""))
}

#[tokio::test]
async fn host_certificates_are_checked_against_cert_authorities() {
    let mut sshd = Sshd::start();
    let ca = ca_key(sshd.dir(), "host_ca");
    let other_ca = ca_key(sshd.dir(), "other_ca");
    sshd.use_host_certificate(&ca, "127.0.0.1");
    let known = sshd.dir().join("known_hosts_ca");
    let mut host = sshd.host("web1");
    host.known_hosts = known.clone();

    // Only a CA line, with a host pattern: the certificate is what vouches for the host.
    std::fs::write(
        &known,
        format!("@cert-authority [127.0.0.1]:* {}\n", public_line(&ca)),
    )
    .expect("known_hosts");
    let (outcome, _) = exec(&SshPool::new(), &host, &cmd("true")).await;
    assert_eq!(outcome, ExecOutcome::Exited(0));

    // Another CA for this host: refused before any credential.
    std::fs::write(
        &known,
        format!("@cert-authority [127.0.0.1]:* {}\n", public_line(&other_ca)),
    )
    .expect("known_hosts");
    let logins = sshd.accepted_logins();
    let err = exec_err(&SshPool::new(), &host, "true").await;
    assert!(
        matches!(&err, SshError::HostCertificate { reason, .. } if reason.contains("not the @cert-authority")),
        "{err:?}"
    );
    assert!(!err.retryable());
    // The CA's pattern does not cover this host: no CA applies, the plain key is asked for.
    std::fs::write(
        &known,
        format!("@cert-authority *.example.com {}\n", public_line(&ca)),
    )
    .expect("known_hosts");
    let err = exec_err(&SshPool::new(), &host, "true").await;
    assert!(matches!(&err, SshError::HostKeyUnknown { .. }), "{err:?}");
    // A revoked CA.
    std::fs::write(
        &known,
        format!(
            "@cert-authority [127.0.0.1]:* {ca}\n@revoked * {ca}\n",
            ca = public_line(&ca)
        ),
    )
    .expect("known_hosts");
    let err = exec_err(&SshPool::new(), &host, "true").await;
    assert!(
        matches!(&err, SshError::HostCertificate { reason, .. } if reason.contains("@revoked")),
        "{err:?}"
    );
    assert_eq!(sshd.accepted_logins(), logins);
}

#[tokio::test]
async fn host_certificate_for_another_name_is_refused() {
    let mut sshd = Sshd::start();
    let ca = ca_key(sshd.dir(), "host_ca");
    sshd.use_host_certificate(&ca, "other.example.com");
    let mut host = sshd.host("web1");
    host.known_hosts = sshd.dir().join("known_hosts_ca");
    std::fs::write(
        &host.known_hosts,
        format!("@cert-authority * {}\n", public_line(&ca)),
    )
    .expect("known_hosts");
    let err = exec_err(&SshPool::new(), &host, "true").await;
    assert!(
        matches!(&err, SshError::HostCertificate { reason, .. } if reason.contains("other.example.com")),
        "{err:?}"
    );
}

/// Signs `key`'s public half as a user certificate for `principal`.
fn sign_user_key(ca: &Path, key: &Path, principal: &str) -> std::path::PathBuf {
    sshd::run(
        Command::new("ssh-keygen")
            .args(["-q", "-s"])
            .arg(ca)
            .args(["-I", "runbook-test-user", "-n", principal])
            .arg(key.with_extension("pub")),
    );
    let mut cert = key.as_os_str().to_owned();
    cert.push("-cert.pub");
    std::path::PathBuf::from(cert)
}

#[tokio::test]
async fn user_certificates_beside_the_key_and_from_certificate_file() {
    let mut sshd = Sshd::start();
    let ca = ca_key(sshd.dir(), "user_ca");
    sshd.reconfigure(&format!(
        "TrustedUserCAKeys {}",
        ca.with_extension("pub").display()
    ));
    // Not in authorized_keys: only a certificate gets it in.
    let key = sshd.new_client_key("id_cert", "ed25519", "", false);
    let mut host = sshd.host("web1");
    host.identity_files = vec![key.clone()];
    let err = exec_err(&SshPool::new(), &host, "true").await;
    assert!(matches!(&err, SshError::Auth { .. }), "{err:?}");

    let cert = sign_user_key(&ca, &key, sshd.user());
    let (outcome, _) = exec(&SshPool::new(), &host, &cmd("true")).await;
    assert_eq!(
        outcome,
        ExecOutcome::Exited(0),
        "<key>-cert.pub beside the key"
    );

    let elsewhere = sshd.dir().join("issued.cert");
    std::fs::rename(&cert, &elsewhere).expect("move the certificate");
    let err = exec_err(&SshPool::new(), &host, "true").await;
    assert!(matches!(&err, SshError::Auth { .. }), "{err:?}");
    host.certificate_files = vec![elsewhere];
    let (outcome, _) = exec(&SshPool::new(), &host, &cmd("true")).await;
    assert_eq!(outcome, ExecOutcome::Exited(0), "CertificateFile");
}

#[tokio::test]
async fn user_certificate_held_by_the_agent() {
    let mut sshd = Sshd::start();
    let ca = ca_key(sshd.dir(), "user_ca");
    sshd.reconfigure(&format!(
        "TrustedUserCAKeys {}",
        ca.with_extension("pub").display()
    ));
    let key = sshd.new_client_key("id_agent", "ed25519", "", false);
    sign_user_key(&ca, &key, sshd.user());
    let socket = sshd.dir().join("agent.sock");
    let mut agent = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&socket)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ssh-agent");
    let give_up = Instant::now() + Duration::from_secs(10);
    while !socket.exists() && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(20));
    }
    // ssh-add loads the key and the certificate beside it; then neither file is needed.
    let added = Command::new("ssh-add")
        .arg(&key)
        .env("SSH_AUTH_SOCK", &socket)
        .output()
        .expect("ssh-add");
    assert!(added.status.success(), "{added:?}");
    let listed = Command::new("ssh-add")
        .arg("-l")
        .env("SSH_AUTH_SOCK", &socket)
        .output()
        .expect("ssh-add -l");
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("CERT"),
        "{listed:?}"
    );
    std::fs::remove_file(&key).expect("remove key");

    let mut host = sshd.host("web1");
    host.identity_files = vec![sshd.new_client_key("not_authorized", "ed25519", "", false)];
    host.use_agent = true;
    let pool = SshPool::with_agent_socket(&socket);
    let mut cap = Capture::new();
    let result = pool
        .exec(
            &host,
            &cmd("echo via-cert"),
            &mut cap.sink,
            &CancellationToken::new(),
        )
        .await;
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(
        result.expect("agent certificate auth"),
        ExecOutcome::Exited(0)
    );
    assert!(sshd.log().contains("Accepted publickey"), "{}", sshd.log());
}

// ---- one address, many hosts; MaxSessions 1 --------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_hosts_behind_one_address_with_strict_max_startups() {
    let sshd = Sshd::start_with("ed25519", "MaxStartups 3:100:3");
    let pool = SshPool::new();
    let runs = (0..10).map(|i| {
        let pool = pool.clone();
        let host = sshd.host(&format!("node-{i:02}"));
        tokio::spawn(async move {
            let mut cap = Capture::new();
            pool.exec(
                &host,
                &cmd("echo up"),
                &mut cap.sink,
                &CancellationToken::new(),
            )
            .await
            .map(|o| (o, cap.out()))
        })
    });
    for run in futures_join(runs).await {
        let (outcome, out) = run
            .expect("task")
            .unwrap_or_else(|e| panic!("{e}; sshd log:\n{}", sshd.log()));
        assert_eq!(outcome, ExecOutcome::Exited(0));
        assert_eq!(out, "up\n");
    }
    assert_eq!(sshd.accepted_logins(), 10);
}

async fn futures_join<T>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = Vec::new();
    for h in handles.collect::<Vec<_>>() {
        out.push(h.await);
    }
    out
}

#[tokio::test]
async fn max_sessions_one_timeout_leaves_no_remote_process() {
    let sshd = Sshd::start_with("ed25519", "MaxSessions 1");
    let pool = SshPool::new();
    let host = sshd.host("web1");
    let sleep = unique_sleep();
    let req = ExecRequest {
        command: format!("{sleep}; echo never"),
        timeout: Some(Duration::from_millis(500)),
        kill_grace: Duration::from_secs(2),
        ..ExecRequest::default()
    };
    let (outcome, cap) = exec(&pool, &host, &req).await;
    assert_eq!(outcome, ExecOutcome::TimedOut(Duration::from_millis(500)));
    assert!(
        processes_gone(&sleep),
        "`{sleep}` still runs; sshd log:\n{}",
        sshd.log()
    );
    assert!(!cap.err().contains("could not be stopped"), "{}", cap.err());
    // The connection still serves the next command.
    let (outcome, cap) = exec(&pool, &host, &cmd("echo next")).await;
    assert_eq!(outcome, ExecOutcome::Exited(0));
    assert_eq!(cap.out(), "next\n");
}

// ---- keys and known_hosts ---------------------------------------------------------------

#[tokio::test]
async fn encrypted_legacy_ec_pem_key() {
    let sshd = Sshd::start();
    let key = sshd.dir().join("id_ec_pem");
    sshd::run(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ecdsa", "-m", "PEM", "-N", "pem pass", "-f"])
            .arg(&key),
    );
    let text = std::fs::read_to_string(&key).expect("key");
    assert!(
        text.contains("BEGIN EC PRIVATE KEY") && text.contains("DEK-Info"),
        "{text}"
    );
    sshd.authorize(&key);
    let mut host = sshd.host("web1");
    host.identity_files = vec![key.clone()];
    std::env::set_var("RUNBOOK_TEST_EC_PEM_GOOD", "pem pass");
    std::env::set_var("RUNBOOK_TEST_EC_PEM_BAD", "nope");
    host.passphrase_env = Some("RUNBOOK_TEST_EC_PEM_GOOD".into());
    let (outcome, _) = exec(&SshPool::new(), &host, &cmd("true")).await;
    assert_eq!(outcome, ExecOutcome::Exited(0));
    host.passphrase_env = Some("RUNBOOK_TEST_EC_PEM_BAD".into());
    let err = exec_err(&SshPool::new(), &host, "true").await;
    assert!(
        matches!(&err, SshError::Key { reason, .. } if reason.contains("wrong passphrase")),
        "{err:?}"
    );
    assert!(runbook_steps::ssh::key_is_encrypted(&key));
}

#[tokio::test]
async fn accept_new_writes_hashed_entries_into_a_hashed_file() {
    let sshd = Sshd::start();
    let other = Sshd::start();
    let known = sshd.dir().join("known_hosts_hashed");
    other.write_known_hosts(&known);
    sshd::run(Command::new("ssh-keygen").arg("-H").arg("-f").arg(&known));
    let mut host = sshd.host("web1");
    host.known_hosts = known.clone();
    host.host_key_check = HostKeyCheck::AcceptNew;
    let (outcome, _) = exec(&SshPool::new(), &host, &cmd("true")).await;
    assert_eq!(outcome, ExecOutcome::Exited(0));
    let text = std::fs::read_to_string(&known).expect("known_hosts");
    assert!(
        text.lines().all(|l| l.starts_with("|1|")),
        "a name in clear: {text}"
    );
    // OpenSSH itself finds the new entry.
    let found = Command::new("ssh-keygen")
        .arg("-F")
        .arg(format!("[127.0.0.1]:{}", sshd.port()))
        .arg("-f")
        .arg(&known)
        .output()
        .expect("ssh-keygen -F");
    assert!(found.status.success(), "{found:?}");
    // And runbook too, strictly, on a fresh pool.
    host.host_key_check = HostKeyCheck::Strict;
    let (outcome, _) = exec(&SshPool::new(), &host, &cmd("true")).await;
    assert_eq!(outcome, ExecOutcome::Exited(0));
}

// ---- sudo (become) ----------------------------------------------------------------------

fn sudo_req(command: &str) -> ExecRequest {
    ExecRequest {
        command: command.to_string(),
        sudo: true,
        ..ExecRequest::default()
    }
}

async fn exec_result(
    pool: &SshPool,
    host: &SshHost,
    req: &ExecRequest,
) -> (Result<ExecOutcome, SshError>, Capture) {
    let mut cap = Capture::new();
    let result = pool
        .exec(host, req, &mut cap.sink, &CancellationToken::new())
        .await;
    (result, cap)
}

#[tokio::test]
async fn sudo_with_a_password_and_an_explicit_user() {
    let Some(user) = sshd::TempUser::create() else {
        eprintln!("not root (or no useradd): cannot make a sudo user; skipped");
        return;
    };
    let password = "pw-9f2c-runbook";
    user.set_password(password);
    let u = &user.name;
    let _rule = sshd::SudoersRule::install(
        u,
        &format!("Defaults:{u} !lecture, timestamp_timeout=0\n{u} ALL=(ALL) ALL\n"),
    )
    .expect("sudoers rule");
    let sshd = Sshd::start_for_user(&user);
    let pool = SshPool::new();
    let mut host = sshd.host("web1");

    // No password configured: sudo -n refuses at once, a distinct failure retry skips.
    let (result, _) = exec_result(&pool, &host, &sudo_req("id -un")).await;
    let err = result.expect_err("sudo without a password");
    assert!(
        matches!(&err, SshError::SudoRefused { message, .. } if message.contains("password is required") && message.contains("become_password_env")),
        "{err:?}"
    );
    assert_eq!(err.kind(), "sudo_refused");
    assert!(!err.retryable());

    std::env::set_var("RUNBOOK_TEST_SUDO_PW", password);
    host.sudo.password_env = Some("RUNBOOK_TEST_SUDO_PW".into());
    let (result, cap) = exec_result(&pool, &host, &sudo_req("id -un; echo \"$X\"")).await;
    assert_eq!(
        result.unwrap_or_else(|e| panic!("{e}: {} / {}", cap.err(), cap.out())),
        ExecOutcome::Exited(0),
        "{}",
        cap.err()
    );
    assert_eq!(cap.out(), "root\n\n");
    assert!(
        !cap.err().contains(password) && !cap.err().contains("[runbook sudo"),
        "{}",
        cap.err()
    );
    assert!(!sshd.log().contains(password));

    host.sudo.user = Some("nobody".into());
    let (result, cap) = exec_result(&pool, &host, &sudo_req("id -un")).await;
    assert_eq!(
        result.expect("sudo -u nobody"),
        ExecOutcome::Exited(0),
        "{}",
        cap.err()
    );
    assert_eq!(cap.out(), "nobody\n");
    host.sudo.user = None;

    // Uploads wait for sudo before sending the content.
    let dest = sshd.dir().join("by-root-with-password");
    let upload = UploadRequest {
        content: Bytes::from_static(b"content\n"),
        dest: dest.display().to_string(),
        mode: Some(0o640),
        sudo: true,
    };
    pool.upload(&host, &upload, &CancellationToken::new())
        .await
        .expect("sudo upload with password");
    assert_eq!(std::fs::read(&dest).expect("uploaded"), b"content\n");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&dest).expect("meta").uid(), 0);

    std::env::set_var("RUNBOOK_TEST_SUDO_PW_BAD", "wrong");
    host.sudo.password_env = Some("RUNBOOK_TEST_SUDO_PW_BAD".into());
    let (result, _) = exec_result(&pool, &host, &sudo_req("id -un")).await;
    let err = result.expect_err("wrong password");
    assert!(
        matches!(&err, SshError::SudoRefused { message, .. } if message.contains("incorrect password")),
        "{err:?}"
    );
}

#[tokio::test]
async fn command_restricted_sudo_rules_and_requiretty() {
    let Some(user) = sshd::TempUser::create() else {
        eprintln!("not root (or no useradd): cannot make a sudo user; skipped");
        return;
    };
    let u = &user.name;
    let rule = sshd::SudoersRule::install(
        u,
        &format!("Defaults:{u} !lecture\n{u} ALL=(root) NOPASSWD: /usr/bin/id -un\n"),
    )
    .expect("sudoers rule");
    let sshd = Sshd::start_for_user(&user);
    let pool = SshPool::new();
    let mut host = sshd.host("web1");

    // The wrapper (`sudo -- env … sh -c`) is not the allowed command.
    let (result, _) = exec_result(&pool, &host, &sudo_req("id -un")).await;
    let err = result.expect_err("wrapper refused");
    assert!(
        matches!(&err, SshError::SudoRefused { message, .. } if message.contains("become_method = \"direct\"")),
        "{err:?}"
    );
    host.sudo.direct = true;
    let (result, cap) = exec_result(&pool, &host, &sudo_req("id -un")).await;
    assert_eq!(
        result.expect("direct"),
        ExecOutcome::Exited(0),
        "{}",
        cap.err()
    );
    assert_eq!(cap.out(), "root\n");
    drop(rule);

    let _rule = sshd::SudoersRule::install(
        u,
        &format!("Defaults:{u} !lecture, requiretty\n{u} ALL=(root) NOPASSWD: /usr/bin/id -un\n"),
    )
    .expect("sudoers rule");
    let (result, _) = exec_result(&pool, &host, &sudo_req("id -un")).await;
    let err = result.expect_err("requiretty without a pty");
    assert!(
        matches!(&err, SshError::SudoRefused { message, .. } if message.contains("tty") && message.contains("pty = true")),
        "{err:?}"
    );
    let req = ExecRequest {
        pty: true,
        ..sudo_req("id -un")
    };
    let (result, cap) = exec_result(&pool, &host, &req).await;
    assert_eq!(
        result.expect("requiretty with a pty"),
        ExecOutcome::Exited(0)
    );
    assert_eq!(cap.out().trim(), "root");
}

// ---- Ansible hand-off with a bastion ----------------------------------------------------

/// The export gives Ansible the bastion's own port, user, key and known_hosts, so real
/// `ansible -m raw` reaches a host behind a bastion with strict host key checking.
#[test]
fn ansible_export_with_a_bastion_works_with_real_ansible() {
    let has_ansible = Command::new("ansible")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_ansible,
        "ansible is missing: scripts/test installs ansible-core from PyPI"
    );
    let target = Sshd::start();
    let bastion = Sshd::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let inventory = format!(
        "[hosts.bastion]\naddress = \"127.0.0.1\"\nport = {bport}\nuser = \"{buser}\"\n\
         identity_file = \"{bkey}\"\nknown_hosts = \"{bknown}\"\n\n\
         [hosts.web]\naddress = \"127.0.0.1\"\nport = {port}\nuser = \"{user}\"\n\
         identity_file = \"{key}\"\nknown_hosts = \"{known}\"\nproxy_jump = \"bastion\"\n",
        bport = bastion.port(),
        buser = bastion.user(),
        bkey = bastion.client_key_path().display(),
        bknown = bastion.known_hosts_path().display(),
        port = target.port(),
        user = target.user(),
        key = target.client_key_path().display(),
        known = target.known_hosts_path().display(),
    );
    let inv = runbook_engine::inventory::parse_str("lab.toml", &inventory)
        .unwrap_or_else(|d| panic!("{d:?}"));
    let hosts = dir.path().join("hosts.ini");
    std::fs::write(
        &hosts,
        inv.to_ansible(runbook_engine::inventory::AnsibleFormat::Ini),
    )
    .expect("hosts.ini");
    let out = Command::new("ansible")
        .arg("web")
        .arg("-i")
        .arg(&hosts)
        .args(["-m", "raw", "-a", "echo via-bastion"])
        .env("ANSIBLE_HOME", dir.path().join("ansible"))
        .env("ANSIBLE_LOCAL_TEMP", dir.path().join("ansible-tmp"))
        .env("ANSIBLE_NOCOLOR", "1")
        .output()
        .expect("run ansible");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{text}\n{}",
        std::fs::read_to_string(&hosts).unwrap_or_default()
    );
    assert!(text.contains("via-bastion"), "{text}");
    assert_eq!(bastion.accepted_logins(), 1, "went through the bastion");
    assert_eq!(target.accepted_logins(), 1);
}
