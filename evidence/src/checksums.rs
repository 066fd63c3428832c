//! `SHA256SUMS`: one `<hex>  <relative path>` line per file, sorted, in the format
//! `sha256sum -c` reads. Files whose digest their writer already knows (see
//! [`crate::fs::HashingFile`]) are not read again.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{write_err, EvidenceError};

pub const FILE_NAME: &str = "SHA256SUMS";
/// The signature over [`FILE_NAME`].
pub const SIGNATURE_FILE: &str = "SHA256SUMS.minisig";
/// The run's lock, taken while the bundle is written.
pub const LOCK_FILE: &str = ".lock";

/// Files at the bundle's top that the sums do not cover: the sums themselves, what is made
/// from them afterwards (signature, time-stamp token) and the lock. Everything else in the
/// bundle is listed, so that `verify` finds a file added after sealing.
pub const NOT_SUMMED: [&str; 4] = [FILE_NAME, SIGNATURE_FILE, crate::tsa::TSR_FILE, LOCK_FILE];

/// The one walk of a bundle (sealing and verify): every non-directory under `dir` (links not
/// followed), relative, sorted, without [`NOT_SUMMED`]. An error names the relative path
/// that could not be read (empty for `dir` itself).
pub fn walk(dir: &Path) -> Result<Vec<PathBuf>, (PathBuf, std::io::Error)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel_dir) = stack.pop() {
        let entries = std::fs::read_dir(dir.join(&rel_dir)).map_err(|e| (rel_dir.clone(), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| (rel_dir.clone(), e))?;
            let rel = rel_dir.join(entry.file_name());
            let kind = entry.file_type().map_err(|e| (rel.clone(), e))?;
            if kind.is_dir() {
                stack.push(rel);
            } else if !(rel_dir.as_os_str().is_empty()
                && NOT_SUMMED.iter().any(|n| entry.file_name() == *n))
            {
                out.push(rel);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// [`walk`], an error naming the absolute path.
pub fn bundle_files(dir: &Path) -> Result<Vec<PathBuf>, EvidenceError> {
    walk(dir).map_err(|(rel, source)| EvidenceError::Read {
        path: dir.join(rel),
        source,
    })
}

pub fn sha256_file(path: &Path) -> Result<String, EvidenceError> {
    let mut file = std::fs::File::open(path).map_err(|source| EvidenceError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(|source| EvidenceError::Read {
            path: path.to_owned(),
            source,
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

pub fn sha256_bytes(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Writes `SHA256SUMS` for the bundle and returns its text.
pub fn write(dir: &Path) -> Result<String, EvidenceError> {
    write_with(dir, &HashMap::new())
}

/// Writes `SHA256SUMS`, taking the digest of the files in `known` (relative path → hex
/// SHA-256, from the writer that wrote the file whole) as given and reading every other file.
pub fn write_with<S: std::hash::BuildHasher>(
    dir: &Path,
    known: &HashMap<PathBuf, String, S>,
) -> Result<String, EvidenceError> {
    let mut text = Vec::new();
    for rel in bundle_files(dir)? {
        let hash = match known.get(&rel) {
            Some(hash) => hash.clone(),
            None => sha256_file(&dir.join(&rel))?,
        };
        text.extend_from_slice(&sums_line(&hash, &rel));
    }
    let path = dir.join(FILE_NAME);
    crate::fs::write_atomic(&path, &text).map_err(write_err(&path))?;
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// One line as `sha256sum` writes it: `<hex>  <path>`, the path's bytes as they are. A path
/// with a line break is escaped the GNU way (the line starts with `\`; `\\`, `\n`, `\r`), so
/// every line stays one line. (Collected files get names without control characters or
/// invalid UTF-8, which `evidence verify` could not match; this keeps the file readable
/// whatever is in the bundle.)
fn sums_line(hash: &str, rel: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let name = rel.as_os_str().as_bytes();
    let mut line = Vec::with_capacity(name.len() + 70);
    if name.iter().any(|b| matches!(b, b'\n' | b'\r')) {
        line.push(b'\\');
        line.extend_from_slice(hash.as_bytes());
        line.extend_from_slice(b"  ");
        for &b in name {
            match b {
                b'\\' => line.extend_from_slice(b"\\\\"),
                b'\n' => line.extend_from_slice(b"\\n"),
                b'\r' => line.extend_from_slice(b"\\r"),
                b => line.push(b),
            }
        }
    } else {
        line.extend_from_slice(hash.as_bytes());
        line.extend_from_slice(b"  ");
        line.extend_from_slice(name);
    }
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sealing and verify walk the bundle alike: the top's sums, signature, token and lock
    /// are left out, the same names deeper down and every other top-level file are not.
    #[test]
    fn the_walk_leaves_out_only_what_the_sums_cannot_cover() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("steps").join("collect");
        std::fs::create_dir_all(&sub).expect("mkdir");
        for name in NOT_SUMMED
            .iter()
            .chain(&["SHA256SUMS.bak", "manifest.json"])
        {
            std::fs::write(dir.path().join(name), "x").expect("write");
        }
        std::fs::write(sub.join(FILE_NAME), "x").expect("write");
        std::fs::write(sub.join(LOCK_FILE), "x").expect("write");
        let files = walk(dir.path()).expect("walk");
        assert_eq!(
            files,
            [
                PathBuf::from("SHA256SUMS.bak"),
                PathBuf::from("manifest.json"),
                PathBuf::from("steps/collect/.lock"),
                PathBuf::from("steps/collect/SHA256SUMS"),
            ]
        );
        let gone = dir.path().join("nothing");
        assert!(matches!(walk(&gone), Err((rel, _)) if rel.as_os_str().is_empty()));
    }

    #[test]
    fn names_with_line_breaks_are_escaped_as_sha256sum_does() {
        let hash = "0".repeat(64);
        let line =
            |name: &str| String::from_utf8(sums_line(&hash, Path::new(name))).expect("utf-8");
        assert_eq!(line("a/b.txt"), format!("{hash}  a/b.txt\n"));
        // A backslash alone needs no escape (sha256sum -c reads the line as it is).
        assert_eq!(line("a\\b"), format!("{hash}  a\\b\n"));
        assert_eq!(line("a\nb\\c"), format!("\\{hash}  a\\nb\\\\c\n"));
    }
}
