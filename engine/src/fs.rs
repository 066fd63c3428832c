//! The one atomic file write, for every crate that replaces a file (bundle, scheduler state,
//! metrics, lock, keys, screenshots, local uploads): a complete, synced temporary sibling
//! renamed over its destination, and the temporary names it leaves when a writer dies halfway
//! ([`is_temp_name`]; the evidence crate looks for them in a bundle).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Replaces `path` with `data` all at once: written to a temporary file beside it, synced,
/// renamed over it, the directory synced. A reader sees the old file or the new one, never
/// half of one; a crash leaves at most a temporary file named as [`is_temp_name`] says.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    stage(path, 0o666, |f| f.write_all(data))?.commit()
}

/// A complete, synced file beside its destination, not yet renamed over it. Dropped without
/// [`Staged::commit`], it is removed. Two files that must appear together (a key pair) are
/// both staged before either is committed.
#[must_use = "a staged file is removed unless committed"]
pub struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

/// Writes a temporary sibling of `dest` (created new, with `mode` before the umask) with
/// `fill`, and syncs it. Its name is hidden (`.name.<pid>-<n>.tmp`): collectors reading
/// `*.prom` and people listing a directory do not see it, and no two writers share it.
pub fn stage(
    dest: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> std::io::Result<Staged> {
    use std::os::unix::fs::OpenOptionsExt;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let (tmp, mut file) = loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}-{n}{TEMP_SUFFIX}", std::process::id()));
        // `create_new`: never through a link planted at the name, never another writer's file;
        // one left by a dead process of the same id is skipped.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < u64::MAX => {}
            Err(e) => return Err(e),
        }
    };
    let staged = Staged {
        tmp,
        dest: dest.to_owned(),
        committed: false,
    };
    fill(&mut file)?;
    file.sync_all()?;
    drop(file);
    Ok(staged)
}

impl Staged {
    /// The temporary file.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Renames the file over its destination and syncs the directory, so that the rename
    /// survives a power cut (best effort: not every file system can sync a directory).
    pub fn commit(self) -> std::io::Result<()> {
        self.rename()?;
        self.sync_dir();
        Ok(())
    }

    /// The rename alone; [`Staged::sync_dir`] makes it durable. Split for a caller that marks
    /// the point between them (the evidence crate's crash points).
    pub fn rename(&self) -> std::io::Result<()> {
        std::fs::rename(&self.tmp, &self.dest)
    }

    /// Syncs the destination's directory after [`Staged::rename`]; the staged file is done.
    pub fn sync_dir(mut self) {
        self.committed = true;
        if let Some(dir) = self.dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// How every temporary name of [`stage`] ends.
pub const TEMP_SUFFIX: &str = ".tmp";

/// Whether `name` is one [`stage`] gives: `.<name>.<pid>-<n>.tmp`.
pub fn is_temp_name(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix('.')
        .and_then(|n| n.strip_suffix(TEMP_SUFFIX))
    else {
        return false;
    };
    let Some((_, id)) = rest.rsplit_once('.') else {
        return false;
    };
    id.split_once('-').is_some_and(|(pid, n)| {
        [pid, n]
            .iter()
            .all(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    })
}
