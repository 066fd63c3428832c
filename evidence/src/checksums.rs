//! `SHA256SUMS`: one `<hex>  <relative path>` line per file, sorted, in the format
//! `sha256sum -c` reads.

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
    let mut text = String::new();
    for rel in bundle_files(dir)? {
        let hash = sha256_file(&dir.join(&rel))?;
        text.push_str(&format!("{hash}  {}\n", rel.to_string_lossy()));
    }
    let path = dir.join(FILE_NAME);
    crate::recorder::write_atomic(&path, text.as_bytes()).map_err(write_err(&path))?;
    Ok(text)
}
