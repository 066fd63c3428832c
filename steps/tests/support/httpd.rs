//! A small real HTTP/1.1 server on 127.0.0.1 for probe tests: plain or TLS (rustls, ring),
//! optionally requiring a client certificate, with a throwaway PKI made by rcgen.
//!
//! Other test crates can use it with `#[path = "…/steps/tests/support/httpd.rs"] mod httpd;`
//! given the dev-dependencies `rcgen`, `tempfile` and `tokio-rustls` (ring).
//!
//! One request per connection (`Connection: close`), routes matched on the exact path, every
//! request recorded. Handlers are plain closures; one that should change its answer over time
//! (ready after N requests) keeps its own counter.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::rustls;

/// A certificate authority for one test, its files in a temporary directory.
pub struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
    pub ca_pem: String,
    pub ca_file: PathBuf,
}

/// A leaf certificate and key, as PEM text and as files.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = params.self_signed(&ca_key).expect("CA cert");
        let ca_pem = ca.pem();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca_pem).expect("write CA");
        Self {
            dir,
            ca,
            ca_key,
            ca_pem,
            ca_file,
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, file_stem: &str, names: &[&str]) -> Leaf {
        self.leaf(
            file_stem,
            names,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            false,
        )
    }

    /// A server certificate for `names` whose validity ended years ago.
    pub fn expired_server(&self, file_stem: &str, names: &[&str]) -> Leaf {
        self.leaf(
            file_stem,
            names,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            true,
        )
    }

    /// A client certificate with common name `cn`.
    pub fn client(&self, file_stem: &str, cn: &str) -> Leaf {
        self.leaf(
            file_stem,
            &[cn],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            false,
        )
    }

    fn leaf(
        &self,
        file_stem: &str,
        names: &[&str],
        usage: rcgen::ExtendedKeyUsagePurpose,
        expired: bool,
    ) -> Leaf {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let sans: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(sans).expect("leaf params");
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().copied().unwrap_or(file_stem),
        );
        params.extended_key_usages = vec![usage];
        if expired {
            params.not_before = rcgen::date_time_ymd(2001, 1, 1);
            params.not_after = rcgen::date_time_ymd(2002, 1, 1);
        }
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("sign leaf");
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        let cert_file = self.dir.path().join(format!("{file_stem}.crt"));
        let key_file = self.dir.path().join(format!("{file_stem}.key"));
        std::fs::write(&cert_file, &cert_pem).expect("write cert");
        std::fs::write(&key_file, &key_pem).expect("write key");
        Leaf {
            cert_pem,
            key_pem,
            cert_file,
            key_file,
        }
    }

    /// A path in this PKI's directory, for tests that write files of their own.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Names lowercased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Wait this long before answering (for timeout and cancel tests).
    pub delay: Option<Duration>,
}

impl Response {
    pub fn new(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            delay: None,
        }
    }

    pub fn text(status: u16, body: &str) -> Self {
        Self::new(status)
            .header("content-type", "text/plain")
            .body(body.as_bytes().to_vec())
    }

    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        Self::new(status)
            .header("content-type", "application/json")
            .body(value.to_string().into_bytes())
    }

    pub fn redirect(status: u16, location: &str) -> Self {
        Self::new(status).header("location", location)
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: Vec<u8>) -> Self {
        self.body = body;
        self
    }

    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
}

type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// Builds a server: routes, then optionally TLS, then [`Httpd::start`].
#[derive(Default)]
pub struct Httpd {
    routes: HashMap<String, Handler>,
    tls: Option<(Leaf, Option<String>)>,
}

impl Httpd {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn route(
        mut self,
        path: &str,
        handler: impl Fn(&Request) -> Response + Send + Sync + 'static,
    ) -> Self {
        self.routes.insert(path.to_owned(), Arc::new(handler));
        self
    }

    /// Serve HTTPS with this certificate.
    pub fn tls(mut self, leaf: &Leaf) -> Self {
        self.tls = Some((leaf.clone(), None));
        self
    }

    /// Serve HTTPS and require a client certificate issued by `client_ca_pem`.
    pub fn mutual_tls(mut self, leaf: &Leaf, client_ca_pem: &str) -> Self {
        self.tls = Some((leaf.clone(), Some(client_ca_pem.to_owned())));
        self
    }

    pub async fn start(self) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let acceptor = self.tls.as_ref().map(|(leaf, client_ca)| {
            tokio_rustls::TlsAcceptor::from(Arc::new(server_config(leaf, client_ca.as_deref())))
        });
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
        let routes = Arc::new(self.routes);
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let routes = routes.clone();
                let seen = seen.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        // A failed handshake is the client's problem; it sees the alert.
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                serve(tls, &routes, &seen).await;
                            }
                        }
                        None => serve(tcp, &routes, &seen).await,
                    }
                });
            }
        });
        Server {
            addr,
            scheme,
            requests,
            task,
        }
    }
}

fn server_config(leaf: &Leaf, client_ca: Option<&str>) -> rustls::ServerConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("server cert PEM");
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("server key PEM");
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(cert.expect("client CA PEM")).expect("client CA");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder.with_single_cert(certs, key).expect("server config")
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    routes: &HashMap<String, Handler>,
    seen: &Mutex<Vec<Request>>,
) {
    let Some(req) = read_request(&mut stream).await else {
        return;
    };
    let resp = match routes.get(&req.path) {
        Some(handler) => handler(&req),
        None => Response::text(404, "no such route"),
    };
    if let Ok(mut s) = seen.lock() {
        s.push(req);
    }
    if let Some(d) = resp.delay {
        tokio::time::sleep(d).await;
    }
    let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    for (name, value) in &resp.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        resp.body.len()
    ));
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(&resp.body).await;
    let _ = stream.shutdown().await;
}

async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_owned();
    let target = first.next()?.to_owned();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target, None),
    };
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Some(Request {
        method,
        path,
        query,
        headers,
        body,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// A running server; stops when dropped.
pub struct Server {
    pub addr: SocketAddr,
    scheme: &'static str,
    requests: Arc<Mutex<Vec<Request>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// `http(s)://127.0.0.1:PORT/path`
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{}", self.scheme, self.addr, path)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Requests received so far (handshake failures never get here).
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP port on 127.0.0.1 that accepts connections and never says anything: a TLS handshake
/// or a request against it hangs until the client gives up.
pub async fn silent_listener() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    (addr, task)
}

/// A port on 127.0.0.1 with nothing listening: bound, read, released.
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local addr").port()
}
