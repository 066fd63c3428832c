//! Inventories: the hosts a runbook's remote steps run on, their groups and connection
//! settings, and the `on = "…"` selectors that pick hosts out of them.
//!
//! An inventory is read from TOML (`runbook/inventory.toml`, `--inventory`) and may grow while a
//! run goes on (`inventory.add_host(…)` from Rhai, e.g. from `terraform output -json`). Hosts
//! keep the order they were declared in: selectors such as `servers[0]` depend on it. The
//! export for Ansible is in [`ansible`].

mod ansible;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::diagnostic::{Code, Diagnostic, Diagnostics};
use crate::model::StepId;
pub use crate::model::{Pattern, Selector, Slice, Term, TermOp};
use crate::source::Source;
pub use ansible::AnsibleFormat;

/// How an unknown or changed host key is treated. There is deliberately no "accept anything".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostKeyPolicy {
    /// The key must already be in `known_hosts`.
    #[default]
    Strict,
    /// Trust on first use: an unknown key is added (and recorded in evidence); a changed one is
    /// still refused.
    AcceptNew,
}

/// One host, with every connection setting resolved (defaults applied, paths absolute).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Host {
    pub name: String,
    pub address: String,
    pub port: u16,
    pub user: String,
    pub identity_files: Vec<PathBuf>,
    /// Environment variable holding the identity file's passphrase.
    pub passphrase_env: Option<String>,
    pub use_agent: bool,
    pub known_hosts: PathBuf,
    pub host_key_check: HostKeyPolicy,
    /// Another host of the inventory to connect through (a bastion).
    pub proxy_jump: Option<String>,
    #[serde(serialize_with = "crate::serde_duration::serialize")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "crate::serde_duration::serialize_opt")]
    pub keepalive: Option<Duration>,
    pub groups: Vec<String>,
    pub vars: serde_json::Map<String, serde_json::Value>,
    /// User certificates offered with the keys (`CertificateFile`); `<key>-cert.pub` beside a
    /// key is found by the transport itself.
    #[serde(skip)]
    pub certificate_files: Vec<PathBuf>,
    /// OpenSSH client config files consulted for the settings left unset (empty: none).
    #[serde(skip)]
    pub ssh_config: Vec<PathBuf>,
    /// SSH handshakes in flight at once to this host's address and port (hosts behind one
    /// address share them); default 8, under sshd's `MaxStartups` start value of 10.
    #[serde(skip)]
    pub handshake_limit: usize,
    /// `sudo -u` for steps with `sudo = true`; None: root.
    #[serde(skip)]
    pub become_user: Option<String>,
    /// Environment variable holding the sudo password (Ansible's become password).
    #[serde(skip)]
    pub become_password_env: Option<String>,
    /// `become_method = "direct"`: the command is sudo's own argument (no `sh -c` wrapper),
    /// so command-restricted sudoers rules match.
    #[serde(skip)]
    pub become_direct: bool,
    /// Where each connection setting came from: `inventory`, `inventory [defaults]`,
    /// `default`, or the ssh_config `file:line`.
    #[serde(skip)]
    pub sources: std::collections::BTreeMap<String, String>,
}

/// Settings an OpenSSH client config gives a host, each with the `file:line` it came from.
/// The caller reads the files (the engine does no I/O); see [`Inventory::use_ssh_config`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SshConfigSettings {
    pub address: Option<(String, String)>,
    pub user: Option<(String, String)>,
    pub port: Option<(u16, String)>,
    pub identity_files: Option<(Vec<PathBuf>, String)>,
    /// `IdentitiesOnly yes`: agent keys are not offered unless the inventory asks for them.
    pub identities_only: Option<(bool, String)>,
    /// `none`, or `[user@]host[:port]` hops, comma-separated, outermost first.
    pub proxy_jump: Option<(String, String)>,
    pub known_hosts: Option<(PathBuf, String)>,
    /// `yes`, `ask`, `no` or `accept-new`.
    pub host_key_check: Option<(String, String)>,
    pub certificate_files: Option<(Vec<PathBuf>, String)>,
    pub connect_timeout: Option<(Duration, String)>,
    /// `ServerAliveInterval`; `None` inside: 0, keepalives off.
    pub keepalive: Option<(Option<Duration>, String)>,
}

/// Looks a host up in ssh_config files: `(files, name, user given, port given)`.
pub type SshConfigLookup = dyn Fn(&[PathBuf], &str, Option<&str>, Option<u16>) -> Result<SshConfigSettings, String>
    + Send
    + Sync;

/// The lookup an inventory applies to hosts added later.
#[derive(Clone)]
struct LookupFn(Arc<SshConfigLookup>);

impl fmt::Debug for LookupFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SshConfigLookup")
    }
}

impl Host {
    /// What expressions see as `host`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "address": self.address,
            "port": self.port,
            "user": self.user,
            "groups": self.groups,
            "vars": self.vars,
        })
    }
}

/// The inventory of a run.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// The file it was read from, if any.
    pub source: Option<Arc<Source>>,
    hosts: Vec<Arc<Host>>,
    /// Groups declared with a `hosts` list, in declaration order, with their variables.
    groups: Vec<(String, Vec<String>)>,
    defaults: Settings,
    base_dir: PathBuf,
    /// Bastions named only by an ssh_config `ProxyJump`: reachable through `jump_chain`,
    /// never selected by `on`.
    bastions: Vec<Arc<Host>>,
    ssh_config: Option<LookupFn>,
}

/// `[defaults]` and the per-host connection settings share these keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    user: Option<String>,
    port: Option<u16>,
    identity_file: Option<OneOrMany>,
    passphrase_env: Option<String>,
    use_agent: Option<bool>,
    known_hosts: Option<String>,
    host_key_check: Option<String>,
    proxy_jump: Option<String>,
    connect_timeout: Option<String>,
    keepalive: Option<String>,
    certificate_file: Option<OneOrMany>,
    /// An OpenSSH client config to read instead of `~/.ssh/config` + `/etc/ssh/ssh_config`;
    /// `"none"` reads none.
    ssh_config: Option<String>,
    handshake_limit: Option<u16>,
    become_user: Option<String>,
    become_password_env: Option<String>,
    /// `wrapper` (default) or `direct`.
    become_method: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostFile {
    address: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    vars: serde_json::Map<String, serde_json::Value>,
    #[serde(flatten)]
    settings: Settings,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupFile {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    vars: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InventoryFile {
    #[serde(default)]
    defaults: Option<Settings>,
    #[serde(default)]
    hosts: toml::map::Map<String, toml::Value>,
    #[serde(default)]
    groups: toml::map::Map<String, toml::Value>,
}

/// A new host as `inventory.add_host(name, #{ … })` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewHost {
    pub name: String,
    /// The map given to `add_host`, as JSON.
    pub spec: serde_json::Value,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InventoryError {
    #[error("{0}")]
    Invalid(String),
}

/// Keys a host table takes, for messages.
const HOST_KEYS: &str = "address, groups, vars, user, port, identity_file, passphrase_env, use_agent, known_hosts, host_key_check, proxy_jump, connect_timeout, keepalive, certificate_file, ssh_config, handshake_limit, become_user, become_password_env, become_method";

impl Inventory {
    /// Reads an inventory file. Every problem found is reported, each with its position.
    pub fn parse(source: &Arc<Source>) -> Result<Inventory, Diagnostics> {
        let mut diags = Diagnostics::default();
        let text = source.text().trim_start_matches('\u{feff}');
        let shift = source.text().len() - text.len();
        let error =
            |diags: &mut Diagnostics, span: std::ops::Range<usize>, msg: String, label: &str| {
                let span = span.start + shift..span.end + shift;
                diags.push(Diagnostic::error(Code::Inventory, msg).at(source, span, label));
            };
        let file: InventoryFile = match toml::from_str(text) {
            Ok(f) => f,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let span = if span.is_empty() {
                    span.start..(span.start + 1).min(text.len())
                } else {
                    span
                };
                error(
                    &mut diags,
                    span,
                    format!("inventory: {}", e.message().trim()),
                    "here",
                );
                return Err(diags);
            }
        };
        let base_dir = match source.path().parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut inv = Inventory {
            source: Some(source.clone()),
            defaults: file.defaults.clone().unwrap_or_default(),
            base_dir,
            ..Inventory::default()
        };
        // Hosts and groups are read as plain TOML values first so that one bad table does not
        // hide the others; their spans come from a second, spanned parse.
        let spans = SpanIndex::new(text);
        for (name, value) in &file.hosts {
            let at = spans.key("hosts", name);
            if !StepId::is_valid(name) {
                error(
                    &mut diags,
                    at.clone(),
                    format!("host name `{}` is not valid", name.escape_debug()),
                    "use letters, digits, `-`, `_` and `.`: it names a directory in the evidence bundle",
                );
                continue;
            }
            let host: HostFile = match value.clone().try_into() {
                Ok(h) => h,
                Err(e) => {
                    let message = e.message().trim();
                    let (mut span, mut on_key) = spans.error_at("hosts", name, message);
                    // serde names the value, not the key (`invalid value: integer `70000`,
                    // expected u16`): find the key whose value alone fails the same way.
                    if !on_key {
                        if let Some(key) = culprit_key::<HostFile>(value) {
                            (span, on_key) = spans.error_at("hosts", name, &format!("`{key}`"));
                        }
                    }
                    let hint = unknown_field(message)
                        .and_then(|f| crate::diagnostic::suggest(f, HOST_KEYS.split(", ")))
                        .map(|s| format!("did you mean `{s}`? "))
                        .unwrap_or_default();
                    error(
                        &mut diags,
                        span,
                        format!("host `{name}`: {message} ({hint}a host takes: {HOST_KEYS})"),
                        if on_key { "here" } else { "in this host" },
                    );
                    continue;
                }
            };
            match inv.build_host(
                name,
                host.address.as_deref(),
                &host.settings,
                host.groups.clone(),
                host.vars,
            ) {
                Ok(h) => inv.hosts.push(Arc::new(h)),
                Err(InventoryError::Invalid(m)) => {
                    let (span, on_key) = spans.error_at("hosts", name, &m);
                    error(
                        &mut diags,
                        span,
                        format!("host `{name}`: {m}"),
                        if on_key { "here" } else { "in this host" },
                    );
                }
            }
        }
        for (name, value) in &file.groups {
            let at = spans.key("groups", name);
            let group: GroupFile = match value.clone().try_into() {
                Ok(g) => g,
                Err(e) => {
                    let message = e.message().trim();
                    let (span, on_key) = spans.error_at("groups", name, message);
                    error(
                        &mut diags,
                        span,
                        format!("group `{name}`: {message} (a group takes: hosts, vars)"),
                        if on_key { "here" } else { "in this group" },
                    );
                    continue;
                }
            };
            let mut members = Vec::new();
            for h in &group.hosts {
                if inv.host(h).is_none() {
                    let suggestion =
                        crate::diagnostic::suggest(h, inv.hosts.iter().map(|h| h.name.as_str()));
                    error(
                        &mut diags,
                        at.clone(),
                        format!(
                            "group `{name}` lists `{}`, which is not a host of this inventory{}",
                            h,
                            suggestion
                                .map(|s| format!(" (did you mean `{s}`?)"))
                                .unwrap_or_default()
                        ),
                        "in this group",
                    );
                    continue;
                }
                members.push(h.clone());
            }
            // Group variables apply to members unless the host sets the same variable.
            for m in &members {
                if let Some(pos) = inv.hosts.iter().position(|h| &h.name == m) {
                    let h = Arc::make_mut(&mut inv.hosts[pos]);
                    for (k, v) in &group.vars {
                        h.vars.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                    if !h.groups.contains(name) {
                        h.groups.push(name.clone());
                    }
                }
            }
            inv.groups.push((name.clone(), members));
        }
        for h in &inv.hosts {
            if let Some(jump) = &h.proxy_jump {
                if inv.host(jump).is_none() {
                    error(
                        &mut diags,
                        spans.key("hosts", &h.name),
                        format!(
                            "host `{}`: `proxy_jump = \"{jump}\"` is not a host of this inventory",
                            h.name
                        ),
                        "in this host",
                    );
                } else if jump == &h.name {
                    error(
                        &mut diags,
                        spans.key("hosts", &h.name),
                        format!("host `{}` jumps through itself", h.name),
                        "in this host",
                    );
                }
            }
        }
        for h in &inv.hosts {
            let mut chain = vec![h.name.as_str()];
            let mut at = h.as_ref();
            while let Some(next) = at.proxy_jump.as_deref().and_then(|j| inv.host(j)) {
                let looped = chain.contains(&next.name.as_str());
                chain.push(&next.name);
                if looped {
                    error(
                        &mut diags,
                        spans.error_at("hosts", &h.name, "`proxy_jump`").0,
                        format!(
                            "host `{}`: `proxy_jump` goes round in a loop: {}",
                            h.name,
                            chain.join(" → ")
                        ),
                        "in this host",
                    );
                    break;
                }
                at = next;
            }
        }
        if diags.has_errors() {
            diags.sort();
            return Err(diags);
        }
        Ok(inv)
    }

    /// An inventory with no hosts (runbooks with no remote steps, or hosts added at run time).
    pub fn empty(base_dir: &Path) -> Inventory {
        Inventory {
            base_dir: base_dir.to_path_buf(),
            ..Inventory::default()
        }
    }

    pub fn hosts(&self) -> &[Arc<Host>] {
        &self.hosts
    }

    pub fn host(&self, name: &str) -> Option<&Arc<Host>> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// Every group name, declared or mentioned by a host, in first-seen order.
    pub fn group_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.groups.iter().map(|(g, _)| g.clone()).collect();
        for h in &self.hosts {
            for g in &h.groups {
                if !names.contains(g) {
                    names.push(g.clone());
                }
            }
        }
        names
    }

    /// Hosts of a group, in inventory order.
    pub fn group(&self, name: &str) -> Option<Vec<Arc<Host>>> {
        let members: Vec<Arc<Host>> = self
            .hosts
            .iter()
            .filter(|h| h.groups.iter().any(|g| g == name))
            .cloned()
            .collect();
        (!members.is_empty() || self.groups.iter().any(|(g, _)| g == name)).then_some(members)
    }

    /// The bastions to reach `host` through, outermost first; a loop ends the chain.
    pub fn jump_chain(&self, host: &Host) -> Vec<Arc<Host>> {
        let mut chain: Vec<Arc<Host>> = Vec::new();
        let mut next = host.proxy_jump.clone();
        while let Some(name) = next {
            let Some(j) = self
                .host(&name)
                .or_else(|| self.bastions.iter().find(|b| b.name == name))
            else {
                break;
            };
            if j.name == host.name || chain.iter().any(|c| c.name == j.name) {
                break;
            }
            next = j.proxy_jump.clone();
            chain.insert(0, j.clone());
        }
        chain
    }

    /// Fills the connection settings each host leaves unset from its OpenSSH client config
    /// (`ssh_config`), through `lookup`, and keeps `lookup` for hosts added later. The
    /// inventory wins wherever both set a key. A `ProxyJump` naming no inventory host adds
    /// that bastion as a hidden host (only reachable as a jump, never selected).
    pub fn use_ssh_config(&mut self, lookup: Arc<SshConfigLookup>) -> Result<(), String> {
        self.ssh_config = Some(LookupFn(lookup));
        for i in 0..self.hosts.len() {
            let host = self.hosts[i].clone();
            let resolved = self.apply_ssh_config(&host, 0)?;
            self.hosts[i] = Arc::new(resolved);
        }
        Ok(())
    }

    /// The host with its ssh_config applied (unchanged without a lookup).
    fn apply_ssh_config(&mut self, host: &Host, depth: usize) -> Result<Host, String> {
        let Some(LookupFn(lookup)) = self.ssh_config.clone() else {
            return Ok(host.clone());
        };
        let mut h = host.clone();
        if h.ssh_config.is_empty() {
            return Ok(h);
        }
        let unset = |h: &Host, key: &str| h.sources.get(key).is_none_or(|s| s == "default");
        let given_user = (!unset(&h, "user")).then(|| h.user.clone());
        let given_port = (!unset(&h, "port")).then_some(h.port);
        let c = lookup(&h.ssh_config, &h.address, given_user.as_deref(), given_port)
            .map_err(|e| format!("host `{}`: ssh_config: {e}", h.name))?;
        let set = |h: &mut Host, key: &str, origin: &str| {
            h.sources.insert(key.into(), format!("ssh_config {origin}"));
        };
        if let Some((v, o)) = c.address.filter(|_| unset(&h, "address")) {
            h.address = v;
            set(&mut h, "address", &o);
        }
        if let Some((v, o)) = c.user.filter(|_| unset(&h, "user")) {
            h.user = v;
            set(&mut h, "user", &o);
        }
        if let Some((v, o)) = c.port.filter(|_| unset(&h, "port")) {
            h.port = v;
            set(&mut h, "port", &o);
        }
        if let Some((v, o)) = c.identity_files.filter(|_| unset(&h, "identity_file")) {
            h.identity_files = v;
            set(&mut h, "identity_file", &o);
        }
        if let Some((v, o)) = c
            .certificate_files
            .filter(|_| unset(&h, "certificate_file"))
        {
            h.certificate_files = v;
            set(&mut h, "certificate_file", &o);
        }
        if let Some((true, o)) = c.identities_only.filter(|_| unset(&h, "use_agent")) {
            h.use_agent = false;
            set(&mut h, "use_agent", &format!("{o} (IdentitiesOnly)"));
        }
        if let Some((v, o)) = c.known_hosts.filter(|_| unset(&h, "known_hosts")) {
            h.known_hosts = v;
            set(&mut h, "known_hosts", &o);
        }
        if let Some((v, o)) = c.host_key_check.filter(|_| unset(&h, "host_key_check")) {
            // `ask` cannot ask anyone; `no` would accept a changed key, which runbook never
            // does: the nearest safe policies.
            h.host_key_check = match v.as_str() {
                "accept-new" | "no" => HostKeyPolicy::AcceptNew,
                _ => HostKeyPolicy::Strict,
            };
            set(
                &mut h,
                "host_key_check",
                &format!("{o} (StrictHostKeyChecking {v})"),
            );
        }
        if let Some((v, o)) = c.connect_timeout.filter(|_| unset(&h, "connect_timeout")) {
            if !v.is_zero() {
                h.connect_timeout = v;
                set(&mut h, "connect_timeout", &o);
            }
        }
        if let Some((v, o)) = c.keepalive.filter(|_| unset(&h, "keepalive")) {
            h.keepalive = v;
            set(&mut h, "keepalive", &o);
        }
        if let Some((v, o)) = c.proxy_jump.filter(|_| unset(&h, "proxy_jump")) {
            h.proxy_jump = None;
            if !v.eq_ignore_ascii_case("none") {
                if depth > 8 {
                    return Err(format!(
                        "host `{}`: ssh_config `ProxyJump` chain is too long or loops ({o})",
                        h.name
                    ));
                }
                let mut previous: Option<String> = None;
                for hop in v.split(',') {
                    let name = self.jump_host(hop.trim(), previous.take(), &o, depth)?;
                    previous = Some(name);
                }
                h.proxy_jump = previous.filter(|j| j != &h.name);
            }
            set(&mut h, "proxy_jump", &o);
        }
        Ok(h)
    }

    /// The host name for one `ProxyJump` hop: an inventory host of that name, or a hidden
    /// bastion made from the hop and its own ssh_config.
    fn jump_host(
        &mut self,
        hop: &str,
        via: Option<String>,
        origin: &str,
        depth: usize,
    ) -> Result<String, String> {
        let hop = hop.strip_prefix("ssh://").unwrap_or(hop);
        let (user, rest) = match hop.rsplit_once('@') {
            Some((u, r)) => (Some(u.to_string()), r),
            None => (None, hop),
        };
        let (name, port) = match rest.rsplit_once(':') {
            Some((n, p)) if !n.contains(':') => (
                n.to_string(),
                Some(p.parse::<u16>().map_err(|_| {
                    format!("ssh_config {origin}: `ProxyJump {hop}`: bad port `{p}`")
                })?),
            ),
            _ => (rest.to_string(), None),
        };
        if self.host(&name).is_some() {
            return Ok(name);
        }
        if !StepId::is_valid(&name) {
            return Err(format!(
                "ssh_config {origin}: `ProxyJump` hop `{name}` cannot be a host name (letters, digits, `-`, `_`, `.`)"
            ));
        }
        if let Some(b) = self.bastions.iter().find(|b| b.name == name) {
            return Ok(b.name.clone());
        }
        let own = Settings {
            user,
            port,
            proxy_jump: Some(via.clone().unwrap_or_default()),
            ..Settings::default()
        };
        let mut bastion = self
            .build_host(&name, None, &own, Vec::new(), serde_json::Map::new())
            .map_err(|InventoryError::Invalid(m)| format!("ssh_config {origin}: {m}"))?;
        if via.is_none() {
            // A first hop is reached directly unless its own ssh_config says otherwise.
            bastion
                .sources
                .insert("proxy_jump".into(), "default".into());
        } else {
            bastion.proxy_jump = via;
            bastion
                .sources
                .insert("proxy_jump".into(), format!("ssh_config {origin}"));
        }
        let bastion = self.apply_ssh_config(&bastion, depth + 1)?;
        self.bastions.push(Arc::new(bastion));
        Ok(name)
    }

    /// Adds (or replaces) a host at run time, with the inventory's defaults applied.
    pub fn add_host(&mut self, new: &NewHost) -> Result<Arc<Host>, InventoryError> {
        if !StepId::is_valid(&new.name) {
            return Err(InventoryError::Invalid(format!(
                "host name `{}` is not valid: use letters, digits, `-`, `_` and `.`",
                new.name.escape_debug()
            )));
        }
        let spec = match &new.spec {
            serde_json::Value::Object(m) => m.clone(),
            serde_json::Value::String(address) => {
                let mut m = serde_json::Map::new();
                m.insert("address".into(), address.clone().into());
                m
            }
            other => {
                return Err(InventoryError::Invalid(format!(
                    "add_host(`{}`, …): expected a map like #{{ address: \"10.0.0.5\", groups: [\"workers\"] }}, got {other}",
                    new.name
                )))
            }
        };
        let toml_value = toml::Value::try_from(&spec)
            .map_err(|e| InventoryError::Invalid(format!("add_host(`{}`): {e}", new.name)))?;
        let host: HostFile = toml_value.try_into().map_err(|e: toml::de::Error| {
            InventoryError::Invalid(format!(
                "add_host(`{}`): {} (a host takes: {HOST_KEYS})",
                new.name,
                e.message().trim()
            ))
        })?;
        let groups = host.groups.clone();
        let built = self.build_host(
            &new.name,
            host.address.as_deref(),
            &host.settings,
            groups,
            host.vars,
        )?;
        let built = Arc::new(
            self.apply_ssh_config(&built, 0)
                .map_err(InventoryError::Invalid)?,
        );
        match self.hosts.iter().position(|h| h.name == new.name) {
            Some(i) => self.hosts[i] = built.clone(),
            None => self.hosts.push(built.clone()),
        }
        Ok(built)
    }

    fn build_host(
        &self,
        name: &str,
        address: Option<&str>,
        own: &Settings,
        groups: Vec<String>,
        vars: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Host, InventoryError> {
        let d = &self.defaults;
        let pick = |a: &Option<String>, b: &Option<String>| a.clone().or_else(|| b.clone());
        let duration = |key: &str,
                        own: &Option<String>,
                        def: &Option<String>|
         -> Result<Option<Duration>, InventoryError> {
            match pick(own, def) {
                None => Ok(None),
                Some(t) => crate::duration::parse_duration(&t)
                    .map(Some)
                    .map_err(|e| InventoryError::Invalid(format!("`{key}`: {e}"))),
            }
        };
        let host_key_check = match pick(&own.host_key_check, &d.host_key_check).as_deref() {
            None | Some("strict") | Some("yes") => HostKeyPolicy::Strict,
            Some("accept-new") => HostKeyPolicy::AcceptNew,
            Some(other) => {
                return Err(InventoryError::Invalid(format!(
                    "`host_key_check = \"{other}\"`: expected \"strict\" or \"accept-new\" (there is no setting that accepts any key)"
                )))
            }
        };
        let mut sources = std::collections::BTreeMap::new();
        let mut note = |key: &str, own_set: bool, default_set: bool, is_address: bool| {
            let origin = if own_set || is_address {
                "inventory"
            } else if default_set {
                "inventory [defaults]"
            } else {
                "default"
            };
            sources.insert(key.to_string(), origin.to_string());
        };
        note("address", false, false, address.is_some());
        note("user", own.user.is_some(), d.user.is_some(), false);
        note("port", own.port.is_some(), d.port.is_some(), false);
        note(
            "identity_file",
            own.identity_file.is_some(),
            d.identity_file.is_some(),
            false,
        );
        note(
            "use_agent",
            own.use_agent.is_some(),
            d.use_agent.is_some(),
            false,
        );
        note(
            "known_hosts",
            own.known_hosts.is_some(),
            d.known_hosts.is_some(),
            false,
        );
        note(
            "host_key_check",
            own.host_key_check.is_some(),
            d.host_key_check.is_some(),
            false,
        );
        note(
            "proxy_jump",
            own.proxy_jump.is_some(),
            d.proxy_jump.is_some(),
            false,
        );
        note(
            "connect_timeout",
            own.connect_timeout.is_some(),
            d.connect_timeout.is_some(),
            false,
        );
        note(
            "keepalive",
            own.keepalive.is_some(),
            d.keepalive.is_some(),
            false,
        );
        note(
            "certificate_file",
            own.certificate_file.is_some(),
            d.certificate_file.is_some(),
            false,
        );
        note(
            "ssh_config",
            own.ssh_config.is_some(),
            d.ssh_config.is_some(),
            false,
        );
        let certificate_files = match own
            .certificate_file
            .clone()
            .or_else(|| d.certificate_file.clone())
        {
            None => Vec::new(),
            Some(OneOrMany::One(p)) => vec![self.path(&p)],
            Some(OneOrMany::Many(ps)) => ps.iter().map(|p| self.path(p)).collect(),
        };
        let become_direct = match pick(&own.become_method, &d.become_method).as_deref() {
            None | Some("wrapper") => false,
            Some("direct") => true,
            Some(other) => {
                return Err(InventoryError::Invalid(format!(
                    "`become_method = \"{other}\"`: expected \"wrapper\" (sudo -- env … sh -c '…') or \"direct\" (sudo -- <command>)"
                )))
            }
        };
        if own.handshake_limit.or(d.handshake_limit) == Some(0) {
            return Err(InventoryError::Invalid(
                "`handshake_limit` must be at least 1".into(),
            ));
        }
        let ssh_config = match pick(&own.ssh_config, &d.ssh_config).as_deref() {
            None => vec![
                home().join(".ssh/config"),
                PathBuf::from("/etc/ssh/ssh_config"),
            ],
            Some("none") | Some("") => Vec::new(),
            Some(p) => vec![self.path(p)],
        };
        let identity_files = match own
            .identity_file
            .clone()
            .or_else(|| d.identity_file.clone())
        {
            None => Vec::new(),
            Some(OneOrMany::One(p)) => vec![self.path(&p)],
            Some(OneOrMany::Many(ps)) => ps.iter().map(|p| self.path(p)).collect(),
        };
        let port = own.port.or(d.port).unwrap_or(22);
        if port == 0 {
            return Err(InventoryError::Invalid(
                "`port` must be from 1 to 65535, not 0".into(),
            ));
        }
        if address.is_some_and(|a| a.trim().is_empty()) {
            return Err(InventoryError::Invalid(
                "`address` is empty: give an IP address or a DNS name (or leave it out to use the host's name)".into(),
            ));
        }
        let connect_timeout =
            duration("connect_timeout", &own.connect_timeout, &d.connect_timeout)?
                .unwrap_or(Duration::from_secs(10));
        if connect_timeout.is_zero() {
            return Err(InventoryError::Invalid(
                "`connect_timeout` must be more than zero".into(),
            ));
        }
        let known_hosts = pick(&own.known_hosts, &d.known_hosts)
            .map(|p| self.path(&p))
            .unwrap_or_else(|| home().join(".ssh/known_hosts"));
        Ok(Host {
            name: name.to_owned(),
            address: address.unwrap_or(name).to_owned(),
            port,
            user: pick(&own.user, &d.user).unwrap_or_else(current_user),
            identity_files,
            passphrase_env: pick(&own.passphrase_env, &d.passphrase_env),
            use_agent: own.use_agent.or(d.use_agent).unwrap_or(true),
            known_hosts,
            host_key_check,
            proxy_jump: own
                .proxy_jump
                .as_ref()
                .or(d.proxy_jump.as_ref())
                .cloned()
                .filter(|j| !j.is_empty() && j != name),
            connect_timeout,
            keepalive: duration("keepalive", &own.keepalive, &d.keepalive)?
                .or(Some(Duration::from_secs(30))),
            groups,
            vars,
            certificate_files,
            ssh_config,
            handshake_limit: usize::from(own.handshake_limit.or(d.handshake_limit).unwrap_or(8)),
            become_user: pick(&own.become_user, &d.become_user).filter(|u| !u.is_empty()),
            become_password_env: pick(&own.become_password_env, &d.become_password_env),
            become_direct,
            sources,
        })
    }

    /// `~/x` is the home directory's; other relative paths are the inventory file's.
    fn path(&self, p: &str) -> PathBuf {
        if let Some(rest) = p.strip_prefix("~/") {
            home().join(rest)
        } else {
            self.base_dir.join(p)
        }
    }

    /// Selects hosts (see [`Selector`]), in inventory order, each once.
    pub fn select(&self, selector: &Selector) -> Result<Vec<Arc<Host>>, String> {
        let mut chosen: Vec<Arc<Host>> = Vec::new();
        for term in &selector.terms {
            let hosts = self.resolve(&term.pattern)?;
            match term.op {
                TermOp::Union => {
                    for h in hosts {
                        if !chosen.iter().any(|c| c.name == h.name) {
                            chosen.push(h);
                        }
                    }
                }
                TermOp::Intersect => chosen.retain(|c| hosts.iter().any(|h| h.name == c.name)),
                TermOp::Exclude => chosen.retain(|c| !hosts.iter().any(|h| h.name == c.name)),
            }
        }
        let position = |h: &Arc<Host>| self.hosts.iter().position(|x| x.name == h.name);
        chosen.sort_by_key(position);
        Ok(chosen)
    }

    fn resolve(&self, pattern: &Pattern) -> Result<Vec<Arc<Host>>, String> {
        let base: Vec<Arc<Host>> = if pattern.name == "all" {
            self.hosts.clone()
        } else if let Some(members) = self.group(&pattern.name) {
            members
        } else if let Some(h) = self.host(&pattern.name) {
            vec![h.clone()]
        } else {
            let names = self
                .hosts
                .iter()
                .map(|h| h.name.clone())
                .chain(self.group_names())
                .collect::<Vec<_>>();
            let hint = crate::diagnostic::suggest(&pattern.name, names.iter().map(String::as_str))
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            return Err(format!(
                "`{}` is neither a host nor a group of the inventory{hint}",
                pattern.name
            ));
        };
        match &pattern.slice {
            None => Ok(base),
            Some(slice) => {
                apply_slice(*slice, &base).map_err(|e| format!("`{}`: {e}", pattern.text()))
            }
        }
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from)
}

fn current_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".into())
}

/// The first key of `table` whose value, alone, does not deserialize as `T`.
fn culprit_key<T: serde::de::DeserializeOwned>(table: &toml::Value) -> Option<String> {
    let toml::Value::Table(t) = table else {
        return None;
    };
    t.iter()
        .find(|(k, v)| {
            let mut one = toml::Table::new();
            one.insert((*k).clone(), (*v).clone());
            toml::Value::Table(one).try_into::<T>().is_err()
        })
        .map(|(k, _)| k.clone())
}

/// `prot` from serde's "unknown field `prot`, expected …".
fn unknown_field(message: &str) -> Option<&str> {
    message.strip_prefix("unknown field `")?.split('`').next()
}

/// Finds the spans of `[table.key]` / `table.key = …` definitions, and of the keys inside
/// them, for messages.
struct SpanIndex {
    spans: Vec<(String, String, std::ops::Range<usize>)>,
    /// `(table, name, key)` → the span of `key` inside `[table.name]`.
    keys: Vec<(String, String, String, std::ops::Range<usize>)>,
}

impl SpanIndex {
    fn new(text: &str) -> Self {
        let (mut spans, mut keys) = (Vec::new(), Vec::new());
        if let Ok(doc) = toml::de::DeTable::parse(text) {
            for (k, v) in doc.get_ref() {
                let toml::de::DeValue::Table(t) = v.get_ref() else {
                    continue;
                };
                for (k2, v2) in t {
                    let span = if k2.span().is_empty() {
                        v2.span()
                    } else {
                        k2.span()
                    };
                    spans.push((k.get_ref().to_string(), k2.get_ref().to_string(), span));
                    if let toml::de::DeValue::Table(inner) = v2.get_ref() {
                        for (k3, _) in inner {
                            keys.push((
                                k.get_ref().to_string(),
                                k2.get_ref().to_string(),
                                k3.get_ref().to_string(),
                                k3.span(),
                            ));
                        }
                    }
                }
            }
        }
        Self { spans, keys }
    }

    fn key(&self, table: &str, key: &str) -> std::ops::Range<usize> {
        self.spans
            .iter()
            .find(|(t, k, _)| t == table && k == key)
            .map_or(0..1, |(_, _, s)| s.clone())
    }

    /// Where a deserialization error of `[table.name]` is: the key its message names in
    /// backticks (`unknown field \`prot\``), else the table itself. The label says which.
    fn error_at(&self, table: &str, name: &str, message: &str) -> (std::ops::Range<usize>, bool) {
        let named = message.split('`').skip(1).step_by(2).find_map(|word| {
            self.keys
                .iter()
                .find(|(t, n, k, _)| t == table && n == name && k == word)
                .map(|(_, _, _, s)| s.clone())
        });
        match named {
            Some(span) if !span.is_empty() => (span, true),
            _ => (self.key(table, name), false),
        }
    }
}

/// The hosts the slice picks. An index past the end of a non-empty group is an error,
/// not an empty selection: `servers[5]` of 2 servers is a mistake, and skipping the step
/// would hide it. A range may be empty (`servers[1:]` of one server: no joiners).
fn apply_slice(slice: Slice, hosts: &[Arc<Host>]) -> Result<Vec<Arc<Host>>, String> {
    let n = hosts.len() as i64;
    let norm = |i: i64| if i < 0 { (n + i).max(0) } else { i.min(n) };
    Ok(match slice {
        Slice::Index(i) => {
            let at = if i < 0 { n + i } else { i };
            if (0..n).contains(&at) {
                vec![hosts[at as usize].clone()]
            } else if n == 0 {
                Vec::new()
            } else {
                return Err(format!(
                    "index {i} is out of range: it has {n} host(s), indexes 0 to {} (or -{n} to -1)",
                    n - 1
                ));
            }
        }
        Slice::Range(a, b) => {
            let a = norm(a.unwrap_or(0));
            let b = norm(b.unwrap_or(n));
            if a >= b {
                Vec::new()
            } else {
                hosts[a as usize..b as usize].to_vec()
            }
        }
    })
}

/// Reads the groups/hosts a runbook expects from a shared inventory; convenience for tests.
pub fn parse_str(path: &str, text: &str) -> Result<Inventory, Diagnostics> {
    Inventory::parse(&Source::new(path, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_host_values_are_named_at_their_key() {
        let bad = "[hosts.a]\naddress = \"127.0.0.1\"\nport = 70000\n[hosts.b]\naddress = \"\"\n\
                   [hosts.c]\naddress = \"x\"\nport = 0\n[hosts.d]\nconnect_timeout = \"0s\"\n\
                   [hosts.e]\nproxy_jump = \"f\"\n[hosts.f]\nproxy_jump = \"e\"\n";
        let diags = parse_str("inv.toml", bad).expect_err("invalid");
        let found: Vec<(String, usize)> = diags
            .0
            .iter()
            .map(|d| (d.message.clone(), d.location().map_or(0, |(_, lc)| lc.line)))
            .collect();
        let at = |needle: &str| {
            found
                .iter()
                .find(|(m, _)| m.contains(needle))
                .map(|(_, line)| *line)
                .unwrap_or_else(|| panic!("no `{needle}` in {found:?}"))
        };
        assert_eq!(at("host `a`: invalid value: integer `70000`"), 3);
        assert_eq!(at("host `b`: `address` is empty"), 5);
        assert_eq!(at("host `c`: `port` must be from 1 to 65535, not 0"), 8);
        assert_eq!(at("host `d`: `connect_timeout` must be more than zero"), 10);
        assert_eq!(
            at("host `e`: `proxy_jump` goes round in a loop: e → f → e"),
            12
        );
    }

    #[test]
    fn an_index_past_the_end_is_an_error_and_an_empty_range_is_not() {
        let inv = parse_str("lab.toml", LAB).expect("valid");
        let pick = |s: &str| inv.select(&Selector::parse(s).expect("parses"));
        let e = pick("servers[5]").expect_err("out of range");
        assert_eq!(
            e,
            "`servers[5]`: index 5 is out of range: it has 3 host(s), indexes 0 to 2 (or -3 to -1)"
        );
        assert!(pick("servers[-4]").is_err());
        assert_eq!(pick("servers[-3]").map(|h| h.len()), Ok(1));
        assert_eq!(pick("servers[3:]").map(|h| h.len()), Ok(0));
        for bad in ["servers[2:1]", "servers[0:0]", "servers[-1:-2]"] {
            assert!(
                Selector::parse(bad).is_err_and(|e| e.contains("selects nothing")),
                "{bad}"
            );
        }
        assert!(Selector::parse("servers[-2:1]").is_ok());
    }

    const LAB: &str = r#"
[defaults]
user = "rocky"
identity_file = "~/.ssh/id_ed25519"
host_key_check = "accept-new"

[hosts.cp-1]
address = "10.0.0.11"
groups = ["servers"]
[hosts.cp-2]
address = "10.0.0.12"
groups = ["servers"]
[hosts.cp-3]
address = "10.0.0.13"
groups = ["servers"]
[hosts.wk-1]
address = "10.0.0.21"
vars = { disk = "/dev/sdb" }
[hosts.bastion]
address = "192.0.2.1"

[groups.workers]
hosts = ["wk-1"]
vars = { role = "agent" }
"#;

    fn names(hosts: &[Arc<Host>]) -> Vec<&str> {
        hosts.iter().map(|h| h.name.as_str()).collect()
    }

    #[test]
    fn selectors_pick_hosts_in_inventory_order() {
        let inv = parse_str("lab.toml", LAB).expect("valid");
        let sel = |s: &str| {
            inv.select(&Selector::parse(s).expect("parses"))
                .expect("resolves")
        };
        assert_eq!(names(&sel("servers")), ["cp-1", "cp-2", "cp-3"]);
        assert_eq!(names(&sel("servers[0]")), ["cp-1"]);
        assert_eq!(names(&sel("servers[1:]")), ["cp-2", "cp-3"]);
        assert_eq!(names(&sel("servers[-1]")), ["cp-3"]);
        assert_eq!(names(&sel("servers[:2]")), ["cp-1", "cp-2"]);
        assert_eq!(
            names(&sel("all,!bastion,!servers[0]")),
            ["cp-2", "cp-3", "wk-1"]
        );
        assert_eq!(names(&sel("workers,cp-1")), ["cp-1", "wk-1"]);
        assert_eq!(names(&sel("all,&servers")), ["cp-1", "cp-2", "cp-3"]);
        let err = inv
            .select(&Selector::parse("server").expect("parses"))
            .expect_err("unknown");
        assert!(err.contains("did you mean `servers`"), "{err}");
        assert!(Selector::parse("!all").is_err());
        assert!(Selector::parse("servers[a]").is_err());
        assert!(Selector::parse("servers,").is_err());
    }

    #[test]
    fn defaults_and_group_vars_apply() {
        let inv = parse_str("lab.toml", LAB).expect("valid");
        let wk = inv.host("wk-1").expect("host");
        assert_eq!(wk.user, "rocky");
        assert_eq!(wk.port, 22);
        assert_eq!(wk.host_key_check, HostKeyPolicy::AcceptNew);
        assert_eq!(wk.vars["role"], "agent");
        assert_eq!(wk.vars["disk"], "/dev/sdb");
        assert_eq!(wk.groups, ["workers"]);
    }

    #[test]
    fn errors_name_the_place_and_the_expected_keys() {
        let bad = "[hosts.a]\nadress = \"x\"\n[groups.g]\nhosts = [\"b\"]\n[hosts.c]\naddress = \"y\"\nhost_key_check = \"no\"\n";
        let diags = parse_str("inv.toml", bad).expect_err("invalid");
        let text = format!("{diags:?}");
        assert!(text.contains("adress"), "{text}");
        assert!(text.contains("lists `b`"), "{text}");
        assert!(text.contains("accept-new"), "{text}");
    }

    #[test]
    fn hosts_added_at_run_time_take_the_defaults() {
        let mut inv = parse_str("lab.toml", LAB).expect("valid");
        let h = inv
            .add_host(&NewHost {
                name: "wk-2".into(),
                spec: serde_json::json!({"address": "10.0.0.22", "groups": ["workers"]}),
            })
            .expect("added");
        assert_eq!(h.user, "rocky");
        assert_eq!(
            names(&inv.group("workers").expect("group")),
            ["wk-1", "wk-2"]
        );
        assert!(inv
            .add_host(&NewHost {
                name: "x".into(),
                spec: serde_json::json!({"adress": "1"}),
            })
            .is_err());
    }

    #[test]
    fn ansible_export_lists_groups_and_connection_vars() {
        let inv = parse_str("lab.toml", LAB).expect("valid");
        let ini = inv.to_ansible(AnsibleFormat::Ini);
        assert!(
            ini.contains("cp-1 ansible_host=10.0.0.11 ansible_port=22 ansible_user=rocky"),
            "{ini}"
        );
        assert!(ini.contains("[servers]\ncp-1\ncp-2\ncp-3\n"), "{ini}");
        let yaml = inv.to_ansible(AnsibleFormat::Yaml);
        assert!(
            yaml.contains("\"servers\":\n      hosts:\n        \"cp-1\": {}"),
            "{yaml}"
        );
    }
}
