//! TCP probes against real ports on 127.0.0.1.

#[path = "support/httpd.rs"]
mod httpd;

use std::sync::Arc;

use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use runbook_engine::event::{RunEvent, Stream};
use runbook_engine::runbook::StepId;
use runbook_engine::runner::OutputSink;
use runbook_steps::http::ProbeError;
use runbook_steps::tcp::{probe_tcp, TcpConnected, TcpRequest};

async fn probe(
    req: &TcpRequest,
    cancel: &CancellationToken,
) -> (Result<TcpConnected, ProbeError>, String) {
    let (tx, mut rx) = mpsc::channel(64);
    let mut sink = OutputSink::new(tx, StepId::new("port"), Arc::from("local"), 1);
    let result = probe_tcp(req, &mut sink, cancel).await;
    drop(sink);
    let mut stderr = String::new();
    while let Some(ev) = rx.recv().await {
        if let RunEvent::Output {
            stream: Stream::Stderr,
            data,
            ..
        } = ev
        {
            stderr.push_str(&String::from_utf8_lossy(&data));
        }
    }
    (result, stderr)
}

fn to(host: &str, port: u16) -> TcpRequest {
    TcpRequest {
        host: host.into(),
        port,
        timeout: Some("5s".into()),
    }
}

#[tokio::test]
async fn open_port_connects() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (r, log) = probe(&to("127.0.0.1", port), &CancellationToken::new()).await;
    let c = r.expect("port is open");
    assert_eq!(c.peer, format!("127.0.0.1:{port}"));
    assert_eq!(c.to_json()["peer"], c.peer);
    assert!(
        log.contains(&format!("> tcp connect 127.0.0.1:{port}")),
        "{log}"
    );
    assert!(
        log.contains(&format!("< connected to 127.0.0.1:{port}")),
        "{log}"
    );
}

#[tokio::test]
async fn closed_port_is_refused() {
    let port = httpd::closed_port();
    let (r, log) = probe(&to("127.0.0.1", port), &CancellationToken::new()).await;
    let err = r.expect_err("nothing listens");
    assert_eq!(err.kind(), "connect_refused", "{err:?}");
    assert!(err.retryable());
    assert!(log.contains("! connect_refused"), "{log}");
}

#[tokio::test]
async fn unresolvable_name_is_dns() {
    let (r, _) = probe(&to("nonexistent.invalid", 22), &CancellationToken::new()).await;
    let err = r.expect_err("cannot resolve");
    assert_eq!(err.kind(), "dns", "{err:?}");
    assert!(err.retryable());
}

#[tokio::test]
async fn cancelled_and_misconfigured_probes() {
    let cancel = CancellationToken::new();
    cancel.cancel();
    let (r, _) = probe(&to("127.0.0.1", 22), &cancel).await;
    assert_eq!(r.expect_err("cancelled").kind(), "cancelled");

    let req = TcpRequest {
        timeout: Some("soon".into()),
        ..to("127.0.0.1", 22)
    };
    let (r, _) = probe(&req, &CancellationToken::new()).await;
    assert_eq!(r.expect_err("bad timeout").kind(), "config");

    let typo = serde_json::from_value::<TcpRequest>(json!({ "host": "h", "port": 22, "tries": 3 }));
    assert!(typo.is_err(), "unknown keys are refused");
}
