//! Loading the inventory a command uses: `--inventory` or the runbook's own, TOML or Ansible,
//! completed from ssh_config, with every `on` selector checked against it. Shared by `run`,
//! `plan`, `check`, `resume` and `runbook inventory`.

use std::path::Path;

use runbook_engine::diagnostic::Code;
use runbook_engine::inventory::Inventory;
use runbook_engine::Diagnostics;

use crate::exit;
use crate::render::{self, print_diagnostics, print_load_error};

/// The inventory a run uses: `--inventory`, else the runbook's `[runbook] inventory`
/// (relative to the runbook). Every `on` selector is checked against it; without one,
/// steps with `on` are errors when `required` (run, plan) and warnings otherwise (check).
pub(crate) fn load_inventory(
    runbook: &runbook_engine::Runbook,
    explicit: Option<&Path>,
    required: bool,
) -> Result<Option<Inventory>, i32> {
    let (path, named_at) = match (explicit, &runbook.meta.inventory) {
        (Some(p), _) => (Some(p.to_path_buf()), None),
        (None, Some((rel, span))) => (Some(runbook.base_dir().join(rel)), Some(span.clone())),
        (None, None) => (None, None),
    };
    let inventory = match path {
        None => None,
        Some(path) => {
            let source = runbook_engine::load_source(&path).map_err(|e| {
                match &named_at {
                    // The runbook names the file: point at where, as for any runbook error.
                    Some(span) => print_diagnostics(&Diagnostics(vec![
                        runbook_engine::diagnostic::Diagnostic::error(
                            Code::Unreadable,
                            format!("cannot read the inventory: {e}"),
                        )
                        .at(&runbook.source, span.clone(), "the inventory named here")
                        .help("paths are relative to the runbook's directory; --inventory FILE overrides"),
                    ])),
                    None => print_load_error(&path, &e),
                }
                exit::USAGE
            })?;
            // An Ansible inventory (INI/YAML) is read as such; see docs/inventory.md.
            let parsed: Result<Result<Inventory, String>, Diagnostics> =
                if crate::ansible_inventory::is_ansible(&path, source.text()) {
                    Ok(crate::ansible_inventory::load(&source))
                } else {
                    Inventory::parse(&source).map(Ok)
                };
            match parsed.map(|r| r.and_then(with_ssh_config)) {
                Ok(Ok(inv)) => Some(inv),
                Ok(Err(message)) => {
                    render::error(&format!("inventory `{}`: {message}", path.display()));
                    return Err(exit::USAGE);
                }
                Err(diags) => {
                    print_diagnostics(&diags);
                    render::error(&format!(
                        "inventory `{}` has {} error(s); nothing was run",
                        path.display(),
                        diags.error_count()
                    ));
                    return Err(exit::USAGE);
                }
            }
        }
    };
    let diags = runbook_engine::analyzer::check_targets(runbook, inventory.as_ref(), required);
    print_diagnostics(&diags);
    if diags.has_errors() {
        render::error(&format!(
            "`{}`: {} step(s) cannot find their hosts; nothing was run",
            runbook.source.path().display(),
            diags.error_count()
        ));
        return Err(exit::USAGE);
    }
    Ok(inventory)
}

/// The inventory with the settings it leaves unset filled from each host's OpenSSH client
/// config (`~/.ssh/config`, `/etc/ssh/ssh_config`, or its `ssh_config` key).
pub(crate) fn with_ssh_config(mut inv: Inventory) -> Result<Inventory, String> {
    inv.use_ssh_config(runbook_steps::ssh::config::inventory_lookup())?;
    Ok(inv)
}
