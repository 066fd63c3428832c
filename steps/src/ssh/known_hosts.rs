//! OpenSSH `known_hosts` files: looking a server key up and appending a newly trusted one.
//!
//! Understands what OpenSSH writes and reads: comma-separated host patterns with `*`/`?`
//! wildcards and `!` negation, hashed entries (`|1|salt|hmac`), `[host]:port` for ports other
//! than 22, and the `@revoked` marker. `@cert-authority` lines are skipped: we never ask for
//! host certificates, so a CA line can neither vouch for nor contradict a plain key.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine;
use hmac::{Hmac, Mac};
use russh::keys::ssh_key::{Algorithm, HashAlg, PublicKey};

/// Appends from concurrent connects in this process must not interleave.
static APPEND_LOCK: Mutex<()> = Mutex::new(());

/// The verdict for one presented server key.
#[derive(Debug)]
pub(crate) enum Lookup {
    Known,
    Unknown,
    /// The host has entries, none of them this key; `line` is the first matching entry.
    Changed {
        line: String,
        expected: String,
    },
    /// The key is explicitly distrusted.
    Revoked {
        line: String,
    },
}

/// The name OpenSSH files a host under: the bare name on port 22, `[name]:port` otherwise.
pub(crate) fn host_entry_name(address: &str, port: u16) -> String {
    if port == 22 {
        address.to_string()
    } else {
        format!("[{address}]:{port}")
    }
}

pub(crate) fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

struct Entry {
    line_no: usize,
    revoked: bool,
    key: PublicKey,
}

/// Entries of `path` whose patterns match `name`. A missing file has no entries.
fn matching_entries(path: &Path, name: &str) -> Result<Vec<Entry>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.to_string()),
    };
    let mut entries = Vec::new();
    for (idx, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let mut first = fields.next().unwrap_or_default();
        let mut revoked = false;
        if let Some(marker) = first.strip_prefix('@') {
            match marker {
                "revoked" => revoked = true,
                // A CA line, or a marker we do not know: not a statement about a plain key.
                _ => continue,
            }
            first = fields.next().unwrap_or_default();
        }
        let (Some(kind), Some(blob)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !patterns_match(first, name) {
            continue;
        }
        // OpenSSH skips lines it cannot parse; so do we, rather than refusing every host.
        let Ok(key) = PublicKey::from_openssh(&format!("{kind} {blob}")) else {
            continue;
        };
        entries.push(Entry {
            line_no: idx + 1,
            revoked,
            key,
        });
    }
    Ok(entries)
}

pub(crate) fn lookup(path: &Path, name: &str, key: &PublicKey) -> Result<Lookup, String> {
    let entries = matching_entries(path, name)?;
    let same = |e: &Entry| e.key.key_data() == key.key_data();
    if let Some(e) = entries.iter().find(|e| e.revoked && same(e)) {
        return Ok(Lookup::Revoked {
            line: format!("{}:{}", path.display(), e.line_no),
        });
    }
    let trusted: Vec<&Entry> = entries.iter().filter(|e| !e.revoked).collect();
    if trusted.iter().any(|e| same(e)) {
        return Ok(Lookup::Known);
    }
    Ok(match trusted.first() {
        None => Lookup::Unknown,
        Some(e) => Lookup::Changed {
            line: format!("{}:{}", path.display(), e.line_no),
            expected: fingerprint(&e.key),
        },
    })
}

/// Algorithms of the keys already trusted for `name`, so the handshake can ask the server for
/// one of those first (as OpenSSH does) instead of getting a different key type that would
/// look like a change.
pub(crate) fn known_algorithms(path: &Path, name: &str) -> Vec<Algorithm> {
    matching_entries(path, name)
        .unwrap_or_default()
        .iter()
        .filter(|e| !e.revoked)
        .map(|e| e.key.algorithm())
        .collect()
}

/// Appends `name key` to the file (created with its directory if missing).
pub(crate) fn append(path: &Path, name: &str, key: &PublicKey) -> Result<(), String> {
    let mut plain = key.clone();
    plain.set_comment("");
    let encoded = plain.to_openssh().map_err(|e| e.to_string())?;
    let _guard = APPEND_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| e.to_string())?;
    // Do not glue our entry onto a last line that lacks its newline.
    let mut needs_newline = false;
    if file.seek(SeekFrom::End(-1)).is_ok() {
        let mut last = [0u8; 1];
        file.read_exact(&mut last).map_err(|e| e.to_string())?;
        needs_newline = last[0] != b'\n';
    }
    let line = format!(
        "{}{name} {}\n",
        if needs_newline { "\n" } else { "" },
        encoded.trim()
    );
    file.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
    file.sync_all().map_err(|e| e.to_string())
}

/// OpenSSH's `match_hostname`: any positive pattern matches and no negated one does.
fn patterns_match(patterns: &str, name: &str) -> bool {
    if let Some(hashed) = patterns.strip_prefix("|1|") {
        return hashed_matches(hashed, name);
    }
    let mut matched = false;
    for pattern in patterns.split(',') {
        if let Some(negated) = pattern.strip_prefix('!') {
            if glob(negated.as_bytes(), name.as_bytes()) {
                return false;
            }
        } else if glob(pattern.as_bytes(), name.as_bytes()) {
            matched = true;
        }
    }
    matched
}

fn hashed_matches(hashed: &str, name: &str) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    let Some((salt, hash)) = hashed.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (b64.decode(salt), b64.decode(hash)) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(&salt) else {
        return false;
    };
    mac.update(name.as_bytes());
    mac.verify_slice(&hash).is_ok()
}

/// `*` and `?` wildcards, case-insensitive like OpenSSH host matching.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|skip| glob(rest, &text[skip..])),
        Some((&p, rest)) => match text.split_first() {
            Some((&t, text_rest)) if p == b'?' || p.eq_ignore_ascii_case(&t) => {
                glob(rest, text_rest)
            }
            _ => false,
        },
    }
}

/// The default file when a caller has no better idea: `~/.ssh/known_hosts`.
pub fn default_known_hosts() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".ssh")
        .join("known_hosts")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(patterns_match("a.example,b.example", "b.example"));
        assert!(patterns_match("*.example,!bad.example", "good.example"));
        assert!(!patterns_match("*.example,!bad.example", "bad.example"));
        assert!(patterns_match("[127.0.0.1]:2222", "[127.0.0.1]:2222"));
        assert!(!patterns_match("127.0.0.1", "[127.0.0.1]:2222"));
        assert!(patterns_match("HOST?", "host1"));
    }

    #[test]
    fn hashed_entry_from_openssh() {
        // `ssh-keygen -H` output for `[127.0.0.1]:2222`.
        let hashed = "alyQA1pdJ/85tT1L3e4H7uLmAgc=|Vj68F43SSDw4LyXaXSkJZHFe2Yk=";
        assert!(hashed_matches(hashed, "[127.0.0.1]:2222"));
        assert!(!hashed_matches(hashed, "[127.0.0.1]:2223"));
    }
}
