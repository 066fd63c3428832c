//! `runbook inventory show|export`: an inventory as people and other tools read it.

use std::path::Path;

use runbook_engine::inventory::{AnsibleFormat, Host, HostKeyPolicy, Inventory, Selector};

use crate::cli::{ExportFormat, InventoryCommand};
use crate::exit;
use crate::render;

pub fn run(command: &InventoryCommand) -> i32 {
    let (file, result) = match command {
        InventoryCommand::Import {
            file,
            output,
            force,
        } => (file, import(file, output.as_deref(), *force)),
        InventoryCommand::Show {
            file,
            select,
            settings,
        } => (file, show(file, select.as_deref(), *settings)),
        InventoryCommand::Export { file, format } => (
            file,
            open(file).map(|inv| {
                let format = match format {
                    ExportFormat::Ansible => AnsibleFormat::Ini,
                    ExportFormat::AnsibleYaml => AnsibleFormat::Yaml,
                };
                print!("{}", inv.to_ansible(format));
            }),
        ),
    };
    match result {
        Ok(()) => exit::OK,
        Err(message) => {
            if !message.is_empty() {
                render::error(&format!("{}: {message}", file.display()));
            }
            exit::USAGE
        }
    }
}

/// An inventory file, or the inventory a runbook names in `[runbook] inventory`.
fn open(file: &Path) -> Result<Inventory, String> {
    let source = runbook_engine::load_source(file).map_err(|e| e.to_string())?;
    let text = source.text();
    let is_runbook = text.lines().any(|l| l.trim() == "[runbook]");
    if is_runbook {
        let host = runbook_engine::expr::ExprHost::new();
        let (runbook, _, _) = runbook_engine::compile(&source, &host).map_err(|d| {
            crate::render::print_diagnostics(&d);
            String::new()
        })?;
        return match crate::inventory_load::load_inventory(&runbook, None, false) {
            Ok(Some(inv)) => Ok(inv),
            Ok(None) => Err("the runbook names no inventory (`[runbook] inventory`)".into()),
            Err(_) => Err(String::new()),
        };
    }
    if crate::ansible_inventory::is_ansible(file, text) {
        return crate::ansible_inventory::load(&source)
            .and_then(crate::inventory_load::with_ssh_config);
    }
    let inv = Inventory::parse(&source).map_err(|d| {
        crate::render::print_diagnostics(&d);
        String::new()
    })?;
    crate::inventory_load::with_ssh_config(inv)
}

fn show(file: &Path, select: Option<&str>, settings: bool) -> Result<(), String> {
    let inv = open(file)?;
    let hosts = match select {
        Some(s) => {
            let sel = Selector::parse(s)?;
            inv.select(&sel)?
        }
        None => inv.hosts().to_vec(),
    };
    if settings {
        for h in &hosts {
            print_settings(&inv, h);
        }
        return Ok(());
    }
    let rows: Vec<[String; 6]> = hosts
        .iter()
        .map(|h| {
            [
                h.name.clone(),
                format!("{}:{}", h.address, h.port),
                h.user.clone(),
                h.groups.join(","),
                match h.host_key_check {
                    HostKeyPolicy::Strict => "strict".into(),
                    HostKeyPolicy::AcceptNew => "accept-new".into(),
                },
                h.proxy_jump.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let header = ["HOST", "ADDRESS", "USER", "GROUPS", "HOST KEY", "JUMP"].map(String::from);
    let mut widths = header.clone().map(|h| h.chars().count());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    for r in std::iter::once(&header).chain(rows.iter()) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    eprintln!(
        "{} host(s); groups: {}",
        hosts.len(),
        inv.group_names().join(", ")
    );
    Ok(())
}

/// One host's effective connection settings, one per line, with where each came from.
fn print_settings(inv: &Inventory, h: &Host) {
    let paths = |ps: &[std::path::PathBuf]| {
        ps.iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let secs = |d: Option<std::time::Duration>| {
        d.map_or_else(|| "off".to_string(), |d| format!("{}s", d.as_secs()))
    };
    let jumps: Vec<String> = inv.jump_chain(h).iter().map(|j| j.name.clone()).collect();
    let rows: Vec<(&str, String)> = vec![
        ("address", h.address.clone()),
        ("port", h.port.to_string()),
        ("user", h.user.clone()),
        ("identity_file", paths(&h.identity_files)),
        ("certificate_file", paths(&h.certificate_files)),
        ("use_agent", h.use_agent.to_string()),
        ("known_hosts", h.known_hosts.display().to_string()),
        (
            "host_key_check",
            match h.host_key_check {
                HostKeyPolicy::Strict => "strict".into(),
                HostKeyPolicy::AcceptNew => "accept-new".into(),
            },
        ),
        ("proxy_jump", jumps.join(" -> ")),
        ("connect_timeout", secs(Some(h.connect_timeout))),
        ("keepalive", secs(h.keepalive)),
        ("ssh_config", paths(&h.ssh_config)),
    ];
    println!("{}:", h.name);
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in rows {
        let source = h.sources.get(key).map_or("default", String::as_str);
        let value = if value.is_empty() {
            "-".to_string()
        } else {
            value
        };
        println!("  {key:<width$}  {value}  ({source})");
    }
}

/// `runbook inventory import FILE [-o OUT]`: an Ansible inventory as a runbook inventory.
fn import(file: &Path, output: Option<&Path>, force: bool) -> Result<(), String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read: {e}"))?;
    let ansible = crate::ansible_inventory::AnsibleInventory::parse(file, &text)
        .map_err(|e| e.to_string())?;
    let converted = ansible.to_runbook()?;
    // The result must read back as a runbook inventory before it is written anywhere.
    runbook_engine::inventory::parse_str(&file.display().to_string(), &converted.toml).map_err(
        |d| {
            crate::render::print_diagnostics(&d);
            "the converted inventory is not valid (a bug: please report it)".to_string()
        },
    )?;
    for w in &converted.warnings {
        render::warning(&format!("{}: {w}", file.display()));
    }
    match output {
        None => print!("{}", converted.toml),
        Some(out) => {
            if out.exists() && !force {
                return Err(format!(
                    "`{}` exists: give --force to replace it",
                    out.display()
                ));
            }
            std::fs::write(out, &converted.toml)
                .map_err(|e| format!("cannot write `{}`: {e}", out.display()))?;
            eprintln!(
                "wrote {} ({} host(s))",
                out.display(),
                converted.toml.matches("[hosts.").count()
            );
        }
    }
    Ok(())
}
