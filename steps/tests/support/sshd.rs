//! A real OpenSSH `sshd` on 127.0.0.1 for tests: its own temp dir with host key, client key,
//! `authorized_keys`, config and log; started as a child and stopped (with every connection
//! process it forked) on drop.
//!
//! Other test crates include it with
//! `#[path = "../steps/tests/support/sshd.rs"] mod sshd;` (they need `tempfile` and
//! `runbook-steps` as dependencies). Works as root and as a normal user.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use runbook_steps::ssh::{HostKeyCheck, SshHost};

const SSHD: &str = "/usr/sbin/sshd";
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Sshd {
    dir: tempfile::TempDir,
    port: u16,
    user: String,
    child: Option<Child>,
    host_key_type: String,
    /// `sshd_config` lines placed before the harness's own: sshd keeps the first value it
    /// reads for a keyword, so these win.
    extra_config: String,
}

/// Runs a command to completion, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `ssh-keygen -t <kind>` into `path` (no passphrase when `passphrase` is empty).
pub fn keygen(path: &Path, kind: &str, passphrase: &str) {
    let mut cmd = Command::new("ssh-keygen");
    cmd.args([
        "-q",
        "-t",
        kind,
        "-N",
        passphrase,
        "-C",
        "runbook-test",
        "-f",
    ])
    .arg(path);
    if kind == "rsa" {
        cmd.args(["-b", "2048"]);
    }
    run(&mut cmd);
}

fn current_user() -> String {
    run(Command::new("id").arg("-un")).trim().to_string()
}

pub fn is_root() -> bool {
    run(Command::new("id").arg("-u")).trim() == "0"
}

impl Sshd {
    /// An sshd with an ed25519 host key.
    pub fn start() -> Sshd {
        Self::start_with_host_key("ed25519")
    }

    /// An sshd whose host key is of `kind` (`ed25519`, `ecdsa`, `rsa`).
    pub fn start_with_host_key(kind: &str) -> Sshd {
        Self::start_with(kind, "")
    }

    /// An sshd with a host key of `kind` and `extra` lines at the top of its `sshd_config`
    /// (e.g. a server-side crypto policy: `KexAlgorithms ecdh-sha2-nistp256`).
    pub fn start_with(kind: &str, extra: &str) -> Sshd {
        Self::start_full(kind, extra, None)
    }

    /// An sshd (run by root) whose login is `user`, another account than the tests': its
    /// files are made readable to it, as sshd reads `authorized_keys` as the user.
    pub fn start_for_user(user: &TempUser) -> Sshd {
        Self::start_full("ed25519", "", Some(&user.name))
    }

    fn start_full(kind: &str, extra: &str, login: Option<&str>) -> Sshd {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: install openssh-server (apt-get install openssh-server)"
        );
        let dir = tempfile::Builder::new()
            .prefix("runbook-sshd-")
            .tempdir()
            .expect("temp dir");
        let mut sshd = Sshd {
            dir,
            port: 0,
            user: login.map_or_else(current_user, str::to_owned),
            child: None,
            host_key_type: kind.to_string(),
            extra_config: extra.to_string(),
        };
        keygen(&sshd.host_key_path(), kind, "");
        keygen(&sshd.client_key_path(), "ed25519", "");
        sshd.authorize(&sshd.client_key_path());
        if login.is_some() {
            use std::os::unix::fs::PermissionsExt;
            for (path, mode) in [
                (sshd.dir().to_path_buf(), 0o755),
                (sshd.dir().join("authorized_keys"), 0o644),
            ] {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .expect("chmod for the login user");
            }
        }
        sshd.launch_on_free_port();
        sshd.write_known_hosts(&sshd.known_hosts_path());
        sshd
    }

    /// `n` independent servers.
    pub fn start_many(n: usize) -> Vec<Sshd> {
        (0..n).map(|_| Sshd::start()).collect()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn client_key_path(&self) -> PathBuf {
        self.dir().join("id_client")
    }

    pub fn host_key_path(&self) -> PathBuf {
        self.dir().join("ssh_host_key")
    }

    /// The `known_hosts` written at start, listing this server's host key.
    pub fn known_hosts_path(&self) -> PathBuf {
        self.dir().join("known_hosts")
    }

    fn config_path(&self) -> PathBuf {
        self.dir().join("sshd_config")
    }

    fn log_path(&self) -> PathBuf {
        self.dir().join("sshd.log")
    }

    /// The `known_hosts` line for this server (`[127.0.0.1]:port type key`).
    pub fn known_hosts_line(&self) -> String {
        let public = std::fs::read_to_string(self.host_key_path().with_extension("pub"))
            .expect("host public key");
        let mut fields = public.split_whitespace();
        let (kind, key) = (fields.next().unwrap_or(""), fields.next().unwrap_or(""));
        format!("[127.0.0.1]:{} {kind} {key}\n", self.port)
    }

    /// Writes a `known_hosts` file listing this server at `path`.
    pub fn write_known_hosts(&self, path: &Path) {
        std::fs::write(path, self.known_hosts_line()).expect("write known_hosts");
    }

    /// Adds the public half of the private key at `key` to `authorized_keys` (sshd reads the
    /// file on every attempt, so no restart is needed).
    pub fn authorize(&self, key: &Path) {
        let public = std::fs::read_to_string(
            key.with_extension(
                key.extension()
                    .map(|e| format!("{}.pub", e.to_string_lossy()))
                    .unwrap_or_else(|| "pub".into()),
            ),
        )
        .expect("public key next to the private key");
        let path = self.dir().join("authorized_keys");
        let mut all = std::fs::read_to_string(&path).unwrap_or_default();
        all.push_str(&public);
        std::fs::write(path, all).expect("write authorized_keys");
    }

    /// A new client key of `kind` in the server's dir, authorized unless `authorize` is false.
    pub fn new_client_key(
        &self,
        name: &str,
        kind: &str,
        passphrase: &str,
        authorize: bool,
    ) -> PathBuf {
        let path = self.dir().join(name);
        keygen(&path, kind, passphrase);
        if authorize {
            self.authorize(&path);
        }
        path
    }

    /// An [`SshHost`] for this server: the client key, the pre-populated `known_hosts`, strict
    /// host key checking.
    pub fn host(&self, name: &str) -> SshHost {
        SshHost {
            name: name.to_string(),
            address: "127.0.0.1".to_string(),
            port: self.port,
            user: self.user.clone(),
            identity_files: vec![self.client_key_path()],
            passphrase_env: None,
            use_agent: false,
            known_hosts: self.known_hosts_path(),
            host_key_check: HostKeyCheck::Strict,
            proxy_jump: None,
            connect_timeout: Duration::from_secs(10),
            keepalive: None,
            certificate_files: Vec::new(),
            handshake_limit: runbook_steps::ssh::DEFAULT_HANDSHAKE_LIMIT,
            sudo: runbook_steps::ssh::SudoSettings::default(),
        }
    }

    /// The server's log (`LogLevel VERBOSE`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Successful logins so far, i.e. authenticated connections.
    pub fn accepted_logins(&self) -> usize {
        self.log().matches("Accepted publickey").count()
    }

    /// Stops the server and every connection process it forked.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        // Per-connection processes call setsid(), so a process-group kill misses them; find
        // them through their parents instead, before the listener goes and they are reparented.
        let descendants = descendants_of(pid);
        let kill = |args: &[&str]| {
            // Some are gone already (a connection that ended): not worth a message.
            let _ = Command::new("kill")
                .args(args)
                .stderr(Stdio::null())
                .status();
        };
        kill(&[&pid.to_string()]);
        for p in &descendants {
            kill(&["-KILL", &p.to_string()]);
        }
        let _ = child.wait();
    }

    /// Starts the server again on the same port with the same keys.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
        self.wait_ready()
            .unwrap_or_else(|e| panic!("sshd did not restart: {e}"));
    }

    /// Restarts the server with a freshly generated host key, so clients that knew the old
    /// one see a changed key.
    pub fn restart_with_new_host_key(&mut self) {
        self.stop();
        let key = self.host_key_path();
        let _ = std::fs::remove_file(&key);
        let _ = std::fs::remove_file(key.with_extension("pub"));
        keygen(&key, &self.host_key_type.clone(), "");
        self.launch();
        self.wait_ready()
            .unwrap_or_else(|e| panic!("sshd did not restart: {e}"));
    }

    /// Adds `extra` lines at the top of the config (they win over the harness's own) and
    /// restarts on the same port with the same keys.
    pub fn reconfigure(&mut self, extra: &str) {
        self.extra_config = format!("{extra}\n{}", self.extra_config);
        self.restart();
    }

    /// Signs the host key with the CA key at `ca` for `principals` (comma-separated) and
    /// makes the server present the certificate; returns the certificate's path.
    pub fn use_host_certificate(&mut self, ca: &Path, principals: &str) -> PathBuf {
        let public = self.host_key_path().with_extension("pub");
        run(Command::new("ssh-keygen")
            .args(["-q", "-s"])
            .arg(ca)
            .args(["-I", "runbook-test-host", "-h", "-n", principals])
            .arg(&public));
        let cert = self.dir().join("ssh_host_key-cert.pub");
        self.reconfigure(&format!("HostCertificate {}", cert.display()));
        cert
    }

    fn write_config(&self) {
        let dir = self.dir();
        let config = format!(
            "{extra}\n\
             ListenAddress 127.0.0.1\n\
             Port {port}\n\
             HostKey {hostkey}\n\
             PidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {dir}/authorized_keys\n\
             StrictModes no\n\
             UsePAM no\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n\
             AllowUsers {user}\n\
             AllowTcpForwarding yes\n\
             MaxStartups 100:30:200\n\
             LogLevel VERBOSE\n",
            port = self.port,
            hostkey = self.host_key_path().display(),
            dir = dir.display(),
            user = self.user,
            extra = self.extra_config,
        );
        std::fs::write(self.config_path(), config).expect("write sshd_config");
    }

    fn launch(&mut self) {
        if is_root() {
            // sshd refuses to start as root without its privilege separation directory.
            let _ = std::fs::create_dir_all("/run/sshd");
        }
        self.write_config();
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-f")
            .arg(self.config_path())
            .arg("-E")
            .arg(self.log_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {SSHD}: {e}"));
        self.child = Some(child);
    }

    /// Picks a free port and starts; another process can grab the port in between, so try a
    /// few times.
    fn launch_on_free_port(&mut self) {
        let mut last = String::new();
        for _ in 0..5 {
            self.port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("free port");
            self.launch();
            match self.wait_ready() {
                Ok(()) => return,
                Err(e) => {
                    last = e;
                    self.stop();
                }
            }
        }
        panic!("sshd did not start: {last}");
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let give_up = Instant::now() + START_TIMEOUT;
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("sshd exited ({status}); log:\n{}", self.log()));
                }
            }
            if Instant::now() > give_up {
                return Err(format!(
                    "port {} never accepted; log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A local account made for one test, with a home of its own, no password and no sudo rights;
/// `userdel` removes it when dropped. Only root can make one.
pub struct TempUser {
    pub name: String,
    _home: tempfile::TempDir,
}

impl TempUser {
    /// None when not root or `useradd` is missing: the caller says what it skipped.
    pub fn create() -> Option<TempUser> {
        use std::os::unix::fs::PermissionsExt;
        if !is_root() || !Path::new("/usr/sbin/useradd").exists() {
            return None;
        }
        let home = tempfile::Builder::new()
            .prefix("runbook-user-")
            .tempdir()
            .expect("temp dir");
        std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod home parent");
        let name = format!("rbt{}", std::process::id() % 100_000_000);
        let name = (0..100)
            .map(|i| format!("{name}x{i}"))
            .find(|n| {
                Command::new("id")
                    .arg(n)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| !s.success())
            })
            .expect("a free user name");
        // Tests running side by side contend for the lock on /etc/passwd: try again.
        let mut last = String::new();
        for _ in 0..50 {
            let out = Command::new("/usr/sbin/useradd")
                // `*`: no password to log in with, but not a locked account, which sshd refuses.
                .args([
                    "--create-home",
                    "--shell",
                    "/bin/sh",
                    "--password",
                    "*",
                    "--home-dir",
                ])
                .arg(home.path().join("home"))
                .arg(&name)
                .output()
                .expect("run useradd");
            if out.status.success() {
                return Some(TempUser { name, _home: home });
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("useradd {name} failed: {last}");
    }
}

impl TempUser {
    /// Gives the account a password (for sudo rules that ask for one).
    pub fn set_password(&self, password: &str) {
        use std::io::Write;
        let mut child = Command::new("/usr/sbin/chpasswd")
            .stdin(Stdio::piped())
            .spawn()
            .expect("run chpasswd");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{}:{password}\n", self.name).as_bytes())
            .expect("write to chpasswd");
        assert!(child.wait().expect("chpasswd").success(), "chpasswd failed");
    }
}

/// A file in `/etc/sudoers.d` for one test (checked with `visudo -c`), removed on drop.
pub struct SudoersRule {
    path: PathBuf,
}

impl SudoersRule {
    /// None when not root or sudo is missing.
    pub fn install(name: &str, text: &str) -> Option<SudoersRule> {
        use std::os::unix::fs::PermissionsExt;
        if !is_root() || !Path::new("/etc/sudoers.d").is_dir() {
            return None;
        }
        let path = PathBuf::from(format!("/etc/sudoers.d/runbook-test-{name}"));
        std::fs::write(&path, text).expect("write sudoers rule");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o440))
            .expect("chmod sudoers rule");
        let rule = SudoersRule { path };
        run(Command::new("visudo").arg("-c").arg("-f").arg(&rule.path));
        Some(rule)
    }
}

impl Drop for SudoersRule {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        // Its sshd sessions are gone by now (the servers are dropped first in the tests).
        let _ = Command::new("/usr/sbin/userdel")
            .args(["--force", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every process below `root`, from `/proc/*/stat`.
fn descendants_of(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // The command name is in parentheses and may contain spaces: parse after it.
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or_default() {
            out.push(c);
            todo.push(c);
        }
    }
    out
}
