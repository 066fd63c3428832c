//! Run context for the manifest: where the runbook came from (git commit), what the tools it
//! declares say about themselves (`[evidence] facts`), what the clock was and whether it was
//! synchronised, who ran it (through `sudo` too), on which machine, with which binary.

use std::path::Path;
use std::process::Command;

use runbook_evidence::manifest::Operator;
use serde_json::{json, Value};

/// Runs a command with a time limit; (exit code, combined output trimmed to 4 KiB).
fn capture(cmd: &str, dir: &Path) -> (Option<i32>, String) {
    let out = Command::new("timeout")
        .args(["10", "sh", "-c", cmd])
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) => {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            let text = text.trim();
            let text: String = text.chars().take(4096).collect();
            (o.status.code(), text)
        }
        Err(e) => (None, format!("could not run: {e}")),
    }
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let o = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

pub fn collect(runbook: &Path, workdir: &Path, facts: &[String]) -> Value {
    let dir = runbook
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Independent commands, run side by side: they delay the start of every run.
    let (repo, ntp, facts, sync, fqdn, binary) = std::thread::scope(|scope| {
        let sync = scope.spawn(clock_sync);
        let fqdn = scope.spawn(fqdn);
        let binary = scope.spawn(binary);
        let repo = scope.spawn(|| {
            git(dir, &["rev-parse", "HEAD"]).map(|commit| {
                let dirty = scope.spawn(|| {
                    git(dir, &["status", "--porcelain", "--", "."]).is_some_and(|s| !s.is_empty())
                });
                let branch = scope.spawn(|| git(dir, &["rev-parse", "--abbrev-ref", "HEAD"]));
                let remote = git(dir, &["config", "--get", "remote.origin.url"]);
                json!({
                    "commit": commit,
                    "dirty": dirty.join().unwrap_or(false),
                    "branch": branch.join().unwrap_or(None),
                    "remote": remote,
                })
            })
        });
        let ntp = scope.spawn(|| {
            Command::new("timedatectl")
                .args(["show", "-p", "NTPSynchronized", "--value"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "yes")
        });
        let facts: Vec<_> = facts
            .iter()
            .map(|cmd| {
                scope.spawn(move || {
                    let (code, output) = capture(cmd, workdir);
                    json!({ "command": cmd, "exit_code": code, "output": output })
                })
            })
            .collect();
        (
            repo.join().unwrap_or(None),
            ntp.join().unwrap_or(None),
            facts
                .into_iter()
                .map(|f| f.join().unwrap_or(Value::Null))
                .collect::<Vec<Value>>(),
            sync.join().unwrap_or(Value::Null),
            fqdn.join().unwrap_or(None),
            binary.join().unwrap_or(Value::Null),
        )
    });
    let now = chrono::Local::now();
    // `ntp_synchronized` stays for readers of older bundles; `sync` says who answered.
    let ntp = ntp.or_else(|| sync["synchronized"].as_bool());
    json!({
        "git": repo,
        "time": {
            "source": "system clock",
            "ntp_synchronized": ntp,
            "sync": sync,
            "local_offset": now.offset().to_string(),
            "local_start": now.to_rfc3339(),
        },
        "host": {
            "fqdn": fqdn,
            "machine_id": machine_id(),
        },
        "identity": identity(),
        "engine": {
            "version": env!("CARGO_PKG_VERSION"),
            "target": std::env::consts::ARCH.to_owned() + "-" + std::env::consts::OS,
            "binary": binary,
        },
        "facts": facts,
    })
}

/// Runs `program args…` with a time limit: `Ok(stdout)` on exit 0, else why not.
fn probe(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("timeout")
        .arg("5")
        .arg(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("could not run: {e}"))?;
    match out.status.code() {
        Some(0) => Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned()),
        // `timeout` exits 127 when the program is not there, 124 when it ran out of time.
        Some(127) => Err("not installed".into()),
        Some(124) => Err("did not answer within 5 s".into()),
        code => {
            let err = String::from_utf8_lossy(&out.stderr);
            let first = err.lines().next().unwrap_or("").trim();
            Err(format!(
                "exit {}{}",
                code.map_or_else(|| "by signal".to_owned(), |c| c.to_string()),
                if first.is_empty() {
                    String::new()
                } else {
                    format!(": {first}")
                }
            ))
        }
    }
}

/// Whether the clock is synchronised, from the first of `timedatectl`, `chronyc tracking` and
/// `/run/systemd/timesync` that answers; `source: "unknown"` with each one's reason if none.
fn clock_sync() -> Value {
    let mut why = Vec::new();
    match probe("timedatectl", &["show", "-p", "NTPSynchronized", "--value"]) {
        Ok(v) if v == "yes" || v == "no" => {
            return json!({"source": "timedatectl", "synchronized": v == "yes"});
        }
        Ok(v) => why.push(format!("timedatectl: unexpected answer `{v}`")),
        Err(e) => why.push(format!("timedatectl: {e}")),
    }
    match probe("chronyc", &["-n", "tracking"]) {
        Ok(text) => {
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == name))
                    .map(|(_, v)| v.trim().to_owned())
            };
            let leap = field("Leap status");
            return json!({
                "source": "chronyc tracking",
                "synchronized": leap.as_deref().map(|l| l != "Not synchronised"),
                "leap_status": leap,
                "reference": field("Reference ID"),
                "stratum": field("Stratum"),
                "system_time": field("System time"),
            });
        }
        Err(e) => why.push(format!("chronyc tracking: {e}")),
    }
    let dir = std::path::Path::new("/run/systemd/timesync");
    if dir.is_dir() {
        return json!({
            "source": "/run/systemd/timesync",
            "synchronized": dir.join("synchronized").exists(),
        });
    }
    why.push("/run/systemd/timesync: not there (systemd-timesyncd not running)".into());
    json!({"source": "unknown", "synchronized": null, "why": why.join("; ")})
}

/// The host's fully qualified name, as the resolver gives it (`hostname -f`).
fn fqdn() -> Option<String> {
    probe("hostname", &["-f"]).ok().filter(|s| !s.is_empty())
}

/// `/etc/machine-id` (systemd), else D-Bus's copy.
fn machine_id() -> Option<String> {
    ["/etc/machine-id", "/var/lib/dbus/machine-id"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Who runs runbook and where, as bundles, locks and chains name them: the effective user
/// (its name from the user database, else `$USER`, else the number) and the host name.
pub fn operator() -> Operator {
    let uid = nix::unistd::getuid();
    let user = user_name(uid.as_raw())
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| uid.to_string());
    Operator {
        user,
        uid: uid.as_raw(),
        host: hostname(),
    }
}

/// This machine's host name (`gethostname`), or `unknown`. A lock's holder is compared with
/// it to tell whether the holder ran here.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into())
}

fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// Who is behind the run: the user `sudo` was run by, and the login user the kernel's audit
/// records for this session (`/proc/self/loginuid`, kept across `sudo` and `su`).
fn identity() -> Value {
    let login_uid = std::fs::read_to_string("/proc/self/loginuid")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        // (uid_t)-1: no login session (a service, a container).
        .filter(|&u| u != u32::MAX);
    let sudo_uid = std::env::var("SUDO_UID")
        .ok()
        .and_then(|s| s.parse::<u32>().ok());
    json!({
        "sudo_user": std::env::var("SUDO_USER").ok(),
        "sudo_uid": sudo_uid,
        "login_uid": login_uid,
        "login_user": login_uid.and_then(user_name),
        "logname": std::env::var("LOGNAME").ok(),
    })
}

/// The running binary and its SHA-256 (what an assessor compares with the release).
fn binary() -> Value {
    match std::env::current_exe() {
        Ok(path) => binary_value(&path, cache_file().as_deref()),
        Err(e) => json!({"path": null, "sha256": null, "error": e.to_string()}),
    }
}

/// The manifest's `engine.binary` for the binary at `path`, its digest through `cache`.
fn binary_value(path: &Path, cache: Option<&Path>) -> Value {
    let (sha256, cached) = match binary_sha256(path, cache) {
        Ok((h, cached)) => (Ok(h), cached),
        Err(e) => (Err(e), false),
    };
    json!({
        "path": path.display().to_string(),
        "sha256": sha256.as_ref().ok(),
        "sha256_cached": cached,
        "error": sha256.err(),
    })
}

/// Where the binary's digest is kept: `$XDG_CACHE_HOME/runbook/binary-sha256`, else
/// `~/.cache/runbook/binary-sha256`; none without either variable.
fn cache_file() -> Option<std::path::PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .map(|d| d.join("runbook").join("binary-sha256"))
}

/// The identity of the exact file the digest was computed from: device, inode, size,
/// modification and change times (any rewrite of the binary, even one that restores its
/// modification time, changes its change time; a replaced binary is another inode).
fn file_key(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "{}:{}:{}:{}.{}:{}.{}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    )
}

/// Digests kept in the cache: one per binary recently run (two builds used in turn, an old
/// and a new release side by side, must not evict each other at every run).
const CACHE_ENTRIES: usize = 8;

/// The SHA-256 of the file at `path`, and whether it came from `cache`. Hashing a large
/// binary takes a while at every run start, so the digest is kept in `cache` (one `key
/// digest` line per binary, the latest first) for the exact file it was computed from
/// ([`file_key`]). A cache that cannot be read, does not name this file or cannot be written
/// only costs the hashing.
fn binary_sha256(path: &Path, cache: Option<&Path>) -> Result<(String, bool), String> {
    let key = file_key(&std::fs::metadata(path).map_err(|e| e.to_string())?);
    let text = cache
        .and_then(|c| std::fs::read_to_string(c).ok())
        .unwrap_or_default();
    let entries: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| l.trim().split_once(' '))
        .filter(|(_, h)| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    if let Some((_, h)) = entries.iter().find(|(k, _)| *k == key) {
        return Ok(((*h).to_owned(), true));
    }
    let hash = runbook_evidence::checksums::sha256_file(path).map_err(|e| e.to_string())?;
    // The file may have changed while it was read: only a digest of the file as it still is
    // is kept.
    let after = std::fs::metadata(path).map(|m| file_key(&m));
    if let (Some(cache), Ok(after)) = (cache, after) {
        if after == key {
            let mut out = format!("{key} {hash}\n");
            for (k, h) in entries.iter().take(CACHE_ENTRIES - 1) {
                out.push_str(&format!("{k} {h}\n"));
            }
            if let Some(dir) = cache.parent() {
                if std::fs::create_dir_all(dir).is_ok() {
                    // Not part of any bundle: the engine's atomic write (no sealing crash
                    // points), so a reader never sees half a file.
                    let _ = runbook_engine::fs::write_atomic(cache, out.as_bytes());
                }
            }
        }
    }
    Ok((hash, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> String {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(data))
    }

    fn ctime(path: &Path) -> (i64, i64) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).expect("stat");
        (m.ctime(), m.ctime_nsec())
    }

    /// The cache answers for the exact file only: the second look at an unchanged binary
    /// comes from it; a binary rebuilt in place (same size, even with its modification time
    /// put back) or replaced by another file is hashed again, and the manifest's value names
    /// the digest of the file as it is now.
    #[test]
    fn the_cached_digest_is_only_used_for_the_same_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("runbook");
        let cache = dir
            .path()
            .join("cache")
            .join("runbook")
            .join("binary-sha256");
        std::fs::write(&bin, b"build one").expect("write");

        let first = binary_value(&bin, Some(&cache));
        assert_eq!(first["sha256"], sha(b"build one").as_str());
        assert_eq!(first["sha256_cached"], false);
        let second = binary_value(&bin, Some(&cache));
        assert_eq!(second["sha256"], sha(b"build one").as_str());
        assert_eq!(second["sha256_cached"], true, "{second}");

        // Rebuilt in place, same size, modification time restored: the change time differs
        // (waited for, the kernel's file times being coarse).
        let mtime = std::fs::metadata(&bin)
            .and_then(|m| m.modified())
            .expect("mtime");
        let before = ctime(&bin);
        loop {
            std::fs::write(&bin, b"build two").expect("rewrite");
            let f = std::fs::File::options()
                .write(true)
                .open(&bin)
                .expect("open");
            f.set_modified(mtime).expect("set mtime");
            if ctime(&bin) != before {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let rebuilt = binary_value(&bin, Some(&cache));
        assert_eq!(rebuilt["sha256"], sha(b"build two").as_str());
        assert_eq!(rebuilt["sha256_cached"], false);
        assert_eq!(
            binary_value(&bin, Some(&cache))["sha256_cached"],
            true,
            "the new digest is cached"
        );

        // Replaced by another file (a package upgrade renames a new binary into place).
        let new = dir.path().join("runbook.new");
        std::fs::write(&new, b"build three, longer").expect("write");
        std::fs::rename(&new, &bin).expect("rename");
        let replaced = binary_value(&bin, Some(&cache));
        assert_eq!(replaced["sha256"], sha(b"build three, longer").as_str());
        assert_eq!(replaced["sha256_cached"], false);
    }

    /// Two binaries run in turn (before and after builds in a benchmark) are both answered
    /// from the cache; the oldest of more than [`CACHE_ENTRIES`] is hashed again.
    #[test]
    fn binaries_run_in_turn_keep_their_cached_digests() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("binary-sha256");
        let bins: Vec<_> = (0..=CACHE_ENTRIES)
            .map(|n| {
                let p = dir.path().join(format!("runbook-{n}"));
                std::fs::write(&p, format!("build {n}")).expect("write");
                p
            })
            .collect();
        for bin in &bins[..2] {
            assert_eq!(binary_value(bin, Some(&cache))["sha256_cached"], false);
        }
        for bin in &bins[..2] {
            let v = binary_value(bin, Some(&cache));
            assert_eq!(v["sha256_cached"], true, "{v}");
            let want = sha(&std::fs::read(bin).expect("read"));
            assert_eq!(v["sha256"], want.as_str());
        }
        // Eight more: the first one is the oldest and falls out.
        for bin in &bins[2..] {
            assert_eq!(binary_value(bin, Some(&cache))["sha256_cached"], false);
        }
        assert_eq!(binary_value(&bins[0], Some(&cache))["sha256_cached"], false);
        assert_eq!(
            binary_value(&bins[CACHE_ENTRIES], Some(&cache))["sha256_cached"],
            true
        );
    }

    /// A cache that cannot be used never costs the digest: garbage in it, a cache directory
    /// that cannot be made (a file in its place), or no cache at all.
    #[test]
    fn an_unusable_cache_falls_back_to_hashing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("runbook");
        std::fs::write(&bin, b"binary").expect("write");
        let want = sha(b"binary");

        let garbage = dir.path().join("garbage");
        let key = file_key(&std::fs::metadata(&bin).expect("stat"));
        std::fs::write(&garbage, format!("{key} not-a-digest\n")).expect("write");
        assert_eq!(
            binary_sha256(&bin, Some(&garbage)).expect("hash"),
            (want.clone(), false)
        );

        let blocked = dir.path().join("a-file");
        std::fs::write(&blocked, b"").expect("write");
        let cache = blocked.join("runbook").join("binary-sha256");
        for _ in 0..2 {
            assert_eq!(
                binary_sha256(&bin, Some(&cache)).expect("hash"),
                (want.clone(), false)
            );
        }
        assert_eq!(binary_sha256(&bin, None).expect("hash"), (want, false));
    }

    /// The manifest's digest of the running binary is the file's.
    #[test]
    fn the_running_binary_is_named_with_its_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = std::env::current_exe().expect("exe");
        let cache = dir.path().join("binary-sha256");
        let want = runbook_evidence::checksums::sha256_file(&exe).expect("hash");
        for cached in [false, true] {
            let v = binary_value(&exe, Some(&cache));
            assert_eq!(v["sha256"], want.as_str());
            assert_eq!(v["sha256_cached"], cached);
        }
    }
}
