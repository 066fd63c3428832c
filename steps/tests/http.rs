//! HTTP probes against real servers on 127.0.0.1 (plain, TLS, mutual TLS), checking both the
//! result and what an assessor would read in the step's output.

#[path = "support/httpd.rs"]
mod httpd;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use runbook_engine::event::{RunEvent, Stream};
use runbook_engine::runbook::StepId;
use runbook_engine::runner::OutputSink;
use runbook_steps::http::{
    execute, BasicAuth, HttpRequest, HttpResponse, ProbeError, StatusExpect, StatusItem,
};

use httpd::{Httpd, Pki, Request, Response};

/// What a probe wrote to its sink.
#[derive(Debug, Default)]
struct Transcript {
    stdout: String,
    stderr: String,
}

impl Transcript {
    fn all(&self) -> String {
        format!("{}{}", self.stderr, self.stdout)
    }
}

async fn probe_with(
    req: &HttpRequest,
    secrets: &[String],
    cancel: &CancellationToken,
) -> (Result<HttpResponse, ProbeError>, Transcript) {
    let (tx, mut rx) = mpsc::channel(1024);
    let mut sink = OutputSink::new(tx, StepId::new("probe"), Arc::from("local"), 1);
    let result = execute(req, secrets, &mut sink, cancel).await;
    drop(sink);
    let mut t = Transcript::default();
    while let Some(ev) = rx.recv().await {
        if let RunEvent::Output { stream, data, .. } = ev {
            let text = String::from_utf8_lossy(&data);
            match stream {
                Stream::Stdout => t.stdout.push_str(&text),
                Stream::Stderr => t.stderr.push_str(&text),
            }
        }
    }
    (result, t)
}

async fn probe(req: &HttpRequest) -> (Result<HttpResponse, ProbeError>, Transcript) {
    probe_with(req, &[], &CancellationToken::new()).await
}

fn get(url: String) -> HttpRequest {
    HttpRequest {
        url,
        ..HttpRequest::default()
    }
}

#[tokio::test]
async fn status_expectations_code_list_range_and_mismatch() {
    let server = Httpd::new()
        .route("/ok", |_| Response::text(200, "fine"))
        .route("/empty", |_| Response::new(204))
        .route("/moved", |_| Response::redirect(301, "/ok"))
        .route("/warming", |_| {
            Response::text(503, "warming up: etcd is not ready yet")
        })
        .start()
        .await;

    let (r, _) = probe(&get(server.url("/ok"))).await;
    assert_eq!(r.expect("default 2xx").status, 200);

    for expect in [
        StatusExpect::Code(204),
        StatusExpect::AnyOf(vec![StatusItem::Code(200), StatusItem::Code(204)]),
        StatusExpect::Pattern("200-299".into()),
        StatusExpect::Pattern("2xx".into()),
    ] {
        let req = HttpRequest {
            expect_status: Some(expect.clone()),
            ..get(server.url("/empty"))
        };
        let (r, _) = probe(&req).await;
        assert_eq!(r.expect("204 expected").status, 204, "{expect:?}");
    }

    let req = HttpRequest {
        follow_redirects: Some(false),
        expect_status: Some(StatusExpect::AnyOf(vec![
            StatusItem::Code(200),
            StatusItem::Pattern("3xx".into()),
        ])),
        ..get(server.url("/moved"))
    };
    let (r, _) = probe(&req).await;
    assert_eq!(r.expect("3xx in a list").status, 301);

    let req = HttpRequest {
        expect_status: Some(StatusExpect::Code(200)),
        ..get(server.url("/warming"))
    };
    let (r, t) = probe(&req).await;
    let err = r.expect_err("503 is not 200");
    assert_eq!(err.kind(), "unexpected_status");
    assert!(err.retryable());
    match &err {
        ProbeError::UnexpectedStatus {
            expected,
            got,
            body_start,
        } => {
            assert_eq!(expected, "200");
            assert_eq!(*got, 503);
            assert!(body_start.starts_with("warming up"), "{body_start}");
        }
        other => panic!("wrong error: {other:?}"),
    }
    assert!(
        err.to_string().contains("expected status 200, got 503"),
        "{err}"
    );
    // The evidence shows the status line, the body and the verdict.
    assert!(t.stderr.contains("< HTTP/1.1 503"), "{}", t.stderr);
    assert!(t
        .stderr
        .contains("! unexpected_status: expected status 200, got 503"));
    assert_eq!(t.stdout, "warming up: etcd is not ready yet");

    // A bad pattern is a config error found before any request is sent.
    let before = server.requests().len();
    let req = HttpRequest {
        expect_status: Some(StatusExpect::Pattern("20x".into())),
        ..get(server.url("/ok"))
    };
    let (r, _) = probe(&req).await;
    let err = r.expect_err("bad pattern");
    assert_eq!(err.kind(), "config");
    assert!(!err.retryable());
    assert_eq!(server.requests().len(), before);
}

#[test]
fn request_tables_deserialise_strictly() {
    let req: HttpRequest = serde_json::from_value(json!({
        "url": "https://10.0.0.1:6443/readyz",
        "expect_status": [200, "3xx"],
        "timeout": "5s",
        "basic": { "user": "u", "password": "p" },
    }))
    .expect("valid table");
    assert_eq!(
        req.expect_status,
        Some(StatusExpect::AnyOf(vec![
            StatusItem::Code(200),
            StatusItem::Pattern("3xx".into())
        ]))
    );
    assert_eq!(
        req.basic,
        Some(BasicAuth {
            user: "u".into(),
            password: "p".into()
        })
    );
    let typo = serde_json::from_value::<HttpRequest>(json!({ "url": "http://x", "expect": 200 }));
    assert!(typo.is_err(), "unknown keys are refused");
}

#[tokio::test]
async fn json_body_query_and_headers_reach_the_server_and_json_comes_back() {
    let server = Httpd::new()
        .route("/echo", |req: &Request| {
            let received: serde_json::Value =
                serde_json::from_slice(&req.body).unwrap_or(serde_json::Value::Null);
            Response::json(
                201,
                &json!({
                    "method": req.method,
                    "query": req.query,
                    "content_type": req.header("content-type"),
                    "trace": req.header("x-trace"),
                    "received": received,
                }),
            )
        })
        .start()
        .await;
    let req = HttpRequest {
        method: Some("post".into()),
        json: Some(json!({ "name": "node-1", "labels": ["a", "b"] })),
        query: BTreeMap::from([("dryRun".to_owned(), "All".to_owned())]),
        headers: BTreeMap::from([("X-Trace".to_owned(), "abc".to_owned())]),
        ..get(server.url("/echo"))
    };
    let (r, t) = probe(&req).await;
    let resp = r.expect("201 is 2xx");
    let out = resp.to_json();
    assert_eq!(out["status"], 201);
    assert_eq!(out["json"]["method"], "POST");
    assert_eq!(out["json"]["query"], "dryRun=All");
    assert_eq!(out["json"]["content_type"], "application/json");
    assert_eq!(out["json"]["trace"], "abc");
    assert_eq!(out["json"]["received"]["name"], "node-1");
    assert_eq!(out["headers"]["content-type"], "application/json");
    assert!(out["latency_ms"].is_u64());
    assert!(out["tls"].is_null());
    assert!(
        t.stderr.contains("> POST http://127.0.0.1:"),
        "{}",
        t.stderr
    );
    assert!(t.stderr.contains("?dryRun=All"));
    assert!(t.stderr.contains("> x-trace: abc"));
    assert!(t.stderr.contains("> (json body, "));
    assert!(t.stdout.contains("\"node-1\""));

    let both = HttpRequest {
        body: Some("x".into()),
        json: Some(json!(1)),
        ..get(server.url("/echo"))
    };
    assert_eq!(
        probe(&both).await.0.expect_err("two bodies").kind(),
        "config"
    );
}

#[tokio::test]
async fn endpoint_ready_after_some_requests() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let server = Httpd::new()
        .route("/readyz", move |_| {
            if counter.fetch_add(1, Ordering::SeqCst) < 2 {
                Response::text(503, "not ready")
            } else {
                Response::text(200, "ok")
            }
        })
        .start()
        .await;
    let req = get(server.url("/readyz"));
    let mut failures = Vec::new();
    let mut ok = None;
    // What the engine's `retry`/`until` does, spelled out: try, look at the error, try again.
    for _ in 0..5 {
        match probe(&req).await.0 {
            Ok(resp) => {
                ok = Some(resp);
                break;
            }
            Err(e) => {
                assert!(e.retryable(), "{e}");
                failures.push(e.kind());
            }
        }
    }
    assert_eq!(ok.expect("ready on the third request").body, "ok");
    assert_eq!(failures, ["unexpected_status", "unexpected_status"]);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn timeouts_say_which_phase() {
    let server = Httpd::new()
        .route("/slow", |_| {
            Response::text(200, "late").delayed(Duration::from_secs(30))
        })
        .start()
        .await;
    let req = HttpRequest {
        timeout: Some("300ms".into()),
        ..get(server.url("/slow"))
    };
    let (r, t) = probe(&req).await;
    let err = r.expect_err("slow server");
    assert_eq!(err.kind(), "timeout");
    assert!(err.retryable());
    assert!(
        err.to_string().contains("waiting for the response headers"),
        "{err}"
    );
    assert!(
        t.stderr.contains("! timeout: timed out after 300ms"),
        "{}",
        t.stderr
    );

    // A port that accepts but never completes a TLS handshake: still connecting.
    let (addr, silent) = httpd::silent_listener().await;
    let req = HttpRequest {
        timeout: Some("300ms".into()),
        ..get(format!("https://{addr}/"))
    };
    let err = probe(&req).await.0.expect_err("no handshake");
    assert_eq!(err.kind(), "timeout");
    assert!(err.to_string().contains("connecting"), "{err}");
    silent.abort();

    let bad = HttpRequest {
        timeout: Some("30".into()),
        ..get(server.url("/slow"))
    };
    assert_eq!(probe(&bad).await.0.expect_err("no unit").kind(), "config");
}

#[tokio::test]
async fn cancel_aborts_a_request_in_flight() {
    let server = Arc::new(
        Httpd::new()
            .route("/slow", |_| {
                Response::text(200, "late").delayed(Duration::from_secs(30))
            })
            .start()
            .await,
    );
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let watched = server.clone();
    // Cancel once the server holds the request, so the probe is surely waiting on the network.
    tokio::spawn(async move {
        while watched.requests().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        trigger.cancel();
    });
    let req = get(server.url("/slow"));
    // The outer bound only keeps a broken cancel from hanging the suite.
    let (r, t) = tokio::time::timeout(Duration::from_secs(20), probe_with(&req, &[], &cancel))
        .await
        .expect("cancel must end the probe");
    let err = r.expect_err("cancelled");
    assert_eq!(err.kind(), "cancelled");
    assert!(!err.retryable());
    assert!(t.stderr.contains("! cancelled"));
}

#[tokio::test]
async fn refused_and_dns_failures_are_told_apart() {
    let port = httpd::closed_port();
    let (r, t) = probe(&get(format!("http://127.0.0.1:{port}/"))).await;
    let err = r.expect_err("nothing listens");
    assert_eq!(err.kind(), "connect_refused", "{err:?}");
    assert!(err.retryable());
    assert!(err.to_string().contains(&format!("127.0.0.1:{port}")));
    assert!(t.stderr.contains("! connect_refused"));

    // `.invalid` is answered locally (RFC 6761): no query leaves the machine.
    let (r, _) = probe(&get("http://nonexistent.invalid/healthz".into())).await;
    let err = r.expect_err("cannot resolve");
    assert_eq!(err.kind(), "dns", "{err:?}");
    assert!(err.retryable());
    assert!(err.to_string().contains("nonexistent.invalid"), "{err}");
}

#[tokio::test]
async fn tls_with_private_ca_and_without() {
    let pki = Pki::new("runbook test CA");
    let leaf = pki.server("server", &["127.0.0.1", "localhost"]);
    let server = Httpd::new()
        .route("/healthz", |_| Response::text(200, "ok"))
        .tls(&leaf)
        .start()
        .await;

    // Not signed by anything the system trusts.
    let (r, t) = probe(&get(server.url("/healthz"))).await;
    let err = r.expect_err("unknown issuer");
    assert_eq!(err.kind(), "tls", "{err:?}");
    assert!(!err.retryable());
    assert!(err.to_string().contains("unknown issuer"), "{err}");
    assert!(
        t.stderr.contains("! tls: TLS failed: unknown issuer"),
        "{}",
        t.stderr
    );

    let req = HttpRequest {
        ca_file: Some(pki.ca_file.clone()),
        ..get(server.url("/healthz"))
    };
    let (r, t) = probe(&req).await;
    let resp = r.expect("trusted through ca_file");
    let peer = resp.tls.clone().expect("peer recorded");
    assert_eq!(peer.subject, "CN=127.0.0.1");
    assert_eq!(peer.issuer, "CN=runbook test CA");
    assert_eq!(peer.sha256_fingerprint, fingerprint(&leaf.cert_pem));
    assert!(peer.not_after.ends_with('Z'), "{}", peer.not_after);
    assert_eq!(
        resp.to_json()["tls"]["sha256_fingerprint"],
        peer.sha256_fingerprint
    );
    assert!(t.stderr.contains(&peer.sha256_fingerprint), "{}", t.stderr);
    assert!(t.stderr.contains("subject `CN=127.0.0.1`"));
    assert!(!t.stderr.contains("WARNING"));

    let req = HttpRequest {
        insecure_skip_verify: Some(true),
        ..get(server.url("/healthz"))
    };
    let (r, t) = probe(&req).await;
    let resp = r.expect("insecure accepts anything");
    assert_eq!(
        resp.tls.expect("peer still recorded").sha256_fingerprint,
        fingerprint(&leaf.cert_pem)
    );
    assert!(
        t.stderr.contains("WARNING: insecure_skip_verify is on"),
        "{}",
        t.stderr
    );

    let contradiction = HttpRequest {
        insecure_skip_verify: Some(true),
        ca_file: Some(pki.ca_file.clone()),
        ..get(server.url("/healthz"))
    };
    assert_eq!(
        probe(&contradiction).await.0.expect_err("both").kind(),
        "config"
    );
}

#[tokio::test]
async fn tls_hostname_mismatch_and_expiry_are_named() {
    let pki = Pki::new("runbook test CA");
    let elsewhere = pki.server("elsewhere", &["other.test"]);
    let server = Httpd::new()
        .route("/", |_| Response::text(200, "ok"))
        .tls(&elsewhere)
        .start()
        .await;
    let req = HttpRequest {
        ca_file: Some(pki.ca_file.clone()),
        ..get(server.url("/"))
    };
    let err = probe(&req).await.0.expect_err("wrong name");
    assert_eq!(err.kind(), "tls", "{err:?}");
    let text = err.to_string();
    assert!(text.contains("hostname mismatch"), "{text}");
    assert!(text.contains("127.0.0.1"), "{text}");
    assert!(text.contains("other.test"), "{text}");

    let old = pki.expired_server("old", &["127.0.0.1"]);
    let server = Httpd::new()
        .route("/", |_| Response::text(200, "ok"))
        .tls(&old)
        .start()
        .await;
    let req = HttpRequest {
        ca_file: Some(pki.ca_file.clone()),
        ..get(server.url("/"))
    };
    let err = probe(&req).await.0.expect_err("expired");
    assert_eq!(err.kind(), "tls", "{err:?}");
    assert!(err.to_string().contains("expired"), "{err}");
}

#[tokio::test]
async fn bad_ca_and_client_files_are_config_errors() {
    let pki = Pki::new("runbook test CA");
    let junk = pki.path("junk.pem");
    std::fs::write(&junk, "not a certificate\n").expect("write");
    for ca in [pki.path("missing.pem"), junk] {
        let req = HttpRequest {
            ca_file: Some(ca.clone()),
            ..get("https://127.0.0.1:1/".into())
        };
        let err = probe(&req).await.0.expect_err("bad CA file");
        assert_eq!(err.kind(), "config", "{err}");
        assert!(err.to_string().contains(&ca.display().to_string()), "{err}");
    }
    let req = HttpRequest {
        client_key: Some(pki.path("k.pem")),
        ..get("https://127.0.0.1:1/".into())
    };
    assert_eq!(probe(&req).await.0.expect_err("key only").kind(), "config");
}

#[tokio::test]
async fn mutual_tls_with_and_without_a_client_certificate() {
    let pki = Pki::new("runbook test CA");
    let leaf = pki.server("server", &["127.0.0.1"]);
    let client = pki.client("client", "runbook-probe");
    let server = Httpd::new()
        .route("/", |_| Response::text(200, "hello client"))
        .mutual_tls(&leaf, &pki.ca_pem)
        .start()
        .await;

    let with = HttpRequest {
        ca_file: Some(pki.ca_file.clone()),
        client_cert: Some(client.cert_file.clone()),
        client_key: Some(client.key_file.clone()),
        ..get(server.url("/"))
    };
    let (r, _) = probe(&with).await;
    assert_eq!(r.expect("client cert accepted").body, "hello client");

    // Certificate and key in one file, over the insecure path (our own rustls config).
    let combined = pki.path("combined.pem");
    std::fs::write(&combined, format!("{}{}", client.cert_pem, client.key_pem)).expect("write");
    let insecure = HttpRequest {
        insecure_skip_verify: Some(true),
        client_cert: Some(combined),
        ..get(server.url("/"))
    };
    let (r, _) = probe(&insecure).await;
    assert_eq!(r.expect("insecure with client cert").status, 200);

    let without = HttpRequest {
        ca_file: Some(pki.ca_file.clone()),
        ..get(server.url("/"))
    };
    let err = probe(&without).await.0.expect_err("no client cert");
    assert_eq!(err.kind(), "tls", "{err:?}");
    assert!(err.to_string().contains("client certificate"), "{err}");
    assert!(
        server.requests().len() == 2,
        "the refused request never reached a handler"
    );
}

#[tokio::test]
async fn redirects_followed_and_not() {
    let server = Httpd::new()
        .route("/old", |_| Response::redirect(302, "/new"))
        .route("/new", |_| Response::text(200, "moved here"))
        .route("/loop", |_| Response::redirect(302, "/loop"))
        .start()
        .await;

    let (r, t) = probe(&get(server.url("/old"))).await;
    let resp = r.expect("followed");
    assert_eq!(resp.body, "moved here");
    assert!(resp.final_url.ends_with("/new"), "{}", resp.final_url);
    assert!(
        t.stderr.contains("* redirect 302 -> http://127.0.0.1:"),
        "{}",
        t.stderr
    );

    let req = HttpRequest {
        follow_redirects: Some(false),
        ..get(server.url("/old"))
    };
    let err = probe(&req).await.0.expect_err("302 is not 2xx");
    assert!(
        matches!(err, ProbeError::UnexpectedStatus { got: 302, .. }),
        "{err:?}"
    );
    let req = HttpRequest {
        follow_redirects: Some(false),
        expect_status: Some(StatusExpect::Code(302)),
        ..get(server.url("/old"))
    };
    let resp = probe(&req).await.0.expect("302 expected");
    assert_eq!(resp.headers["location"], "/new");

    let err = probe(&get(server.url("/loop"))).await.0.expect_err("loop");
    assert!(err.to_string().contains("redirects"), "{err}");
}

#[tokio::test]
async fn credentials_never_reach_the_sink() {
    const TOKEN: &str = "tok-3f9a1c-bearer-secret";
    const PASSWORD: &str = "hunter2-basic-password";
    const API_KEY: &str = "key-77d1-from-params";
    let server = Httpd::new()
        .route("/whoami", |req: &Request| {
            // A careless server echoing credentials back, in a header and in the body.
            let auth = req.header("authorization").unwrap_or_default().to_owned();
            Response::text(200, &format!("you sent {auth}"))
                .header("x-echo-auth", &auth)
                .header("set-cookie", "session=abc123")
        })
        .start()
        .await;

    let bearer = HttpRequest {
        bearer: Some(TOKEN.into()),
        headers: BTreeMap::from([("X-Api-Key".to_owned(), API_KEY.to_owned())]),
        query: BTreeMap::from([("key".to_owned(), API_KEY.to_owned())]),
        ..get(server.url("/whoami"))
    };
    let (r, t) = probe_with(&bearer, &[API_KEY.to_owned()], &CancellationToken::new()).await;
    let resp = r.expect("bearer accepted");
    assert_eq!(
        server.requests()[0].header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(server.requests()[0].header("x-api-key"), Some(API_KEY));
    let all = t.all();
    assert!(!all.contains(TOKEN), "{all}");
    assert!(!all.contains(API_KEY), "{all}");
    assert!(!all.contains("abc123"), "{all}");
    assert!(all.contains("> authorization: <redacted>"), "{all}");
    assert!(all.contains("> x-api-key: <redacted>"), "{all}");
    assert!(all.contains("key=<redacted>"), "{all}");
    assert_eq!(resp.headers["x-echo-auth"], "<redacted>");
    assert_eq!(resp.headers["set-cookie"], "<redacted>");

    let basic = HttpRequest {
        basic: Some(BasicAuth {
            user: "admin".into(),
            password: PASSWORD.into(),
        }),
        ..get(server.url("/whoami"))
    };
    let (r, t) = probe(&basic).await;
    r.expect("basic accepted");
    let sent = server.requests()[1]
        .header("authorization")
        .expect("sent")
        .to_owned();
    assert!(sent.starts_with("Basic "));
    let all = t.all();
    assert!(!all.contains(PASSWORD), "{all}");
    assert!(!all.contains(&sent["Basic ".len()..]), "{all}");

    // Credentials written into the URL itself.
    let in_url = get(format!("http://admin:url-pass-91c2@{}/whoami", server.addr));
    let (r, t) = probe(&in_url).await;
    r.expect("userinfo accepted");
    assert!(server.requests()[2]
        .header("authorization")
        .is_some_and(|a| a.starts_with("Basic ")));
    let all = t.all();
    assert!(!all.contains("url-pass-91c2"), "{all}");
    assert!(all.contains("> authorization: <redacted>"), "{all}");
}

#[tokio::test]
async fn large_bodies_are_bounded() {
    let server = Httpd::new()
        .route("/big", |_| Response::text(200, &"x".repeat(10_000)))
        .start()
        .await;
    let req = HttpRequest {
        max_body: Some(100),
        ..get(server.url("/big"))
    };
    let (r, t) = probe(&req).await;
    let resp = r.expect("ok");
    assert!(resp.truncated);
    assert_eq!(resp.body.len(), 100);
    assert_eq!(resp.body_bytes_total, 10_000);
    assert_eq!(t.stdout.len(), 100);
    assert!(
        t.stderr.contains("* body: 10000 bytes (truncated"),
        "{}",
        t.stderr
    );
    assert!(resp.to_json()["json"].is_null());
}

/// SHA-256 of a PEM certificate's DER, as the probe reports it.
fn fingerprint(pem: &str) -> String {
    use sha2::Digest;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let der = tokio_rustls::rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("PEM");
    hex::encode(sha2::Sha256::digest(der.as_ref()))
}
