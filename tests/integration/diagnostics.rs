//! Every diagnostic `runbook check` gives, with its exact position. Each runbook below is small
//! enough to count lines and columns by eye; positions are 1-based, columns in characters.

use crate::common::Test;

fn check(toml: &str) -> crate::common::Output {
    Test::new()
        .runbook(toml)
        .args(["check", "runbook.toml"])
        .run()
}

/// Asserts a diagnostic with `code` at `line:col` and text containing `message`.
#[track_caller]
fn assert_diag(out: &crate::common::Output, code: &str, line: usize, col: usize, message: &str) {
    out.assert_code(2);
    let header = format!("error[{code}]");
    let at = format!("runbook.toml:{line}:{col}");
    let block = out
        .stderr
        .split("\nerror")
        .map(|b| {
            if b.starts_with("error") {
                b.to_owned()
            } else {
                format!("error{b}")
            }
        })
        .find(|b| b.starts_with(&header) && b.contains(&at) && b.contains(message));
    assert!(
        block.is_some(),
        "expected {header} at {at} with {message:?}\n--- stderr\n{}",
        out.stderr
    );
}

const HEAD: &str = "[runbook]\nname = \"t\"\n";

#[test]
fn toml_syntax_error_is_pinpointed() {
    let out = check(&format!("{HEAD}[[steps]]\nid = \"a\nrun = \"true\"\n"));
    assert_diag(&out, "RB0001", 4, 8, "invalid TOML");
}

#[test]
fn unknown_key_suggests_the_nearest() {
    let out = check(&format!(
        "{HEAD}[[steps]]\nid = \"a\"\nrun = \"true\"\ntimout = \"5s\"\n"
    ));
    assert_diag(&out, "RB0002", 6, 1, "unknown key `timout` in a step");
    out.assert_stderr_contains("did you mean `timeout`?");
}

#[test]
fn unknown_top_level_table_is_an_error() {
    let out = check(&format!(
        "{HEAD}[defualts]\ntimeout = \"1m\"\n[[steps]]\nid = \"a\"\nrun = \"true\"\n"
    ));
    assert_diag(&out, "RB0002", 3, 2, "unknown key `defualts`");
    out.assert_stderr_contains("did you mean `defaults`?");
}

#[test]
fn wrong_type_says_what_was_expected() {
    let out = check(&format!("{HEAD}[[steps]]\nid = \"a\"\nrun = \"true\"\n[[steps]]\nid = \"b\"\nneeds = \"a\"\nrun = \"true\"\n"));
    assert_diag(
        &out,
        "RB0003",
        8,
        9,
        "`needs` must be a list of strings, found a string",
    );
    out.assert_stderr_contains("write `needs = [\"a\"]`");
    let out = check(&format!(
        "{HEAD}[[steps]]\nid = \"a\"\nrun = \"true\"\nalways = \"yes\"\n"
    ));
    assert_diag(
        &out,
        "RB0003",
        6,
        10,
        "`always` must be `true` or `false`, found a string",
    );
}

#[test]
fn single_bracket_steps_get_a_hint() {
    let out = check(&format!("{HEAD}[steps]\nid = \"a\"\nrun = \"true\"\n"));
    out.assert_code(2).assert_stderr_contains("[RB0003]");
    out.assert_stderr_contains("write each step as `[[steps]]`");
}

#[test]
fn duplicate_step_ids_show_both_places() {
    let out = check(&format!("{HEAD}[[steps]]\nid = \"build\"\nrun = \"true\"\n[[steps]]\nid = \"build\"\nrun = \"true\"\n"));
    assert_diag(&out, "RB0005", 7, 6, "duplicate step id `build`");
    out.assert_stderr_contains("first defined here");
    out.assert_stderr_contains("4 │ id = \"build\"");
}

#[test]
fn ids_that_collide_after_normalisation_are_duplicates() {
    let out = check(&format!("{HEAD}[[steps]]\nid = \"Build_Image\"\nrun = \"true\"\n[[steps]]\nid = \"build-image\"\nrun = \"true\"\n"));
    assert_diag(
        &out,
        "RB0005",
        7,
        6,
        "step id `build-image` collides with `Build_Image`",
    );
}

#[test]
fn unknown_need_suggests_an_existing_step() {
    let out = check(&format!("{HEAD}[[steps]]\nid = \"build\"\nrun = \"true\"\n[[steps]]\nid = \"test\"\nneeds = [\"biuld\"]\nrun = \"true\"\n"));
    assert_diag(
        &out,
        "RB0006",
        8,
        10,
        "step `test` needs `biuld`, which does not exist",
    );
    out.assert_stderr_contains("did you mean `build`?");
}

#[test]
fn cycles_print_their_path() {
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"a\"\nneeds = [\"c\"]\nrun = \"true\"\n[[steps]]\nid = \"b\"\nneeds = [\"a\"]\nrun = \"true\"\n[[steps]]\nid = \"c\"\nneeds = [\"b\"]\nrun = \"true\"\n[[steps]]\nid = \"free\"\nrun = \"true\"\n"
    );
    let out = check(&toml);
    assert_diag(&out, "RB0007", 5, 10, "dependency cycle: a → c → b → a");
}

#[test]
fn self_dependency_is_a_cycle() {
    let out = check(&format!(
        "{HEAD}[[steps]]\nid = \"a\"\nneeds = [\"a\"]\nrun = \"true\"\n"
    ));
    assert_diag(&out, "RB0007", 5, 10, "dependency cycle: a → a");
}

#[test]
fn bad_durations_are_pinpointed() {
    let out = check(&format!(
        "{HEAD}[[steps]]\nid = \"a\"\nrun = \"true\"\ntimeout = \"5x\"\n"
    ));
    assert_diag(&out, "RB0008", 6, 11, "invalid duration for `timeout`");
    let out = check(&format!(
        "{HEAD}[defaults]\ntimeout = 30\n[[steps]]\nid = \"a\"\nrun = \"true\"\n"
    ));
    assert_diag(
        &out,
        "RB0008",
        4,
        11,
        "`timeout` must be a duration string, found the number 30",
    );
    out.assert_stderr_contains("write `timeout = \"30s\"`");
}

#[test]
fn bad_retry_settings_are_pinpointed() {
    let out = check(&format!(
        "{HEAD}[[steps]]\nid = \"a\"\nrun = \"true\"\nretry = {{ attempts = 0 }}\n"
    ));
    assert_diag(
        &out,
        "RB0009",
        6,
        22,
        "`attempts` must be between 1 and 10000, found 0",
    );
    let out = check(&format!(
        "{HEAD}[[steps]]\nid = \"a\"\nrun = \"true\"\nretry = {{ backoff = \"exponental\" }}\n"
    ));
    assert_diag(&out, "RB0009", 6, 21, "unknown backoff `exponental`");
    out.assert_stderr_contains("did you mean `exponential`?");
    let out = check(&format!("{HEAD}[[steps]]\nid = \"a\"\nrun = \"true\"\nretry = {{ delay = \"10s\", max_delay = \"1s\" }}\n"));
    assert_diag(
        &out,
        "RB0009",
        6,
        38,
        "`max_delay` (1s) is shorter than `delay` (10s)",
    );
}

#[test]
fn template_errors_point_inside_the_string() {
    // Column 23 is the `+` with nothing after it: the Rhai error maps through the TOML string.
    let out = check(&format!(
        "{HEAD}[params]\nv = \"1\"\n[[steps]]\nid = \"a\"\nrun = \"echo {{{{ params.v + }}}}\"\n"
    ));
    out.assert_code(2).assert_stderr_contains("[RB0011]");
    out.assert_stderr_contains("runbook.toml:7:");
    let out = check(&format!(
        "{HEAD}[[steps]]\nid = \"a\"\nrun = \"echo {{{{ oops\"\n"
    ));
    assert_diag(&out, "RB0011", 5, 13, "template does not parse");
}

#[test]
fn unknown_params_in_templates_are_caught_before_running() {
    let out = check(&format!("{HEAD}[params]\nversion = \"1\"\n[[steps]]\nid = \"a\"\nrun = \"echo {{{{ params.verison }}}}\"\n"));
    assert_diag(&out, "RB0012", 7, 16, "unknown parameter `verison`");
    out.assert_stderr_contains("did you mean `params.version`?");
}

#[test]
fn a_step_without_an_action_or_id_is_reported() {
    let out = check(&format!("{HEAD}[[steps]]\nid = \"a\"\n"));
    assert_diag(&out, "RB0013", 4, 6, "step `a` has nothing to do");
    let out = check(&format!("{HEAD}[[steps]]\nrun = \"true\"\n"));
    out.assert_code(2)
        .assert_stderr_contains("[RB0004]")
        .assert_stderr_contains("step has no `id`");
}

#[test]
fn invalid_ids_are_rejected() {
    let out = check(&format!(
        "{HEAD}[[steps]]\nid = \"build image\"\nrun = \"true\"\n"
    ));
    assert_diag(&out, "RB0010", 4, 6, "step id `build image` is not valid");
}

#[test]
fn missing_runbook_table_and_steps() {
    let out = check("[[steps]]\nid = \"a\"\nrun = \"true\"\n");
    out.assert_code(2)
        .assert_stderr_contains("missing `[runbook]` table");
    let out = check(HEAD);
    out.assert_code(2)
        .assert_stderr_contains("the runbook has no steps");
}

#[test]
fn all_problems_are_reported_in_one_pass() {
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"a\"\nrun = \"true\"\ntimout = \"1s\"\n[[steps]]\nid = \"b\"\nrun = \"true\"\nretry = {{ attempts = 0 }}\n[[steps]]\nid = \"c\"\nrun = \"true\"\ntimeout = \"soon\"\n"
    );
    let out = check(&toml);
    out.assert_code(2);
    for code in ["RB0002", "RB0009", "RB0008"] {
        out.assert_stderr_contains(&format!("[{code}]"));
    }
    out.assert_stderr_contains("has 3 errors");
}

#[test]
fn a_bom_and_crlf_line_endings_are_accepted() {
    let out =
        check("\u{feff}[runbook]\r\nname = \"t\"\r\n[[steps]]\r\nid = \"a\"\r\nrun = \"true\"\r\n");
    out.assert_code(0);
    let out = check("\u{feff}[runbook]\r\nname = \"t\"\r\n[[steps]]\r\nid = \"a\"\r\nrun = \"true\"\r\nneeds = [\"x\"]\r\n");
    assert_diag(&out, "RB0006", 6, 10, "needs `x`");
}

#[test]
fn unreadable_and_non_utf8_files_fail_clearly() {
    let out = Test::new().args(["check", "missing.toml"]).run();
    out.assert_code(2)
        .assert_stderr_contains("cannot read `missing.toml`");
    let t = Test::new();
    std::fs::write(
        t.path().join("bin.toml"),
        b"[runbook]\nname = \"\xff\xfe\"\n",
    )
    .expect("write");
    let out = t.args(["check", "bin.toml"]).run();
    out.assert_code(2)
        .assert_stderr_contains("`bin.toml` is not UTF-8 text (invalid byte at offset 18)");
}

#[test]
fn check_takes_several_files_and_reports_each() {
    let out = Test::new()
        .file(
            "good.toml",
            &format!("{HEAD}[[steps]]\nid = \"a\"\nrun = \"true\"\n"),
        )
        .file(
            "bad.toml",
            &format!("{HEAD}[[steps]]\nid = \"a\"\nrun = \"true\"\nneeds = [\"zz\"]\n"),
        )
        .args(["check", "good.toml", "bad.toml"])
        .run();
    out.assert_code(2)
        .assert_stderr_contains("good.toml: ok (1 steps)")
        .assert_stderr_contains("bad.toml:6:10");
}

#[test]
fn explain_prints_the_code_page() {
    let out = Test::new().args(["explain", "rb0007"]).run();
    out.assert_code(0);
    assert!(
        out.stdout
            .contains("RB0007: The `needs` relations form a cycle"),
        "{}",
        out.stdout
    );
    Test::new().args(["explain", "RB9999"]).run().assert_code(2);
}

#[test]
fn unknown_set_param_and_selection_are_usage_errors() {
    let toml =
        format!("{HEAD}[params]\nversion = \"1\"\n[[steps]]\nid = \"build\"\nrun = \"true\"\n");
    let out = Test::new()
        .runbook(&toml)
        .args(["plan", "runbook.toml", "--set", "verison=2"])
        .run();
    out.assert_code(2).assert_stderr_contains(
        "`--set verison=…` names no parameter of this runbook (did you mean `version`?)",
    );
    let out = Test::new()
        .runbook(&toml)
        .args(["plan", "runbook.toml", "--only", "biuld"])
        .run();
    out.assert_code(2).assert_stderr_contains(
        "no step `biuld` in this runbook (given to `--only`); did you mean `build`?",
    );
}

/// Regression: graph problems (unknown needs, cycles) were only reported once every other
/// error was fixed.
#[test]
fn graph_problems_are_reported_with_the_others() {
    let out = check(&format!(
        "{HEAD}[[steps]]\nid = \"a\"\nrun = \"true\"\ntimout = \"5s\"\nneeds = [\"b\"]\n[[steps]]\nid = \"c\"\nneeds = [\"d\"]\n[[steps]]\nid = \"d\"\nneeds = [\"c\"]\nrun = \"true\"\n"
    ));
    out.assert_code(2);
    for code in ["RB0002", "RB0006", "RB0007", "RB0013"] {
        out.assert_stderr_contains(&format!("[{code}]"));
    }
}

#[test]
fn an_inventory_typo_points_at_the_key_and_suggests_the_nearest() {
    let out = Test::new()
        .file(
            "inventory.toml",
            "[defaults]\nuser = \"rocky\"\n\n[hosts.web-1]\naddress = \"10.0.0.5\"\nprot = 2222\n\n[groups.web]\nhosts = [\"web-1\"]\nvar = { a = 1 }\n",
        )
        .runbook(&format!(
            "{HEAD}inventory = \"inventory.toml\"\n[[steps]]\nid = \"a\"\non = \"web\"\nrun = \"true\"\n"
        ))
        .args(["check", "runbook.toml"])
        .run();
    out.assert_code(2);
    for (at, message) in [
        ("inventory.toml:6:1", "host `web-1`: unknown field `prot`"),
        ("inventory.toml:10:1", "group `web`: unknown field `var`"),
    ] {
        assert!(
            out.stderr
                .split("\nerror")
                .any(|b| b.contains("RB0018") && b.contains(at) && b.contains(message)),
            "{message} at {at}\n{}",
            out.stderr
        );
    }
    out.assert_stderr_contains("did you mean `port`?");
}

#[test]
fn a_missing_inventory_points_at_where_the_runbook_names_it() {
    let out = check(&format!(
        "{HEAD}inventory = \"inventories/lab.toml\"\n[[steps]]\nid = \"a\"\non = \"web\"\nrun = \"true\"\n"
    ));
    assert_diag(&out, "RB0015", 3, 13, "cannot read the inventory");
    out.assert_stderr_contains("inventories/lab.toml");
}

#[test]
fn bad_param_values_point_at_the_declaration_and_never_echo_a_secret() {
    let toml = format!(
        "{HEAD}[params]\npin = {{ secret = true, default = 1234, env = \"RB_TEST_PIN\" }}\nratio = 0.5\nlist = [\"a\"]\n[[steps]]\nid = \"a\"\nrun = \"true\"\n"
    );
    let out = Test::new()
        .runbook(&toml)
        .args(["plan", "runbook.toml", "--set", "pin=hunter2SECRET"])
        .args(["--set", "ratio=nan", "--set", "list=5"])
        .run();
    out.assert_code(2)
        .assert_stderr_contains(
            "runbook.toml:4:1: parameter `pin` (from --set) must be an integer, got [REDACTED:pin]",
        )
        .assert_stderr_contains(
            "runbook.toml:5:1: parameter `ratio` (from --set) must be a finite number, got `nan`",
        )
        .assert_stderr_contains(
            "runbook.toml:6:1: parameter `list` (from --set) must be a JSON array",
        );
    assert!(!out.stderr.contains("hunter2SECRET"), "{}", out.stderr);
    let out = Test::new()
        .runbook(&toml)
        .env("RB_TEST_PIN", "envSECRETval")
        .args(["run", "runbook.toml", "--evidence-dir", "proof"])
        .run();
    out.assert_code(2).assert_stderr_contains(
        "parameter `pin` (from `$RB_TEST_PIN`) must be an integer, got [REDACTED:pin]",
    );
    assert!(!out.stderr.contains("envSECRETval") && !out.stdout.contains("envSECRETval"));
}

/// A literal mistake in a probe or upload is found before anything runs, at its position; it
/// used to surface only when the step was reached, after earlier steps had changed things.
#[test]
fn literal_probe_and_upload_values_are_checked_before_anything_runs() {
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"drain\"\nrun = \"echo ran > drained\"\n[[steps]]\nid = \"wait-api\"\nneeds = [\"drain\"]\ntcp = {{ host = \"127.0.0.1\", port = 70000, timeout = \"3 sec0nds\" }}\n[[steps]]\nid = \"put\"\nupload = {{ content = \"x\", dest = \"{{{{ params.d }}}}\", mode = \"999\" }}\n[params]\nd = \"/tmp/x\"\n"
    );
    let t = Test::new().runbook(&toml);
    let dir = t.path().to_path_buf();
    let out = t
        .args(["run", "runbook.toml", "--evidence-dir", "proof"])
        .run();
    out.assert_code(2)
        .assert_stderr_contains("`tcp` `port` must be a number from 1 to 65535, not 70000")
        .assert_stderr_contains("runbook.toml:9:36")
        .assert_stderr_contains("`tcp` `timeout`: `3 sec0nds` is not a duration")
        .assert_stderr_contains("runbook.toml:9:53")
        .assert_stderr_contains("`upload` `mode = \"999\"` is not an octal mode")
        .assert_stderr_contains("runbook.toml:12:59");
    assert!(!dir.join("drained").exists(), "a step ran");
    assert!(!dir.join("proof").exists(), "a bundle was written");
}

/// A templated value is judged when rendered, by the same rules.
#[test]
fn rendered_probe_values_fail_the_step_with_the_same_rules() {
    let toml = format!(
        "{HEAD}[params]\nt = \"3 sec0nds\"\n[[steps]]\nid = \"wait-api\"\ntcp = {{ host = \"127.0.0.1\", port = 1, timeout = \"{{{{ params.t }}}}\" }}\n"
    );
    let out = Test::new().runbook(&toml).run_args().run();
    out.assert_code(1);
    let m = out.manifest();
    let attempt = &crate::common::step(&m, "wait-api")["attempts"][0];
    assert_eq!(attempt["outcome"]["failure"], "config", "{attempt}");
    assert!(
        attempt["outcome"]["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("tcp: `timeout`: `3 sec0nds` is not a duration"),
        "{attempt}"
    );
}

#[test]
fn an_index_past_the_end_of_a_group_is_an_error_not_a_skipped_step() {
    let inventory = "[hosts.a]\naddress = \"127.0.0.1\"\ngroups = [\"servers\"]\n[hosts.b]\naddress = \"127.0.0.2\"\ngroups = [\"servers\"]\n";
    let toml = "[runbook]\nname = \"t\"\ninventory = \"inv.toml\"\n[[steps]]\nid = \"a\"\non = \"servers[5]\"\nrun = \"true\"\n";
    let t = Test::new().runbook(toml);
    std::fs::write(t.path().join("inv.toml"), inventory).expect("inventory");
    t.args(["check", "runbook.toml"]).run().assert_code(2).assert_stderr_contains(
        "error[RB0019]: `servers[5]`: index 5 is out of range: it has 2 host(s), indexes 0 to 1 (or -2 to -1)",
    ).assert_stderr_contains("runbook.toml:6:6");
    // Hosts added at run time are judged when the step runs: it fails, it is not skipped.
    let late = "[runbook]\nname = \"t\"\n[[steps]]\nid = \"add\"\nscript = 'inventory.add_host(\"vm-1\", #{ address: \"127.0.0.1\", groups: [\"late\"] });'\n[[steps]]\nid = \"use\"\nneeds = [\"add\"]\non = \"late[3]\"\nrun = \"true\"\n";
    let out = Test::new().runbook(late).run_args().run();
    out.assert_code(1);
    let reason = crate::common::step(&out.manifest(), "use")["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        reason,
        "`on = \"late[3]\"`: `late[3]`: index 3 is out of range: it has 1 host(s), indexes 0 to 0 (or -1 to -1)"
    );
}

/// Hooks and the drill's `restored_data_time` run after the steps; a typo in the step they read
/// used to surface only then (an unmeasured drill after a full restore).
#[test]
fn run_level_expressions_must_name_existing_steps() {
    let toml = "[runbook]\nname = \"d\"\n[drill]\nrto = \"10m\"\nrpo = \"1h\"\nrestored_data_time = \"steps.zz.outputs.x\"\n[hooks]\nafter_run = \"log(steps.restroe.status)\"\n[[steps]]\nid = \"restore\"\nrun = \"touch ran\"\n";
    let t = Test::new().runbook(toml);
    let dir = t.path().to_path_buf();
    t.args(["run", "runbook.toml", "--evidence-dir", "proof"])
        .run()
        .assert_code(2)
        .assert_stderr_contains("error[RB0016]: `steps.zz` refers to no step")
        .assert_stderr_contains("runbook.toml:6:23")
        .assert_stderr_contains("error[RB0016]: `steps.restroe` refers to no step")
        .assert_stderr_contains("did you mean `restore`?");
    assert!(!dir.join("ran").exists());
}

/// `[notify]` is used when a run ends, often to report its failure: a webhook address that
/// cannot work is an error before anything runs, and its path (which often holds a token) is
/// not printed.
#[test]
fn a_notify_url_that_cannot_work_is_found_by_check() {
    for (url, expected) in [
        (
            "htp:/hooks/T000/SECRETPATH",
            "`[notify]`: `url` scheme `htp` is not supported (http, https)",
        ),
        (
            "not a url",
            "`[notify]`: `url` `<webhook url>` is not a URL",
        ),
    ] {
        let toml =
            format!("{HEAD}[notify]\nurl = \"{url}\"\n[[steps]]\nid = \"a\"\nrun = \"true\"\n");
        let out = Test::new()
            .runbook(&toml)
            .args(["check", "runbook.toml"])
            .run();
        out.assert_code(2)
            .assert_stderr_contains(expected)
            .assert_stderr_contains("runbook.toml:3:1");
        assert!(!out.stderr.contains("SECRETPATH"), "{}", out.stderr);
    }
    // Every other value is checked with the rest of the runbook too, each problem named.
    let toml = format!(
        "{HEAD}[notify]\nurl = \"https://hooks.example.test/T000/SECRETPATH\"\non = [\"sometimes\"]\nretries = -1\ntimeout = \"0s\"\nformat = \"teams\"\ncolour = 1\n[[steps]]\nid = \"a\"\nrun = \"true\"\n"
    );
    let out = Test::new()
        .runbook(&toml)
        .args(["check", "runbook.toml"])
        .run();
    out.assert_code(2)
        .assert_stderr_contains("`[notify]`: `on` must be a list of")
        .assert_stderr_contains("`[notify]`: `retries` must be a whole number")
        .assert_stderr_contains("`[notify]`: `timeout` must be more than zero")
        .assert_stderr_contains("`[notify]`: `format` must be \"generic\" or \"slack\"")
        .assert_stderr_contains("unknown key `colour`");
    assert!(!out.stderr.contains("SECRETPATH"), "{}", out.stderr);
}

/// Values no command could use are errors at check, not failures (or silent no-ops) at run.
#[test]
fn unusable_names_and_empty_values_are_found_by_check() {
    let toml = "[runbook]\nname = \"e\"\n[[steps]]\nid = \"a\"\nrun = \"echo \\u0000x\"\nenv = { \"BAD NAME\" = \"1\", \"1X\" = \"2\", OK = \"a\\u0000b\" }\ncwd = \" \"\nshell = [\"\"]\napprove = \"\"\n";
    Test::new()
        .runbook(toml)
        .args(["check", "runbook.toml"])
        .run()
        .assert_code(2)
        .assert_stderr_contains("`run` contains a NUL byte")
        .assert_stderr_contains("runbook.toml:5:7")
        .assert_stderr_contains("`BAD NAME` is not a valid environment variable name")
        .assert_stderr_contains("`1X` is not a valid environment variable name")
        .assert_stderr_contains("`env.OK` contains a NUL byte")
        .assert_stderr_contains("`cwd` is empty")
        .assert_stderr_contains("`shell` is empty")
        .assert_stderr_contains("`approve` is empty")
        .assert_stderr_contains("has 7 errors");
}

#[test]
fn output_json_without_capture_json_is_found_by_check() {
    let toml = "[runbook]\nname = \"j\"\n[[steps]]\nid = \"a\"\nrun = \"echo {}\"\ncheck = \"output.json.ok == true\"\n[[steps]]\nid = \"b\"\nrun = \"echo {}\"\ncapture = \"json\"\ncheck = \"output.json.len() == 0\"\n";
    Test::new()
        .runbook(toml)
        .args(["check", "runbook.toml"])
        .run()
        .assert_code(2)
        .assert_stderr_contains("`output.json` is only set when the step has `capture = \"json\"`")
        .assert_stderr_contains("runbook.toml:6:10")
        .assert_stderr_contains("has 1 error");
}

/// `check` is as strict as `run` about inventories, and takes `--inventory` like `run`.
#[test]
fn check_needs_an_inventory_for_on_as_run_does() {
    let toml = "[runbook]\nname = \"t\"\n[[steps]]\nid = \"a\"\non = \"servers\"\nrun = \"true\"\n";
    let inventory = "[hosts.a]\naddress = \"127.0.0.1\"\ngroups = [\"servers\"]\n";
    Test::new()
        .runbook(toml)
        .args(["check", "runbook.toml"])
        .run()
        .assert_code(2)
        .assert_stderr_contains(
            "error[RB0019]: step `a` runs on hosts (`on = \"servers\"`) but there is no inventory",
        );
    Test::new()
        .runbook(toml)
        .file("inv.toml", inventory)
        .args(["check", "runbook.toml", "--inventory", "inv.toml"])
        .run()
        .assert_code(0);
}

#[test]
fn a_secret_written_into_the_runbook_is_warned_about_and_an_empty_required_secret_refused() {
    let toml = format!(
        "{HEAD}[params]\npw = {{ secret = true, default = \"hunter2-in-file\" }}\nopt = {{ secret = true, default = \"\" }}\ntok = {{ secret = true, env = \"RB_TEST_TOK\" }}\n[[steps]]\nid = \"a\"\nrun = \"true\"\n"
    );
    let out = Test::new()
        .runbook(&toml)
        .args(["check", "runbook.toml"])
        .run();
    out.assert_code(0).assert_stderr_contains(
        "warning[RB0014]: runbook.toml:4:33: secret parameter `pw` has its value in the runbook",
    );
    assert!(!out.stderr.contains("hunter2-in-file"), "{}", out.stderr);
    assert!(!out.stderr.contains("`opt`"), "{}", out.stderr);
    Test::new()
        .runbook(&toml)
        .env("RB_TEST_TOK", "")
        .args(["plan", "runbook.toml"])
        .run()
        .assert_code(2)
        .assert_stderr_contains(
            "runbook.toml:6:1: parameter `tok` is a required secret, but the value from `$RB_TEST_TOK` is empty",
        );
}

/// A diagnostic on a huge line (generated or minified TOML) says where instead of printing the
/// line: a 5 MB line used to make 20 MB of stderr.
#[test]
fn a_diagnostic_on_a_huge_line_does_not_print_it() {
    let toml = format!(
        "[runbook]\nname = \"l\"\n[[steps]]\nid = \"a\"\nrun = \"echo {}\", timout = 1\n",
        "x".repeat(200_000)
    );
    let out = Test::new()
        .runbook(&toml)
        .args(["check", "runbook.toml"])
        .run();
    out.assert_code(2)
        .assert_stderr_contains("runbook.toml:5:200014: invalid TOML")
        .assert_stderr_contains("the line is too long to show");
    assert!(
        out.stderr.len() < 2000,
        "{} bytes of stderr",
        out.stderr.len()
    );
}

#[test]
fn a_missing_identity_file_is_warned_about_before_the_run() {
    Test::new()
        .runbook("[runbook]\nname = \"k\"\ninventory = \"inv.toml\"\n[[steps]]\nid = \"a\"\non = \"a\"\nrun = \"true\"\n")
        .file("inv.toml", "[hosts.a]\naddress = \"127.0.0.1\"\nidentity_file = \"/nonexistent/key\"\n")
        .args(["check", "runbook.toml"])
        .run()
        .assert_code(0)
        .assert_stderr_contains("warning[RB0018]: host `a` in `./inv.toml`: identity file `/nonexistent/key` does not exist here");
}

/// `block.<id>` names a sub-step before this one in the same block; outside a block, or for a
/// later sub-step, it is an error at the mention.
#[test]
fn block_reads_only_earlier_sub_steps() {
    let toml = r#"[runbook]
name = "b"
[[steps]]
id = "cycle"
on = "all"
steps = [
  { id = "first", run = "echo {{ block.second.stdout }}" },
  { id = "second", run = "true", when = 'block.first.status == "succeeded"' },
]
[[steps]]
id = "after"
run = "echo {{ block.first.stdout }}"
"#;
    let out = Test::new()
        .runbook(toml)
        .file("inventory.toml", "[hosts.h]\naddress = \"127.0.0.1\"\n")
        .args(["check", "runbook.toml", "--inventory", "inventory.toml"])
        .run();
    out.assert_code(2)
        .assert_stderr_contains("`block.second`: no earlier sub-step `second` in this block")
        .assert_stderr_contains("runbook.toml:7:34")
        .assert_stderr_contains("`block.first`: `block` is only set in a block's sub-steps")
        .assert_stderr_contains("runbook.toml:12:16")
        .assert_stderr_contains("has 2 errors");
}
