//! The RKE2 runbooks end to end against the RKE2 lab (`scripts/lab`, docs/rke2/lab.md): real
//! sshds in their own mount and UTS namespaces on 127.0.x.y, a real etcd cluster under the
//! lab's `rke2`, the lab's `kubectl`/`helm` answering from it. Each test stands up its own lab
//! on its own loopback range, runs the real `runbook` binary with the environment the lab's
//! env file gives, checks the bundle and the cluster, and takes the lab down again (also when
//! it fails: `Lab` does it on drop). Lab tests run one at a time (a lock): each starts several
//! etcd members and sshds, and the machine has two cores.
//!
//! The lab needs root (namespaces, mounts), etcd/etcdctl and sshd; without them the tests say
//! so on stderr and pass without running (scripts/test installs the tools).

use std::path::Path;
use std::process::Output;

use crate::common::{assert_bundle_lacks, BIN};
use crate::lab_harness::{lab_cmd, nodes, text, Lab, Run};

/// `rke2-vm-deploy.toml` with `etcd-s3` pointed at the lab's S3 (`RKE2_S3_ENDPOINT` of the env
/// file), as an operator passes their S3 endpoint.
fn deploy(lab: &Lab, extra: &[&str], vars: &[(&str, &str)]) -> Run {
    let s3 = format!("s3_endpoint={}", lab.var("RKE2_S3_ENDPOINT"));
    let mut args = vec!["--set", s3.as_str()];
    args.extend_from_slice(extra);
    lab.run("rke2-vm-deploy.toml", &args, vars)
}

#[test]
fn deploy_from_nothing_rerun_and_downgrade_refused_then_dr_restore_from_s3_with_servers_0_lost() {
    let Some(lab) = Lab::up("127.0.177") else {
        return;
    };
    // A contradictory setting is refused before anything runs.
    let run = lab.run(
        "rke2-vm-deploy.toml",
        &["--set", "cni=canal", "--set", "kube_proxy_replacement=true"],
        &[],
    );
    run.assert_code(1);
    assert_eq!(run.status_of("prepare"), "failed");
    assert!(
        run.stderr()
            .contains("kube_proxy_replacement=true needs cni=cilium"),
        "{}",
        run.stderr()
    );
    assert_eq!(run.status_of("wait-ssh"), "skipped");

    let version = lab.var("RKE2_VERSION");

    // From nothing: 3 servers, 2 agents.
    let first = deploy(&lab, &[], &[]);
    first.assert_code(0);
    let manifest = first.manifest();
    assert_eq!(manifest["status"], "succeeded");
    for id in [
        "preflight",
        "node-prep",
        "install-first-server",
        "registration-address",
        "join-servers",
        "join-agents",
        "metallb-ready",
        "longhorn-backup-job",
        "baseline-snapshot",
        "health",
    ] {
        assert_eq!(first.status_of(id), "succeeded", "{id}");
    }
    let got = nodes(&lab);
    assert_eq!(got.len(), 5, "{got:?}");
    for (name, status, v) in &got {
        assert_eq!(status, "Ready", "{name}");
        assert_eq!(v, &version, "{name}");
    }
    // A real three-member etcd, and the snapshot on the first server's disk.
    let members = lab.exec(
        "rke2-server-1",
        &[
            "etcdctl",
            "--endpoints",
            "http://127.0.177.11:2379",
            "member",
            "list",
        ],
    );
    assert_eq!(
        text(&members.stdout).lines().count(),
        3,
        "{}",
        text(&members.stderr)
    );
    let snaps = lab.exec("rke2-server-1", &["rke2", "etcd-snapshot", "ls"]);
    assert!(
        text(&snaps.stdout).contains("post-deploy-rke2-server-1"),
        "{}",
        text(&snaps.stdout)
    );
    // …and in the lab's S3 (etcd-s3 in config.yaml): another server lists it from there.
    let snaps = lab.exec("rke2-server-2", &["rke2", "etcd-snapshot", "ls"]);
    assert!(
        text(&snaps.stdout).contains("s3://rke2-etcd/lab/post-deploy-rke2-server-1-"),
        "{}{}",
        text(&snaps.stdout),
        text(&snaps.stderr)
    );
    // The lab's S3 checks the keys: a wrong secret is refused (the local list still comes).
    let wrong = lab.exec(
        "rke2-server-2",
        &["rke2", "etcd-snapshot", "ls", "--s3-secret-key=wrong"],
    );
    assert!(
        text(&wrong.stderr).contains("SignatureDoesNotMatch")
            && !text(&wrong.stdout).contains("s3://"),
        "{}",
        text(&wrong.stderr)
    );
    // The nodes got the secrets; nothing runbook wrote did.
    let token = lab.var("RKE2_TOKEN");
    let s3 = lab.var("S3_SECRET_KEY");
    let lh = lab.var("LONGHORN_S3_SECRET_KEY");
    assert_bundle_lacks(&first.bundle(), &[&token, &s3, &lh]);
    assert!(!first.stderr().contains(&token));
    let config = lab.exec("rke2-server-2", &["cat", "/etc/rancher/rke2/config.yaml"]);
    let config = text(&config.stdout);
    assert!(
        config.contains(&format!("token: \"{token}\"")),
        "quoted: {config}"
    );
    assert!(!config.contains("disable-kube-proxy: true"), "{config}");
    // RKE2 is versionlocked and its repos are off.
    let lock = lab.exec("rke2-agent-1", &["dnf", "versionlock", "list"]);
    assert!(
        text(&lock.stdout).contains("rke2-*"),
        "{}",
        text(&lock.stdout)
    );

    // Again: nothing reinstalled, the same cluster, one more snapshot.
    let again = deploy(&lab, &[], &[]);
    again.assert_code(0);
    let log = std::fs::read_to_string(
        again
            .bundle()
            .join("steps/install-first-server/rke2-server-1/attempt-1.log"),
    )
    .expect("install log");
    assert!(
        !log.contains("installing rke2-server"),
        "re-run reinstalled: {log}"
    );
    assert_eq!(nodes(&lab).len(), 5);

    // A re-run with another version stops before touching any node (no downgrade).
    let older = deploy(&lab, &[], &[("RKE2_VERSION", "v1.33.3+rke2r1")]);
    older.assert_code(1);
    assert_eq!(older.status_of("installed"), "failed");
    assert_eq!(older.status_of("node-prep"), "skipped");
    for (name, _, v) in nodes(&lab) {
        assert_eq!(v, version, "{name} was changed");
    }

    // The rke2 units restart on failure (Restart=always, RestartSec=5s), as RKE2's own units do:
    // an agent started with a wrong token fails its start job, waits, and once the token is
    // right again it joins without anyone starting it.
    let ok = |o: Output| assert!(o.status.success(), "{}", text(&o.stderr));
    let cfg_path = "/etc/rancher/rke2/config.yaml";
    let cfg = text(&lab.exec("rke2-agent-1", &["cat", cfg_path]).stdout);
    let wrong = cfg.replace(&token, "K10wrong::server:0000");
    assert_ne!(wrong, cfg, "the agent's config holds the token");
    let write = |body: &str| {
        ok(lab.exec(
            "rke2-agent-1",
            &["sh", "-c", &format!("cat > {cfg_path} <<'EOF'\n{body}EOF")],
        ));
    };
    write(&wrong);
    let restart = lab.exec("rke2-agent-1", &["systemctl", "restart", "rke2-agent"]);
    assert!(
        !restart.status.success(),
        "a wrong token must fail the start"
    );
    assert!(
        text(&restart.stderr).contains("Job for rke2-agent.service failed"),
        "{}",
        text(&restart.stderr)
    );
    let state = lab.exec("rke2-agent-1", &["systemctl", "is-active", "rke2-agent"]);
    assert_eq!(text(&state.stdout).trim(), "activating");
    write(&cfg);
    // Node status lags (a Ready node stays Ready a while), so the agent's own log says when it
    // came back: after the scheduled restart, up and running.
    let log_path = "/var/lib/lab-node/rke2-agent.log";
    let back = |log: &str| {
        let restart = log.rfind("scheduled restart in 5s");
        let up = log.rfind("rke2 agent is up and running");
        matches!((restart, up), (Some(r), Some(u)) if u > r)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let mut log = String::new();
    while std::time::Instant::now() < deadline {
        log = text(&lab.exec("rke2-agent-1", &["cat", log_path]).stdout);
        if back(&log) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(back(&log), "the agent did not restart by itself: {log}");
    let state = lab.exec("rke2-agent-1", &["systemctl", "is-active", "rke2-agent"]);
    assert_eq!(text(&state.stdout).trim(), "active");
    ok(lab.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "node/rke2-agent-1",
        "--timeout=60s",
    ]));

    // DR restore from S3 onto a set where servers[0] is lost and no node has the file.
    ok(lab.kubectl(&["create", "namespace", "before-snapshot"]));
    // The snapshot is taken on rke2-server-2 and uploaded to S3 (etcd-s3 in config.yaml).
    ok(lab.exec(
        "rke2-server-2",
        &["rke2", "etcd-snapshot", "save", "--name", "dr"],
    ));
    let ls = text(
        &lab.exec("rke2-server-2", &["rke2", "etcd-snapshot", "ls"])
            .stdout,
    );
    let snap = ls
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .find(|n| n.starts_with("dr-rke2-server-2-"))
        .expect("the snapshot")
        .to_owned();
    assert!(
        ls.contains(&format!("s3://rke2-etcd/lab/{snap}")),
        "uploaded: {ls}"
    );
    ok(lab.kubectl(&["create", "namespace", "after-snapshot"]));
    ok(lab.exec(
        "rke2-server-3",
        &["rke2", "etcd-snapshot", "save", "--name", "later"],
    ));
    // No node keeps the file: the restore must fetch it from S3.
    ok(lab.exec(
        "rke2-server-2",
        &[
            "rm",
            &format!("/var/lib/rancher/rke2/server/db/snapshots/{snap}"),
        ],
    ));
    // servers[0] is gone for good.
    ok(lab_cmd(&lab.labdir(), &["fault", "rke2-server-1", "lose"]));

    let snapshot = format!("snapshot={snap}");
    let args = [
        "--set",
        "confirm_cluster=lab",
        "--set",
        &snapshot,
        "--set",
        "delete_stale_nodes=true",
    ];
    let vars = [("RKE2_RESTORE_TOKEN", token.as_str())];
    // Stopping every server waits for a person's yes (exit 4), given on resume.
    let asked = lab.run("rke2-dr-restore.toml", &args, &vars);
    asked.assert_code(4);
    assert_eq!(asked.status_of("pick-reset"), "succeeded");
    let done = lab.resume(&asked, &["--approve", "stop-servers"], &vars);
    done.assert_code(0);
    let notes = done.manifest()["notes"].to_string();
    assert!(notes.contains("cluster-reset on rke2-server-2"), "{notes}");
    assert_bundle_lacks(&done.bundle(), &[&token]);
    let reset = walk_logs(&done.bundle().join("steps/cluster-reset/rke2-server-2"));
    assert!(
        reset.contains(&format!("Downloaded s3://rke2-etcd/lab/{snap}")),
        "{reset}"
    );
    // RKE2's etcd-snapshot controller put back the EtcdSnapshotFile objects the restored etcd
    // did not have: the snapshot restored from (its S3 object, and the local copy the reset
    // downloaded) and the later one.
    let objs = text(
        &lab.kubectl(&[
            "get",
            "etcdsnapshotfile",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}{\"\\n\"}{end}",
        ])
        .stdout,
    );
    for want in [
        format!("s3-{snap}"),
        format!("local-{snap}"),
        "s3-later-rke2-server-3-".to_owned(),
    ] {
        assert!(
            objs.lines().any(|l| l.starts_with(&want)),
            "{want} missing: {objs}"
        );
    }

    // The cluster is the snapshot's: what came after it is gone.
    let ns = text(&lab.kubectl(&["get", "namespaces", "--no-headers"]).stdout);
    assert!(ns.contains("before-snapshot"), "{ns}");
    assert!(
        !ns.contains("after-snapshot"),
        "restore did not roll back: {ns}"
    );
    // Two servers in a real two-member etcd; the lost server's Node deleted.
    let got = nodes(&lab);
    let names: Vec<&str> = got.iter().map(|n| n.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "rke2-agent-1",
            "rke2-agent-2",
            "rke2-server-2",
            "rke2-server-3"
        ],
        "{got:?}"
    );
    for (name, status, _) in &got {
        assert_eq!(status, "Ready", "{name}");
    }
    let members = lab.exec(
        "rke2-server-2",
        &[
            "etcdctl",
            "--endpoints",
            "http://127.0.177.12:2379",
            "member",
            "list",
        ],
    );
    assert_eq!(
        text(&members.stdout).lines().count(),
        2,
        "{}",
        text(&members.stdout)
    );
    // `server:` was taken out for the reset only.
    let cfg = text(
        &lab.exec("rke2-server-2", &["cat", "/etc/rancher/rke2/config.yaml"])
            .stdout,
    );
    assert!(
        cfg.contains("server: \"https://127.0.177.10:9345\""),
        "{cfg}"
    );
    // The token file is gone.
    let tf = lab.exec(
        "rke2-server-2",
        &["test", "-e", "/var/lib/rancher/rke2/server/restore-token"],
    );
    assert!(!tf.status.success());
}

/// Every journal under `dir`, concatenated (the bundles of one work directory).
/// Every step log (`*.log`) under `dir`, nested bundles included.
fn walk_logs_deep(dir: &Path) -> String {
    let mut out = String::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.push_str(&walk_logs_deep(&p));
        } else if p.extension().is_some_and(|x| x == "log") {
            out.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
        }
    }
    out
}

fn walk_journals(dir: &Path) -> String {
    let mut out = String::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.push_str(&walk_journals(&p));
        } else if p.file_name().is_some_and(|n| n == "journal.jsonl") {
            out.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
        }
    }
    out
}

/// Proxmox snapshots the lab holds for a VM (one directory per snapshot).
fn pve_snapshots(lab: &Lab, vmid: u32) -> Vec<String> {
    std::fs::read_dir(lab.labdir().join("pve").join(vmid.to_string()))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn rolling_upgrade_stops_at_a_failing_server_then_a_rerun_finishes_it() {
    let Some(lab) = Lab::up("127.0.179") else {
        return;
    };
    let from = lab.var("RKE2_VERSION");
    let to = "v1.33.5+rke2r1";
    deploy(&lab, &[], &[]).assert_code(0);

    // rke2-server-2's install fails (a broken mirror): the run stops there.
    let out = lab_cmd(&lab.labdir(), &["fault", "rke2-server-2", "fail-install"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let target = format!("target_version={to}");

    // Ctrl-C while the first server is being drained: the block's `run_on_cancel` uncordon
    // still runs, so no node is left cordoned (SchedulingDisabled).
    let (cwd, mut cmd) = lab.command("rke2-upgrade.toml", &["--set", &target], &[]);
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn upgrade");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    let journal = || -> String {
        let proof = cwd.join("proof");
        walk_journals(&proof)
    };
    while !journal().contains("\"target\":\"rke2-server-1/drain\"") {
        assert!(
            std::time::Instant::now() < deadline,
            "the drain never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130), "Ctrl-C mid-drain");
    for (name, status, _) in nodes(&lab) {
        assert_eq!(
            status, "Ready",
            "{name} left cordoned after Ctrl-C mid-drain"
        );
    }
    assert!(
        journal().contains("\"target\":\"rke2-server-1/uncordon\""),
        "the uncordon ran after the interrupt"
    );

    // Data of before the run: the rollback must bring it back, and lose what came after.
    let ok = |o: Output| assert!(o.status.success(), "{}", text(&o.stderr));
    ok(lab.kubectl(&["create", "namespace", "before-upgrade"]));
    let failed = lab.run(
        "rke2-upgrade.toml",
        &["--set", &target, "--set", "batch_pause=1s"],
        &[],
    );
    failed.assert_code(1);
    assert_eq!(failed.status_of("pve-snapshot-wait"), "succeeded");
    assert_eq!(failed.status_of("upgrade-servers"), "failed");
    assert!(
        failed.manifest()["notes"]
            .to_string()
            .contains("upgrade-servers: gate before the first batch passed"),
        "the health gate ran before the first server was drained"
    );
    assert_eq!(failed.status_of("upgrade-agents"), "skipped");
    assert_eq!(failed.status_of("what-now"), "succeeded");
    let notes = failed.manifest()["notes"].to_string();
    assert!(
        notes.contains("upgrade stopped at [\\\"rke2-server-2\\\"]"),
        "{notes}"
    );
    assert!(notes.contains("re-run this runbook"), "{notes}");
    let got = nodes(&lab);
    let by = |n: &str| got.iter().find(|x| x.0 == n).cloned().expect(n);
    assert_eq!(by("rke2-server-1").2, to);
    assert_eq!(
        by("rke2-server-2").2,
        from,
        "failed install keeps the old version"
    );
    assert_eq!(
        by("rke2-server-2").1,
        "Ready",
        "uncordoned after the failure"
    );
    assert_eq!(
        by("rke2-server-3").2,
        from,
        "the next server was not touched"
    );
    assert_eq!(by("rke2-agent-1").2, from);
    // A failed (and an interrupted) run keeps its VM snapshots (the rollback path).
    for vmid in [201, 202, 203, 211, 212] {
        assert_eq!(pve_snapshots(&lab, vmid).len(), 2, "vm {vmid}");
    }

    // Roll back instead of going on: the Proxmox path of rke2-dr-restore.toml, every VM to the
    // failed run's snapshot, whose one name (the same on every VM) the report gives.
    ok(lab.kubectl(&["create", "namespace", "after-upgrade"]));
    let run_id = failed.manifest()["run_id"]
        .as_str()
        .expect("run id")
        .to_owned();
    let pve_snap = format!("pre-{}-{run_id}", to.replace(['.', '+'], "-"));
    assert!(
        notes.contains(&format!("--set pve_snapshot={pve_snap}")),
        "{notes}"
    );
    for vmid in [201, 202, 203, 211, 212] {
        assert!(pve_snapshots(&lab, vmid).contains(&pve_snap), "vm {vmid}");
    }
    let pve = format!("pve_snapshot={pve_snap}");
    let asked = lab.run(
        "rke2-dr-restore.toml",
        &[
            "--set",
            "confirm_cluster=lab",
            "--set",
            "method=proxmox",
            "--set",
            &pve,
        ],
        &[],
    );
    asked.assert_code(4);
    let back = lab.resume(&asked, &["--approve", "stop-servers"], &[]);
    back.assert_code(0);
    for id in [
        "pve-rollback-wait",
        "pve-start-wait",
        "cluster-reset",
        "rejoin-servers",
    ] {
        assert_eq!(back.status_of(id), "succeeded", "{id}");
    }
    for (name, status, v) in nodes(&lab) {
        assert_eq!(
            (status.as_str(), v.as_str()),
            ("Ready", from.as_str()),
            "{name} after the VM rollback"
        );
    }
    for node in ["rke2-server-1", "rke2-agent-2"] {
        let v = text(&lab.exec(node, &["rke2", "--version"]).stdout);
        assert!(v.contains(&from), "{node} runs {v}");
    }
    let ns = text(&lab.kubectl(&["get", "namespaces", "--no-headers"]).stdout);
    assert!(ns.contains("before-upgrade"), "{ns}");
    assert!(!ns.contains("after-upgrade"), "rolled back: {ns}");

    // Mirror fixed: the same command finishes the job (a second snapshot name, no clash).
    let out = lab_cmd(&lab.labdir(), &["fault", "rke2-server-2", "fix-install"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let done = lab.run(
        "rke2-upgrade.toml",
        &["--set", &target, "--set", "batch_pause=1s"],
        &[],
    );
    done.assert_code(0);
    assert_eq!(done.status_of("verify"), "succeeded");
    assert_eq!(done.status_of("pve-snapshot-delete-wait"), "succeeded");
    for (name, status, v) in nodes(&lab) {
        assert_eq!((status.as_str(), v.as_str()), ("Ready", to), "{name}");
    }
    // This run's snapshots are deleted after verify; the failed and interrupted runs' stay.
    for vmid in [201, 202, 203, 211, 212] {
        assert_eq!(pve_snapshots(&lab, vmid).len(), 2, "vm {vmid}");
    }
    // Versionlock is back on after the upgrade.
    let lock = lab.exec("rke2-server-3", &["dnf", "versionlock", "list"]);
    assert!(
        text(&lock.stdout).contains("rke2-*"),
        "{}",
        text(&lock.stdout)
    );

    // And back by the etcd path (the RKE2 docs' rollback): every node stopped and the old
    // version reinstalled, the cluster reset to the pre-upgrade snapshot the finished run took
    // on the old version (by its S3 name), the other servers wiped and rejoined, agents last.
    ok(lab.kubectl(&["create", "namespace", "after-second-upgrade"]));
    let ls = text(
        &lab.exec("rke2-server-2", &["rke2", "etcd-snapshot", "ls"])
            .stdout,
    );
    let snap = ls
        .lines()
        .filter(|l| l.contains("s3://"))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("pre-upgrade-"))
        .max()
        .expect("the finished run's pre-upgrade snapshot in S3")
        .to_owned();
    let snapshot = format!("snapshot={snap}");
    let old = format!("rke2_version={from}");
    let asked = lab.run(
        "rke2-dr-restore.toml",
        &[
            "--set",
            "confirm_cluster=lab",
            "--set",
            &snapshot,
            "--set",
            &old,
        ],
        &[],
    );
    asked.assert_code(4);
    let back = lab.resume(&asked, &["--approve", "stop-servers"], &[]);
    back.assert_code(0);
    assert_eq!(back.status_of("reinstall"), "succeeded");
    assert_eq!(back.status_of("start-agents"), "succeeded");
    assert_eq!(back.status_of("rollback-versions"), "succeeded");
    for (name, status, v) in nodes(&lab) {
        assert_eq!(
            (status.as_str(), v.as_str()),
            ("Ready", from.as_str()),
            "{name} after the etcd rollback"
        );
    }
    for node in ["rke2-server-3", "rke2-agent-1"] {
        let v = text(&lab.exec(node, &["rke2", "--version"]).stdout);
        assert!(v.contains(&from), "{node} runs {v}");
    }
    let ns = text(&lab.kubectl(&["get", "namespaces", "--no-headers"]).stdout);
    assert!(ns.contains("before-upgrade"), "{ns}");
    assert!(!ns.contains("after-second-upgrade"), "rolled back: {ns}");
}

/// The DR canary (docs/rke2/rke2-dr-drill.md): a Deployment of the lab's canary app
/// (image `lab/canary`) with a Longhorn PVC and a LoadBalancer Service.
const CANARY: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: dr-canary}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: canary-data, namespace: dr-canary}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: longhorn
  resources: {requests: {storage: 1Gi}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: canary, namespace: dr-canary}
spec:
  replicas: 1
  selector: {matchLabels: {app: canary}}
  template:
    metadata: {labels: {app: canary}}
    spec:
      containers:
        - {name: canary, image: 'lab/canary:1', ports: [{containerPort: 8080}], volumeMounts: [{name: data, mountPath: /data}]}
      volumes:
        - {name: data, persistentVolumeClaim: {claimName: canary-data}}
---
apiVersion: v1
kind: Service
metadata: {name: canary, namespace: dr-canary}
spec:
  type: LoadBalancer
  selector: {app: canary}
  ports: [{port: 80, targetPort: 8080}]
";

/// `kubectl apply -f` of a manifest written to the lab's temp directory.
fn apply(lab: &Lab, name: &str, manifest: &str) {
    let f = lab.dir.path().join(name);
    std::fs::write(&f, manifest).expect("manifest");
    let out = lab.kubectl(&["apply", "-f", &f.to_string_lossy()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The canary's LoadBalancer address answered as MetalLB + kube-proxy would
/// (`lab/kubectl.py lab-lb`); stopped on drop.
struct CanaryLb(std::process::Child);

impl CanaryLb {
    fn start(lab: &Lab, ip: &str) -> CanaryLb {
        let child = std::process::Command::new("python3")
            .arg(crate::lab_harness::repo().join("lab/kubectl.py"))
            .args(["lab-lb", &format!("{ip}:80")])
            .env("KUBECONFIG", lab.var("KUBECONFIG"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("lab-lb");
        CanaryLb(child)
    }
}

impl Drop for CanaryLb {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `curl` against the canary: (HTTP status, body).
fn canary(url: &str, post: Option<&str>) -> (u16, String) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"]);
    if let Some(body) = post {
        cmd.args(["-X", "POST", "--data-binary", body]);
    }
    let out = cmd.arg(url).output().expect("curl");
    let all = text(&out.stdout);
    let (body, code) = all.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// A Longhorn backup of `volume` (what the deploy's RecurringJob creates on schedule).
fn backup(lab: &Lab, volume: &str, name: &str) {
    let manifest = format!(
        "apiVersion: longhorn.io/v1beta2\nkind: Backup\nmetadata: {{name: {name}, namespace: longhorn-system, labels: {{backup-volume: {volume}}}}}\nspec: {{snapshotName: {name}}}\n"
    );
    apply(lab, &format!("{name}.yaml"), &manifest);
}

/// `rke2 etcd-snapshot save --name NAME` on `node`.
fn etcd_snapshot(lab: &Lab, node: &str, name: &str) {
    let out = lab.exec(node, &["rke2", "etcd-snapshot", "save", "--name", name]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Records on the canary's volume (every line after the marker).
fn records(body: &str) -> Vec<String> {
    body.lines()
        .filter(|l| !l.is_empty() && *l != "canary-ok")
        .map(str::to_owned)
        .collect()
}

/// The RFC 3339 time a second after now has started: records and backups carry whole seconds,
/// so a record meant to come after a backup is written in a later second.
fn next_second() {
    std::thread::sleep(std::time::Duration::from_millis(1100));
}

#[test]
fn dr_drill_on_the_canary_then_a_missed_rto_then_a_resumed_restore_onto_the_survivors() {
    let Some(lab) = Lab::up("127.0.183") else {
        return;
    };
    let ok = |o: Output| assert!(o.status.success(), "{}", text(&o.stderr));
    deploy(&lab, &[], &[]).assert_code(0);
    apply(&lab, "canary.yaml", CANARY);
    let ip = text(
        &lab.kubectl(&[
            "-n",
            "dr-canary",
            "get",
            "svc",
            "canary",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ])
        .stdout,
    );
    assert!(ip.starts_with("127.0.183.2"), "MetalLB pool address: {ip}");
    let volume = text(
        &lab.kubectl(&[
            "-n",
            "dr-canary",
            "get",
            "pvc",
            "canary-data",
            "-o",
            "jsonpath={.spec.volumeName}",
        ])
        .stdout,
    );
    assert!(volume.starts_with("pvc-"), "{volume}");
    let _lb = CanaryLb::start(&lab, &ip);
    let url = format!("http://{ip}/canary");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while canary(&url, None).0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the canary never answered"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // The app writes; a backup and an etcd snapshot (on rke2-server-2 only) are taken, as the
    // RecurringJob and etcd-snapshot-schedule-cron would; then it writes again.
    assert_eq!(canary(&url, Some("order 1")).0, 201);
    next_second();
    backup(&lab, &volume, "backup-1");
    etcd_snapshot(&lab, "rke2-server-2", "drill");
    next_second();
    assert_eq!(canary(&url, Some("order 2 after the backup")).0, 201);

    let service = format!("service_url={url}");
    let volumes = format!("drill_volumes=[\"{volume}\"]");
    let runbooks = format!(
        "runbooks_dir={}",
        crate::lab_harness::repo().join("runbooks").display()
    );
    // The runbook's default snapshot_source: the newest snapshot in S3.
    let args = ["--set", &volumes, "--set", &service, "--set", &runbooks];
    let drill = lab.run("rke2-dr-drill.toml", &args, &[]);
    drill.assert_code(0);
    let m = drill.manifest();
    let d = &m["drill"];
    assert_eq!(d["verdict"], "pass", "{d}");
    // RTO: the disaster (namespace deleted), the nested restore and the canary answering.
    let rto = d["rto"]["measured_seconds"].as_f64().expect("RTO measured");
    assert!(rto > 0.0, "{d}");
    assert_eq!(d["rto"]["target_seconds"], 7200.0);
    // RPO on the data: the newest record back is "order 1", written before the backup; the
    // clock started after "order 2" and the drill's own record, which are lost.
    let rpo = d["rpo"]["measured_seconds"].as_f64().expect("RPO measured");
    assert!(
        rpo >= 2.0,
        "RPO {rpo}: at least the two seconds between order 1 and the disaster"
    );
    assert_eq!(d["rpo"]["verdict"], "pass");
    let notes = m["notes"].to_string();
    assert!(notes.contains("canary: 1 record(s) back"), "{notes}");
    assert!(
        notes.contains("2 newer than the recovery point lost"),
        "{notes}"
    );
    let (code, body) = canary(&url, None);
    assert_eq!(code, 200);
    let got = records(&body);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].ends_with(" order 1"), "{got:?}");
    // The nested restore ran under the drill: the snapshot by its S3 name, downloaded by the
    // first server that answers (the file is also on rke2-server-2's disk, unused).
    let restore_notes = walk_manifest_notes(&drill.cwd);
    assert!(
        restore_notes.contains("cluster-reset on rke2-server-1"),
        "{restore_notes}"
    );
    assert!(
        walk_logs_deep(&drill.cwd).contains("Downloaded s3://rke2-etcd/lab/drill-rke2-server-2-"),
        "the reset fetched the snapshot from S3"
    );
    let members = lab.exec(
        "rke2-server-1",
        &[
            "etcdctl",
            "--endpoints",
            "http://127.0.183.12:2379",
            "member",
            "list",
        ],
    );
    assert_eq!(
        text(&members.stdout).lines().count(),
        3,
        "one etcd cluster of three again: {}",
        text(&members.stdout)
    );
    for (name, status, _) in nodes(&lab) {
        assert_eq!(status, "Ready", "{name}");
    }
    let report = std::fs::read_to_string(drill.bundle().join("report.html")).expect("report");
    assert!(
        report.contains("<section id=\"drill\">"),
        "no drill section"
    );

    // The same drill with an RTO no restore can meet: every step succeeds, exit 5, the report
    // says the objective was missed. A fresh backup and snapshot first (the schedule's).
    assert_eq!(canary(&url, Some("order 3")).0, 201);
    next_second();
    backup(&lab, &volume, "backup-2");
    etcd_snapshot(&lab, "rke2-server-2", "drill");
    let strict =
        std::fs::read_to_string(crate::lab_harness::repo().join("runbooks/rke2-dr-drill.toml"))
            .expect("drill")
            .replace("rto = \"2h\"", "rto = \"5s\"");
    assert!(strict.contains("rto = \"5s\""));
    let strict_path = lab.dir.path().join("rke2-dr-drill-5s.toml");
    std::fs::write(&strict_path, strict).expect("strict drill");
    // This one from the local snapshot: the reset runs on its holder, rke2-server-2, and
    // rke2-server-1 (no `server:` in its config, the deploy's first server) rejoins.
    let local = [
        "--set",
        "snapshot_source=local",
        "--set",
        &volumes,
        "--set",
        &service,
        "--set",
        &runbooks,
    ];
    let missed = lab.run(&strict_path.to_string_lossy(), &local, &[]);
    missed.assert_code(5);
    let nested = walk_journals(&missed.cwd);
    assert!(
        nested.contains("\"target\":\"rke2-server-1/start\""),
        "the nested restore's journal is in the work directory"
    );
    let restore_notes = walk_manifest_notes(&missed.cwd);
    assert!(
        restore_notes.contains("cluster-reset on rke2-server-2"),
        "{restore_notes}"
    );
    assert!(
        missed.stderr().contains("recovery objectives were not met"),
        "{}",
        missed.stderr()
    );
    let m = missed.manifest();
    assert_eq!(m["status"], "succeeded", "every step succeeded");
    assert_eq!(m["drill"]["verdict"], "fail");
    assert_eq!(m["drill"]["rto"]["verdict"], "fail");
    let why = m["drill"]["rto"]["why"].as_str().unwrap_or_default();
    assert!(why.contains("over the target"), "{why}");
    assert_eq!(m["drill"]["rpo"]["verdict"], "pass");
    let junit = std::fs::read_to_string(missed.bundle().join("junit.xml")).expect("junit");
    assert!(junit.contains("type=\"objective\""), "{junit}");
    let got = records(&canary(&url, None).1);
    assert!(got.iter().any(|r| r.ends_with(" order 3")), "{got:?}");

    // Restore onto the survivors (rke2-server-3 lost for good): the reset on rke2-server-1,
    // where the snapshot is; rke2-server-2 is wiped and rejoins. The run is killed (-9) after
    // rke2-server-2 rejoined and before the block ends; `runbook resume` runs the block again on
    // every server, and the guard keeps rke2-server-2's new database.
    ok(lab_cmd(&lab.labdir(), &["fault", "rke2-server-3", "lose"]));
    // rke2-server-2's database archives so far (the first drill's restore wiped it once).
    let archives = || {
        text(
            &lab.exec("rke2-server-2", &["ls", "/var/lib/rancher/rke2/server"])
                .stdout,
        )
        .lines()
        .filter(|l| l.starts_with("db-before-restore-"))
        .count()
    };
    let archives_before = archives();
    etcd_snapshot(&lab, "rke2-server-1", "resume");
    let ls = text(
        &lab.exec("rke2-server-1", &["rke2", "etcd-snapshot", "ls"])
            .stdout,
    );
    let snap = ls
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .find(|n| n.starts_with("resume-rke2-server-1-"))
        .expect("the snapshot")
        .to_owned();
    let snapshot = format!("snapshot={snap}");
    let args = [
        "--set",
        "confirm_cluster=lab",
        "--set",
        &snapshot,
        "--set",
        "snapshot_source=local",
        "--set",
        "delete_stale_nodes=true",
    ];
    let asked = lab.run("rke2-dr-restore.toml", &args, &[]);
    asked.assert_code(4);
    let bundle = asked.bundle();
    let journal = || std::fs::read_to_string(bundle.join("journal.jsonl")).unwrap_or_default();
    let mut child = resume_command(&lab, &asked, &["--approve", "stop-servers"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn resume");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let rejoined = |j: &str| {
        j.lines().any(|l| {
            l.contains("\"event\":\"attempt_finished\"")
                && l.contains("\"target\":\"rke2-server-2/start\"")
        })
    };
    while !rejoined(&journal()) {
        assert!(
            std::time::Instant::now() < deadline,
            "rke2-server-2 never rejoined"
        );
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the restore ended before rke2-server-2 rejoined"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().expect("kill -9");
    child.wait().expect("wait");
    let member = |node: &str| -> String {
        let out = lab.exec(
            node,
            &[
                "etcdctl",
                "--endpoints",
                "http://127.0.183.11:2379",
                "member",
                "list",
            ],
        );
        text(&out.stdout)
            .lines()
            .find(|l| l.contains("rke2-server-2"))
            .and_then(|l| l.split(',').next())
            .unwrap_or_default()
            .to_owned()
    };
    let id_before = member("rke2-server-1");
    assert!(!id_before.is_empty(), "rke2-server-2 is an etcd member");
    let done = lab.resume(&asked, &[], &[]);
    done.assert_code(0);
    let wipes = journal()
        .lines()
        .filter(|l| {
            l.contains("\"event\":\"attempt_started\"")
                && l.contains("\"target\":\"rke2-server-2/wipe-db\"")
        })
        .count();
    assert_eq!(
        wipes, 2,
        "the resumed block ran wipe-db on rke2-server-2 again"
    );
    let log = walk_logs(&bundle.join("steps/rejoin-servers/rke2-server-2/wipe-db"));
    assert!(
        log.contains("rejoined already in this restore"),
        "the guard: {log}"
    );
    assert_eq!(
        member("rke2-server-1"),
        id_before,
        "the same member, not a new one"
    );
    assert_eq!(
        archives(),
        archives_before + 1,
        "one more archive in this restore, one wipe"
    );
    let notes = done.manifest()["notes"].to_string();
    assert!(notes.contains("cluster-reset on rke2-server-1"), "{notes}");
    let names: Vec<String> = nodes(&lab).into_iter().map(|n| n.0).collect();
    assert_eq!(
        names,
        [
            "rke2-agent-1",
            "rke2-agent-2",
            "rke2-server-1",
            "rke2-server-2"
        ],
        "the lost server's Node deleted"
    );
}

/// `runbook resume BUNDLE …` of `run`, not started yet (to be killed mid-way).
fn resume_command(lab: &Lab, run: &Run, extra: &[&str]) -> std::process::Command {
    let bindir = Path::new(BIN).parent().expect("bin dir");
    let mut cmd = std::process::Command::new(BIN);
    cmd.current_dir(&run.cwd)
        .arg("resume")
        .arg(run.bundle())
        .arg("--no-progress")
        .args(extra)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    for (k, v) in &lab.env {
        let v = if k == "PATH" {
            format!("{}:{v}", bindir.display())
        } else {
            v.clone()
        };
        cmd.env(k, v);
    }
    cmd
}

/// Every attempt log under `dir`, concatenated.
fn walk_logs(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    out
}

/// Every manifest's notes under `dir` (nested bundles included), concatenated.
fn walk_manifest_notes(dir: &Path) -> String {
    let mut out = String::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.push_str(&walk_manifest_notes(&p));
        } else if p.file_name().is_some_and(|n| n == "manifest.json") {
            let m: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_default())
                    .unwrap_or_default();
            out.push_str(&m["notes"].to_string());
        }
    }
    out
}
