//! Evidence an assessor can trust without trusting the operator (issue 18): no credential from
//! the environment in the bundle, a verify that fails closed, trusted comments and log closing
//! records compared with the bundle, RFC 3161 time from a real TSA (`openssl ts -reply` behind
//! an HTTP server on 127.0.0.1, checked again with `openssl ts -verify`), the chain of drills,
//! and the run's context.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::common::{assert_bundle_lacks, find_bundle, read_json, Test, BIN};

fn runbook(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("RUNBOOK_TRUSTED_KEYS")
        .env_remove("RUNBOOK_TSA_CA")
        .env_remove("RUNBOOK_TIMESTAMP_URL")
        .env_remove("RUNBOOK_EVIDENCE_DIR")
        .output()
        .expect("runbook")
}

#[track_caller]
fn code(out: &std::process::Output, expected: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(expected), "{stderr}");
    stderr
}

fn sh(dir: &Path, script: &str) {
    let out = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const SIMPLE: &str = "[runbook]\nname = \"t\"\n[[steps]]\nid = \"a\"\nrun = \"echo hello\"\n[[steps]]\nid = \"b\"\nneeds = [\"a\"]\nrun = \"echo boom >&2; exit 3\"\ncontinue_on_failure = true\n";

fn last_line(stderr: &str) -> &str {
    stderr.trim_end().lines().last().unwrap_or("")
}

// Regression (issue 18): a CI checkout's remote `https://user:token@host/…` was copied into
// `manifest.json` verbatim, signed and handed to assessors.
#[test]
fn ci_remote_credentials_and_url_tokens_never_reach_the_bundle() {
    let cases = [
        (
            "https://gitlab-ci-token:glcbt-64_QmFzZTY0U2VjcmV0@gitlab.example.com/ops/rb.git",
            "glcbt-64_QmFzZTY0U2VjcmV0",
        ),
        (
            "https://x-access-token:ghs_16C7e42F292c6912E7710c838347Ae178B4a@github.com/o/r.git",
            "ghs_16C7e42F292c6912E7710c838347Ae178B4a",
        ),
        (
            "https://oauth2:ya29-a0AfH6SMBxOauthTok3n@git.example.com/ops.git",
            "ya29-a0AfH6SMBxOauthTok3n",
        ),
        (
            "https://git.example.com/ops.git?private_token=glpat-Pr1vateTok3nXyZ",
            "glpat-Pr1vateTok3nXyZ",
        ),
    ];
    for (remote, token) in cases {
        let t = Test::new().runbook(
            "[runbook]\nname = \"t\"\n[params]\nsource = { default = \"none\" }\n[evidence]\nfacts = [\"echo Authorization: Bearer fact-bearer-$((6*7))0123456789\"]\n[[steps]]\nid = \"a\"\nrun = \"echo hello\"\n",
        );
        let dir = t.path();
        sh(
            dir,
            &format!("git init -q . && git remote add origin '{remote}' && git -c user.email=a@b -c user.name=a commit -q --allow-empty -m x"),
        );
        let set = "source=https://artifacts.example.com/x.tgz?job_token=jt-SetParamTok3n&v=1";
        code(
            &runbook(
                dir,
                &[
                    "run",
                    "runbook.toml",
                    "--evidence-dir",
                    "proof",
                    "--no-progress",
                    "--set",
                    set,
                ],
            ),
            0,
        );
        let bundle = find_bundle(dir);
        let m = read_json(&bundle.join("manifest.json"));
        let recorded = m["context"]["git"]["remote"].as_str().expect("remote");
        assert!(
            recorded.contains("[REDACTED:url-"),
            "{remote} recorded as {recorded}"
        );
        assert!(
            recorded.contains("example.com") || recorded.contains("github.com"),
            "{recorded}"
        );
        let scrubbed = m["context"]["scrubbed"].to_string();
        assert!(scrubbed.contains("context.git.remote"), "{scrubbed}");
        assert!(scrubbed.contains("query:job_token"), "{scrubbed}");
        assert!(
            m["params"]["source"]
                .as_str()
                .expect("param")
                .contains("job_token=[REDACTED:url-query]&v=1"),
            "{}",
            m["params"]
        );
        // The Authorization shape rule applies to tool facts (from outside the runbook) too.
        assert!(
            m["context"]["facts"][0]["output"]
                .as_str()
                .expect("fact")
                .contains("[REDACTED:"),
            "{}",
            m["context"]["facts"]
        );
        assert_bundle_lacks(
            &bundle,
            &[token, "jt-SetParamTok3n", "fact-bearer-420123456789"],
        );
    }
}

struct Keys {
    key: PathBuf,
    public: PathBuf,
}

fn keygen(dir: &Path, stem: &str) -> Keys {
    let key = dir.join(format!("{stem}.key"));
    let public = dir.join(format!("{stem}.pub"));
    code(
        &runbook(
            dir,
            &[
                "keygen",
                "-s",
                key.to_str().expect("utf-8"),
                "-p",
                public.to_str().expect("utf-8"),
            ],
        ),
        0,
    );
    Keys { key, public }
}

fn run_simple(dir: &Path, extra: &[&str]) -> PathBuf {
    let mut args = vec![
        "run",
        "runbook.toml",
        "--evidence-dir",
        "proof",
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    code(&runbook(dir, &args), 0);
    find_bundle(dir)
}

// Regression (issue 18): a signed bundle verified without a key printed "not checked" and
// `ok`, exit 0: an assessor who forgot `--pubkey` passed a forged bundle.
#[test]
fn verify_fails_closed_without_a_trusted_key() {
    let t = Test::new().runbook(SIMPLE);
    let dir = t.path();
    let k = keygen(dir, "k");
    let other = keygen(dir, "other");
    let bundle = run_simple(dir, &["--sign-key", k.key.to_str().expect("utf-8")]);
    let b = bundle.to_str().expect("utf-8");

    let stderr = code(&runbook(dir, &["evidence", "verify", b]), 3);
    assert!(
        stderr.contains("signature was NOT checked")
            && stderr.contains("--pubkey FILE")
            && stderr.contains("--trusted-keys FILE")
            && stderr.contains("RUNBOOK_TRUSTED_KEYS"),
        "{stderr}"
    );
    assert!(!stderr.contains(": ok"), "{stderr}");

    let p = k.public.to_str().expect("utf-8");
    let stderr = code(&runbook(dir, &["evidence", "verify", b, "--pubkey", p]), 0);
    assert!(
        last_line(&stderr).contains("ok (signed by trusted key"),
        "{stderr}"
    );

    // A trusted-keys file with several keys: the one the signature names is used.
    let mut trusted = std::fs::read_to_string(&other.public).expect("pub");
    trusted.push_str("# the drill key\n");
    trusted.push_str(&std::fs::read_to_string(&k.public).expect("pub"));
    std::fs::write(dir.join("trusted.keys"), trusted).expect("write");
    code(
        &runbook(
            dir,
            &["evidence", "verify", b, "--trusted-keys", "trusted.keys"],
        ),
        0,
    );
    let by_env = Command::new(BIN)
        .args(["evidence", "verify", b])
        .current_dir(dir)
        .env("RUNBOOK_TRUSTED_KEYS", "trusted.keys")
        .output()
        .expect("runbook");
    code(&by_env, 0);
    // Only the other key trusted: the signature is not by a trusted key.
    let stderr = code(
        &runbook(
            dir,
            &[
                "evidence",
                "verify",
                b,
                "--pubkey",
                other.public.to_str().expect("utf-8"),
            ],
        ),
        3,
    );
    assert!(stderr.contains("wrong public key"), "{stderr}");
}

#[test]
fn unsigned_bundles_say_so_and_can_be_required_signed() {
    let t = Test::new().runbook(SIMPLE);
    let dir = t.path();
    let bundle = run_simple(dir, &[]);
    let b = bundle.to_str().expect("utf-8");
    let stderr = code(&runbook(dir, &["evidence", "verify", b]), 0);
    assert!(last_line(&stderr).contains("ok, but UNSIGNED"), "{stderr}");
    let stderr = code(
        &runbook(dir, &["evidence", "verify", b, "--require-signature"]),
        3,
    );
    assert!(
        stderr.contains("UNSIGNED") && stderr.contains("--require-signature"),
        "{stderr}"
    );
}

// Regression (issue 18): a signature by the genuine key whose trusted comment says
// `run:deadbeef status:failed sha256:0000…` verified `ok`.
#[test]
fn a_trusted_comment_that_disagrees_with_the_bundle_fails() {
    let t = Test::new().runbook(SIMPLE);
    let dir = t.path();
    let k = keygen(dir, "k");
    let bundle = run_simple(dir, &["--sign-key", k.key.to_str().expect("utf-8")]);
    let b = bundle.to_str().expect("utf-8");
    let p = k.public.to_str().expect("utf-8");
    // Re-signed with the genuine key by the real minisign, with a false trusted comment.
    let zeros = "0".repeat(64);
    let forged = Command::new("minisign")
        .args(["-S", "-m", "SHA256SUMS", "-s"])
        .arg(&k.key)
        .arg("-t")
        .arg(format!(
            "timestamp:1\tfile:SHA256SUMS\trun:deadbeef\tstatus:failed\tsha256:{zeros}"
        ))
        .current_dir(&bundle)
        .stdin(Stdio::null())
        .output()
        .expect("minisign is installed by scripts/test");
    assert!(
        forged.status.success(),
        "{}",
        String::from_utf8_lossy(&forged.stderr)
    );
    let stderr = code(&runbook(dir, &["evidence", "verify", b, "--pubkey", p]), 3);
    for needle in [
        "trusted comment disagrees with the bundle: it says run `deadbeef`",
        "it says status `failed`, the bundle says status `succeeded`",
        &format!("it says sha256 `{zeros}`"),
    ] {
        assert!(stderr.contains(needle), "{needle}\n{stderr}");
    }
}

// Regression (issue 18): each log's closing `--- attempt N: exit code …` record was not compared
// with the journal, so a log "fixed" to read success passed once SHA256SUMS was rewritten.
#[test]
fn a_log_closing_record_that_disagrees_with_the_journal_fails() {
    let t = Test::new().runbook(SIMPLE);
    let dir = t.path();
    let bundle = run_simple(dir, &[]);
    let b = bundle.to_str().expect("utf-8");
    let log = bundle.join("steps/b/local/attempt-1.log");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("--- attempt 1: exit code 3\n"), "{text}");
    std::fs::write(
        &log,
        text.replace("--- attempt 1: exit code 3", "--- attempt 1: succeeded"),
    )
    .expect("edit");
    sh(
        &bundle,
        "grep -v ' steps/b/local/attempt-1.log$' SHA256SUMS > s && sha256sum steps/b/local/attempt-1.log >> s && sort -k2 s > SHA256SUMS && rm s",
    );
    let stderr = code(&runbook(dir, &["evidence", "verify", b]), 3);
    assert!(
        stderr.contains(
            "steps/b/local/attempt-1.log disagrees with journal.jsonl: it ends `--- attempt 1: succeeded`, the journal says `attempt 1: exit code 3`"
        ),
        "{stderr}"
    );
}

/// A time-stamping authority on 127.0.0.1: `openssl ts -reply` behind a Python HTTP server,
/// with a CA and a TSA certificate (extendedKeyUsage=critical,timeStamping) made here.
struct Tsa {
    child: Child,
    url: String,
}

impl Drop for Tsa {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TSA_SERVER: &str = r#"
import http.server, subprocess, sys, os
os.chdir(sys.argv[1])
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        query = self.rfile.read(int(self.headers['Content-Length']))
        if self.headers.get('Content-Type') != 'application/timestamp-query':
            self.send_response(415); self.end_headers(); return
        with open('q.tsq', 'wb') as f:
            f.write(query)
        r = subprocess.run(['openssl', 'ts', '-reply', '-config', 'tsa.cnf', '-queryfile', 'q.tsq', '-out', 'r.tsr'], capture_output=True)
        if r.returncode != 0:
            sys.stderr.write(r.stderr.decode())
            self.send_response(500); self.end_headers(); return
        data = open('r.tsr', 'rb').read()
        self.send_response(200)
        self.send_header('Content-Type', 'application/timestamp-reply')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(('127.0.0.1', 0), H)
print(server.server_port, flush=True)
server.serve_forever()
"#;

/// Makes a CA (`<dir>/ca.pem`) and a TSA certificate signed by it with a key of `tsa_key`
/// (`openssl req -newkey` argument), then starts the TSA.
fn start_tsa(dir: &Path, tsa_key: &str) -> Tsa {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(
        dir.join("tsa.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=critical,timeStamping\n",
    )
    .expect("ext");
    std::fs::write(
        dir.join("tsa.cnf"),
        "[ tsa ]\ndefault_tsa = tsa1\n[ tsa1 ]\ndir = .\nserial = ./serial\ncrypto_device = builtin\nsigner_cert = ./tsa.pem\nsigner_key = ./tsa.key\nsigner_digest = sha256\ndefault_policy = 1.2.3.4.1\ndigests = sha256, sha384, sha512\naccuracy = secs:1\nclock_precision_digits = 0\nordering = no\ntsa_name = yes\ness_cert_id_chain = no\ness_cert_id_alg = sha256\n",
    )
    .expect("cnf");
    std::fs::write(dir.join("serial"), "01\n").expect("serial");
    sh(
        dir,
        &format!(
            "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 \
             -subj '/CN=Drill Test Root CA' -addext 'basicConstraints=critical,CA:TRUE' \
             -addext 'keyUsage=critical,keyCertSign,cRLSign' 2>/dev/null && \
             openssl req -newkey {tsa_key} -nodes -keyout tsa.key -out tsa.csr \
             -subj '/CN=Drill Test TSA' 2>/dev/null && \
             openssl x509 -req -in tsa.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
             -out tsa.pem -days 2 -extfile tsa.ext 2>/dev/null"
        ),
    );
    std::fs::write(dir.join("server.py"), TSA_SERVER).expect("server");
    let mut child = Command::new("python3")
        .arg(dir.join("server.py"))
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("port");
    let port: u16 = line.trim().parse().expect("the TSA server prints its port");
    Tsa {
        child,
        url: format!("http://127.0.0.1:{port}/tsa"),
    }
}

#[test]
fn rfc3161_time_from_a_real_tsa_verifies_with_runbook_and_openssl() {
    let t = Test::new().runbook(SIMPLE);
    let dir = t.path();
    // ECDSA P-256 TSA key, RSA CA: both signature checks are exercised.
    let tsa = start_tsa(&dir.join("tsa"), "ec -pkeyopt ec_paramgen_curve:prime256v1");
    let k = keygen(dir, "k");
    let out = runbook(
        dir,
        &[
            "run",
            "runbook.toml",
            "--evidence-dir",
            "proof",
            "--no-progress",
            "--sign-key",
            k.key.to_str().expect("utf-8"),
            "--timestamp-url",
            &tsa.url,
        ],
    );
    let stderr = code(&out, 0);
    assert!(
        stderr.contains("time-stamped by http://127.0.0.1:"),
        "{stderr}"
    );
    let bundle = find_bundle(dir);
    assert!(bundle.join("SHA256SUMS.tsr").exists());
    let b = bundle.to_str().expect("utf-8");
    let p = k.public.to_str().expect("utf-8");
    let ca = dir.join("tsa/ca.pem");
    let ca_s = ca.to_str().expect("utf-8");

    // The independent check: OpenSSL accepts the token for this SHA256SUMS and this CA.
    let openssl = Command::new("openssl")
        .args([
            "ts",
            "-verify",
            "-data",
            "SHA256SUMS",
            "-in",
            "SHA256SUMS.tsr",
            "-CAfile",
        ])
        .arg(&ca)
        .current_dir(&bundle)
        .output()
        .expect("openssl");
    assert!(
        String::from_utf8_lossy(&openssl.stdout).contains("Verification: OK"),
        "{}{}",
        String::from_utf8_lossy(&openssl.stdout),
        String::from_utf8_lossy(&openssl.stderr)
    );

    let stderr = code(
        &runbook(
            dir,
            &["evidence", "verify", b, "--pubkey", p, "--tsa-ca", ca_s],
        ),
        0,
    );
    assert!(
        stderr.contains("timestamp: time-stamped 20") && stderr.contains("by `CN=Drill Test TSA`"),
        "{stderr}"
    );
    assert!(
        last_line(&stderr).contains("time-stamped") && last_line(&stderr).contains("trusted TSA"),
        "{stderr}"
    );

    // Without the CA: fails closed, saying how to give it.
    let stderr = code(&runbook(dir, &["evidence", "verify", b, "--pubkey", p]), 3);
    assert!(stderr.contains("--tsa-ca FILE"), "{stderr}");

    // Another CA: not trusted (and OpenSSL agrees).
    let other = start_tsa(&dir.join("other"), "rsa:2048");
    drop(other);
    let stderr = code(
        &runbook(
            dir,
            &[
                "evidence",
                "verify",
                b,
                "--pubkey",
                p,
                "--tsa-ca",
                dir.join("other/ca.pem").to_str().expect("utf-8"),
            ],
        ),
        3,
    );
    // Same CA name, another key: the forged issuer is caught by its signature.
    assert!(
        stderr.contains("the TSA's certificate is not trusted")
            && stderr.contains("its signature does not verify with that key"),
        "{stderr}"
    );
    let openssl = Command::new("openssl")
        .args([
            "ts",
            "-verify",
            "-data",
            "SHA256SUMS",
            "-in",
            "SHA256SUMS.tsr",
            "-CAfile",
        ])
        .arg(dir.join("other/ca.pem"))
        .current_dir(&bundle)
        .output()
        .expect("openssl");
    assert!(!openssl.status.success());

    // A token for other data: the imprint does not match.
    let tsr = std::fs::read(bundle.join("SHA256SUMS.tsr")).expect("tsr");
    let t2 = Test::new().runbook(SIMPLE);
    let other_bundle = run_simple(t2.path(), &[]);
    std::fs::write(other_bundle.join("SHA256SUMS.tsr"), &tsr).expect("copy");
    let stderr = code(
        &runbook(
            dir,
            &[
                "evidence",
                "verify",
                other_bundle.to_str().expect("utf-8"),
                "--tsa-ca",
                ca_s,
            ],
        ),
        3,
    );
    assert!(
        stderr.contains("SHA256SUMS.tsr: time-stamp token invalid: the token is for SHA-256"),
        "{stderr}"
    );
}

#[test]
fn an_rsa_tsa_verifies_and_an_unreachable_one_fails_the_run() {
    let t = Test::new().runbook(SIMPLE);
    let dir = t.path();
    let tsa = start_tsa(&dir.join("tsa"), "rsa:2048");
    let bundle = run_simple(dir, &["--timestamp-url", &tsa.url]);
    let ca = dir.join("tsa/ca.pem");
    code(
        &runbook(
            dir,
            &[
                "evidence",
                "verify",
                bundle.to_str().expect("utf-8"),
                "--tsa-ca",
                ca.to_str().expect("utf-8"),
            ],
        ),
        0,
    );
    let url = tsa.url.clone();
    drop(tsa);
    std::fs::remove_dir_all(dir.join("proof")).expect("rm");
    let out = runbook(
        dir,
        &[
            "run",
            "runbook.toml",
            "--evidence-dir",
            "proof",
            "--no-progress",
            "--timestamp-url",
            &url,
        ],
    );
    let stderr = code(&out, 1);
    assert!(stderr.contains("has NO trusted time-stamp"), "{stderr}");
    assert!(!find_bundle(dir).join("SHA256SUMS.tsr").exists());
}

fn chain_names(runbook_dir: &Path) -> Vec<String> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(runbook_dir)
        .expect("dir")
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| {
            let m = read_json(&e.path().join("manifest.json"));
            (
                m["started_at"].as_str().expect("started_at").to_owned(),
                e.file_name().to_string_lossy().into_owned(),
            )
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, n)| n).collect()
}

#[test]
fn a_chain_of_five_drills_shows_the_deleted_and_the_edited_bundle() {
    let t = Test::new().runbook(SIMPLE);
    let dir = t.path();
    for _ in 0..5 {
        code(
            &runbook(
                dir,
                &[
                    "run",
                    "runbook.toml",
                    "--evidence-dir",
                    "proof",
                    "--no-progress",
                ],
            ),
            0,
        );
    }
    let rb_dir = dir.join("proof/t");
    let names = chain_names(&rb_dir);
    assert_eq!(names.len(), 5);
    let first = read_json(&rb_dir.join(&names[0]).join("manifest.json"));
    assert!(first["context"]["chain"]["previous"].is_null());
    for pair in names.windows(2) {
        let m = read_json(&rb_dir.join(&pair[1]).join("manifest.json"));
        let prev = &m["context"]["chain"]["previous"];
        assert_eq!(prev["bundle"], pair[0].as_str());
        let sums = std::fs::read(rb_dir.join(&pair[0]).join("SHA256SUMS")).expect("sums");
        let digest = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&sums))
        };
        assert_eq!(prev["sha256"], digest.as_str());
    }
    let report = std::fs::read_to_string(rb_dir.join(&names[1]).join("report.html")).expect("r");
    assert!(report.contains("Previous drill") && report.contains(&names[0]));

    let chain = rb_dir.to_str().expect("utf-8");
    let stderr = code(&runbook(dir, &["evidence", "verify", "--chain", chain]), 0);
    assert!(
        last_line(&stderr).contains("chain ok: 5 bundle(s)"),
        "{stderr}"
    );

    // Delete the second; edit the fourth and re-seal it, so that it passes on its own.
    std::fs::remove_dir_all(rb_dir.join(&names[1])).expect("rm");
    let fourth = rb_dir.join(&names[3]);
    let log = fourth.join("steps/a/local/attempt-1.log");
    let text = std::fs::read_to_string(&log).expect("log");
    std::fs::write(&log, text.replace("out hello", "out HELLO")).expect("edit");
    sh(
        &fourth,
        "grep -v ' steps/a/local/attempt-1.log$' SHA256SUMS > s && sha256sum steps/a/local/attempt-1.log >> s && sort -k2 s > SHA256SUMS && rm s",
    );
    code(
        &runbook(
            dir,
            &["evidence", "verify", fourth.to_str().expect("utf-8")],
        ),
        0,
    );
    let stderr = code(&runbook(dir, &["evidence", "verify", "--chain", chain]), 3);
    assert!(
        stderr.contains(&format!(
            "{}: MISSING: {} records it as the bundle before it",
            names[1], names[2]
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{}: EDITED after {} was recorded",
            names[3], names[4]
        )),
        "{stderr}"
    );
    assert!(stderr.contains("chain NOT verified"), "{stderr}");
}

#[test]
fn the_schedule_state_shows_a_deleted_last_drill() {
    let t = Test::new()
        .runbook(SIMPLE)
        .file(
            "drills.toml",
            "evidence_dir = \"proof\"\n\n[[schedule]]\nname = \"nightly\"\nrunbook = \"runbook.toml\"\ncron = \"0 3 * * *\"\n",
        );
    let dir = t.path();
    for _ in 0..2 {
        code(
            &runbook(
                dir,
                &[
                    "run",
                    "runbook.toml",
                    "--evidence-dir",
                    "proof",
                    "--no-progress",
                ],
            ),
            0,
        );
    }
    let rb_dir = dir.join("proof/t");
    let names = chain_names(&rb_dir);
    let last = rb_dir.join(&names[1]);
    let now = "2026-01-01T03:00:00Z";
    std::fs::write(
        dir.join("drills.state.json"),
        serde_json::json!({"entries": {"nightly": {"last_fire": now, "last_outcome": {
            "status": "succeeded", "exit_code": 0, "bundle": last.display().to_string(),
            "started": now, "finished": now, "duration_seconds": 1.0}}}})
        .to_string(),
    )
    .expect("state");
    let chain = rb_dir.to_str().expect("utf-8");
    code(
        &runbook(
            dir,
            &[
                "evidence",
                "verify",
                "--chain",
                chain,
                "--schedule",
                "drills.toml",
            ],
        ),
        0,
    );
    // The last bundle deleted: no later bundle vouches for it, but the scheduler's state does.
    std::fs::remove_dir_all(&last).expect("rm");
    let stderr = code(
        &runbook(
            dir,
            &[
                "evidence",
                "verify",
                "--chain",
                chain,
                "--schedule",
                "drills.toml",
            ],
        ),
        3,
    );
    assert!(
        stderr.contains("MISSING: the scheduler's state records it as the last run's bundle"),
        "{stderr}"
    );
}

#[test]
fn the_run_section_names_who_where_which_binary_and_clock() {
    let t = Test::new().runbook(SIMPLE);
    let dir = t.path();
    let k = keygen(dir, "k");
    let out = Command::new(BIN)
        .args([
            "run",
            "runbook.toml",
            "--evidence-dir",
            "proof",
            "--no-progress",
            "--sign-key",
        ])
        .arg(&k.key)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env("SUDO_USER", "alice")
        .env("SUDO_UID", "1234")
        .output()
        .expect("run");
    code(&out, 0);
    let bundle = find_bundle(dir);
    let m = read_json(&bundle.join("manifest.json"));
    let ctx = &m["context"];
    assert_eq!(ctx["identity"]["sudo_user"], "alice");
    assert_eq!(ctx["identity"]["sudo_uid"], 1234);
    let sha = ctx["engine"]["binary"]["sha256"]
        .as_str()
        .expect("binary sha256");
    let expected = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(BIN).expect("binary")))
    };
    assert_eq!(sha, expected);
    let sync = &ctx["time"]["sync"];
    let source = sync["source"].as_str().expect("sync source");
    assert!(
        [
            "timedatectl",
            "chronyc tracking",
            "/run/systemd/timesync",
            "unknown"
        ]
        .contains(&source),
        "{sync}"
    );
    if source == "unknown" {
        assert!(
            sync["why"].as_str().expect("why").contains("timedatectl"),
            "{sync}"
        );
    }
    let machine_id = std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().to_owned());
    assert_eq!(ctx["host"]["machine_id"].as_str(), machine_id.as_deref());
    let pubkey = std::fs::read_to_string(&k.public).expect("pub");
    let key_id = pubkey
        .lines()
        .next()
        .and_then(|l| l.rsplit(' ').next())
        .expect("key id");
    assert_eq!(ctx["signing"]["key_id"], key_id);
    let report = std::fs::read_to_string(bundle.join("report.html")).expect("report");
    for needle in [
        "Behind the operator",
        "sudo from <code>alice</code>",
        "Clock",
        "Binary",
        expected.as_str(),
        "Signing key",
        key_id,
        "Previous drill",
    ] {
        assert!(report.contains(needle), "report lacks {needle}");
    }
}

/// `[evidence] timestamp_url` is the runbook's setting for the authority: a run stamps its bundle
/// there without `--timestamp-url` (here an address nothing listens on, so the run must say its
/// bundle has no trusted time-stamp); a value that is not an http(s) URL is refused by `check`.
#[test]
fn the_runbook_names_its_time_stamping_authority() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    std::fs::write(
        dir.join("runbook.toml"),
        "[runbook]\nname = \"stamped\"\n[evidence]\ntimestamp_url = \"http://127.0.0.1:9/tsa\"\n\
         [[steps]]\nid = \"a\"\nrun = \"true\"\n",
    )
    .expect("write");
    let out = runbook(
        dir,
        &[
            "run",
            "runbook.toml",
            "--evidence-dir",
            "proof",
            "--no-progress",
        ],
    );
    let stderr = code(&out, 1);
    assert!(stderr.contains("has NO trusted time-stamp"), "{stderr}");

    std::fs::write(
        dir.join("bad.toml"),
        "[runbook]\nname = \"bad\"\n[evidence]\ntimestamp_url = \"ftp://tsa.example/\"\n\
         [[steps]]\nid = \"a\"\nrun = \"true\"\n",
    )
    .expect("write");
    let out = runbook(dir, &["check", "bad.toml"]);
    let stderr = code(&out, 2);
    assert!(
        stderr.contains("`timestamp_url` scheme `ftp` is not supported")
            && stderr.contains("bad.toml:4:"),
        "{stderr}"
    );
}
