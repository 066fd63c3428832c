//! The encodings redaction searches beyond base64 and JSON (hex as `xxd -p` prints it, base32,
//! lower-case percent-encoding, base64 wrapped at any width from 16 columns), printed by real
//! tools to stdout and stderr, written to a collected file, shown on the terminal; the report's
//! claim naming them; step output reaching the terminal without control sequences; and a
//! secret holding `"` and `\\` redacted in the details an HTTP step journals.

// The loopback HTTP server the probe tests use; probes.rs includes it privately too.
#[allow(clippy::duplicate_mod)]
#[path = "../../steps/tests/support/httpd.rs"]
mod httpd;

use crate::common::*;

const HEAD: &str = "[runbook]\nname = \"t\"\n";

/// Has `/`, `+`, spaces, `&`, `=` and `!`: every encoder writes it differently.
const SECRET: &str = "s3cr3t/Value+with spaces&more=42!";

/// Shell lines printing `$P` in each form, one placeholder each once redacted.
const ENCODE: &[&str] = &[
    r#"printf '%s' "$P" | xxd -p"#,
    r#"printf '%s' "$P" | xxd -p -u"#,
    // 8 bytes a line: 16 hex digits, the narrowest wrap followed.
    r#"printf 'prefix:%s' "$P" | xxd -p -c 8"#,
    r#"printf '%s' "$P" | base32"#,
    r#"printf 'user:%s' "$P" | base32 -w 20"#,
    r#"printf 'ab%s' "$P" | base32 -w 0; echo"#,
    r#"python3 -c 'import re,sys,urllib.parse as u; print(re.sub("%[0-9A-F]{2}", lambda m: m.group(0).lower(), u.quote(sys.argv[1], safe="")))' "$P""#,
    r#"python3 -c 'import re,sys,urllib.parse as u; print("q=" + re.sub("%[0-9A-F]{2}", lambda m: m.group(0).lower(), u.quote_plus(sys.argv[1])))' "$P""#,
    r#"printf '%s' "$P" | base64 -w 20"#,
    r#"printf '%s' "$P" | base64 -w 16"#,
    r#"printf 'admin:%s' "$P" | base64 -w 17"#,
    r#"printf '%s' "$P" | base64 -w 33 | sed 's/$/\r/'"#,
];

/// The forms of [`SECRET`] made only of encoding characters, to look for in what was written.
fn encoded_forms() -> Vec<Vec<u8>> {
    runbook_evidence::redact::variants(SECRET)
        .into_iter()
        .filter(|v| {
            v.iter()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=-_%".contains(b))
        })
        .collect()
}

/// No 12 bytes of any encoded form are in `text`, also across its line breaks.
#[track_caller]
fn assert_no_form(what: &str, text: &[u8]) {
    let flat: Vec<u8> = text
        .iter()
        .copied()
        .filter(|b| !b"\r\n".contains(b))
        .collect();
    assert!(
        !text.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
        "{what} holds the secret"
    );
    for form in encoded_forms() {
        for w in form.windows(12) {
            assert!(
                !flat.windows(12).any(|f| f == w),
                "{what} holds {:?} of {:?}:\n{}",
                String::from_utf8_lossy(w),
                String::from_utf8_lossy(&form),
                String::from_utf8_lossy(text)
            );
        }
    }
}

#[test]
fn hex_base32_percent_and_narrow_base64_are_redacted_everywhere() {
    let script = ENCODE.join("\n");
    let toml = format!(
        r#"{HEAD}
[params]
pw = {{ secret = true, env = "PW" }}

[[steps]]
id = "out"
env = {{ P = "{{{{ params.pw }}}}" }}
run = '''
{script}
'''

[[steps]]
id = "err"
env = {{ P = "{{{{ params.pw }}}}" }}
run = '''
{{
{script}
}} >&2
'''

[[steps]]
id = "file"
env = {{ P = "{{{{ params.pw }}}}" }}
run = '''
{{
{script}
}} > enc.txt
'''
collect = ["enc.txt"]
"#
    );
    let out = Test::new()
        .runbook(&toml)
        .env("PW", SECRET)
        .run_args()
        .args(["--stream"])
        .run();
    out.assert_code(0);
    let bundle = out.bundle();
    let forms = encoded_forms();
    // Hex both cases, base32 whole and at each alignment, lower-case percent-encoding.
    for f in [
        hex::encode(SECRET),
        hex::encode_upper(SECRET),
        "s3cr3t%2fValue%2bwith%20spaces%26more%3d42%21".to_owned(),
    ] {
        assert!(forms.contains(&f.into_bytes()), "{forms:?}");
    }
    for f in all_files(&bundle) {
        assert_no_form(&f.display().to_string(), &std::fs::read(&f).expect("read"));
    }
    assert_no_form("the terminal (stderr)", out.stderr.as_bytes());
    assert_no_form("stdout", out.stdout.as_bytes());
    for step in ["out", "err"] {
        let log = std::fs::read_to_string(bundle.join(format!("steps/{step}/local/attempt-1.log")))
            .expect("log");
        assert_eq!(
            log.matches("[REDACTED:pw]").count(),
            ENCODE.len(),
            "{step}: one placeholder per printed form\n{log}"
        );
        assert!(
            out.stderr.contains(&format!(
                "[{step}{}] [REDACTED:pw]",
                if step == "err" { "!" } else { "" }
            )),
            "{}",
            out.stderr
        );
    }
    let collected = all_files(&bundle)
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == "enc.txt"))
        .expect("collected");
    let text = std::fs::read_to_string(&collected).expect("read");
    assert_eq!(
        text.matches("[REDACTED:pw]").count(),
        ENCODE.len(),
        "{text}"
    );
    // Every other line of the file is kept: placeholders, emptied lines of a wrapped form.
    let report = std::fs::read_to_string(bundle.join("report.html")).expect("report");
    for claim in [
        "hex (lower- or upper-case",
        "base32",
        "lower-case hex",
        "16 columns",
        "Not searched",
    ] {
        assert!(report.contains(claim), "report claim lacks {claim}");
    }
    assert!(
        !report.contains("appear nowhere"),
        "the old overclaim is gone"
    );
    let redactions = &out.manifest()["redactions"]["pw"];
    assert_eq!(
        redactions,
        &serde_json::json!(3 * ENCODE.len()),
        "{redactions}"
    );
    assert_bundle_verifies(&bundle);
}

/// A step's output can carry terminal control sequences (a title change, an OSC 52 clipboard
/// write, a screen clear): the terminal shows them escaped, colours pass, and the evidence keeps
/// the bytes as the step wrote them.
#[test]
fn step_output_reaches_the_terminal_without_control_sequences() {
    let toml = format!(
        r#"{HEAD}
[[steps]]
id = "noisy"
run = '''
printf 'title \033]0;pwned-title\007 set\n'
printf 'clip \033]52;c;aGVsbG8=\033\\ done\n'
printf 'clear \033[2J\033[H home\n'
printf '\033[31mred text\033[0m\n'
printf 'last \033]0;failing-title\007 line\n' >&2
exit 4
'''
"#
    );
    let out = Test::new()
        .runbook(&toml)
        .run_args()
        .args(["--stream"])
        .run();
    out.assert_code(1);
    let term = &out.stderr;
    for raw in ["\x1b]0;", "\x1b]52;", "\x1b[2J", "\x1b[H", "\x07"] {
        assert!(
            !term.contains(raw),
            "{raw:?} reached the terminal:\n{term:?}"
        );
    }
    assert!(term.contains("^[]0;pwned-title^G set"), "{term:?}");
    assert!(term.contains("^[[2J^[[H home"), "{term:?}");
    assert!(
        term.contains("\x1b[31mred text\x1b[0m"),
        "colours pass: {term:?}"
    );
    // The failure line quotes the last line of output, escaped too.
    assert!(term.contains("^[]0;failing-title^G line"), "{term:?}");
    let log = std::fs::read(out.bundle().join("steps/noisy/local/attempt-1.log")).expect("log");
    let raw: &[u8] = b"\x1b]0;pwned-title\x07 set";
    assert!(
        log.windows(raw.len()).any(|w| w == raw),
        "the log keeps the raw bytes:\n{}",
        String::from_utf8_lossy(&log)
    );
}

/// A secret with `"` and `\\` echoed by a real server: the HTTP step's details (body and
/// parsed JSON, keys too) reach the journal and the manifest redacted as values, and no form of
/// the secret, as written or JSON-escaped, is in any file of the bundle.
#[test]
fn a_secret_with_quotes_and_backslashes_is_redacted_in_the_journal_details() {
    const QUOTED: &str = r#"qu"ote\back-slash-77"#;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let server = rt.block_on(
        httpd::Httpd::new()
            .route("/echo", |_| {
                httpd::Response::json(200, &serde_json::json!({ "seen": QUOTED, QUOTED: 1 }))
            })
            .start(),
    );
    let toml = format!(
        r#"{HEAD}
[params]
pw = {{ secret = true, env = "PW" }}

[[steps]]
id = "echo"
http = {{ url = "{}" }}
"#,
        server.url("/echo")
    );
    let out = Test::new()
        .runbook(&toml)
        .env("PW", QUOTED)
        .run_args()
        .run();
    out.assert_code(0);
    let finished: Vec<serde_json::Value> = out
        .journal()
        .into_iter()
        .filter(|e| e["step"] == "echo" && e.get("details").is_some_and(|d| d["json"].is_object()))
        .collect();
    assert!(!finished.is_empty(), "the attempt's details are journaled");
    for e in &finished {
        let details = &e["details"];
        assert_eq!(details["json"]["seen"], "[REDACTED:pw]", "{e}");
        assert_eq!(details["json"]["[REDACTED:pw]"], 1, "{e}");
        let body = details["body"].as_str().expect("body");
        assert!(body.contains("[REDACTED:pw]"), "{e}");
    }
    let escaped = serde_json::to_string(QUOTED).expect("json");
    for f in all_files(&out.bundle()) {
        let bytes = std::fs::read(&f).expect("read");
        for form in [QUOTED, escaped.trim_matches('"')] {
            assert!(
                !bytes.windows(form.len()).any(|w| w == form.as_bytes()),
                "{} holds {form}",
                f.display()
            );
        }
    }
}
