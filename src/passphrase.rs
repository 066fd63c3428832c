//! Passphrases of encrypted SSH key files, asked at the terminal before a run starts — once per
//! key file, like `ssh-add` — when no `passphrase_env` variable provides them. Without a
//! terminal (Jenkins) nothing is asked, and connecting fails with a `key` error that says how
//! to provide one.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;

use runbook_engine::plan::Plan;

/// Attempts at a passphrase before giving up on a key file.
const TRIES: usize = 3;

/// The key files this run may need that are encrypted and have no passphrase from the
/// environment, in inventory order.
fn locked_keys(plan: &Plan) -> Vec<PathBuf> {
    if !plan.any_selected(|s| s.on.is_some()) {
        return Vec::new();
    }
    let inventory = plan.inventory();
    let mut keys: Vec<PathBuf> = Vec::new();
    for host in inventory.hosts() {
        let from_env = host
            .passphrase_env
            .as_deref()
            .is_some_and(|var| std::env::var_os(var).is_some());
        if from_env {
            continue;
        }
        for path in &host.identity_files {
            if !keys.contains(path) && runbook_steps::ssh::key_is_encrypted(path) {
                keys.push(path.clone());
            }
        }
    }
    keys
}

/// Asks for the passphrase of every locked key file, checking each; `Err(message)` when the
/// operator could not give a working one (nothing has run yet).
pub fn ask(plan: &Plan) -> Result<HashMap<PathBuf, String>, String> {
    let mut given = HashMap::new();
    let keys = locked_keys(plan);
    if keys.is_empty() || !std::io::stdin().is_terminal() {
        return Ok(given);
    }
    for path in keys {
        let mut opened = false;
        for _ in 0..TRIES {
            let prompt = format!("Enter passphrase for key {}: ", path.display());
            let passphrase = rpassword::prompt_password(prompt)
                .map_err(|e| format!("cannot read a passphrase for {}: {e}", path.display()))?;
            if runbook_steps::ssh::passphrase_opens(&path, &passphrase) {
                given.insert(path.clone(), passphrase);
                opened = true;
                break;
            }
            eprintln!("Bad passphrase, try again.");
        }
        if !opened {
            return Err(format!(
                "no working passphrase for {} after {TRIES} tries; nothing was run",
                path.display()
            ));
        }
    }
    Ok(given)
}
