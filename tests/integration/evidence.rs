//! The bundle: layout, checksums, collected files, secrets kept out, failures to write.

use sha2::{Digest, Sha256};

use crate::common::{
    all_files, assert_bundle_lacks, assert_bundle_verifies, cast_events, run_runbook, step, Test,
};

const HEAD: &str = "[runbook]\nname = \"t\"\n";

#[test]
fn a_run_leaves_a_complete_checksummed_bundle() {
    let toml = format!(
        "{HEAD}refs = [\"ADR-0202\"]\n[[steps]]\nid = \"make\"\nrun = \"echo data > file.txt; echo made\"\ncollect = [\"file.txt\", \"/etc/hostname\"]\n"
    );
    let out = run_runbook(&toml, &[]);
    out.assert_code(0);
    let bundle = out.bundle();
    let name = bundle
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let run_id = out.manifest()["run_id"]
        .as_str()
        .expect("run id")
        .to_owned();
    assert!(
        name.ends_with(&format!("-{run_id}")) && name.len() == "20261125T182451Z-".len() + 8,
        "{name}"
    );
    for f in [
        "manifest.json",
        "journal.jsonl",
        "runbook/runbook.toml",
        "steps/make/local/attempt-1.log",
        "collected/make/file.txt",
        "SHA256SUMS",
    ] {
        assert!(bundle.join(f).is_file(), "{f} in bundle");
    }
    // An absolute path is kept under the step's directory: nothing lands outside the bundle.
    assert!(bundle.join("collected/make/etc/hostname").is_file());

    let sums = std::fs::read_to_string(bundle.join("SHA256SUMS")).expect("sums");
    let listed: Vec<&str> = sums
        .lines()
        .map(|l| l.split_once("  ").expect("two spaces").1)
        .collect();
    let on_disk: Vec<String> = all_files(&bundle)
        .iter()
        .map(|p| {
            p.strip_prefix(&bundle)
                .expect("inside")
                .to_string_lossy()
                .into_owned()
        })
        .filter(|p| p != "SHA256SUMS")
        .collect();
    assert_eq!(listed, on_disk, "every file is listed, nothing else");
    for line in sums.lines() {
        let (hash, path) = line.split_once("  ").expect("line");
        let data = std::fs::read(bundle.join(path)).expect("file");
        assert_eq!(hash, hex::encode(Sha256::digest(&data)), "{path}");
    }
    // And the standard tool agrees.
    let status = std::process::Command::new("sha256sum")
        .args(["--quiet", "-c", "SHA256SUMS"])
        .current_dir(&bundle)
        .status()
        .expect("sha256sum");
    assert!(status.success());

    let m = out.manifest();
    assert_eq!(m["format"], "runbook-evidence/1");
    assert_eq!(m["runbook"]["refs"][0], "ADR-0202");
    let source = std::fs::read(out.dir.path().join("runbook.toml")).expect("runbook");
    assert_eq!(m["runbook"]["sha256"], hex::encode(Sha256::digest(&source)));
    assert!(m["operator"]["user"]
        .as_str()
        .is_some_and(|u| !u.is_empty()));
    assert!(m["engine"]["version"].as_str().is_some());
    assert_eq!(
        step(&m, "make")["collected"][0]["copy"],
        "collected/make/file.txt"
    );

    let journal = out.journal();
    let kinds: Vec<&str> = journal
        .iter()
        .map(|e| e["event"].as_str().expect("event"))
        .collect();
    assert_eq!(
        kinds,
        [
            "run_started",
            "step_started",
            "attempt_started",
            "process_started",
            "attempt_finished",
            "collect",
            "collect",
            "step_finished",
            "run_finished"
        ]
    );
    let seqs: Vec<u64> = journal
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, (1..=9).collect::<Vec<_>>());
}

#[test]
fn log_lines_carry_timestamps_and_stream_tags() {
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"a\"\nrun = \"echo one; sleep 0.2; echo two >&2; printf 'no newline'\"\n"
    );
    let out = run_runbook(&toml, &[]);
    out.assert_code(0);
    let log =
        std::fs::read_to_string(out.bundle().join("steps/a/local/attempt-1.log")).expect("log");
    let lines: Vec<&str> = log.lines().collect();
    let body: Vec<&str> = lines
        .iter()
        .map(|l| l.split_once(' ').expect("stamp").1)
        .collect();
    assert_eq!(
        body,
        [
            "--- $ echo one; sleep 0.2; echo two >&2; printf 'no newline'",
            "out one",
            "err two",
            "out+ no newline",
            "--- attempt 1: succeeded"
        ]
    );
    for l in &lines {
        let stamp = l.split(' ').next().expect("stamp");
        assert!(
            stamp.parse::<chrono::DateTime<chrono::Utc>>().is_ok() && stamp.ends_with('Z'),
            "{stamp}"
        );
    }
}

#[test]
fn secret_params_never_reach_the_bundle() {
    let secret = "tok-3f9a8b7c6d5e";
    let toml = format!(
        "{HEAD}[params]\ntoken = {{ secret = true, env = \"API_TOKEN\" }}\n[[steps]]\nid = \"leak\"\nrun = 'echo \"token={{{{ params.token }}}}\"; printf \"%s\" \"$T\" | fold -w 3; echo \"$T\" > t.txt; exit 1'\nenv = {{ T = \"{{{{ params.token }}}}\" }}\ncollect = [\"t.txt\"]\n"
    );
    let out = Test::new()
        .runbook(&toml)
        .env("API_TOKEN", secret)
        .args([
            "run",
            "runbook.toml",
            "--evidence-dir",
            "proof",
            "--no-progress",
        ])
        .run();
    out.assert_code(1);
    let bundle = out.bundle();
    assert_bundle_lacks(&bundle, &[secret]);
    let log = std::fs::read_to_string(bundle.join("steps/leak/local/attempt-1.log")).expect("log");
    assert!(log.contains("out token=[REDACTED:token]"), "{log}");
    assert!(out.manifest()["params"]["token"] == "[REDACTED:token]");
    assert!(!out.stderr.contains(secret) && !out.stdout.contains(secret));
}

/// The failure summary printed after the table shows each failed step's reason; a reason
/// built from a secret (a working directory named with one) is redacted there too.
#[test]
fn failure_reasons_on_the_console_are_redacted() {
    let secret = "Sup3r-S3cret-Value-42XYZ";
    let toml = format!(
        "{HEAD}[params]\npw = {{ secret = true, env = \"RB_TEST_PW\" }}\n[[steps]]\nid = \"cwd\"\ncontinue_on_failure = true\ncwd = \"/nonexistent/{{{{ params.pw }}}}\"\nrun = \"true\"\n[[steps]]\nid = \"gen\"\nrun = 'echo tok-$((6*7))-ABCDEF0123456789xyz'\noutputs = {{ t = 'secret(\"tok\", output.stdout.trim())' }}\n[[steps]]\nid = \"use\"\nneeds = [\"gen\"]\ncwd = \"/nonexistent/{{{{ steps.gen.outputs.t }}}}\"\nrun = \"true\"\n"
    );
    let out = Test::new()
        .runbook(&toml)
        .env("RB_TEST_PW", secret)
        .run_args()
        .run();
    out.assert_code(1);
    for (what, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        assert!(!text.contains(secret), "{what}: {text}");
        assert!(
            !text.contains("tok-42-ABCDEF0123456789xyz"),
            "{what}: {text}"
        );
    }
    assert!(
        out.stderr
            .contains("cwd failed: working directory `/nonexistent/[REDACTED:pw]`")
            || out
                .stdout
                .contains("cwd failed: working directory `/nonexistent/[REDACTED:pw]`"),
        "{}{}",
        out.stdout,
        out.stderr
    );
}

#[test]
fn an_unwritable_evidence_dir_fails_before_anything_runs() {
    let t = Test::new()
        .runbook(&format!(
            "{HEAD}[[steps]]\nid = \"a\"\nrun = \"touch ran\"\n"
        ))
        .file("blocker", "a file, not a directory");
    let out = t
        .args(["run", "runbook.toml", "--evidence-dir", "blocker/proof"])
        .run();
    out.assert_code(2)
        .assert_stderr_contains("cannot write evidence to `blocker/proof/t/")
        .assert_stderr_contains("nothing was run");
    assert!(!out.dir.path().join("ran").exists());
}

#[test]
fn evidence_dir_defaults_to_proof_and_can_come_from_the_runbook() {
    let toml = "[runbook]\nname = \"t\"\nevidence_dir = \"../bundles\"\n[[steps]]\nid = \"a\"\nrun = \"true\"\n".to_string();
    let out = Test::new()
        .file("rb/runbook.toml", &toml)
        .args(["run", "rb/runbook.toml", "--no-progress"])
        .run();
    out.assert_code(0);
    assert!(
        out.dir.path().join("bundles/t").is_dir(),
        "relative to the runbook file"
    );
    let out = Test::new()
        .runbook(&format!("{HEAD}[[steps]]\nid = \"a\"\nrun = \"true\"\n"))
        .args(["run", "runbook.toml"])
        .run();
    out.assert_code(0);
    assert!(out.dir.path().join("proof/t").is_dir());
}

/// The `<testsuite>` line and the `run` test case of a bundle's junit.xml.
fn junit_run_case(bundle: &std::path::Path) -> (String, String) {
    let x = std::fs::read_to_string(bundle.join("junit.xml")).expect("junit");
    let suite = x
        .lines()
        .find(|l| l.trim_start().starts_with("<testsuite "))
        .expect("testsuite")
        .to_owned();
    let case = x
        .find("<testcase classname=\"t.run\" name=\"run\"")
        .map(|start| {
            let end = start + x[start..].find("</testcase>").expect("end");
            x[start..end].to_owned()
        })
        .unwrap_or_else(|| panic!("no `run` test case in {x}"));
    (suite, case)
}

/// Regression: a run failed by a `before_run` hook (every step skipped) had a junit.xml with
/// `failures="0"`, so Jenkins showed it green. The run is now a failing test case of its own.
#[test]
fn a_failing_before_run_hook_fails_the_junit_report() {
    let toml = format!(
        "{HEAD}[params]\npw = {{ secret = true, env = \"RB_TEST_PW\" }}\n[hooks]\nbefore_run = 'fail(\"refusing: token \" + params.pw + \" is expired\")'\n[[steps]]\nid = \"a\"\nrun = \"true\"\n"
    );
    let out = Test::new()
        .runbook(&toml)
        .env("RB_TEST_PW", "hunter2-secret")
        .run_args()
        .run();
    out.assert_code(1);
    let m = out.manifest();
    assert_eq!(m["status"], "failed");
    assert_eq!(
        m["reason"],
        "the `before_run` hook failed: refusing: token [REDACTED:pw] is expired"
    );
    let (suite, case) = junit_run_case(&out.bundle());
    assert!(
        suite.contains("tests=\"2\" failures=\"1\" errors=\"0\" skipped=\"1\""),
        "{suite}"
    );
    assert!(
        case.contains(
            "<failure message=\"the `before_run` hook failed: refusing: token [REDACTED:pw] is expired\" type=\"run\">"
        ),
        "{case}"
    );
    assert!(!case.contains("hunter2"), "{case}");
}

/// Regression: `--fail-on-leak` made the run exit 1 with a `failed` manifest while junit.xml
/// said 0 failures.
#[test]
fn fail_on_leak_fails_the_junit_report() {
    let toml = format!(
        "{HEAD}[params]\npw = {{ secret = true, env = \"RB_TEST_PW\" }}\n[[steps]]\nid = \"a\"\nenv = {{ P = \"{{{{ params.pw }}}}\" }}\nrun = 'echo \"$P\"'\n"
    );
    let out = Test::new()
        .runbook(&toml)
        .env("RB_TEST_PW", "hunter2-secret")
        .run_args()
        .args(["--fail-on-leak"])
        .run();
    out.assert_code(1);
    let m = out.manifest();
    assert_eq!(m["status"], "failed");
    assert_eq!(step(&m, "a")["status"], "succeeded");
    let reason = m["reason"].as_str().expect("a run reason");
    assert!(
        reason.starts_with("--fail-on-leak: secrets appeared in step output"),
        "{reason}"
    );
    let (suite, case) = junit_run_case(&out.bundle());
    assert!(
        suite.contains("tests=\"2\" failures=\"1\" errors=\"0\""),
        "{suite}"
    );
    assert!(
        case.contains("<failure message=\"--fail-on-leak: secrets appeared in step output"),
        "{case}"
    );
    // The bundle still verifies: junit.xml was written once, with the run's end.
    let v = std::process::Command::new(crate::common::BIN)
        .args(["evidence", "verify"])
        .arg(out.bundle())
        .output()
        .expect("verify");
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}

/// Regression: when `secret()` registered a token in attempt 2, attempt 1's log was rewritten
/// redacted but its transcript (`.cast`) kept the token, on stdout and stderr.
#[test]
fn a_secret_registered_later_is_redacted_from_earlier_attempts_transcripts() {
    // Read from a file, so that the command (journal, runbook copy) does not hold it.
    let token = "tk-9f8e7d6c5b4a3210";
    let toml = format!(
        r#"{HEAD}
[[steps]]
id = "login"
capture = "json"
retry = {{ attempts = 3, delay = "100ms" }}
run = '''echo "{{\"token\": \"$(cat tok)\", \"attempt\": $RUNBOOK_ATTEMPT}}"; echo "debug token $(cat tok)" >&2'''
until = 'output.json.attempt >= 2'
outputs = {{ token = 'secret("api_token", output.json.token)' }}
"#
    );
    let out = Test::new()
        .runbook(&toml)
        .file("tok", token)
        .run_args()
        .run();
    out.assert_code(0);
    let bundle = out.bundle();
    assert_eq!(
        step(&out.manifest(), "login")["attempts"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    assert_bundle_lacks(&bundle, &[token]);
    for n in [1, 2] {
        let events = cast_events(&bundle.join(format!("steps/login/local/attempt-{n}.cast")));
        let all: String = events.concat();
        assert!(
            all.contains("{\"token\": \"[REDACTED:api_token]\""),
            "attempt {n}: {all:?}"
        );
        assert!(
            all.contains("debug token [REDACTED:api_token]"),
            "attempt {n}: {all:?}"
        );
    }
    // The rewritten files are the ones SHA256SUMS covers.
    assert_bundle_verifies(&bundle);
}

/// Regression: GNU `base64` wraps at 76 columns, so the base64 of a secret of 58 bytes or more
/// spans two lines, and neither was redacted in the log, transcript, report or on the terminal.
#[test]
fn base64_of_a_secret_wrapped_over_lines_is_redacted_everywhere() {
    let secret = "long-secret/with+special chars&=?~ and more text to exceed fifty seven bytes!!";
    let toml = format!(
        r#"{HEAD}
[params]
pw = {{ secret = true, env = "PW" }}

[[steps]]
id = "encode"
env = {{ P = "{{{{ params.pw }}}}" }}
run = '''
printf '%s' "$P" | base64
printf 'admin:%s' "$P" | base64
printf '%s' "$P" | openssl base64
printf '%s' "$P" | base64 | sed 's/$/\r/'
printf '%s' "$P" | base64 >&2
'''

[[steps]]
id = "fails"
needs = ["encode"]
env = {{ P = "{{{{ params.pw }}}}" }}
run = 'printf "%s" "$P" | base64; exit 3'
"#
    );
    let out = Test::new()
        .runbook(&toml)
        .env("PW", secret)
        .run_args()
        .args(["--stream"])
        .run();
    out.assert_code(1);
    let bundle = out.bundle();
    // No 12 characters of any base64 form of the secret are left, even joined across lines.
    let forms: Vec<Vec<u8>> = runbook_evidence::redact::variants(secret)
        .into_iter()
        .filter(|v| {
            v.iter()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=-_".contains(b))
        })
        .collect();
    assert!(forms.len() >= 4, "{forms:?}");
    let check = |what: &str, text: &[u8]| {
        let flat: Vec<u8> = text
            .iter()
            .copied()
            .filter(|b| !b"\r\n".contains(b))
            .collect();
        for form in &forms {
            for w in form.windows(12) {
                assert!(
                    !flat.windows(12).any(|f| f == w),
                    "{what} holds {:?} of {:?}:\n{}",
                    String::from_utf8_lossy(w),
                    String::from_utf8_lossy(form),
                    String::from_utf8_lossy(text)
                );
            }
        }
    };
    for f in all_files(&bundle) {
        check(&f.display().to_string(), &std::fs::read(&f).expect("read"));
    }
    check("stderr", out.stderr.as_bytes());
    check("stdout", out.stdout.as_bytes());
    let log =
        std::fs::read_to_string(bundle.join("steps/encode/local/attempt-1.log")).expect("log");
    // Each wrapped text became a placeholder; the log keeps one record per output line.
    assert_eq!(log.matches("[REDACTED:pw]").count(), 5, "{log}");
    assert_eq!(
        log.lines().filter(|l| l.contains(" out ")).count(),
        8,
        "{log}"
    );
    assert!(
        out.stderr.contains("[encode] [REDACTED:pw]"),
        "{}",
        out.stderr
    );
    // The step's reason does not quote the end of wrapped base64: a piece of an encoding.
    assert_eq!(
        step(&out.manifest(), "fails")["reason"],
        "exit code 3: (last line not shown: the end of wrapped base64 text)"
    );
    assert_bundle_verifies(&bundle);
}

/// Regression: collecting a directory with a FIFO in it blocked the runner in open() forever
/// (SIGTERM and SIGINT did nothing, the bundle stayed unsealed), and `/dev/zero` was read
/// whole into memory.
#[test]
fn collecting_fifos_sockets_and_devices_notes_them_and_never_blocks() {
    let toml = format!(
        r#"{HEAD}
[[steps]]
id = "a"
run = 'mkdir -p d; echo x > d/a.txt; mkfifo d/pipe; python3 -c "import socket; socket.socket(socket.AF_UNIX).bind(\"d/sock\")"'
collect = ["d", "/dev/zero", "d/pipe"]
"#
    );
    let out = Test::new()
        .runbook(&toml)
        .run_args()
        .run_within(std::time::Duration::from_secs(30));
    out.assert_code(0);
    let bundle = out.bundle();
    assert_eq!(
        std::fs::read_to_string(bundle.join("collected/a/d/a.txt")).expect("a.txt collected"),
        "x\n"
    );
    assert!(!bundle.join("collected/a/d/pipe").exists());
    assert!(!bundle.join("collected/a/dev/zero").exists());
    let m = out.manifest();
    let notes: Vec<&str> = m["notes"]
        .as_array()
        .expect("notes")
        .iter()
        .filter_map(|n| n["message"].as_str())
        .collect();
    let has = |needle: &str| notes.iter().any(|n| n.contains(needle));
    assert!(
        has("step `a`: collect: `d/pipe`: a named pipe (FIFO): not copied"),
        "{notes:?}"
    );
    assert!(
        has("step `a`: collect: `d/sock`: a socket: not copied"),
        "{notes:?}"
    );
    assert!(
        has("step `a`: could not collect `/dev/zero`: a character device: not copied"),
        "{notes:?}"
    );
    let collected = step(&m, "a")["collected"]
        .as_array()
        .expect("collected")
        .clone();
    let zero = collected
        .iter()
        .find(|c| c["name"] == "/dev/zero")
        .expect("a record for /dev/zero");
    assert!(
        zero["copy"].is_null() && zero["error"].is_string(),
        "{zero}"
    );
    assert_bundle_verifies(&bundle);
}

/// Regression: `ln -s . s/self` in a collected directory produced 40 nested empty directories
/// and no files, and a link to `/etc/hostname` was followed out of the directory and copied.
#[test]
fn links_inside_a_collected_directory_are_noted_not_followed() {
    let toml = format!(
        r#"{HEAD}
[[steps]]
id = "a"
run = 'mkdir -p s/sub; echo x > s/a.txt; echo y > s/sub/b.txt; ln -s /etc/hostname s/link; ln -s nowhere s/dangling; ln -s .. s/sub/up; ln -s . s/self; ln -s s/a.txt top-link'
collect = ["s", "top-link"]
"#
    );
    let out = Test::new()
        .runbook(&toml)
        .run_args()
        .run_within(std::time::Duration::from_secs(30));
    out.assert_code(0);
    let bundle = out.bundle();
    let files: Vec<String> = all_files(&bundle.join("collected/a"))
        .iter()
        .map(|p| {
            p.strip_prefix(bundle.join("collected/a"))
                .expect("inside")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    // A link the runbook names itself is followed.
    assert_eq!(files, ["s/a.txt", "s/sub/b.txt", "top-link"]);
    assert!(!bundle.join("collected/a/s/self").exists());
    let m = out.manifest();
    let notes: Vec<&str> = m["notes"]
        .as_array()
        .expect("notes")
        .iter()
        .filter_map(|n| n["message"].as_str())
        .collect();
    for link in [
        "`s/dangling` -> `nowhere`",
        "`s/link` -> `/etc/hostname`",
        "`s/self` -> `.`",
        "`s/sub/up` -> `..`",
    ] {
        let want = format!("step `a`: collect: {link}: symlink not followed");
        assert!(notes.contains(&want.as_str()), "{want} in {notes:?}");
    }
    assert_bundle_verifies(&bundle);
}

/// Regression: collected names with a newline or bytes that are not UTF-8 were written to
/// SHA256SUMS as they were (lossily), so `evidence verify` and `sha256sum -c` failed on an
/// untouched bundle.
#[test]
fn collected_names_with_newlines_or_bad_utf8_keep_the_bundle_verifiable() {
    let toml = format!(
        r#"{HEAD}
[[steps]]
id = "mk"
run = '''
mkdir -p out
echo a > "out/with space.txt"
echo b > 'out/back\slash.txt'
echo c > "out/new
line.txt"
echo d > "out/$(printf 'bad\xffutf8')"
echo e > "out/-leading.txt"
'''
collect = ["out"]
"#
    );
    let out = Test::new().runbook(&toml).run_args().run();
    out.assert_code(0);
    let bundle = out.bundle();
    let dir = bundle.join("collected/mk/out");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("collected dir")
        .map(|e| {
            e.expect("entry")
                .file_name()
                .into_string()
                .expect("stored names are UTF-8")
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "-leading.txt",
            "back\\slash.txt",
            "bad_utf8",
            "new_line.txt",
            "with space.txt"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("new_line.txt")).expect("read"),
        "c\n"
    );
    let m = out.manifest();
    let notes: Vec<&str> = m["notes"]
        .as_array()
        .expect("notes")
        .iter()
        .filter_map(|n| n["message"].as_str())
        .collect();
    for (original, stored) in [
        ("out/bad\\xffutf8", "out/bad_utf8"),
        ("out/new\\nline.txt", "out/new_line.txt"),
    ] {
        let want = format!(
            "step `mk`: collect: `{original}`: copied as `{stored}`: its name has a control \
             character or bytes that are not UTF-8"
        );
        assert!(notes.contains(&want.as_str()), "{want} in {notes:?}");
    }
    assert_bundle_verifies(&bundle);
}

/// A secret in a collected file's name (or in a directory entry's) would be in the bundle's tree
/// and in `SHA256SUMS`: it is replaced by its placeholder there too.
#[test]
fn secrets_in_collected_file_names_are_redacted() {
    let secret = "tok-5e6f7a8b9c0d";
    let toml = format!(
        "{HEAD}[params]\ntoken = {{ secret = true, env = \"RB_TEST_TOKEN\" }}\n[[steps]]\nid = \"make\"\nrun = 'mkdir -p out && echo a > \"out/key-$T.txt\" && echo b > \"top-$T.txt\"'\nenv = {{ T = \"{{{{ params.token }}}}\" }}\ncollect = [\"out\", \"top-{{{{ params.token }}}}.txt\"]\n"
    );
    let out = Test::new()
        .runbook(&toml)
        .env("RB_TEST_TOKEN", secret)
        .run_args()
        .run();
    out.assert_code(0);
    let bundle = out.bundle();
    assert_bundle_lacks(&bundle, &[secret]);
    assert!(bundle
        .join("collected/make/out/key-[REDACTED:token].txt")
        .is_file());
    assert!(bundle
        .join("collected/make/top-[REDACTED:token].txt")
        .is_file());
    assert_bundle_verifies(&bundle);
}
