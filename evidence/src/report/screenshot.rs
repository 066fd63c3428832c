//! An attempt's screenshot in the report: `attempt-<n>.png` beside the attempt's log with its
//! `attempt-<n>.png.json` sidecar (written by the screenshot step), embedded as a `data:` URI
//! (the page loads nothing) and linked to the file in the bundle.

use std::path::Path;

use maud::{html, Markup};

#[cfg(test)]
use super::render_report;
use super::{fmt_bytes, href};
use crate::manifest::AttemptRecord;
use crate::run_view::clean_text;
#[cfg(test)]
use crate::test_support;

/// Larger screenshots are linked, not embedded, so the report stays small enough to mail.
const MAX_EMBEDDED_SCREENSHOT: u64 = 4 << 20;

/// The screenshot an attempt took, if any, appended to `h`.
#[cfg(test)]
pub(super) fn render_attempt_screenshot(h: &mut String, bundle: &Path, a: &AttemptRecord) {
    if let Some(markup) = markup(bundle, a) {
        h.push_str(&markup.into_string());
    }
}

/// The sidecar's URL, time and sha256 are shown, and a digest that does not match the file is
/// flagged.
pub(super) fn markup(bundle: &Path, a: &AttemptRecord) -> Option<Markup> {
    use base64::Engine as _;
    use sha2::Digest as _;

    let rel = a
        .log
        .strip_suffix(".log")
        .map(|stem| format!("{stem}.png"))?;
    // The manifest names the path: stay inside the bundle.
    if Path::new(&rel)
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return None;
    }
    let png_path = bundle.join(&rel);
    let sidecar = std::fs::read(bundle.join(format!("{rel}.json"))).ok()?;
    let info = serde_json::from_slice::<serde_json::Value>(&sidecar).ok()?;
    let meta = std::fs::metadata(&png_path).ok()?;
    let text = |k: &str| info[k].as_str().map(clean_text).unwrap_or_default();
    let recorded = text("sha256");
    let url = text("url");
    // The image, and the digest the file has when it is not the recorded one.
    let png = (meta.len() <= MAX_EMBEDDED_SCREENSHOT)
        .then(|| std::fs::read(&png_path).ok())
        .flatten()
        .map(|png| {
            let actual = hex::encode(sha2::Sha256::digest(&png));
            let changed = (!recorded.eq_ignore_ascii_case(&actual)).then_some(actual);
            (
                base64::engine::general_purpose::STANDARD.encode(&png),
                changed,
            )
        });
    let final_url = text("final_url");
    let link = href(&rel);
    Some(html! {
        div class="cmdlabel" {
            "Screenshot " a href=(link) { code { (rel) } } " "
            span class="dim" {
                "· " (info["width"].as_u64().unwrap_or(0)) "×" (info["height"].as_u64().unwrap_or(0))
                @if let Some(s) = info["http_status"].as_u64() { " · HTTP " (s) }
            }
        }
        div class="shot" {
            a href=(link) title="open full size" {
                @match &png {
                    Some((b64, _)) => img alt={ "screenshot of " (url) } src={ "data:image/png;base64," (b64) }
                        style="max-width:min(480px,100%);max-height:320px;border:1px solid #d0d7de;display:block";,
                    None => span class="dim" { (fmt_bytes(meta.len())) " — open the file" },
                }
            }
            div class="small" {
                code { (url) }
                @if !final_url.is_empty() && final_url != url { " → " code { (final_url) } }
                br;
                "taken " (text("captured_at")) " · sha256 " code { (recorded) }
                @if let Some((_, Some(actual))) = &png {
                    " " span class="errtext" { "— the file's sha256 is " (actual) ", not the recorded one" }
                }
            }
        }
        "\n"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(log: &str) -> AttemptRecord {
        serde_json::from_value(serde_json::json!({
            "attempt": 1, "target": "local", "command": "screenshot", "cwd": "/",
            "started_at": "2026-08-20T10:15:00Z", "output": {"stdout": 0, "stderr": 0},
            "log": log
        }))
        .expect("attempt")
    }

    #[test]
    fn screenshots_are_embedded_with_url_time_and_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let png = b"\x89PNG\r\n\x1a\nnot really an image".to_vec();
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&png));
        let shot = dir.path().join("steps/grafana/local/attempt-2.png");
        std::fs::create_dir_all(shot.parent().expect("parent")).expect("mkdir");
        std::fs::write(&shot, &png).expect("png");
        let sidecar = serde_json::json!({
            "url": "https://grafana/d/abc?kiosk&auth=<redacted>", "final_url": "https://grafana/d/abc?kiosk",
            "http_status": 200, "width": 1280, "height": 800, "captured_at": "2026-08-20T10:15:03.120Z",
            "sha256": sha
        });
        std::fs::write(
            dir.path().join("steps/grafana/local/attempt-2.png.json"),
            sidecar.to_string(),
        )
        .expect("sidecar");

        let mut h = String::new();
        render_attempt_screenshot(
            &mut h,
            dir.path(),
            &attempt("steps/grafana/local/attempt-2.log"),
        );
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
        assert!(
            h.contains(&format!("src=\"data:image/png;base64,{b64}\"")),
            "{h}"
        );
        assert!(
            h.contains("<a href=\"steps/grafana/local/attempt-2.png\""),
            "{h}"
        );
        assert!(h.contains("auth=&lt;redacted&gt;"), "{h}");
        assert!(h.contains("2026-08-20T10:15:03.120Z"));
        assert!(h.contains(&sha));
        assert!(h.contains("1280×800 · HTTP 200"));
        assert!(!h.contains("not the recorded one"));

        // A file changed after the capture is flagged.
        std::fs::write(&shot, b"\x89PNG\r\n\x1a\nswapped").expect("png");
        let mut h = String::new();
        render_attempt_screenshot(
            &mut h,
            dir.path(),
            &attempt("steps/grafana/local/attempt-2.log"),
        );
        assert!(h.contains("not the recorded one"), "{h}");

        // No screenshot, or a path leaving the bundle: nothing.
        for log in [
            "steps/other/local/attempt-1.log",
            "../grafana/local/attempt-2.log",
        ] {
            let mut h = String::new();
            render_attempt_screenshot(&mut h, dir.path(), &attempt(log));
            assert!(h.is_empty(), "{log}: {h}");
        }
    }

    #[test]
    fn the_report_shows_an_attempts_screenshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = super::test_support::failed_run(dir.path());
        let png = b"\x89PNG\r\n\x1a\nfetch";
        std::fs::write(dir.path().join("steps/fetch/local/attempt-1.png"), png).expect("png");
        std::fs::write(
            dir.path().join("steps/fetch/local/attempt-1.png.json"),
            r#"{"url":"http://status/","captured_at":"2026-08-20T10:15:01Z","sha256":"00"}"#,
        )
        .expect("sidecar");
        let html = render_report(&m, dir.path()).expect("render");
        assert!(html.contains("data:image/png;base64,"));
        assert!(html.contains("<a href=\"steps/fetch/local/attempt-1.png\""));
    }
}
