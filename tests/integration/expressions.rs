//! Rhai in runbooks, end to end: values passed between steps, polling with `until`, `when`,
//! `check`, hooks, `script` steps, secrets registered at run time, and the errors of each.

use std::time::{Duration, Instant};

use crate::common::{run_runbook, step, Test};

const HEAD: &str = "[runbook]\nname = \"t\"\n";

#[test]
fn a_token_printed_by_one_step_reaches_the_next() {
    let toml = format!(
        r#"{HEAD}
[[steps]]
id = "first-server"
run = "printf '  K10%s::server:%s  \\n' abc 0123456789"
outputs = {{ token = "secret(\"node-token\", output.stdout.trim())" }}

[[steps]]
id = "join"
needs = ["first-server"]
run = "echo joining with {{{{ steps[\"first-server\"].outputs.token }}}} > joined.txt"
"#
    );
    let out = run_runbook(&toml, &[]);
    out.assert_code(0);
    let joined = std::fs::read_to_string(out.dir.path().join("joined.txt")).expect("joined");
    assert_eq!(
        joined, "joining with K10abc::server:0123456789\n",
        "the real value reached the command"
    );
    crate::common::assert_bundle_lacks(&out.bundle(), &["K10abc::server"]);
    let m = out.manifest();
    assert_eq!(
        step(&m, "first-server")["outputs"]["token"],
        "[REDACTED:node-token]"
    );
    assert!(m["secrets"]
        .as_array()
        .expect("secrets")
        .iter()
        .any(|s| s == "node-token"));
    let log =
        std::fs::read_to_string(out.bundle().join("steps/join/local/attempt-1.log")).expect("log");
    assert!(log.contains("joining with [REDACTED:node-token]"), "{log}");
}

#[test]
fn until_polls_for_a_file_written_later_by_another_process() {
    let toml = format!(
        r#"{HEAD}
[[steps]]
id = "writer"
run = "sleep 1; echo ready > flag"

[[steps]]
id = "wait"
run = "cat flag 2>/dev/null || echo waiting"
until = 'output.stdout.trim() == "ready"'
retry = {{ attempts = 50, delay = "200ms" }}
"#
    );
    let out = run_runbook(&toml, &["--parallel", "2"]);
    out.assert_code(0);
    let m = out.manifest();
    let attempts = step(&m, "wait")["attempts"]
        .as_array()
        .expect("attempts")
        .clone();
    assert!(
        attempts.len() >= 3,
        "polled several times: {}",
        attempts.len()
    );
    assert_eq!(attempts[0]["outcome"]["failure"], "until");
    assert!(attempts[0]["error"]
        .as_str()
        .expect("error")
        .contains("`until` is still false"));
    assert_eq!(attempts.last().expect("last")["exit_code"], 0);
}

#[test]
fn a_retry_deadline_bounds_polling() {
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"never\"\nrun = \"echo no\"\nuntil = \"false\"\nretry = {{ attempts = 10000, delay = \"200ms\", deadline = \"1s\" }}\n"
    );
    let started = Instant::now();
    let out = run_runbook(&toml, &[]);
    out.assert_code(1);
    assert!(started.elapsed() < Duration::from_secs(10));
    let m = out.manifest();
    let reason = step(&m, "never")["reason"]
        .as_str()
        .expect("reason")
        .to_owned();
    assert!(
        reason.contains("the retry deadline of 1s would pass"),
        "{reason}"
    );
    let n = step(&m, "never")["attempts"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    assert!((3..=7).contains(&n), "about five attempts in a second: {n}");
}

#[test]
fn when_skips_with_the_reason_and_dependents_still_run() {
    let toml = format!(
        r#"{HEAD}
[params]
storage = {{ default = false }}

[[steps]]
id = "longhorn"
when = "params.storage"
run = "touch longhorn"

[[steps]]
id = "health"
needs = ["longhorn"]
run = "touch health"
"#
    );
    let out = run_runbook(&toml, &[]);
    out.assert_code(0);
    let m = out.manifest();
    assert_eq!(step(&m, "longhorn")["status"], "skipped");
    assert_eq!(
        step(&m, "longhorn")["reason"],
        "`when` was false: params.storage"
    );
    assert_eq!(step(&m, "health")["status"], "succeeded");
    assert!(!out.dir.path().join("longhorn").exists());
    let out = run_runbook(&toml, &["--set", "storage=true"]);
    out.assert_code(0);
    assert!(out.dir.path().join("longhorn").exists());
}

#[test]
fn check_fails_the_step_with_its_text() {
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"nodes\"\nrun = \"echo 2\"\ncheck = \"output.stdout.trim().parse_int() == 3\"\nretry = 3\n"
    );
    let out = run_runbook(&toml, &[]);
    out.assert_code(1);
    let m = out.manifest();
    assert_eq!(
        step(&m, "nodes")["reason"],
        "check failed: output.stdout.trim().parse_int() == 3"
    );
    assert_eq!(
        step(&m, "nodes")["attempts"].as_array().map(Vec::len),
        Some(1),
        "a false check is not retried"
    );
}

#[test]
fn json_capture_feeds_outputs_and_later_templates() {
    let toml = format!(
        r#"{HEAD}
[[steps]]
id = "tf"
run = '''echo '{{"nodes": {{"value": [{{"name": "cp1", "ip": "10.0.0.1"}}, {{"name": "w1", "ip": "10.0.0.2"}}]}}}}' '''
capture = "json"
outputs = {{ count = "output.json.nodes.value.len()", first = "output.json.nodes.value[0].name" }}

[[steps]]
id = "use"
needs = ["tf"]
run = "echo {{{{ steps.tf.outputs.count }}}} {{{{ steps.tf.json.nodes.value[1].ip }}}} > used.txt"
"#
    );
    let out = run_runbook(&toml, &[]);
    out.assert_code(0);
    assert_eq!(
        std::fs::read_to_string(out.dir.path().join("used.txt")).expect("used"),
        "2 10.0.0.2\n"
    );
    assert_eq!(step(&out.manifest(), "tf")["outputs"]["first"], "cp1");

    let bad =
        format!("{HEAD}[[steps]]\nid = \"tf\"\nrun = \"echo not json\"\ncapture = \"json\"\n");
    let out = run_runbook(&bad, &[]);
    out.assert_code(1);
    let reason = step(&out.manifest(), "tf")["reason"]
        .as_str()
        .expect("reason")
        .to_owned();
    assert!(reason.contains("stdout is not JSON"), "{reason}");
}

#[test]
fn a_script_steps_map_becomes_outputs_for_later_steps() {
    let toml = format!(
        r#"{HEAD}
[params]
workers = {{ default = 3 }}

[[steps]]
id = "layout"
script = '''
let names = [];
for i in 1..=params.workers {{ names.push(`worker-${{i}}`); }}
log(`planned ${{names.len()}} workers`);
#{{ workers: names, first: names[0] }}
'''

[[steps]]
id = "show"
needs = ["layout"]
run = "echo {{{{ steps.layout.outputs.workers.len() }}}} {{{{ steps.layout.outputs.first }}}} > layout.txt"
"#
    );
    let out = run_runbook(&toml, &[]);
    out.assert_code(0);
    assert_eq!(
        std::fs::read_to_string(out.dir.path().join("layout.txt")).expect("layout"),
        "3 worker-1\n"
    );
    let log = std::fs::read_to_string(out.bundle().join("steps/layout/local/attempt-1.log"))
        .expect("log");
    assert!(log.contains(" out planned 3 workers"), "{log}");
}

#[test]
fn an_infinite_loop_is_stopped_by_the_operation_limit() {
    let toml =
        format!("{HEAD}[[steps]]\nid = \"spin\"\nscript = \"let x = 0; loop {{ x += 1; }}\"\n");
    let started = Instant::now();
    let out = run_runbook(&toml, &[]);
    out.assert_code(1);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let reason = step(&out.manifest(), "spin")["reason"]
        .as_str()
        .expect("reason")
        .to_owned();
    assert!(
        reason.contains("Too many operations") && reason.contains("runbook.toml:5:34"),
        "{reason}"
    );
}

#[test]
fn hooks_fire_in_order_and_notes_reach_the_manifest() {
    let toml = format!(
        r#"{HEAD}
[hooks]
before_run = 'log("before_run")'
before_step = 'log(`before_step ${{step.id}}`)'
after_step = 'log(`after_step ${{step.id}} ${{step.status}}`)'
on_failure = 'evidence.note(`step ${{step.id}} failed: ${{step.reason}}`)'
after_run = 'log(`after_run ${{run.status}}`)'

[[steps]]
id = "ok"
run = "true"
before = 'log("before ok")'
after = 'log(`after ok ${{output.exit_code}}`)'

[[steps]]
id = "bad"
needs = ["ok"]
run = "exit 4"
"#
    );
    let out = run_runbook(&toml, &[]);
    out.assert_code(1);
    let logs: Vec<String> = out
        .journal()
        .iter()
        .filter(|e| e["event"] == "log")
        .map(|e| e["message"].as_str().expect("message").to_owned())
        .collect();
    assert_eq!(
        logs,
        [
            "before_run",
            "before_step ok",
            "before ok",
            "after ok 0",
            "after_step ok succeeded",
            "before_step bad",
            "after_step bad failed",
            "after_run failed"
        ]
    );
    let notes = out.manifest()["notes"].clone();
    assert!(
        notes
            .as_array()
            .expect("notes")
            .iter()
            .any(|n| n["message"] == "bad: step bad failed: exit code 4"),
        "{notes}"
    );
}

#[test]
fn fail_in_a_hook_stops_the_step_with_its_message() {
    let toml = format!(
        "{HEAD}[hooks]\nbefore_step = 'if step.id == \"prod\" {{ fail(\"prod changes need a ticket\") }}'\n[[steps]]\nid = \"prod\"\nrun = \"touch ran\"\n"
    );
    let out = run_runbook(&toml, &[]);
    out.assert_code(1);
    assert_eq!(
        step(&out.manifest(), "prod")["reason"],
        "prod changes need a ticket"
    );
    assert!(!out.dir.path().join("ran").exists());
}

#[test]
fn runtime_errors_name_the_expression_and_its_place() {
    let toml = format!("{HEAD}[[steps]]\nid = \"a\"\nrun = \"echo {{}}\"\ncapture = \"json\"\noutputs = {{ x = \"output.json.missing\" }}\n");
    let out = run_runbook(&toml, &[]);
    out.assert_code(1);
    let reason = step(&out.manifest(), "a")["reason"]
        .as_str()
        .expect("reason")
        .to_owned();
    assert_eq!(reason, "`outputs.x` `output.json.missing` failed at runbook.toml:7:30: Property not found: missing");
}

#[test]
fn allowed_environment_variables_are_visible_others_are_not() {
    let toml = "[runbook]\nname = \"t\"\nallow_env = [\"RB_TEST_VISIBLE\"]\n[[steps]]\nid = \"a\"\nrun = \"echo {{ env.RB_TEST_VISIBLE }} > env.txt\"\n";
    let out = Test::new()
        .runbook(toml)
        .env("RB_TEST_VISIBLE", "seen")
        .env("RB_TEST_HIDDEN", "hidden")
        .args([
            "run",
            "runbook.toml",
            "--evidence-dir",
            "proof",
            "--no-progress",
        ])
        .run();
    out.assert_code(0);
    assert_eq!(
        std::fs::read_to_string(out.dir.path().join("env.txt")).expect("env"),
        "seen\n"
    );
    let hidden = toml.replace("env.RB_TEST_VISIBLE", "env.RB_TEST_HIDDEN");
    let out = Test::new()
        .runbook(&hidden)
        .env("RB_TEST_HIDDEN", "hidden")
        .args([
            "run",
            "runbook.toml",
            "--evidence-dir",
            "proof",
            "--no-progress",
        ])
        .run();
    out.assert_code(1);
    let reason = step(&out.manifest(), "a")["reason"]
        .as_str()
        .expect("reason")
        .to_owned();
    assert!(
        reason.contains("Property not found: RB_TEST_HIDDEN"),
        "{reason}"
    );
}

fn check(toml: &str) -> crate::common::Output {
    Test::new()
        .runbook(toml)
        .args(["check", "runbook.toml"])
        .run()
}

#[test]
fn expression_syntax_errors_are_found_by_check_with_their_position() {
    let out = check(&format!(
        "{HEAD}[[steps]]\nid = \"a\"\nrun = \"true\"\nuntil = \"output.exit_code ==\"\n"
    ));
    out.assert_code(2)
        .assert_stderr_contains("error[RB0011]: `until` does not parse")
        .assert_stderr_contains("runbook.toml:6:");
    let out = check(&format!(
        "{HEAD}[[steps]]\nid = \"a\"\nrun = \"true\"\nwhen = \"parms.x\"\n"
    ));
    out.assert_code(2)
        .assert_stderr_contains("`when` does not parse: Undefined variable: parms")
        .assert_stderr_contains("runbook.toml:6:9")
        .assert_stderr_contains("`when` can use: `params`");
    let out = check(&format!(
        "{HEAD}[[steps]]\nid = \"a\"\nrun = \"echo {{{{ output.stdout }}}}\"\n"
    ));
    out.assert_code(2)
        .assert_stderr_contains("Undefined variable: output")
        .assert_stderr_contains("runbook.toml:5:");
    let out = check(&format!(
        "{HEAD}[hooks]\nafter_run = \"let x = ;\"\n[[steps]]\nid = \"a\"\nrun = \"true\"\n"
    ));
    out.assert_code(2)
        .assert_stderr_contains("`after_run` does not parse")
        .assert_stderr_contains("runbook.toml:4:22");
}

#[test]
fn step_references_are_checked_statically() {
    let base = format!("{HEAD}[[steps]]\nid = \"facts-os\"\nrun = \"true\"\n[[steps]]\nid = \"b\"\nrun = \"true\"\n");
    let out = check(&format!("{base}[[steps]]\nid = \"c\"\nneeds = [\"facts-os\"]\nrun = \"echo {{{{ steps.facts.stdout }}}}\"\n"));
    out.assert_code(2)
        .assert_stderr_contains("error[RB0016]: `steps.facts` refers to no step");
    out.assert_stderr_contains("ids with `-` or `.` are written `steps[\"facts-os\"]`")
        .assert_stderr_contains("runbook.toml:12:");
    let out = check(&format!("{base}[[steps]]\nid = \"c\"\nneeds = [\"facts-os\"]\nwhen = \"steps.b.status == \\\"succeeded\\\"\"\nrun = \"true\"\n"));
    out.assert_code(2)
        .assert_stderr_contains("error[RB0017]: step `c` reads `steps.b` but does not need it");
    out.assert_stderr_contains("add `\"b\"` to the `needs` of `c`");
    let ok = check(&format!("{base}[[steps]]\nid = \"c\"\nneeds = [\"facts-os\", \"b\"]\nrun = \"echo {{{{ steps[\\\"facts-os\\\"].status }}}} {{{{ steps.b.exit_code }}}}\"\n"));
    ok.assert_code(0);
}

/// A condition that is not a boolean names itself, its text and where it is written.
#[test]
fn a_non_boolean_condition_says_which_and_where() {
    let out = Test::new()
        .runbook(
            "[runbook]\nname = \"c\"\n[params]\nn = 3\n[[steps]]\nid = \"a\"\nrun = \"echo hi\"\ncheck = \"output.stdout\"\n[[steps]]\nid = \"b\"\nwhen = \"params.n\"\nrun = \"true\"\n",
        )
        .run_args()
        .run();
    out.assert_code(1);
    let m = out.manifest();
    assert_eq!(
        crate::common::step(&m, "a")["reason"],
        "`check` `output.stdout` at runbook.toml:8:10 must be true or false; got a value of type string"
    );
    assert_eq!(
        crate::common::step(&m, "b")["reason"],
        "`when` `params.n` at runbook.toml:11:9 must be true or false; got a value of type i64"
    );
}
