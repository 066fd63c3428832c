//! Trusted time for a sealed bundle: sends the RFC 3161 request for `SHA256SUMS` (built by
//! `runbook_evidence::tsa`) to a time-stamping authority over HTTP and stores its reply as
//! `SHA256SUMS.tsr` once it is checked to be granted, for this `SHA256SUMS`, with our nonce.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use runbook_evidence::tsa;

/// How long the TSA may take to answer.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The URL as it may be shown: without credentials.
pub fn shown_url(url: &str) -> String {
    runbook_evidence::scrub::scrub_str(url, &mut Vec::new())
}

/// Asks the TSA at `url` to time-stamp the bundle's `SHA256SUMS`; writes `SHA256SUMS.tsr`.
/// Returns the authority's time.
pub fn stamp(dir: &Path, url: &str) -> Result<DateTime<Utc>, String> {
    let sums_path = dir.join(runbook_evidence::verify::SUMS_FILE);
    let sums = std::fs::read(&sums_path)
        .map_err(|e| format!("cannot read `{}`: {e}", sums_path.display()))?;
    let req = tsa::request(&sums).map_err(|e| e.to_string())?;
    let shown = shown_url(url);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let reply = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .map_err(|e| e.to_string())?;
        let resp = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, tsa::REQUEST_CONTENT_TYPE)
            .header(reqwest::header::ACCEPT, tsa::REPLY_CONTENT_TYPE)
            .body(req.der.clone())
            .send()
            .await
            .map_err(shown_error)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        resp.bytes().await.map(|b| b.to_vec()).map_err(shown_error)
    });
    let reply = reply.map_err(|e| format!("time-stamping authority {shown}: {e}"))?;
    let time = tsa::check_reply(&reply, &sums, &req)
        .map_err(|e| format!("time-stamping authority {shown}: {e}"))?;
    let path = dir.join(tsa::TSR_FILE);
    runbook_evidence::fs::write_atomic(&path, &reply)
        .map_err(|e| format!("cannot write `{}`: {e}", path.display()))?;
    Ok(time)
}

/// A reqwest error without the URL it carries (which may hold credentials).
fn shown_error(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// Removes a time-stamp token left from before `SHA256SUMS` was rewritten (a resumed or
/// repaired bundle): it no longer matches. Returns whether there was one.
pub fn drop_stale(dir: &Path) -> bool {
    let path = dir.join(tsa::TSR_FILE);
    path.exists() && std::fs::remove_file(&path).is_ok()
}
