//! File-writing primitives shared by every writer of runbook's files (bundle, scheduler
//! state, metrics, lock, keys): atomic replacement and the temporary names it leaves when it
//! dies halfway ([`leftovers`]), and a file that hashes what it writes (so sealing takes each
//! log's SHA-256 from its writer instead of reading the file back).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

/// Replaces `path` with `data` all at once: written to a temporary file beside it, synced,
/// renamed over it, the directory synced. A reader (verify, node_exporter, the next scheduler
/// start) sees the old file or the new one, never half of one; a crash leaves at most a
/// temporary file that [`leftovers`] finds.
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
    crate::crash::sealing_step();
    Ok(staged)
}

impl Staged {
    /// The temporary file.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Renames the file over its destination and syncs the directory, so that the rename
    /// survives a power cut (best effort: not every file system can sync a directory).
    pub fn commit(mut self) -> std::io::Result<()> {
        std::fs::rename(&self.tmp, &self.dest)?;
        self.committed = true;
        crate::crash::sealing_step();
        if let Some(dir) = self.dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

const TEMP_SUFFIX: &str = ".tmp";

/// A file written from its start, hashing exactly the bytes the kernel accepted. The digest is
/// the file's as long as nothing else writes to it; a writer that rewrites its file (late
/// redaction) calls [`HashingFile::invalidate`], and sealing then reads that file instead.
pub struct HashingFile {
    file: File,
    hasher: Option<Sha256>,
}

impl HashingFile {
    /// Wraps a file just created (empty): everything written from here on is hashed.
    pub fn new(file: File) -> Self {
        Self {
            file,
            hasher: Some(Sha256::new()),
        }
    }

    /// A file appended to after its start was written elsewhere: no digest.
    pub fn unhashed(file: File) -> Self {
        Self { file, hasher: None }
    }

    pub fn invalidate(&mut self) {
        self.hasher = None;
    }

    /// The hex SHA-256 of the file's content, when every byte of it went through this writer.
    pub fn digest(self) -> Option<String> {
        self.hasher.map(|h| hex::encode(h.finalize()))
    }
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// A temporary file of [`stage`] left in the bundle: one means a writer died between writing
/// and renaming (sealing, or a late redaction's rewrite).
pub fn has_leftovers(bundle: &Path) -> bool {
    !leftovers(bundle).is_empty()
}

/// The temporary files of interrupted [`write_atomic`]s anywhere in the bundle: [`stage`]'s
/// names, and in the top directory any `*.tmp` (sealing's fixed names before they were
/// unique). Links are not followed.
pub fn leftovers(bundle: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![(bundle.to_owned(), true)];
    while let Some((dir, top)) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let path = entry.path();
            if kind.is_dir() {
                dirs.push((path, false));
            } else if kind.is_file() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if is_temp_name(&name) || (top && name.ends_with(TEMP_SUFFIX)) {
                    found.push(path);
                }
            }
        }
    }
    found.sort();
    found
}

/// Whether `name` is one [`stage`] gives: `.<name>.<pid>-<n>.tmp`.
fn is_temp_name(name: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_digest_is_the_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut w = std::io::BufWriter::with_capacity(
            7,
            HashingFile::new(File::create(&path).expect("create")),
        );
        for i in 0..1000u32 {
            w.write_all(format!("line {i}\n").as_bytes())
                .expect("write");
        }
        let digest = w
            .into_inner()
            .ok()
            .and_then(HashingFile::digest)
            .expect("digest");
        assert_eq!(digest, crate::checksums::sha256_file(&path).expect("read"));
    }

    #[test]
    fn an_atomic_write_replaces_the_file_and_leaves_nothing_beside_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        write_atomic(&path, b"one").expect("write");
        write_atomic(&path, b"two").expect("rewrite");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
    }

    #[test]
    fn a_staged_file_is_removed_unless_committed_and_found_as_a_leftover_until_then() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("steps").join("a");
        std::fs::create_dir_all(&sub).expect("mkdir");
        let dest = sub.join("attempt-1.log");
        let staged = stage(&dest, 0o600, |f| f.write_all(b"x")).expect("stage");
        assert_eq!(leftovers(dir.path()), [staged.path().to_owned()]);
        drop(staged);
        assert!(leftovers(dir.path()).is_empty());
        assert!(!dest.exists());
        let failed = stage(&dest, 0o600, |_| Err(std::io::Error::other("full")));
        assert!(failed.is_err());
        assert!(!has_leftovers(dir.path()));
    }

    #[test]
    fn leftovers_are_temporary_names_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("steps");
        std::fs::create_dir(&sub).expect("mkdir");
        for name in ["collected.tmp", ".hidden.tmp", ".x.1.tmp", "x.12-3.tmp"] {
            std::fs::write(sub.join(name), "").expect("write");
        }
        std::fs::write(dir.path().join("manifest.tmp"), "").expect("write");
        std::fs::write(sub.join(".attempt-1.cast.41-0.tmp"), "").expect("write");
        assert_eq!(
            leftovers(dir.path()),
            [
                dir.path().join("manifest.tmp"),
                sub.join(".attempt-1.cast.41-0.tmp")
            ]
        );
    }

    #[test]
    fn a_staged_file_has_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("k.key");
        stage(&dest, 0o600, |f| f.write_all(b"secret"))
            .expect("stage")
            .commit()
            .expect("commit");
        let mode = std::fs::metadata(&dest).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
