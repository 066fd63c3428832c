//! Screenshot steps: load a web page in a real headless Chromium and save what it shows as a PNG.
//!
//! This module owns the browser's whole life for one capture: finding it, starting it in its
//! own process group with a fresh profile, driving it over the DevTools protocol (a small
//! client over a WebSocket to 127.0.0.1, see docs/screenshots.md for why not the
//! `--screenshot` command line), and stopping every process it started — on success, error,
//! timeout, cancel, or when the future is dropped. It knows nothing of steps, retries or
//! bundles: the caller gives it a request, a destination and an output sink.
//!
//! Secrets: header values go to the browser only. Request headers are added by intercepting
//! requests (the `Fetch` domain) and only to requests for the target URL's origin, so a
//! Grafana token is not sent to an avatar CDN the page loads. Every line written to the sink,
//! every error message and the returned [`ScreenshotInfo`] have the caller's secrets (and the
//! values of credential-like headers) replaced by `<redacted>`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tokio::time::{sleep, timeout_at, Instant};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use runbook_engine::event::Stream;
use runbook_engine::runner::OutputSink;

pub const DEFAULT_WIDTH: u32 = 1280;
pub const DEFAULT_HEIGHT: u32 = 800;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Environment variable naming the browser executable, checked before `PATH`.
pub const BROWSER_ENV: &str = "RUNBOOK_CHROMIUM";
/// Executables looked for on `PATH`, in order.
pub const BROWSER_NAMES: &[&str] = &[
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
];
/// Full-page captures are cut at this height: Chromium fails or produces garbage on taller
/// surfaces, and an endless-scroll page would otherwise never end.
pub const MAX_FULL_PAGE_HEIGHT: u32 = 16_384;
/// How often `wait_for` looks for its selector.
const SELECTOR_POLL: Duration = Duration::from_millis(100);
/// Longest a single DevTools message may be: a full-page PNG in base64.
const MAX_MESSAGE: usize = 256 << 20;
/// How long teardown waits for the browser's processes to disappear after KILL.
const REAP_WAIT: Duration = Duration::from_secs(3);

/// A `screenshot` step's table, templates already rendered.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScreenshotRequest {
    pub url: String,
    /// Viewport width in CSS pixels (default 1280).
    pub width: Option<u32>,
    /// Viewport height in CSS pixels (default 800).
    pub height: Option<u32>,
    /// A CSS selector to wait for, or a fixed delay such as `2s`.
    pub wait_for: Option<String>,
    /// Capture the whole scrollable page instead of the viewport.
    pub full_page: Option<bool>,
    /// Sent with every request to the URL's origin (scheme, host, port), and to no other.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// PEM certificates whose public keys are accepted when the server's chain does not verify.
    pub ca_file: Option<PathBuf>,
    pub insecure_skip_verify: Option<bool>,
    /// The budget for the whole capture, browser start included (humantime, default 30s).
    pub timeout: Option<String>,
    /// The browser executable; else `RUNBOOK_CHROMIUM`, else `PATH`.
    pub browser: Option<PathBuf>,
}

// Hand-written so that header values never reach a log line through `{:?}`.
impl fmt::Debug for ScreenshotRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScreenshotRequest")
            .field("url", &self.url)
            .field("width", &self.width)
            .field("height", &self.height)
            .field("wait_for", &self.wait_for)
            .field("full_page", &self.full_page)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("ca_file", &self.ca_file)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .field("timeout", &self.timeout)
            .field("browser", &self.browser)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Viewport {
    pub width: u32,
    pub height: u32,
}

/// What was captured: written next to the PNG as `<png>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScreenshotInfo {
    /// The requested URL, secrets redacted.
    pub url: String,
    /// Where the page ended up after redirects, secrets redacted.
    pub final_url: String,
    /// The status of the main document's response; none for `data:` or `about:` pages.
    pub http_status: Option<u16>,
    /// The PNG's real dimensions.
    pub width: u32,
    pub height: u32,
    pub viewport: Viewport,
    pub full_page: bool,
    /// When the image was taken (RFC 3339, UTC).
    pub captured_at: String,
    pub sha256: String,
    pub bytes: u64,
    pub browser_version: String,
    /// The selector or delay that was waited for.
    pub waited_for: Option<String>,
    /// Certificate verification was switched off for this capture.
    pub insecure_skip_verify: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ScreenshotError {
    #[error(
        "no Chromium found (looked for {searched}); install it (Debian: `apt-get install chromium`) \
         or set `browser` in the step or `RUNBOOK_CHROMIUM`"
    )]
    BrowserMissing { searched: String },
    #[error("cannot start the browser `{path}`: {message}")]
    BrowserStart { path: PathBuf, message: String },
    #[error("invalid screenshot step: {0}")]
    Invalid(String),
    #[error("cannot load `{url}`: {message}")]
    Navigation { url: String, message: String },
    /// The page loaded but its server answered with an error; the PNG was still written.
    #[error("`{url}` answered HTTP {status}")]
    HttpStatus {
        url: String,
        status: u16,
        info: Box<ScreenshotInfo>,
    },
    #[error("`{selector}` did not appear on `{url}` within {}", humantime::format_duration(*after))]
    WaitTimeout {
        selector: String,
        url: String,
        after: Duration,
    },
    #[error("the screenshot did not finish within {}", humantime::format_duration(*after))]
    Timeout { after: Duration },
    #[error("TLS error loading `{url}`: {message}")]
    Tls { url: String, message: String },
    #[error("cancelled")]
    Cancelled,
    #[error("`{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("DevTools protocol: {0}")]
    Protocol(String),
}

impl ScreenshotError {
    /// A stable name for the journal and `until` expressions.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BrowserMissing { .. } => "browser_missing",
            Self::BrowserStart { .. } => "browser_start",
            Self::Invalid(_) => "invalid",
            Self::Navigation { .. } => "navigation",
            Self::HttpStatus { .. } => "http_status",
            Self::WaitTimeout { .. } => "wait_timeout",
            Self::Timeout { .. } => "timeout",
            Self::Tls { .. } => "tls",
            Self::Cancelled => "cancelled",
            Self::Io { .. } => "io",
            Self::Protocol(_) => "protocol",
        }
    }

    /// Whether trying again later may help: a dashboard still coming up after a restore does,
    /// a missing browser, a bad certificate or a bad step does not.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Navigation { .. }
            | Self::WaitTimeout { .. }
            | Self::Timeout { .. }
            | Self::BrowserStart { .. }
            | Self::Protocol(_) => true,
            Self::HttpStatus { status, .. } => *status >= 500 || matches!(status, 408 | 429),
            Self::BrowserMissing { .. }
            | Self::Invalid(_)
            | Self::Tls { .. }
            | Self::Cancelled
            | Self::Io { .. } => false,
        }
    }
}

/// The browser to use: `configured` (must exist), else `RUNBOOK_CHROMIUM`, else the first of
/// [`BROWSER_NAMES`] on `PATH`.
pub fn find_browser(configured: Option<&Path>) -> Result<PathBuf, ScreenshotError> {
    if let Some(path) = configured {
        return resolve_executable(path).ok_or_else(|| ScreenshotError::BrowserMissing {
            searched: format!("`{}`", path.display()),
        });
    }
    if let Some(env) = std::env::var_os(BROWSER_ENV).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(env);
        return resolve_executable(&path).ok_or_else(|| ScreenshotError::BrowserMissing {
            searched: format!("`{}` from {BROWSER_ENV}", path.display()),
        });
    }
    let dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for name in BROWSER_NAMES {
        for dir in &dirs {
            let candidate = dir.join(name);
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    Err(ScreenshotError::BrowserMissing {
        searched: format!(
            "{} on PATH",
            BROWSER_NAMES
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

/// A path with a slash is taken as is; a bare name is looked up on `PATH`.
fn resolve_executable(path: &Path) -> Option<PathBuf> {
    if path.components().count() > 1 || path.is_absolute() {
        return is_executable(path).then(|| path.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(path))
            .find(|c| is_executable(c))
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Replaces every secret in `s` by `<redacted>` (the engine's matcher: the longest match wins,
/// so a secret containing another is replaced whole).
pub fn redact(s: &str, secrets: &[String]) -> String {
    runbook_engine::redact::ByteRedactor::unnamed(secrets).redact_str(s)
}

/// Base64 SHA-256 of the SubjectPublicKeyInfo of every certificate in a PEM file, the form
/// Chromium's `--ignore-certificate-errors-spki-list` takes.
pub fn spki_hashes(pem: &str) -> Result<Vec<String>, String> {
    use x509_cert::der::{DecodePem as _, Encode as _};
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut hashes = Vec::new();
    // Block by block, so that text between certificates (the `# name` lines of EL's
    // ca-bundle.crt, openssl's `subject=`) is allowed, as Chromium and curl allow it.
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            return Err("a certificate has no END line".into());
        };
        let block = &rest[start..start + len + END.len()];
        let cert = x509_cert::Certificate::from_pem(block)
            .map_err(|e| format!("a certificate is not valid X.509: {e}"))?;
        let spki = cert
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .map_err(|e| format!("a certificate's public key does not encode: {e}"))?;
        hashes.push(b64.encode(Sha256::digest(spki)));
        rest = &rest[start + len + END.len()..];
    }
    if hashes.is_empty() {
        return Err("no `BEGIN CERTIFICATE` block".into());
    }
    Ok(hashes)
}

/// Width and height from a PNG's IHDR chunk.
pub fn png_dimensions(png: &[u8]) -> Option<(u32, u32)> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    if png.len() < 24 || !png.starts_with(SIGNATURE) || &png[12..16] != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes(png[16..20].try_into().ok()?);
    let h = u32::from_be_bytes(png[20..24].try_into().ok()?);
    Some((w, h))
}

/// What `wait_for` asks for.
#[derive(Debug, Clone, PartialEq)]
enum WaitFor {
    Nothing,
    Delay(Duration),
    Selector(String),
}

fn parse_wait_for(v: Option<&str>) -> WaitFor {
    match v.map(str::trim) {
        None | Some("") => WaitFor::Nothing,
        // A CSS selector cannot start with a digit, so `2s` is never a selector.
        Some(s) => humantime::parse_duration(s)
            .map_or_else(|_| WaitFor::Selector(s.to_owned()), WaitFor::Delay),
    }
}

/// Everything checked before a browser is started.
struct Checked {
    browser: PathBuf,
    viewport: Viewport,
    full_page: bool,
    wait_for: WaitFor,
    timeout: Duration,
    origin: url::Origin,
    spki: Vec<String>,
    insecure: bool,
    secrets: Vec<String>,
}

fn check(req: &ScreenshotRequest, secrets: &[String]) -> Result<Checked, ScreenshotError> {
    let mut all_secrets: Vec<String> = secrets.iter().filter(|s| !s.is_empty()).cloned().collect();
    let url_password = url::Url::parse(&req.url)
        .ok()
        .and_then(|u| u.password().map(str::to_owned));
    for secret in runbook_engine::redact::request_credentials(
        url_password.as_deref(),
        req.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    ) {
        if !all_secrets.contains(&secret) {
            all_secrets.push(secret);
        }
    }
    let parsed = url::Url::parse(&req.url).map_err(|e| {
        ScreenshotError::Invalid(format!(
            "`url` `{}` is not a URL: {e}",
            redact(&req.url, &all_secrets)
        ))
    })?;
    if !matches!(
        parsed.scheme(),
        "http" | "https" | "file" | "data" | "about"
    ) {
        return Err(ScreenshotError::Invalid(format!(
            "`url` scheme `{}` is not supported (http, https, file, data, about)",
            parsed.scheme()
        )));
    }
    for (name, value) in &req.headers {
        let bad = |c: char| c == '\r' || c == '\n' || c == '\0';
        if name.is_empty() || name.contains(|c: char| c == ':' || c.is_whitespace() || bad(c)) {
            return Err(ScreenshotError::Invalid(format!(
                "header name `{name}` is not valid"
            )));
        }
        if value.contains(bad) {
            return Err(ScreenshotError::Invalid(format!(
                "the value of header `{name}` contains a line break"
            )));
        }
    }
    let timeout = match req.timeout.as_deref() {
        None => DEFAULT_TIMEOUT,
        Some(t) => humantime::parse_duration(t).map_err(|e| {
            ScreenshotError::Invalid(format!("`timeout` `{t}` is not a duration: {e}"))
        })?,
    };
    let size = |v: Option<u32>, default: u32, name: &str| match v.unwrap_or(default) {
        n @ 1..=16_384 => Ok(n),
        n => Err(ScreenshotError::Invalid(format!(
            "`{name}` {n} is outside 1..=16384"
        ))),
    };
    let viewport = Viewport {
        width: size(req.width, DEFAULT_WIDTH, "width")?,
        height: size(req.height, DEFAULT_HEIGHT, "height")?,
    };
    let spki = match &req.ca_file {
        None => Vec::new(),
        Some(path) => {
            let pem = std::fs::read_to_string(path).map_err(|source| ScreenshotError::Io {
                path: path.clone(),
                source,
            })?;
            spki_hashes(&pem).map_err(|e| {
                ScreenshotError::Invalid(format!("`ca_file` `{}`: {e}", path.display()))
            })?
        }
    };
    let browser = find_browser(req.browser.as_deref())?;
    Ok(Checked {
        browser,
        viewport,
        full_page: req.full_page.unwrap_or(false),
        wait_for: parse_wait_for(req.wait_for.as_deref()),
        timeout,
        origin: parsed.origin(),
        spki,
        insecure: req.insecure_skip_verify.unwrap_or(false),
        secrets: all_secrets,
    })
}

/// Loads `req.url` in a fresh headless Chromium and writes the PNG to `dest` (its directory is
/// created) and its [`ScreenshotInfo`] to [`sidecar_path`]`(dest)` — also when the server
/// answered an error status ([`ScreenshotError::HttpStatus`]), since that page is evidence too. Progress goes to `out` on stderr, secrets redacted. Every browser process is gone
/// when this returns, whatever the outcome, and also when the future is dropped.
pub async fn capture(
    req: &ScreenshotRequest,
    secrets: &[String],
    dest: &Path,
    out: &mut OutputSink,
    cancel: &CancellationToken,
) -> Result<ScreenshotInfo, ScreenshotError> {
    let checked = check(req, secrets)?;
    let deadline = Instant::now() + checked.timeout;
    let mut log = Log {
        out,
        secrets: &checked.secrets,
    };
    if checked.insecure {
        log.line("WARNING: TLS certificate verification is OFF for this capture (insecure_skip_verify = true): anyone on the path can impersonate the server").await;
    }
    if !checked.spki.is_empty() {
        log.line(&format!(
            "accepting {} public key(s) from ca_file when the server's chain does not verify (the server must send that certificate in its chain)",
            checked.spki.len()
        ))
        .await;
    }
    let mut browser = Browser::start(&checked, deadline).await?;
    log.line(&format!(
        "browser {} (pid {}, profile {})",
        checked.browser.display(),
        browser.pgid,
        browser.profile.path().display()
    ))
    .await;
    let result = tokio::select! {
        r = session(req, &checked, &mut browser, dest, &mut log, deadline) => r,
        () = cancel.cancelled() => Err(ScreenshotError::Cancelled),
    };
    browser.shutdown().await;
    match &result {
        Ok(info) => {
            log.line(&format!(
                "saved {} ({}x{}, {} bytes, sha256 {})",
                dest.display(),
                info.width,
                info.height,
                info.bytes,
                info.sha256
            ))
            .await;
        }
        Err(e) => log.line(&format!("failed: {e}")).await,
    }
    result.map_err(|e| redact_error(e, &checked.secrets))
}

/// Progress lines on the step's stderr, always redacted.
struct Log<'a> {
    out: &'a mut OutputSink,
    secrets: &'a [String],
}

impl Log<'_> {
    async fn line(&mut self, text: &str) {
        let line = format!("[screenshot] {}\n", redact(text, self.secrets));
        self.out.write(Stream::Stderr, Bytes::from(line)).await;
    }
}

fn redact_error(e: ScreenshotError, secrets: &[String]) -> ScreenshotError {
    let r = |s: String| redact(&s, secrets);
    match e {
        ScreenshotError::Navigation { url, message } => ScreenshotError::Navigation {
            url: r(url),
            message: r(message),
        },
        ScreenshotError::Tls { url, message } => ScreenshotError::Tls {
            url: r(url),
            message: r(message),
        },
        ScreenshotError::WaitTimeout {
            selector,
            url,
            after,
        } => ScreenshotError::WaitTimeout {
            selector: r(selector),
            url: r(url),
            after,
        },
        ScreenshotError::BrowserStart { path, message } => ScreenshotError::BrowserStart {
            path,
            message: r(message),
        },
        ScreenshotError::Protocol(m) => ScreenshotError::Protocol(r(m)),
        ScreenshotError::Invalid(m) => ScreenshotError::Invalid(r(m)),
        other => other,
    }
}

/// One capture over an open DevTools connection.
async fn session(
    req: &ScreenshotRequest,
    c: &Checked,
    browser: &mut Browser,
    dest: &Path,
    log: &mut Log<'_>,
    deadline: Instant,
) -> Result<ScreenshotInfo, ScreenshotError> {
    let timeout = ScreenshotError::Timeout { after: c.timeout };
    let mut cdp = Cdp::connect(browser.port, &browser.ws_path, deadline, c.timeout).await?;
    let version = cdp.call("Browser.getVersion", json!({})).await?;
    let browser_version = version["product"].as_str().unwrap_or("unknown").to_owned();
    let target = cdp
        .call("Target.createTarget", json!({ "url": "about:blank" }))
        .await?;
    let target_id = str_field(&target, "targetId")?;
    let attached = cdp
        .call(
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        )
        .await?;
    cdp.session = Some(str_field(&attached, "sessionId")?);
    cdp.page.main_frame = target_id;
    cdp.call("Page.enable", json!({})).await?;
    cdp.call("Page.setLifecycleEventsEnabled", json!({ "enabled": true }))
        .await?;
    cdp.call("Network.enable", json!({})).await?;
    cdp.call("Runtime.enable", json!({})).await?;
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        json!({ "width": c.viewport.width, "height": c.viewport.height,
                "deviceScaleFactor": 1, "mobile": false }),
    )
    .await?;
    if !req.headers.is_empty() {
        cdp.extra_headers = req.headers.clone();
        cdp.origin = Some(c.origin.clone());
        cdp.call(
            "Fetch.enable",
            json!({ "patterns": [{ "urlPattern": "*", "requestStage": "Request" }] }),
        )
        .await?;
    }

    let shown_url = redact(&req.url, &c.secrets);
    log.line(&format!("loading {shown_url}")).await;
    let nav = cdp.call("Page.navigate", json!({ "url": req.url })).await?;
    let loader = nav["loaderId"].as_str().map(str::to_owned);
    if let Some(error) = nav["errorText"].as_str() {
        // An error status with an empty body is reported as a navigation error; the status
        // is still known and more useful than Chromium's words.
        let http_error = error.contains("ERR_HTTP_RESPONSE_CODE_FAILURE");
        if !http_error {
            let kind = if error.contains("ERR_CERT_")
                || error.contains("ERR_SSL_")
                || error.contains("ERR_BAD_SSL")
            {
                ScreenshotError::Tls {
                    url: req.url.clone(),
                    message: error.to_owned(),
                }
            } else {
                ScreenshotError::Navigation {
                    url: req.url.clone(),
                    message: error.to_owned(),
                }
            };
            return Err(kind);
        }
    }
    // Same-document navigations (a `#fragment` change) have no loader and no load event.
    if let Some(loader) = &loader {
        let l = loader.clone();
        cdp.wait_until(|p| p.lifecycle.contains(&(l.clone(), "load".to_owned())))
            .await
            .map_err(|e| match e {
                ScreenshotError::Timeout { .. } => ScreenshotError::Navigation {
                    url: req.url.clone(),
                    message: format!(
                        "the page did not finish loading within {}",
                        humantime::format_duration(c.timeout)
                    ),
                },
                other => other,
            })?;
    }
    let status = loader
        .as_ref()
        .and_then(|l| cdp.page.documents.get(l).map(|d| d.0));
    if let Some(s) = status {
        log.line(&format!("HTTP {s}")).await;
    }

    match &c.wait_for {
        WaitFor::Nothing => {}
        WaitFor::Delay(d) => {
            log.line(&format!("waiting {}", humantime::format_duration(*d)))
                .await;
            if Instant::now() + *d > deadline {
                return Err(timeout);
            }
            cdp.idle(*d).await?;
        }
        WaitFor::Selector(sel) => {
            log.line(&format!("waiting for `{sel}`")).await;
            let expression = format!(
                "document.querySelector({}) !== null",
                serde_json::to_string(sel).map_err(|e| ScreenshotError::Protocol(e.to_string()))?
            );
            let waited = wait_for_selector(&mut cdp, &expression, sel, deadline).await;
            match waited {
                // The deadline passed while looking: that is the selector's fault, not the
                // browser's, whichever read noticed first.
                Err(ScreenshotError::Timeout { .. }) | Ok(false) => {
                    return Err(ScreenshotError::WaitTimeout {
                        selector: sel.clone(),
                        url: req.url.clone(),
                        after: c.timeout,
                    })
                }
                Err(e) => return Err(e),
                Ok(true) => {}
            }
        }
    }
    // Two animation frames: whatever the page changed last is painted before the capture.
    cdp.call(
        "Runtime.evaluate",
        json!({ "expression": "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))",
                "awaitPromise": true }),
    )
    .await?;
    let href = cdp
        .call(
            "Runtime.evaluate",
            json!({ "expression": "location.href", "returnByValue": true }),
        )
        .await?;
    let final_url = href["result"]["value"]
        .as_str()
        .map_or_else(|| req.url.clone(), str::to_owned);
    if final_url != req.url {
        log.line(&format!("final URL {final_url}")).await;
    }

    let mut params = json!({ "format": "png", "fromSurface": true });
    if c.full_page {
        let metrics = cdp.call("Page.getLayoutMetrics", json!({})).await?;
        let size = &metrics["cssContentSize"];
        let w = size["width"].as_f64().unwrap_or(0.0).ceil();
        let h = size["height"].as_f64().unwrap_or(0.0).ceil();
        let width = w.max(f64::from(c.viewport.width));
        let height = h
            .max(f64::from(c.viewport.height))
            .min(f64::from(MAX_FULL_PAGE_HEIGHT));
        if h > f64::from(MAX_FULL_PAGE_HEIGHT) {
            log.line(&format!(
                "page is {h} px tall: cut at {MAX_FULL_PAGE_HEIGHT}"
            ))
            .await;
        }
        params["captureBeyondViewport"] = json!(true);
        params["clip"] = json!({ "x": 0, "y": 0, "width": width, "height": height, "scale": 1 });
    }
    let shot = cdp.call("Page.captureScreenshot", params).await?;
    let data = shot["data"]
        .as_str()
        .ok_or_else(|| ScreenshotError::Protocol("captureScreenshot returned no data".into()))?;
    let png = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| ScreenshotError::Protocol(format!("screenshot is not base64: {e}")))?;
    let (width, height) = png_dimensions(&png)
        .ok_or_else(|| ScreenshotError::Protocol("the browser did not return a PNG".into()))?;
    let captured_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    write_atomically(dest, &png)?;
    let info = ScreenshotInfo {
        url: shown_url,
        final_url: redact(&final_url, &c.secrets),
        http_status: status,
        width,
        height,
        viewport: c.viewport,
        full_page: c.full_page,
        captured_at,
        sha256: hex::encode(Sha256::digest(&png)),
        bytes: png.len() as u64,
        browser_version,
        waited_for: req
            .wait_for
            .as_ref()
            .filter(|_| c.wait_for != WaitFor::Nothing)
            .cloned(),
        insecure_skip_verify: c.insecure,
    };
    let sidecar = serde_json::to_vec_pretty(&info)
        .map_err(|e| ScreenshotError::Protocol(format!("cannot encode the sidecar: {e}")))?;
    write_atomically(&sidecar_path(dest), &sidecar)?;
    match status {
        Some(s) if s >= 400 => Err(ScreenshotError::HttpStatus {
            url: req.url.clone(),
            status: s,
            info: Box::new(info),
        }),
        _ => Ok(info),
    }
}

/// Where the [`ScreenshotInfo`] of a PNG is written: `<png>.json`.
pub fn sidecar_path(png: &Path) -> PathBuf {
    let mut name = png.as_os_str().to_owned();
    name.push(".json");
    PathBuf::from(name)
}

/// Polls for `expression` (a `querySelector` test) until true or the deadline; `Ok(false)`
/// when the deadline came first.
async fn wait_for_selector(
    cdp: &mut Cdp,
    expression: &str,
    sel: &str,
    deadline: Instant,
) -> Result<bool, ScreenshotError> {
    loop {
        let r = cdp
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
            )
            .await?;
        if r.get("exceptionDetails").is_some() {
            return Err(ScreenshotError::Invalid(format!(
                "`wait_for` `{sel}` is not a valid CSS selector"
            )));
        }
        if r["result"]["value"].as_bool() == Some(true) {
            return Ok(true);
        }
        if Instant::now() + SELECTOR_POLL >= deadline {
            return Ok(false);
        }
        cdp.idle(SELECTOR_POLL).await?;
    }
}

fn str_field(v: &Value, field: &str) -> Result<String, ScreenshotError> {
    v[field]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| ScreenshotError::Protocol(format!("no `{field}` in the answer")))
}

/// Writes next to `dest` and renames ([`runbook_engine::fs`]), so a reader never sees half a
/// PNG. Owner-only, as the screenshot may show what the page behind a token shows.
fn write_atomically(dest: &Path, data: &[u8]) -> Result<(), ScreenshotError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ScreenshotError::Io { path, source }
    };
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    runbook_engine::fs::stage(dest, 0o600, |f| f.write_all(data))
        .and_then(runbook_engine::fs::Staged::commit)
        .map_err(io(dest))
}

/// A running Chromium: its process group and its temporary profile. Dropping it kills the
/// group and any stray process that names the profile (crashpad handlers leave the group).
struct Browser {
    child: tokio::process::Child,
    pgid: i32,
    profile: tempfile::TempDir,
    port: u16,
    ws_path: String,
    stopped: bool,
}

impl Browser {
    async fn start(c: &Checked, deadline: Instant) -> Result<Self, ScreenshotError> {
        let start_err = |message: String| ScreenshotError::BrowserStart {
            path: c.browser.clone(),
            message,
        };
        let profile = tempfile::Builder::new()
            .prefix("runbook-chromium-")
            .tempdir()
            .map_err(|e| start_err(format!("cannot create a temporary profile: {e}")))?;
        let dir = profile.path();
        let stderr_path = dir.join("chromium-stderr.log");
        let stderr = std::fs::File::create(&stderr_path)
            .map_err(|e| start_err(format!("cannot create `{}`: {e}", stderr_path.display())))?;
        // Chromium's own temporary files (shared memory under --disable-dev-shm-usage) go
        // inside the profile too: a browser killed on timeout cannot clean them up itself.
        let tmp = dir.join("tmp");
        std::fs::create_dir(&tmp)
            .map_err(|e| start_err(format!("cannot create `{}`: {e}", tmp.display())))?;
        let mut cmd = tokio::process::Command::new(&c.browser);
        cmd.env("TMPDIR", &tmp);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-breakpad",
            "--disable-domain-reliability",
            "--disable-client-side-phishing-detection",
            "--disable-features=Translate,MediaRouter,OptimizationHints,AutofillServerCommunication",
            "--disable-dev-shm-usage",
            "--no-pings",
            "--metrics-recording-only",
            "--mute-audio",
            "--no-default-browser-check",
            "--hide-scrollbars",
            "--remote-debugging-port=0",
        ])
        .arg(format!(
            "--window-size={},{}",
            c.viewport.width, c.viewport.height
        ))
        .arg(format!("--user-data-dir={}", dir.display()));
        if c.insecure {
            cmd.arg("--ignore-certificate-errors");
        }
        if !c.spki.is_empty() {
            cmd.arg(format!(
                "--ignore-certificate-errors-spki-list={}",
                c.spki.join(",")
            ));
        }
        cmd.arg("about:blank")
            // Chromium's config, cache and crash database go inside the profile too, so
            // nothing is left in the runner's home and every helper names the profile.
            .env("HOME", dir)
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .env("XDG_CACHE_HOME", dir.join("cache"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| start_err(format!("cannot run it: {e}")))?;
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .ok_or_else(|| start_err("it exited at once".into()))?;
        let mut browser = Self {
            child,
            pgid,
            profile,
            port: 0,
            ws_path: String::new(),
            stopped: false,
        };
        // Chromium writes the port it chose and the browser endpoint's path once listening.
        let port_file = browser.profile.path().join("DevToolsActivePort");
        loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    if let Ok(port) = port.trim().parse::<u16>() {
                        browser.port = port;
                        browser.ws_path = path.trim().to_owned();
                        return Ok(browser);
                    }
                }
            }
            if let Ok(Some(status)) = browser.child.try_wait() {
                let tail = browser.stderr_tail();
                browser.shutdown().await;
                return Err(start_err(format!("it exited ({status}): {tail}")));
            }
            if Instant::now() >= deadline {
                let tail = browser.stderr_tail();
                browser.shutdown().await;
                return Err(start_err(format!(
                    "it did not open its DevTools port in time: {tail}"
                )));
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// The end of what the browser printed, for error messages.
    fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(self.profile.path().join("chromium-stderr.log"))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
        if tail.is_empty() {
            "no output".into()
        } else {
            tail
        }
    }

    /// KILL the group and the strays, reap the leader, and wait until none is left.
    async fn shutdown(&mut self) {
        self.kill_all();
        let _ = tokio::time::timeout(REAP_WAIT, self.child.wait()).await;
        let until = Instant::now() + REAP_WAIT;
        loop {
            let left = browser_processes(self.pgid, self.profile.path());
            if left.is_empty() || Instant::now() >= until {
                break;
            }
            for pid in left {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            sleep(Duration::from_millis(20)).await;
        }
        self.stopped = true;
    }

    fn kill_all(&self) {
        // ESRCH (already gone) is fine.
        let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
        for pid in browser_processes(self.pgid, self.profile.path()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The capture future was dropped mid-way (or shutdown was skipped): kill without
        // waiting; the profile directory goes with the TempDir.
        if !self.stopped {
            self.kill_all();
        }
    }
}

/// Live (not zombie) processes of the browser: in its process group, or naming its profile
/// directory on their command line.
pub fn browser_processes(pgid: i32, profile: &Path) -> Vec<i32> {
    let needle = profile.as_os_str().as_encoded_bytes();
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if u32::try_from(pid).is_ok_and(|p| p == me) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let group = fields.nth(1).and_then(|g| g.parse::<i32>().ok());
        if state == Some("Z") || state == Some("X") {
            continue;
        }
        let named = std::fs::read(entry.path().join("cmdline"))
            .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle));
        if group == Some(pgid) || named {
            found.push(pid);
        }
    }
    found
}

/// What the page's events told so far.
#[derive(Default)]
struct PageState {
    main_frame: String,
    /// Main-frame document responses by loader: (status, URL).
    documents: HashMap<String, (u16, String)>,
    /// (loaderId, lifecycle event name) seen for the main frame.
    lifecycle: HashSet<(String, String)>,
    crashed: bool,
}

/// A DevTools connection, used from one task: commands wait for their answer while events
/// are folded into [`PageState`] (and intercepted requests answered) as they arrive.
struct Cdp {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
    session: Option<String>,
    deadline: Instant,
    budget: Duration,
    page: PageState,
    extra_headers: BTreeMap<String, String>,
    origin: Option<url::Origin>,
}

impl Cdp {
    async fn connect(
        port: u16,
        path: &str,
        deadline: Instant,
        budget: Duration,
    ) -> Result<Self, ScreenshotError> {
        let url = format!("ws://127.0.0.1:{port}{path}");
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE));
        let (ws, _) = timeout_at(
            deadline,
            tokio_tungstenite::connect_async_with_config(url, Some(config), false),
        )
        .await
        .map_err(|_| ScreenshotError::Timeout { after: budget })?
        .map_err(|e| ScreenshotError::Protocol(format!("cannot connect to the browser: {e}")))?;
        Ok(Self {
            ws,
            next_id: 0,
            session: None,
            deadline,
            budget,
            page: PageState::default(),
            extra_headers: BTreeMap::new(),
            origin: None,
        })
    }

    async fn send(&mut self, method: &str, params: Value) -> Result<u64, ScreenshotError> {
        self.next_id += 1;
        let mut msg = json!({ "id": self.next_id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .await
            .map_err(|e| ScreenshotError::Protocol(format!("sending {method}: {e}")))?;
        Ok(self.next_id)
    }

    /// Sends a command (to the page once attached) and returns its result.
    async fn call(&mut self, method: &str, params: Value) -> Result<Value, ScreenshotError> {
        let id = self.send(method, params).await?;
        loop {
            let msg = self.next_message().await?;
            if msg["id"].as_u64() != Some(id) {
                continue;
            }
            if let Some(err) = msg.get("error") {
                let text = err["message"].as_str().unwrap_or("error");
                return Err(ScreenshotError::Protocol(format!("{method}: {text}")));
            }
            return Ok(msg.get("result").cloned().unwrap_or(Value::Null));
        }
    }

    /// Reads messages until `done` holds for the page state.
    async fn wait_until(
        &mut self,
        done: impl Fn(&PageState) -> bool,
    ) -> Result<(), ScreenshotError> {
        while !done(&self.page) {
            self.next_message().await?;
        }
        Ok(())
    }

    /// Lets `d` pass while still answering intercepted requests.
    async fn idle(&mut self, d: Duration) -> Result<(), ScreenshotError> {
        let until = Instant::now() + d;
        loop {
            match timeout_at(until, self.next_message()).await {
                Err(_) => return Ok(()),
                Ok(r) => {
                    r?;
                }
            }
        }
    }

    /// The next message, with events already handled; bounded by the capture's deadline.
    async fn next_message(&mut self) -> Result<Value, ScreenshotError> {
        loop {
            let frame = timeout_at(self.deadline, self.ws.next())
                .await
                .map_err(|_| ScreenshotError::Timeout { after: self.budget })?;
            let text = match frame {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(_))) | None => {
                    return Err(ScreenshotError::Protocol(
                        "the browser closed the connection".into(),
                    ))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(ScreenshotError::Protocol(format!("reading: {e}"))),
            };
            let msg: Value = serde_json::from_str(text.as_str())
                .map_err(|e| ScreenshotError::Protocol(format!("bad message: {e}")))?;
            if msg.get("method").is_some() {
                self.event(&msg).await?;
            }
            if self.page.crashed {
                return Err(ScreenshotError::Protocol("the page crashed".into()));
            }
            return Ok(msg);
        }
    }

    async fn event(&mut self, msg: &Value) -> Result<(), ScreenshotError> {
        if msg["sessionId"].as_str() != self.session.as_deref() {
            return Ok(());
        }
        let p = &msg["params"];
        match msg["method"].as_str().unwrap_or("") {
            "Network.responseReceived"
                if p["type"] == "Document" && p["frameId"] == self.page.main_frame.as_str() =>
            {
                if let (Some(loader), Some(status)) =
                    (p["loaderId"].as_str(), p["response"]["status"].as_u64())
                {
                    let url = p["response"]["url"].as_str().unwrap_or("").to_owned();
                    self.page
                        .documents
                        .insert(loader.to_owned(), (u16::try_from(status).unwrap_or(0), url));
                }
            }
            "Page.lifecycleEvent" if p["frameId"] == self.page.main_frame.as_str() => {
                if let (Some(loader), Some(name)) = (p["loaderId"].as_str(), p["name"].as_str()) {
                    self.page
                        .lifecycle
                        .insert((loader.to_owned(), name.to_owned()));
                }
            }
            "Inspector.targetCrashed" => self.page.crashed = true,
            "Fetch.requestPaused" => {
                let id = p["requestId"].clone();
                let url = p["request"]["url"].as_str().unwrap_or("");
                let same_origin =
                    url::Url::parse(url).is_ok_and(|u| Some(&u.origin()) == self.origin.as_ref());
                let params = if same_origin {
                    let mut headers: Vec<Value> = Vec::new();
                    if let Some(existing) = p["request"]["headers"].as_object() {
                        for (name, value) in existing {
                            if !self
                                .extra_headers
                                .keys()
                                .any(|k| k.eq_ignore_ascii_case(name))
                            {
                                headers.push(json!({ "name": name, "value": value }));
                            }
                        }
                    }
                    for (name, value) in &self.extra_headers {
                        headers.push(json!({ "name": name, "value": value }));
                    }
                    json!({ "requestId": id, "headers": headers })
                } else {
                    json!({ "requestId": id })
                };
                // The answer is read (and ignored) by whichever wait is running.
                self.send("Fetch.continueRequest", params).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// The `screenshot` step kind's runner: the rendered settings, a temporary directory for the
/// image, the capture, then the image as an artifact with its sidecar.
pub(crate) async fn run_attempt(
    ctx: &runbook_engine::runner::AttemptContext,
    out: &mut OutputSink,
) -> runbook_engine::event::AttemptOutcome {
    use crate::dispatch::{details, failed, under};
    use runbook_engine::event::{AttemptOutcome, FailureKind};
    let mut req: ScreenshotRequest = match serde_json::from_value(ctx.spec.clone()) {
        Ok(r) => r,
        Err(e) => return failed(FailureKind::Config, format!("screenshot: {e}")),
    };
    under(&ctx.base_dir, &mut req.ca_file);
    let dir = match tempfile::Builder::new().prefix("runbook-shot-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            return failed(
                FailureKind::Io,
                format!("screenshot: temporary directory: {e}"),
            )
        }
    };
    let dest = dir.path().join("shot.png");
    let result = capture(&req, &ctx.secrets, &dest, out, &ctx.cancel).await;
    let info = match &result {
        Ok(info) => Some(info.clone()),
        Err(ScreenshotError::HttpStatus { info, .. }) => Some((**info).clone()),
        Err(_) => None,
    };
    if let Some(info) = info {
        let sidecar = serde_json::to_value(&info).unwrap_or_default();
        details(out, serde_json::json!({ "screenshot": sidecar.clone() }));
        out.artifact("png", dest.clone(), sidecar).await;
    }
    match result {
        Ok(_) => AttemptOutcome::Exited { code: 0 },
        Err(ScreenshotError::Cancelled) => AttemptOutcome::Cancelled,
        Err(e) => {
            // The screenshot's own judgement of what a retry can fix decides.
            let failure = if e.retryable() {
                FailureKind::Browser
            } else if e.kind() == "tls" {
                FailureKind::Tls
            } else {
                FailureKind::Config
            };
            failed(failure, e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_for_is_a_delay_or_a_selector() {
        assert_eq!(parse_wait_for(None), WaitFor::Nothing);
        assert_eq!(
            parse_wait_for(Some("2s")),
            WaitFor::Delay(Duration::from_secs(2))
        );
        assert_eq!(
            parse_wait_for(Some("500ms")),
            WaitFor::Delay(Duration::from_millis(500))
        );
        assert_eq!(
            parse_wait_for(Some("#panel .ok")),
            WaitFor::Selector("#panel .ok".into())
        );
    }

    #[test]
    fn redact_replaces_longest_first() {
        let s = redact(
            "https://h/?t=abc123&u=abc",
            &["abc".into(), "abc123".into(), String::new()],
        );
        assert_eq!(s, "https://h/?t=<redacted>&u=<redacted>");
    }

    #[test]
    fn png_dimensions_read_the_header() {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        png.extend_from_slice(&1280u32.to_be_bytes());
        png.extend_from_slice(&800u32.to_be_bytes());
        assert_eq!(png_dimensions(&png), Some((1280, 800)));
        assert_eq!(png_dimensions(b"GIF89a"), None);
    }

    /// The hash Chromium expects, as its documentation computes it with openssl, for a
    /// two-certificate PEM file.
    #[test]
    fn spki_hashes_match_openssl_for_every_certificate_of_a_file() {
        use std::process::Command;
        let dir = tempfile::tempdir().expect("tmp");
        let mut pem = String::new();
        let mut want = Vec::new();
        for name in ["a", "b"] {
            let (key, crt) = (
                dir.path().join(format!("{name}.key")),
                dir.path().join(format!("{name}.crt")),
            );
            let made = Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-days",
                    "1",
                    "-subj",
                ])
                .arg(format!("/CN={name}"))
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&crt)
                .output()
                .expect("openssl");
            assert!(
                made.status.success(),
                "{}",
                String::from_utf8_lossy(&made.stderr)
            );
            let hash = Command::new("sh")
                .arg("-c")
                .arg("openssl x509 -in \"$1\" -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64")
                .arg("sh")
                .arg(&crt)
                .output()
                .expect("openssl pipeline");
            want.push(String::from_utf8_lossy(&hash.stdout).trim().to_owned());
            pem.push_str(&format!(
                "# {name}, as EL's ca-bundle.crt names its entries\n"
            ));
            pem.push_str(&std::fs::read_to_string(&crt).expect("crt"));
        }
        assert_eq!(spki_hashes(&pem), Ok(want));
        assert!(spki_hashes("no certificate here").is_err());
    }

    #[test]
    fn request_rejects_unknown_fields_and_hides_headers_in_debug() {
        let bad =
            serde_json::from_value::<ScreenshotRequest>(json!({ "url": "http://x", "wait": "#a" }));
        assert!(bad.is_err());
        let req: ScreenshotRequest = serde_json::from_value(
            json!({ "url": "http://x", "headers": { "Authorization": "Bearer s3cr3t" } }),
        )
        .expect("valid request");
        assert!(!format!("{req:?}").contains("s3cr3t"));
    }

    #[test]
    fn missing_configured_browser_says_how_to_install() {
        let e = find_browser(Some(Path::new("/nonexistent/chromium"))).expect_err("missing");
        assert_eq!(e.kind(), "browser_missing");
        assert!(!e.retryable());
        assert!(e.to_string().contains("apt-get install chromium"));
    }
}
