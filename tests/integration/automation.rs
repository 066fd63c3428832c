//! The automation the RKE2 runbooks call — Packer and kickstart (`runbooks/infra/packer-multi-os`),
//! Terraform modules (`runbooks/infra/terraform`), Ansible roles
//! (`runbooks/deployment/containerization/kubernetes/rke2/playbooks`) and monitoring
//! (`runbooks/monitoring`) — checked with the real tools scripts/test installs: `ksvalidator`
//! (pykickstart), python-hcl2, `ansible-lint`, `ansible-playbook` over real sshds on loopback,
//! `promtool`. There is no Packer or Terraform binary here, so the HCL is parsed by a real HCL
//! parser and held against what the runbooks pass and read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::common::BIN;
use crate::hosts::sshd::Sshd;

// The loopback HTTP server the probe tests use; probes.rs includes it privately too.
#[allow(clippy::duplicate_mod)]
#[path = "../../steps/tests/support/httpd.rs"]
mod httpd;

const PACKER: &str = "runbooks/infra/packer-multi-os/rocky";
const TERRAFORM: &str = "runbooks/infra/terraform";
const PLAYBOOKS: &str = "runbooks/deployment/containerization/kubernetes/rke2/playbooks";
const MONITORING: &str = "runbooks/monitoring";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Where pip puts console scripts: `~/.local/bin` (`--user`) and python3's own scripts dir,
/// then `PATH`.
fn tool_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".local/bin"));
    }
    if let Ok(out) = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
    {
        dirs.push(PathBuf::from(text(&out.stdout).trim()));
    }
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    dirs
}

/// A tool scripts/test installs, by full path.
fn tool(name: &str) -> PathBuf {
    tool_dirs()
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` not found: scripts/test installs it"))
}

/// `PATH` with the pip script dirs first (ansible-lint runs `ansible-playbook` from `PATH`).
fn tool_path() -> std::ffi::OsString {
    std::env::join_paths(tool_dirs()).expect("PATH")
}

fn run(cmd: &mut Command) -> Output {
    cmd.env("PATH", tool_path())
        .env("ANSIBLE_NOCOLOR", "1")
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

#[track_caller]
fn assert_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Every file under `dir` (recursively) whose name ends with `suffix`.
fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                todo.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                found.push(p);
            }
        }
    }
    found.sort();
    found
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn runbook_toml(name: &str) -> toml::Value {
    let p = repo().join("runbooks").join(name);
    toml::from_str(&read(&p)).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

// ------------------------------------------------------------------------------------ HCL

/// Files parsed by python-hcl2 (a real HCL2 parser), as JSON by path: blocks are lists of
/// `{label: body}` maps, expressions `${…}` strings.
fn hcl(files: &[PathBuf]) -> BTreeMap<PathBuf, Value> {
    const SCRIPT: &str = r#"
import hcl2, json, sys
from hcl2 import SerializationOptions
opts = SerializationOptions(strip_string_quotes=True, with_comments=False)
out = {}
for p in sys.argv[1:]:
    try:
        with open(p) as f:
            out[p] = hcl2.load(f, serialization_options=opts)
    except Exception as e:
        sys.exit(f"{p}: {e}")
print(json.dumps(out))
"#;
    assert!(!files.is_empty(), "no HCL files given");
    let out = run(Command::new("python3").arg("-c").arg(SCRIPT).args(files));
    assert_ok("python-hcl2 (scripts/test installs it)", &out);
    let all: BTreeMap<String, Value> = serde_json::from_slice(&out.stdout).expect("hcl2 JSON");
    all.into_iter()
        .map(|(k, v)| (PathBuf::from(k), v))
        .collect()
}

/// The parsed documents of `files` out of one [`hcl`] run over more.
fn pick(all: &BTreeMap<PathBuf, Value>, files: &[PathBuf]) -> BTreeMap<PathBuf, Value> {
    assert!(!files.is_empty(), "no HCL files picked");
    files.iter().map(|f| (f.clone(), all[f].clone())).collect()
}

/// `(label, body)` of every block `kind` with one label in the parsed files.
fn blocks<'a>(docs: impl IntoIterator<Item = &'a Value>, kind: &str) -> Vec<(String, &'a Value)> {
    let mut out = Vec::new();
    for doc in docs {
        for b in doc[kind].as_array().map(Vec::as_slice).unwrap_or_default() {
            for (label, body) in b.as_object().into_iter().flatten() {
                if label != "__is_block__" {
                    out.push((label.clone(), body));
                }
            }
        }
    }
    out
}

fn names(blocks: &[(String, &Value)]) -> BTreeSet<String> {
    blocks.iter().map(|(n, _)| n.clone()).collect()
}

/// Every `var.NAME` an HCL file refers to.
fn var_refs(src: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    for (i, _) in src.match_indices("var.") {
        let before = src[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = src[i + 4..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        refs.insert(name);
    }
    refs
}

/// Words following `flag` in `s` up to `=`: `-var NAME=` / `PKR_VAR_NAME`.
fn after(s: &str, flag: &str) -> BTreeSet<String> {
    s.match_indices(flag)
        .map(|(i, _)| {
            s[i + flag.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|n| !n.is_empty())
        .collect()
}

/// Every string in a TOML value (runs, plans, env values, keys of env tables).
fn strings(v: &toml::Value, out: &mut Vec<String>) {
    match v {
        toml::Value::String(s) => out.push(s.clone()),
        toml::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        toml::Value::Table(t) => {
            for (k, x) in t {
                out.push(k.clone());
                strings(x, out);
            }
        }
        _ => {}
    }
}

#[test]
fn packer_hcl_parses_and_declares_every_variable_the_image_runbook_passes() {
    let dir = repo().join(PACKER);
    let files = files_ending(&dir, ".pkr.hcl");
    let docs = hcl(&files);
    let declared = names(&blocks(docs.values(), "variable"));

    // Every var.X used in the HCL is declared.
    for f in &files {
        for r in var_refs(&read(f)) {
            assert!(
                declared.contains(&r),
                "{}: var.{r} is used but no `variable \"{r}\"` block declares it",
                f.display()
            );
        }
    }

    // Every variable rocky-image-build passes (PKR_VAR_X, -var X=) is declared.
    let rb = runbook_toml("rocky-image-build.toml");
    let mut all = Vec::new();
    strings(&rb, &mut all);
    let all = all.join("\n");
    let passed: BTreeSet<String> = after(&all, "PKR_VAR_")
        .into_iter()
        .chain(after(&all, "-var "))
        .collect();
    assert!(passed.len() >= 10, "PKR_VAR_ names found: {passed:?}");
    let missing: Vec<_> = passed.difference(&declared).collect();
    assert!(
        missing.is_empty(),
        "rocky-image-build passes {missing:?}, which {PACKER} does not declare"
    );

    // The sources `-only=<hypervisor>-iso.rocky9` selects exist, built from one build block.
    let sources: BTreeSet<String> = docs
        .values()
        .flat_map(|d| d["source"].as_array().cloned().unwrap_or_default())
        .flat_map(|s| {
            s.as_object()
                .into_iter()
                .flatten()
                .flat_map(|(kind, named)| {
                    named
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(move |(name, _)| format!("{kind}.{name}"))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    for hv in ["proxmox", "vsphere"] {
        assert!(
            sources.contains(&format!("{hv}-iso.rocky9")),
            "no source \"{hv}-iso\" \"rocky9\" for --set hypervisor={hv}: {sources:?}"
        );
    }
    assert_eq!(
        rb["params"]["packer_dir"]["default"].as_str(),
        Some(PACKER),
        "rocky-image-build's packer_dir default"
    );

    // The build: plugins for both builders, the manifest the runbook reads, the image check.
    let main = &docs[&dir.join("rocky.pkr.hcl")];
    let plugins = &main["packer"][0]["required_plugins"][0];
    assert_eq!(plugins["proxmox"]["source"], "github.com/hashicorp/proxmox");
    assert_eq!(plugins["vsphere"]["source"], "github.com/hashicorp/vsphere");
    let build = &main["build"][0];
    let post = blocks([build], "post-processor");
    let manifest = post
        .iter()
        .find(|(k, _)| k == "manifest")
        .map(|(_, b)| *b)
        .expect("post-processor \"manifest\"");
    assert_eq!(manifest["output"], "packer-manifest.json");
    let scripts: Vec<String> = blocks([build], "provisioner")
        .iter()
        .filter_map(|(_, b)| b["script"].as_str().map(str::to_owned))
        .collect();
    for s in ["scripts/seal.sh", "scripts/check-image.sh"] {
        assert!(scripts.iter().any(|x| x == s), "no provisioner runs {s}");
        assert!(dir.join(s).is_file(), "{s} is missing");
    }
    // The ISO is pinned: a minor release and a sha256, not "latest" and not "none".
    let vars: BTreeMap<String, &Value> = blocks(docs.values(), "variable").into_iter().collect();
    let checksum = vars["iso_checksum"]["default"].as_str().unwrap_or_default();
    assert!(
        checksum.starts_with("sha256:") && checksum.len() == 7 + 64,
        "iso_checksum {checksum}"
    );
    let url = vars["iso_url"]["default"].as_str().unwrap_or_default();
    let minor = vars["rocky_version"]["default"]
        .as_str()
        .unwrap_or_default();
    assert!(
        minor.starts_with("9.") && url.contains(&format!("Rocky-{minor}-")),
        "iso_url {url} is not the pinned Rocky {minor}"
    );
    // Every file a runbook step collects exists in the Packer directory (or is written by the build).
    for c in rb["steps"].as_array().expect("steps").iter().flat_map(|s| {
        s.get("collect")
            .and_then(toml::Value::as_array)
            .cloned()
            .unwrap_or_default()
    }) {
        let c = c.as_str().unwrap_or_default();
        assert!(
            c == "packer-manifest.json" || dir.join(c).is_file(),
            "rocky-image-build collects {c}, which {PACKER} does not have"
        );
    }
}

/// The kickstart rendered as Packer's `templatefile` does, with a real public key.
fn rendered_kickstart(tmp: &Path) -> PathBuf {
    let key = tmp.join("id_ed25519");
    crate::hosts::sshd::keygen(&key, "ed25519", "");
    let public = read(&key.with_extension("pub"));
    let ks = read(&repo().join(PACKER).join("http/ks.cfg.pkrtpl"))
        .replace("${ssh_public_key}", public.trim());
    assert!(
        !ks.contains("${"),
        "an unrendered template variable is left"
    );
    let path = tmp.join("ks.cfg");
    std::fs::write(&path, ks).expect("write ks.cfg");
    path
}

#[test]
fn kickstart_passes_ksvalidator_for_rhel9_and_builds_an_rke2_ready_base() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ks = rendered_kickstart(tmp.path());
    let out = run(Command::new(tool("ksvalidator"))
        .args(["-v", "RHEL9"])
        .arg(&ks));
    assert_ok("ksvalidator -v RHEL9", &out);

    // What it builds, read back by pykickstart's own parser (not by grepping the file).
    const SCRIPT: &str = r#"
import json, sys
from pykickstart.constants import SELINUX_ENFORCING
from pykickstart.parser import KickstartParser
from pykickstart.version import makeVersion, RHEL9
p = KickstartParser(makeVersion(RHEL9))
p.readKickstart(sys.argv[1])
h = p.handler
print(json.dumps({
    "selinux_enforcing": h.selinux.selinux == SELINUX_ENFORCING,
    "packages": sorted(h.packages.packageList),
    "environment": h.packages.environment,
    "fstypes": sorted((pd.fstype or "") for pd in h.partition.partitions)
        + sorted((lv.fstype or "") for lv in h.logvol.lvList),
    "autopart": bool(h.autopart.autopart),
    "enabled": sorted(h.services.enabled),
    "sshkey_users": [k.username for k in h.sshkey.sshUserList],
}))
"#;
    let out = run(Command::new("python3").arg("-c").arg(SCRIPT).arg(&ks));
    assert_ok("pykickstart parse", &out);
    let k: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(k["selinux_enforcing"], true, "selinux --enforcing: {k}");
    for p in [
        "chrony",
        "cloud-init",
        "cloud-utils-growpart",
        "qemu-guest-agent",
        "open-vm-tools",
        "iscsi-initiator-utils",
        "nfs-utils",
        "container-selinux",
    ] {
        assert!(
            k["packages"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == p)),
            "%packages lacks {p}: {}",
            k["packages"]
        );
    }
    assert_eq!(k["environment"], "minimal-environment");
    assert_eq!(k["autopart"], false, "explicit layout, so no swap is made");
    assert!(
        !k["fstypes"]
            .as_array()
            .expect("fstypes")
            .iter()
            .any(|f| f == "swap"),
        "a swap partition or LV: {}",
        k["fstypes"]
    );
    for s in [
        "chronyd",
        "qemu-guest-agent",
        "vmtoolsd",
        "iscsid",
        "cloud-init",
    ] {
        assert!(
            k["enabled"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == s)),
            "services --enabled lacks {s}"
        );
    }
    assert_eq!(k["sshkey_users"], serde_json::json!(["packer"]));
    // The checks the build runs on the image cover the same properties, and the machine-id is
    // emptied before them.
    let check = read(&repo().join(PACKER).join("scripts/check-image.sh"));
    for needle in [
        "getenforce",
        "swapon",
        "machine-id",
        "iscsi-initiator-utils",
        "nfs-utils",
        "qemu-guest-agent",
        "open-vm-tools",
        "cloud-init",
        "chronyd",
    ] {
        assert!(
            check.contains(needle),
            "check-image.sh does not check {needle}"
        );
    }
    assert!(read(&repo().join(PACKER).join("scripts/seal.sh"))
        .contains("truncate -s 0 /etc/machine-id"));

    // ksvalidator is a real gate: a RHEL 9 kickstart with a removed command fails it.
    let broken = tmp.path().join("broken.cfg");
    std::fs::write(&broken, format!("{}\ninstall\n", read(&ks))).expect("write");
    let out = run(Command::new(tool("ksvalidator"))
        .args(["-v", "RHEL9"])
        .arg(&broken));
    assert!(
        !out.status.success(),
        "ksvalidator accepted `install`, removed in RHEL 8:\n{}",
        text(&out.stdout)
    );
}

#[test]
fn terraform_modules_share_one_contract_and_the_envs_match_what_the_deploy_runbook_reads() {
    // Every .tf parsed in one python-hcl2 run; the checks below pick their files from it.
    let all = hcl(&files_ending(&repo().join(TERRAFORM), ".tf"));
    let modules = repo().join(TERRAFORM).join("modules/rke2");
    let mut contracts = Vec::new();
    for hv in ["proxmox", "vsphere"] {
        let files = files_ending(&modules.join(hv), ".tf");
        let docs = pick(&all, &files);
        let vars = names(&blocks(docs.values(), "variable"));
        let outputs = names(&blocks(docs.values(), "output"));
        for f in &files {
            for r in var_refs(&read(f)) {
                assert!(
                    vars.contains(&r),
                    "{}: var.{r} is not declared",
                    f.display()
                );
            }
        }
        // The inventory fields every node carries, on both hypervisors.
        let locals: String = blocks(docs.values(), "locals")
            .iter()
            .filter(|(k, _)| k == "node_outputs")
            .map(|(_, v)| v.to_string())
            .collect();
        for key in ["name", "ip", "role", "vmid", "pve_node", "host", "uuid"] {
            assert!(
                locals.contains(&format!("{key} = ")),
                "{hv}: node_outputs has no `{key}`: {locals}"
            );
        }
        contracts.push((hv, vars, outputs, docs));
    }
    let (_, pv, po, pdocs) = &contracts[0];
    let (_, vv, vo, vdocs) = &contracts[1];
    assert_eq!(pv, vv, "proxmox and vsphere modules take different inputs");
    assert_eq!(po, vo, "proxmox and vsphere modules give different outputs");
    let source = |docs: &BTreeMap<PathBuf, Value>| -> String {
        docs.values()
            .flat_map(|d| d["terraform"].as_array().cloned().unwrap_or_default())
            .map(|t| t["required_providers"].to_string())
            .collect()
    };
    assert!(source(pdocs).contains("bpg/proxmox"), "{}", source(pdocs));
    assert!(source(vdocs).contains("hashicorp/vsphere"));

    // Each env passes only inputs the module declares and every input without a default.
    let module_vars = |hv: &str| -> (BTreeSet<String>, BTreeSet<String>) {
        let docs = pick(&all, &files_ending(&modules.join(hv), "variables.tf"));
        let all = blocks(docs.values(), "variable");
        let required = all
            .iter()
            .filter(|(_, b)| b.get("default").is_none())
            .map(|(n, _)| n.clone())
            .collect();
        (names(&all), required)
    };
    let deploy = runbook_toml("rke2-vm-deploy.toml");
    let mut deploy_strings = Vec::new();
    strings(&deploy, &mut deploy_strings);
    let deploy_text = deploy_strings.join("\n");
    for (env, hv, template_var) in [
        ("lab", "proxmox", "template_vmid"),
        ("lab-vsphere", "vsphere", "template_name"),
    ] {
        let dir = repo().join(TERRAFORM).join("envs").join(env);
        let docs = pick(&all, &files_ending(&dir, ".tf"));
        let env_vars = names(&blocks(docs.values(), "variable"));
        let (declared, required) = module_vars(hv);
        let (_, module) = blocks(docs.values(), "module")
            .into_iter()
            .next()
            .expect("a module block");
        assert_eq!(
            module["source"].as_str(),
            Some(format!("../../modules/rke2/{hv}").as_str())
        );
        let given: BTreeSet<String> = module
            .as_object()
            .expect("module body")
            .keys()
            .filter(|k| *k != "source" && *k != "__is_block__")
            .cloned()
            .collect();
        let unknown: Vec<_> = given.difference(&declared).collect();
        assert!(
            unknown.is_empty(),
            "envs/{env} passes undeclared {unknown:?}"
        );
        let missing: Vec<_> = required.difference(&given).collect();
        assert!(missing.is_empty(), "envs/{env} does not pass {missing:?}");
        for f in files_ending(&dir, ".tf") {
            for r in var_refs(&read(&f)) {
                assert!(env_vars.contains(&r), "{}: var.{r} undeclared", f.display());
            }
        }
        assert!(
            env_vars.contains(template_var),
            "envs/{env} lacks {template_var}"
        );
        // Every output the deploy runbook reads (`output.json.X.value`, jq `.X.value`).
        let outputs = names(&blocks(docs.values(), "output"));
        let read_outputs: BTreeSet<String> = after(&deploy_text, "output.json.")
            .into_iter()
            .chain(after(&deploy_text, "jq -r '."))
            .filter(|o| deploy_text.contains(&format!("{o}.value")))
            .collect();
        assert!(read_outputs.contains("nodes"), "{read_outputs:?}");
        for o in &read_outputs {
            assert!(
                outputs.contains(o),
                "envs/{env} has no output `{o}` (the deploy runbook reads it)"
            );
        }
    }

    // Every -var the deploy runbook passes to terraform exists in an env (template_vmid in
    // envs/lab, template_name in envs/lab-vsphere), and the env it picks by `hypervisor` (TF_DIR
    // in [defaults].env, relative to the repository root where runbook starts) is each of them.
    let env_vars: Vec<BTreeSet<String>> = ["lab", "lab-vsphere"]
        .iter()
        .map(|env| {
            let dir = repo().join(TERRAFORM).join("envs").join(env);
            names(&blocks(
                pick(&all, &files_ending(&dir, ".tf")).values(),
                "variable",
            ))
        })
        .collect();
    assert_eq!(
        deploy["params"]["terraform_dir"]["default"].as_str(),
        Some(""),
        "terraform_dir defaults to the env of `hypervisor`"
    );
    let tf_dir = deploy["defaults"]["env"]["TF_DIR"]
        .as_str()
        .expect("[defaults].env TF_DIR");
    for env in ["lab", "lab-vsphere"] {
        let rel = format!("{TERRAFORM}/envs/{env}");
        assert!(
            tf_dir.contains(&format!("\"{rel}\"")),
            "TF_DIR does not pick {rel}: {tf_dir}"
        );
        assert!(repo().join(&rel).join("main.tf").is_file(), "{rel}");
    }
    assert!(
        tf_dir.contains("params.hypervisor == \"vsphere\""),
        "{tf_dir}"
    );
    let passed: BTreeSet<String> = deploy_strings
        .iter()
        .filter(|s| s.contains("terraform "))
        .flat_map(|s| after(s, "-var "))
        .collect();
    assert!(
        passed.contains("template_vmid") && passed.contains("template_name"),
        "{passed:?}"
    );
    for v in &passed {
        assert!(
            env_vars.iter().any(|e| e.contains(v)),
            "rke2-vm-deploy passes -var {v}, which no env under {TERRAFORM}/envs declares"
        );
    }
}

/// One Proxmox cluster as the template guard sees it: `/cluster/resources?type=vm` and each VM's
/// config, served by a real HTTP server on loopback.
fn guard(
    vms: Value,
    configs: &[(&str, &str, Value)],
    force: bool,
) -> (Output, Vec<httpd::Request>) {
    const TOKEN_SECRET: &str = "5e6f-guard-token-sekrit";
    let mut server = httpd::Httpd::new().route("/api2/json/cluster/resources", move |_| {
        httpd::Response::json(200, &serde_json::json!({ "data": vms }))
    });
    for (node, vmid, config) in configs {
        let config = config.clone();
        server = server.route(
            &format!("/api2/json/nodes/{node}/qemu/{vmid}/config"),
            move |_| httpd::Response::json(200, &serde_json::json!({ "data": config })),
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let server = rt.block_on(server.start());
    let out = run(Command::new("bash")
        .arg(repo().join(PACKER).join("scripts/template-guard.sh"))
        .env("PROXMOX_URL", server.url("/api2/json"))
        .env("PROXMOX_TOKEN_ID", "packer@pve!build")
        .env("PROXMOX_TOKEN", TOKEN_SECRET)
        .env("VM_ID", "9000")
        .env("FORCE", if force { "true" } else { "false" })
        .env("CA_FILE", ""));
    let requests = server.requests();
    assert!(
        requests.iter().all(|r| r.header("authorization")
            == Some(&format!("PVEAPIToken=packer@pve!build={TOKEN_SECRET}") as &str)),
        "{requests:?}"
    );
    assert!(!text(&out.stdout).contains(TOKEN_SECRET) && !text(&out.stderr).contains(TOKEN_SECRET));
    (out, requests)
}

#[test]
fn template_guard_replaces_a_proxmox_template_only_with_force_and_never_one_with_clones() {
    let template = serde_json::json!({"vmid": 9000, "node": "pve1", "name": "rocky9-rke2-96", "template": 1, "tags": "rke2-template;rocky9"});
    let vm = |vmid: u32, name: &str, tags: &str| serde_json::json!({"vmid": vmid, "node": "pve2", "name": name, "template": 0, "tags": tags});
    let full_clone_config = serde_json::json!({"scsi0": "local-lvm:vm-101-disk-0,size=40G"});

    // No VM 9000: the build may create it.
    let (out, _) = guard(
        serde_json::json!([vm(101, "lab-server-1", "rke2")]),
        &[],
        false,
    );
    assert_ok("guard, no template", &out);
    assert!(text(&out.stdout).contains("PASS template-guard: no VM with id 9000"));

    // It exists and force is off: refused, naming it.
    let (out, _) = guard(serde_json::json!([template.clone()]), &[], false);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("found rocky9-rke2-96; set force=true"),
        "{}",
        text(&out.stderr)
    );

    // force, but a VM carries the clone tag the Terraform modules set: refused, naming the clone.
    let (out, _) = guard(
        serde_json::json!([
            template.clone(),
            vm(101, "lab-server-1", "lab;rke2;rke2-template-9000;servers")
        ]),
        &[("pve2", "101", full_clone_config.clone())],
        true,
    );
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("lab-server-1 (101, tag)"),
        "{}",
        text(&out.stderr)
    );

    // force, but a linked clone sits on the template's base disk: refused.
    let (out, requests) = guard(
        serde_json::json!([template.clone(), vm(102, "lab-agent-1", "rke2")]),
        &[(
            "pve2",
            "102",
            serde_json::json!({"scsi0": "local-lvm:base-9000-disk-0/vm-102-disk-0,size=60G"}),
        )],
        true,
    );
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("lab-agent-1 (102, linked clone)"),
        "{}",
        text(&out.stderr)
    );
    assert!(requests
        .iter()
        .any(|r| r.path == "/api2/json/nodes/pve2/qemu/102/config"));

    // force and no clone anywhere: the template may be replaced.
    let (out, _) = guard(
        serde_json::json!([template, vm(103, "other", "web")]),
        &[("pve2", "103", full_clone_config)],
        true,
    );
    assert_ok("guard, force without clones", &out);
    assert!(
        text(&out.stdout).contains("no VM was cloned from 9000"),
        "{}",
        text(&out.stdout)
    );
}

// ---------------------------------------------------------------------------------- Ansible

/// `ansible-playbook ARGS` in `cwd` with the playbooks' ansible.cfg; Ansible's own scratch
/// files (local and remote temp, its home) go to `scratch`, never into the repository.
fn ansible(args: &[&str], cwd: &Path, scratch: &Path, env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(tool("ansible-playbook"));
    cmd.args(args)
        .current_dir(cwd)
        .env("ANSIBLE_CONFIG", repo().join(PLAYBOOKS).join("ansible.cfg"))
        .env("ANSIBLE_LOCAL_TEMP", scratch.join("ansible-local"))
        .env("ANSIBLE_REMOTE_TEMP", scratch.join("ansible-remote"))
        .env("ANSIBLE_HOME", scratch.join("ansible-home"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

#[test]
fn ansible_roles_pass_ansible_lint_production_and_syntax_check() {
    let playbooks = repo().join(PLAYBOOKS);
    // A copy: ansible-lint writes its cache next to the project.
    let tmp = tempfile::tempdir().expect("tmp");
    let copy = tmp.path().join("playbooks");
    let out = run(Command::new("cp").arg("-a").arg(&playbooks).arg(&copy));
    assert_ok("cp", &out);
    let out = run(Command::new(tool("ansible-lint"))
        .args(["--offline", "--profile", "production", "--nocolor"])
        .current_dir(&copy)
        .env("ANSIBLE_HOME", tmp.path().join(".ansible-home")));
    assert_ok("ansible-lint --profile production", &out);
    assert!(
        text(&out.stderr).contains("Profile 'production' was required, and it passed"),
        "{}",
        text(&out.stderr)
    );
    let inv = tmp.path().join("hosts.ini");
    std::fs::write(&inv, "[servers]\ns1\ns2\ns3\n[agents]\na1\n").expect("inventory");
    let out = ansible(
        &["-i", &inv.to_string_lossy(), "--syntax-check", "site.yml"],
        &copy,
        tmp.path(),
        &[],
    );
    assert_ok("ansible-playbook --syntax-check", &out);
}

/// A token and keys with the characters that break unquoted YAML.
const TOKEN: &str = "K10tok:en #not-a-comment \"quoted\" 'single' {brace}";
const S3_SECRET: &str = "s3:secret/with#hash";

struct AnsibleLab {
    _sshds: Vec<Sshd>,
    dir: tempfile::TempDir,
    hosts: PathBuf,
    /// `ansible_python_interpreter=…`: the loopback "nodes" are this machine, whose login PATH
    /// may offer python shims that do not run (pyenv); use the python3 the tests run with.
    python: String,
    /// `ansible_python_interpreter=<node-python>`: the same python, run by a wrapper that gives
    /// each host a node of its own (see [`node_python`]).
    node_python: String,
}

/// The tags of runtime work a loopback sshd cannot stand for (RPMs, SELinux, the running
/// kernel's modules and sysctl, daemons, the cluster): what docs/rke2/ansible.md says to skip
/// when only the files are wanted.
const SKIP_RUNTIME: &str = "packages,kernel-runtime,firewalld-runtime,services,install,verify";

/// A python wrapper that turns this machine into one node per sshd for the roles: each module
/// runs in a mount namespace of its own whose `/etc` and `/var/lib` are overlays, upper layers
/// `root/<host>/etc` and `root/<host>/var/lib` in `dir` (what the host's own runs wrote before),
/// lower layers this machine's, plus a Rocky 9 `/etc/os-release` and `/etc/redhat-release` (the lab's way of making a
/// node, docs/rke2/lab.md). The host is told by the sshd's port in `SSH_CONNECTION`. So the
/// roles write their real paths (`/etc/rancher/rke2/config.yaml`), and nothing of this machine
/// changes.
fn node_python(dir: &Path, python: &str, hosts: &[(&str, u16)]) -> PathBuf {
    let rocky = dir.join("rocky-etc");
    std::fs::create_dir_all(&rocky).expect("rocky layer");
    std::fs::write(
        rocky.join("os-release"),
        "NAME=\"Rocky Linux\"\nVERSION=\"9.6 (Blue Onyx)\"\nID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\nVERSION_ID=\"9.6\"\nPLATFORM_ID=\"platform:el9\"\nPRETTY_NAME=\"Rocky Linux 9.6 (Blue Onyx)\"\n",
    )
    .expect("os-release");
    // Ansible tells the family from the release file a Rocky 9 ships beside os-release.
    std::fs::write(
        rocky.join("redhat-release"),
        "Rocky Linux release 9.6 (Blue Onyx)\n",
    )
    .expect("redhat-release");
    let cases: String = hosts
        .iter()
        .map(|(h, port)| format!("  {port}) host={h} ;;\n"))
        .collect();
    let script = format!(
        r#"#!/bin/sh
case "${{SSH_CONNECTION##* }}" in
{cases}  *) echo "node-python: no node for SSH_CONNECTION=$SSH_CONNECTION" >&2; exit 1 ;;
esac
r='{root}'/$host
mkdir -p "$r/etc" "$r/var/lib" "$r/.work/etc" "$r/.work/var-lib"
exec unshare --mount --propagation private sh -c '
  mount -t overlay overlay -o lowerdir="$2":/etc,upperdir="$1/etc",workdir="$1/.work/etc" /etc &&
  mount -t overlay overlay -o lowerdir=/var/lib,upperdir="$1/var/lib",workdir="$1/.work/var-lib" /var/lib &&
  shift 2 && exec '{python}' "$@"' sh "$r" '{rocky}' "$@"
"#,
        root = dir.join("root").display(),
        rocky = rocky.display(),
    );
    let path = dir.join("node-python");
    std::fs::write(&path, script).expect("node-python");
    let out = run(Command::new("chmod").arg("755").arg(&path));
    assert_ok("chmod", &out);
    path
}

/// Two real sshds on loopback as `rke2-server-1` (servers) and `rke2-agent-1` (agents), handed
/// to Ansible the way the deploy runbook does: `runbook inventory export --format ansible`.
fn ansible_lab() -> AnsibleLab {
    let sshds = Sshd::start_many(2);
    let dir = tempfile::tempdir().expect("tmp");
    let mut inv = String::new();
    for (s, (name, group)) in sshds
        .iter()
        .zip([("rke2-server-1", "servers"), ("rke2-agent-1", "agents")])
    {
        inv.push_str(&format!(
            "[hosts.{name}]\naddress = \"127.0.0.1\"\nport = {}\nuser = \"{}\"\nidentity_file = \"{}\"\nknown_hosts = \"{}\"\nuse_agent = false\ngroups = [\"{group}\"]\n",
            s.port(),
            s.user(),
            s.client_key_path().display(),
            s.known_hosts_path().display(),
        ));
    }
    std::fs::write(dir.path().join("inventory.toml"), inv).expect("inventory");
    let out = run(Command::new(BIN)
        .args([
            "inventory",
            "export",
            "inventory.toml",
            "--format",
            "ansible",
        ])
        .current_dir(dir.path()));
    assert_ok("runbook inventory export", &out);
    let hosts = dir.path().join("hosts.ini");
    std::fs::write(&hosts, &out.stdout).expect("hosts.ini");
    // Secrets reach Ansible in a vars file, as the deploy runbook writes from its secret params.
    let secrets = serde_json::json!({
        "rke2_token": TOKEN,
        "rke2_etcd_s3": true,
        "rke2_etcd_s3_endpoint": "s3.example.internal:9000",
        "rke2_etcd_s3_bucket": "rke2-etcd",
        "rke2_etcd_s3_folder": "lab",
        "rke2_etcd_s3_access_key": "AKIA-test",
        "rke2_etcd_s3_secret_key": S3_SECRET,
        "rke2_longhorn_s3_access_key": "AKIA-longhorn",
        "rke2_longhorn_s3_secret_key": S3_SECRET,
    });
    std::fs::write(dir.path().join("secrets.json"), secrets.to_string()).expect("secrets");
    let python = run(Command::new("python3").args(["-c", "import sys; print(sys.executable)"]));
    assert_ok("python3", &python);
    let python = text(&python.stdout).trim().to_owned();
    let node_python = node_python(
        dir.path(),
        &python,
        &[
            ("rke2-server-1", sshds[0].port()),
            ("rke2-agent-1", sshds[1].port()),
        ],
    );
    AnsibleLab {
        _sshds: sshds,
        dir,
        hosts,
        python: format!("ansible_python_interpreter={python}"),
        node_python: format!("ansible_python_interpreter={}", node_python.display()),
    }
}

impl AnsibleLab {
    fn root(&self, host: &str) -> PathBuf {
        self.dir.path().join("root").join(host)
    }

    /// site.yml on the two nodes (each its own `/etc` and `/var/lib`, see [`node_python`]), the
    /// runtime tags skipped ([`SKIP_RUNTIME`]): every file the roles write, at its real path;
    /// `extra` adds flags (`--check --diff`).
    fn site(&self, extra: &[&str], transcripts: &Path) -> Output {
        let mut args = vec![
            "-i",
            self.hosts.to_str().expect("utf-8 path"),
            "site.yml",
            "--skip-tags",
            SKIP_RUNTIME,
            "-e",
            "ansible_become=false",
            "-e",
            self.node_python.as_str(),
        ];
        let secrets = format!("@{}", self.dir.path().join("secrets.json").display());
        args.extend(["-e", secrets.as_str()]);
        args.extend(extra);
        // Facts are gathered once and cached for the later runs (`smart` gathering).
        let facts = self.dir.path().join("facts");
        ansible(
            &args,
            &repo().join(PLAYBOOKS),
            self.dir.path(),
            &[
                ("RUNBOOK_TRANSCRIPT_DIR", transcripts),
                ("ANSIBLE_GATHERING", Path::new("smart")),
                ("ANSIBLE_CACHE_PLUGIN", Path::new("jsonfile")),
                ("ANSIBLE_CACHE_PLUGIN_CONNECTION", facts.as_path()),
            ],
        )
    }
}

/// `host : ok=N changed=N …` recap lines by host.
fn recap(stdout: &str) -> BTreeMap<String, BTreeMap<String, u32>> {
    let tail = stdout.rsplit("PLAY RECAP").next().unwrap_or_default();
    tail.lines()
        .filter_map(|l| l.split_once(" : "))
        .map(|(h, rest)| {
            let counts = rest
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
                .collect();
            (h.trim().to_owned(), counts)
        })
        .collect()
}

#[track_caller]
fn assert_no_secret(what: &str, s: &str) {
    for secret in [TOKEN, S3_SECRET, "K10tok"] {
        assert!(
            !s.contains(secret),
            "{what} holds a secret ({secret}):\n{s}"
        );
    }
}

#[test]
fn ansible_roles_run_over_ssh_in_check_mode_then_write_the_nodes_for_real_idempotently() {
    if !crate::hosts::sshd::is_root() {
        eprintln!("skipped: the nodes are mount namespaces (needs root)");
        return;
    }
    let lab = ansible_lab();
    let transcripts = lab.dir.path().join("transcripts");

    // 1. --check --diff over SSH: facts gathered on both hosts, changes reported, none made.
    let check = lab.site(&["--check", "--diff"], &transcripts);
    let stdout = text(&check.stdout);
    assert_ok("ansible-playbook --check --diff", &check);
    let r = recap(&stdout);
    for h in ["rke2-server-1", "rke2-agent-1"] {
        assert!(
            r[h]["changed"] > 0 && r[h]["failed"] == 0,
            "{h}: {:?}\n{stdout}",
            r[h]
        );
    }
    let written: Vec<PathBuf> = crate::common::all_files(&lab.dir.path().join("root"));
    assert!(written.is_empty(), "check mode wrote {written:?}");
    // The diff shows the firewalld zone and the sysctl file, never the config with the token.
    assert!(
        stdout.contains("<port port=\"9345\" protocol=\"tcp\"/>"),
        "{stdout}"
    );
    assert!(stdout.contains("net.ipv4.ip_forward = 1"), "{stdout}");
    assert_no_secret("check-mode output", &stdout);

    // Per-host transcripts (the callback plugin) for the bundle: one line per task result.
    for h in ["rke2-server-1", "rke2-agent-1"] {
        let lines = read(&transcripts.join(format!("{h}.jsonl")));
        assert!(lines.lines().count() > 5, "{h}.jsonl: {lines}");
        for l in lines.lines() {
            let v: Value = serde_json::from_str(l).expect("transcript line is JSON");
            assert_eq!(v["host"], h);
        }
        assert_no_secret(&format!("{h}.jsonl"), &lines);
        assert!(read(&transcripts.join(format!("{h}.log"))).contains("Config.yaml"));
    }
    let summary: Value =
        serde_json::from_str(&read(&transcripts.join("summary.json"))).expect("summary.json");
    assert!(summary["rke2-server-1"]["changed"].as_u64() > Some(0));

    // 2. For real: the files land at their paths on each node (its upper layers in root/).
    let real = lab.site(&[], &lab.dir.path().join("transcripts-2"));
    assert_ok("ansible-playbook (files)", &real);
    assert_no_secret("render output", &text(&real.stdout));
    let server = lab.root("rke2-server-1");
    let agent = lab.root("rke2-agent-1");
    let config: serde_json::Value =
        serde_norway::from_str(&read(&server.join("etc/rancher/rke2/config.yaml")))
            .expect("server config.yaml is YAML");
    assert_eq!(config["token"], TOKEN, "the token survives YAML quoting");
    assert_eq!(config["etcd-s3-secret-key"], S3_SECRET);
    assert!(
        config.get("server").is_none(),
        "the first server has no `server:`"
    );
    assert_eq!(config["cni"], "cilium");
    assert_eq!(
        config["tls-san"],
        serde_json::json!(["rke2-api.example.internal", "10.0.10.10"])
    );
    let agent_config: serde_json::Value =
        serde_norway::from_str(&read(&agent.join("etc/rancher/rke2/config.yaml")))
            .expect("agent config.yaml is YAML");
    assert_eq!(
        agent_config["server"],
        "https://rke2-api.example.internal:9345"
    );
    assert_eq!(agent_config["token"], TOKEN);
    assert!(agent_config.get("tls-san").is_none());
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
    };
    assert_eq!(mode(&server.join("etc/rancher/rke2/config.yaml")), 0o600);
    let manifests = server.join("var/lib/rancher/rke2/server/manifests");
    let cilium: serde_json::Value =
        serde_norway::from_str(&read(&manifests.join("rke2-cilium-config.yaml"))).expect("YAML");
    assert_eq!(cilium["kind"], "HelmChartConfig");
    assert!(cilium["spec"]["valuesContent"]
        .as_str()
        .is_some_and(|v| v.contains("hubble")));
    assert!(server
        .join("var/lib/rancher/rke2/agent/pod-manifests/kube-vip.yaml")
        .is_file());
    assert!(
        !agent.join("var/lib/rancher/rke2/server").exists(),
        "agents get no server manifests"
    );
    // Add-ons: MetalLB pool + L2 advertisement, Longhorn default class + backup target + jobs.
    // Multi-document manifests, one YAML document per `---`.
    let docs = |f: &str| -> Vec<serde_json::Value> {
        read(&manifests.join(f))
            .split("\n---\n")
            .map(|d| serde_norway::from_str(d).unwrap_or_else(|e| panic!("{f}: {e}\n{d}")))
            .collect()
    };
    let kinds = |f: &str| -> Vec<String> {
        docs(f)
            .iter()
            .map(|d| d["kind"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(
        kinds("metallb-pool.yaml"),
        ["IPAddressPool", "L2Advertisement"]
    );
    assert_eq!(
        docs("metallb-pool.yaml")[0]["spec"]["addresses"][0],
        "10.0.10.200-10.0.10.220"
    );
    let longhorn = docs("longhorn.yaml");
    let values = longhorn[1]["spec"]["valuesContent"]
        .as_str()
        .expect("values");
    assert!(
        values.contains("defaultClass: true")
            && values.contains("backupTargetCredentialSecret: longhorn-s3")
    );
    assert_eq!(
        kinds("longhorn-recurring.yaml"),
        ["RecurringJob", "RecurringJob"]
    );
    assert_eq!(docs("longhorn-recurring.yaml")[1]["spec"]["task"], "backup");
    assert_eq!(
        docs("longhorn-s3-secret.yaml")[0]["stringData"]["AWS_SECRET_ACCESS_KEY"],
        S3_SECRET
    );
    // The baseline: zones per role, with Hubble's 4244 everywhere and the API only on servers;
    // well-formed XML (xmllint) as firewalld reads it.
    let zone = |root: &Path, z: &str| read(&root.join(format!("etc/firewalld/zones/{z}.xml")));
    for root in [server.as_path(), agent.as_path()] {
        let nodes = zone(root, "rke2-nodes");
        assert!(
            nodes.contains("<port port=\"4244\" protocol=\"tcp\"/>"),
            "{nodes}"
        );
        assert!(nodes.contains("<source address=\"10.0.10.0/24\"/>"));
        let pods = zone(root, "rke2-pods");
        assert!(
            pods.contains("10.42.0.0/16") && pods.contains("10.43.0.0/16"),
            "{pods}"
        );
        for z in ["rke2-nodes", "rke2-pods"] {
            let out = run(Command::new("xmllint")
                .arg("--noout")
                .arg(root.join(format!("etc/firewalld/zones/{z}.xml"))));
            assert_ok("xmllint", &out);
        }
        let nm = read(&root.join("etc/NetworkManager/conf.d/rke2-cni.conf"));
        assert!(
            nm.contains("interface-name:cilium_*") && nm.contains("interface-name:cali*"),
            "{nm}"
        );
        assert!(read(&root.join("etc/modules-load.d/rke2.conf")).contains("br_netfilter"));
    }
    assert!(zone(server.as_path(), "rke2-nodes").contains("port=\"6443\""));
    assert!(!zone(agent.as_path(), "rke2-nodes").contains("port=\"6443\""));

    // 3. Again: nothing changes.
    let again = lab.site(&[], &lab.dir.path().join("transcripts-3"));
    assert_ok("ansible-playbook (second run)", &again);
    let r = recap(&text(&again.stdout));
    for h in ["rke2-server-1", "rke2-agent-1"] {
        assert_eq!(
            r[h]["changed"],
            0,
            "{h} changed on the second run:\n{}",
            text(&again.stdout)
        );
    }
}

#[test]
fn ansible_baseline_refuses_a_host_that_is_not_el9() {
    // This machine is not Rocky/RHEL 9 (plain python, no node wrapper): the baseline stops at
    // its first task.
    let lab = ansible_lab();
    let hosts = lab.hosts.to_string_lossy().into_owned();
    let secrets = format!("@{}", lab.dir.path().join("secrets.json").display());
    let transcripts = lab.dir.path().join("t");
    let out = ansible(
        &[
            "-i",
            &hosts,
            "site.yml",
            "--check",
            "-e",
            "ansible_become=false",
            "-e",
            &secrets,
            "-e",
            &lab.python,
        ],
        &repo().join(PLAYBOOKS),
        lab.dir.path(),
        &[("RUNBOOK_TRANSCRIPT_DIR", transcripts.as_path())],
    );
    let stdout = text(&out.stdout);
    let os = read(Path::new("/etc/os-release"));
    if os.contains("ID=\"rocky\"") || os.contains("ID=rocky") {
        return; // on Rocky the guard has nothing to refuse
    }
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("rke2_baseline expects Rocky Linux or RHEL 9"),
        "{stdout}"
    );
    let r = recap(&stdout);
    assert_eq!(r["rke2-server-1"]["failed"], 1, "{stdout}");
}

/// What the roles pin (role defaults, group_vars) agrees with the deploy runbook's params, and
/// docs/rke2/ansible.md lists every pin with its value.
#[test]
fn role_pins_match_the_deploy_runbook_and_the_docs() {
    let yaml = |rel: &str| -> Value {
        serde_norway::from_str(&read(&repo().join(PLAYBOOKS).join(rel)))
            .unwrap_or_else(|e| panic!("{rel}: {e}"))
    };
    let site = yaml("group_vars/all.yml");
    let addons = yaml("roles/rke2_addons/defaults/main.yml");
    let install = yaml("roles/rke2_install/defaults/main.yml");
    let deploy = runbook_toml("rke2-vm-deploy.toml");
    let param = |k: &str| {
        deploy["params"][k]["default"]
            .as_str()
            .unwrap_or_else(|| panic!("param {k}"))
            .to_owned()
    };
    let s = |v: &Value| v.as_str().expect("a string").to_owned();
    assert_eq!(s(&site["rke2_version"]), param("rke2_version"));
    assert_eq!(
        s(&addons["rke2_addons_metallb_version"]),
        param("metallb_version").trim_start_matches('v')
    );
    assert_eq!(
        s(&addons["rke2_addons_longhorn_version"]),
        param("longhorn_version")
    );
    let docs = read(&repo().join("docs/rke2/ansible.md"));
    for (name, value) in [
        ("rke2_version", s(&site["rke2_version"])),
        (
            "rke2_addons_metallb_version",
            s(&addons["rke2_addons_metallb_version"]),
        ),
        (
            "rke2_addons_longhorn_version",
            s(&addons["rke2_addons_longhorn_version"]),
        ),
        (
            "rke2_install_kube_vip_image",
            s(&install["rke2_install_kube_vip_image"]),
        ),
        (
            "rke2_addons_node_exporter_chart_version",
            s(&addons["rke2_addons_node_exporter_chart_version"]),
        ),
        (
            "rke2_addons_kube_state_metrics_chart_version",
            s(&addons["rke2_addons_kube_state_metrics_chart_version"]),
        ),
    ] {
        assert!(
            docs.lines()
                .any(|l| l.contains(&format!("`{name}` {value}"))),
            "docs/rke2/ansible.md does not list `{name}` {value}"
        );
    }
}

// ------------------------------------------------------------------------------- monitoring

struct Panel {
    dashboard: String,
    title: String,
    expr: String,
}

/// Every dashboard under runbooks/monitoring/grafana/dashboards (the drills one is a link to
/// dashboards/runbook-drills.json).
fn dashboards() -> Vec<(PathBuf, Value)> {
    let files = files_ending(&repo().join(MONITORING).join("grafana/dashboards"), ".json");
    assert!(files.len() >= 4, "{files:?}");
    files
        .into_iter()
        .map(|f| {
            let v: Value =
                serde_json::from_str(&read(&f)).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            (f, v)
        })
        .collect()
}

/// A panel expression with Grafana's variables replaced by values PromQL accepts.
fn promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("$node", ".*")
        .replace("$runbook", ".*")
}

fn panels() -> Vec<Panel> {
    let mut out = Vec::new();
    for (f, d) in dashboards() {
        for p in d["panels"].as_array().expect("panels") {
            for t in p["targets"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                out.push(Panel {
                    dashboard: f.file_name().expect("name").to_string_lossy().into_owned(),
                    title: p["title"].as_str().unwrap_or_default().to_owned(),
                    expr: promql(t["expr"].as_str().unwrap_or_default()),
                });
            }
        }
    }
    out
}

#[test]
fn dashboards_have_what_grafana_needs_and_the_runbooks_link_to_them() {
    let mut uids = BTreeSet::new();
    for (f, d) in dashboards() {
        let name = f.display();
        let uid = d["uid"].as_str().unwrap_or_default();
        assert!(!uid.is_empty() && uid.len() <= 40, "{name}: uid {uid:?}");
        assert!(
            uids.insert(uid.to_owned()),
            "{name}: uid {uid} is used twice"
        );
        assert!(
            d["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{name}: title"
        );
        assert!(
            d["schemaVersion"].as_u64().is_some(),
            "{name}: schemaVersion"
        );
        let panels = d["panels"].as_array().expect("panels");
        assert!(!panels.is_empty(), "{name}: no panels");
        let mut ids = BTreeSet::new();
        for p in panels {
            let title = p["title"].as_str().unwrap_or_default();
            assert!(
                ids.insert(p["id"].as_u64().expect("panel id")),
                "{name}: panel id twice"
            );
            assert!(p["type"].as_str().is_some(), "{name}/{title}: type");
            assert!(
                p["gridPos"]["w"].as_u64().is_some(),
                "{name}/{title}: gridPos"
            );
            assert_eq!(
                p["datasource"]["type"], "prometheus",
                "{name}/{title}: datasource"
            );
            let targets = p["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{name}/{title}: no targets");
            for t in targets {
                assert!(t["refId"].as_str().is_some(), "{name}/{title}: refId");
                assert!(
                    t["expr"].as_str().is_some_and(|e| !e.is_empty()),
                    "{name}/{title}: expr"
                );
            }
        }
    }
    // The deploy, upgrade and drill runbooks capture panels by /d/<uid>/ paths.
    let mut linked = BTreeSet::new();
    for rb in [
        "rke2-vm-deploy.toml",
        "rke2-upgrade.toml",
        "rke2-dr-drill.toml",
    ] {
        let mut all = Vec::new();
        strings(&runbook_toml(rb), &mut all);
        for s in all {
            for (i, _) in s.match_indices("/d/") {
                let uid: String = s[i + 3..]
                    .chars()
                    .take_while(|c| *c != '/' && *c != '?')
                    .collect();
                linked.insert((rb, uid));
            }
        }
    }
    for (rb, uid) in &linked {
        assert!(
            uids.contains(uid),
            "{rb} links /d/{uid}/, which no dashboard has (uids {uids:?})"
        );
    }
    for uid in ["rke2-nodes", "rke2-control-plane", "longhorn"] {
        assert!(uids.contains(uid), "no dashboard with uid {uid}");
    }
    // The control-plane panels (etcd leader changes, DB size) after a deploy and an upgrade.
    for rb in ["rke2-vm-deploy.toml", "rke2-upgrade.toml"] {
        assert!(
            linked.contains(&(rb, "rke2-control-plane".to_owned())),
            "{rb} captures no /d/rke2-control-plane/ panel"
        );
    }
}

#[test]
fn alert_rules_panel_queries_and_scrape_config_pass_promtool() {
    let tmp = tempfile::tempdir().expect("tmp");
    // The scrape config with its rules, and stand-ins for the two secret files it names.
    let prom = tmp.path().join("prometheus");
    assert_ok(
        "cp",
        &run(Command::new("cp")
            .arg("-a")
            .arg(repo().join(MONITORING).join("prometheus"))
            .arg(&prom)),
    );
    for f in ["secrets/prometheus-token", "secrets/rke2-server-ca.crt"] {
        std::fs::write(prom.join(f), "placeholder\n").expect("secret stand-in");
    }
    let out = run(Command::new("promtool")
        .args(["check", "config", "prometheus.yml"])
        .current_dir(&prom));
    assert_ok("promtool check config", &out);
    assert!(
        text(&out.stdout).contains("SUCCESS"),
        "{}",
        text(&out.stdout)
    );

    // Every panel's query as a recording rule, so promtool parses each one.
    let mut rules = String::from("groups:\n  - name: panels\n    rules:\n");
    let all = panels();
    for (i, p) in all.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: panel:{}:{i}\n        expr: {}\n",
            p.dashboard.replace(['-', '.'], "_"),
            serde_json::to_string(&p.expr).expect("json")
        ));
    }
    let file = tmp.path().join("panels.rules.yml");
    std::fs::write(&file, &rules).expect("rules");
    let out = run(Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&file));
    assert_ok("promtool check rules (panels)", &out);
    assert!(
        text(&out.stdout).contains(&format!("SUCCESS: {} rules found", all.len())),
        "{}",
        text(&out.stdout)
    );
}

/// Metric names a PromQL expression selects. promtool has parsed every expression already
/// (`alert_rules_panel_queries_and_scrape_config_pass_promtool`), so this only has to find the
/// identifiers in selector position: strings, `{…}` matchers, `[…]` ranges and the label lists
/// of `by`/`without`/`on`/`ignoring`/`group_left`/`group_right` go first; of what is left, an
/// identifier is a metric unless a `(` follows (function, aggregation) or it is a keyword.
/// (No PromQL parser crate is in the tree; the one on crates.io rebuilds half of it.)
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
        "Inf",
        "NaN",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    // Pass 1: drop strings and bracketed matchers and ranges.
    let mut kept = String::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            q @ ('"' | '\'' | '`') => {
                i += 1;
                while i < chars.len() && chars[i] != q {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                kept.push(' ');
            }
            open @ ('{' | '[') => {
                let close = if open == '{' { '}' } else { ']' };
                let mut quote = None;
                while i < chars.len() && (quote.is_some() || chars[i] != close) {
                    match (quote, chars[i]) {
                        (None, q @ ('"' | '\'' | '`')) => quote = Some(q),
                        (Some(_), '\\') => i += 1,
                        (Some(q), c) if c == q => quote = None,
                        _ => {}
                    }
                    i += 1;
                }
                kept.push(' ');
            }
            c => kept.push(c),
        }
        i += 1;
    }
    // Pass 2: drop the label lists (`by (a, b)`), so `sum by (le) (x)` reads as `sum (x)`.
    let chars: Vec<char> = kept.chars().collect();
    let mut bare = String::new();
    let mut i = 0;
    while i < chars.len() {
        if !ident(chars[i]) {
            bare.push(chars[i]);
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && ident(chars[i]) {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        let mut next = i;
        while next < chars.len() && chars[next].is_whitespace() {
            next += 1;
        }
        if LABEL_LISTS.contains(&word.as_str()) && chars.get(next) == Some(&'(') {
            while next < chars.len() && chars[next] != ')' {
                next += 1;
            }
            i = next + 1;
            bare.push(' ');
        } else {
            bare.push_str(&word);
        }
    }
    // Pass 3: identifiers not followed by `(` (calls), not keywords, not numbers/durations.
    let chars: Vec<char> = bare.chars().collect();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        if !ident(chars[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && ident(chars[i]) {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        let mut next = i;
        while next < chars.len() && chars[next].is_whitespace() {
            next += 1;
        }
        let call = chars.get(next) == Some(&'(');
        if call
            || KEYWORDS.contains(&word.as_str())
            || word.starts_with(|c: char| c.is_ascii_digit())
        {
            continue;
        }
        out.insert(word);
    }
    out
}

#[test]
fn metric_names_finds_the_selectors_of_a_promql_expression() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le, verb) (rate(apiserver_request_duration_seconds_bucket{verb!~"WATCH|CONNECT", x="a{b}"}[5m])))"#
        ),
        ["apiserver_request_duration_seconds_bucket"]
    );
    assert_eq!(
        names("1 - avg by (instance) (rate(node_cpu_seconds_total{mode=\"idle\"}[5m]) * on (instance) group_left (nodename) node_uname_info)"),
        ["node_cpu_seconds_total", "node_uname_info"]
    );
    assert_eq!(
        names("sum(up{job=\"node\"} == 0) or vector(0) unless time() - foo:bar offset 1h > bool 3"),
        ["foo:bar", "up"]
    );
}

#[test]
fn every_metric_a_panel_or_rule_reads_is_produced_by_a_deployed_exporter() {
    let fixture = read(&repo().join(MONITORING).join("exporter-metrics.txt"));
    let known: BTreeMap<String, String> = fixture
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (exporter, metric) = l.split_once(' ').expect("`<exporter> <metric>`");
            (metric.trim().to_owned(), exporter.to_owned())
        })
        .collect();
    // The exporters named there are the ones the stack deploys or scrapes.
    let deployed = read(
        &repo()
            .join(PLAYBOOKS)
            .join("roles/rke2_addons/templates/monitoring.yaml.j2"),
    );
    let scrape = read(&repo().join(MONITORING).join("prometheus/prometheus.yml"));
    for exporter in known.values().collect::<BTreeSet<_>>() {
        let there = match exporter.as_str() {
            "node-exporter" => deployed.contains("chart: prometheus-node-exporter"),
            "kube-state-metrics" => deployed.contains("chart: kube-state-metrics"),
            "longhorn-manager" => deployed.contains("app: longhorn-manager"),
            "kube-apiserver" => scrape.contains("job_name: apiserver"),
            "etcd" => scrape.contains("job_name: etcd"),
            "runbook" => scrape.contains("job_name: runbook"),
            "prometheus" => true,
            other => {
                panic!("exporter-metrics.txt names `{other}`, which the stack does not deploy")
            }
        };
        assert!(
            there,
            "{exporter} is in exporter-metrics.txt but not deployed or scraped"
        );
    }

    let mut exprs: Vec<(String, String)> = panels()
        .into_iter()
        .map(|p| (format!("{} panel {:?}", p.dashboard, p.title), p.expr))
        .collect();
    let rules: serde_json::Value = serde_norway::from_str(&read(
        &repo()
            .join(MONITORING)
            .join("prometheus/rules/rke2.rules.yml"),
    ))
    .expect("rules YAML");
    for g in rules["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            exprs.push((
                format!("rule {}", r["alert"].as_str().unwrap_or_default()),
                r["expr"].as_str().expect("expr").to_owned(),
            ));
        }
    }
    let mut unknown = Vec::new();
    let mut used = BTreeSet::new();
    for (what, expr) in &exprs {
        let metrics = metric_names(expr);
        assert!(!metrics.is_empty(), "{what}: no metric in {expr}");
        for m in metrics {
            if !known.contains_key(&m) {
                unknown.push(format!("{what}: `{m}`"));
            }
            used.insert(m);
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics no deployed exporter produces (runbooks/monitoring/exporter-metrics.txt):\n{}",
        unknown.join("\n")
    );
    assert!(used.len() > 30, "{used:?}");
}
