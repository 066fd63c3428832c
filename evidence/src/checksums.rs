//! `SHA256SUMS`: one `<hex>  <relative path>` line per file, sorted, in the format
//! `sha256sum -c` reads. Files whose digest their writer already knows (see
//! [`crate::fs::HashingFile`]) are not read again.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{write_err, EvidenceError};

pub const FILE_NAME: &str = "SHA256SUMS";

/// Every regular file under `dir`, relative, sorted; `SHA256SUMS*` at the top level excluded.
pub fn bundle_files(dir: &Path) -> Result<Vec<PathBuf>, EvidenceError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| EvidenceError::Read {
            path: d.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| EvidenceError::Read {
                path: d.clone(),
                source,
            })?;
            let path = entry.path();
            let kind = entry.file_type().map_err(|source| EvidenceError::Read {
                path: path.clone(),
                source,
            })?;
            if kind.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(dir) {
                let top = rel.components().count() == 1;
                let name = rel.to_string_lossy();
                if top && (name.starts_with(FILE_NAME) || name == ".lock") {
                    continue;
                }
                out.push(rel.to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
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
