//! Checks a runbook's `on` selectors against the inventory it will run with (unknown hosts
//! and groups, indexes out of range, steps on hosts with no inventory, missing key files).

use crate::diagnostic::{Code, Diagnostic, Diagnostics};
use crate::inventory::Inventory;
use crate::runbook::Runbook;

/// Checks that every `on` selector names hosts or groups the inventory has. A runbook that
/// adds hosts at run time (`inventory.add_host`) is only checked for selectors that parse:
/// its groups may not exist yet. Without an inventory, steps with `on` are reported as
/// `missing` says (an error when running, a warning for `runbook check`).
pub fn check_targets(
    runbook: &Runbook,
    inventory: Option<&Inventory>,
    missing_is_error: bool,
) -> Diagnostics {
    let mut diags = Diagnostics::default();
    let adds_hosts = super::runbook_calls(runbook, "add_host");
    for step in &runbook.steps {
        let Some((selector, span)) = &step.on else {
            continue;
        };
        let Some(inv) = inventory else {
            if adds_hosts {
                continue;
            }
            let message = format!(
                "step `{}` runs on hosts (`on = \"{selector}\"`) but there is no inventory",
                step.id
            );
            let d = if missing_is_error {
                Diagnostic::error(Code::UnknownTarget, message)
            } else {
                Diagnostic::warning(Code::UnknownTarget, message)
            };
            diags.push(
                d.at(&runbook.source, span.clone(), "no inventory to pick hosts from")
                    .help("name one with `[runbook] inventory = \"inventory.toml\"` or `--inventory FILE`"),
            );
            continue;
        };
        if adds_hosts {
            continue;
        }
        let unknown = selector
            .names()
            .any(|name| name != "all" && inv.host(name).is_none() && inv.group(name).is_none());
        if !unknown {
            if let Err(e) = inv.select(selector) {
                diags.push(Diagnostic::error(Code::UnknownTarget, e).at(
                    &runbook.source,
                    span.clone(),
                    "selects a host that does not exist",
                ));
            }
        }
        for name in selector.names() {
            if name == "all" || inv.host(name).is_some() || inv.group(name).is_some() {
                continue;
            }
            let names: Vec<String> = inv
                .hosts()
                .iter()
                .map(|h| h.name.clone())
                .chain(inv.group_names())
                .collect();
            let mut d = Diagnostic::error(
                Code::UnknownTarget,
                format!(
                    "`on` names `{name}`, which is neither a host nor a group of the inventory"
                ),
            )
            .at(&runbook.source, span.clone(), "unknown host or group");
            if let Some(s) = crate::diagnostic::suggest(name, names.iter().map(String::as_str)) {
                d = d.help(format!("did you mean `{s}`?"));
            } else if let Some(src) = &inv.source {
                d = d.note(format!(
                    "`{}` has groups: {}",
                    src.path().display(),
                    inv.group_names().join(", ")
                ));
            }
            diags.push(d);
        }
    }
    // A key file that is not there fails every connection to the host; worth saying before
    // the run (it may exist only on the machine that runs, hence a warning).
    if let Some(inv) = inventory {
        let used = runbook.steps.iter().any(|s| s.on.is_some());
        for h in inv.hosts().iter().filter(|_| used) {
            let missing: Vec<String> = h
                .identity_files
                .iter()
                .filter(|p| !p.exists())
                .map(|p| format!("`{}`", p.display()))
                .collect();
            if !missing.is_empty() {
                let place = inv
                    .source
                    .as_ref()
                    .map(|s| format!(" in `{}`", s.path().display()))
                    .unwrap_or_default();
                diags.push(Diagnostic::warning(
                    Code::Inventory,
                    format!(
                        "host `{}`{place}: identity file {} does not exist here",
                        h.name,
                        missing.join(", ")
                    ),
                ));
            }
        }
    }
    diags
}
