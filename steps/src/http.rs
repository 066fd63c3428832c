//! HTTP probe steps: one request, checked against an expected status, with the evidence an
//! assessor needs written to the step's output.
//!
//! This module owns the request spec as runbooks write it ([`HttpRequest`], deserialised from
//! the step's rendered table), the typed failure ([`ProbeError`], shared with the TCP probe),
//! and what is written to the [`OutputSink`]: on stderr a `curl -v`-like transcript (request
//! line and headers with credentials redacted, redirects, TLS peer, status, latency, response
//! headers), on stdout the body, bounded. Retries and `until` are the engine's business.
//!
//! Name resolution goes through [`resolve_host`]: names under `.invalid` fail at once without a
//! DNS query (RFC 6761), so a typo'd or placeholder host never sends traffic anywhere.

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use runbook_engine::duration::format_duration;
use runbook_engine::event::Stream;
use runbook_engine::redact;
use runbook_engine::runbook::RequestKind;
use runbook_engine::runner::OutputSink;

/// Used when a step gives no `timeout`: long enough for a slow API server, short enough that a
/// black-holed address does not stall a run.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of the response body kept (and shown) when a step gives no `max_body`.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// Redirects followed before giving up (curl's and browsers' order of magnitude).
pub const MAX_REDIRECTS: usize = 10;
/// How much of the body an unexpected-status error quotes.
const BODY_START: usize = 512;
const USER_AGENT: &str = concat!("runbook/", env!("CARGO_PKG_VERSION"));

/// One HTTP request as a runbook writes it (`http = { url = "…", … }`), templates resolved.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRequest {
    /// `GET` when absent.
    #[serde(default)]
    pub method: Option<String>,
    pub url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Added to the URL's own query string.
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// A raw body; at most one of `body`, `json`, `form`.
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub json: Option<Value>,
    #[serde(default)]
    pub form: Option<BTreeMap<String, String>>,
    /// Whole request, connect to last body byte (`"10s"`); [`DEFAULT_HTTP_TIMEOUT`] if absent.
    #[serde(default)]
    pub timeout: Option<String>,
    /// `2xx` when absent.
    #[serde(default)]
    pub expect_status: Option<StatusExpect>,
    /// `true` when absent; at most [`MAX_REDIRECTS`] hops.
    #[serde(default)]
    pub follow_redirects: Option<bool>,
    /// PEM file with one or more CA certificates. When given, only these are trusted for this
    /// request: the system's roots are switched off, as with `curl --cacert`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key for `client_cert`; may be omitted when the key is in `client_cert`'s file.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    #[serde(default)]
    pub insecure_skip_verify: Option<bool>,
    #[serde(default)]
    pub basic: Option<BasicAuth>,
    #[serde(default)]
    pub bearer: Option<String>,
    /// Body bytes kept and shown; [`DEFAULT_MAX_BODY`] if absent.
    #[serde(default)]
    pub max_body: Option<usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    pub user: String,
    #[serde(default)]
    pub password: String,
}

/// `expect_status`: one grammar, the engine's, so that `runbook check` and the request agree.
pub use runbook_engine::step_kind::http::{StatusExpect, StatusItem, StatusMatcher};

/// The peer's leaf certificate as shown in evidence and to expressions (`output.tls`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsPeer {
    /// RFC 4514 form, e.g. `CN=kube-apiserver`.
    pub subject: String,
    pub issuer: String,
    /// SHA-256 of the DER certificate, lowercase hex without separators (what
    /// `openssl x509 -outform der | sha256sum` prints).
    pub sha256_fingerprint: String,
    /// RFC 3339 UTC, e.g. `2026-01-31T12:00:00Z`.
    pub not_after: String,
}

impl TlsPeer {
    /// Reads what evidence needs from a DER certificate; the fingerprint is kept even when the
    /// certificate cannot be parsed, since it alone identifies the certificate.
    pub fn from_der(der: &[u8]) -> Self {
        use x509_cert::der::Decode;
        let sha256_fingerprint = hex::encode(Sha256::digest(der));
        match x509_cert::Certificate::from_der(der) {
            Ok(cert) => {
                let tbs = &cert.tbs_certificate;
                Self {
                    subject: tbs.subject.to_string(),
                    issuer: tbs.issuer.to_string(),
                    sha256_fingerprint,
                    not_after: tbs.validity.not_after.to_date_time().to_string(),
                }
            }
            Err(e) => Self {
                subject: format!("(unparseable certificate: {e})"),
                issuer: String::new(),
                sha256_fingerprint,
                not_after: String::new(),
            },
        }
    }
}

/// What came back. `headers` are redacted; `body` holds at most `max_body` bytes (lossily
/// decoded) and is not redacted, so expressions can parse it: evidence gets the redacted copy.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
    pub body_bytes_total: u64,
    pub truncated: bool,
    /// Request start to response headers (connect and TLS included).
    pub latency: Duration,
    pub final_url: String,
    pub http_version: String,
    pub tls: Option<TlsPeer>,
}

impl HttpResponse {
    /// The step's `output` for expressions: `status`, `headers`, `body`, `json` (the body parsed,
    /// or `null` when it is not JSON or was truncated), `latency_ms`, `tls`, and the rest.
    pub fn to_json(&self) -> Value {
        let parsed = if self.truncated {
            Value::Null
        } else {
            serde_json::from_str(&self.body).unwrap_or(Value::Null)
        };
        json!({
            "status": self.status,
            "headers": self.headers,
            "body": self.body,
            "json": parsed,
            "body_bytes_total": self.body_bytes_total,
            "truncated": self.truncated,
            "latency_ms": u64::try_from(self.latency.as_millis()).unwrap_or(u64::MAX),
            "final_url": self.final_url,
            "http_version": self.http_version,
            "tls": self.tls,
        })
    }
}

/// Why a probe failed. [`ProbeError::kind`] is the stable name runbooks and evidence use.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot resolve `{host}`: {source}")]
    Dns { host: String, source: io::Error },
    #[error("connection refused by {addr}")]
    ConnectRefused { addr: String },
    #[error("timed out after {} while {phase}", format_duration(*after))]
    Timeout { after: Duration, phase: String },
    #[error("TLS failed: {reason}")]
    Tls { reason: String },
    #[error("expected status {expected}, got {got}; body starts: {body_start:?}")]
    UnexpectedStatus {
        expected: String,
        got: u16,
        body_start: String,
    },
    #[error("{reason}")]
    Config { reason: String },
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Io(String),
}

impl ProbeError {
    pub fn kind(&self) -> &'static str {
        match self {
            ProbeError::Dns { .. } => "dns",
            ProbeError::ConnectRefused { .. } => "connect_refused",
            ProbeError::Timeout { .. } => "timeout",
            ProbeError::Tls { .. } => "tls",
            ProbeError::UnexpectedStatus { .. } => "unexpected_status",
            ProbeError::Config { .. } => "config",
            ProbeError::Cancelled => "cancelled",
            ProbeError::Io(_) => "io",
        }
    }

    /// Whether another attempt may see something else: a service coming up can fix a refused
    /// connection or a 503, but not a bad certificate or a missing CA file.
    pub fn retryable(&self) -> bool {
        match self {
            ProbeError::Dns { .. }
            | ProbeError::ConnectRefused { .. }
            | ProbeError::Timeout { .. }
            | ProbeError::UnexpectedStatus { .. }
            | ProbeError::Io(_) => true,
            ProbeError::Tls { .. } | ProbeError::Config { .. } | ProbeError::Cancelled => false,
        }
    }
}

fn config(reason: impl Into<String>) -> ProbeError {
    ProbeError::Config {
        reason: reason.into(),
    }
}

/// Parses a step's `timeout`, or gives the default.
pub(crate) fn probe_timeout(text: Option<&str>, default: Duration) -> Result<Duration, ProbeError> {
    match text {
        None => Ok(default),
        // The rule `runbook check` applies to a literal `timeout`.
        Some(t) => runbook_engine::request_check::timeout(&serde_json::Value::String(t.into()))
            .map_err(config),
    }
}

/// The resolver's failure, kept typed so that it can be found again in reqwest's error chain.
#[derive(Debug, thiserror::Error)]
#[error("cannot resolve `{host}`: {source}")]
struct ResolveError {
    host: String,
    source: io::Error,
}

/// Resolves a host name to addresses (in the system resolver's order). Names under `.invalid`
/// are refused without asking anyone: RFC 6761 reserves them to never resolve, and asking the
/// system resolver would send a query to whatever DNS server the machine has.
pub async fn resolve_host(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let bare = host.trim_end_matches('.').to_ascii_lowercase();
    if bare == "invalid" || bare.ends_with(".invalid") {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "`.invalid` names never resolve (RFC 6761); no DNS query was sent",
        ));
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    if addrs.is_empty() {
        return Err(io::Error::new(io::ErrorKind::NotFound, "no addresses"));
    }
    Ok(addrs)
}

struct Resolver;

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            match resolve_host(&host, 0).await {
                Ok(addrs) => Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs),
                Err(source) => {
                    Err(Box::new(ResolveError { host, source }) as Box<dyn StdError + Send + Sync>)
                }
            }
        })
    }
}

/// Counts connections (TCP and TLS handshake) started and finished, so that a timeout can say
/// whether it struck while connecting or while the server was answering.
#[derive(Debug, Clone, Default)]
struct ConnectPhase {
    started: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
}

impl ConnectPhase {
    fn connecting(&self) -> bool {
        self.started.load(Ordering::SeqCst) > self.finished.load(Ordering::SeqCst)
    }
}

impl<S> tower_layer::Layer<S> for ConnectPhase {
    type Service = PhaseService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        PhaseService {
            inner,
            phase: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct PhaseService<S> {
    inner: S,
    phase: ConnectPhase,
}

impl<S, R> tower_service::Service<R> for PhaseService<S>
where
    S: tower_service::Service<R>,
    S::Future: Send + 'static,
    S::Response: 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        self.phase.started.fetch_add(1, Ordering::SeqCst);
        let fut = self.inner.call(req);
        let finished = self.phase.finished.clone();
        Box::pin(async move {
            let r = fut.await;
            finished.fetch_add(1, Ordering::SeqCst);
            r
        })
    }
}

/// Accepts any server certificate (`insecure_skip_verify`) but still checks the handshake
/// signatures, so the peer at least holds the key of the certificate it showed, which evidence
/// records.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn read_file(what: &str, path: &Path) -> Result<Vec<u8>, ProbeError> {
    std::fs::read(path).map_err(|e| config(format!("cannot read {what} `{}`: {e}", path.display())))
}

/// The client certificate and key as one PEM buffer (reqwest's `Identity::from_pem` form).
fn client_identity_pem(req: &HttpRequest) -> Result<Option<Vec<u8>>, ProbeError> {
    match (&req.client_cert, &req.client_key) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(config("`client_key` is set but `client_cert` is not")),
        (Some(cert), key) => {
            let mut pem = read_file("client certificate", cert)?;
            if let Some(key) = key {
                pem.push(b'\n');
                pem.extend(read_file("client key", key)?);
            }
            Ok(Some(pem))
        }
    }
}

/// A rustls config trusting any server, for `insecure_skip_verify`.
fn insecure_tls(identity_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, ProbeError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| config(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)));
    let Some(pem) = identity_pem else {
        return Ok(builder.with_no_client_auth());
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| config(format!("client certificate: {e}")))?;
    if certs.is_empty() {
        return Err(config("client certificate: no certificate in the PEM"));
    }
    let key = PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| config(format!("client key: no private key in the PEM ({e})")))?;
    builder
        .with_client_auth_cert(certs, key)
        .map_err(|e| config(format!("client certificate: {e}")))
}

/// Everything checked and built before any traffic: a config mistake fails here, once, with no
/// connection attempted.
struct Prepared {
    client: reqwest::Client,
    request: reqwest::Request,
    expect: StatusMatcher,
    timeout: Duration,
    max_body: usize,
    insecure: bool,
    redirects: Arc<Mutex<Vec<(u16, String)>>>,
    phase: ConnectPhase,
    body_note: Option<String>,
    url_password: Option<String>,
}

fn prepare(req: &HttpRequest) -> Result<Prepared, ProbeError> {
    let url = reqwest::Url::parse(&req.url)
        .map_err(|e| config(format!("`url` `{}` is not a URL: {e}", req.url)))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(config(format!(
            "`url` must be http or https, not `{}`",
            url.scheme()
        )));
    }
    let method_text = req.method.as_deref().unwrap_or("GET").to_ascii_uppercase();
    let method = reqwest::Method::from_bytes(method_text.as_bytes())
        .map_err(|_| config(format!("`method` `{method_text}` is not an HTTP method")))?;
    // One body, one of basic/bearer: the descriptor's rule, which `check` applies to the
    // runbook; applied here too for callers that come without one.
    let present: Vec<&str> = [
        ("body", req.body.is_some()),
        ("json", req.json.is_some()),
        ("form", req.form.is_some()),
        ("basic", req.basic.is_some()),
        ("bearer", req.bearer.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, on)| on.then_some(k))
    .collect();
    (RequestKind::Http.spec().combination)(&present).map_err(|c| config(c.message))?;
    if (req.basic.is_some() || req.bearer.is_some())
        && req
            .headers
            .keys()
            .any(|k| k.eq_ignore_ascii_case("authorization"))
    {
        return Err(config(
            "`headers` has `Authorization` and `basic`/`bearer` sets it too: give one",
        ));
    }
    let expect = match &req.expect_status {
        Some(e) => e.matcher().map_err(config)?,
        None => StatusMatcher::default(),
    };
    let timeout = probe_timeout(req.timeout.as_deref(), DEFAULT_HTTP_TIMEOUT)?;
    let insecure = req.insecure_skip_verify.unwrap_or(false);
    if insecure && req.ca_file.is_some() {
        return Err(config(
            "`insecure_skip_verify` and `ca_file` contradict each other: give one",
        ));
    }
    let identity_pem = client_identity_pem(req)?;

    let redirects: Arc<Mutex<Vec<(u16, String)>>> = Arc::default();
    let policy = if req.follow_redirects.unwrap_or(true) {
        let hops = redirects.clone();
        reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            if let Ok(mut h) = hops.lock() {
                h.push((attempt.status().as_u16(), attempt.url().to_string()));
            }
            attempt.follow()
        })
    } else {
        reqwest::redirect::Policy::none()
    };
    let phase = ConnectPhase::default();
    let mut builder = reqwest::Client::builder()
        .redirect(policy)
        // A probe tests the path from here to the server; an environment proxy would test
        // something else and could send loopback probes off the machine.
        .no_proxy()
        .tls_info(true)
        .dns_resolver(Arc::new(Resolver))
        .connector_layer(phase.clone());
    if insecure {
        builder = builder.use_preconfigured_tls(insecure_tls(identity_pem.as_deref())?);
    } else {
        if let Some(path) = &req.ca_file {
            let pem = read_file("CA file", path)?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| config(format!("CA file `{}` is not PEM: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(config(format!(
                    "CA file `{}` holds no certificate",
                    path.display()
                )));
            }
            // A private CA is trusted instead of the system roots, not as well: the step names
            // who may answer, and a public CA should not be able to stand in for it.
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let Some(pem) = &identity_pem {
            let identity = reqwest::Identity::from_pem(pem).map_err(|e| {
                config(format!(
                    "client certificate/key cannot be used: {}",
                    chain(&e)
                ))
            })?;
            builder = builder.identity(identity);
        }
    }
    let client = builder
        .build()
        .map_err(|e| config(format!("HTTP client setup: {}", chain(&e))))?;

    // Credentials in the URL go into the evidence redacted like any other.
    let url_password = url.password().map(str::to_owned);
    let mut rb = client
        .request(method, url)
        // Set on the request rather than the client so that the transcript shows them.
        .header(reqwest::header::USER_AGENT, USER_AGENT)
        .header(reqwest::header::ACCEPT, "*/*");
    if !req.query.is_empty() {
        rb = rb.query(&req.query);
    }
    for (name, value) in &req.headers {
        let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| config(format!("header name `{name}` is not valid")))?;
        let value = reqwest::header::HeaderValue::from_str(value)
            .map_err(|_| config(format!("header `{name}` has a value that is not valid")))?;
        rb = rb.header(name, value);
    }
    if let Some(b) = &req.basic {
        rb = rb.basic_auth(&b.user, Some(&b.password));
    }
    if let Some(token) = &req.bearer {
        rb = rb.bearer_auth(token);
    }
    let mut body_note = None;
    if let Some(body) = &req.body {
        body_note = Some(format!("body, {} bytes", body.len()));
        rb = rb.body(body.clone());
    } else if let Some(value) = &req.json {
        body_note = Some(format!("json body, {} bytes", value.to_string().len()));
        rb = rb.json(value);
    } else if let Some(form) = &req.form {
        body_note = Some(format!("form body, {} fields", form.len()));
        rb = rb.form(form);
    }
    let request = rb
        .build()
        .map_err(|e| config(format!("cannot build the request: {}", chain(&e))))?;
    Ok(Prepared {
        client,
        request,
        expect,
        timeout,
        max_body: req.max_body.unwrap_or(DEFAULT_MAX_BODY),
        insecure,
        redirects,
        phase,
        body_note,
        url_password,
    })
}

/// Sends the request, reads the response, checks its status, and writes the evidence to `out`.
///
/// `secrets` are values to keep out of the output (besides `bearer` and the basic password,
/// which are always kept out): a header or URL containing one shows `<redacted>`.
pub async fn execute(
    req: &HttpRequest,
    secrets: &[String],
    out: &mut OutputSink,
    cancel: &CancellationToken,
) -> Result<HttpResponse, ProbeError> {
    let mut secrets: Vec<String> = secrets.iter().filter(|s| !s.is_empty()).cloned().collect();
    secrets.extend(req.bearer.iter().cloned());
    secrets.extend(req.basic.iter().map(|b| b.password.clone()));
    secrets.retain(|s| !s.is_empty());
    let mut redactor = Redactor::new(secrets);
    let result = run(req, &mut redactor, out, cancel).await;
    if let Err(e) = &result {
        let line = format!("! {}: {}\n", e.kind(), redactor.text(&e.to_string()));
        out.write(Stream::Stderr, Bytes::from(line)).await;
    }
    result
}

/// The credentials this request holds, kept out of its transcript with the engine's matcher.
struct Redactor {
    values: Vec<String>,
    matcher: redact::ByteRedactor,
}

impl Redactor {
    fn new(values: Vec<String>) -> Self {
        let matcher = redact::ByteRedactor::unnamed(&values);
        Self { values, matcher }
    }

    fn add(&mut self, secret: &str) {
        if !secret.is_empty() && !self.values.iter().any(|s| s == secret) {
            self.values.push(secret.to_owned());
            self.matcher = redact::ByteRedactor::unnamed(&self.values);
        }
    }

    fn text(&self, text: &str) -> String {
        self.matcher.redact_str(text)
    }

    fn header(&self, name: &str, value: &str) -> String {
        let shown = self.text(value);
        if redact::is_credential_header(name) || shown != value {
            redact::UNNAMED_PLACEHOLDER.to_owned()
        } else {
            shown
        }
    }
}

async fn run(
    req: &HttpRequest,
    redactor: &mut Redactor,
    out: &mut OutputSink,
    cancel: &CancellationToken,
) -> Result<HttpResponse, ProbeError> {
    let p = prepare(req)?;
    // Credentials as sent (`Basic <base64>` says the password to anyone who decodes it): a
    // server echoing them back must not put them in the evidence either.
    let sent: Vec<(String, String)> = p
        .request
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    for secret in redact::request_credentials(
        p.url_password.as_deref(),
        sent.iter().map(|(n, v)| (n.as_str(), v.as_str())),
    ) {
        redactor.add(&secret);
    }
    let mut transcript = String::new();
    if p.insecure {
        transcript.push_str(
            "!!! WARNING: insecure_skip_verify is on: the server's certificate is NOT verified; \
             anyone on the network path could be answering !!!\n",
        );
    }
    let url = p.request.url().clone();
    transcript.push_str(&format!(
        "> {} {}\n",
        p.request.method(),
        redactor.text(url.as_str())
    ));
    for (name, value) in p.request.headers() {
        let value = String::from_utf8_lossy(value.as_bytes());
        transcript.push_str(&format!(
            "> {name}: {}\n",
            redactor.header(name.as_str(), &value)
        ));
    }
    if let Some(note) = &p.body_note {
        transcript.push_str(&format!("> ({note})\n"));
    }
    out.write(Stream::Stderr, Bytes::from(transcript)).await;
    if cancel.is_cancelled() {
        return Err(ProbeError::Cancelled);
    }

    let started = Instant::now();
    let deadline = started + p.timeout;
    let timeout_err = |phase: &str| ProbeError::Timeout {
        after: p.timeout,
        phase: phase.to_owned(),
    };
    let sent = tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(ProbeError::Cancelled),
        r = tokio::time::timeout_at(deadline, p.client.execute(p.request)) => r,
    };
    let mut resp = match sent {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => return Err(classify(&e, &url, p.timeout)),
        Err(_) if p.phase.connecting() => {
            return Err(timeout_err("connecting (TCP and TLS handshake)"))
        }
        Err(_) => return Err(timeout_err("waiting for the response headers")),
    };
    let latency = started.elapsed();

    let status = resp.status();
    let tls = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .map(TlsPeer::from_der);
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in resp.headers() {
        let value = redactor.header(name.as_str(), &String::from_utf8_lossy(value.as_bytes()));
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    let http_version = format!("{:?}", resp.version());
    let final_url = resp.url().to_string();

    let mut transcript = String::new();
    if let Ok(hops) = p.redirects.lock() {
        for (code, to) in hops.iter() {
            transcript.push_str(&format!("* redirect {code} -> {}\n", redactor.text(to)));
        }
    }
    if let Some(peer) = &tls {
        transcript.push_str(&format!(
            "* tls peer: subject `{}`, issuer `{}`, sha256 {}, not after {}\n",
            peer.subject, peer.issuer, peer.sha256_fingerprint, peer.not_after
        ));
    }
    transcript.push_str(&format!(
        "< {http_version} {status} ({})\n",
        format_duration(latency)
    ));
    for (name, value) in &headers {
        transcript.push_str(&format!("< {name}: {value}\n"));
    }
    out.write(Stream::Stderr, Bytes::from(transcript)).await;

    // Read the whole body within the deadline (so the total is honest) but keep only max_body.
    let mut kept: Vec<u8> = Vec::new();
    let mut total: u64 = 0;
    loop {
        let chunk = tokio::select! {
            biased;
            () = cancel.cancelled() => return Err(ProbeError::Cancelled),
            r = tokio::time::timeout_at(deadline, resp.chunk()) => r,
        };
        match chunk {
            Ok(Ok(Some(data))) => {
                total += data.len() as u64;
                let room = p.max_body.saturating_sub(kept.len());
                kept.extend_from_slice(&data[..room.min(data.len())]);
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => return Err(classify(&e, &url, p.timeout)),
            Err(_) => return Err(timeout_err("reading the response body")),
        }
    }
    let truncated = total > kept.len() as u64;
    let body = String::from_utf8_lossy(&kept).into_owned();
    if !body.is_empty() {
        out.write(Stream::Stdout, Bytes::from(redactor.text(&body)))
            .await;
    }
    let mut tail = format!("* body: {total} bytes");
    if truncated {
        tail.push_str(&format!(
            " (truncated: showing and keeping the first {} bytes; raise `max_body` for more)",
            kept.len()
        ));
    }
    tail.push('\n');
    out.write(Stream::Stderr, Bytes::from(tail)).await;

    let code = status.as_u16();
    if !p.expect.matches(code) {
        let start: String = body.chars().take(BODY_START).collect();
        return Err(ProbeError::UnexpectedStatus {
            expected: p.expect.to_string(),
            got: code,
            body_start: redactor.text(&start),
        });
    }
    Ok(HttpResponse {
        status: code,
        headers,
        body,
        body_bytes_total: total,
        truncated,
        latency,
        final_url,
        http_version,
        tls,
    })
}

/// The messages of an error and its sources, joined, without the repeats that wrapped errors
/// tend to produce.
fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// Errors in a chain, looking inside `io::Error`s: their `source()` skips the error they wrap
/// (where rustls and resolver errors sit, sometimes under another `io::Error`), so follow
/// `get_ref()` instead.
fn chain_errors<'a>(e: &'a (dyn StdError + 'static)) -> Vec<&'a (dyn StdError + 'static)> {
    let mut all = Vec::new();
    let mut cur: Option<&'a (dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        all.push(err);
        cur = match err.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => err.source(),
        };
    }
    all
}

/// Turns reqwest's error into what happened: DNS, refused, TLS (and why), timeout, or I/O.
fn classify(e: &reqwest::Error, url: &reqwest::Url, timeout: Duration) -> ProbeError {
    let errors = chain_errors(e);
    for err in &errors {
        if let Some(r) = err.downcast_ref::<ResolveError>() {
            return ProbeError::Dns {
                host: r.host.clone(),
                source: io::Error::new(r.source.kind(), r.source.to_string()),
            };
        }
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return ProbeError::Tls {
                reason: describe_tls(t),
            };
        }
    }
    for err in &errors {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::ConnectionRefused => {
                    let host = url.host_str().unwrap_or_default();
                    let port = url.port_or_known_default().unwrap_or_default();
                    return ProbeError::ConnectRefused {
                        addr: format!("{host}:{port}"),
                    };
                }
                io::ErrorKind::TimedOut => {
                    return ProbeError::Timeout {
                        after: timeout,
                        phase: "connecting (the system gave up)".into(),
                    }
                }
                _ => {}
            }
        }
    }
    if e.is_timeout() {
        return ProbeError::Timeout {
            after: timeout,
            phase: "waiting for the server".into(),
        };
    }
    ProbeError::Io(chain(e))
}

/// Why a TLS handshake failed, in words an operator can act on, with rustls's own text after.
fn describe_tls(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C};
    let why = match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "unknown issuer: the server's certificate is not signed by a trusted CA (set `ca_file` to the CA that issued it)".to_owned(),
            C::NotValidForName => "hostname mismatch: the server's certificate is not valid for the host in the URL".to_owned(),
            C::NotValidForNameContext { expected, presented } => format!(
                "hostname mismatch: the server's certificate is not valid for `{}` (it names {})",
                expected.to_str(),
                if presented.is_empty() { "nothing".to_owned() } else { presented.join(", ") }
            ),
            C::ExpiredContext { not_after, .. } => format!("expired: the server's certificate was valid until {}", unix_date(*not_after)),
            C::Expired => "expired: the server's certificate is past its not-after date".to_owned(),
            C::NotValidYetContext { not_before, .. } => format!("not yet valid: the server's certificate starts at {} (check both clocks)", unix_date(*not_before)),
            C::NotValidYet => "not yet valid: the server's certificate starts in the future (check both clocks)".to_owned(),
            C::Revoked => "revoked: the server's certificate has been revoked".to_owned(),
            C::BadSignature => "bad signature on the server's certificate".to_owned(),
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => "the server's certificate is not meant for TLS servers (extended key usage)".to_owned(),
            _ => "the server's certificate was rejected".to_owned(),
        },
        rustls::Error::AlertReceived(alert) => match alert {
            A::CertificateRequired => "the server requires a client certificate (set `client_cert` and `client_key`)".to_owned(),
            A::BadCertificate | A::UnknownCA | A::CertificateUnknown | A::DecryptError => "the server rejected our client certificate".to_owned(),
            A::HandshakeFailure => "the server ended the handshake (no common protocol or cipher, or a client certificate is required)".to_owned(),
            _ => format!("the server sent alert {alert:?}"),
        },
        rustls::Error::NoCertificatesPresented => "the server presented no certificate".to_owned(),
        _ => "handshake failed".to_owned(),
    };
    format!("{why} ({e})")
}

fn unix_date(t: rustls::pki_types::UnixTime) -> String {
    i64::try_from(t.as_secs())
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map_or_else(
            || format!("{} (UNIX)", t.as_secs()),
            |d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
}

/// The `http` step kind's runner: the rendered settings, then the request.
pub(crate) async fn run_attempt(
    ctx: &runbook_engine::runner::AttemptContext,
    out: &mut OutputSink,
) -> runbook_engine::event::AttemptOutcome {
    use crate::dispatch::{details, failed, probe_failure, under};
    use runbook_engine::event::{AttemptOutcome, FailureKind};
    let mut req: HttpRequest = match serde_json::from_value(ctx.spec.clone()) {
        Ok(r) => r,
        Err(e) => return failed(FailureKind::Config, format!("http: {e}")),
    };
    under(&ctx.base_dir, &mut req.ca_file);
    under(&ctx.base_dir, &mut req.client_cert);
    under(&ctx.base_dir, &mut req.client_key);
    match execute(&req, &ctx.secrets, out, &ctx.cancel).await {
        Ok(resp) => {
            details(out, resp.to_json());
            AttemptOutcome::Exited { code: 0 }
        }
        Err(e) => probe_failure(&e),
    }
}
