//! One run at a time per runbook (and evidence directory): an advisory lock on
//! `<evidence-dir>/<runbook>/.lock`, with the holder's details in `.lock.json` beside it. The
//! details are written to a temporary file and renamed into place, so a reader sees them whole
//! or not at all (`.lock` itself is never replaced: the lock is on its inode).
//!
//! The OS releases the lock when its holder dies, however it dies; the details stay in the
//! file. A free lock with details in it therefore means the previous run died without finishing
//! (maybe half way through a rolling upgrade): that is reported, and the lock is taken over only
//! with `--break-lock`, by `runbook resume` of that very run, or when its holder is provably
//! dead on this machine and its bundle has nothing left to resume ([`RunLock::take`]). After a
//! takeover, [`stop_stale_run`] stops what the dead run's steps left running.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    pub user: String,
    pub started_at: String,
    pub run_id: String,
    pub bundle: String,
    /// `/proc/sys/kernel/random/boot_id` when the lock was taken: a different one now means the
    /// machine rebooted since, and the holder is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The holder's start time (clock ticks since boot, `/proc/<pid>/stat` field 22): tells the
    /// holder from a later process that reuses its pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ticks: Option<u64>,
}

impl Holder {
    /// This process, as a lock holder.
    pub fn me(host: &str, user: &str, started_at: String, run_id: &str, bundle: String) -> Self {
        let pid = std::process::id();
        Self {
            pid,
            host: host.to_owned(),
            user: user.to_owned(),
            started_at,
            run_id: run_id.to_owned(),
            bundle,
            boot_id: boot_id(),
            start_ticks: start_ticks(pid),
        }
    }

    /// Whether the holder is provably gone: it ran on this host, and its pid is free, belongs to
    /// a process started at another time, or the machine has rebooted since. A holder on
    /// another host is never provably gone from here.
    pub fn provably_dead(&self) -> bool {
        let here = crate::context::hostname();
        if self.host != here {
            return false;
        }
        if let (Some(then), Some(now)) = (&self.boot_id, boot_id()) {
            if *then != now {
                return true;
            }
        }
        match start_ticks(self.pid) {
            None => true,
            Some(t) => self.start_ticks.is_some_and(|s| s != t),
        }
    }
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
}

/// A process's start time in clock ticks since boot (`/proc/<pid>/stat`, field 22).
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "run {} by {}@{} (pid {}), started {}, bundle `{}`",
            self.run_id, self.user, self.host, self.pid, self.started_at, self.bundle
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another run of this runbook is in progress: {0}")]
    Held(Box<Holder>),
    #[error("the previous run did not finish: {0}; inspect its bundle, then `runbook resume` it or pass `--break-lock`")]
    Stale(Box<Holder>),
    #[error("cannot use the lock file `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct RunLock {
    lock: Flock<File>,
    dir: PathBuf,
}

impl RunLock {
    /// `takeover`: take a stale lock without complaint (`--break-lock`, or the bundle is the
    /// one being resumed). Returns the lock and the stale holder it replaced, if any.
    pub fn acquire(
        dir: &Path,
        me: &Holder,
        break_lock: bool,
    ) -> Result<(Self, Option<Holder>), LockError> {
        let path = dir.join(runbook_evidence::verify::LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut lock = match lock_file(file, FlockArg::LockExclusiveNonblock, dir) {
            Ok(l) => l,
            Err(holder) => {
                return Err(match holder {
                    Some(h) => LockError::Held(h),
                    // Taken a moment ago, details not written yet.
                    None => LockError::Held(Box::new(Holder {
                        pid: 0,
                        host: "?".into(),
                        user: "?".into(),
                        started_at: "?".into(),
                        run_id: "?".into(),
                        bundle: "?".into(),
                        boot_id: None,
                        start_ticks: None,
                    })),
                });
            }
        };
        let mut text = String::new();
        lock.read_to_string(&mut text).map_err(io)?;
        let stale = read_holder(dir).or_else(|| serde_json::from_str::<Holder>(&text).ok());
        if let Some(h) = &stale {
            if !break_lock && h.bundle != me.bundle {
                return Err(LockError::Stale(Box::new(h.clone())));
            }
        }
        write_holder(dir, Some(me)).map_err(io)?;
        // Details in `.lock` itself are the format before `.lock.json`: cleared once taken.
        if !text.is_empty() {
            lock.set_len(0).map_err(io)?;
        }
        Ok((
            Self {
                lock,
                dir: dir.to_path_buf(),
            },
            stale,
        ))
    }

    /// The holder, when a live run holds the lock (without taking it or changing the file).
    pub fn live_holder(dir: &Path) -> Option<Holder> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .open(dir.join(runbook_evidence::verify::LOCK_FILE))
            .ok()?;
        lock_file(file, FlockArg::LockSharedNonblock, dir)
            .err()
            .flatten()
            .map(|h| *h)
    }

    /// Puts back the details of the holder this lock took over (none: clears them) and
    /// unlocks: a `resume` refused after taking the lock leaves the file as it found it.
    pub fn give_back(self, previous: Option<&Holder>) {
        let _ = write_holder(&self.dir, previous);
        let _ = self.lock.unlock();
    }

    /// Clears the holder's details and unlocks: a clean end leaves no stale lock.
    pub fn release(self) {
        let _ = write_holder(&self.dir, None);
        let _ = self.lock.unlock();
    }
}

fn holder_path(dir: &Path) -> PathBuf {
    dir.join(".lock.json")
}

/// The details of the process holding the lock now. It publishes them right after taking the
/// lock, so for a moment the file may be missing or still name the previous (dead) holder:
/// wait up to half a second for details whose process is alive on this host.
/// How long a lock whose recorded holder is provably dead may stay held. A step the holder was
/// starting when it died has a copy of the lock's descriptor until its `exec` (close-on-exec
/// takes effect there, and a loaded machine can delay that exec), so a `resume` or `evidence
/// repair` right after a `kill -9` must not read that moment as a live run.
const DEAD_HOLDER_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Locks `file` without blocking; when it is held, the holder's details, after waiting up to
/// [`DEAD_HOLDER_GRACE`] for the lock if they name a provably dead process.
fn lock_file(file: File, arg: FlockArg, dir: &Path) -> Result<Flock<File>, Option<Box<Holder>>> {
    let mut file = match Flock::lock(file, arg) {
        Ok(lock) => return Ok(lock),
        Err((file, _)) => file,
    };
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    let holder = live_details(dir)
        .or_else(|| serde_json::from_str::<Holder>(&text).ok())
        .map(Box::new);
    if holder.as_ref().is_some_and(|h| h.provably_dead()) {
        let deadline = std::time::Instant::now() + DEAD_HOLDER_GRACE;
        while std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            match Flock::lock(file, arg) {
                Ok(mut lock) => {
                    use std::io::Seek;
                    let _ = lock.rewind();
                    return Ok(lock);
                }
                Err((back, _)) => file = back,
            }
        }
    }
    Err(holder)
}

fn live_details(dir: &Path) -> Option<Holder> {
    let host = crate::context::hostname();
    let mut last = None;
    for _ in 0..50 {
        last = read_holder(dir);
        match &last {
            Some(h) if h.host != host => break,
            Some(h) => {
                let alive = i32::try_from(h.pid).is_ok_and(|pid| {
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
                });
                if alive {
                    break;
                }
            }
            None => {}
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    last
}

fn read_holder(dir: &Path) -> Option<Holder> {
    let text = std::fs::read_to_string(holder_path(dir)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Publishes the holder's details whole (temporary file, sync, rename, directory sync), or
/// removes them.
fn write_holder(dir: &Path, holder: Option<&Holder>) -> std::io::Result<()> {
    let path = holder_path(dir);
    match holder {
        Some(h) => runbook_evidence::fs::write_atomic(
            &path,
            serde_json::to_string(h).unwrap_or_default().as_bytes(),
        ),
        None => {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            File::open(dir)?.sync_all()
        }
    }
}

/// A lock taken by [`RunLock::take`].
pub struct Taken {
    pub lock: RunLock,
    /// The holder of a lock left behind that this one replaced.
    pub stale: Option<Holder>,
    /// Taken over without `--break-lock`: the holder was provably dead with nothing to resume.
    pub automatic: bool,
}

impl RunLock {
    /// [`RunLock::acquire`] with the takeover policy: a holder that died on this machine and
    /// whose bundle leaves nothing to resume needs no `--break-lock`.
    pub fn take(dir: &Path, me: &Holder, break_lock: bool) -> Result<Taken, LockError> {
        match Self::acquire(dir, me, break_lock) {
            Err(LockError::Stale(h))
                if h.provably_dead()
                    && runbook_evidence::resume::nothing_to_resume(Path::new(&h.bundle)) =>
            {
                let (lock, stale) = Self::acquire(dir, me, true)?;
                Ok(Taken {
                    lock,
                    stale,
                    automatic: true,
                })
            }
            other => other.map(|(lock, stale)| Taken {
                lock,
                stale,
                automatic: false,
            }),
        }
    }
}

/// After taking over the lock of another run (`stale`, not `mine`) whose runner is dead: its
/// runner is gone, but the processes its steps started may not be. They are stopped before
/// anything new runs beside them (with `--break-lock` too); returns one note per group stopped.
pub fn stop_stale_run(stale: Option<&Holder>, mine: &str) -> Vec<String> {
    let Some(h) = stale.filter(|h| h.run_id != mine && h.provably_dead()) else {
        return Vec::new();
    };
    runbook_steps::stop_run_processes(&h.run_id, std::time::Duration::from_secs(5))
        .into_iter()
        .map(|g| {
            format!(
                "stopped process group {g}, left running by run {}",
                h.run_id
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dead run's lock held for a moment by a descriptor copy (a step between its spawn and
    /// its exec) is not a live run: `live_holder` and `acquire` wait for it to go.
    #[test]
    fn a_dead_holders_lock_held_by_a_lingering_descriptor_is_waited_for() {
        let dir = tempfile::tempdir().expect("tmp");
        let host = crate::context::hostname();
        let mut dead = Holder::me(&host, "ops", "then".into(), "dead0001", "b".into());
        // This process's pid with another start time: a reused pid, provably not the holder.
        dead.start_ticks = dead.start_ticks.map(|t| t + 1).or(Some(1));
        assert!(dead.provably_dead());
        write_holder(dir.path(), Some(&dead)).expect("details");
        let copy = || {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.path().join(runbook_evidence::verify::LOCK_FILE))
                .expect("open");
            let held = Flock::lock(file, FlockArg::LockExclusiveNonblock).expect("lock");
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(300));
                drop(held);
            })
        };

        let gone = copy();
        assert!(RunLock::live_holder(dir.path()).is_none());
        gone.join().expect("thread");

        let gone = copy();
        let me = Holder::me(&host, "ops", "now".into(), "live0002", "b".into());
        let (lock, stale) = RunLock::acquire(dir.path(), &me, false).expect("taken");
        assert_eq!(stale.map(|h| h.run_id), Some("dead0001".to_owned()));
        gone.join().expect("thread");

        // A live holder is reported at once.
        let live = RunLock::live_holder(dir.path()).expect("held");
        assert_eq!(live.run_id, "live0002");
        lock.release();
    }
}
