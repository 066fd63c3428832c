//! Running runbooks for real: order, concurrency, retries, failure policy, selection, params,
//! plan and graph output.

use crate::common::{run_runbook, step, Test};

const HEAD: &str = "[runbook]\nname = \"t\"\n";

fn ts(v: &serde_json::Value) -> chrono::DateTime<chrono::Utc> {
    v.as_str().expect("timestamp").parse().expect("RFC 3339")
}

#[test]
fn independent_steps_overlap_and_dependents_wait() {
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"a\"\nrun = \"sleep 1\"\n[[steps]]\nid = \"b\"\nrun = \"sleep 1\"\n[[steps]]\nid = \"c\"\nneeds = [\"a\", \"b\"]\nrun = \"true\"\n"
    );
    let out = run_runbook(&toml, &["--parallel", "4"]);
    out.assert_code(0);
    let m = out.manifest();
    let span = |id: &str| {
        let a = &step(&m, id)["attempts"][0];
        (ts(&a["started_at"]), ts(&a["finished_at"]))
    };
    let (a0, a1) = span("a");
    let (b0, b1) = span("b");
    let (c0, _) = span("c");
    assert!(
        a0 < b1 && b0 < a1,
        "a and b overlapped: {a0}..{a1} / {b0}..{b1}"
    );
    assert!(c0 >= a1 && c0 >= b1, "c waited for a and b");
}

#[test]
fn parallel_one_serialises_independent_steps() {
    let toml = format!("{HEAD}[[steps]]\nid = \"a\"\nrun = \"sleep 0.3\"\n[[steps]]\nid = \"b\"\nrun = \"sleep 0.3\"\n");
    let out = run_runbook(&toml, &["--parallel", "1"]);
    out.assert_code(0);
    let m = out.manifest();
    let a = &step(&m, "a")["attempts"][0];
    let b = &step(&m, "b")["attempts"][0];
    let (a0, a1, b0, b1) = (
        ts(&a["started_at"]),
        ts(&a["finished_at"]),
        ts(&b["started_at"]),
        ts(&b["finished_at"]),
    );
    assert!(b0 >= a1 || a0 >= b1, "no overlap with --parallel 1");
}

#[test]
fn retries_and_backoff_are_recorded_in_the_manifest() {
    // Fails on attempts 1 and 2, succeeds on 3.
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"flaky\"\nrun = '[ \"$RUNBOOK_ATTEMPT\" -ge 3 ] || {{ echo \"attempt $RUNBOOK_ATTEMPT fails\" >&2; exit 7; }}'\nretry = {{ attempts = 4, backoff = \"exponential\", delay = \"200ms\", max_delay = \"1s\" }}\n"
    );
    let out = run_runbook(&toml, &[]);
    out.assert_code(0);
    let m = out.manifest();
    let s = step(&m, "flaky");
    assert_eq!(s["status"], "succeeded");
    let attempts = s["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 3);
    assert_eq!(attempts[0]["exit_code"], 7);
    assert_eq!(attempts[0]["retry_delay_seconds"], 0.2);
    assert_eq!(attempts[1]["retry_delay_seconds"], 0.4);
    assert_eq!(attempts[2]["exit_code"], 0);
    let gap = ts(&attempts[1]["started_at"]) - ts(&attempts[0]["finished_at"]);
    assert!(gap.num_milliseconds() >= 200, "backoff waited: {gap}");
    let log =
        std::fs::read_to_string(out.bundle().join("steps/flaky/local/attempt-1.log")).expect("log");
    assert!(log.contains(" err attempt 1 fails"), "{log}");
    assert!(log.contains("--- attempt 1: exit code 7"), "{log}");
}

#[test]
fn fail_fast_skips_dependents_and_runs_always_steps() {
    let toml = format!(
        "{HEAD}
[[steps]]
id = \"break\"
run = \"echo boom >&2; exit 3\"
[[steps]]
id = \"deploy\"
needs = [\"break\"]
run = \"touch deployed\"
[[steps]]
id = \"cleanup\"
needs = [\"deploy\"]
always = true
run = \"touch cleaned\"
"
    );
    let out = run_runbook(&toml, &[]);
    out.assert_code(1);
    out.assert_stderr_contains("break");
    let m = out.manifest();
    assert_eq!(m["status"], "failed");
    assert_eq!(step(&m, "break")["status"], "failed");
    assert_eq!(
        step(&m, "break")["reason"],
        "exit code 3: boom",
        "the reason carries the last line the command wrote"
    );
    assert_eq!(step(&m, "deploy")["status"], "skipped");
    assert_eq!(step(&m, "deploy")["reason"], "needs `break`, which failed");
    assert_eq!(step(&m, "cleanup")["status"], "succeeded");
    assert!(!out.dir.path().join("deployed").exists());
    assert!(out.dir.path().join("cleaned").exists());
}

#[test]
fn continue_on_failure_keeps_the_run_green() {
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"lint\"\nrun = \"exit 1\"\ncontinue_on_failure = true\n[[steps]]\nid = \"build\"\nneeds = [\"lint\"]\nrun = \"true\"\n"
    );
    let out = run_runbook(&toml, &[]);
    out.assert_code(0);
    let m = out.manifest();
    assert_eq!(step(&m, "lint")["status"], "failed");
    assert_eq!(step(&m, "build")["status"], "succeeded");
    assert_eq!(m["status"], "succeeded");
}

#[test]
fn params_env_and_cwd_reach_the_process() {
    let toml = format!(
        "{HEAD}[params]\ngreeting = \"hello\"\ncount = {{ default = 2 }}\n[defaults]\nenv = {{ GREETING = \"{{{{ params.greeting }}}}\" }}\n[[steps]]\nid = \"prep\"\nrun = \"mkdir -p sub\"\n[[steps]]\nid = \"show\"\nneeds = [\"prep\"]\ncwd = \"sub\"\nenv = {{ N = \"{{{{ params.count * 2 }}}}\" }}\nrun = 'echo \"$GREETING $N {{{{ run.runbook }}}} $(basename \"$PWD\")\" > out.txt'\n"
    );
    let out = run_runbook(&toml, &["--set", "greeting=bonjour", "--set", "count=5"]);
    out.assert_code(0);
    let text = std::fs::read_to_string(out.dir.path().join("sub/out.txt")).expect("out.txt");
    assert_eq!(text, "bonjour 10 t sub\n");
    let m = out.manifest();
    assert_eq!(m["params"]["greeting"], "bonjour");
    assert_eq!(m["params"]["count"], 5);
    assert_eq!(m["param_sources"]["count"]["from"], "set");
}

#[test]
fn params_come_from_the_environment_and_required_ones_are_enforced() {
    let toml = format!(
        "{HEAD}[params]\ntoken = {{ env = \"MY_TOKEN\", required = true }}\n[[steps]]\nid = \"a\"\nrun = \"echo {{{{ params.token }}}} > t.txt\"\n"
    );
    let out = Test::new()
        .runbook(&toml)
        .args(["run", "runbook.toml", "--evidence-dir", "proof"])
        .run();
    out.assert_code(2).assert_stderr_contains("parameter `token` is required: pass `--set token=…` or set the environment variable `MY_TOKEN`");
    assert!(
        !out.dir.path().join("proof").exists(),
        "nothing written before the run could start"
    );
    let out = Test::new()
        .runbook(&toml)
        .env("MY_TOKEN", "abc")
        .args(["run", "runbook.toml", "--evidence-dir", "proof"])
        .run();
    out.assert_code(0);
    assert_eq!(out.manifest()["param_sources"]["token"]["name"], "MY_TOKEN");
}

#[test]
fn only_skip_and_from_select_steps() {
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"a\"\nrun = \"touch a\"\n[[steps]]\nid = \"b\"\nneeds = [\"a\"]\nrun = \"touch b\"\n[[steps]]\nid = \"c\"\nneeds = [\"b\"]\nrun = \"touch c\"\n"
    );
    let ran = |args: &[&str]| {
        let out = run_runbook(&toml, args);
        out.assert_code(0);
        ["a", "b", "c"]
            .into_iter()
            .filter(|f| out.dir.path().join(f).exists())
            .collect::<Vec<_>>()
    };
    assert_eq!(ran(&["--only", "b"]), vec!["b"]);
    assert_eq!(ran(&["--skip", "b"]), vec!["a", "c"]);
    assert_eq!(ran(&["--from", "b"]), vec!["b", "c"]);
    let out = run_runbook(&toml, &["--only", "c"]);
    assert_eq!(step(&out.manifest(), "a")["reason"], "not selected");
}

#[test]
fn json_summary_goes_to_stdout() {
    let out = run_runbook(
        &format!("{HEAD}[[steps]]\nid = \"a\"\nrun = \"echo hi\"\n"),
        &["--json"],
    );
    out.assert_code(0);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("stdout is JSON");
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["steps"][0]["id"], "a");
    assert!(v["bundle"]
        .as_str()
        .expect("bundle")
        .starts_with("proof/t/"));
}

#[test]
fn plan_shows_levels_and_resolved_commands_with_secrets_redacted() {
    let toml = format!(
        "{HEAD}[params]\nversion = \"v1.31.5+rke2r1\"\ntoken = {{ secret = true, default = \"s3cr3t-value\" }}\n[[steps]]\nid = \"install\"\nrun = \"install --version {{{{ params.version }}}} --token {{{{ params.token }}}}\"\nretry = 3\ntimeout = \"10m\"\n[[steps]]\nid = \"verify\"\nneeds = [\"install\"]\nalways = true\nrun = \"verify\"\n"
    );
    let out = Test::new()
        .runbook(&toml)
        .args(["plan", "runbook.toml", "--set", "version=v1.32.1+rke2r1"])
        .run();
    out.assert_code(0);
    let expected = "runbook t — t
params:
  version = \"v1.32.1+rke2r1\"
  token = [REDACTED:token]
level 0:
  install [3 attempts, timeout 10m]
      $ install --version v1.32.1+rke2r1 --token [REDACTED:token]
level 1:
  verify (needs install) [always]
      $ verify
";
    assert_eq!(out.stdout, expected);
    let dry = Test::new()
        .runbook(&toml)
        .args(["run", "runbook.toml", "--dry-run"])
        .run();
    dry.assert_code(0);
    assert!(!dry.stdout.contains("s3cr3t"));
    assert!(
        !dry.dir.path().join("proof").exists(),
        "dry run writes no bundle"
    );
}

#[test]
fn graph_formats() {
    let toml = format!("{HEAD}[[steps]]\nid = \"a\"\nrun = \"true\"\n[[steps]]\nid = \"b\"\nneeds = [\"a\"]\nrun = \"true\"\n");
    let text = Test::new()
        .runbook(&toml)
        .args(["graph", "runbook.toml"])
        .run();
    assert_eq!(text.stdout, "level 0:\n  a\nlevel 1:\n  b ← a\n");
    let dot = Test::new()
        .runbook(&toml)
        .args(["graph", "runbook.toml", "--format", "dot"])
        .run();
    assert!(dot.stdout.contains("\"a\" -> \"b\";"), "{}", dot.stdout);
    let mermaid = Test::new()
        .runbook(&toml)
        .args(["graph", "runbook.toml", "--format", "mermaid"])
        .run();
    assert!(
        mermaid.stdout.starts_with("flowchart LR\n") && mermaid.stdout.contains("s0 --> s1"),
        "{}",
        mermaid.stdout
    );
}

#[test]
fn a_missing_working_directory_fails_the_step_clearly() {
    let out = run_runbook(
        &format!("{HEAD}[[steps]]\nid = \"a\"\ncwd = \"nope\"\nrun = \"true\"\n"),
        &[],
    );
    out.assert_code(1);
    let m = out.manifest();
    assert!(
        step(&m, "a")["reason"]
            .as_str()
            .unwrap_or("")
            .contains("working directory"),
        "{m}"
    );
}

#[test]
fn the_example_runbook_runs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = root.join("runbooks/examples/local-drill.toml");
    let t = Test::new();
    let ws = t.path().join("ws");
    let out = t
        .args([
            "run",
            example.to_str().expect("utf-8 path"),
            "--evidence-dir",
            "proof",
            "--no-progress",
        ])
        .args(["--set", &format!("workspace={}", ws.display())])
        .run();
    out.assert_code(0);
    let m = out.manifest();
    assert_eq!(m["status"], "succeeded");
    assert_eq!(m["summary"]["succeeded"], 9);
    assert_eq!(step(&m, "facts-verbose")["status"], "skipped");
    assert!(step(&m, "summary")["outputs"]["free_mb"]
        .as_i64()
        .is_some_and(|mb| mb > 0));
    let waits = step(&m, "wait-ready")["attempts"]
        .as_array()
        .expect("attempts");
    assert!(
        waits.len() >= 2,
        "not ready at first, ready on a retry: {waits:?}"
    );
    assert_eq!(waits[0]["outcome"]["failure"], "until");
    assert!(out.bundle().join("collected/report/report.txt").is_file());
    assert!(
        !ws.read_dir()
            .map(|mut d| d.next().is_some())
            .unwrap_or(false),
        "cleanup removed the run's workspace"
    );
}
