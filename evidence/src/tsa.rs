//! Trusted time for a bundle (RFC 3161): the time-stamp request for the SHA-256 of
//! `SHA256SUMS`, the first look at a time-stamping authority's reply when it comes back, and
//! the full check an assessor runs later on `SHA256SUMS.tsr` (status, message imprint, the
//! TSA's CMS signature, its certificate chained to a CA file the assessor holds, its
//! `timeStamping` key usage). The HTTP exchange is the CLI's; ASN.1 is RustCrypto's
//! (`x509-tsp`, `cms`, `x509-cert`, `der`).
//!
//! Supported signatures: RSA PKCS#1 v1.5 with SHA-256/384/512 and ECDSA P-256 with SHA-256.
//! `genTime` with fractions of a second is not read by `der` 0.7 and is reported as malformed.

use chrono::{DateTime, Utc};
use cms::cert::x509::ext::pkix::ExtendedKeyUsage;
use cms::cert::CertificateChoices;
use cms::signed_data::{SignedData, SignerIdentifier, SignerInfo};
use der::asn1::{Int, OctetString};
use der::oid::ObjectIdentifier;
use der::{Decode, Encode};
use sha2::{Digest, Sha256, Sha384, Sha512};
use spki::AlgorithmIdentifierOwned;
pub use x509_cert::Certificate;
use x509_tsp::{MessageImprint, TimeStampReq, TimeStampResp, TspVersion, TstInfo};

/// The reply of the TSA, stored next to `SHA256SUMS` (the name `openssl ts -verify -in` takes).
pub const TSR_FILE: &str = "SHA256SUMS.tsr";
/// HTTP content types of RFC 3161 section 3.4.
pub const REQUEST_CONTENT_TYPE: &str = "application/timestamp-query";
pub const REPLY_CONTENT_TYPE: &str = "application/timestamp-reply";

const ID_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const ID_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.2");
const ID_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.3");
const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const ID_CT_TST_INFO: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.16.1.4");
const ID_CONTENT_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.3");
const ID_MESSAGE_DIGEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const SHA384_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.12");
const SHA512_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.13");
const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const ID_KP_TIME_STAMPING: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.8");

/// How deep a chain from the TSA's certificate to the CA file may go.
const MAX_CHAIN: usize = 6;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TsaError {
    #[error("not a time-stamp reply (RFC 3161 TimeStampResp): {0}")]
    Malformed(String),
    #[error("the time-stamping authority refused the request: status {status}{text}")]
    Refused { status: String, text: String },
    #[error("the token is for SHA-256 {token}, but SHA256SUMS has SHA-256 {actual} (the token belongs to other data, or SHA256SUMS changed after it was stamped)")]
    ImprintMismatch { token: String, actual: String },
    #[error("the token's nonce does not match the request's (a replayed or substituted reply)")]
    NonceMismatch,
    #[error("the TSA's signature does not verify: {0}")]
    BadSignature(String),
    #[error("the TSA's certificate is not trusted: {0}")]
    Untrusted(String),
    #[error("unsupported {0}")]
    Unsupported(String),
    #[error("the CA file holds no PEM certificate: {0}")]
    CaFile(String),
}

fn malformed(e: impl std::fmt::Display) -> TsaError {
    TsaError::Malformed(e.to_string())
}

/// A request ready to send, and what its reply must match.
#[derive(Debug, Clone)]
pub struct Request {
    pub der: Vec<u8>,
    pub nonce: Vec<u8>,
}

/// The time-stamp request for `sums` (the bytes of `SHA256SUMS`): SHA-256 imprint, a random
/// 64-bit nonce, and `certReq` so the TSA puts its certificate in the token.
pub fn request(sums: &[u8]) -> Result<Request, TsaError> {
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce)
        .map_err(|e| TsaError::Malformed(format!("no random nonce: {e}")))?;
    // Positive and minimally encoded: first byte in 0x01..=0x7f.
    nonce[0] = (nonce[0] & 0x7f).max(1);
    let req = TimeStampReq {
        version: TspVersion::V1,
        message_imprint: MessageImprint {
            hash_algorithm: AlgorithmIdentifierOwned {
                oid: ID_SHA256,
                parameters: None,
            },
            hashed_message: OctetString::new(Sha256::digest(sums).to_vec()).map_err(malformed)?,
        },
        req_policy: None,
        nonce: Some(Int::new(&nonce).map_err(malformed)?),
        cert_req: true,
        extensions: None,
    };
    Ok(Request {
        der: req.to_der().map_err(malformed)?,
        nonce: nonce.to_vec(),
    })
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    /// The authority's time (`genTime`).
    pub time: DateTime<Utc>,
    /// Subject of the certificate that signed the token.
    pub tsa: String,
    /// The token's serial number, in hex.
    pub serial: String,
    pub policy: String,
}

/// The parts of a reply every check needs.
struct Parsed {
    tst: TstInfo,
    /// The DER of the TSTInfo, as signed.
    tst_der: Vec<u8>,
    signed: SignedData,
}

fn parse(reply: &[u8]) -> Result<Parsed, TsaError> {
    let resp = TimeStampResp::from_der(reply).map_err(malformed)?;
    use cmpv2::status::PkiStatus;
    if !matches!(
        resp.status.status,
        PkiStatus::Accepted | PkiStatus::GrantedWithMods
    ) {
        let text = resp
            .status
            .status_string
            .as_ref()
            .map(|s| {
                let parts: Vec<String> = s.iter().map(|t| t.as_str().to_owned()).collect();
                format!(": {}", parts.join("; "))
            })
            .unwrap_or_default();
        return Err(TsaError::Refused {
            status: format!("{:?}", resp.status.status),
            text,
        });
    }
    let token = resp
        .time_stamp_token
        .ok_or_else(|| malformed("status granted but no timeStampToken"))?;
    if token.content_type != ID_SIGNED_DATA {
        return Err(malformed(format!(
            "the token is {} content, not SignedData",
            token.content_type
        )));
    }
    let signed: SignedData = token.content.decode_as().map_err(malformed)?;
    if signed.encap_content_info.econtent_type != ID_CT_TST_INFO {
        return Err(malformed("the token's content is not a TSTInfo"));
    }
    let econtent = signed
        .encap_content_info
        .econtent
        .as_ref()
        .ok_or_else(|| malformed("the token has no TSTInfo"))?;
    let tst_der = econtent.value().to_vec();
    let tst = TstInfo::from_der(&tst_der).map_err(malformed)?;
    Ok(Parsed {
        tst,
        tst_der,
        signed,
    })
}

fn hex_of(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

fn digest(alg: &ObjectIdentifier, data: &[u8]) -> Result<Vec<u8>, TsaError> {
    Ok(match *alg {
        ID_SHA256 => Sha256::digest(data).to_vec(),
        ID_SHA384 => Sha384::digest(data).to_vec(),
        ID_SHA512 => Sha512::digest(data).to_vec(),
        other => return Err(TsaError::Unsupported(format!("digest algorithm {other}"))),
    })
}

fn check_imprint(tst: &TstInfo, sums: &[u8]) -> Result<(), TsaError> {
    let imprint = &tst.message_imprint;
    let actual = digest(&imprint.hash_algorithm.oid, sums)?;
    if imprint.hashed_message.as_bytes() != actual.as_slice() {
        return Err(TsaError::ImprintMismatch {
            token: hex_of(imprint.hashed_message.as_bytes()),
            actual: hex_of(&actual),
        });
    }
    Ok(())
}

fn gen_time(tst: &TstInfo) -> Result<DateTime<Utc>, TsaError> {
    let d = tst.gen_time.to_unix_duration();
    DateTime::<Utc>::from_timestamp(
        i64::try_from(d.as_secs()).map_err(malformed)?,
        d.subsec_nanos(),
    )
    .ok_or_else(|| malformed("genTime out of range"))
}

/// The reply just received from the TSA: granted, for this `SHA256SUMS`, with the request's
/// nonce. The signature is checked later, by whoever holds the TSA's CA. Returns `genTime`.
pub fn check_reply(reply: &[u8], sums: &[u8], req: &Request) -> Result<DateTime<Utc>, TsaError> {
    let p = parse(reply)?;
    check_imprint(&p.tst, sums)?;
    match &p.tst.nonce {
        Some(n) if n.as_bytes() == req.nonce.as_slice() => {}
        _ => return Err(TsaError::NonceMismatch),
    }
    gen_time(&p.tst)
}

/// A stored reply without the CA: granted and for this `SHA256SUMS`. Returns the `genTime` it
/// claims (unproven until [`verify`] checks who signed it).
pub fn check_token(reply: &[u8], sums: &[u8]) -> Result<DateTime<Utc>, TsaError> {
    let p = parse(reply)?;
    check_imprint(&p.tst, sums)?;
    gen_time(&p.tst)
}

/// Reads every certificate of a PEM file (the assessor's CA file).
pub fn load_ca(pem: &[u8]) -> Result<Vec<Certificate>, TsaError> {
    let certs = Certificate::load_pem_chain(pem).map_err(|e| TsaError::CaFile(e.to_string()))?;
    if certs.is_empty() {
        return Err(TsaError::CaFile("no `BEGIN CERTIFICATE` block".into()));
    }
    Ok(certs)
}

/// The full check of a stored reply against `SHA256SUMS` and the assessor's CA certificates.
pub fn verify(reply: &[u8], sums: &[u8], ca: &[Certificate]) -> Result<Stamp, TsaError> {
    let p = parse(reply)?;
    check_imprint(&p.tst, sums)?;
    let time = gen_time(&p.tst)?;
    let signer_info = match p.signed.signer_infos.0.as_slice() {
        [one] => one,
        [] => return Err(malformed("the token has no signer")),
        _ => return Err(malformed("the token has more than one signer")),
    };
    let token_certs: Vec<&Certificate> = p
        .signed
        .certificates
        .as_ref()
        .map(|set| {
            set.0
                .iter()
                .filter_map(|c| match c {
                    CertificateChoices::Certificate(c) => Some(c),
                    CertificateChoices::Other(_) => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let signer = find_signer(signer_info, &token_certs, ca)?;
    check_signed_attrs(signer_info, &p.tst_der)?;
    let attrs = signer_info
        .signed_attrs
        .as_ref()
        .ok_or_else(|| TsaError::BadSignature("no signed attributes".into()))?
        .to_der()
        .map_err(malformed)?;
    verify_signature(
        &signer.tbs_certificate.subject_public_key_info,
        &signer_info.signature_algorithm.oid,
        Some(&signer_info.digest_alg.oid),
        &attrs,
        signer_info.signature.as_bytes(),
    )?;
    check_time_stamping_usage(signer)?;
    chain_to_ca(signer, &token_certs, ca, time)?;
    Ok(Stamp {
        time,
        tsa: signer.tbs_certificate.subject.to_string(),
        serial: hex_of(p.tst.serial_number.as_bytes()),
        policy: p.tst.policy.to_string(),
    })
}

fn find_signer<'a>(
    si: &SignerInfo,
    token_certs: &[&'a Certificate],
    ca: &'a [Certificate],
) -> Result<&'a Certificate, TsaError> {
    let candidates = token_certs.iter().copied().chain(ca.iter());
    let found = match &si.sid {
        SignerIdentifier::IssuerAndSerialNumber(ias) => candidates.into_iter().find(|c| {
            c.tbs_certificate.issuer == ias.issuer
                && c.tbs_certificate.serial_number == ias.serial_number
        }),
        SignerIdentifier::SubjectKeyIdentifier(skid) => candidates.into_iter().find(|c| {
            matches!(
                c.tbs_certificate.get::<x509_cert::ext::pkix::SubjectKeyIdentifier>(),
                Ok(Some((_, id))) if id == *skid
            )
        }),
    };
    found.ok_or_else(|| {
        TsaError::Untrusted(
            "the token does not carry the certificate that signed it, and the CA file does \
             not hold it either"
                .into(),
        )
    })
}

/// RFC 5652 5.4: the signed attributes name the TSTInfo content type and its digest.
fn check_signed_attrs(si: &SignerInfo, tst_der: &[u8]) -> Result<(), TsaError> {
    let attrs = si
        .signed_attrs
        .as_ref()
        .ok_or_else(|| TsaError::BadSignature("no signed attributes".into()))?;
    let single = |oid: ObjectIdentifier| {
        attrs
            .iter()
            .find(|a| a.oid == oid)
            .and_then(|a| a.values.iter().next().cloned())
    };
    let ct = single(ID_CONTENT_TYPE)
        .ok_or_else(|| TsaError::BadSignature("no content-type attribute".into()))?;
    let ct: ObjectIdentifier = ct.decode_as().map_err(malformed)?;
    if ct != ID_CT_TST_INFO {
        return Err(TsaError::BadSignature(format!(
            "the content-type attribute is {ct}, not TSTInfo"
        )));
    }
    let md = single(ID_MESSAGE_DIGEST)
        .ok_or_else(|| TsaError::BadSignature("no message-digest attribute".into()))?;
    let md: OctetString = md.decode_as().map_err(malformed)?;
    if md.as_bytes() != digest(&si.digest_alg.oid, tst_der)?.as_slice() {
        return Err(TsaError::BadSignature(
            "the TSTInfo does not match the digest the TSA signed (the token was altered)".into(),
        ));
    }
    Ok(())
}

/// Verifies `sig` over `msg` with the key in `spki`.
fn verify_signature(
    spki: &spki::SubjectPublicKeyInfoOwned,
    sig_alg: &ObjectIdentifier,
    digest_alg: Option<&ObjectIdentifier>,
    msg: &[u8],
    sig: &[u8],
) -> Result<(), TsaError> {
    use rsa::signature::Verifier;
    let spki_der = spki.to_der().map_err(malformed)?;
    let bad = |e: rsa::signature::Error| TsaError::BadSignature(e.to_string());
    match spki.algorithm.oid {
        RSA_ENCRYPTION => {
            use rsa::pkcs8::DecodePublicKey;
            let key = rsa::RsaPublicKey::from_public_key_der(&spki_der).map_err(malformed)?;
            let hash = match (*sig_alg, digest_alg) {
                (SHA256_WITH_RSA, _) => ID_SHA256,
                (SHA384_WITH_RSA, _) => ID_SHA384,
                (SHA512_WITH_RSA, _) => ID_SHA512,
                (RSA_ENCRYPTION, Some(d)) => *d,
                (other, _) => {
                    return Err(TsaError::Unsupported(format!(
                        "signature algorithm {other} with an RSA key"
                    )))
                }
            };
            let sig = rsa::pkcs1v15::Signature::try_from(sig).map_err(bad)?;
            match hash {
                ID_SHA256 => rsa::pkcs1v15::VerifyingKey::<Sha256>::new(key).verify(msg, &sig),
                ID_SHA384 => rsa::pkcs1v15::VerifyingKey::<Sha384>::new(key).verify(msg, &sig),
                ID_SHA512 => rsa::pkcs1v15::VerifyingKey::<Sha512>::new(key).verify(msg, &sig),
                other => return Err(TsaError::Unsupported(format!("digest algorithm {other}"))),
            }
            .map_err(bad)
        }
        ID_EC_PUBLIC_KEY => {
            use p256::pkcs8::DecodePublicKey;
            if *sig_alg != ECDSA_WITH_SHA256 {
                return Err(TsaError::Unsupported(format!(
                    "signature algorithm {sig_alg} with an EC key (ECDSA P-256 with SHA-256 is)"
                )));
            }
            let key = p256::ecdsa::VerifyingKey::from_public_key_der(&spki_der).map_err(|e| {
                TsaError::Unsupported(format!("EC key (only P-256 is supported): {e}"))
            })?;
            let sig = p256::ecdsa::Signature::from_der(sig).map_err(bad)?;
            key.verify(msg, &sig).map_err(bad)
        }
        other => Err(TsaError::Unsupported(format!(
            "public key algorithm {other}"
        ))),
    }
}

/// RFC 3161 2.3: the TSA's certificate is for time-stamping (extended key usage).
fn check_time_stamping_usage(cert: &Certificate) -> Result<(), TsaError> {
    match cert.tbs_certificate.get::<ExtendedKeyUsage>() {
        Ok(Some((_, eku))) if eku.0.contains(&ID_KP_TIME_STAMPING) => Ok(()),
        Ok(_) => Err(TsaError::Untrusted(format!(
            "`{}` is not a time-stamping certificate (no extendedKeyUsage timeStamping)",
            cert.tbs_certificate.subject
        ))),
        Err(e) => Err(malformed(e)),
    }
}

fn valid_at(cert: &Certificate, at: DateTime<Utc>) -> Result<(), TsaError> {
    let v = &cert.tbs_certificate.validity;
    let secs = |t: &x509_cert::time::Time| t.to_unix_duration().as_secs();
    let at_secs = u64::try_from(at.timestamp()).unwrap_or(0);
    if at_secs < secs(&v.not_before) || at_secs > secs(&v.not_after) {
        return Err(TsaError::Untrusted(format!(
            "`{}` was not valid at the token's time {} (valid {} to {})",
            cert.tbs_certificate.subject, at, v.not_before, v.not_after
        )));
    }
    Ok(())
}

fn verify_issued_by(cert: &Certificate, issuer: &Certificate) -> Result<(), TsaError> {
    let tbs = cert.tbs_certificate.to_der().map_err(malformed)?;
    let sig = cert
        .signature
        .as_bytes()
        .ok_or_else(|| malformed("certificate signature has unused bits"))?;
    verify_signature(
        &issuer.tbs_certificate.subject_public_key_info,
        &cert.signature_algorithm.oid,
        None,
        &tbs,
        sig,
    )
}

/// Walks from the TSA's certificate to one in the CA file, through the token's certificates,
/// each valid at the token's time and each signed by the next.
fn chain_to_ca(
    leaf: &Certificate,
    token_certs: &[&Certificate],
    ca: &[Certificate],
    at: DateTime<Utc>,
) -> Result<(), TsaError> {
    let mut current = leaf;
    for _ in 0..MAX_CHAIN {
        valid_at(current, at)?;
        if ca.iter().any(|c| c == current) {
            return Ok(());
        }
        let issuer_name = &current.tbs_certificate.issuer;
        if let Some(anchor) = ca
            .iter()
            .find(|c| &c.tbs_certificate.subject == issuer_name)
        {
            verify_issued_by(current, anchor).map_err(|e| {
                TsaError::Untrusted(format!(
                    "`{}` claims to be issued by `{}` in the CA file, but its signature does not verify with that key: {e}",
                    current.tbs_certificate.subject, anchor.tbs_certificate.subject
                ))
            })?;
            return valid_at(anchor, at);
        }
        let Some(next) = token_certs
            .iter()
            .copied()
            .find(|c| &c.tbs_certificate.subject == issuer_name && *c != current)
        else {
            return Err(TsaError::Untrusted(format!(
                "`{}` is issued by `{issuer_name}`, which is not in the CA file",
                current.tbs_certificate.subject
            )));
        };
        verify_issued_by(current, next)?;
        current = next;
    }
    Err(TsaError::Untrusted(
        "the certificate chain is too long".into(),
    ))
}
