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
        assert_eq!(outcome, ExecOutcome::Exited(1));
        assert!(cap.err().contains("sudo"), "{}", cap.err());
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
