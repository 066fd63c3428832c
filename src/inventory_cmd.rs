//! `runbook inventory show|export`: an inventory as people and other tools read it.

use std::path::Path;

use runbook_engine::inventory::{AnsibleFormat, HostKeyPolicy, Inventory, Selector};

use crate::cli::{exit, ExportFormat, InventoryCommand};
use crate::render;

pub fn run(command: &InventoryCommand) -> i32 {
    let (file, result) = match command {
        InventoryCommand::Show { file, select } => (file, show(file, select.as_deref())),
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
            crate::commands::print_diagnostics_pub(&d);
            String::new()
        })?;
        return match crate::commands::load_inventory(&runbook, None, false) {
            Ok(Some(inv)) => Ok(inv),
            Ok(None) => Err("the runbook names no inventory (`[runbook] inventory`)".into()),
            Err(_) => Err(String::new()),
        };
    }
    Inventory::parse(&source).map_err(|d| {
        crate::commands::print_diagnostics_pub(&d);
        String::new()
    })
}

fn show(file: &Path, select: Option<&str>) -> Result<(), String> {
    let inv = open(file)?;
    let hosts = match select {
        Some(s) => {
            let sel = Selector::parse(s)?;
            inv.select(&sel)?
        }
        None => inv.hosts().to_vec(),
    };
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
