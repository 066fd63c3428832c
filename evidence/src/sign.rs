//! minisign-compatible Ed25519 keys and signatures, so that a bundle's `SHA256SUMS` can be
//! signed by `runbook` and checked with the stock `minisign -V` (and the other way round), and
//! a bundle's signature: [`sign_bundle`] over its `SHA256SUMS` with [`default_trusted_comment`].
//!
//! Formats (jedisct1/minisign, `src/minisign.h`; all integers little-endian):
//!
//! ```text
//! public key  (.pub)      untrusted comment: minisign public key <KEYID>
//!                         base64( "Ed" || key_id[8] || ed25519_pk[32] )
//! secret key  (.key)      untrusted comment: <free text>
//!                         base64( "Ed" || kdf_alg[2] || "B2" || kdf_salt[32] || opslimit[8]
//!                                 || memlimit[8] || key_id[8] || ed25519_sk[64] || chk[32] )
//!                         kdf_alg "Sc": key_id||sk||chk is XORed with scrypt(password, salt)
//!                         kdf_alg "\0\0": stored in clear (`minisign -W`)
//!                         chk = BLAKE2b-256("Ed" || key_id || sk)
//! signature   (.minisig)  untrusted comment: <free text, NOT authenticated>
//!                         base64( sig_alg[2] || key_id[8] || ed25519_sig[64] )
//!                         trusted comment: <free text, authenticated>
//!                         base64( ed25519_sig(sig || trusted_comment) )
//!                         sig_alg "ED": the signature is over BLAKE2b-512(data) (minisign ≥ 0.10
//!                         default); "Ed": over the data itself (legacy, `minisign -l`).
//! ```
//!
//! `<KEYID>` is written the way minisign writes it: the key id read as a little-endian `u64`,
//! in upper-case hex without leading zeros (`printf("%" PRIX64)`).

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use blake2::digest::consts::U32;
use blake2::{Blake2b, Blake2b512, Digest};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::verify::{MANIFEST_FILE, SIGNATURE_FILE, SUMS_FILE};
use crate::EvidenceError;

const UNTRUSTED_PREFIX: &str = "untrusted comment: ";
const TRUSTED_PREFIX: &str = "trusted comment: ";
const SIG_ALG_LEGACY: [u8; 2] = *b"Ed";
const SIG_ALG_PREHASHED: [u8; 2] = *b"ED";
const KDF_SCRYPT: [u8; 2] = *b"Sc";
const KDF_NONE: [u8; 2] = [0, 0];
const CHK_BLAKE2B: [u8; 2] = *b"B2";
/// libsodium's `crypto_pwhash_scryptsalsa208sha256_OPSLIMIT_SENSITIVE`, what `minisign -G` uses.
const OPSLIMIT_SENSITIVE: u64 = 33_554_432;
/// libsodium's `crypto_pwhash_scryptsalsa208sha256_MEMLIMIT_SENSITIVE` (1 GiB).
const MEMLIMIT_SENSITIVE: u64 = 1_073_741_824;
/// minisign reads a trusted comment into 8192 bytes including the prefix and the newline.
const TRUSTED_COMMENT_MAX: usize = 8192 - TRUSTED_PREFIX.len() - 2;

const PUBLIC_KEY_LEN: usize = 2 + 8 + 32;
const SIGNATURE_LEN: usize = 2 + 8 + 64;
const KEYNUM_SK_LEN: usize = 8 + 64 + 32;
const SECRET_KEY_LEN: usize = 2 + 2 + 2 + 32 + 8 + 8 + KEYNUM_SK_LEN;

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(
        "the signature was made with key id {signature}, but the public key has key id \
         {public_key}: wrong public key"
    )]
    WrongKeyId { signature: KeyId, public_key: KeyId },
    #[error("bad base64 in the {what}: {reason}")]
    Base64 { what: &'static str, reason: String },
    #[error("the {what} has {actual} bytes after base64 decoding, expected {expected}")]
    Length {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("the {what} is malformed: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("unsupported {what} `{found}` (supported: {supported})")]
    UnsupportedAlgorithm {
        what: &'static str,
        found: String,
        supported: &'static str,
    },
    #[error(
        "bad signature: the data does not match the signature (altered data, or a different file)"
    )]
    BadSignature,
    #[error("bad signature: the trusted comment does not match its signature (the trusted comment was altered)")]
    BadTrustedComment,
    #[error("the secret key is encrypted: a password is needed")]
    PasswordRequired,
    #[error("wrong password for this secret key")]
    WrongPassword,
    #[error("the secret key is corrupt: {0}")]
    CorruptKey(&'static str),
    #[error("the secret key's scrypt parameters are out of range ({0})")]
    KdfParameters(String),
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
    #[error("the secret key and the public key would both be written to `{path}`")]
    SameKeyFile { path: PathBuf },
    #[error("`{path}` already exists")]
    KeyFileExists { path: PathBuf },
    #[error("`{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The 8 random bytes that tie signatures to the key that made them.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    /// As minisign prints it: `83002D2F172B438E`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}", u64::from_le_bytes(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key_id: KeyId,
    key: VerifyingKey,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({}, {})", self.key_id, self.to_base64())
    }
}

impl PublicKey {
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The base64 line alone, as `minisign -P` takes it.
    pub fn from_base64(line: &str) -> Result<Self, SignError> {
        let bytes = decode_b64("public key", line.trim(), PUBLIC_KEY_LEN)?;
        if bytes[..2] != SIG_ALG_LEGACY {
            return Err(unsupported_sig_alg(
                "public key algorithm",
                &bytes[..2],
                "`Ed`",
            ));
        }
        let key_id = KeyId(take(&bytes[2..10]));
        let key =
            VerifyingKey::from_bytes(&take(&bytes[10..42])).map_err(|_| SignError::Malformed {
                what: "public key",
                reason: "not a valid Ed25519 public key".into(),
            })?;
        Ok(Self { key_id, key })
    }

    pub fn to_base64(&self) -> String {
        let mut bytes = Vec::with_capacity(PUBLIC_KEY_LEN);
        bytes.extend_from_slice(&SIG_ALG_LEGACY);
        bytes.extend_from_slice(&self.key_id.0);
        bytes.extend_from_slice(self.key.as_bytes());
        B64.encode(bytes)
    }

    /// The text of a `.pub` file (`untrusted comment:` line, then the base64 line), or the bare
    /// base64 line.
    pub fn from_minisign(text: &str) -> Result<Self, SignError> {
        let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
        let first = lines
            .by_ref()
            .find(|l| !l.trim().is_empty())
            .ok_or_else(|| SignError::Malformed {
                what: "public key",
                reason: "empty".into(),
            })?;
        if first.starts_with(UNTRUSTED_PREFIX) {
            let line = lines.next().ok_or_else(|| SignError::Malformed {
                what: "public key",
                reason: "no base64 line after the `untrusted comment:` line".into(),
            })?;
            Self::from_base64(line)
        } else {
            Self::from_base64(first)
        }
    }

    /// The text of a `.pub` file, as `minisign -G` writes it.
    pub fn to_minisign(&self) -> String {
        format!(
            "{UNTRUSTED_PREFIX}minisign public key {}\n{}\n",
            self.key_id,
            self.to_base64()
        )
    }

    pub fn from_file(path: &Path) -> Result<Self, SignError> {
        Self::from_minisign(&read_text(path)?)
    }

    /// Every key of a trusted-keys file: `.pub` files one after the other (each an
    /// `untrusted comment:` line and its base64 line), or bare base64 lines; blank lines and
    /// lines starting with `#` are skipped. Errors name the 1-based line.
    pub fn all_from_text(text: &str) -> Result<Vec<Self>, (usize, SignError)> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(UNTRUSTED_PREFIX) {
                continue;
            }
            keys.push(Self::from_base64(line).map_err(|e| (i + 1, e))?);
        }
        if keys.is_empty() {
            return Err((
                1,
                SignError::Malformed {
                    what: "trusted-keys file",
                    reason: "it holds no public key".into(),
                },
            ));
        }
        Ok(keys)
    }
}

#[derive(Clone)]
pub struct SecretKey {
    key_id: KeyId,
    signing: SigningKey,
    /// The untrusted comment of the `.key` file.
    comment: String,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}, [secret])", self.key_id)
    }
}

/// Scrypt cost written into new encrypted keys (what `minisign -G` writes).
#[derive(Clone, Copy)]
pub(crate) struct KdfLimits {
    pub opslimit: u64,
    pub memlimit: u64,
}

impl KdfLimits {
    pub(crate) const MINISIGN: KdfLimits = KdfLimits {
        opslimit: OPSLIMIT_SENSITIVE,
        memlimit: MEMLIMIT_SENSITIVE,
    };
}

impl SecretKey {
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            key_id: self.key_id,
            key: self.signing.verifying_key(),
        }
    }

    pub fn comment(&self) -> &str {
        &self.comment
    }

    /// Whether the `.key` text is password-protected (so a caller knows whether to ask).
    pub fn is_encrypted(text: &str) -> Result<bool, SignError> {
        let (_, bytes) = secret_key_bytes(text)?;
        check_secret_algs(&bytes)?;
        Ok(bytes[2..4] == KDF_SCRYPT)
    }

    /// Reads the text of a minisign `.key` file. `password` is needed for encrypted keys
    /// (minisign's default) and ignored for unencrypted ones (`minisign -G -W`).
    pub fn from_minisign(text: &str, password: Option<&str>) -> Result<Self, SignError> {
        let (comment, mut bytes) = secret_key_bytes(text)?;
        check_secret_algs(&bytes)?;
        let encrypted = bytes[2..4] == KDF_SCRYPT;
        if encrypted {
            let password = password.ok_or(SignError::PasswordRequired)?;
            let salt: [u8; 32] = take(&bytes[6..38]);
            let limits = KdfLimits {
                opslimit: u64::from_le_bytes(take(&bytes[38..46])),
                memlimit: u64::from_le_bytes(take(&bytes[46..54])),
            };
            let stream = kdf_stream(password, &salt, limits)?;
            for (b, s) in bytes[54..].iter_mut().zip(stream.iter()) {
                *b ^= s;
            }
        }
        let key_id = KeyId(take(&bytes[54..62]));
        let sk: [u8; 64] = take(&bytes[62..126]);
        let chk: [u8; 32] = take(&bytes[126..158]);
        let expected = checksum(&key_id, &sk);
        if encrypted {
            if chk != expected {
                return Err(SignError::WrongPassword);
            }
        } else if chk != [0u8; 32] && chk != expected {
            // minisign 0.11 writes an all-zero checksum for unencrypted keys.
            return Err(SignError::CorruptKey("its checksum does not match"));
        }
        let signing = SigningKey::from_keypair_bytes(&sk).map_err(|_| {
            SignError::CorruptKey("its public half does not belong to its secret half")
        })?;
        Ok(Self {
            key_id,
            signing,
            comment,
        })
    }

    pub fn from_file(path: &Path, password: Option<&str>) -> Result<Self, SignError> {
        Self::from_minisign(&read_text(path)?, password)
    }

    /// The text of a `.key` file: encrypted with scrypt as `minisign -G` does when a password
    /// is given (about 1 GiB of memory and a few seconds to write or read), in clear as
    /// `minisign -G -W` does when not.
    pub fn to_minisign(&self, password: Option<&str>) -> Result<String, SignError> {
        self.to_minisign_with(password, KdfLimits::MINISIGN)
    }

    pub(crate) fn to_minisign_with(
        &self,
        password: Option<&str>,
        limits: KdfLimits,
    ) -> Result<String, SignError> {
        let sk = self.signing.to_keypair_bytes();
        let chk = checksum(&self.key_id, &sk);
        let mut keynum_sk = Vec::with_capacity(KEYNUM_SK_LEN);
        keynum_sk.extend_from_slice(&self.key_id.0);
        keynum_sk.extend_from_slice(&sk);
        keynum_sk.extend_from_slice(&chk);

        let mut bytes = Vec::with_capacity(SECRET_KEY_LEN);
        bytes.extend_from_slice(&SIG_ALG_LEGACY);
        match password {
            Some(password) => {
                let mut salt = [0u8; 32];
                random(&mut salt)?;
                let stream = kdf_stream(password, &salt, limits)?;
                for (b, s) in keynum_sk.iter_mut().zip(stream.iter()) {
                    *b ^= s;
                }
                bytes.extend_from_slice(&KDF_SCRYPT);
                bytes.extend_from_slice(&CHK_BLAKE2B);
                bytes.extend_from_slice(&salt);
                bytes.extend_from_slice(&limits.opslimit.to_le_bytes());
                bytes.extend_from_slice(&limits.memlimit.to_le_bytes());
            }
            None => {
                bytes.extend_from_slice(&KDF_NONE);
                bytes.extend_from_slice(&CHK_BLAKE2B);
                bytes.extend_from_slice(&[0u8; 32 + 8 + 8]);
            }
        }
        bytes.extend_from_slice(&keynum_sk);
        Ok(format!(
            "{UNTRUSTED_PREFIX}{}\n{}\n",
            one_line(&self.comment),
            B64.encode(bytes)
        ))
    }
}

/// A new key pair. `comment` becomes the untrusted comment of the `.key` file.
///
/// Panics only if the operating system's random number generator fails.
pub fn generate(comment: &str) -> (SecretKey, PublicKey) {
    let mut seed = [0u8; 32];
    let mut key_id = [0u8; 8];
    #[allow(clippy::expect_used)]
    {
        random(&mut seed).expect("the OS random number generator failed");
        random(&mut key_id).expect("the OS random number generator failed");
    }
    let comment = if comment.trim().is_empty() {
        "runbook secret key".to_owned()
    } else {
        one_line(comment)
    };
    let secret = SecretKey {
        key_id: KeyId(key_id),
        signing: SigningKey::from_bytes(&seed),
        comment,
    };
    let public = secret.public_key();
    (secret, public)
}

/// The authenticated comment of a verified signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedComment(String);

impl TrustedComment {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for TrustedComment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A `.minisig` as parsed, before anything is verified.
#[derive(Debug, Clone)]
pub struct SignatureInfo {
    pub key_id: KeyId,
    /// `true` for `ED` (BLAKE2b-512 of the data signed), `false` for legacy `Ed`.
    pub prehashed: bool,
    pub untrusted_comment: String,
    /// Not authenticated until [`verify`] has succeeded.
    pub trusted_comment: String,
}

struct ParsedSignature {
    info: SignatureInfo,
    signature: Signature,
    global: Signature,
}

/// Signs `data` as `minisign -S` (0.10 and later) does: prehashed (`ED`), with the global
/// signature over the signature and `trusted_comment`. Returns the `.minisig` text.
///
/// Line breaks in `trusted_comment` become spaces and it is cut to the 8174 bytes minisign
/// can read, because the comment must stay one line to be verifiable.
pub fn sign_file(key: &SecretKey, data: &[u8], trusted_comment: &str) -> String {
    let mut trusted = one_line(trusted_comment);
    if trusted.len() > TRUSTED_COMMENT_MAX {
        let mut end = TRUSTED_COMMENT_MAX;
        while !trusted.is_char_boundary(end) {
            end -= 1;
        }
        trusted.truncate(end);
    }
    let prehash = Blake2b512::digest(data);
    let signature = key.signing.sign(&prehash);
    let mut sig_struct = Vec::with_capacity(SIGNATURE_LEN);
    sig_struct.extend_from_slice(&SIG_ALG_PREHASHED);
    sig_struct.extend_from_slice(&key.key_id.0);
    sig_struct.extend_from_slice(&signature.to_bytes());

    let mut global_input = signature.to_bytes().to_vec();
    global_input.extend_from_slice(trusted.as_bytes());
    let global = key.signing.sign(&global_input);
    format!(
        "{UNTRUSTED_PREFIX}signature from runbook secret key {}\n{}\n{TRUSTED_PREFIX}{trusted}\n{}\n",
        key.key_id,
        B64.encode(sig_struct),
        B64.encode(global.to_bytes()),
    )
}

/// Reads a `.minisig` without verifying it (to tell which key made it).
pub fn inspect(minisig: &str) -> Result<SignatureInfo, SignError> {
    parse_signature(minisig).map(|p| p.info)
}

/// Verifies a `.minisig` (prehashed `ED` or legacy `Ed`) over `data` with `pubkey`, including
/// the global signature over the trusted comment, and returns the trusted comment.
pub fn verify(pubkey: &PublicKey, data: &[u8], minisig: &str) -> Result<TrustedComment, SignError> {
    let parsed = parse_signature(minisig)?;
    if parsed.info.key_id != pubkey.key_id {
        return Err(SignError::WrongKeyId {
            signature: parsed.info.key_id,
            public_key: pubkey.key_id,
        });
    }
    let ok = if parsed.info.prehashed {
        let prehash = Blake2b512::digest(data);
        pubkey.key.verify_strict(&prehash, &parsed.signature)
    } else {
        pubkey.key.verify_strict(data, &parsed.signature)
    };
    ok.map_err(|_| SignError::BadSignature)?;
    let mut global_input = parsed.signature.to_bytes().to_vec();
    global_input.extend_from_slice(parsed.info.trusted_comment.as_bytes());
    pubkey
        .key
        .verify_strict(&global_input, &parsed.global)
        .map_err(|_| SignError::BadTrustedComment)?;
    Ok(TrustedComment(parsed.info.trusted_comment))
}

/// Writes a new key pair: both files or neither. Nothing is written until both destinations
/// are known to be usable (two different files, absent unless `overwrite`); then each file is
/// written to a temporary sibling, synced and renamed into place, so a failure never leaves a
/// secret key without its public key, or a half-written key. The secret key is created readable
/// only by its owner (0600).
pub fn write_key_pair(
    secret: (&Path, &str),
    public: (&Path, &str),
    overwrite: bool,
) -> Result<(), SignError> {
    let secret_dest = destination(secret.0)?;
    let public_dest = destination(public.0)?;
    if secret_dest == public_dest {
        return Err(SignError::SameKeyFile {
            path: secret.0.to_owned(),
        });
    }
    if !overwrite {
        for path in [secret.0, public.0] {
            // `symlink_metadata`: a dangling symlink is there too, and would be replaced.
            if std::fs::symlink_metadata(path).is_ok() {
                return Err(SignError::KeyFileExists {
                    path: path.to_owned(),
                });
            }
        }
    }
    let staged = |(shown, text): (&Path, &str), dest: &Path, mode| {
        crate::fs::stage(dest, mode, |f| f.write_all(text.as_bytes())).map_err(|source| {
            SignError::Io {
                path: shown.to_owned(),
                source,
            }
        })
    };
    // Both files are complete before either is in place; a failure removes what is not.
    let secret_tmp = staged(secret, &secret_dest, 0o600)?;
    let public_tmp = staged(public, &public_dest, 0o644)?;
    secret_tmp.commit().map_err(|source| SignError::Io {
        path: secret.0.to_owned(),
        source,
    })?;
    if let Err(source) = public_tmp.commit() {
        let _ = std::fs::remove_file(&secret_dest);
        return Err(SignError::Io {
            path: public.0.to_owned(),
            source,
        });
    }
    Ok(())
}

/// The file that writing `path` replaces: what it resolves to when it exists (through a
/// symlink), else its canonical directory joined with its name. Two spellings of one file
/// (`a.key`, `./a.key`, `keys/../a.key`) give the same destination before either exists.
fn destination(path: &Path) -> Result<PathBuf, SignError> {
    if let Ok(resolved) = std::fs::canonicalize(path) {
        return Ok(resolved);
    }
    let io = |source| SignError::Io {
        path: path.to_owned(),
        source,
    };
    let name = path.file_name().ok_or_else(|| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok(std::fs::canonicalize(dir).map_err(io)?.join(name))
}

/// Writes `text` to a new, synced temporary file beside `dest` and returns its path. Errors
/// name `shown`, the path the caller was given.
fn parse_signature(minisig: &str) -> Result<ParsedSignature, SignError> {
    let malformed = |reason: &str| SignError::Malformed {
        what: "signature",
        reason: reason.to_owned(),
    };
    let mut lines = minisig.split('\n').map(|l| l.trim_end_matches('\r'));
    let untrusted = lines.next().unwrap_or_default();
    let untrusted = untrusted
        .strip_prefix(UNTRUSTED_PREFIX)
        .ok_or_else(|| malformed("the first line does not start with `untrusted comment: `"))?;
    let sig_line = lines
        .next()
        .ok_or_else(|| malformed("no signature line after the untrusted comment"))?;
    let trusted = lines
        .next()
        .ok_or_else(|| malformed("no `trusted comment:` line"))?
        .strip_prefix(TRUSTED_PREFIX)
        .ok_or_else(|| malformed("the third line does not start with `trusted comment: `"))?;
    let global_line = lines
        .next()
        .ok_or_else(|| malformed("no global signature line after the trusted comment"))?;

    let sig_bytes = decode_b64("signature", sig_line.trim(), SIGNATURE_LEN)?;
    let prehashed = match [sig_bytes[0], sig_bytes[1]] {
        SIG_ALG_PREHASHED => true,
        SIG_ALG_LEGACY => false,
        _ => {
            return Err(unsupported_sig_alg(
                "signature algorithm",
                &sig_bytes[..2],
                "`ED` (prehashed) and `Ed` (legacy)",
            ))
        }
    };
    let global_bytes = decode_b64("global signature", global_line.trim(), 64)?;
    Ok(ParsedSignature {
        info: SignatureInfo {
            key_id: KeyId(take(&sig_bytes[2..10])),
            prehashed,
            untrusted_comment: untrusted.to_owned(),
            trusted_comment: trusted.to_owned(),
        },
        signature: Signature::from_bytes(&take(&sig_bytes[10..74])),
        global: Signature::from_bytes(&take(&global_bytes[..64])),
    })
}

/// (untrusted comment, decoded bytes) of a `.key` text.
fn secret_key_bytes(text: &str) -> Result<(String, Vec<u8>), SignError> {
    let malformed = |reason: &str| SignError::Malformed {
        what: "secret key",
        reason: reason.to_owned(),
    };
    let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
    let comment = lines
        .next()
        .unwrap_or_default()
        .strip_prefix(UNTRUSTED_PREFIX)
        .ok_or_else(|| malformed("the first line does not start with `untrusted comment: `"))?;
    let line = lines
        .next()
        .ok_or_else(|| malformed("no base64 line after the untrusted comment"))?;
    let bytes = decode_b64("secret key", line.trim(), SECRET_KEY_LEN)?;
    Ok((comment.to_owned(), bytes))
}

fn check_secret_algs(bytes: &[u8]) -> Result<(), SignError> {
    if bytes[..2] != SIG_ALG_LEGACY {
        return Err(unsupported_sig_alg(
            "secret key algorithm",
            &bytes[..2],
            "`Ed`",
        ));
    }
    if bytes[2..4] != KDF_SCRYPT && bytes[2..4] != KDF_NONE {
        return Err(unsupported_sig_alg(
            "key derivation function",
            &bytes[2..4],
            "`Sc` (scrypt) and none",
        ));
    }
    if bytes[4..6] != CHK_BLAKE2B {
        return Err(unsupported_sig_alg("key checksum", &bytes[4..6], "`B2`"));
    }
    Ok(())
}

fn unsupported_sig_alg(what: &'static str, found: &[u8], supported: &'static str) -> SignError {
    let found = if found.iter().all(|b| b.is_ascii_graphic()) {
        String::from_utf8_lossy(found).into_owned()
    } else {
        format!("0x{}", hex::encode(found))
    };
    SignError::UnsupportedAlgorithm {
        what,
        found,
        supported,
    }
}

fn decode_b64(what: &'static str, line: &str, expected: usize) -> Result<Vec<u8>, SignError> {
    let bytes = B64.decode(line).map_err(|e| SignError::Base64 {
        what,
        reason: e.to_string(),
    })?;
    if bytes.len() != expected {
        return Err(SignError::Length {
            what,
            expected,
            actual: bytes.len(),
        });
    }
    Ok(bytes)
}

/// BLAKE2b-256("Ed" || key_id || sk), as minisign's `seckey_chk`.
fn checksum(key_id: &KeyId, sk: &[u8; 64]) -> [u8; 32] {
    let mut h = Blake2b::<U32>::new();
    h.update(SIG_ALG_LEGACY);
    h.update(key_id.0);
    h.update(sk);
    h.finalize().into()
}

/// libsodium's `crypto_pwhash_scryptsalsa208sha256(out, 104, password, salt, opslimit,
/// memlimit)`: scrypt with N, r, p picked from the limits by libsodium's `pickparams`.
fn kdf_stream(password: &str, salt: &[u8; 32], limits: KdfLimits) -> Result<Vec<u8>, SignError> {
    let (log_n, r, p) = pick_params(limits.opslimit, limits.memlimit);
    // Bound what a crafted key file can make us spend: minisign's own keys need 2^20 × 8 × 1
    // (1 GiB, a few seconds); allow up to that memory and 8 times that work.
    let work = (1u64 << log_n) * u64::from(r) * u64::from(p);
    if log_n > 20 || work > (1 << 26) {
        return Err(SignError::KdfParameters(format!(
            "N = 2^{log_n}, r = {r}, p = {p}"
        )));
    }
    let params = scrypt::Params::new(log_n, r, p, 32)
        .map_err(|e| SignError::KdfParameters(format!("N = 2^{log_n}, r = {r}, p = {p}: {e}")))?;
    let mut out = vec![0u8; KEYNUM_SK_LEN];
    scrypt::scrypt(password.as_bytes(), salt, &params, &mut out)
        .map_err(|e| SignError::KdfParameters(e.to_string()))?;
    Ok(out)
}

/// libsodium `crypto_pwhash/scryptsalsa208sha256/pwhash_scryptsalsa208sha256.c: pickparams`.
fn pick_params(opslimit: u64, memlimit: u64) -> (u8, u32, u32) {
    let opslimit = opslimit.max(32_768);
    let r: u32 = 8;
    let mut log_n: u8 = 1;
    if opslimit < memlimit / 32 {
        let max_n = opslimit / (u64::from(r) * 4);
        while log_n < 63 && (1u64 << log_n) <= max_n / 2 {
            log_n += 1;
        }
        (log_n, r, 1)
    } else {
        let max_n = memlimit / (u64::from(r) * 128);
        while log_n < 63 && (1u64 << log_n) <= max_n / 2 {
            log_n += 1;
        }
        let max_rp = ((opslimit / 4) / (1u64 << log_n)).min(0x3fff_ffff);
        // libsodium: `*p = (uint32_t)(maxrp) / *r`; p = 0 is rejected later by scrypt itself.
        let p = u32::try_from(max_rp).unwrap_or(u32::MAX) / r;
        (log_n, r, p)
    }
}

fn random(buf: &mut [u8]) -> Result<(), SignError> {
    getrandom::fill(buf).map_err(|e| SignError::Random(e.to_string()))
}

fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

fn take<const N: usize>(slice: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&slice[..N]);
    out
}

fn read_text(path: &Path) -> Result<String, SignError> {
    std::fs::read_to_string(path).map_err(|source| SignError::Io {
        path: path.to_owned(),
        source,
    })
}

// ------------------------------------------------------------------ a bundle's signature

/// Signs the bundle's `SHA256SUMS`, writing `SHA256SUMS.minisig` atomically.
pub fn sign_bundle(
    dir: &Path,
    key: &SecretKey,
    trusted_comment: &str,
) -> Result<(), EvidenceError> {
    let sums_path = dir.join(SUMS_FILE);
    let sums = std::fs::read(&sums_path).map_err(|source| EvidenceError::Read {
        path: sums_path,
        source,
    })?;
    let text = sign_file(key, &sums, trusted_comment);
    let path = dir.join(SIGNATURE_FILE);
    crate::fs::write_atomic(&path, text.as_bytes()).map_err(crate::write_err(&path))
}

/// A trusted comment naming what was signed, in minisign's style (`key:value` fields separated
/// by tabs): `timestamp:<unix>`, `file:SHA256SUMS`, `runbook:<name>`, `run:<id>`,
/// `status:<status>`, `sha256:<SHA-256 of SHA256SUMS>`.
pub fn default_trusted_comment(dir: &Path) -> Result<String, EvidenceError> {
    let sums_path = dir.join(SUMS_FILE);
    let sums = std::fs::read(&sums_path).map_err(|source| EvidenceError::Read {
        path: sums_path,
        source,
    })?;
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest: serde_json::Value = std::fs::read(&manifest_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let field = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_owned();
    Ok(format!(
        "timestamp:{}\tfile:{SUMS_FILE}\trunbook:{}\trun:{}\tstatus:{}\tsha256:{}",
        chrono::Utc::now().timestamp(),
        field(&manifest["runbook"]["name"]),
        field(&manifest["run_id"]),
        field(&manifest["status"]),
        crate::checksums::sha256_bytes(&sums),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cheap scrypt for tests: N = 2^10.
    const FAST: KdfLimits = KdfLimits {
        opslimit: 32_768,
        memlimit: 1 << 24,
    };

    #[test]
    fn pick_params_matches_libsodium_for_minisign_defaults() {
        assert_eq!(
            pick_params(OPSLIMIT_SENSITIVE, MEMLIMIT_SENSITIVE),
            (20, 8, 1)
        );
        // opslimit < memlimit / 32 branch: maxN = 32768 / 32 = 1024 → N_log2 = 10.
        assert_eq!(pick_params(32_768, 1 << 24), (10, 8, 1));
        // interactive: 524288 / 16 MiB → maxN = 16384 → N = 2^14, p = (131072 / 16384) / 8 = 1.
        assert_eq!(pick_params(524_288, 16_777_216), (14, 8, 1));
    }

    #[test]
    fn sign_and_verify_round_trip() {
        let (sk, pk) = generate("test key");
        assert_eq!(sk.key_id(), pk.key_id());
        let data = b"abc  file\n";
        let sig = sign_file(&sk, data, "run=1234 file:SHA256SUMS");
        let tc = verify(&pk, data, &sig).expect("verifies");
        assert_eq!(tc.as_str(), "run=1234 file:SHA256SUMS");
        let info = inspect(&sig).expect("parses");
        assert!(info.prehashed);
        assert_eq!(info.key_id, pk.key_id());
    }

    #[test]
    fn tampered_data_and_comment_are_rejected() {
        let (sk, pk) = generate("");
        let sig = sign_file(&sk, b"hello", "tc");
        assert!(matches!(
            verify(&pk, b"hellO", &sig),
            Err(SignError::BadSignature)
        ));
        let altered = sig.replace("trusted comment: tc", "trusted comment: tX");
        let err = verify(&pk, b"hello", &altered).expect_err("altered comment");
        assert!(matches!(err, SignError::BadTrustedComment), "{err}");
    }

    #[test]
    fn wrong_key_shows_both_ids() {
        let (sk, _) = generate("");
        let (_, other) = generate("");
        let sig = sign_file(&sk, b"x", "tc");
        let err = verify(&other, b"x", &sig).expect_err("wrong key");
        let msg = err.to_string();
        assert!(msg.contains(&sk.key_id().to_string()), "{msg}");
        assert!(msg.contains(&other.key_id().to_string()), "{msg}");
    }

    #[test]
    fn legacy_signatures_verify() {
        let (sk, pk) = generate("");
        let data = b"legacy data";
        let sig = sk.signing.sign(data);
        let mut s = SIG_ALG_LEGACY.to_vec();
        s.extend_from_slice(&sk.key_id.0);
        s.extend_from_slice(&sig.to_bytes());
        let mut g = sig.to_bytes().to_vec();
        g.extend_from_slice(b"legacy tc");
        let global = sk.signing.sign(&g);
        let text = format!(
            "untrusted comment: x\n{}\ntrusted comment: legacy tc\n{}\n",
            B64.encode(&s),
            B64.encode(global.to_bytes())
        );
        assert_eq!(
            verify(&pk, data, &text).expect("legacy").as_str(),
            "legacy tc"
        );
        assert!(!inspect(&text).expect("parses").prehashed);
    }

    #[test]
    fn unsupported_algorithm_and_bad_base64() {
        let (sk, pk) = generate("");
        let sig = sign_file(&sk, b"x", "tc");
        let mut lines: Vec<String> = sig.lines().map(str::to_owned).collect();
        let mut raw = B64.decode(&lines[1]).expect("b64");
        raw[0] = b'X';
        raw[1] = b'Y';
        lines[1] = B64.encode(&raw);
        let err = verify(&pk, b"x", &lines.join("\n")).expect_err("alg");
        assert!(
            matches!(err, SignError::UnsupportedAlgorithm { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("`XY`"), "{err}");

        lines[1] = "not*base64".into();
        let err = verify(&pk, b"x", &lines.join("\n")).expect_err("b64");
        assert!(
            matches!(
                err,
                SignError::Base64 {
                    what: "signature",
                    ..
                }
            ),
            "{err}"
        );
        let err = PublicKey::from_base64("RW??").expect_err("b64");
        assert!(matches!(err, SignError::Base64 { .. }), "{err}");
    }

    #[test]
    fn public_key_text_round_trip() {
        let (_, pk) = generate("");
        let text = pk.to_minisign();
        assert!(text.starts_with(&format!(
            "untrusted comment: minisign public key {}\n",
            pk.key_id()
        )));
        assert_eq!(PublicKey::from_minisign(&text).expect("file"), pk);
        assert_eq!(PublicKey::from_minisign(&pk.to_base64()).expect("bare"), pk);
    }

    #[test]
    fn unencrypted_secret_key_round_trip() {
        let (sk, pk) = generate("my key");
        let text = sk.to_minisign(None).expect("writes");
        assert!(text.starts_with("untrusted comment: my key\n"));
        assert!(!SecretKey::is_encrypted(&text).expect("parses"));
        let back = SecretKey::from_minisign(&text, None).expect("reads");
        assert_eq!(back.public_key(), pk);
        assert_eq!(back.comment(), "my key");
    }

    #[test]
    fn encrypted_secret_key_round_trip_and_wrong_password() {
        let (sk, pk) = generate("enc");
        let text = sk
            .to_minisign_with(Some("correct horse"), FAST)
            .expect("writes");
        assert!(SecretKey::is_encrypted(&text).expect("parses"));
        assert!(matches!(
            SecretKey::from_minisign(&text, None),
            Err(SignError::PasswordRequired)
        ));
        assert!(matches!(
            SecretKey::from_minisign(&text, Some("wrong")),
            Err(SignError::WrongPassword)
        ));
        let back = SecretKey::from_minisign(&text, Some("correct horse")).expect("reads");
        assert_eq!(back.public_key(), pk);
    }

    #[test]
    fn crafted_kdf_limits_are_refused() {
        let (sk, _) = generate("");
        let huge = KdfLimits {
            opslimit: 1 << 40,
            memlimit: 1 << 40,
        };
        assert!(matches!(
            sk.to_minisign_with(Some("pw"), huge),
            Err(SignError::KdfParameters(_))
        ));
    }

    #[test]
    fn newlines_in_trusted_comment_are_flattened() {
        let (sk, pk) = generate("");
        let sig = sign_file(&sk, b"d", "a\nb\r\nc");
        assert_eq!(verify(&pk, b"d", &sig).expect("ok").as_str(), "a b  c");
    }

    #[test]
    fn key_id_displays_like_minisign() {
        // minisign prints le64_load(keynum) with PRIX64.
        let id = KeyId([0x8e, 0x43, 0x2b, 0x17, 0x2f, 0x2d, 0x00, 0x83]);
        assert_eq!(id.to_string(), "83002D2F172B438E");
    }

    #[test]
    fn corrupt_unencrypted_key_is_refused() {
        let (sk, _) = generate("");
        let text = sk.to_minisign(None).expect("writes");
        let line = text.lines().nth(1).expect("line");
        let mut raw = B64.decode(line).expect("b64");
        raw[100] ^= 1; // inside the public half of sk
        let bad = format!("untrusted comment: x\n{}\n", B64.encode(&raw));
        assert!(matches!(
            SecretKey::from_minisign(&bad, None),
            Err(SignError::CorruptKey(_))
        ));
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        out.sort();
        out
    }

    #[test]
    fn key_pair_is_written_with_a_private_secret_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, p) = (dir.path().join("k.key"), dir.path().join("k.pub"));
        // An existing world-readable file must not keep its mode when overwritten.
        std::fs::write(&s, "old").expect("write");
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_key_pair((&s, "secret"), (&p, "public"), true).expect("writes");
        assert_eq!(std::fs::read_to_string(&s).expect("read"), "secret");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "public");
        let mode = std::fs::metadata(&s).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            names(dir.path()),
            ["k.key", "k.pub"],
            "no temporary file left"
        );
    }

    // Regression: `keygen -s a.key -p a.key --force` wrote the secret key, then the public key
    // over it, and reported both as written.
    #[test]
    fn key_pair_refuses_one_file_under_two_spellings() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        let a = dir.path().join("a.key");
        let also_a = dir.path().join("sub/../a.key");
        for overwrite in [false, true] {
            let e = write_key_pair((&a, "secret"), (&also_a, "public"), overwrite);
            assert!(matches!(e, Err(SignError::SameKeyFile { .. })), "{e:?}");
            assert_eq!(names(dir.path()), ["sub"], "nothing written");
        }
    }

    // Regression: an existing public key file made keygen fail after it had written the
    // secret key, and that leftover then blocked the next attempt.
    #[test]
    fn key_pair_writes_nothing_when_a_file_exists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, p) = (dir.path().join("b.key"), dir.path().join("b.pub"));
        std::fs::write(&p, "ORIGINAL").expect("write");
        let e = write_key_pair((&s, "secret"), (&p, "public"), false);
        assert!(
            matches!(&e, Err(SignError::KeyFileExists { path }) if path == &p),
            "{e:?}"
        );
        assert!(!s.exists(), "no secret key left behind");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "ORIGINAL");
    }

    #[test]
    fn key_pair_removes_the_secret_key_when_the_public_key_cannot_be_put_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = dir.path().join("c.key");
        // A directory where the public key should go: its temporary file is written, the
        // rename over the directory fails, after the secret key is in place.
        let p = dir.path().join("c.pub");
        std::fs::create_dir(&p).expect("mkdir");
        let e = write_key_pair((&s, "secret"), (&p, "public"), true);
        assert!(
            matches!(&e, Err(SignError::Io { path, .. }) if path == &p),
            "{e:?}"
        );
        assert_eq!(
            names(dir.path()),
            ["c.pub"],
            "no secret key, no temporary file"
        );
        // A public key in a directory that does not exist: refused before anything is written.
        let e = write_key_pair(
            (&s, "secret"),
            (&dir.path().join("no/c.pub"), "public"),
            false,
        );
        assert!(matches!(&e, Err(SignError::Io { .. })), "{e:?}");
        assert_eq!(names(dir.path()), ["c.pub"]);
    }
}
