//! The day-2 runbooks (issue #24) end to end against the RKE2 lab (docs/rke2/lab.md), one lab
//! test per runbook, each with the fault the issue names. Like `lab`, each test stands up its own
//! lab under the machine-wide lab lock, runs the real `runbook` binary, checks the cluster and
//! verifies the bundle, and takes the lab down on drop.

use crate::common::assert_bundle_verifies;
use crate::lab_harness::{lab_cmd, nodes, text, Lab};

/// `kubectl get node NAME -o jsonpath=…` against the lab.
fn node_field(lab: &Lab, node: &str, path: &str) -> String {
    let out = lab.kubectl(&["get", "node", node, "-o", &format!("jsonpath={path}")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

/// Transactions in a node's `dnf history list`.
fn dnf_transactions(lab: &Lab, node: &str) -> usize {
    let out = lab.exec(node, &["dnf", "history", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).lines().skip(2).count()
}

fn log_of(run: &crate::lab_harness::Run, rel: &str) -> String {
    std::fs::read_to_string(run.bundle().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Rolling OS patching: rke2-server-2 does not come back from its reboot, so the run stops
/// there with it cordoned, quorum kept, nothing after it touched, and a report saying what to
/// do; once it is powered on again the same command finishes the job without rebooting the
/// nodes already patched.
#[test]
fn os_patch_stops_at_a_node_that_does_not_come_back_then_a_rerun_finishes_it() {
    let Some(lab) = Lab::up("127.0.190") else {
        return;
    };
    let version = lab.var("RKE2_VERSION");
    lab.run("rke2-vm-deploy.toml", &[], &[]).assert_code(0);
    let boot = |n: &str| node_field(&lab, n, "{.status.nodeInfo.bootID}");
    let boot_before: Vec<String> = ["rke2-server-1", "rke2-server-2", "rke2-agent-1"]
        .iter()
        .map(|n| boot(n))
        .collect();
    assert!(boot_before.iter().all(|b| !b.is_empty()), "{boot_before:?}");

    let out = lab_cmd(&lab.labdir(), &["fault", "rke2-server-2", "no-boot"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let failed = lab.run(
        "rocky-os-patch.toml",
        &["--set", "reboot_timeout=45s", "--set", "batch_pause=1s"],
        &[],
    );
    failed.assert_code(1);
    assert_eq!(failed.status_of("patch-servers"), "failed");
    assert_eq!(failed.status_of("patch-agents"), "skipped");
    assert_eq!(failed.status_of("what-now"), "succeeded");
    let notes = failed.manifest()["notes"].to_string();
    assert!(
        notes.contains("patching stopped at [\\\"rke2-server-2\\\"]"),
        "{notes}"
    );
    assert!(notes.contains("left cordoned"), "{notes}");
    assert!(notes.contains("run this runbook again"), "{notes}");
    // rke2-server-1 was updated, rebooted (a new boot id) and is back, schedulable.
    let history = log_of(
        &failed,
        "steps/patch-servers/rke2-server-1/update/attempt-1.log",
    );
    assert!(history.contains("Packages Altered"), "{history}");
    assert!(
        history.contains("kernel-core-5.14.0-570.42.2.el9_6"),
        "{history}"
    );
    let back = log_of(
        &failed,
        "steps/patch-servers/rke2-server-1/back/attempt-1.log",
    );
    assert!(back.contains("back from its reboot"), "{back}");
    assert_ne!(boot("rke2-server-1"), boot_before[0]);
    let got = nodes(&lab);
    let by = |n: &str| got.iter().find(|x| x.0 == n).cloned().expect(n);
    assert_eq!(by("rke2-server-1").1, "Ready");
    // rke2-server-2 is not back and stays cordoned; the uncordon said so.
    assert!(
        by("rke2-server-2").1.contains("SchedulingDisabled"),
        "{got:?}"
    );
    assert!(!by("rke2-server-2").1.starts_with("Ready"), "{got:?}");
    let unc = log_of(
        &failed,
        "steps/patch-servers/rke2-server-2/uncordon/attempt-1.log",
    );
    assert!(unc.contains("left cordoned"), "{unc}");
    // Quorum kept (two of three members), and nothing after rke2-server-2 was touched.
    let etcd = lab.kubectl(&["get", "--raw=/readyz/etcd"]);
    assert_eq!(text(&etcd.stdout).trim(), "ok", "{}", text(&etcd.stderr));
    for n in ["rke2-server-3", "rke2-agent-1", "rke2-agent-2"] {
        assert_eq!(dnf_transactions(&lab, n), 0, "{n} was patched");
        assert_eq!(by(n).1, "Ready", "{n}");
    }
    assert_bundle_verifies(&failed.bundle());

    // Powered on at the console: the same command finishes the job.
    let out = lab_cmd(&lab.labdir(), &["fault", "rke2-server-2", "start"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let server1_boot = boot("rke2-server-1");
    let done = lab.run("rocky-os-patch.toml", &["--set", "batch_pause=1s"], &[]);
    done.assert_code(0);
    assert_eq!(done.status_of("verify"), "succeeded");
    assert_eq!(done.status_of("what-now"), "skipped");
    for (name, status, v) in nodes(&lab) {
        assert_eq!(
            (status.as_str(), v.as_str()),
            ("Ready", version.as_str()),
            "{name}"
        );
        let nr = lab.exec(&name, &["needs-restarting", "-r"]);
        assert!(nr.status.success(), "{name}: {}", text(&nr.stdout));
    }
    // Patched nodes are not updated or rebooted again; the rest were, once.
    assert_eq!(boot("rke2-server-1"), server1_boot, "rebooted twice");
    let again = log_of(
        &done,
        "steps/patch-servers/rke2-server-1/update/attempt-1.log",
    );
    assert!(again.contains("no package changed"), "{again}");
    let back = log_of(
        &done,
        "steps/patch-servers/rke2-server-1/back/attempt-1.log",
    );
    assert!(back.contains("no reboot needed"), "{back}");
    for n in ["rke2-server-3", "rke2-agent-1", "rke2-agent-2"] {
        assert_eq!(dnf_transactions(&lab, n), 1, "{n}");
    }
    assert_ne!(boot("rke2-agent-1"), boot_before[2]);
    let agent = log_of(
        &done,
        "steps/patch-agents/rke2-agent-1/update/attempt-1.log",
    );
    assert!(agent.contains("Packages Altered"), "{agent}");
    // RKE2 stayed versionlocked: dnf update did not move it.
    assert!(!agent.contains("Upgrade  rke2-"), "{agent}");
    assert_bundle_verifies(&done.bundle());
}

/// `runbooks/schedules.toml` schedules the real DR drill and the daily certificate-expiry
/// check; `runbook schedule export` turns both into systemd units and CronJobs that run the
/// runbooks with the entries' parameters.
#[test]
fn schedules_export_the_dr_drill_and_the_certificate_expiry_check() {
    let repo = crate::lab_harness::repo();
    let schedules = repo.join("runbooks/schedules.toml");
    let tmp = tempfile::tempdir().expect("tmp");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(crate::common::BIN)
            .arg("schedule")
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .expect("runbook schedule");
        assert!(out.status.success(), "{}", text(&out.stderr));
        out
    };
    let sd = tmp.path().join("systemd");
    let sched = schedules.to_string_lossy().into_owned();
    run(&["export", &sched, "--systemd", &sd.to_string_lossy()]);
    let service = std::fs::read_to_string(sd.join("runbook-rke2-cert-expiry-daily.service"))
        .expect("cert check service");
    let exec = service
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .expect("ExecStart");
    assert!(exec.contains("rke2-cert-rotate.toml"), "{exec}");
    assert!(exec.contains("--set check_only=true"), "{exec}");
    assert!(exec.contains("--set window_days=60"), "{exec}");
    let timer = std::fs::read_to_string(sd.join("runbook-rke2-cert-expiry-daily.timer"))
        .expect("cert check timer");
    assert!(timer.contains("OnCalendar=*-*-* 06:15:00 UTC"), "{timer}");
    let drill = std::fs::read_to_string(sd.join("runbook-rke2-dr-drill-weekly.service"))
        .expect("drill service");
    assert!(drill.contains("rke2-dr-drill.toml"), "{drill}");

    let cj = tmp.path().join("cronjobs");
    run(&[
        "export",
        &sched,
        "--cronjob",
        &cj.to_string_lossy(),
        "--image",
        "registry.example/runbook:0.1.0",
    ]);
    let job = std::fs::read_to_string(cj.join("runbook-rke2-cert-expiry-daily.yaml"))
        .expect("cert check cronjob");
    assert!(job.contains("schedule: \"15 6 * * *\""), "{job}");
    assert!(job.contains("\"check_only=true\""), "{job}");
    assert!(job.contains("rke2-cert-rotate.toml"), "{job}");
    assert!(cj.join("runbook-rke2-dr-drill-weekly.yaml").exists());
    // The check is a runbook the scheduler can run: it passes `runbook check`.
    let out = std::process::Command::new(crate::common::BIN)
        .args([
            "check",
            &repo
                .join("runbooks/rke2-cert-rotate.toml")
                .to_string_lossy(),
        ])
        .output()
        .expect("check");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Certificate rotation: with rke2-server-2's certificates 20 days from expiry (a server not
/// restarted for 345 days), the scheduled check fails naming it and touches nothing; the
/// rotation renews every node, server by server with the service stopped, refreshes the admin
/// kubeconfig and records the old and new expiry; the check passes again afterwards.
#[test]
fn cert_rotate_check_warns_of_a_near_expiry_then_rotation_renews_every_node() {
    let Some(lab) = Lab::up("127.0.192") else {
        return;
    };
    lab.run("rke2-vm-deploy.toml", &[], &[]).assert_code(0);
    let check = ["--set", "check_only=true", "--set", "window_days=60"];
    lab.run("rke2-cert-rotate.toml", &check, &[]).assert_code(0);

    let out = lab_cmd(
        &lab.labdir(),
        &["fault", "rke2-server-2", "cert-expiry", "--days", "20"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = lab.exec(
        "rke2-server-2",
        &["rke2", "certificate", "check", "--output", "table"],
    );
    assert!(
        text(&table.stdout).contains("WARNING"),
        "{}",
        text(&table.stdout)
    );
    let warned = lab.run("rke2-cert-rotate.toml", &check, &[]);
    warned.assert_code(1);
    assert_eq!(warned.status_of("assess"), "failed");
    assert_eq!(warned.status_of("rotate-servers"), "skipped");
    assert!(
        warned
            .stderr()
            .contains("expire within 60 days on [\"rke2-server-2\"]"),
        "{}",
        warned.stderr()
    );
    assert_bundle_verifies(&warned.bundle());

    let kubeconfig = std::path::PathBuf::from(lab.var("KUBECONFIG"));
    let kc_before = std::fs::read_to_string(&kubeconfig).expect("kubeconfig");
    let done = lab.run("rke2-cert-rotate.toml", &[], &[]);
    done.assert_code(0);
    for id in [
        "rotate-servers",
        "restart-agents",
        "write-kubeconfig",
        "expiry-after",
        "verify",
        "report",
    ] {
        assert_eq!(done.status_of(id), "succeeded", "{id}");
    }
    let notes = done.manifest()["notes"].to_string();
    assert!(notes.contains("rke2-server-2: 19 -> 364 days"), "{notes}");
    assert!(notes.contains("rke2-agent-1: 364 -> 364 days"), "{notes}");
    // The old certificates are kept beside the new ones on every server.
    for s in ["rke2-server-1", "rke2-server-2", "rke2-server-3"] {
        let b = lab.exec(s, &["sh", "-c", "ls -d /var/lib/rancher/rke2/server/tls-*"]);
        assert!(b.status.success(), "{s}: no backup: {}", text(&b.stderr));
    }
    // The kubeconfig the other runbooks use carries the new admin certificate and works.
    let kc_after = std::fs::read_to_string(&kubeconfig).expect("kubeconfig");
    assert_ne!(kc_before, kc_after, "kubeconfig not refreshed");
    assert!(kc_after.contains("client-certificate-data"));
    for (name, status, _) in nodes(&lab) {
        assert_eq!(status, "Ready", "{name}");
    }
    let members = lab.exec(
        "rke2-server-1",
        &[
            "etcdctl",
            "--endpoints",
            "http://127.0.192.11:2379",
            "member",
            "list",
        ],
    );
    assert_eq!(text(&members.stdout).lines().count(), 3);
    assert_bundle_verifies(&done.bundle());
    lab.run("rke2-cert-rotate.toml", &check, &[]).assert_code(0);
}

/// The Proxmox host each lab VM runs on now (`lab.json`, what the lab's PVE API answers).
fn pve_host_of(lab: &Lab, vm: &str) -> String {
    let lab_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(lab.labdir().join("lab.json")).expect("lab.json"),
    )
    .expect("lab.json");
    lab_json["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["name"] == vm)
        .and_then(|n| n["pve_node"].as_str())
        .expect(vm)
        .to_owned()
}

/// Hypervisor maintenance on the lab's Proxmox API: a host holding two servers is refused
/// before anything changes; a host with one server and one agent is emptied by draining and
/// live-migrating both, the run waits at the approve gate for the host maintenance, then brings
/// them back and uncordons them, quorum kept throughout. Then the vSphere path on the same lab
/// (its vCenter): the same refusal, vMotion away and back around a `maintenance_command`
/// handover, and the guest-shutdown path (`migrate=false`); every vCenter session is closed.
#[test]
fn hypervisor_maintenance_refuses_two_servers_on_a_host_then_empties_and_refills_one() {
    let Some(lab) = Lab::up("127.0.193") else {
        return;
    };
    lab.run("rke2-vm-deploy.toml", &[], &[]).assert_code(0);
    assert_eq!(pve_host_of(&lab, "rke2-server-1"), "pve1");
    assert_eq!(pve_host_of(&lab, "rke2-agent-1"), "pve1");

    let out = lab_cmd(
        &lab.labdir(),
        &["fault", "rke2-server-2", "place", "--host", "pve1"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let refused = lab.run(
        "hypervisor-maintenance.toml",
        &["--set", "pve_host=pve1"],
        &[],
    );
    refused.assert_code(1);
    assert_eq!(refused.status_of("assess"), "failed");
    assert_eq!(refused.status_of("drain"), "skipped");
    assert!(
        refused.stderr().contains("pve1 holds 2 RKE2 servers"),
        "{}",
        refused.stderr()
    );
    for (name, status, _) in nodes(&lab) {
        assert_eq!(status, "Ready", "{name} touched by a refused run");
    }
    assert_bundle_verifies(&refused.bundle());

    let out = lab_cmd(
        &lab.labdir(),
        &["fault", "rke2-server-2", "place", "--host", "pve2"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let args = ["--set", "pve_host=pve1"];
    let asked = lab.run("hypervisor-maintenance.toml", &args, &[]);
    asked.assert_code(4);
    assert_eq!(asked.status_of("host-empty"), "succeeded");
    // Live-migrated to the least loaded other host, still running, cordoned.
    for vm in ["rke2-server-1", "rke2-agent-1"] {
        assert_eq!(pve_host_of(&lab, vm), "pve3", "{vm}");
    }
    let got = nodes(&lab);
    for (name, status, _) in &got {
        let moved = name == "rke2-server-1" || name == "rke2-agent-1";
        assert_eq!(
            status.as_str(),
            if moved {
                "Ready,SchedulingDisabled"
            } else {
                "Ready"
            },
            "{name}"
        );
    }
    let etcd = lab.kubectl(&["get", "--raw=/readyz/etcd"]);
    assert_eq!(text(&etcd.stdout).trim(), "ok");

    let done = lab.resume(&asked, &["--approve", "host-maintenance"], &[]);
    done.assert_code(0);
    assert_eq!(done.status_of("verify"), "succeeded");
    for vm in ["rke2-server-1", "rke2-agent-1"] {
        assert_eq!(pve_host_of(&lab, vm), "pve1", "{vm} not back");
    }
    for (name, status, _) in nodes(&lab) {
        assert_eq!(status, "Ready", "{name}");
    }
    let token = lab.var("PROXMOX_TOKEN");
    crate::common::assert_bundle_lacks(&done.bundle(), &[&token]);
    assert_bundle_verifies(&done.bundle());

    // The same lab through its vCenter (lab/vsphere.py: ESXi host esxN is Proxmox host pveN, one
    // placement for both APIs). Refused first: esx1 holds two servers; nothing is drained and
    // the API session is closed all the same.
    let password = lab.var("VSPHERE_PASSWORD");
    let sessions = || -> serde_json::Value {
        let path = lab.labdir().join("vsphere-sessions.json");
        serde_json::from_str(&std::fs::read_to_string(&path).expect("vsphere-sessions.json"))
            .expect("vsphere-sessions.json")
    };
    let open_sessions = || sessions()["open"].as_u64().expect("open");
    // Neither the password nor any session token the lab's vCenter issued is in a bundle.
    let assert_no_credential = |bundle: &std::path::Path| {
        let issued: Vec<String> = sessions()["issued"]
            .as_array()
            .expect("issued")
            .iter()
            .map(|t| t.as_str().expect("token").to_owned())
            .collect();
        assert!(!issued.is_empty(), "no vCenter session was opened");
        let mut needles: Vec<&str> = issued.iter().map(String::as_str).collect();
        needles.push(&password);
        crate::common::assert_bundle_lacks(bundle, &needles);
    };
    let maintenance_history = || -> serde_json::Value {
        let path = lab.labdir().join("vsphere.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("vsphere.json"))
                .expect("vsphere.json");
        v["history"].clone()
    };
    // The handover as an operator's `govc host.maintenance.enter …; …; exit`: the lab refuses to
    // enter maintenance mode while a powered-on VM is on the host.
    let vsphere_py = crate::lab_harness::repo().join("lab").join("vsphere.py");
    let handover = |esx: &str| {
        let m = |what: &str| {
            format!(
                "python3 {} maintenance --dir {} {what} {esx}",
                vsphere_py.display(),
                lab.labdir().display()
            )
        };
        format!("maintenance_command={} && {}", m("enter"), m("exit"))
    };
    let boot = |n: &str| node_field(&lab, n, "{.status.nodeInfo.bootID}");

    let out = lab_cmd(
        &lab.labdir(),
        &["fault", "rke2-server-2", "place", "--host", "pve1"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let vmotion = [
        "--set",
        "hypervisor=vsphere",
        "--set",
        "esx_host=esx1",
        "--set",
        "target_host=esx3",
    ];
    let refused = lab.run("hypervisor-maintenance.toml", &vmotion, &[]);
    refused.assert_code(1);
    assert_eq!(refused.status_of("assess"), "failed");
    assert_eq!(refused.status_of("drain"), "skipped");
    assert_eq!(refused.status_of("vsphere-logout"), "succeeded");
    assert!(
        refused.stderr().contains("esx1 holds 2 RKE2 servers"),
        "{}",
        refused.stderr()
    );
    for (name, status, _) in nodes(&lab) {
        assert_eq!(status, "Ready", "{name} touched by a refused run");
    }
    assert_eq!(
        open_sessions(),
        0,
        "the refused run left a vCenter session open"
    );
    assert_no_credential(&refused.bundle());
    assert_bundle_verifies(&refused.bundle());
    // A target vCenter does not know is refused before anything is drained.
    let unknown = lab.run(
        "hypervisor-maintenance.toml",
        &[
            "--set",
            "hypervisor=vsphere",
            "--set",
            "esx_host=esx3",
            "--set",
            "target_host=esx9",
        ],
        &[],
    );
    unknown.assert_code(1);
    assert_eq!(unknown.status_of("drain"), "skipped");
    assert!(
        unknown
            .stderr()
            .contains("vCenter has no ESXi host named esx9"),
        "{}",
        unknown.stderr()
    );
    assert_eq!(
        open_sessions(),
        0,
        "a refused run left a vCenter session open"
    );

    // esx1 with one server and one agent: drained, vMotioned to esx3 (still running: the same
    // boot), the host entered and left maintenance mode in the handover (possible only once no
    // powered-on VM is left on it), vMotioned back, uncordoned.
    let out = lab_cmd(
        &lab.labdir(),
        &["fault", "rke2-server-2", "place", "--host", "pve2"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let boots: Vec<String> = ["rke2-server-1", "rke2-agent-1"]
        .iter()
        .map(|n| boot(n))
        .collect();
    let command = handover("esx1");
    let args: Vec<&str> = vmotion.iter().copied().chain(["--set", &command]).collect();
    let moved = lab.run("hypervisor-maintenance.toml", &args, &[]);
    moved.assert_code(0);
    for s in [
        "move-away",
        "esx-host-empty",
        "host-maintenance-command",
        "esx-back",
        "verify",
    ] {
        assert_eq!(moved.status_of(s), "succeeded", "{s}");
    }
    assert_eq!(moved.status_of("host-maintenance"), "skipped");
    for (i, vm) in ["rke2-server-1", "rke2-agent-1"].iter().enumerate() {
        assert_eq!(pve_host_of(&lab, vm), "pve1", "{vm} not back");
        assert_eq!(
            boot(vm),
            boots[i],
            "{vm} was restarted: vMotion moves a running VM"
        );
    }
    for (name, status, _) in nodes(&lab) {
        assert_eq!(status, "Ready", "{name}");
    }
    assert_eq!(
        maintenance_history(),
        serde_json::json!([["enter", "esx1"], ["exit", "esx1"]])
    );
    assert_eq!(open_sessions(), 0, "a vCenter session left open");
    assert_no_credential(&moved.bundle());
    assert_bundle_verifies(&moved.bundle());

    // migrate=false on esx2 (rke2-server-2, rke2-agent-2): guest shutdown, POWERED_OFF, the
    // handover, power-on; the nodes come back from a new boot.
    let boots: Vec<String> = ["rke2-server-2", "rke2-agent-2"]
        .iter()
        .map(|n| boot(n))
        .collect();
    let command = handover("esx2");
    let shut = lab.run(
        "hypervisor-maintenance.toml",
        &[
            "--set",
            "hypervisor=vsphere",
            "--set",
            "esx_host=esx2",
            "--set",
            "migrate=false",
            "--set",
            &command,
        ],
        &[],
    );
    shut.assert_code(0);
    for s in [
        "move-away-wait",
        "esx-host-empty",
        "bring-back",
        "esx-back",
        "verify",
    ] {
        assert_eq!(shut.status_of(s), "succeeded", "{s}");
    }
    for (i, vm) in ["rke2-server-2", "rke2-agent-2"].iter().enumerate() {
        assert_eq!(pve_host_of(&lab, vm), "pve2", "{vm}");
        assert_ne!(boot(vm), boots[i], "{vm} was not shut down and powered on");
    }
    for (name, status, _) in nodes(&lab) {
        assert_eq!(status, "Ready", "{name}");
    }
    assert_eq!(
        maintenance_history(),
        serde_json::json!([
            ["enter", "esx1"],
            ["exit", "esx1"],
            ["enter", "esx2"],
            ["exit", "esx2"]
        ])
    );
    assert_eq!(open_sessions(), 0, "a vCenter session left open");
    assert_no_credential(&shut.bundle());
    assert_bundle_verifies(&shut.bundle());
}

/// `etcdctl member list` on a lab server, as (name, status) of every member; the etcdctl the
/// node answers takes RKE2's endpoint and certificates.
fn etcd_members(lab: &Lab, server: &str) -> Vec<(String, String)> {
    let out = lab.exec(
        server,
        &[
            "etcdctl",
            "--endpoints=https://127.0.0.1:2379",
            "--cert=/var/lib/rancher/rke2/server/tls/etcd/server-client.crt",
            "--key=/var/lib/rancher/rke2/server/tls/etcd/server-client.key",
            "--command-timeout=10s",
            "member",
            "list",
        ],
    );
    assert!(out.status.success(), "{server}: {}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(", ").collect();
            (
                f.get(2).copied().unwrap_or_default().to_owned(),
                f.get(1).copied().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The etcd member id of `name` (RKE2's `<name>` or `<name>-<suffix>`) in a server's member list.
fn etcd_member_id(lab: &Lab, server: &str, name: &str) -> Option<String> {
    let out = lab.exec(
        server,
        &[
            "etcdctl",
            "--endpoints=https://127.0.0.1:2379",
            "--command-timeout=10s",
            "member",
            "list",
        ],
    );
    assert!(out.status.success(), "{server}: {}", text(&out.stderr));
    text(&out.stdout).lines().find_map(|l| {
        let f: Vec<&str> = l.split(", ").collect();
        let n = f.get(2).copied().unwrap_or_default();
        (n == name || n.starts_with(&format!("{name}-"))).then(|| f[0].to_owned())
    })
}

/// Waits (up to a minute) until a server sees `want` healthy etcd endpoints.
fn wait_etcd_healthy(lab: &Lab, server: &str, want: usize) {
    let mut got = 0;
    for _ in 0..60 {
        got = etcd_healthy(lab, server);
        if got == want {
            return;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    panic!("{server} sees {got} healthy etcd endpoints, not {want}");
}

/// Healthy endpoints of `etcdctl endpoint health --cluster` on a lab server.
fn etcd_healthy(lab: &Lab, server: &str) -> usize {
    let out = lab.exec(
        server,
        &[
            "etcdctl",
            "--endpoints=https://127.0.0.1:2379",
            "--command-timeout=10s",
            "endpoint",
            "health",
            "--cluster",
        ],
    );
    // etcdctl 3.4 prints the verdicts on stderr, 3.5 on stdout.
    format!("{}{}", text(&out.stdout), text(&out.stderr))
        .lines()
        .filter(|l| l.contains(" is healthy"))
        .count()
}

/// A server VM lost for good is replaced by a spare: refused while a second server is down
/// (quorum), then with it back the old Node and etcd member are gone, the spare is a Ready
/// server and an etcd member, at least two healthy started members throughout, and the bundle
/// holds the inventory change. Replacing a server while another is down is refused by the
/// numbers (`only 1 of 2 … healthy`). Without a spare, Terraform (the lab's stand-in against the
/// lab's Proxmox API) makes a lost server's VM again with its name and address, and the cluster
/// keeps two healthy members throughout. Last, an agent is replaced by a spare.
#[test]
fn node_replace_swaps_a_lost_server_for_a_spare_without_losing_quorum() {
    let Some(lab) = Lab::up("127.0.194") else {
        return;
    };
    let version = lab.var("RKE2_VERSION");
    lab.run("rke2-vm-deploy.toml", &[], &[]).assert_code(0);

    // rke2-server-3's etcd down, then rke2-server-1 to be replaced: its peer answers, but
    // without rke2-server-1 one healthy member of the two others is no quorum.
    let out = lab_cmd(&lab.labdir(), &["fault", "rke2-server-3", "stop-service"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_etcd_healthy(&lab, "rke2-server-1", 2);
    let refused = lab.run(
        "rke2-node-replace.toml",
        &["--set", "node=rke2-server-1", "--set", "drain_timeout=20s"],
        &[],
    );
    refused.assert_code(1);
    assert_eq!(refused.status_of("pick-peer"), "succeeded");
    assert_eq!(refused.status_of("quorum"), "failed");
    for s in [
        "cordon",
        "delete-node",
        "member-remove",
        "vm-plan",
        "vm-apply",
    ] {
        assert_eq!(refused.status_of(s), "skipped", "{s}");
    }
    let quorum = log_of(&refused, "steps/quorum/rke2-server-2/attempt-1.log");
    assert!(
        quorum
            .contains("without rke2-server-1 only 1 of 2 etcd members are healthy, quorum needs 2"),
        "{quorum}"
    );
    assert_bundle_verifies(&refused.bundle());
    let out = lab.exec("rke2-server-3", &["systemctl", "start", "rke2-server"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_etcd_healthy(&lab, "rke2-server-1", 3);
    assert!(
        !node_field(&lab, "rke2-server-1", "{.spec.unschedulable}").contains("true"),
        "the refused run cordoned rke2-server-1"
    );
    let out = lab_cmd(
        &lab.labdir(),
        &[
            "add-node",
            "rke2-server-4",
            "--role",
            "servers",
            "--host",
            "pve2",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = lab_cmd(&lab.labdir(), &["fault", "rke2-server-2", "lose"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let started = |who: &str| {
        etcd_members(&lab, who)
            .iter()
            .filter(|(_, s)| s == "started")
            .count()
    };
    assert_eq!(
        started("rke2-server-1"),
        3,
        "the lost member is still listed"
    );
    assert_eq!(etcd_healthy(&lab, "rke2-server-1"), 2);
    let args = [
        "--set",
        "node=rke2-server-2",
        "--set",
        "replacement=rke2-server-4",
        "--set",
        "drain_timeout=20s",
    ];

    // A second server down: without rke2-server-2 one healthy member of two is no quorum.
    let out = lab_cmd(&lab.labdir(), &["fault", "rke2-server-3", "stop-service"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let refused = lab.run("rke2-node-replace.toml", &args, &[]);
    refused.assert_code(1);
    assert_eq!(refused.status_of("delete-node"), "skipped");
    assert_eq!(refused.status_of("member-remove"), "skipped");
    assert_eq!(refused.status_of("install"), "skipped");
    let e = refused.stderr();
    assert!(e.contains("no quorum to keep"), "{e}");
    assert_eq!(refused.status_of("pick-peer"), "failed");

    // rke2-server-3 back: the cluster has its quorum again, nothing was removed.
    let out = lab.exec("rke2-server-3", &["systemctl", "start", "rke2-server"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut back = 0;
    for _ in 0..60 {
        back = etcd_healthy(&lab, "rke2-server-1");
        if back == 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    assert_eq!(back, 2, "rke2-server-3's member did not come back");
    assert_eq!(
        etcd_members(&lab, "rke2-server-1").len(),
        3,
        "a member went"
    );
    assert!(
        nodes(&lab).iter().any(|n| n.0 == "rke2-server-2"),
        "the node was deleted although the run was refused"
    );
    assert_bundle_verifies(&refused.bundle());

    let done = lab.run("rke2-node-replace.toml", &args, &[]);
    done.assert_code(0);
    for s in [
        "quorum",
        "member-remove",
        "install",
        "ready",
        "etcd-after",
        "verify",
    ] {
        assert_eq!(done.status_of(s), "succeeded", "{s}");
    }
    // The quorum step saw the member list before the removal: never fewer than 2 healthy.
    let quorum = log_of(&done, "steps/quorum/rke2-server-1/attempt-1.log");
    assert!(quorum.contains("healthy others 2"), "{quorum}");
    // After: three started members, all healthy, rke2-server-2's gone, rke2-server-4's there.
    let members = etcd_members(&lab, "rke2-server-1");
    assert_eq!(members.len(), 3, "{members:?}");
    assert!(members.iter().all(|(_, s)| s == "started"), "{members:?}");
    assert!(
        !members.iter().any(|(n, _)| n.starts_with("rke2-server-2")),
        "{members:?}"
    );
    assert!(
        members.iter().any(|(n, _)| n.starts_with("rke2-server-4")),
        "{members:?}"
    );
    assert_eq!(etcd_healthy(&lab, "rke2-server-1"), 3);
    assert_eq!(etcd_healthy(&lab, "rke2-server-4"), 3);
    let got = nodes(&lab);
    assert!(!got.iter().any(|n| n.0 == "rke2-server-2"), "{got:?}");
    let new = got
        .iter()
        .find(|n| n.0 == "rke2-server-4")
        .unwrap_or_else(|| panic!("{got:?}"));
    assert_eq!(
        (new.1.as_str(), new.2.as_str()),
        ("Ready", version.as_str())
    );
    // The replacement joined through the registration address with the peer's settings.
    let cfg = lab.exec("rke2-server-4", &["cat", "/etc/rancher/rke2/config.yaml"]);
    let cfg = text(&cfg.stdout);
    assert!(
        cfg.starts_with(&format!(
            "server: \"https://{}:9345\"",
            lab.var("RKE2_API_HOST")
        )),
        "{cfg}"
    );
    assert!(cfg.contains("token:"), "no token in the config");
    // The inventory change is printed and in the bundle; the spare is among hosts_added.
    let change = log_of(&done, "steps/inventory-change/local/attempt-1.log");
    assert!(change.contains("[hosts.rke2-server-2]"), "{change}");
    assert!(change.contains("groups = [\"servers\"]"), "{change}");
    let added = done.manifest()["hosts_added"].to_string();
    assert!(added.contains("rke2-server-4"), "{added}");
    assert_bundle_verifies(&done.bundle());
    assert!(
        !text(
            &std::fs::read(
                done.bundle()
                    .join("steps/peer-config/rke2-server-1/attempt-1.log")
            )
            .unwrap_or_default()
        )
        .contains(&lab.var("RKE2_TOKEN")),
        "the token is in the bundle"
    );

    // No spare: rke2-server-3's VM is lost for good and Terraform makes it again from the
    // template, with its name and address. etcd is watched from rke2-server-1 all along.
    let boot3 = node_field(&lab, "rke2-server-3", "{.status.nodeInfo.bootID}");
    let old3 =
        etcd_member_id(&lab, "rke2-server-1", "rke2-server-3").expect("member of rke2-server-3");
    let out = lab_cmd(&lab.labdir(), &["fault", "rke2-server-3", "lose"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_etcd_healthy(&lab, "rke2-server-1", 2);
    let (cwd, mut cmd) = lab.command(
        "rke2-node-replace.toml",
        &["--set", "node=rke2-server-3", "--set", "drain_timeout=20s"],
        &[],
    );
    let mut child = cmd
        .stdout(std::fs::File::create(cwd.join("stdout")).expect("stdout"))
        .stderr(std::fs::File::create(cwd.join("stderr")).expect("stderr"))
        .spawn()
        .expect("runbook");
    let mut fewest = usize::MAX;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        fewest = fewest.min(etcd_healthy(&lab, "rke2-server-1"));
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let provisioned = crate::lab_harness::Run {
        out: std::process::Output {
            status,
            stdout: std::fs::read(cwd.join("stdout")).unwrap_or_default(),
            stderr: std::fs::read(cwd.join("stderr")).unwrap_or_default(),
        },
        cwd,
    };
    provisioned.assert_code(0);
    assert!(fewest >= 2, "etcd fell to {fewest} healthy members");
    for s in [
        "quorum",
        "member-remove",
        "vm-plan",
        "vm-apply",
        "vm-output",
        "install",
        "ready",
        "etcd-after",
        "verify",
    ] {
        assert_eq!(provisioned.status_of(s), "succeeded", "{s}");
    }
    // Terraform saw the VM gone and planned it alone, from the template.
    let plan = log_of(&provisioned, "steps/vm-plan/local/attempt-1.log");
    assert!(
        plan.contains(
            "module.rke2.proxmox_virtual_environment_vm.node[\"rke2-server-3\"] has been deleted"
        ),
        "{plan}"
    );
    assert!(
        plan.contains("Plan: 1 to add, 0 to change, 0 to destroy."),
        "{plan}"
    );
    let applied = log_of(&provisioned, "steps/vm-apply/local/attempt-1.log");
    assert!(
        applied.contains("Creation complete") && applied.contains("[id=203]"),
        "{applied}"
    );
    // Three started, healthy members: the lost one's id gone, a new one of rke2-server-3.
    let members = etcd_members(&lab, "rke2-server-1");
    assert_eq!(members.len(), 3, "{members:?}");
    assert!(members.iter().all(|(_, s)| s == "started"), "{members:?}");
    let new3 = etcd_member_id(&lab, "rke2-server-1", "rke2-server-3").expect("new member");
    assert_ne!(new3, old3, "the old member of rke2-server-3 is still there");
    assert_eq!(etcd_healthy(&lab, "rke2-server-3"), 3);
    let got = nodes(&lab);
    let new = got
        .iter()
        .find(|n| n.0 == "rke2-server-3")
        .unwrap_or_else(|| panic!("{got:?}"));
    assert_eq!(
        (new.1.as_str(), new.2.as_str()),
        ("Ready", version.as_str())
    );
    assert_ne!(
        node_field(&lab, "rke2-server-3", "{.status.nodeInfo.bootID}"),
        boot3
    );
    assert_eq!(
        node_field(&lab, "rke2-server-3", "{.status.addresses[0].address}"),
        "127.0.194.13"
    );
    let change = log_of(&provisioned, "steps/inventory-change/local/attempt-1.log");
    assert!(change.contains("no inventory change"), "{change}");
    assert_bundle_verifies(&provisioned.bundle());

    // The agent path: rke2-agent-1 lost, a spare agent in its place, etcd untouched.
    let out = lab_cmd(
        &lab.labdir(),
        &[
            "add-node",
            "rke2-agent-3",
            "--role",
            "agents",
            "--host",
            "pve3",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = lab_cmd(&lab.labdir(), &["fault", "rke2-agent-1", "lose"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let agent = lab.run(
        "rke2-node-replace.toml",
        &[
            "--set",
            "node=rke2-agent-1",
            "--set",
            "replacement=rke2-agent-3",
            "--set",
            "drain_timeout=20s",
        ],
        &[],
    );
    agent.assert_code(0);
    assert_eq!(agent.status_of("member-remove"), "skipped");
    assert_eq!(agent.status_of("etcd-after"), "skipped");
    assert_eq!(agent.status_of("verify"), "succeeded");
    let got = nodes(&lab);
    assert!(!got.iter().any(|n| n.0 == "rke2-agent-1"), "{got:?}");
    let new = got
        .iter()
        .find(|n| n.0 == "rke2-agent-3")
        .unwrap_or_else(|| panic!("{got:?}"));
    assert_eq!(
        (new.1.as_str(), new.2.as_str()),
        ("Ready", version.as_str())
    );
    // An agent's config is `server:` and `token:` only.
    let cfg = lab.exec("rke2-agent-3", &["cat", "/etc/rancher/rke2/config.yaml"]);
    let cfg = text(&cfg.stdout);
    assert_eq!(cfg.lines().count(), 2, "{:?}", cfg.lines().next());
    assert_eq!(etcd_members(&lab, "rke2-server-1").len(), 3);
    assert_bundle_verifies(&agent.bundle());
}

/// The lab's Terraform stand-in (lab/terraform.py) on copies of the real envs, before it talks
/// to any API: `init` first, variables resolved as Terraform resolves them (`TF_VAR_*` <
/// `*.auto.tfvars` < `-var`, module validations, Terraform's messages for an undeclared or an
/// unset variable), and the vSphere env refused rather than pretended.
#[test]
fn terraform_stand_in_resolves_variables_as_terraform_does_and_refuses_what_it_cannot_run() {
    let repo = crate::lab_harness::repo();
    let tmp = tempfile::tempdir().expect("tmp");
    for rel in [
        "envs/lab",
        "envs/lab-vsphere",
        "modules/rke2/proxmox",
        "modules/rke2/vsphere",
    ] {
        let from = repo.join("runbooks/infra/terraform").join(rel);
        let to = tmp.path().join(rel);
        std::fs::create_dir_all(&to).expect("mkdir");
        for f in std::fs::read_dir(&from).expect("read_dir") {
            let f = f.expect("entry").path();
            if f.extension().is_some_and(|e| e == "tf") {
                std::fs::copy(&f, to.join(f.file_name().expect("name"))).expect("copy");
            }
        }
    }
    let env = tmp.path().join("envs/lab");
    let tf = |dir: &std::path::Path, args: &[&str], vars: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new("python3");
        cmd.arg(repo.join("lab/terraform.py"))
            .arg(format!("-chdir={}", dir.display()))
            .args(args);
        for (k, _) in std::env::vars() {
            if k.starts_with("TF_VAR_") || k.starts_with("PROXMOX_VE_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("python3 lab/terraform.py");
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };

    let (code, _, err) = tf(&env, &["plan", "-input=false"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("Module not installed"), "{err}");
    let (code, out, err) = tf(&env, &["init", "-input=false"], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("- rke2 in ../../modules/rke2/proxmox"),
        "{out}"
    );
    assert!(env.join(".terraform/modules/modules.json").exists());

    let (code, _, err) = tf(&env, &["plan", "-input=false", "-var", "nope=1"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("Error: Value for undeclared variable"),
        "{err}"
    );
    assert!(
        err.contains("A variable named \"nope\" was assigned on the command line"),
        "{err}"
    );
    // The module's validation, from TF_VAR_ and from -var.
    let (code, _, err) = tf(
        &env,
        &["plan", "-input=false"],
        &[("TF_VAR_server_count", "2")],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("server_count must be 1 or 3"), "{err}");
    // *.auto.tfvars over TF_VAR_, -var over both: the plan gets as far as the provider.
    std::fs::write(env.join("lab.auto.tfvars"), "server_count = 2\n").expect("tfvars");
    let (code, _, err) = tf(
        &env,
        &["plan", "-input=false"],
        &[("TF_VAR_server_count", "3")],
    );
    assert!(
        code == Some(1) && err.contains("server_count must be 1 or 3"),
        "{err}"
    );
    let (code, _, err) = tf(&env, &["plan", "-input=false", "-var=server_count=3"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("Missing Proxmox VE API token"), "{err}");
    std::fs::remove_file(env.join("lab.auto.tfvars")).expect("rm");
    // A required variable without a value, named where it is declared.
    std::fs::write(
        env.join("extra.tf"),
        "variable \"needed\" {\n  type = string\n}\n",
    )
    .expect("extra.tf");
    let (code, _, err) = tf(&env, &["plan", "-input=false"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("Error: No value for required variable"),
        "{err}"
    );
    assert!(
        err.contains("The root module input variable \"needed\" is not set"),
        "{err}"
    );
    assert!(err.contains("extra.tf line 1"), "{err}");

    // No vSphere here: refused at init, not faked.
    let (code, _, err) = tf(&tmp.path().join("envs/lab-vsphere"), &["init"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("implements only bpg/proxmox"), "{err}");
}
