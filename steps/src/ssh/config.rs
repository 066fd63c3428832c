//! OpenSSH client configuration (`~/.ssh/config`, `/etc/ssh/ssh_config`): what it says about
//! one host, for the settings an inventory leaves unset.
//!
//! Only what `ssh` itself would do with the keys runbook uses: the first value obtained for a
//! key wins (`IdentityFile` and `CertificateFile` accumulate), `Host` and `Match` blocks with
//! `!` negation, `Match host|originalhost|user|localuser|all`, `Include` (relative to
//! `~/.ssh` for user files and `/etc/ssh` for the system file, wildcards in the last path
//! component), `%` tokens and `~` in paths. Other keywords are skipped (`ssh` itself reports
//! unknown ones). The `ssh2-config` crate was considered but has no `Match` and keeps only
//! the first `IdentityFile`, so this small reader follows `readconf.c` instead; the tests
//! compare it with `ssh -G`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Include depth OpenSSH allows.
const MAX_INCLUDE_DEPTH: usize = 16;

/// One value and the `file:line` it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sourced<T> {
    pub value: T,
    pub origin: String,
}

impl<T> Sourced<T> {
    fn pair(self) -> (T, String) {
        (self.value, self.origin)
    }
}

fn sourced<T>(origin: &str, value: T) -> Sourced<T> {
    Sourced {
        value,
        origin: origin.to_string(),
    }
}

/// The settings ssh_config gives one host; `None` where no file sets the key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostConfig {
    pub host_name: Option<Sourced<String>>,
    pub user: Option<Sourced<String>>,
    pub port: Option<Sourced<u16>>,
    pub identity_files: Vec<Sourced<PathBuf>>,
    pub identities_only: Option<Sourced<bool>>,
    /// The raw `ProxyJump` value (`none`, or `[user@]host[:port]` hops, comma-separated).
    pub proxy_jump: Option<Sourced<String>>,
    pub user_known_hosts_file: Option<Sourced<Vec<PathBuf>>>,
    /// `yes`, `no`, `ask`, `accept-new` (as written, lower-cased; `on`/`off` normalised).
    pub strict_host_key_checking: Option<Sourced<String>>,
    pub certificate_files: Vec<Sourced<PathBuf>>,
    /// Seconds.
    pub connect_timeout: Option<Sourced<u64>>,
    /// Seconds; 0 turns keepalives off.
    pub server_alive_interval: Option<Sourced<u64>>,
    /// A `Match final` was seen: the files are read a second time with it matching.
    saw_final: bool,
    /// `Match` criteria runbook does not evaluate (`exec`, `canonical`, …): those blocks are
    /// taken as not matching.
    pub notes: Vec<String>,
}

/// A config file that cannot be used, with the place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub reason: String,
}

/// One parsed line of a config file.
#[derive(Debug, Clone)]
struct Line {
    no: usize,
    keyword: String,
    args: Vec<String>,
}

/// Reads and caches config files, and resolves hosts against them.
#[derive(Default)]
pub struct SshConfigReader {
    files: Mutex<HashMap<PathBuf, Option<Vec<Line>>>>,
    home: Option<PathBuf>,
}

/// Where a file's relative `Include`s are resolved.
#[derive(Clone, Copy)]
enum Scope {
    User,
    System,
}

/// What `Match` and `%` tokens are evaluated against.
struct Target<'a> {
    original: &'a str,
    /// Remote user given outside the config (the inventory's `user`), like `ssh -l`.
    given_user: Option<&'a str>,
    given_port: Option<u16>,
    final_pass: bool,
}

impl SshConfigReader {
    /// A reader resolving `~` and the user-file `Include`s against `$HOME`.
    pub fn new() -> Self {
        Self {
            files: Mutex::default(),
            home: std::env::var_os("HOME").map(PathBuf::from),
        }
    }

    /// The files OpenSSH reads when none is named: `~/.ssh/config` then `/etc/ssh/ssh_config`.
    pub fn default_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        if let Some(home) = &self.home {
            files.push(home.join(".ssh/config"));
        }
        files.push(PathBuf::from("/etc/ssh/ssh_config"));
        files
    }

    /// Resolves `host` (the name `ssh` would be given) through `files` in order; the first
    /// file counts as the user's, a file named `/etc/ssh/ssh_config` as the system's. A file
    /// that does not exist is skipped, like OpenSSH does.
    pub fn resolve(
        &self,
        files: &[PathBuf],
        host: &str,
        given_user: Option<&str>,
        given_port: Option<u16>,
    ) -> Result<HostConfig, ConfigError> {
        let mut target = Target {
            original: host,
            given_user,
            given_port,
            final_pass: false,
        };
        let mut out = HostConfig::default();
        for final_pass in [false, true] {
            if final_pass && !out.saw_final {
                break;
            }
            target.final_pass = final_pass;
            for file in files {
                let scope = if file == Path::new("/etc/ssh/ssh_config") {
                    Scope::System
                } else {
                    Scope::User
                };
                self.apply_file(file, scope, &target, &mut out, true, 0)?;
            }
        }
        out.notes.dedup();
        Ok(out)
    }

    fn lines(&self, path: &Path) -> Result<Option<Vec<Line>>, ConfigError> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cached) = files.get(path) {
            return Ok(cached.clone());
        }
        let parsed = match std::fs::read_to_string(path) {
            Ok(text) => Some(parse(path, &text)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(ConfigError {
                    file: path.display().to_string(),
                    line: 0,
                    reason: format!("cannot read: {e}"),
                })
            }
        };
        files.insert(path.to_path_buf(), parsed.clone());
        Ok(parsed)
    }

    fn apply_file(
        &self,
        path: &Path,
        scope: Scope,
        target: &Target<'_>,
        out: &mut HostConfig,
        mut active: bool,
        depth: usize,
    ) -> Result<(), ConfigError> {
        let Some(lines) = self.lines(path)? else {
            return Ok(());
        };
        let error = |line: &Line, reason: String| ConfigError {
            file: path.display().to_string(),
            line: line.no,
            reason,
        };
        for line in &lines {
            let origin = format!("{}:{}", path.display(), line.no);
            match line.keyword.as_str() {
                "host" => active = host_matches(&line.args, target.original),
                "match" => {
                    active = self
                        .match_matches(&line.args, target, out)
                        .map_err(|r| error(line, r))?;
                }
                "include" if active => {
                    if depth >= MAX_INCLUDE_DEPTH {
                        return Err(error(line, "Include nested too deeply".into()));
                    }
                    for arg in &line.args {
                        let expanded = self.tilde(arg);
                        let full = if Path::new(&expanded).is_absolute() {
                            PathBuf::from(expanded)
                        } else {
                            match scope {
                                Scope::User => self
                                    .home
                                    .clone()
                                    .unwrap_or_default()
                                    .join(".ssh")
                                    .join(expanded),
                                Scope::System => Path::new("/etc/ssh").join(expanded),
                            }
                        };
                        for file in expand_glob(&full) {
                            self.apply_file(&file, scope, target, out, true, depth + 1)?;
                        }
                    }
                }
                _ if !active => {}
                keyword => self
                    .set(keyword, &line.args, origin, target, out)
                    .map_err(|r| error(line, r))?,
            }
        }
        Ok(())
    }

    /// Records the line's value unless an earlier line already set the key.
    fn set(
        &self,
        keyword: &str,
        args: &[String],
        origin: String,
        target: &Target<'_>,
        out: &mut HostConfig,
    ) -> Result<(), String> {
        let first = || {
            args.first()
                .cloned()
                .ok_or_else(|| format!("`{keyword}` needs a value"))
        };
        let o = origin.as_str();
        let seconds = |v: String| -> Result<u64, String> {
            parse_seconds(&v).ok_or_else(|| format!("`{keyword} {v}`: expected a time in seconds"))
        };
        match keyword {
            "hostname" if out.host_name.is_none() => {
                let v = first()?;
                let v = v.replace("%h", target.original).replace("%%", "%");
                out.host_name = Some(sourced(o, v));
            }
            "user" if out.user.is_none() => out.user = Some(sourced(o, first()?)),
            "port" if out.port.is_none() => {
                let v = first()?;
                let port = v
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("`Port {v}`: expected 1 to 65535"))?;
                out.port = Some(sourced(o, port));
            }
            "identityfile" => {
                let v = first()?;
                let path = self.expand_path(&v, target, out);
                if !out.identity_files.iter().any(|s| s.value == path) {
                    out.identity_files.push(sourced(o, path));
                }
            }
            "certificatefile" => {
                let v = first()?;
                let path = self.expand_path(&v, target, out);
                if !out.certificate_files.iter().any(|s| s.value == path) {
                    out.certificate_files.push(sourced(o, path));
                }
            }
            "identitiesonly" if out.identities_only.is_none() => {
                out.identities_only = Some(sourced(o, yes_no(&first()?)?));
            }
            "proxyjump" if out.proxy_jump.is_none() => out.proxy_jump = Some(sourced(o, first()?)),
            "userknownhostsfile" if out.user_known_hosts_file.is_none() => {
                if args.is_empty() {
                    return Err("`UserKnownHostsFile` needs a value".into());
                }
                let files = args
                    .iter()
                    .map(|a| self.expand_path(a, target, out))
                    .collect();
                out.user_known_hosts_file = Some(sourced(o, files));
            }
            "stricthostkeychecking" if out.strict_host_key_checking.is_none() => {
                let v = first()?.to_ascii_lowercase();
                let v = match v.as_str() {
                    "yes" | "true" | "on" => "yes",
                    "no" | "false" | "off" => "no",
                    "ask" => "ask",
                    "accept-new" => "accept-new",
                    other => {
                        return Err(format!(
                            "`StrictHostKeyChecking {other}`: expected yes, no, ask or accept-new"
                        ))
                    }
                };
                out.strict_host_key_checking = Some(sourced(o, v.to_string()));
            }
            "connecttimeout" if out.connect_timeout.is_none() => {
                let v = first()?;
                if v != "none" {
                    out.connect_timeout = Some(sourced(o, seconds(v)?));
                }
            }
            "serveraliveinterval" if out.server_alive_interval.is_none() => {
                out.server_alive_interval = Some(sourced(o, seconds(first()?)?));
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether a `Match` line applies. Criteria runbook cannot evaluate make it not apply
    /// (noted in `out.notes`).
    fn match_matches(
        &self,
        args: &[String],
        target: &Target<'_>,
        out: &mut HostConfig,
    ) -> Result<bool, String> {
        let mut result = true;
        let mut i = 0;
        if args.is_empty() {
            return Err("`Match` needs criteria".into());
        }
        while i < args.len() {
            let raw = args[i].to_ascii_lowercase();
            let (negate, criterion) = match raw.strip_prefix('!') {
                Some(c) => (true, c.to_string()),
                None => (false, raw.clone()),
            };
            i += 1;
            // Hostnames are never canonicalised; `final` blocks match in a second pass, as
            // OpenSSH makes one when the config has any (RHEL's ssh_config.d does).
            match criterion.as_str() {
                "all" => {
                    result &= !negate;
                    continue;
                }
                "final" => {
                    out.saw_final = true;
                    result &= target.final_pass != negate;
                    continue;
                }
                "canonical" => {
                    result &= negate;
                    continue;
                }
                _ => {}
            }
            let Some(value) = args.get(i) else {
                return Err(format!("`Match {criterion}` needs an argument"));
            };
            i += 1;
            let hit = match criterion.as_str() {
                "host" => {
                    let current = out
                        .host_name
                        .as_ref()
                        .map_or(target.original, |h| h.value.as_str());
                    pattern_list_matches(value, current)
                }
                "originalhost" => pattern_list_matches(value, target.original),
                "user" => pattern_list_matches(value, &self.remote_user(target, out)),
                "localuser" => pattern_list_matches(value, &local_user()),
                other => {
                    out.notes.push(format!(
                        "`Match {other}` is not evaluated by runbook; that block is ignored"
                    ));
                    return Ok(false);
                }
            };
            result &= hit != negate;
        }
        Ok(result)
    }

    fn remote_user(&self, target: &Target<'_>, out: &HostConfig) -> String {
        target
            .given_user
            .map(str::to_owned)
            .or_else(|| out.user.as_ref().map(|u| u.value.clone()))
            .unwrap_or_else(local_user)
    }

    fn tilde(&self, path: &str) -> String {
        match (path.strip_prefix("~/"), &self.home) {
            (Some(rest), Some(home)) => home.join(rest).display().to_string(),
            _ if path == "~" => self
                .home
                .as_ref()
                .map_or_else(|| path.to_string(), |h| h.display().to_string()),
            _ => path.to_string(),
        }
    }

    /// `~`, `${VAR}` and the `%` tokens of path keywords.
    fn expand_path(&self, raw: &str, target: &Target<'_>, out: &HostConfig) -> PathBuf {
        let host = out
            .host_name
            .as_ref()
            .map_or(target.original, |h| h.value.as_str());
        let port = target
            .given_port
            .or(out.port.as_ref().map(|p| p.value))
            .unwrap_or(22);
        let home = self
            .home
            .as_ref()
            .map(|h| h.display().to_string())
            .unwrap_or_default();
        let mut s = String::new();
        let mut chars = raw.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '%' => match chars.next() {
                    Some('%') => s.push('%'),
                    Some('h') => s.push_str(host),
                    Some('n') => s.push_str(target.original),
                    Some('p') => s.push_str(&port.to_string()),
                    Some('r') => s.push_str(&self.remote_user(target, out)),
                    Some('u') => s.push_str(&local_user()),
                    Some('i') => s.push_str(&uid()),
                    Some('d') => s.push_str(&home),
                    Some('l') | Some('L') => s.push_str(&local_host()),
                    Some(other) => {
                        s.push('%');
                        s.push(other);
                    }
                    None => s.push('%'),
                },
                '$' if chars.peek() == Some(&'{') => {
                    chars.next();
                    let name: String = chars.by_ref().take_while(|c| *c != '}').collect();
                    s.push_str(&std::env::var(&name).unwrap_or_default());
                }
                c => s.push(c),
            }
        }
        PathBuf::from(self.tilde(&s))
    }
}

/// The lookup [`Inventory::use_ssh_config`](runbook_engine::inventory::Inventory::use_ssh_config)
/// takes: resolves hosts through ssh_config files, caching each file once read.
pub fn inventory_lookup() -> std::sync::Arc<runbook_engine::inventory::SshConfigLookup> {
    let reader = SshConfigReader::new();
    std::sync::Arc::new(
        move |files: &[PathBuf], host: &str, user: Option<&str>, port: Option<u16>| {
            let c = reader
                .resolve(files, host, user, port)
                .map_err(|e| e.to_string())?;
            for note in &c.notes {
                tracing::warn!(host, "{note}");
            }
            Ok(c.into_settings())
        },
    )
}

impl HostConfig {
    /// In the inventory's terms.
    pub fn into_settings(self) -> runbook_engine::inventory::SshConfigSettings {
        use std::time::Duration;
        let list = |v: Vec<Sourced<PathBuf>>| {
            let origin = v.first().map(|s| s.origin.clone())?;
            Some((v.into_iter().map(|s| s.value).collect(), origin))
        };
        runbook_engine::inventory::SshConfigSettings {
            address: self.host_name.map(Sourced::pair),
            user: self.user.map(Sourced::pair),
            port: self.port.map(Sourced::pair),
            identity_files: list(self.identity_files),
            identities_only: self.identities_only.map(Sourced::pair),
            proxy_jump: self.proxy_jump.map(Sourced::pair),
            // Runbook checks one file; OpenSSH also appends new keys to the first.
            // `/dev/null` (with `StrictHostKeyChecking no`, the usual "trust anything") would
            // make `accept-new` accept every key: ignored, the inventory's default stays.
            known_hosts: self.user_known_hosts_file.and_then(|s| {
                let first = s.value.first().cloned()?;
                if first == Path::new("/dev/null") {
                    tracing::warn!(
                        origin = %s.origin,
                        "`UserKnownHostsFile /dev/null` is ignored: runbook always checks host keys"
                    );
                    return None;
                }
                Some((first, s.origin))
            }),
            host_key_check: self.strict_host_key_checking.map(Sourced::pair),
            certificate_files: list(self.certificate_files),
            connect_timeout: self
                .connect_timeout
                .map(|s| (Duration::from_secs(s.value), s.origin)),
            keepalive: self.server_alive_interval.map(|s| {
                (
                    (s.value > 0).then(|| Duration::from_secs(s.value)),
                    s.origin,
                )
            }),
        }
    }
}

fn parse(path: &Path, text: &str) -> Result<Vec<Line>, ConfigError> {
    let mut lines = Vec::new();
    for (idx, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let words = split_words(trimmed).map_err(|reason| ConfigError {
            file: path.display().to_string(),
            line: idx + 1,
            reason,
        })?;
        let mut words = words.into_iter();
        let Some(first) = words.next() else { continue };
        // `Keyword=value` and `Keyword = value` are the same as `Keyword value`.
        let (keyword, mut args): (String, Vec<String>) = match first.split_once('=') {
            Some((k, v)) => (
                k.to_string(),
                (!v.is_empty()).then(|| v.to_string()).into_iter().collect(),
            ),
            None => (first, Vec::new()),
        };
        for w in words {
            if args.is_empty() && w == "=" {
                continue;
            }
            match w.strip_prefix('=') {
                Some(rest) if args.is_empty() && !rest.is_empty() => args.push(rest.to_string()),
                _ => args.push(w),
            }
        }
        lines.push(Line {
            no: idx + 1,
            keyword: keyword.to_ascii_lowercase(),
            args,
        });
    }
    Ok(lines)
}

/// Whitespace-separated words; double quotes group (and are removed).
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '#' if !quoted && !in_word => break,
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

fn yes_no(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "yes" | "true" | "on" => Ok(true),
        "no" | "false" | "off" => Ok(false),
        other => Err(format!("expected yes or no, got `{other}`")),
    }
}

/// `30`, `30s`, `5m`, `1h30m` (OpenSSH time format).
fn parse_seconds(v: &str) -> Option<u64> {
    if let Ok(n) = v.parse::<u64>() {
        return Some(n);
    }
    let mut total = 0u64;
    let mut digits = String::new();
    for c in v.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let n: u64 = digits.parse().ok()?;
        digits.clear();
        let unit = match c.to_ascii_lowercase() {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
    }
    if !digits.is_empty() {
        total = total.checked_add(digits.parse().ok()?)?;
    }
    Some(total)
}

/// `Host` patterns: any positive pattern matches and no negated one does.
fn host_matches(patterns: &[String], host: &str) -> bool {
    let mut matched = false;
    for p in patterns {
        if let Some(neg) = p.strip_prefix('!') {
            if super::known_hosts::glob(neg.as_bytes(), host.as_bytes()) {
                return false;
            }
        } else if super::known_hosts::glob(p.as_bytes(), host.as_bytes()) {
            matched = true;
        }
    }
    matched
}

/// A comma-separated pattern list, as `Match host a,!b` takes.
fn pattern_list_matches(list: &str, value: &str) -> bool {
    let patterns: Vec<String> = list.split(',').map(str::to_owned).collect();
    host_matches(&patterns, value)
}

/// `dir/*.conf`: wildcards in the last component only; sorted like glob(3).
fn expand_glob(path: &Path) -> Vec<PathBuf> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains(['*', '?']) {
        return vec![path.to_path_buf()];
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    !n.starts_with('.') && super::known_hosts::glob(name.as_bytes(), n.as_bytes())
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

fn local_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".into())
}

fn uid() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        })
        .unwrap_or_default()
}

fn local_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_equals() {
        assert_eq!(
            split_words(r#"IdentityFile "a b" c"#).expect("words"),
            vec!["IdentityFile", "a b", "c"]
        );
        let lines =
            parse(Path::new("x"), "Port=2222\nUser = bob\nHostName  h # c\n").expect("parse");
        assert_eq!(lines[0].keyword, "port");
        assert_eq!(lines[0].args, vec!["2222"]);
        assert_eq!(lines[1].args, vec!["bob"]);
        assert_eq!(lines[2].args, vec!["h"]);
    }

    #[test]
    fn times() {
        assert_eq!(parse_seconds("30"), Some(30));
        assert_eq!(parse_seconds("1m30s"), Some(90));
        assert_eq!(parse_seconds("x"), None);
    }
}
