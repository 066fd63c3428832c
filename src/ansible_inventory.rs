//! Ansible inventories (INI and YAML) read the way `ansible-inventory --list` reads them, and
//! turned into a runbook inventory: `runbook inventory import FILE`, and runbooks or
//! `--inventory` naming an Ansible file directly.
//!
//! What a file means follows Ansible's `ini` and `yaml` inventory plugins: `[group]`,
//! `[group:vars]`, `[group:children]`, `host:port`, ranges (`web[01:10]`, `db-[a:c]`,
//! `[1:9:2]`), INI values as Python literals where they parse as one, and variable precedence
//! `all` < parent groups < child groups (by depth, then name) < host. Each host's vars are
//! written resolved (what `ansible-inventory --list` shows as its hostvars), with
//! `ansible_host`, `ansible_port`, `ansible_user`, `ansible_ssh_private_key_file` and
//! `ansible_become_user` turned into runbook's own keys; passwords are never copied.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{Map, Value};

/// One problem, with the line it is on (1-based; 0 when unknown).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ImportError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// An inventory as Ansible sees it.
#[derive(Debug, Default, Clone)]
pub struct AnsibleInventory {
    /// Hosts in first-seen order with their own vars.
    hosts: Vec<(String, Map<String, Value>)>,
    /// Group → (direct hosts, child groups, vars), in first-seen order.
    groups: Vec<(String, Group)>,
}

#[derive(Debug, Default, Clone)]
struct Group {
    hosts: Vec<String>,
    children: Vec<String>,
    vars: Map<String, Value>,
}

/// What the conversion had to leave out, for the operator.
#[derive(Debug, Default)]
pub struct Converted {
    pub toml: String,
    pub warnings: Vec<String>,
}

impl AnsibleInventory {
    /// Reads INI or YAML (decided by the content: YAML starts with a mapping key such as
    /// `all:`; INI with `[group]` or host lines).
    pub fn parse(path: &Path, text: &str) -> Result<AnsibleInventory, ImportError> {
        let looks_yaml = text
            .lines()
            .map(str::trim_end)
            .find(|l| {
                let t = l.trim_start();
                !t.is_empty() && !t.starts_with('#') && !t.starts_with(';') && t != "---"
            })
            .is_some_and(|l| l.ends_with(':') && !l.starts_with('['));
        let file = path.display().to_string();
        let mut inv = AnsibleInventory::default();
        inv.group_mut("all");
        inv.group_mut("ungrouped");
        if looks_yaml {
            inv.parse_yaml(&file, text)?;
        } else {
            inv.parse_ini(&file, text)?;
        }
        inv.finish();
        Ok(inv)
    }

    fn group_mut(&mut self, name: &str) -> &mut Group {
        let at = match self.groups.iter().position(|(g, _)| g == name) {
            Some(i) => i,
            None => {
                self.groups.push((name.to_string(), Group::default()));
                self.groups.len() - 1
            }
        };
        &mut self.groups[at].1
    }

    fn group(&self, name: &str) -> Option<&Group> {
        self.groups.iter().find(|(g, _)| g == name).map(|(_, g)| g)
    }

    fn add_host(&mut self, name: &str, vars: Map<String, Value>, group: &str) {
        match self.hosts.iter_mut().find(|(h, _)| h == name) {
            Some((_, own)) => own.extend(vars),
            None => self.hosts.push((name.to_string(), vars)),
        }
        let g = self.group_mut(group);
        if !g.hosts.iter().any(|h| h == name) {
            g.hosts.push(name.to_string());
        }
    }

    fn add_child(&mut self, parent: &str, child: &str) {
        self.group_mut(child);
        let g = self.group_mut(parent);
        if !g.children.iter().any(|c| c == child) {
            g.children.push(child.to_string());
        }
    }

    /// Every group but `all` is a child of `all` unless it has a parent; hosts in no group
    /// but `all` are `ungrouped`.
    fn finish(&mut self) {
        let names: Vec<String> = self.groups.iter().map(|(g, _)| g.clone()).collect();
        for name in &names {
            if name == "all" {
                continue;
            }
            let has_parent = self
                .groups
                .iter()
                .any(|(g, grp)| g != "all" && grp.children.contains(name));
            if !has_parent {
                self.add_child("all", name);
            }
        }
        let all_hosts = self
            .group("all")
            .map(|g| g.hosts.clone())
            .unwrap_or_default();
        for h in all_hosts {
            let elsewhere = self
                .groups
                .iter()
                .any(|(g, grp)| g != "all" && g != "ungrouped" && grp.hosts.contains(&h));
            if !elsewhere {
                let u = self.group_mut("ungrouped");
                if !u.hosts.contains(&h) {
                    u.hosts.push(h.clone());
                }
            }
        }
        if let Some(all) = self.groups.iter_mut().find(|(g, _)| g == "all") {
            all.1.hosts.clear();
        }
        let hosts: Vec<String> = self.hosts.iter().map(|(h, _)| h.clone()).collect();
        for h in hosts {
            let elsewhere = self
                .groups
                .iter()
                .any(|(g, grp)| g != "all" && g != "ungrouped" && grp.hosts.contains(&h));
            let ungrouped = self.group_mut("ungrouped");
            if elsewhere {
                // As Ansible reconciles: a host in a real group is not "ungrouped".
                ungrouped.hosts.retain(|x| x != &h);
            } else if !ungrouped.hosts.contains(&h) {
                ungrouped.hosts.push(h);
            }
        }
    }

    fn parse_ini(&mut self, file: &str, text: &str) -> Result<(), ImportError> {
        #[derive(PartialEq)]
        enum State {
            Hosts,
            Vars,
            Children,
        }
        let mut state = State::Hosts;
        let mut group = "ungrouped".to_string();
        // Groups with a section of their own, and children named before (Ansible refuses a
        // child group that no section defines).
        let mut defined: BTreeSet<String> = ["all", "ungrouped"].map(String::from).into();
        let mut named_children: Vec<(String, String, usize)> = Vec::new();
        for (idx, raw) in text.lines().enumerate() {
            let line_no = idx + 1;
            let err = |message: String| ImportError {
                file: file.to_string(),
                line: line_no,
                message,
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
                continue;
            }
            if let Some(header) = line.strip_prefix('[') {
                let Some(end) = header.find(']') else {
                    return Err(err(format!("`{line}`: a section header needs `]`")));
                };
                let rest = header[end + 1..].trim();
                if !rest.is_empty() && !rest.starts_with('#') && !rest.starts_with(';') {
                    return Err(err(format!("`{line}`: text after the section header")));
                }
                let header = &header[..end];
                let (name, kind) = match header.split_once(':') {
                    Some((n, k)) => (n, k),
                    None => (header, "hosts"),
                };
                state = match kind {
                    "hosts" => State::Hosts,
                    "vars" => State::Vars,
                    "children" => State::Children,
                    other => {
                        return Err(err(format!(
                            "section `[{header}]`: `{other}` is none of hosts, vars, children"
                        )))
                    }
                };
                if name.is_empty() || name.contains(char::is_whitespace) {
                    return Err(err(format!("`[{header}]` is not a valid group name")));
                }
                group = name.to_string();
                defined.insert(group.clone());
                self.group_mut(&group);
                continue;
            }
            match state {
                State::Hosts => {
                    let tokens = shlex::split(strip_comment(line))
                        .ok_or_else(|| err(format!("`{line}`: unbalanced quotes")))?;
                    let Some((pattern, assignments)) = tokens.split_first() else {
                        continue;
                    };
                    let mut vars = Map::new();
                    for a in assignments {
                        let Some((k, v)) = a.split_once('=') else {
                            return Err(err(format!(
                                "`{a}`: expected key=value after the host pattern"
                            )));
                        };
                        vars.insert(k.to_string(), python_value(v));
                    }
                    let (names, port) = expand_host(pattern).map_err(&err)?;
                    if let Some(port) = port {
                        vars.insert("ansible_port".into(), Value::from(port));
                    }
                    for name in names {
                        self.add_host(&name, vars.clone(), &group);
                    }
                }
                State::Vars => {
                    let Some((k, v)) = line.split_once('=') else {
                        return Err(err(format!(
                            "`{line}`: expected key=value in [{group}:vars]"
                        )));
                    };
                    let value = python_value(v.trim());
                    self.group_mut(&group)
                        .vars
                        .insert(k.trim().to_string(), value);
                }
                State::Children => {
                    let child = strip_comment(line).trim().to_string();
                    self.add_child(&group, &child);
                    named_children.push((group.clone(), child, line_no));
                }
            }
        }
        if let Some((parent, child, line)) = named_children
            .into_iter()
            .find(|(_, c, _)| !defined.contains(c))
        {
            return Err(ImportError {
                file: file.to_string(),
                line,
                message: format!(
                    "section [{parent}:children] includes undefined group `{child}` (give it a section of its own, even empty)"
                ),
            });
        }
        Ok(())
    }

    fn parse_yaml(&mut self, file: &str, text: &str) -> Result<(), ImportError> {
        let doc: Value = serde_norway::from_str(text).map_err(|e| ImportError {
            file: file.to_string(),
            line: e.location().map_or(0, |l| l.line()),
            message: format!("not a YAML inventory: {e}"),
        })?;
        let err = |message: String| ImportError {
            file: file.to_string(),
            line: 0,
            message,
        };
        let Value::Object(top) = doc else {
            return Err(err("expected groups at the top level (e.g. `all:`)".into()));
        };
        for (name, body) in &top {
            self.yaml_group(name, body).map_err(&err)?;
        }
        Ok(())
    }

    fn yaml_group(&mut self, name: &str, body: &Value) -> Result<(), String> {
        self.group_mut(name);
        let body = match body {
            Value::Null => return Ok(()),
            Value::Object(m) => m,
            other => return Err(format!("group `{name}`: expected a mapping, got {other}")),
        };
        for (key, value) in body {
            match (key.as_str(), value) {
                ("hosts", Value::Object(hosts)) => {
                    for (pattern, vars) in hosts {
                        let mut vars = match vars {
                            Value::Null => Map::new(),
                            Value::Object(m) => m.clone(),
                            other => {
                                return Err(format!(
                                    "host `{pattern}` in `{name}`: expected a mapping of vars, got {other}"
                                ))
                            }
                        };
                        let (names, port) = expand_host(pattern)?;
                        if let Some(port) = port {
                            vars.insert("ansible_port".into(), Value::from(port));
                        }
                        for host in names {
                            self.add_host(&host, vars.clone(), name);
                        }
                    }
                }
                ("vars", Value::Object(vars)) => {
                    self.group_mut(name).vars.extend(vars.clone());
                }
                ("children", Value::Object(children)) => {
                    for (child, child_body) in children {
                        self.add_child(name, child);
                        self.yaml_group(child, child_body)?;
                    }
                }
                ("hosts" | "vars" | "children", Value::Null) => {}
                (other, _) => {
                    return Err(format!(
                        "group `{name}`: `{other}` is none of hosts, vars, children"
                    ))
                }
            }
        }
        Ok(())
    }

    /// Ancestors of a group (itself included) with their depth below `all`.
    fn depths(&self) -> BTreeMap<String, usize> {
        let mut depth: BTreeMap<String, usize> = BTreeMap::new();
        let mut todo = vec![("all".to_string(), 0usize)];
        while let Some((g, d)) = todo.pop() {
            if depth.get(&g).is_some_and(|&old| old >= d) {
                continue;
            }
            depth.insert(g.clone(), d);
            if d > 64 {
                continue;
            }
            if let Some(grp) = self.group(&g) {
                for c in &grp.children {
                    todo.push((c.clone(), d + 1));
                }
            }
        }
        depth
    }

    /// The groups a host belongs to, directly or through child groups (`all` left out).
    fn groups_of(&self, host: &str) -> BTreeSet<String> {
        let mut found: BTreeSet<String> = self
            .groups
            .iter()
            .filter(|(_, g)| g.hosts.iter().any(|h| h == host))
            .map(|(n, _)| n.clone())
            .collect();
        loop {
            let parents: Vec<String> = self
                .groups
                .iter()
                .filter(|(n, g)| !found.contains(n) && g.children.iter().any(|c| found.contains(c)))
                .map(|(n, _)| n.clone())
                .collect();
            if parents.is_empty() {
                break;
            }
            found.extend(parents);
        }
        found.remove("all");
        found
    }

    /// A host's vars as Ansible resolves them: `all`, then its groups by depth and name,
    /// then its own.
    pub fn host_vars(&self, host: &str) -> Map<String, Value> {
        let depth = self.depths();
        let mut groups: Vec<String> = self.groups_of(host).into_iter().collect();
        groups.sort_by_key(|g| (depth.get(g).copied().unwrap_or(0), g.clone()));
        let mut vars = self
            .group("all")
            .map(|g| g.vars.clone())
            .unwrap_or_default();
        for g in groups {
            if let Some(grp) = self.group(&g) {
                for (k, v) in &grp.vars {
                    vars.insert(k.clone(), v.clone());
                }
            }
        }
        if let Some((_, own)) = self.hosts.iter().find(|(h, _)| h == host) {
            for (k, v) in own {
                vars.insert(k.clone(), v.clone());
            }
        }
        vars
    }

    /// The runbook inventory (TOML) for this Ansible inventory.
    pub fn to_runbook(&self) -> Result<Converted, String> {
        let mut out = Converted::default();
        let mut hosts = toml::Table::new();
        let mut dropped: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (name, _) in &self.hosts {
            if !runbook_engine::runbook::StepId::is_valid(name) {
                return Err(format!(
                    "host `{name}`: runbook host names take letters, digits, `-`, `_` and `.` (they name directories in evidence)"
                ));
            }
            let mut table = toml::Table::new();
            let mut vars = toml::Table::new();
            for (k, v) in self.host_vars(name) {
                let text = |v: &Value| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                match k.as_str() {
                    "ansible_host" | "ansible_ssh_host" => {
                        table.insert("address".into(), text(&v).into());
                    }
                    "ansible_port" | "ansible_ssh_port" => {
                        let port = text(&v)
                            .parse::<u16>()
                            .map_err(|_| format!("host `{name}`: `{k}` = {v} is not a port"))?;
                        table.insert("port".into(), i64::from(port).into());
                    }
                    "ansible_user" | "ansible_ssh_user" => {
                        table.insert("user".into(), text(&v).into());
                    }
                    "ansible_ssh_private_key_file" | "ansible_private_key_file" => {
                        table.insert("identity_file".into(), text(&v).into());
                    }
                    "ansible_become_user" => {
                        table.insert("become_user".into(), text(&v).into());
                    }
                    k if k.contains("pass") && k.starts_with("ansible_") => {
                        // Never copied: it would end up in files and evidence.
                        dropped
                            .entry(k.to_string())
                            .or_default()
                            .insert(name.clone());
                    }
                    k if k.starts_with("ansible_") && is_connection_var(k) => {
                        dropped
                            .entry(k.to_string())
                            .or_default()
                            .insert(name.clone());
                        vars.insert(k.to_string(), json_to_toml(&v));
                    }
                    _ => {
                        vars.insert(k.clone(), json_to_toml(&v));
                    }
                }
            }
            let groups: Vec<toml::Value> = self
                .groups_of(name)
                .into_iter()
                .filter(|g| g != "ungrouped")
                .map(toml::Value::from)
                .collect();
            if !groups.is_empty() {
                table.insert("groups".into(), toml::Value::Array(groups));
            }
            if !vars.is_empty() {
                table.insert("vars".into(), toml::Value::Table(vars));
            }
            hosts.insert(name.clone(), toml::Value::Table(table));
        }
        let mut doc = toml::Table::new();
        doc.insert("hosts".into(), toml::Value::Table(hosts));
        // Groups without any host still exist for selectors.
        let mut empty = toml::Table::new();
        for (g, _) in &self.groups {
            if g == "all" || g == "ungrouped" {
                continue;
            }
            let has_hosts = self
                .hosts
                .iter()
                .any(|(h, _)| self.groups_of(h).contains(g));
            if !has_hosts {
                let mut t = toml::Table::new();
                t.insert("hosts".into(), toml::Value::Array(Vec::new()));
                empty.insert(g.clone(), toml::Value::Table(t));
            }
        }
        if !empty.is_empty() {
            doc.insert("groups".into(), toml::Value::Table(empty));
        }
        for (k, hosts) in dropped {
            let hosts: Vec<String> = hosts.into_iter().collect();
            out.warnings.push(if k.contains("pass") {
                format!(
                    "`{k}` ({}) is not copied: give sudo's password with `become_password_env`",
                    hosts.join(", ")
                )
            } else {
                format!(
                    "`{k}` ({}) has no runbook equivalent: kept as a plain var",
                    hosts.join(", ")
                )
            });
        }
        out.toml = format!(
            "# converted from an Ansible inventory by runbook inventory import\n{}",
            toml::to_string(&doc).map_err(|e| e.to_string())?
        );
        Ok(out)
    }
}

/// Connection settings runbook has no key for (kept as vars, with a warning).
fn is_connection_var(k: &str) -> bool {
    k.starts_with("ansible_ssh_")
        || k.starts_with("ansible_become")
        || matches!(
            k,
            "ansible_connection" | "ansible_shell_type" | "ansible_python_interpreter"
        )
}

/// `#` starts a comment outside quotes in INI host and child lines.
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    for (i, c) in line.char_indices() {
        match (c, quote) {
            ('"' | '\'', None) => quote = Some(c),
            (c, Some(q)) if c == q => quote = None,
            ('#', None) if i == 0 || line[..i].ends_with(char::is_whitespace) => return &line[..i],
            _ => {}
        }
    }
    line
}

/// An INI value as Ansible's `_parse_value`: a Python literal where it is one (numbers,
/// `True`/`False`/`None`, quoted strings, lists, dicts), else the text itself.
fn python_value(v: &str) -> Value {
    let t = v.trim();
    if let Ok(i) = t.parse::<i64>() {
        return Value::from(i);
    }
    if let Ok(f) = t.parse::<f64>() {
        if t.contains('.') && f.is_finite() && !t.starts_with('.') && !t.ends_with('.') {
            return Value::from(f);
        }
    }
    match t {
        "True" => return Value::Bool(true),
        "False" => return Value::Bool(false),
        "None" => return Value::Null,
        _ => {}
    }
    if (t.starts_with('[') && t.ends_with(']')) || (t.starts_with('{') && t.ends_with('}')) {
        // Python literals with single quotes and True/False/None: close enough to JSON.
        let json = t
            .replace('\'', "\"")
            .replace("True", "true")
            .replace("False", "false")
            .replace("None", "null");
        if let Ok(v) = serde_json::from_str::<Value>(&json) {
            return v;
        }
    }
    if t.len() >= 2
        && ((t.starts_with('"') && t.ends_with('"')) || (t.starts_with('\'') && t.ends_with('\'')))
    {
        return Value::String(t[1..t.len() - 1].to_string());
    }
    Value::String(t.to_string())
}

/// `web[01:03].lab:2222` → (`web01.lab`, `web02.lab`, `web03.lab`), port 2222.
fn expand_host(pattern: &str) -> Result<(Vec<String>, Option<u16>), String> {
    // host:port, but not an IPv6 address (more than one colon outside brackets).
    let outside: String = {
        let mut depth = 0;
        pattern
            .chars()
            .filter(|c| {
                match c {
                    '[' => depth += 1,
                    ']' => depth -= 1,
                    _ => {}
                }
                depth == 0 && *c != ']'
            })
            .collect()
    };
    let (name, port) = if outside.matches(':').count() == 1 {
        let (n, p) = pattern
            .rsplit_once(':')
            .ok_or_else(|| format!("`{pattern}`: bad host:port"))?;
        let port = p
            .parse::<u16>()
            .map_err(|_| format!("`{pattern}`: `{p}` is not a port"))?;
        (n, Some(port))
    } else {
        (pattern, None)
    };
    Ok((expand_ranges(name)?, port))
}

fn expand_ranges(name: &str) -> Result<Vec<String>, String> {
    let Some(open) = name.find('[') else {
        return Ok(vec![name.to_string()]);
    };
    let close = name[open..]
        .find(']')
        .map(|i| open + i)
        .ok_or_else(|| format!("`{name}`: a range needs `]`"))?;
    let (head, spec, tail) = (&name[..open], &name[open + 1..close], &name[close + 1..]);
    let parts: Vec<&str> = spec.split(':').collect();
    let (start, end, step) = match parts.as_slice() {
        [a, b] => (*a, *b, 1usize),
        [a, b, s] => (
            *a,
            *b,
            s.parse::<usize>()
                .ok()
                .filter(|s| *s > 0)
                .ok_or_else(|| format!("`{name}`: bad range step `{s}`"))?,
        ),
        _ => {
            return Err(format!(
                "`{name}`: a range is [start:end] or [start:end:step]"
            ))
        }
    };
    let mut items = Vec::new();
    if let (Ok(a), Ok(b)) = (start.parse::<usize>(), end.parse::<usize>()) {
        if a > b {
            return Err(format!("`{name}`: range start is after its end"));
        }
        // Leading zeros in the start fix the width, as Ansible does.
        let width = if start.starts_with('0') {
            start.len()
        } else {
            0
        };
        for i in (a..=b).step_by(step) {
            items.push(format!("{i:0width$}"));
        }
    } else if start.len() == 1 && end.len() == 1 {
        let (a, b) = (start.as_bytes()[0], end.as_bytes()[0]);
        if !(a.is_ascii_alphabetic() && b.is_ascii_alphabetic()) || a > b {
            return Err(format!("`{name}`: bad alphabetic range"));
        }
        for c in (a..=b).step_by(step) {
            items.push((c as char).to_string());
        }
    } else {
        return Err(format!("`{name}`: bad range `[{spec}]`"));
    }
    let mut out = Vec::new();
    for item in items {
        for rest in expand_ranges(tail)? {
            out.push(format!("{head}{item}{rest}"));
        }
    }
    Ok(out)
}

fn json_to_toml(v: &Value) -> toml::Value {
    match v {
        Value::Null => toml::Value::String(String::new()),
        Value::Bool(b) => toml::Value::Boolean(*b),
        Value::Number(n) => n
            .as_i64()
            .map(toml::Value::Integer)
            .or_else(|| n.as_f64().map(toml::Value::Float))
            .unwrap_or_else(|| toml::Value::String(n.to_string())),
        Value::String(s) => toml::Value::String(s.clone()),
        Value::Array(a) => toml::Value::Array(a.iter().map(json_to_toml).collect()),
        Value::Object(m) => toml::Value::Table(
            m.iter()
                .map(|(k, v)| (k.clone(), json_to_toml(v)))
                .collect(),
        ),
    }
}

/// Whether an inventory file is an Ansible one rather than runbook TOML: by extension
/// (`.ini`, `.yml`, `.yaml`, `.cfg`, none), else by failing to read as TOML.
pub fn is_ansible(path: &Path, text: &str) -> bool {
    match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => false,
        Some("ini" | "yml" | "yaml" | "cfg") => true,
        _ => text.parse::<toml::Table>().is_err(),
    }
}

/// An Ansible inventory file as a runbook inventory: parsed from the converted TOML, with the
/// original file kept as its source (so bundles hold what the operator wrote).
pub fn load(
    source: &std::sync::Arc<runbook_engine::source::Source>,
) -> Result<runbook_engine::inventory::Inventory, String> {
    let ansible =
        AnsibleInventory::parse(source.path(), source.text()).map_err(|e| e.to_string())?;
    let converted = ansible.to_runbook()?;
    for w in &converted.warnings {
        tracing::warn!("{}: {w}", source.path().display());
    }
    let toml_source = runbook_engine::source::Source::new(
        source.path().with_extension("converted.toml"),
        converted.toml.clone(),
    );
    let mut inv = runbook_engine::inventory::Inventory::parse(&toml_source).map_err(|d| {
        format!(
            "{}: the converted inventory is not valid: {:?}",
            source.path().display(),
            d.0.iter().map(|d| d.message.clone()).collect::<Vec<_>>()
        )
    })?;
    inv.source = Some(source.clone());
    Ok(inv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn corpus() -> Vec<std::path::PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ansible-inventories");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .expect("corpus dir")
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        assert!(files.len() >= 6, "corpus missing in {}", dir.display());
        files
    }

    /// `ansible-inventory -i FILE --list`, the reference for what a file means.
    fn ansible_list(file: &Path, home: &Path) -> Value {
        let out = Command::new("ansible-inventory")
            .arg("-i")
            .arg(file)
            .arg("--list")
            .env("ANSIBLE_HOME", home)
            .env("ANSIBLE_LOCAL_TEMP", home.join("tmp"))
            .env("ANSIBLE_INVENTORY_UNPARSED_FAILED", "true")
            .output()
            .expect("ansible-inventory is missing: scripts/test installs ansible-core");
        assert!(out.status.success(), "{}: {out:?}", file.display());
        serde_json::from_slice(&out.stdout).expect("JSON from ansible-inventory")
    }

    fn names(v: Option<&Value>) -> BTreeSet<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Hosts of `group` in Ansible's output, through child groups.
    fn members(list: &Value, group: &str) -> BTreeSet<String> {
        let mut out = names(list.get(group).and_then(|g| g.get("hosts")));
        for child in names(list.get(group).and_then(|g| g.get("children"))) {
            out.extend(members(list, &child));
        }
        out
    }

    #[test]
    fn corpus_reads_as_ansible_inventory_list_says() {
        let home = tempfile::tempdir().expect("temp dir");
        for file in corpus() {
            let text = std::fs::read_to_string(&file).expect("read");
            let ours = AnsibleInventory::parse(&file, &text)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let list = ansible_list(&file, home.path());
            let groups: Vec<String> = list
                .as_object()
                .expect("object")
                .keys()
                .filter(|k| *k != "_meta")
                .cloned()
                .collect();
            let mut all_hosts = BTreeSet::new();
            for g in &groups {
                all_hosts.extend(members(&list, g));
                let theirs_hosts = names(list[g].get("hosts"));
                let theirs_children = names(list[g].get("children"));
                let mine = ours
                    .group(g)
                    .unwrap_or_else(|| panic!("{}: group `{g}` missing", file.display()));
                assert_eq!(
                    mine.hosts.iter().cloned().collect::<BTreeSet<_>>(),
                    theirs_hosts,
                    "{}: hosts of `{g}`",
                    file.display()
                );
                // Ansible leaves out children that have nothing in them.
                let mine_children: BTreeSet<String> = mine
                    .children
                    .iter()
                    .filter(|c| theirs_children.contains(*c) || list.get(c.as_str()).is_some())
                    .cloned()
                    .collect();
                assert_eq!(
                    mine_children,
                    theirs_children,
                    "{}: children of `{g}`",
                    file.display()
                );
            }
            let our_hosts: BTreeSet<String> = ours.hosts.iter().map(|(h, _)| h.clone()).collect();
            assert_eq!(our_hosts, all_hosts, "{}: hosts", file.display());
            for h in &all_hosts {
                let theirs = list["_meta"]["hostvars"]
                    .get(h)
                    .cloned()
                    .unwrap_or(Value::Object(Map::new()));
                assert_eq!(
                    Value::Object(ours.host_vars(h)),
                    theirs,
                    "{}: vars of `{h}`",
                    file.display()
                );
            }

            // The runbook inventory selects the same hosts per group, with the connection
            // settings in runbook's keys.
            let converted = ours.to_runbook().expect("convert");
            let inv = runbook_engine::inventory::parse_str("converted.toml", &converted.toml)
                .unwrap_or_else(|d| panic!("{}: {d:?}\n{}", file.display(), converted.toml));
            for g in groups.iter().filter(|g| *g != "all" && *g != "ungrouped") {
                let picked: BTreeSet<String> = inv
                    .group(g)
                    .unwrap_or_default()
                    .iter()
                    .map(|h| h.name.clone())
                    .collect();
                assert_eq!(picked, members(&list, g), "{}: group `{g}`", file.display());
            }
            for h in inv.hosts() {
                let vars = &list["_meta"]["hostvars"][&h.name];
                if let Some(addr) = vars.get("ansible_host").and_then(Value::as_str) {
                    assert_eq!(h.address, addr, "{}", file.display());
                }
                if let Some(port) = vars.get("ansible_port").and_then(Value::as_u64) {
                    assert_eq!(u64::from(h.port), port, "{}", file.display());
                }
                if let Some(user) = vars.get("ansible_user").and_then(Value::as_str) {
                    assert_eq!(h.user, user, "{}", file.display());
                }
                assert!(
                    !converted.toml.contains("not-copied"),
                    "a password was copied: {}",
                    converted.toml
                );
            }
        }
    }

    #[test]
    fn ranges_and_ports() {
        assert_eq!(
            expand_host("web[01:03].lab:2222").expect("range"),
            (
                vec!["web01.lab".into(), "web02.lab".into(), "web03.lab".into()],
                Some(2222)
            )
        );
        assert_eq!(
            expand_host("db-[a:c]").expect("range").0,
            vec!["db-a", "db-b", "db-c"]
        );
        assert!(expand_host("x[3:1]").is_err());
        assert_eq!(python_value("5555"), Value::from(5555));
        assert_eq!(python_value("'a b'"), Value::from("a b"));
        assert_eq!(python_value("True"), Value::Bool(true));
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let err =
            AnsibleInventory::parse(Path::new("hosts.ini"), "[web]\nh1\n[web:vars]\nnovalue\n")
                .expect_err("bad vars line");
        assert_eq!((err.file.as_str(), err.line), ("hosts.ini", 4));
        let err = AnsibleInventory::parse(
            Path::new("hosts.ini"),
            "[web]\nh1\n[usa:children]\nweb\nnortheast\n",
        )
        .expect_err("undefined child, as Ansible refuses it");
        assert_eq!(err.line, 5);
    }
}
