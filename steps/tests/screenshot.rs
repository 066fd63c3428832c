//! The screenshot step against a real headless Chromium and a real HTTP server on 127.0.0.1.
//!
//! Needs a Chromium on PATH (or `RUNBOOK_CHROMIUM`); `scripts/test` installs it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use runbook_engine::event::RunEvent;
use runbook_engine::runbook::StepId;
use runbook_engine::runner::OutputSink;
use runbook_steps::screenshot::{
    browser_processes, capture, sidecar_path, ScreenshotError, ScreenshotInfo, ScreenshotRequest,
};

const TOKEN: &str = "glsa_Zk8wQ3vT9yExampleToken_51f0";

/// A page whose red block appears only 1.2 s after load.
const LATE_PAGE: &str = r#"<!doctype html><html><body style="margin:0;background:#fff">
<p>loading…</p>
<script>
setTimeout(() => {
  const d = document.createElement('div');
  d.id = 'late';
  d.style = 'position:fixed;left:0;top:0;width:100vw;height:100vh;background:rgb(200,30,30)';
  document.body.appendChild(d);
}, 1200);
</script></body></html>"#;

/// What the server saw: (port, path, Authorization header).
type Seen = Arc<Mutex<Vec<(u16, String, Option<String>)>>>;

/// A tiny HTTP/1.1 server (one request per connection) on two ports of 127.0.0.1, so that
/// the second is another origin.
struct Server {
    port: u16,
    other_port: u16,
    seen: Seen,
}

impl Server {
    async fn start() -> Self {
        let seen: Seen = Arc::default();
        let a = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let b = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = a.local_addr().expect("addr").port();
        let other_port = b.local_addr().expect("addr").port();
        for listener in [a, b] {
            let seen = seen.clone();
            tokio::spawn(async move {
                let me = listener.local_addr().expect("addr").port();
                loop {
                    let Ok((sock, _)) = listener.accept().await else {
                        return;
                    };
                    let seen = seen.clone();
                    tokio::spawn(serve(sock, me, port, other_port, seen));
                }
            });
        }
        Self {
            port,
            other_port,
            seen,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut sock: S,
    me: u16,
    port: u16,
    other: u16,
    seen: Seen,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let path = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/")
        .to_owned();
    let auth = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("authorization")
            .then(|| v.trim().to_owned())
    });
    seen.lock()
        .expect("lock")
        .push((me, path.clone(), auth.clone()));
    let route = path.split('?').next().unwrap_or("/");
    let (status, ctype, body) = match route {
        "/late" => ("200 OK", "text/html", LATE_PAGE.to_owned()),
        "/never" => (
            "200 OK",
            "text/html",
            "<html><body><p>nothing will come</p></body></html>".to_owned(),
        ),
        "/tall" => (
            "200 OK",
            "text/html",
            "<html><body style=\"margin:0\"><div style=\"height:3000px;background:linear-gradient(red,blue)\"></div></body></html>".to_owned(),
        ),
        "/secure" if auth.as_deref() == Some(&format!("Bearer {TOKEN}")) => (
            "200 OK",
            "text/html",
            format!(
                "<html><body style=\"margin:0\"><div id=\"panel\" style=\"width:100vw;height:100vh;background:rgb(20,160,60)\"></div>\
                 <img src=\"http://127.0.0.1:{other}/avatar.png\"></body></html>"
            ),
        ),
        "/secure" => ("401 Unauthorized", "text/html", "<html><body><h1>401 unauthorized</h1></body></html>".to_owned()),
        "/old" => (
            "302 Found",
            "text/html",
            String::new(),
        ),
        _ => ("404 Not Found", "text/plain", "not found".to_owned()),
    };
    let location = if route == "/old" {
        format!("Location: http://127.0.0.1:{port}/late\r\n")
    } else {
        String::new()
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}; charset=utf-8\r\nContent-Length: {}\r\n{location}Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(response.as_bytes()).await;
    let _ = sock.shutdown().await;
}

/// An output sink whose stderr is collected by a task, so a test can react to a line.
struct Sink {
    out: OutputSink,
    text: Arc<Mutex<String>>,
}

fn sink() -> Sink {
    let (tx, mut rx) = mpsc::channel::<RunEvent>(64);
    let text: Arc<Mutex<String>> = Arc::default();
    let t = text.clone();
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            if let RunEvent::Output { data, .. } = ev {
                t.lock()
                    .expect("lock")
                    .push_str(&String::from_utf8_lossy(&data));
            }
        }
    });
    Sink {
        out: OutputSink::new(tx, StepId::new("shot"), Arc::from("local"), 1),
        text,
    }
}

impl Sink {
    fn text(&self) -> String {
        self.text.lock().expect("lock").clone()
    }
}

/// Lets the collecting task catch up with what was sent.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}

fn request(v: serde_json::Value) -> ScreenshotRequest {
    serde_json::from_value(v).expect("valid request")
}

/// The profile directory the step announced, from its progress lines.
fn profile_dir(text: &str) -> PathBuf {
    let start = text.find("profile ").expect("profile line") + "profile ".len();
    let end = text[start..].find(')').expect("closing paren") + start;
    PathBuf::from(&text[start..end])
}

/// Asserts that no live process names the profile, and that the profile is gone.
fn assert_browser_gone(text: &str) {
    let profile = profile_dir(text);
    assert!(
        profile.starts_with(std::env::temp_dir()),
        "profile {profile:?}"
    );
    // pgid -1 matches no group: only the command lines are searched.
    let left = browser_processes(-1, &profile);
    assert!(left.is_empty(), "browser processes left: {left:?}");
    assert!(!profile.exists(), "profile {profile:?} was not removed");
}

/// RGB(A) pixels of a PNG: (width, height, [r, g, b] per pixel).
fn pixels(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let bytes = std::fs::read(path).expect("read png");
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().expect("valid PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("frame");
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let n = info.color_type.samples();
    assert!(n >= 3, "colour PNG expected, got {:?}", info.color_type);
    let px = buf[..info.buffer_size()]
        .chunks(n)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    (info.width, info.height, px)
}

/// Share of pixels within a small distance of `rgb`.
fn share_of(px: &[[u8; 3]], rgb: [u8; 3]) -> f64 {
    let close = px
        .iter()
        .filter(|p| p.iter().zip(rgb).all(|(a, b)| a.abs_diff(b) <= 8))
        .count();
    close as f64 / px.len() as f64
}

fn sidecar(dest: &Path) -> (String, ScreenshotInfo) {
    let text = std::fs::read_to_string(sidecar_path(dest)).expect("sidecar");
    let info = serde_json::from_str(&text).expect("sidecar is ScreenshotInfo");
    (text, info)
}

#[tokio::test]
async fn wait_for_a_selector_waits_for_late_content() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("steps/grafana/local/attempt-1.png");
    let mut s = sink();
    let req = request(serde_json::json!({
        // Through a redirect: the final URL is recorded.
        "url": server.url("/old"), "width": 640, "height": 400, "wait_for": "#late",
    }));
    let info = capture(&req, &[], &dest, &mut s.out, &CancellationToken::new())
        .await
        .expect("capture");
    settle().await;

    assert_eq!((info.width, info.height), (640, 400));
    assert_eq!(info.http_status, Some(200));
    assert_eq!(info.final_url, server.url("/late"));
    assert_eq!(info.waited_for.as_deref(), Some("#late"));
    let (w, h, px) = pixels(&dest);
    assert_eq!((w, h), (640, 400));
    // The block appears only after 1.2 s: a capture that did not wait is white.
    assert!(
        share_of(&px, [200, 30, 30]) > 0.9,
        "late block not captured"
    );

    let bytes = std::fs::read(&dest).expect("png");
    assert_eq!(info.bytes, bytes.len() as u64);
    assert_eq!(info.sha256.len(), 64);
    let (_, from_disk) = sidecar(&dest);
    assert_eq!(from_disk, info);
    let text = s.text();
    assert!(text.contains(&info.sha256), "{text}");
    assert!(text.contains("HTTP 200"), "{text}");
    assert_browser_gone(&text);
}

#[tokio::test]
async fn bearer_token_is_sent_to_the_origin_only_and_written_nowhere() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("attempt-1.png");
    let mut s = sink();
    let mut headers = BTreeMap::new();
    headers.insert("Authorization".to_owned(), format!("Bearer {TOKEN}"));
    let req = request(serde_json::json!({
        // The token in the URL too, as some dashboards take it: redacted like the header.
        "url": server.url(&format!("/secure?orgId=1&auth={TOKEN}")),
        "width": 800, "height": 600, "wait_for": "#panel", "headers": headers,
    }));
    let info = capture(
        &req,
        &[TOKEN.to_owned()],
        &dest,
        &mut s.out,
        &CancellationToken::new(),
    )
    .await
    .expect("capture");
    settle().await;

    assert_eq!(info.http_status, Some(200));
    let (w, h, px) = pixels(&dest);
    assert_eq!((w, h), (800, 600));
    assert!(share_of(&px, [20, 160, 60]) > 0.5, "panel not captured");
    assert!(info.url.contains("auth=<redacted>"), "{}", info.url);

    // Everything written: the sink, the sidecar, every file in the evidence directory.
    let text = s.text();
    assert!(!text.contains(TOKEN), "token in output: {text}");
    let (sidecar_text, _) = sidecar(&dest);
    assert!(!sidecar_text.contains(TOKEN));
    for entry in std::fs::read_dir(dir.path()).expect("dir").flatten() {
        let content = std::fs::read(entry.path()).expect("read");
        assert!(
            !content.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
            "token in {:?}",
            entry.path()
        );
    }
    // The header went to the page's origin, not to the other origin's image.
    let seen = server.seen.lock().expect("lock").clone();
    let bearer = format!("Bearer {TOKEN}");
    assert!(seen.iter().any(|(p, path, a)| *p == server.port
        && path.starts_with("/secure")
        && a.as_deref() == Some(bearer.as_str())));
    let avatar: Vec<_> = seen
        .iter()
        .filter(|(p, _, _)| *p == server.other_port)
        .collect();
    assert!(!avatar.is_empty(), "the cross-origin image was not loaded");
    assert!(avatar.iter().all(|(_, _, a)| a.is_none()), "{avatar:?}");
    assert_browser_gone(&text);
}

#[tokio::test]
async fn an_error_status_fails_but_keeps_the_page() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("attempt-1.png");
    let mut s = sink();
    let req =
        request(serde_json::json!({ "url": server.url("/secure"), "width": 400, "height": 300 }));
    let err = capture(&req, &[], &dest, &mut s.out, &CancellationToken::new())
        .await
        .expect_err("401");
    settle().await;
    let ScreenshotError::HttpStatus { status, info, .. } = &err else {
        panic!("expected HttpStatus, got {err:?}");
    };
    assert_eq!(*status, 401);
    assert_eq!(err.kind(), "http_status");
    assert!(!err.retryable());
    assert_eq!(info.http_status, Some(401));
    assert_eq!(pixels(&dest).0, 400);
    assert_eq!(sidecar(&dest).1, **info);
    assert_browser_gone(&s.text());
}

#[tokio::test]
async fn full_page_captures_beyond_the_viewport() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("tall.png");
    let mut s = sink();
    let req = request(serde_json::json!({
        "url": server.url("/tall"), "width": 500, "height": 400, "full_page": true,
    }));
    let info = capture(&req, &[], &dest, &mut s.out, &CancellationToken::new())
        .await
        .expect("capture");
    settle().await;
    assert!(info.full_page);
    let (w, h, px) = pixels(&dest);
    assert_eq!((w, h), (500, 3000));
    assert_eq!((info.width, info.height), (w, h));
    // A gradient from red to blue: top is red, bottom is blue.
    let top = px[250];
    let bottom = px[px.len() - 250];
    assert!(top[0] > 200 && top[2] < 50, "top {top:?}");
    assert!(bottom[2] > 200 && bottom[0] < 50, "bottom {bottom:?}");
    assert_browser_gone(&s.text());
}

#[tokio::test]
async fn a_selector_that_never_appears_times_out_and_leaves_no_process() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("attempt-1.png");
    let mut s = sink();
    let req = request(serde_json::json!({
        "url": server.url("/never"), "wait_for": "#never", "timeout": "8s",
    }));
    let err = capture(&req, &[], &dest, &mut s.out, &CancellationToken::new())
        .await
        .expect_err("times out");
    settle().await;
    assert!(
        matches!(&err, ScreenshotError::WaitTimeout { selector, .. } if selector == "#never"),
        "{err:?}"
    );
    assert_eq!(err.kind(), "wait_timeout");
    assert!(err.retryable());
    assert!(!dest.exists());
    assert_browser_gone(&s.text());
}

#[tokio::test]
async fn cancel_stops_the_browser() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("attempt-1.png");
    let mut s = sink();
    let cancel = CancellationToken::new();
    // Cancel once the step says it is waiting (so the browser is surely running).
    let watcher = {
        let text = s.text.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            while !text.lock().expect("lock").contains("waiting for") {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            cancel.cancel();
        })
    };
    let req = request(serde_json::json!({
        "url": server.url("/never"), "wait_for": "#never", "timeout": "30s",
    }));
    let err = capture(&req, &[], &dest, &mut s.out, &cancel)
        .await
        .expect_err("cancelled");
    watcher.await.expect("watcher");
    settle().await;
    assert!(matches!(err, ScreenshotError::Cancelled), "{err:?}");
    assert_browser_gone(&s.text());
}

#[tokio::test]
async fn a_missing_browser_says_how_to_install_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = sink();
    let req = request(serde_json::json!({
        "url": "http://127.0.0.1:9/", "browser": "/nonexistent/bin/chromium",
    }));
    let err = capture(
        &req,
        &[],
        &dir.path().join("a.png"),
        &mut s.out,
        &CancellationToken::new(),
    )
    .await
    .expect_err("no browser");
    assert!(
        matches!(err, ScreenshotError::BrowserMissing { .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("apt-get install chromium"), "{message}");
    assert!(message.contains("/nonexistent/bin/chromium"), "{message}");
}

#[tokio::test]
async fn an_unreachable_url_is_a_retryable_navigation_error() {
    // A port that was just free: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = sink();
    let req = request(serde_json::json!({ "url": format!("http://127.0.0.1:{port}/") }));
    let err = capture(
        &req,
        &[],
        &dir.path().join("a.png"),
        &mut s.out,
        &CancellationToken::new(),
    )
    .await
    .expect_err("refused");
    settle().await;
    assert!(
        matches!(&err, ScreenshotError::Navigation { message, .. } if message.contains("ERR_CONNECTION_REFUSED")),
        "{err:?}"
    );
    assert!(err.retryable());
    assert_browser_gone(&s.text());
}

/// An HTTPS server on 127.0.0.1 whose certificate is issued by a fresh private CA; `ca.pem`
/// is written into `dir`. `send_chain`: whether the server sends the CA with its certificate.
async fn tls_server(dir: &Path, send_chain: bool) -> u16 {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use tokio_rustls::rustls;

    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "runbook test CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("ca.pem");

    let mut chain = vec![leaf.der().clone()];
    if send_chain {
        chain.push(ca.der().clone());
    }
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // Chromium closes connections whose certificate it rejects: not an error here.
                if let Ok(tls) = acceptor.accept(sock).await {
                    serve(tls, port, port, port, Seen::default()).await;
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn a_private_ca_is_accepted_only_when_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = tls_server(dir.path(), true).await;
    let url = format!("https://127.0.0.1:{port}/late");
    let ca = dir.path().join("ca.pem");

    // Not trusted by default.
    let mut s = sink();
    let req = request(serde_json::json!({ "url": url }));
    let err = capture(
        &req,
        &[],
        &dir.path().join("a.png"),
        &mut s.out,
        &CancellationToken::new(),
    )
    .await
    .expect_err("untrusted");
    assert!(
        matches!(&err, ScreenshotError::Tls { message, .. } if message.contains("ERR_CERT_AUTHORITY_INVALID")),
        "{err:?}"
    );
    assert!(!err.retryable());

    // ca_file: the CA's key is accepted (the server sends the CA in its chain).
    let mut s = sink();
    let req = request(serde_json::json!({ "url": url, "ca_file": ca, "wait_for": "#late" }));
    let info = capture(
        &req,
        &[],
        &dir.path().join("b.png"),
        &mut s.out,
        &CancellationToken::new(),
    )
    .await
    .expect("trusted through ca_file");
    assert_eq!(info.http_status, Some(200));
    assert!(!info.insecure_skip_verify);

    // insecure_skip_verify: works, and says so loudly.
    let mut s = sink();
    let req = request(serde_json::json!({ "url": url, "insecure_skip_verify": true }));
    let info = capture(
        &req,
        &[],
        &dir.path().join("c.png"),
        &mut s.out,
        &CancellationToken::new(),
    )
    .await
    .expect("insecure");
    settle().await;
    assert!(info.insecure_skip_verify);
    assert!(s
        .text()
        .contains("WARNING: TLS certificate verification is OFF"));
    assert_browser_gone(&s.text());
}

#[tokio::test]
async fn ca_file_cannot_help_when_the_server_does_not_send_the_ca() {
    // The documented limitation: Chromium matches the keys of the chain the server sent.
    let dir = tempfile::tempdir().expect("tempdir");
    let port = tls_server(dir.path(), false).await;
    let mut s = sink();
    let req = request(serde_json::json!({
        "url": format!("https://127.0.0.1:{port}/late"), "ca_file": dir.path().join("ca.pem"),
    }));
    let err = capture(
        &req,
        &[],
        &dir.path().join("a.png"),
        &mut s.out,
        &CancellationToken::new(),
    )
    .await
    .expect_err("CA not in the chain");
    assert_eq!(err.kind(), "tls", "{err:?}");
}
