//! File-writing primitives of the bundle and the CLI's files (scheduler state, metrics, lock,
//! keys): the engine's atomic replacement ([`runbook_engine::fs`]) with sealing's crash points,
//! the temporary names it leaves in a bundle when it dies halfway ([`leftovers`]), and a file
//! that hashes what it writes (so sealing takes each log's SHA-256 from its writer instead of
//! reading the file back).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use runbook_engine::fs::{is_temp_name, TEMP_SUFFIX};
use sha2::{Digest, Sha256};

/// Replaces `path` with `data` all at once ([`runbook_engine::fs::write_atomic`], with
/// sealing's crash points): a crash leaves at most a temporary file that [`leftovers`] finds.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    stage(path, 0o666, |f| f.write_all(data))?.commit()
}

/// [`runbook_engine::fs::Staged`] with sealing's crash points: after the file is staged and
/// after it is renamed, so that `RUNBOOK_CRASH_IN_SEAL` can stop sealing between any two file
/// operations.
#[must_use = "a staged file is removed unless committed"]
pub struct Staged(runbook_engine::fs::Staged);

/// [`runbook_engine::fs::stage`], then a crash point.
pub fn stage(
    dest: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> std::io::Result<Staged> {
    let staged = runbook_engine::fs::stage(dest, mode, fill)?;
    crate::crash::sealing_step();
    Ok(Staged(staged))
}

impl Staged {
    /// The temporary file.
    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Renames the file over its destination (a crash point) and syncs the directory.
    pub fn commit(self) -> std::io::Result<()> {
        self.0.rename()?;
        crate::crash::sealing_step();
        self.0.sync_dir();
        Ok(())
    }
}

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
