//! Opening one authenticated SSH connection: the transport (TCP, or a `direct-tcpip` channel
//! through a bastion), the handshake with host key verification, and public key auth.
//!
//! Host key checking happens inside the handshake callback, so a refused key aborts the
//! connection before any credential is offered.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use russh::client::{self, AuthResult, Handle};
use russh::keys::agent::client::AgentClient;
use russh::keys::agent::AgentIdentity;
use russh::keys::ssh_key::{Algorithm, Certificate, HashAlg, PrivateKey, PublicKey};
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{MethodKind, Preferred};
use tokio::io::{AsyncRead, AsyncWrite};

use super::known_hosts::{self, Lookup};
use super::{AcceptedKey, HostKeyCheck, SshError, SshHost};

/// The russh handler: it only verifies the server's host key.
pub(crate) struct ClientHandler {
    host: String,
    /// What a host certificate's principals must name.
    address: String,
    entry_name: String,
    known_hosts: PathBuf,
    check: HostKeyCheck,
    accepted: Arc<Mutex<Vec<AcceptedKey>>>,
}

/// Lets the handshake callback hand back a precise [`SshError`] instead of russh's generic
/// "unknown key".
#[derive(Debug)]
pub(crate) enum HandlerError {
    Russh(russh::Error),
    Refused(SshError),
}

impl From<russh::Error> for HandlerError {
    fn from(e: russh::Error) -> Self {
        HandlerError::Russh(e)
    }
}

impl client::Handler for ClientHandler {
    type Error = HandlerError;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        if let PublicKeyOrCertificate::Certificate(cert) = server_key {
            let verdict = known_hosts::check_certificate(
                &self.known_hosts,
                &self.entry_name,
                &self.address,
                cert,
            )
            .map_err(|reason| {
                HandlerError::Refused(SshError::KnownHosts {
                    path: self.known_hosts.clone(),
                    reason,
                })
            })?;
            return match verdict {
                Ok(()) => Ok(true),
                Err(why) => Err(HandlerError::Refused(SshError::HostCertificate {
                    host: self.host.clone(),
                    key_id: cert.key_id().to_string(),
                    reason: why,
                })),
            };
        }
        let key = server_key.public_key();
        let got = known_hosts::fingerprint(&key);
        let verdict =
            known_hosts::lookup(&self.known_hosts, &self.entry_name, &key).map_err(|reason| {
                HandlerError::Refused(SshError::KnownHosts {
                    path: self.known_hosts.clone(),
                    reason,
                })
            })?;
        match verdict {
            Lookup::Known => Ok(true),
            Lookup::Changed { line, expected } => {
                Err(HandlerError::Refused(SshError::HostKeyMismatch {
                    host: self.host.clone(),
                    known_hosts_line: line,
                    expected_fingerprint: expected,
                    got_fingerprint: got,
                }))
            }
            Lookup::Revoked { line } => Err(HandlerError::Refused(SshError::HostKeyMismatch {
                host: self.host.clone(),
                known_hosts_line: line,
                expected_fingerprint: "(this key is marked @revoked)".into(),
                got_fingerprint: got,
            })),
            Lookup::Unknown => match self.check {
                HostKeyCheck::Strict => Err(HandlerError::Refused(SshError::HostKeyUnknown {
                    host: self.host.clone(),
                    fingerprint: got,
                    known_hosts: self.known_hosts.clone(),
                })),
                HostKeyCheck::AcceptNew => {
                    known_hosts::append(&self.known_hosts, &self.entry_name, &key).map_err(
                        |reason| {
                            HandlerError::Refused(SshError::KnownHosts {
                                path: self.known_hosts.clone(),
                                reason,
                            })
                        },
                    )?;
                    tracing::info!(host = %self.host, fingerprint = %got, "trusted new host key");
                    self.accepted
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(AcceptedKey {
                            host: self.host.clone(),
                            fingerprint: got,
                            known_hosts: self.known_hosts.clone(),
                        });
                    Ok(true)
                }
            },
        }
    }
}

pub(crate) type SshHandle = Handle<ClientHandler>;

/// Host key algorithms we accept, most preferred first. `ssh-rsa` (SHA-1) is left out.
fn host_key_preference(known: &[Algorithm]) -> Vec<Algorithm> {
    let mut all: Vec<Algorithm> = Preferred::DEFAULT
        .key
        .iter()
        .filter(|a| !matches!(a, Algorithm::Rsa { hash: None }))
        .cloned()
        .collect();
    // Ask first for what we already trust, so a host with several keys shows a known one.
    all.sort_by_key(|a| {
        !known.iter().any(|k| match (k, a) {
            (Algorithm::Rsa { .. }, Algorithm::Rsa { .. }) => true,
            (k, a) => k == a,
        })
    });
    all
}

/// Key exchanges we offer, most preferred first: russh's defaults (post-quantum hybrid,
/// curve25519, then finite-field Diffie-Hellman) with the NIST ECDH curves added before the
/// finite-field groups. Hosts under a FIPS crypto policy (RHEL/Rocky 9 `fips=1`) offer no
/// curve25519; without these they fall back to 2048–8192-bit DH, which costs both ends
/// milliseconds of CPU per connection.
fn kex_preference() -> Vec<russh::kex::Name> {
    use russh::kex;
    let mut all: Vec<kex::Name> = Preferred::DEFAULT.kex.to_vec();
    let at = all
        .iter()
        .position(|n| n.as_ref().starts_with("diffie-hellman"))
        .unwrap_or(all.len());
    for (i, ecdh) in [
        kex::ECDH_SHA2_NISTP256,
        kex::ECDH_SHA2_NISTP384,
        kex::ECDH_SHA2_NISTP521,
    ]
    .into_iter()
    .enumerate()
    {
        all.insert(at + i, ecdh);
    }
    all
}

pub(crate) fn client_config(host: &SshHost) -> client::Config {
    let entry = known_hosts::host_entry_name(&host.address, host.port);
    let known = known_hosts::known_algorithms(&host.known_hosts, &entry);
    client::Config {
        keepalive_interval: host.keepalive,
        keepalive_max: 3,
        nodelay: true,
        preferred: Preferred {
            kex: Cow::Owned(kex_preference()),
            key: Cow::Owned(host_key_preference(&known)),
            // Only where a CA is trusted for the host: otherwise a server with a certificate
            // would present it instead of the plain key `known_hosts` lists.
            host_key_certificates: if known_hosts::has_authority(&host.known_hosts, &entry) {
                Cow::Owned(host_key_preference(&[]))
            } else {
                Cow::Borrowed(&[])
            },
            ..Preferred::DEFAULT
        },
        ..client::Config::default()
    }
}

pub(crate) fn handler(host: &SshHost, accepted: Arc<Mutex<Vec<AcceptedKey>>>) -> ClientHandler {
    ClientHandler {
        host: host.name.clone(),
        address: host.address.clone(),
        entry_name: known_hosts::host_entry_name(&host.address, host.port),
        known_hosts: host.known_hosts.clone(),
        check: host.host_key_check,
        accepted,
    }
}

/// Runs the SSH handshake over an established stream.
pub(crate) async fn handshake<S>(
    host: &SshHost,
    stream: S,
    accepted: Arc<Mutex<Vec<AcceptedKey>>>,
) -> Result<SshHandle, SshError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = Arc::new(client_config(host));
    client::connect_stream(config, stream, handler(host, accepted))
        .await
        .map_err(|e| match e {
            HandlerError::Refused(e) => e,
            HandlerError::Russh(e) => russh_error(&host.name, "handshake", e),
        })
}

/// Classifies a russh error that ended an operation on `host`.
pub(crate) fn russh_error(host: &str, during: &str, e: russh::Error) -> SshError {
    match e {
        russh::Error::IO(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            SshError::ConnectRefused {
                host: host.to_string(),
                addr: String::new(),
            }
        }
        russh::Error::IO(io) => SshError::Io {
            host: host.to_string(),
            reason: format!("{during}: {io}"),
        },
        russh::Error::NoCommonAlgo { kind, ours, theirs } => {
            // The strict-kex and ext-info markers ride in the kex list but are not algorithms.
            let real = |names: Vec<String>| -> Vec<String> {
                names
                    .into_iter()
                    .filter(|n| !n.starts_with("ext-info-") && !n.starts_with("kex-strict-"))
                    .collect()
            };
            SshError::Negotiation {
                host: host.to_string(),
                what: match kind {
                    russh::AlgorithmKind::Kex => "key exchange",
                    russh::AlgorithmKind::Key => "host key",
                    russh::AlgorithmKind::Cipher => "cipher",
                    russh::AlgorithmKind::Mac => "MAC",
                    russh::AlgorithmKind::Compression => "compression",
                },
                theirs: real(theirs),
                ours: real(ours),
            }
        }
        russh::Error::ChannelOpenFailure(f) => SshError::Channel {
            host: host.to_string(),
            reason: format!("{during}: the server refused to open a channel ({f:?})"),
        },
        other => SshError::Io {
            host: host.to_string(),
            reason: format!("{during}: {other}"),
        },
    }
}

/// A key ready to offer, with how to describe it in an [`SshError::Auth`].
struct LoadedKey {
    key: Arc<PrivateKey>,
    label: String,
    /// Its user certificate (`CertificateFile`, or `<key>-cert.pub` beside it), offered
    /// before the bare key.
    cert: Option<Certificate>,
}

/// The certificates of `host.certificate_files` that load (an unreadable one is noted).
fn load_certificates(host: &SshHost, tried: &mut Vec<String>) -> Vec<Certificate> {
    host.certificate_files
        .iter()
        .filter_map(|p| match Certificate::read_file(p) {
            Ok(c) => Some(c),
            Err(e) => {
                tried.push(format!("certificate {} (skipped: {e})", p.display()));
                None
            }
        })
        .collect()
}

/// The certificate for `key`: a configured one for the same public key, else the
/// `<key>-cert.pub` beside the key file.
fn certificate_for(
    key: &PrivateKey,
    path: &Path,
    configured: &[Certificate],
) -> Option<Certificate> {
    let public = key.public_key().key_data();
    configured
        .iter()
        .find(|c| c.public_key() == public)
        .cloned()
        .or_else(|| {
            let mut beside = path.as_os_str().to_owned();
            beside.push("-cert.pub");
            Certificate::read_file(Path::new(&beside))
                .ok()
                .filter(|c| c.public_key() == public)
        })
}

fn describe_cert(cert: &Certificate) -> String {
    format!("certificate `{}` serial {}", cert.key_id(), cert.serial())
}

fn describe(key: &PublicKey) -> String {
    format!("{} {}", key.algorithm(), known_hosts::fingerprint(key))
}

/// The keys OpenSSH would try by default when none are configured.
fn default_identity_files() -> Vec<PathBuf> {
    let Some(home) = std::env::var_os("HOME").map(PathBuf::from) else {
        return Vec::new();
    };
    ["id_ed25519", "id_ecdsa", "id_rsa"]
        .iter()
        .map(|name| home.join(".ssh").join(name))
        .filter(|p| p.is_file())
        .collect()
}

/// Whether the key file at `path` needs a passphrase: it parses only with one. Unreadable or
/// unparsable files say no; connecting reports what is wrong with them.
pub fn key_is_encrypted(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|text| {
        matches!(
            decode_key(&text, None),
            Err(russh::keys::Error::KeyIsEncrypted)
        )
    })
}

/// Whether `passphrase` decrypts the key file at `path`.
pub fn passphrase_opens(path: &Path, passphrase: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|text| decode_key(&text, Some(passphrase)).is_ok())
}

/// A private key from its file text. russh reads every format but encrypted legacy EC PEM
/// (`BEGIN EC PRIVATE KEY` with `DEK-Info`, as `ssh-keygen -m PEM` writes), whose decrypted
/// content it takes for RSA: those are decrypted here and handed over unencrypted.
fn decode_key(text: &str, passphrase: Option<&str>) -> Result<PrivateKey, russh::keys::Error> {
    if text.contains("-----BEGIN EC PRIVATE KEY-----") && text.contains("DEK-Info:") {
        let Some(passphrase) = passphrase else {
            return Err(russh::keys::Error::KeyIsEncrypted);
        };
        let der =
            legacy_pem::decrypt(text, passphrase).ok_or(russh::keys::Error::CouldNotReadKey)?;
        let plain = legacy_pem::pem("EC PRIVATE KEY", &der);
        return russh::keys::decode_secret_key(&plain, None);
    }
    russh::keys::decode_secret_key(text, passphrase)
}

/// OpenSSL's traditional encrypted PEM (`Proc-Type: 4,ENCRYPTED`, `DEK-Info: AES-…-CBC,iv`):
/// key from `EVP_BytesToKey` (MD5, one round, salt = first 8 bytes of the IV).
mod legacy_pem {
    use aes::cipher::{block_padding::Pkcs7, BlockModeDecrypt, KeyIvInit};
    use base64::Engine;

    pub(super) fn decrypt(text: &str, passphrase: &str) -> Option<Vec<u8>> {
        let mut cipher = None;
        let mut body = String::new();
        let mut inside = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with("-----BEGIN ") {
                inside = true;
            } else if line.starts_with("-----END ") {
                break;
            } else if let Some(info) = line.strip_prefix("DEK-Info:") {
                let (name, iv) = info.trim().split_once(',')?;
                cipher = Some((name.to_string(), hex::decode(iv).ok()?));
            } else if inside && !line.contains(':') {
                body.push_str(line);
            }
        }
        let (name, iv) = cipher?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(body)
            .ok()?;
        let key_len = match name.as_str() {
            "AES-128-CBC" => 16,
            "AES-256-CBC" => 32,
            _ => return None,
        };
        if iv.len() != 16 {
            return None;
        }
        let mut key = Vec::new();
        let mut last: Vec<u8> = Vec::new();
        while key.len() < key_len {
            let mut c = md5::Context::new();
            c.consume(&last);
            c.consume(passphrase.as_bytes());
            c.consume(&iv[..8]);
            last = c.finalize().0.to_vec();
            key.extend_from_slice(&last);
        }
        key.truncate(key_len);
        let mut buf = data;
        let plain = if key_len == 16 {
            cbc::Decryptor::<aes::Aes128>::new_from_slices(&key, &iv)
                .ok()?
                .decrypt_padded::<Pkcs7>(&mut buf)
                .ok()?
                .to_vec()
        } else {
            cbc::Decryptor::<aes::Aes256>::new_from_slices(&key, &iv)
                .ok()?
                .decrypt_padded::<Pkcs7>(&mut buf)
                .ok()?
                .to_vec()
        };
        // A DER SEQUENCE; anything else means the passphrase was wrong.
        (plain.first() == Some(&0x30)).then_some(plain)
    }

    pub(super) fn pem(label: &str, der: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = format!("-----BEGIN {label}-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        out
    }
}

fn load_key(
    path: &Path,
    passphrase_env: Option<&str>,
    given: &HashMap<PathBuf, String>,
) -> Result<PrivateKey, SshError> {
    let key_error = |reason: String| SshError::Key {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| key_error(format!("cannot read: {e}")))?;
    let passphrase = passphrase_env
        .and_then(|var| std::env::var(var).ok())
        .or_else(|| given.get(path).cloned());
    match decode_key(&text, passphrase.as_deref()) {
        Ok(key) => Ok(key),
        Err(russh::keys::Error::KeyIsEncrypted) => Err(key_error(match passphrase_env {
            Some(var) => format!(
                "the key is encrypted and `{var}` is not set (or run from a terminal to be asked)"
            ),
            None => "the key is encrypted and no passphrase was given: set `passphrase_env` \
                     or run from a terminal to be asked"
                .into(),
        })),
        Err(e) if passphrase.is_some() => Err(key_error(format!(
            "cannot decrypt (wrong passphrase?): {e}"
        ))),
        Err(e) => Err(key_error(format!("cannot parse: {e}"))),
    }
}

/// Loads the configured key files before connecting, so a bad key fails fast and without
/// bothering the server. With no configured keys, the default ones that load are used and
/// the others noted for the error report.
fn load_identities(
    host: &SshHost,
    given: &HashMap<PathBuf, String>,
    certs: &[Certificate],
    tried: &mut Vec<String>,
) -> Result<Vec<LoadedKey>, SshError> {
    let env = host.passphrase_env.as_deref();
    let loaded = |path: &Path, key: PrivateKey| LoadedKey {
        label: format!("key {} ({})", path.display(), describe(key.public_key())),
        cert: certificate_for(&key, path, certs),
        key: Arc::new(key),
    };
    if host.identity_files.is_empty() {
        let mut keys = Vec::new();
        for path in default_identity_files() {
            match load_key(&path, env, given) {
                Ok(key) => keys.push(loaded(&path, key)),
                Err(e) => tried.push(format!("key {} (skipped: {e})", path.display())),
            }
        }
        return Ok(keys);
    }
    host.identity_files
        .iter()
        .map(|path| Ok(loaded(path, load_key(path, env, given)?)))
        .collect()
}

/// Why the server stopped listening to us, if it did.
fn publickey_allowed(result: &AuthResult) -> bool {
    match result {
        AuthResult::Failure {
            remaining_methods, ..
        } => remaining_methods.is_empty() || remaining_methods.contains(&MethodKind::PublicKey),
        _ => true,
    }
}

/// The RSA signature hash to use: SHA-2 always (OpenSSH refuses `ssh-rsa` SHA-1 signatures),
/// SHA-512 unless the server only announces SHA-256.
async fn rsa_hash(handle: &SshHandle) -> Option<HashAlg> {
    match handle.best_supported_rsa_hash().await {
        Ok(Some(Some(HashAlg::Sha256))) => Some(HashAlg::Sha256),
        _ => Some(HashAlg::Sha512),
    }
}

/// Offers the configured keys, then the agent's, until one is accepted.
pub(crate) async fn authenticate(
    handle: &mut SshHandle,
    host: &SshHost,
    agent_socket: Option<&Path>,
    passphrases: &HashMap<PathBuf, String>,
) -> Result<(), SshError> {
    let mut tried = Vec::new();
    let certs = load_certificates(host, &mut tried);
    let keys = load_identities(host, passphrases, &certs, &mut tried)?;
    let auth_error = |tried: Vec<String>| SshError::Auth {
        host: host.name.clone(),
        user: host.user.clone(),
        tried,
    };
    let failed = |e: russh::Error| russh_error(&host.name, "authentication", e);

    for loaded in keys {
        if let Some(cert) = &loaded.cert {
            let result = handle
                .authenticate_openssh_cert(host.user.clone(), loaded.key.clone(), cert.clone())
                .await
                .map_err(failed)?;
            tried.push(format!("{} with {}", loaded.label, describe_cert(cert)));
            if result.success() {
                return Ok(());
            }
        }
        let hash = if loaded.key.algorithm().is_rsa() {
            rsa_hash(handle).await
        } else {
            None
        };
        let result = handle
            .authenticate_publickey(
                host.user.clone(),
                PrivateKeyWithHashAlg::new(loaded.key.clone(), hash),
            )
            .await
            .map_err(failed)?;
        tried.push(loaded.label);
        if result.success() {
            return Ok(());
        }
        if !publickey_allowed(&result) {
            tried.push("(the server does not accept public keys)".into());
            return Err(auth_error(tried));
        }
    }

    if host.use_agent {
        let socket = agent_socket
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("SSH_AUTH_SOCK").map(PathBuf::from));
        match socket {
            None => tried.push("agent (SSH_AUTH_SOCK is not set)".into()),
            Some(socket) => match AgentClient::connect_uds(&socket).await {
                Err(e) => tried.push(format!("agent {} (unreachable: {e})", socket.display())),
                Ok(mut agent) => {
                    let identities = match agent.request_identities().await {
                        Ok(ids) => ids,
                        Err(e) => {
                            tried.push(format!(
                                "agent {} (cannot list keys: {e})",
                                socket.display()
                            ));
                            Vec::new()
                        }
                    };
                    if identities.is_empty() {
                        tried.push(format!("agent {} (no keys)", socket.display()));
                    }
                    for identity in identities {
                        let (cert, key, comment) = match identity {
                            AgentIdentity::PublicKey { key, comment } => {
                                // A configured certificate for a key only the agent holds.
                                let cert = certs
                                    .iter()
                                    .find(|c| c.public_key() == key.key_data())
                                    .cloned();
                                (cert, key, comment)
                            }
                            AgentIdentity::Certificate {
                                certificate,
                                comment,
                            } => {
                                let key = PublicKey::new(certificate.public_key().clone(), "");
                                (Some(certificate), key, comment)
                            }
                        };
                        let hash = if key.algorithm().is_rsa() {
                            rsa_hash(handle).await
                        } else {
                            None
                        };
                        let (label, result) = match cert {
                            Some(cert) => (
                                format!("agent {comment} ({})", describe_cert(&cert)),
                                handle
                                    .authenticate_certificate_with(
                                        host.user.clone(),
                                        cert,
                                        hash,
                                        &mut agent,
                                    )
                                    .await,
                            ),
                            None => (
                                format!("agent key {comment} ({})", describe(&key)),
                                handle
                                    .authenticate_publickey_with(
                                        host.user.clone(),
                                        key,
                                        hash,
                                        &mut agent,
                                    )
                                    .await,
                            ),
                        };
                        match result {
                            Ok(result) => {
                                tried.push(label);
                                if result.success() {
                                    return Ok(());
                                }
                            }
                            Err(e) => tried.push(format!("{label} (agent refused to sign: {e})")),
                        }
                        if handle.is_closed() {
                            break;
                        }
                    }
                }
            },
        }
    }
    Err(auth_error(tried))
}

pub(crate) type BoxFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// A TCP connection to the host, trying each resolved address in turn.
pub(crate) async fn tcp(host: &SshHost) -> Result<tokio::net::TcpStream, SshError> {
    let addrs: Vec<std::net::SocketAddr> =
        tokio::net::lookup_host((host.address.as_str(), host.port))
            .await
            .map_err(|e| SshError::Dns {
                host: host.address.clone(),
                reason: e.to_string(),
            })?
            .collect();
    let mut last = SshError::Dns {
        host: host.address.clone(),
        reason: "no addresses".into(),
    };
    for addr in addrs {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(stream) => {
                // Small SSH packets (channel requests, window adjusts) must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                last = SshError::ConnectRefused {
                    host: host.name.clone(),
                    addr: addr.to_string(),
                };
            }
            Err(e) => {
                last = SshError::Io {
                    host: host.name.clone(),
                    reason: format!("connect to {addr}: {e}"),
                };
            }
        }
    }
    Err(last)
}

/// A `direct-tcpip` channel from the bastion to the host, to run the host's SSH session in.
pub(crate) async fn tunnel(
    host: &SshHost,
    bastion: &SshHost,
    via: &super::Connection,
) -> Result<russh::ChannelStream<client::Msg>, SshError> {
    match via
        .handle
        .channel_open_direct_tcpip(host.address.clone(), u32::from(host.port), "127.0.0.1", 0)
        .await
    {
        Ok(channel) => Ok(channel.into_stream()),
        // The bastion tried and could not reach the target: the same as a refused connect.
        Err(russh::Error::ChannelOpenFailure(russh::ChannelOpenFailure::ConnectFailed)) => {
            Err(SshError::ConnectRefused {
                host: host.name.clone(),
                addr: format!("{}:{} via `{}`", host.address, host.port, bastion.name),
            })
        }
        Err(e) => Err(russh_error(
            &host.name,
            &format!("tunnel through `{}`", bastion.name),
            e,
        )),
    }
}
