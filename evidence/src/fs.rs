//! File-writing primitives shared by the bundle's writers: atomic replacement, and a file that
//! hashes what it writes (so sealing takes each log's SHA-256 from its writer instead of
//! reading the file back).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Writes a file by writing a temporary sibling, syncing it and renaming it over the target,
/// so readers never see half a manifest.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    crate::crash::sealing_step();
    std::fs::rename(&tmp, path)?;
    crate::crash::sealing_step();
    Ok(())
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

/// A temporary file sealing writes before renaming it into place (`manifest.tmp`,
/// `SHA256SUMS.tmp`, …): one left behind means the runner died between the two.
pub fn has_leftovers(bundle: &Path) -> bool {
    !leftovers(bundle).is_empty()
}

/// The temporary files of interrupted [`write_atomic`]s in the bundle's top directory.
pub fn leftovers(bundle: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(bundle)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "tmp"))
                .collect()
        })
        .unwrap_or_default()
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
}
