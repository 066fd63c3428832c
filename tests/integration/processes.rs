//! Process control with real processes and signals: timeouts kill whole process groups,
//! leftovers are stopped, output of any size streams through in bounded memory, and Ctrl-C
//! finalises the bundle as cancelled.

use std::time::{Duration, Instant};

use crate::common::{processes_matching, read_json, run_runbook, step, unique_marker, Test};

const HEAD: &str = "[runbook]\nname = \"t\"\n";

#[test]
fn timeout_kills_grandchildren_too() {
    let marker = unique_marker();
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"hang\"\ntimeout = \"1s\"\nkill_grace = \"1s\"\nrun = \"sleep {marker} & sleep {marker}; wait\"\n"
    );
    let started = Instant::now();
    let out = run_runbook(&toml, &[]);
    out.assert_code(1);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "did not wait for sleep"
    );
    let m = out.manifest();
    assert_eq!(step(&m, "hang")["reason"], "timed out after 1s");
    assert_eq!(
        step(&m, "hang")["attempts"][0]["outcome"]["kind"],
        "timed_out"
    );
    assert_eq!(
        processes_matching(&format!("sleep {marker}")),
        Vec::<i32>::new()
    );
}

#[test]
fn a_child_ignoring_term_is_killed_after_the_grace_period() {
    let marker = unique_marker();
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"stubborn\"\ntimeout = \"500ms\"\nkill_grace = \"1s\"\nrun = \"trap '' TERM; sleep {marker} & trap '' TERM; wait\"\n"
    );
    let out = run_runbook(&toml, &[]);
    out.assert_code(1);
    let m = out.manifest();
    let duration = step(&m, "stubborn")["attempts"][0]["duration_seconds"]
        .as_f64()
        .expect("duration");
    assert!(
        duration >= 1.4,
        "waited timeout + grace before KILL: {duration}"
    );
    assert_eq!(
        processes_matching(&format!("sleep {marker}")),
        Vec::<i32>::new()
    );
}

#[test]
fn background_leftovers_are_stopped_when_the_step_exits() {
    let marker = unique_marker();
    let toml =
        format!("{HEAD}[[steps]]\nid = \"leaky\"\nrun = \"sleep {marker} & echo started\"\n");
    let started = Instant::now();
    let out = run_runbook(&toml, &[]);
    out.assert_code(0);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "did not wait for the leftover"
    );
    assert_eq!(
        processes_matching(&format!("sleep {marker}")),
        Vec::<i32>::new()
    );
    let log =
        std::fs::read_to_string(out.bundle().join("steps/leaky/local/attempt-1.log")).expect("log");
    assert!(log.contains(" out started\n"), "{log}");
}

#[test]
fn a_process_that_escapes_the_group_cannot_hang_the_run() {
    // setsid puts the grandchild in its own session, and `env -i` clears the environment the
    // runner would find it by: it keeps the output pipe open after the step's shell exits. The
    // runner must stop reading rather than wait for it, and say so as the engine — regression:
    // the message was written as the step's stderr (`err [runbook] output truncated…`).
    let marker = unique_marker();
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"escape\"\nrun = \"setsid env -i sleep {marker} & sleep 0.5; echo bye\"\n"
    );
    let started = Instant::now();
    let out = run_runbook(&toml, &[]);
    out.assert_code(0);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "run finished without waiting for the escaped process"
    );
    for pid in processes_matching(&format!("sleep {marker}")) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let log = std::fs::read_to_string(out.bundle().join("steps/escape/local/attempt-1.log"))
        .expect("log");
    assert!(
        log.contains(" --- output truncated: a process outside the step's process group kept its output open\n"),
        "an engine record: {log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains(" err ") && l.contains("truncated")),
        "not the step's stderr: {log}"
    );
    let m = out.manifest();
    assert_eq!(step(&m, "escape")["attempts"][0]["output"]["stderr"], 0);
    let journal = out.journal();
    assert!(
        journal
            .iter()
            .any(|e| e["event"] == "attempt_note" && e["step"] == "escape"),
        "in the journal"
    );
}

#[test]
fn output_is_streamed_with_flat_memory() {
    // 200 MB of output: 100 MB in lines and 100 MB as a single line with no newline at all.
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"loud\"\nrun = \"awk 'BEGIN {{ for (i = 0; i < 1000000; i++) printf \\\"%099d\\\\n\\\", i }}'; head -c 100000000 /dev/zero | tr '\\\\0' x\"\n"
    );
    let t = Test::new().runbook(&toml).args([
        "run",
        "runbook.toml",
        "--evidence-dir",
        "proof",
        "--no-progress",
    ]);
    let (mut child, dir) = t.spawn();
    // Peak RSS of the runbook process itself (VmHWM only grows), sampled until it exits.
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let code = loop {
        if let Ok(text) = std::fs::read_to_string(&status_file) {
            if let Some(hwm) = text.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
                let kib = hwm
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .unwrap_or(0);
                peak_kib = peak_kib.max(kib);
            }
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0));
    let out = crate::common::Output {
        code: 0,
        stdout: String::new(),
        stderr: String::new(),
        dir,
    };
    let m = out.manifest();
    assert_eq!(
        step(&m, "loud")["attempts"][0]["output"]["stdout"],
        200_000_000
    );
    let log = out.bundle().join("steps/loud/local/attempt-1.log");
    let size = std::fs::metadata(&log).expect("log").len();
    assert!(size > 200_000_000, "every byte is in the log: {size}");
    let peak_mib = peak_kib / 1024;
    assert!(
        peak_mib < 100,
        "runner memory stayed flat: peak {peak_mib} MiB for 200 MB of output"
    );
}

#[test]
fn interrupt_cancels_the_run_and_finalises_the_bundle() {
    let marker = unique_marker();
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"long\"\nkill_grace = \"1s\"\nrun = \"trap '' TERM; sleep {marker}\"\n[[steps]]\nid = \"next\"\nneeds = [\"long\"]\nrun = \"true\"\n"
    );
    let t = Test::new().runbook(&toml).args([
        "run",
        "runbook.toml",
        "--evidence-dir",
        "proof",
        "--no-progress",
    ]);
    let dir_path = t.path().to_path_buf();
    let (child, _dir) = t.spawn();
    // Wait until the step is running.
    let deadline = Instant::now() + Duration::from_secs(20);
    while processes_matching(&format!("sleep {marker}")).is_empty() {
        assert!(Instant::now() < deadline, "step never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        processes_matching(&format!("sleep {marker}")),
        Vec::<i32>::new(),
        "no process remains"
    );
    let bundle = crate::common::find_bundle(&dir_path);
    let m = read_json(&bundle.join("manifest.json"));
    assert_eq!(m["status"], "cancelled");
    assert_eq!(step(&m, "long")["status"], "cancelled");
    assert_eq!(step(&m, "next")["status"], "skipped");
    assert!(bundle.join("SHA256SUMS").is_file(), "bundle finalised");
}

/// Regression: a process that left the step's process group (`set -m` job control, `setsid`)
/// outlived the step, its timeout and the run. Each attempt now stops whatever carries its id
/// (`RUNBOOK_ATTEMPT_ID`) outside the group — on timeout, on exit, and with KILL when TERM is
/// ignored — and records what it stopped.
#[test]
fn processes_that_leave_the_group_end_with_the_step() {
    let marker = unique_marker();
    // The steps wait until their stray has exec'd `sleep` (its argv ends in the marker), so the
    // stray is recorded as `sleep …` however slow the machine. `[d]igits` keeps grep from
    // finding its own pattern in its own argv.
    let (m0, mrest) = marker.split_at(1);
    let toml = format!(
        r#"{HEAD}
[defaults]
kill_grace = "500ms"

[[steps]]
id = "jobctl"
timeout = "1s"
continue_on_failure = true
run = '''
set -m
sleep {marker}1 > /dev/null 2>&1 &
echo "bg in own pgid"
sleep 100
'''

[[steps]]
id = "exits"
run = "setsid sleep {marker}2 & until grep -qsxz '[{m0}]{mrest}2' /proc/[0-9]*/cmdline; do sleep 0.05; done; echo launched"

[[steps]]
id = "stubborn"
run = "setsid sh -c 'trap \"\" TERM; exec sleep {marker}3' > /dev/null 2>&1 & until grep -qsxz '[{m0}]{mrest}3' /proc/[0-9]*/cmdline; do sleep 0.05; done; echo launched"
"#
    );
    let started = Instant::now();
    let out = run_runbook(&toml, &[]);
    out.assert_code(0);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "did not wait for the strays"
    );
    for n in 1..=3 {
        assert_eq!(
            processes_matching(&format!("sleep {marker}{n}")),
            Vec::<i32>::new(),
            "sleep {marker}{n} ended with its step"
        );
    }
    let m = out.manifest();
    for (id, n, killed) in [
        ("jobctl", 1, false),
        ("exits", 2, false),
        ("stubborn", 3, true),
    ] {
        let attempt = &step(&m, id)["attempts"][0];
        let stopped = attempt["stopped_processes"]
            .as_array()
            .unwrap_or_else(|| panic!("{id}: stopped_processes in {attempt}"));
        let p = stopped
            .iter()
            .find(|p| p["command"] == format!("sleep {marker}{n}"))
            .unwrap_or_else(|| panic!("{id}: sleep {marker}{n} in {stopped:?}"));
        assert_eq!(p["killed"].as_bool().unwrap_or(false), killed, "{id}: {p}");
        let pid = p["pid"].as_u64().expect("pid");
        let log =
            std::fs::read_to_string(out.bundle().join(format!("steps/{id}/local/attempt-1.log")))
                .expect("log");
        let signal = if killed { "SIGKILL" } else { "SIGTERM" };
        assert!(
            log.contains(&format!(
                " --- stopped a process that had left the step's process group: pid {pid} ({signal}): sleep {marker}{n}\n"
            )),
            "{id}: an engine record in the log: {log}"
        );
        assert!(
            !log.contains("output truncated"),
            "{id}: the pipe closed: {log}"
        );
        assert!(
            out.journal()
                .iter()
                .any(|e| e["event"] == "processes_stopped"
                    && e["step"] == id
                    && e["processes"]
                        .to_string()
                        .contains(&format!("sleep {marker}{n}"))),
            "{id}: in the journal"
        );
    }
    assert_eq!(step(&m, "jobctl")["reason"], "timed out after 1s");
    assert_eq!(step(&m, "exits")["status"], "succeeded");
}

/// A cancelled attempt stops what left its group along with the group.
#[test]
fn interrupt_stops_processes_that_left_the_group() {
    let marker = unique_marker();
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"long\"\nkill_grace = \"1s\"\nrun = \"setsid sleep {marker}1 & sleep {marker}2\"\n"
    );
    let t = Test::new().runbook(&toml).run_args();
    let (child, _dir) = t.spawn();
    let deadline = Instant::now() + Duration::from_secs(20);
    while processes_matching(&format!("sleep {marker}1")).is_empty()
        || processes_matching(&format!("sleep {marker}2")).is_empty()
    {
        assert!(Instant::now() < deadline, "step never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(130));
    for n in 1..=2 {
        assert_eq!(
            processes_matching(&format!("sleep {marker}{n}")),
            Vec::<i32>::new(),
            "sleep {marker}{n} was stopped"
        );
    }
}

/// Whatever still carries the run's id when the run ends is stopped and noted: here a process
/// that dropped the attempt's id but kept the run's.
#[test]
fn the_end_of_a_run_stops_what_still_carries_its_id() {
    let marker = unique_marker();
    // The sleep gives it time to leave the group: killed with the group it would prove nothing.
    let toml = format!(
        "{HEAD}[[steps]]\nid = \"a\"\nkill_grace = \"500ms\"\nrun = \"env -u RUNBOOK_ATTEMPT_ID setsid sleep {marker} > /dev/null 2>&1 & sleep 0.2; echo launched\"\n"
    );
    let out = run_runbook(&toml, &[]);
    out.assert_code(0);
    assert_eq!(
        processes_matching(&format!("sleep {marker}")),
        Vec::<i32>::new(),
        "stopped at the end of the run"
    );
    out.assert_stderr_contains(
        "stopped a process still running with this run's id at the end of the run: pid ",
    );
    let notes = out.manifest()["notes"].to_string();
    assert!(
        notes.contains("at the end of the run: pid ")
            && notes.contains(&format!("(SIGTERM): sleep {marker}")),
        "noted: {notes}"
    );
}
