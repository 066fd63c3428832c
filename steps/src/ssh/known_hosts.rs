//! OpenSSH `known_hosts` files: looking a server key up and appending a newly trusted one.
//!
//! Understands what OpenSSH writes and reads: comma-separated host patterns with `*`/`?`
//! wildcards and `!` negation, hashed entries (`|1|salt|hmac`), `[host]:port` for ports other
//! than 22, the `@revoked` marker, and `@cert-authority` lines, which vouch for host
//! certificates (and never for a plain key).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine;
use hmac::{Hmac, Mac};
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::ssh_key::{Algorithm, Certificate, HashAlg, PublicKey};

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
    /// An `@cert-authority` line: the key signs host certificates, it is no host key.
    ca: bool,
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
        let mut ca = false;
        if let Some(marker) = first.strip_prefix('@') {
            match marker {
                "revoked" => revoked = true,
                "cert-authority" => ca = true,
                // A marker we do not know: OpenSSH skips the line too.
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
            ca,
            key,
        });
    }
    Ok(entries)
}

pub(crate) fn lookup(path: &Path, name: &str, key: &PublicKey) -> Result<Lookup, String> {
    let mut entries = matching_entries(path, name)?;
    entries.retain(|e| !e.ca);
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
        .filter(|e| !e.revoked && !e.ca)
        .map(|e| e.key.algorithm())
        .collect()
}

/// Whether an `@cert-authority` line applies to `name`: then host certificates are asked
/// for first, as OpenSSH does.
pub(crate) fn has_authority(path: &Path, name: &str) -> bool {
    matching_entries(path, name)
        .unwrap_or_default()
        .iter()
        .any(|e| e.ca && !e.revoked)
}

/// The verdict on a host certificate: signed by an `@cert-authority` listed for `name`,
/// valid now, a host certificate naming `principal`, neither it nor its CA `@revoked`.
pub(crate) fn check_certificate(
    path: &Path,
    name: &str,
    principal: &str,
    cert: &Certificate,
) -> Result<Result<(), String>, String> {
    let entries = matching_entries(path, name)?;
    let key = PublicKey::new(cert.public_key().clone(), "");
    let signer = PublicKey::new(cert.signature_key().clone(), "");
    let at = |e: &Entry| format!("{}:{}", path.display(), e.line_no);
    for e in entries.iter().filter(|e| e.revoked) {
        if e.key.key_data() == key.key_data() || e.key.key_data() == signer.key_data() {
            return Ok(Err(format!("{} marks it @revoked", at(e))));
        }
    }
    let authorities: Vec<&Entry> = entries.iter().filter(|e| e.ca).collect();
    let Some(ca) = authorities
        .iter()
        .find(|e| e.key.key_data() == signer.key_data())
    else {
        return Ok(Err(if authorities.is_empty() {
            format!(
                "no @cert-authority line in `{}` applies to `{name}`",
                path.display()
            )
        } else {
            format!(
                "it is signed by {}, which is not the @cert-authority for `{name}` ({})",
                fingerprint(&signer),
                authorities
                    .iter()
                    .map(|e| at(e))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }));
    };
    if cert.cert_type() != CertType::Host {
        return Ok(Err(
            "it is a user certificate, not a host certificate".into()
        ));
    }
    let ca_fp = ca.key.fingerprint(HashAlg::Sha256);
    if let Err(e) = cert.validate([&ca_fp]) {
        return Ok(Err(format!(
            "it does not validate against {} ({e}; expired or not yet valid?)",
            at(ca)
        )));
    }
    let principals = cert.valid_principals();
    if !principals.is_empty() && !principals.iter().any(|p| p.eq_ignore_ascii_case(principal)) {
        return Ok(Err(format!(
            "it is for {}, not `{principal}`",
            principals.join(", ")
        )));
    }
    Ok(Ok(()))
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
    // A file whose entries are hashed (`HashKnownHosts yes`, `ssh-keygen -H`) gets a hashed
    // one too, so it does not start listing names in clear.
    let mut existing = String::new();
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    file.read_to_string(&mut existing)
        .map_err(|e| e.to_string())?;
    let label = if is_hashed(&existing) {
        hash_name(name)?
    } else {
        name.to_string()
    };
    let line = format!(
        "{}{label} {}\n",
        if needs_newline { "\n" } else { "" },
        encoded.trim()
    );
    file.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
    file.sync_all().map_err(|e| e.to_string())
}

/// Whether the file's host entries are hashed (the first one decides, like `ssh-keygen -H`
/// leaves a file all hashed).
fn is_hashed(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut fields = l.split_whitespace();
            let first = fields.next().unwrap_or_default();
            if first.starts_with('@') {
                fields.next().unwrap_or_default()
            } else {
                first
            }
        })
        .next()
        .is_some_and(|f| f.starts_with("|1|"))
}

/// `|1|salt|HMAC-SHA1(salt, name)`, as OpenSSH hashes a name, with a fresh random salt.
fn hash_name(name: &str) -> Result<String, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut salt = [0u8; 20];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut salt))
        .map_err(|e| format!("no randomness for a hashed entry: {e}"))?;
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(&salt).map_err(|e| e.to_string())?;
    mac.update(name.as_bytes());
    Ok(format!(
        "|1|{}|{}",
        b64.encode(salt),
        b64.encode(mac.finalize().into_bytes())
    ))
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
pub(crate) fn glob(pattern: &[u8], text: &[u8]) -> bool {
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

    #[test]
    fn hashed_names_match_themselves_only() {
        let hashed = hash_name("[127.0.0.1]:2222").expect("hash");
        assert!(patterns_match(&hashed, "[127.0.0.1]:2222"));
        assert!(!patterns_match(&hashed, "[127.0.0.1]:2223"));
        assert!(is_hashed(&format!("# c\n{hashed} ssh-ed25519 AAAA\n")));
        assert!(!is_hashed("host ssh-ed25519 AAAA\n"));
    }
}
