//! Checking a bundle after the fact: every file against `SHA256SUMS`, the signature of
//! `SHA256SUMS` (`SHA256SUMS.minisig`) and what its trusted comment says about the run, the
//! RFC 3161 time-stamp token (`SHA256SUMS.tsr`), the journal's own consistency, `manifest.json`
//! against the journal, and each attempt log's closing record against the journal. Nothing here trusts the engine's types: the journal and the manifest
//! are read as plain JSON, so a bundle written by another version can still be checked.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::{Component, Path, PathBuf};

use crate::checksums;
use crate::sign::{self, KeyId, PublicKey};
use crate::tsa::{self, Stamp};
use crate::EvidenceError;

pub const SUMS_FILE: &str = checksums::FILE_NAME;
pub const SIGNATURE_FILE: &str = checksums::SIGNATURE_FILE;
pub const TIMESTAMP_FILE: &str = tsa::TSR_FILE;
pub const LOCK_FILE: &str = checksums::LOCK_FILE;
pub const JOURNAL_FILE: &str = "journal.jsonl";
pub const MANIFEST_FILE: &str = "manifest.json";

/// Manifest statuses that mean "the run has not finished" (no `run_finished` in the journal).
const UNFINISHED: &[&str] = &["running", "interrupted"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureState {
    /// `SHA256SUMS.minisig` verifies with the given public key.
    Verified {
        key_id: KeyId,
        trusted_comment: String,
    },
    /// Signed, but no public key was given, so nothing was checked.
    Unverified {
        key_id: KeyId,
    },
    /// No `SHA256SUMS.minisig`.
    Unsigned,
    Invalid(String),
}

impl fmt::Display for SignatureState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignatureState::Verified {
                key_id,
                trusted_comment,
            } => write!(
                f,
                "signature verified (key {key_id}); trusted comment: {trusted_comment}"
            ),
            SignatureState::Unverified { key_id } => write!(
                f,
                "signed by key {key_id}, but not checked: no public key given"
            ),
            SignatureState::Unsigned => f.write_str("not signed"),
            SignatureState::Invalid(reason) => write!(f, "signature INVALID: {reason}"),
        }
    }
}

/// The RFC 3161 time-stamp token of `SHA256SUMS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimestampState {
    /// No `SHA256SUMS.tsr`.
    None,
    /// Signed by a TSA whose certificate chains to the CA file given, for this `SHA256SUMS`.
    Verified(Stamp),
    /// The token is for this `SHA256SUMS`, but no TSA CA file was given, so who signed it was
    /// not checked. `time` is what the token claims.
    Unchecked {
        time: String,
    },
    Invalid(String),
}

impl fmt::Display for TimestampState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TimestampState::None => f.write_str("no trusted timestamp"),
            TimestampState::Verified(s) => write!(
                f,
                "time-stamped {} by `{}` (RFC 3161, serial {}, policy {})",
                s.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                s.tsa,
                s.serial,
                s.policy
            ),
            TimestampState::Unchecked { time } => write!(
                f,
                "a time-stamp token says {time}, but the TSA's certificate was not checked: no TSA CA file given"
            ),
            TimestampState::Invalid(reason) => write!(f, "time-stamp token INVALID: {reason}"),
        }
    }
}

/// What the assessor trusts: signing keys and the CA of the time-stamping authority.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOptions<'a> {
    /// Public keys trusted to sign bundles; the signature is checked with the one whose key id
    /// it names (or, if none does, with the first, which then reports the wrong key id).
    pub keys: &'a [PublicKey],
    /// Certificates of the CA(s) the TSA's certificate must chain to.
    pub tsa_ca: Option<&'a [x509_cert::Certificate]>,
}

/// Something wrong with the bundle. Each one makes verification fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A file's SHA-256 differs from the one in `SHA256SUMS`.
    Modified {
        path: String,
        expected: String,
        actual: String,
    },
    /// Listed in `SHA256SUMS`, not in the bundle.
    Missing { path: String },
    /// In the bundle, not listed in `SHA256SUMS`.
    Extra { path: String },
    /// The bundle has no `SHA256SUMS`: it was never sealed.
    SumsMissing,
    /// A line of `SHA256SUMS` (1-based) that is not `<sha256>  <relative path>`.
    MalformedSums {
        line: usize,
        text: String,
        reason: String,
    },
    /// A file that exists but cannot be read (or a manifest that is not JSON).
    Unreadable { path: String, reason: String },
    /// `SHA256SUMS.minisig` does not verify (or cannot be parsed).
    SignatureInvalid { reason: String },
    /// A public key was given but the bundle has no `SHA256SUMS.minisig`.
    SignatureMissing,
    /// The signature verifies, but its trusted comment says something else about the run.
    TrustedCommentDisagrees { what: String },
    /// `SHA256SUMS.tsr` does not verify.
    TimestampInvalid { reason: String },
    /// A TSA CA file was given but the bundle has no `SHA256SUMS.tsr`.
    TimestampMissing,
    /// An attempt log's closing `--- attempt N: …` record does not match the journal.
    LogDisagrees { path: String, what: String },
    /// A journal line (1-based) before the last one that is not JSON.
    JournalTorn { line: usize },
    /// A journal line that is JSON but not an event (no numeric `seq`, no `event`).
    JournalInvalid { line: usize, reason: String },
    /// `seq` does not go 1, 2, 3, …
    JournalGap {
        line: usize,
        expected_seq: u64,
        found_seq: u64,
    },
    /// `manifest.json` says something the journal does not.
    ManifestDisagrees { what: String },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Modified {
                path,
                expected,
                actual,
            } => write!(
                f,
                "{path}: modified: SHA-256 is {actual}, {SUMS_FILE} says {expected}"
            ),
            Problem::Missing { path } => {
                write!(f, "{path}: missing (listed in {SUMS_FILE})")
            }
            Problem::Extra { path } => {
                write!(
                    f,
                    "{path}: not listed in {SUMS_FILE} (added after the bundle was sealed)"
                )
            }
            Problem::SumsMissing => write!(
                f,
                "{SUMS_FILE}: missing: the bundle was never sealed (the run did not finish \
                 writing evidence), so its files cannot be checked"
            ),
            Problem::MalformedSums { line, text, reason } => {
                write!(f, "{SUMS_FILE} line {line}: {reason}: `{}`", shorten(text))
            }
            Problem::Unreadable { path, reason } => write!(f, "{path}: cannot read: {reason}"),
            Problem::SignatureInvalid { reason } => {
                write!(f, "{SIGNATURE_FILE}: signature invalid: {reason}")
            }
            Problem::SignatureMissing => write!(
                f,
                "{SIGNATURE_FILE}: missing: a public key was given but the bundle is not signed"
            ),
            Problem::TrustedCommentDisagrees { what } => write!(
                f,
                "{SIGNATURE_FILE}: the signed trusted comment disagrees with the bundle: {what}"
            ),
            Problem::TimestampInvalid { reason } => {
                write!(f, "{TIMESTAMP_FILE}: time-stamp token invalid: {reason}")
            }
            Problem::TimestampMissing => write!(
                f,
                "{TIMESTAMP_FILE}: missing: a TSA CA file was given but the bundle has no \
                 time-stamp token"
            ),
            Problem::LogDisagrees { path, what } => {
                write!(f, "{path} disagrees with {JOURNAL_FILE}: {what}")
            }
            Problem::JournalTorn { line } => write!(
                f,
                "{JOURNAL_FILE} line {line}: not valid JSON, and not the last line (damaged \
                 or edited, not a crash)"
            ),
            Problem::JournalInvalid { line, reason } => {
                write!(f, "{JOURNAL_FILE} line {line}: not a run event: {reason}")
            }
            Problem::JournalGap {
                line,
                expected_seq,
                found_seq,
            } => write!(
                f,
                "{JOURNAL_FILE} line {line}: seq {found_seq} where {expected_seq} was expected \
                 (events missing, duplicated or reordered)"
            ),
            Problem::ManifestDisagrees { what } => {
                write!(f, "{MANIFEST_FILE} disagrees with {JOURNAL_FILE}: {what}")
            }
        }
    }
}

/// Worth telling, not a reason to fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// The journal's last line (1-based) was cut off mid-write (the runner died): ignored.
    JournalTornTail { line: usize },
    /// The journal has no `run_finished` after the last start or resume.
    RunNotFinished,
    /// The signed trusted comment does not name these (`run`, `status`, `sha256`).
    TrustedCommentIncomplete { missing: String },
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Note::JournalTornTail { line } => write!(
                f,
                "{JOURNAL_FILE} line {line}: the last line was cut off mid-write (the runner \
                 stopped while writing it); ignored"
            ),
            Note::RunNotFinished => write!(
                f,
                "{JOURNAL_FILE} has no run_finished event: the run did not finish"
            ),
            Note::TrustedCommentIncomplete { missing } => write!(
                f,
                "{SIGNATURE_FILE}: the trusted comment does not name {missing} (signed by \
                 another tool?); only the signature over {SUMS_FILE} ties it to this run"
            ),
        }
    }
}

#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub problems: Vec<Problem>,
    pub notes: Vec<Note>,
    /// Files hashed and compared with `SHA256SUMS`.
    pub files_checked: usize,
    pub signature: SignatureState,
    pub timestamp: TimestampState,
    /// The runner finished and sealed the bundle: `SHA256SUMS` is there and the journal's last
    /// start or resume is followed by `run_finished`. (Whether the seal still holds is what
    /// `problems` says.)
    pub sealed: bool,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// Why a bundle without problems is still not to be trusted, failing closed: a signature
    /// nobody checked (no trusted key given), a time-stamp whose authority nobody checked (no
    /// CA given), or no signature at all when one is required. Each reason says how to fix it.
    pub fn trust_gaps(&self, require_signature: bool) -> Vec<String> {
        let mut gaps = Vec::new();
        match &self.signature {
            SignatureState::Unverified { key_id } => gaps.push(format!(
                "the bundle is signed by key {key_id}, but no trusted public key was given, so \
                 the signature was NOT checked: give the key with `--pubkey FILE`, or list it \
                 in a trusted-keys file (`--trusted-keys FILE`, or the environment variable \
                 RUNBOOK_TRUSTED_KEYS=FILE)"
            )),
            SignatureState::Unsigned if require_signature => gaps.push(format!(
                "the bundle is UNSIGNED (no {SIGNATURE_FILE}) and --require-signature was given"
            )),
            _ => {}
        }
        if let TimestampState::Unchecked { time } = &self.timestamp {
            gaps.push(format!(
                "the bundle has a time-stamp token ({TIMESTAMP_FILE}, claiming {time}), but no \
                 CA certificate of the time-stamping authority was given, so who signed it was \
                 NOT checked: give it with `--tsa-ca FILE` (or RUNBOOK_TSA_CA=FILE)"
            ));
        }
        gaps
    }
}

/// A path that cannot be checked as a bundle at all: a mistake in the command, not a bundle
/// that fails its check.
#[derive(Debug, thiserror::Error)]
pub enum NotABundle {
    #[error("`{0}`: no such directory")]
    Missing(PathBuf),
    #[error("`{0}` is not an evidence bundle (not a directory)")]
    NotADirectory(PathBuf),
    #[error("`{0}` is not an evidence bundle (no {MANIFEST_FILE}, {JOURNAL_FILE} or {SUMS_FILE})")]
    NoBundleFiles(PathBuf),
    #[error("cannot read `{path}`: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Whether `dir` is something to verify: a directory holding at least one of a bundle's own
/// files. A directory with only some of them is a bundle, and is checked: a deleted journal or
/// manifest is damage to report, not a typo in the path.
pub fn check_is_bundle(dir: &Path) -> Result<(), NotABundle> {
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => return Err(NotABundle::NotADirectory(dir.to_owned())),
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Err(NotABundle::Missing(dir.to_owned()))
        }
        Err(source) => {
            return Err(NotABundle::Unreadable {
                path: dir.to_owned(),
                source,
            })
        }
    }
    let has = |name: &str| std::fs::symlink_metadata(dir.join(name)).is_ok();
    if has(MANIFEST_FILE) || has(JOURNAL_FILE) || has(SUMS_FILE) {
        Ok(())
    } else {
        Err(NotABundle::NoBundleFiles(dir.to_owned()))
    }
}

/// Checks the bundle in `dir`. With `pubkey`, the bundle must be signed by that key.
pub fn verify_bundle(dir: &Path, pubkey: Option<&PublicKey>) -> VerifyReport {
    let keys: Vec<PublicKey> = pubkey.cloned().into_iter().collect();
    verify_bundle_with(
        dir,
        &VerifyOptions {
            keys: &keys,
            tsa_ca: None,
        },
    )
}

/// Checks the bundle in `dir` with what the assessor trusts. A signed bundle checked without
/// a key, or a time-stamped one without a CA, is reported as such in `signature` and
/// `timestamp` (not as a problem): whether that is acceptable is the caller's decision.
pub fn verify_bundle_with(dir: &Path, opts: &VerifyOptions<'_>) -> VerifyReport {
    let mut report = VerifyReport {
        problems: Vec::new(),
        notes: Vec::new(),
        files_checked: 0,
        signature: SignatureState::Unsigned,
        timestamp: TimestampState::None,
        sealed: false,
    };
    let sums = match std::fs::read(dir.join(SUMS_FILE)) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            report.problems.push(Problem::SumsMissing);
            None
        }
        Err(e) => {
            report.problems.push(Problem::Unreadable {
                path: SUMS_FILE.into(),
                reason: e.to_string(),
            });
            None
        }
    };
    check_signature(dir, sums.as_deref(), opts.keys, &mut report);
    check_timestamp(dir, sums.as_deref(), opts.tsa_ca, &mut report);
    if let Some(sums) = &sums {
        check_files(dir, sums, &mut report);
    }
    let journal = read_journal(dir, &mut report);
    if let Some(journal) = journal {
        report.sealed = sums.is_some() && journal.finished.is_some();
        if let Some(manifest) = check_manifest(dir, &journal, &mut report) {
            if let (
                SignatureState::Verified {
                    trusted_comment, ..
                },
                Some(sums),
            ) = (&report.signature, &sums)
            {
                let tc = trusted_comment.clone();
                check_trusted_comment(&tc, &manifest, sums, &mut report);
            }
            check_log_closings(dir, &manifest, &journal, &mut report);
        }
    }
    report
}

/// The `key:value` fields of a trusted comment (tab-separated, as [`default_trusted_comment`]
/// and minisign write them).
pub fn trusted_comment_fields(tc: &str) -> BTreeMap<&str, &str> {
    tc.split('\t')
        .filter_map(|f| f.split_once(':'))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect()
}

/// The signed comment must say what the bundle says: same run, same status, same `SHA256SUMS`.
/// A comment without these fields (signed with stock `minisign -Sm`) is noted, not failed: the
/// signature still covers `SHA256SUMS` and through it the manifest.
fn check_trusted_comment(
    tc: &str,
    manifest: &serde_json::Value,
    sums: &[u8],
    report: &mut VerifyReport,
) {
    let fields = trusted_comment_fields(tc);
    let digest = checksums::sha256_bytes(sums);
    let expected = [
        (
            "run",
            manifest["run_id"].as_str().unwrap_or("(none)").to_owned(),
        ),
        (
            "status",
            manifest["status"].as_str().unwrap_or("(none)").to_owned(),
        ),
        ("sha256", digest),
    ];
    let mut absent = Vec::new();
    for (key, bundle) in expected {
        match fields.get(key) {
            Some(signed) if !signed.eq_ignore_ascii_case(&bundle) => {
                report.problems.push(Problem::TrustedCommentDisagrees {
                    what: format!(
                        "it says {key} `{signed}`, the bundle {}",
                        match key {
                            "sha256" => format!("has {SUMS_FILE} with SHA-256 `{bundle}`"),
                            "run" => format!("has run_id `{bundle}`"),
                            _ => format!("says {key} `{bundle}`"),
                        }
                    ),
                })
            }
            Some(_) => {}
            None => absent.push(key),
        }
    }
    if !absent.is_empty() {
        report.notes.push(Note::TrustedCommentIncomplete {
            missing: absent.join(", "),
        });
    }
}

fn check_timestamp(
    dir: &Path,
    sums: Option<&[u8]>,
    ca: Option<&[x509_cert::Certificate]>,
    report: &mut VerifyReport,
) {
    let reply = match std::fs::read(dir.join(TIMESTAMP_FILE)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if ca.is_some() {
                report.problems.push(Problem::TimestampMissing);
            }
            return;
        }
        Err(e) => return invalid_timestamp(report, format!("cannot read it: {e}")),
    };
    let Some(sums) = sums else {
        return invalid_timestamp(report, format!("there is no {SUMS_FILE} it could be for"));
    };
    match ca {
        Some(ca) => match tsa::verify(&reply, sums, ca) {
            Ok(stamp) => report.timestamp = TimestampState::Verified(stamp),
            Err(e) => invalid_timestamp(report, e.to_string()),
        },
        None => match tsa::check_token(&reply, sums) {
            Ok(time) => {
                report.timestamp = TimestampState::Unchecked {
                    time: time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                }
            }
            Err(e) => invalid_timestamp(report, e.to_string()),
        },
    }
}

fn invalid_timestamp(report: &mut VerifyReport, reason: String) {
    report.timestamp = TimestampState::Invalid(reason.clone());
    report.problems.push(Problem::TimestampInvalid { reason });
}

fn check_signature(dir: &Path, sums: Option<&[u8]>, keys: &[PublicKey], report: &mut VerifyReport) {
    let minisig = match std::fs::read(dir.join(SIGNATURE_FILE)) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            report.signature = SignatureState::Unsigned;
            if !keys.is_empty() {
                report.problems.push(Problem::SignatureMissing);
            }
            return;
        }
        Err(e) => {
            invalid_signature(report, format!("cannot read it: {e}"));
            return;
        }
    };
    // The key the signature names, if it is among the trusted ones; else the first, whose
    // check then reports both key ids.
    let pubkey = sign::inspect(&minisig)
        .ok()
        .and_then(|info| keys.iter().find(|k| k.key_id() == info.key_id))
        .or_else(|| keys.first());
    let result = match (pubkey, sums) {
        (Some(pk), Some(sums)) => {
            sign::verify(pk, sums, &minisig).map(|tc| SignatureState::Verified {
                key_id: pk.key_id(),
                trusted_comment: tc.into_string(),
            })
        }
        (Some(_), None) => {
            invalid_signature(
                report,
                format!("there is no {SUMS_FILE} to check it against"),
            );
            return;
        }
        (None, _) => sign::inspect(&minisig).map(|info| SignatureState::Unverified {
            key_id: info.key_id,
        }),
    };
    match result {
        Ok(state) => report.signature = state,
        Err(e) => invalid_signature(report, e.to_string()),
    }
}

fn invalid_signature(report: &mut VerifyReport, reason: String) {
    report.signature = SignatureState::Invalid(reason.clone());
    report.problems.push(Problem::SignatureInvalid { reason });
}

fn check_files(dir: &Path, sums: &[u8], report: &mut VerifyReport) {
    let text = String::from_utf8_lossy(sums);
    let mut listed = BTreeSet::new();
    let lines: Vec<&str> = text.split('\n').collect();
    for (i, raw) in lines.iter().copied().enumerate() {
        let line = i + 1;
        if raw.is_empty() && line == lines.len() {
            break; // after the final newline
        }
        let (expected, rel) = match parse_sums_line(raw) {
            Ok(entry) => entry,
            Err(reason) => {
                report.problems.push(Problem::MalformedSums {
                    line,
                    text: raw.to_owned(),
                    reason: reason.to_owned(),
                });
                continue;
            }
        };
        if !listed.insert(rel.clone()) {
            report.problems.push(Problem::MalformedSums {
                line,
                text: raw.to_owned(),
                reason: "the same file is listed twice".into(),
            });
            continue;
        }
        let path = dir.join(&rel);
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                report.problems.push(Problem::Missing { path: rel });
                continue;
            }
            Err(e) => {
                report.problems.push(Problem::Unreadable {
                    path: rel,
                    reason: e.to_string(),
                });
                continue;
            }
            Ok(_) => {}
        }
        match checksums::sha256_file(&path) {
            Ok(actual) => {
                report.files_checked += 1;
                if actual != expected {
                    report.problems.push(Problem::Modified {
                        path: rel,
                        expected,
                        actual,
                    });
                }
            }
            Err(e) => report.problems.push(Problem::Unreadable {
                path: rel,
                reason: io_reason(&e),
            }),
        }
    }
    match bundle_files(dir) {
        Ok(present) => {
            for rel in present {
                if !listed.contains(&rel) {
                    report.problems.push(Problem::Extra { path: rel });
                }
            }
        }
        Err((path, e)) => report.problems.push(Problem::Unreadable {
            path,
            reason: e.to_string(),
        }),
    }
}

/// `<64 hex>  <path>` (or `<64 hex> *<path>`), GNU escaping (`\` first, `\\` and `\n`) undone.
/// Returns (lower-case hex, relative path).
fn parse_sums_line(raw: &str) -> Result<(String, String), &'static str> {
    let (escaped, line) = match raw.strip_prefix('\\') {
        Some(rest) => (true, rest),
        None => (false, raw),
    };
    const FORMAT: &str = "not `<sha256 in hex>  <relative path>`";
    if line.len() < 66 || !line.is_char_boundary(64) || !line.is_char_boundary(66) {
        return Err(FORMAT);
    }
    let (hash, rest) = line.split_at(64);
    if !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FORMAT);
    }
    let name = rest
        .strip_prefix("  ")
        .or_else(|| rest.strip_prefix(" *"))
        .ok_or(FORMAT)?;
    let name = if escaped {
        unescape(name).ok_or("bad escape in the file name")?
    } else {
        name.to_owned()
    };
    if name.is_empty() {
        return Err(FORMAT);
    }
    let p = Path::new(&name);
    if !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err("the path is absolute or leaves the bundle (`..`)");
    }
    Ok((hash.to_ascii_lowercase(), name))
}

fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next()? {
                '\\' => out.push('\\'),
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                _ => return None,
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// The bundle's files as [`checksums::walk`] finds them, `/`-separated as sums lines are.
fn bundle_files(dir: &Path) -> Result<Vec<String>, (String, std::io::Error)> {
    let mut files: Vec<String> = checksums::walk(dir)
        .map_err(|(rel, e)| (display_rel(&rel), e))?
        .iter()
        .map(|rel| display_rel(rel))
        .collect();
    files.sort();
    Ok(files)
}

fn display_rel(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        ".".into()
    } else {
        rel.to_string_lossy().into_owned()
    }
}

fn io_reason(e: &EvidenceError) -> String {
    match e {
        EvidenceError::Read { source, .. } | EvidenceError::Write { source, .. } => {
            source.to_string()
        }
    }
}

/// What the journal says, as far as the manifest is concerned.
#[derive(Default)]
struct JournalFacts {
    run_id: Option<String>,
    /// Status of the last `run_finished`, unless a `run_resumed` came after it.
    finished: Option<String>,
    /// Last `step_finished` status per step.
    step_status: HashMap<String, String>,
    /// `attempt_finished` events per step.
    attempts: HashMap<String, usize>,
    /// The last `attempt_finished` outcome per (step, target, attempt).
    outcomes: HashMap<(String, String, u64), serde_json::Value>,
}

fn read_journal(dir: &Path, report: &mut VerifyReport) -> Option<JournalFacts> {
    let path = dir.join(JOURNAL_FILE);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            report.problems.push(Problem::Unreadable {
                path: JOURNAL_FILE.into(),
                reason: e.to_string(),
            });
            return None;
        }
    };
    let mut reader = BufReader::new(file);
    let mut facts = JournalFacts::default();
    let mut expected_seq = 1u64;
    let mut buf = Vec::new();
    let mut line = 0usize;
    // Parse each line only once the next one is known to exist, so the last line can be told
    // apart: a bad last line is a crash mid-write, a bad line before it is damage.
    let mut pending: Option<(usize, Vec<u8>)> = None;
    loop {
        buf.clear();
        let n = match reader.read_until(b'\n', &mut buf) {
            Ok(n) => n,
            Err(e) => {
                report.problems.push(Problem::Unreadable {
                    path: JOURNAL_FILE.into(),
                    reason: e.to_string(),
                });
                return None;
            }
        };
        if n == 0 {
            break;
        }
        line += 1;
        if let Some((l, data)) = pending.take() {
            journal_line(l, &data, false, &mut expected_seq, &mut facts, report);
        }
        pending = Some((line, buf.clone()));
    }
    if let Some((l, data)) = pending {
        journal_line(l, &data, true, &mut expected_seq, &mut facts, report);
    }
    if facts.finished.is_none() {
        report.notes.push(Note::RunNotFinished);
    }
    Some(facts)
}

fn journal_line(
    line: usize,
    data: &[u8],
    last: bool,
    expected_seq: &mut u64,
    facts: &mut JournalFacts,
    report: &mut VerifyReport,
) {
    let complete = data.ends_with(b"\n");
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    let value = serde_json::from_slice::<serde_json::Value>(body);
    if last && (!complete || value.is_err()) {
        // The writer appends `line + "\n"` in one write: only a crash leaves a last line
        // without its newline or cut short.
        report.notes.push(Note::JournalTornTail { line });
        return;
    }
    let value = match value {
        Ok(v) => v,
        Err(_) => {
            report.problems.push(Problem::JournalTorn { line });
            return;
        }
    };
    let seq = value.get("seq").and_then(serde_json::Value::as_u64);
    let event = value.get("event").and_then(serde_json::Value::as_str);
    let (Some(seq), Some(event)) = (seq, event) else {
        report.problems.push(Problem::JournalInvalid {
            line,
            reason: "no numeric `seq` or no `event` name".into(),
        });
        return;
    };
    if seq != *expected_seq {
        report.problems.push(Problem::JournalGap {
            line,
            expected_seq: *expected_seq,
            found_seq: seq,
        });
    }
    *expected_seq = seq + 1;
    let str_field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    match event {
        "run_started" if facts.run_id.is_none() => facts.run_id = str_field("run_id"),
        "run_resumed" => facts.finished = None,
        "run_finished" => facts.finished = str_field("status"),
        "attempt_finished" => {
            if let Some(step) = str_field("step") {
                *facts.attempts.entry(step.clone()).or_default() += 1;
                if let (Some(target), Some(n)) = (
                    str_field("target"),
                    value.get("attempt").and_then(serde_json::Value::as_u64),
                ) {
                    facts.outcomes.insert(
                        (step, target, n),
                        value.get("outcome").cloned().unwrap_or_default(),
                    );
                }
            }
        }
        "step_finished" => {
            if let (Some(step), Some(status)) = (str_field("step"), str_field("status")) {
                facts.step_status.insert(step, status);
            }
        }
        _ => {}
    }
}

fn check_manifest(
    dir: &Path,
    journal: &JournalFacts,
    report: &mut VerifyReport,
) -> Option<serde_json::Value> {
    let manifest: serde_json::Value = match std::fs::read(dir.join(MANIFEST_FILE))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("not valid JSON: {e}")))
    {
        Ok(v) => v,
        Err(reason) => {
            report.problems.push(Problem::Unreadable {
                path: MANIFEST_FILE.into(),
                reason,
            });
            return None;
        }
    };
    let mut disagree = |what: String| report.problems.push(Problem::ManifestDisagrees { what });

    let run_id = manifest["run_id"].as_str();
    match (&journal.run_id, run_id) {
        (Some(j), Some(m)) if j != m => disagree(format!(
            "run_id is `{m}`, the journal's run_started says `{j}`"
        )),
        (None, _) => disagree("the journal has no run_started event".into()),
        (_, None) => disagree("it has no run_id".into()),
        _ => {}
    }

    let status = manifest["status"].as_str().unwrap_or("(none)");
    let finished = journal.finished.as_deref();
    match finished {
        Some(j) if j != status => disagree(format!(
            "status is `{status}`, the journal's run_finished says `{j}`"
        )),
        None if !UNFINISHED.contains(&status) => disagree(format!(
            "status is `{status}`, but the journal has no run_finished event (expected \
             `running` or `interrupted`)"
        )),
        _ => {}
    }

    let empty = Vec::new();
    let steps = manifest["steps"].as_array().unwrap_or(&empty);
    let mut in_manifest = BTreeSet::new();
    for step in steps {
        let Some(id) = step["id"].as_str() else {
            disagree("a step record has no id".into());
            continue;
        };
        in_manifest.insert(id.to_owned());
        let journal_status = journal.step_status.get(id).map(String::as_str);
        match (step["status"].as_str(), journal_status) {
            (Some(m), Some(j)) if m != j => disagree(format!(
                "step `{id}` is `{m}`, the journal's step_finished says `{j}`"
            )),
            (Some(m), None) => disagree(format!(
                "step `{id}` is `{m}`, but the journal has no step_finished for it"
            )),
            // A manifest written before the run ended lags the journal; a final one must not.
            (None, Some(j)) if finished.is_some() => disagree(format!(
                "step `{id}` has no status, the journal's step_finished says `{j}`"
            )),
            _ => {}
        }
        if step["status"].is_string() {
            let recorded = step["attempts"].as_array().map_or(0, |a| {
                a.iter().filter(|a| !a["finished_at"].is_null()).count()
            });
            let events = journal.attempts.get(id).copied().unwrap_or(0);
            if recorded != events {
                disagree(format!(
                    "step `{id}` has {recorded} finished attempt(s), the journal has {events} \
                     attempt_finished event(s) for it"
                ));
            }
        }
    }
    let unknown: BTreeMap<_, _> = journal
        .step_status
        .iter()
        .filter(|(id, _)| !in_manifest.contains(*id))
        .collect();
    for (id, status) in unknown {
        disagree(format!(
            "the journal has step_finished `{status}` for step `{id}`, which the manifest does \
             not list"
        ));
    }
    Some(manifest)
}

/// The line an attempt log ends with, as the recorder writes it for this journal outcome
/// (`attempt N: exit code 3`); `None` for an outcome this version cannot describe.
fn expected_closing(attempt: u64, outcome: &serde_json::Value) -> Option<String> {
    let outcome: runbook_engine::event::AttemptOutcome =
        serde_json::from_value(outcome.clone()).ok()?;
    let text = format!("attempt {attempt}: {}", outcome.describe());
    text.trim_end_matches('\n')
        .rsplit('\n')
        .next()
        .map(str::to_owned)
}

/// The text of the last record of a log, if it is a `--- ` record.
fn last_meta_record(path: &Path) -> std::io::Result<Option<String>> {
    let tail = crate::log_tail::read_log_tail(path, 1, 8192)?;
    Ok(tail
        .lines
        .into_iter()
        .next_back()
        .filter(crate::log_tail::LogLine::is_meta)
        .map(|l| l.text))
}

/// Each attempt log that the journal says finished ends with the closing record of that
/// outcome: a log "fixed" to show success while the journal says exit 1 is caught even when
/// `SHA256SUMS` was rewritten to match.
fn check_log_closings(
    dir: &Path,
    manifest: &serde_json::Value,
    journal: &JournalFacts,
    report: &mut VerifyReport,
) {
    let empty = Vec::new();
    let mut seen: HashMap<(String, String, u64), usize> = HashMap::new();
    let mut attempts = Vec::new();
    for step in manifest["steps"].as_array().unwrap_or(&empty) {
        let Some(id) = step["id"].as_str() else {
            continue;
        };
        for a in step["attempts"].as_array().unwrap_or(&empty) {
            let (Some(target), Some(n), Some(log)) = (
                a["target"].as_str(),
                a["attempt"].as_u64(),
                a["log"].as_str(),
            ) else {
                continue;
            };
            let key = (id.to_owned(), target.to_owned(), n);
            *seen.entry(key.clone()).or_default() += 1;
            attempts.push((key, log.to_owned()));
        }
    }
    for (key, log) in attempts {
        // Compacted probe attempts keep no log; a step re-run on resume reuses numbers.
        if log.is_empty() || seen.get(&key) != Some(&1) {
            continue;
        }
        let Some(outcome) = journal.outcomes.get(&key) else {
            continue;
        };
        let Some(expected) = expected_closing(key.2, outcome) else {
            continue;
        };
        let rel = Path::new(&log);
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            continue;
        }
        let what = match last_meta_record(&dir.join(rel)) {
            // A missing log is reported by the checksums already.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => Some(format!("cannot read it: {e}")),
            Ok(None) => Some(format!(
                "it has no closing record, the journal says `{expected}`"
            )),
            Ok(Some(found)) if found != expected => Some(format!(
                "it ends `--- {found}`, the journal says `{expected}`"
            )),
            Ok(Some(_)) => None,
        };
        if let Some(what) = what {
            report
                .problems
                .push(Problem::LogDisagrees { path: log, what });
        }
    }
}

fn shorten(s: &str) -> String {
    const MAX: usize = 120;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sign::{default_trusted_comment, sign_bundle};
    use serde_json::json;

    const RUN: &str = "5acbfb1e";

    fn event(seq: u64, mut v: serde_json::Value) -> String {
        v["seq"] = seq.into();
        v["at"] = "2026-11-25T18:28:29.000Z".into();
        format!("{v}\n")
    }

    fn journal_events() -> Vec<serde_json::Value> {
        vec![
            json!({"event": "run_started", "run_id": RUN, "runbook": "t", "steps": 3}),
            json!({"event": "step_started", "step": "a"}),
            json!({"event": "attempt_started", "step": "a", "target": "local", "attempt": 1, "max_attempts": 1, "command": "true", "cwd": "/"}),
            json!({"event": "attempt_finished", "step": "a", "target": "local", "attempt": 1, "duration": 0.01, "outcome": {"kind": "exited", "code": 0}, "output": {"stdout": 3, "stderr": 0}}),
            json!({"event": "step_finished", "step": "a", "status": "succeeded", "attempts": 1, "duration": 0.01}),
            json!({"event": "step_started", "step": "b"}),
            json!({"event": "attempt_started", "step": "b", "target": "local", "attempt": 1, "max_attempts": 2, "command": "x", "cwd": "/"}),
            json!({"event": "attempt_finished", "step": "b", "target": "local", "attempt": 1, "duration": 0.01, "outcome": {"kind": "exited", "code": 1}, "output": {"stdout": 0, "stderr": 4}}),
            json!({"event": "retry_scheduled", "step": "b", "next_attempt": 2, "delay": 0.1}),
            json!({"event": "attempt_started", "step": "b", "target": "local", "attempt": 2, "max_attempts": 2, "command": "x", "cwd": "/"}),
            json!({"event": "attempt_finished", "step": "b", "target": "local", "attempt": 2, "duration": 0.01, "outcome": {"kind": "exited", "code": 1}, "output": {"stdout": 0, "stderr": 4}}),
            json!({"event": "step_finished", "step": "b", "status": "failed", "attempts": 2, "duration": 0.12, "reason": "exit code 1"}),
            json!({"event": "step_finished", "step": "c", "status": "skipped", "attempts": 0, "duration": 0.0, "reason": "needs `b`, which failed"}),
            json!({"event": "run_finished", "status": "failed"}),
        ]
    }

    fn attempt(step: &str, n: u32) -> serde_json::Value {
        json!({"attempt": n, "target": "local", "command": "x", "cwd": "/",
               "started_at": "2026-11-25T18:28:29.000Z", "finished_at": "2026-11-25T18:28:29.010Z",
               "output": {"stdout": 0, "stderr": 0},
               "log": format!("steps/{step}/local/attempt-{n}.log")})
    }

    fn manifest() -> serde_json::Value {
        json!({
            "format": "runbook-evidence/1", "run_id": RUN, "status": "failed",
            "started_at": "2026-11-25T18:28:29.000Z",
            "runbook": {"name": "t", "refs": [], "path": "t.toml", "sha256": "00", "copy": "runbook/t.toml"},
            "steps": [
                {"id": "a", "status": "succeeded", "attempts": [attempt("a", 1)], "collected": []},
                {"id": "b", "status": "failed", "attempts": [attempt("b", 1), attempt("b", 2)], "collected": []},
                {"id": "c", "status": "skipped", "reason": "needs `b`, which failed", "attempts": [], "collected": []},
            ],
            "notes": [], "secrets": []
        })
    }

    fn write_journal(dir: &Path, events: &[serde_json::Value]) {
        let text: String = events
            .iter()
            .enumerate()
            .map(|(i, e)| event(i as u64 + 1, e.clone()))
            .collect();
        std::fs::write(dir.join(JOURNAL_FILE), text).expect("journal");
    }

    fn bundle() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        for (rel, text) in [
            ("runbook/t.toml", "[runbook]\nname = \"t\"\n"),
            (
                "steps/a/local/attempt-1.log",
                "2026-11-25T18:28:29.000Z out hi\n\
                 2026-11-25T18:28:29.010Z --- attempt 1: succeeded\n",
            ),
            (
                "steps/b/local/attempt-1.log",
                "2026-11-25T18:28:29.000Z err boom\n\
                 2026-11-25T18:28:29.010Z --- attempt 1: exit code 1\n",
            ),
            (
                "steps/b/local/attempt-2.log",
                "2026-11-25T18:28:29.100Z err boom\n\
                 2026-11-25T18:28:29.110Z --- attempt 2: exit code 1\n",
            ),
            ("collected/a/report.txt", "report\n"),
        ] {
            let path = dir.join(rel);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
        write_journal(dir, &journal_events());
        let m = serde_json::to_vec_pretty(&manifest()).expect("json");
        std::fs::write(dir.join(MANIFEST_FILE), m).expect("manifest");
        checksums::write(dir).expect("sums");
        std::fs::write(dir.join(LOCK_FILE), "").expect("lock");
        tmp
    }

    fn only(report: &VerifyReport) -> &Problem {
        assert_eq!(report.problems.len(), 1, "{:#?}", report.problems);
        &report.problems[0]
    }

    // Regression: a mistyped path was reported as a bundle "never sealed" (exit 3, as for
    // tampering) instead of as a path that is not a bundle.
    #[test]
    fn only_a_directory_with_bundle_files_is_a_bundle() {
        let b = bundle();
        assert!(check_is_bundle(b.path()).is_ok());
        let missing = b.path().join("nope");
        assert!(matches!(
            check_is_bundle(&missing),
            Err(NotABundle::Missing(_))
        ));
        assert!(matches!(
            check_is_bundle(&b.path().join("manifest.json/x")),
            Err(NotABundle::Missing(_))
        ));
        assert!(matches!(
            check_is_bundle(&b.path().join(MANIFEST_FILE)),
            Err(NotABundle::NotADirectory(_))
        ));
        assert!(matches!(
            check_is_bundle(&b.path().join("steps")),
            Err(NotABundle::NoBundleFiles(_))
        ));
        // A bundle whose journal and manifest were deleted is still checked, and fails.
        std::fs::remove_file(b.path().join(JOURNAL_FILE)).expect("rm");
        std::fs::remove_file(b.path().join(MANIFEST_FILE)).expect("rm");
        assert!(check_is_bundle(b.path()).is_ok());
        assert!(!verify_bundle(b.path(), None).is_ok());
    }

    #[test]
    fn clean_bundle_has_no_problems() {
        let b = bundle();
        let report = verify_bundle(b.path(), None);
        assert!(report.is_ok(), "{:#?}", report.problems);
        assert!(report.sealed);
        assert!(report.notes.is_empty(), "{:#?}", report.notes);
        assert_eq!(report.files_checked, 7);
        assert_eq!(report.signature, SignatureState::Unsigned);
    }

    #[test]
    fn one_changed_byte_in_a_log_is_modified() {
        let b = bundle();
        let log = b.path().join("steps/b/local/attempt-2.log");
        let mut data = std::fs::read(&log).expect("read");
        data[30] ^= 0x20;
        std::fs::write(&log, data).expect("write");
        let report = verify_bundle(b.path(), None);
        match only(&report) {
            Problem::Modified {
                path,
                expected,
                actual,
            } => {
                assert_eq!(path, "steps/b/local/attempt-2.log");
                assert_ne!(expected, actual);
            }
            p => panic!("{p:?}"),
        }
        assert!(only(&report)
            .to_string()
            .starts_with("steps/b/local/attempt-2.log: modified"));
    }

    #[test]
    fn deleted_file_is_missing() {
        let b = bundle();
        std::fs::remove_file(b.path().join("collected/a/report.txt")).expect("rm");
        let report = verify_bundle(b.path(), None);
        assert_eq!(
            only(&report),
            &Problem::Missing {
                path: "collected/a/report.txt".into()
            }
        );
        assert_eq!(report.files_checked, 6);
    }

    #[test]
    fn added_file_is_extra() {
        let b = bundle();
        std::fs::write(b.path().join("steps/a/local/attempt-2.log"), "x").expect("write");
        let report = verify_bundle(b.path(), None);
        assert_eq!(
            only(&report),
            &Problem::Extra {
                path: "steps/a/local/attempt-2.log".into()
            }
        );
        assert!(only(&report)
            .to_string()
            .contains("not listed in SHA256SUMS"));
    }

    #[test]
    fn signed_bundle_verifies_and_tampered_sums_do_not() {
        let b = bundle();
        let (sk, pk) = sign::generate("test");
        let tc = default_trusted_comment(b.path()).expect("comment");
        assert!(tc.contains(&format!("run:{RUN}")), "{tc}");
        sign_bundle(b.path(), &sk, &tc).expect("sign");

        let report = verify_bundle(b.path(), Some(&pk));
        assert!(report.is_ok(), "{:#?}", report.problems);
        assert_eq!(
            report.signature,
            SignatureState::Verified {
                key_id: pk.key_id(),
                trusted_comment: tc
            }
        );
        let report = verify_bundle(b.path(), None);
        assert!(report.is_ok(), "{:#?}", report.problems);
        assert_eq!(
            report.signature,
            SignatureState::Unverified {
                key_id: pk.key_id()
            }
        );

        // Another key: wrong key id, both ids named.
        let (_, other) = sign::generate("other");
        let report = verify_bundle(b.path(), Some(&other));
        let msg = only(&report).to_string();
        assert!(
            msg.contains(&pk.key_id().to_string()) && msg.contains(&other.key_id().to_string()),
            "{msg}"
        );

        // Tamper with a log and "fix" SHA256SUMS: the checksums pass, the signature does not.
        std::fs::write(
            b.path().join("steps/a/local/attempt-1.log"),
            "forged\n2026-11-25T18:28:29.010Z --- attempt 1: succeeded\n",
        )
        .expect("write");
        checksums::write(b.path()).expect("sums");
        let report = verify_bundle(b.path(), Some(&pk));
        assert!(
            matches!(only(&report), Problem::SignatureInvalid { .. }),
            "{:#?}",
            report.problems
        );
        assert!(matches!(report.signature, SignatureState::Invalid(_)));
        assert!(only(&report)
            .to_string()
            .starts_with("SHA256SUMS.minisig: signature invalid: bad signature"));
    }

    #[test]
    fn pubkey_without_signature_is_a_problem() {
        let b = bundle();
        let (_, pk) = sign::generate("test");
        let report = verify_bundle(b.path(), Some(&pk));
        assert_eq!(only(&report), &Problem::SignatureMissing);
    }

    #[test]
    fn torn_last_journal_line_is_tolerated() {
        let b = bundle();
        let mut events = journal_events();
        events.pop(); // run_finished never made it: the runner died while writing it
        let mut text: String = events
            .iter()
            .enumerate()
            .map(|(i, e)| event(i as u64 + 1, e.clone()))
            .collect();
        text.push_str("{\"at\":\"2026-11-25T18:28:2");
        std::fs::write(b.path().join(JOURNAL_FILE), text).expect("journal");
        let mut m = manifest();
        m["status"] = "interrupted".into();
        std::fs::write(b.path().join(MANIFEST_FILE), m.to_string()).expect("manifest");
        checksums::write(b.path()).expect("sums");
        let report = verify_bundle(b.path(), None);
        assert!(report.is_ok(), "{:#?}", report.problems);
        assert_eq!(
            report.notes,
            vec![Note::JournalTornTail { line: 14 }, Note::RunNotFinished]
        );
        assert!(
            !report.sealed,
            "the run did not finish: sealed by repair, not by the runner"
        );
    }

    #[test]
    fn bad_journal_line_in_the_middle_is_a_problem() {
        let b = bundle();
        let path = b.path().join(JOURNAL_FILE);
        let text = std::fs::read_to_string(&path).expect("read");
        let mut lines: Vec<&str> = text.lines().collect();
        lines[3] = "{\"at\":\"2026";
        std::fs::write(&path, lines.join("\n") + "\n").expect("write");
        checksums::write(b.path()).expect("sums");
        let report = verify_bundle(b.path(), None);
        assert!(
            report.problems.contains(&Problem::JournalTorn { line: 4 }),
            "{:#?}",
            report.problems
        );
    }

    #[test]
    fn journal_gap_is_reported() {
        let b = bundle();
        let mut events = journal_events();
        events.remove(7); // b's first attempt_finished: hide a failure
        let text: String = events
            .iter()
            .enumerate()
            .map(|(i, e)| event(if i >= 7 { i as u64 + 2 } else { i as u64 + 1 }, e.clone()))
            .collect();
        std::fs::write(b.path().join(JOURNAL_FILE), text).expect("journal");
        checksums::write(b.path()).expect("sums");
        let report = verify_bundle(b.path(), None);
        assert!(
            report.problems.contains(&Problem::JournalGap {
                line: 8,
                expected_seq: 8,
                found_seq: 9
            }),
            "{:#?}",
            report.problems
        );
        // …and the manifest's two attempts of `b` no longer match the journal.
        assert!(report.problems.iter().any(
            |p| matches!(p, Problem::ManifestDisagrees { what } if what.contains("step `b` has 2"))
        ));
    }

    #[test]
    fn edited_manifest_status_disagrees() {
        let b = bundle();
        let mut m = manifest();
        m["status"] = "succeeded".into();
        std::fs::write(b.path().join(MANIFEST_FILE), m.to_string()).expect("manifest");
        checksums::write(b.path()).expect("sums");
        let report = verify_bundle(b.path(), None);
        let p = only(&report);
        assert_eq!(
            p,
            &Problem::ManifestDisagrees {
                what: "status is `succeeded`, the journal's run_finished says `failed`".into()
            }
        );
        assert!(p
            .to_string()
            .starts_with("manifest.json disagrees with journal.jsonl"));
    }

    #[test]
    fn edited_step_status_and_attempts_disagree() {
        let b = bundle();
        let mut m = manifest();
        m["steps"][1]["status"] = "succeeded".into();
        m["steps"][1]["attempts"]
            .as_array_mut()
            .expect("array")
            .remove(0);
        m["run_id"] = "deadbeef".into();
        std::fs::write(b.path().join(MANIFEST_FILE), m.to_string()).expect("manifest");
        checksums::write(b.path()).expect("sums");
        let report = verify_bundle(b.path(), None);
        let text: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
        assert_eq!(report.problems.len(), 3, "{text:#?}");
        assert!(text[0].contains("run_id is `deadbeef`"), "{text:#?}");
        assert!(
            text[1].contains("step `b` is `succeeded`, the journal's step_finished says `failed`")
        );
        assert!(text[2].contains("step `b` has 1 finished attempt(s), the journal has 2"));
    }

    #[test]
    fn missing_and_malformed_sums() {
        let b = bundle();
        let sums = b.path().join(SUMS_FILE);
        let text = std::fs::read_to_string(&sums).expect("read");
        let bad = format!(
            "{text}nonsense line\n{}  ../../etc/passwd\n",
            "0".repeat(64)
        );
        std::fs::write(&sums, bad).expect("write");
        let report = verify_bundle(b.path(), None);
        assert_eq!(report.problems.len(), 2, "{:#?}", report.problems);
        assert!(matches!(
            &report.problems[0],
            Problem::MalformedSums { line: 8, .. }
        ));
        assert!(report.problems[1].to_string().contains("leaves the bundle"));

        std::fs::remove_file(&sums).expect("rm");
        let report = verify_bundle(b.path(), None);
        assert_eq!(only(&report), &Problem::SumsMissing);
    }

    #[test]
    fn sums_written_by_sha256sum_style_binary_marker_parse() {
        let hash = "A".repeat(64);
        assert_eq!(
            parse_sums_line(&format!("{hash} *dir/f.log")),
            Ok(("a".repeat(64), "dir/f.log".into()))
        );
        assert_eq!(
            parse_sums_line(&format!("\\{hash}  a\\nb")),
            Ok(("a".repeat(64), "a\nb".into()))
        );
        assert!(parse_sums_line(&format!("{hash}  /etc/passwd")).is_err());
    }
    #[test]
    fn a_trusted_comment_naming_another_run_is_a_problem() {
        let b = bundle();
        let (sk, pk) = sign::generate("test");
        let sums = std::fs::read(b.path().join(SUMS_FILE)).expect("sums");
        let forged = format!(
            "timestamp:1\tfile:SHA256SUMS\trun:deadbeef\tstatus:succeeded\tsha256:{}",
            "0".repeat(64)
        );
        sign_bundle(b.path(), &sk, &forged).expect("sign");
        let report = verify_bundle(b.path(), Some(&pk));
        let text: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
        assert_eq!(report.problems.len(), 3, "{text:#?}");
        assert!(text[0].contains("it says run `deadbeef`, the bundle has run_id `5acbfb1e`"));
        assert!(text[1].contains("it says status `succeeded`, the bundle says status `failed`"));
        assert!(
            text[2].contains(&checksums::sha256_bytes(&sums)),
            "{text:#?}"
        );

        // Stock minisign's comment names none of them: a note, not a problem.
        sign_bundle(b.path(), &sk, "timestamp:1\tfile:SHA256SUMS\thashed").expect("sign");
        let report = verify_bundle(b.path(), Some(&pk));
        assert!(report.is_ok(), "{:#?}", report.problems);
        assert_eq!(
            report.notes,
            vec![Note::TrustedCommentIncomplete {
                missing: "run, status, sha256".into()
            }]
        );
    }

    #[test]
    fn a_log_closing_record_must_match_the_journal() {
        let b = bundle();
        let log = b.path().join("steps/b/local/attempt-2.log");
        std::fs::write(
            &log,
            "2026-11-25T18:28:29.100Z err boom\n2026-11-25T18:28:29.110Z --- attempt 2: succeeded\n",
        )
        .expect("write");
        checksums::write(b.path()).expect("sums");
        let report = verify_bundle(b.path(), None);
        assert_eq!(
            only(&report),
            &Problem::LogDisagrees {
                path: "steps/b/local/attempt-2.log".into(),
                what:
                    "it ends `--- attempt 2: succeeded`, the journal says `attempt 2: exit code 1`"
                        .into()
            }
        );
        // Output after the closing record: the log was appended to.
        std::fs::write(
            &log,
            "2026-11-25T18:28:29.110Z --- attempt 2: exit code 1\n2026-11-25T18:28:29.200Z out ok\n",
        )
        .expect("write");
        checksums::write(b.path()).expect("sums");
        let report = verify_bundle(b.path(), None);
        assert!(only(&report).to_string().contains("no closing record"));
    }

    #[test]
    fn unchecked_signatures_and_required_signatures_are_trust_gaps() {
        let b = bundle();
        let report = verify_bundle(b.path(), None);
        assert!(report.trust_gaps(false).is_empty());
        let gaps = report.trust_gaps(true);
        assert_eq!(gaps.len(), 1);
        assert!(gaps[0].contains("UNSIGNED"));

        let (sk, pk) = sign::generate("test");
        let (_, other) = sign::generate("other");
        let tc = default_trusted_comment(b.path()).expect("comment");
        sign_bundle(b.path(), &sk, &tc).expect("sign");
        let report = verify_bundle(b.path(), None);
        assert!(report.is_ok());
        let gaps = report.trust_gaps(false);
        assert!(gaps[0].contains("--pubkey FILE") && gaps[0].contains("RUNBOOK_TRUSTED_KEYS"));
        // Several trusted keys: the one the signature names is used, wherever it is listed.
        let keys = [other, pk.clone()];
        let report = verify_bundle_with(
            b.path(),
            &VerifyOptions {
                keys: &keys,
                tsa_ca: None,
            },
        );
        assert!(report.is_ok(), "{:#?}", report.problems);
        assert!(report.trust_gaps(true).is_empty());
    }
}
