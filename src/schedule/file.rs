//! The schedule file (`schedules.toml`): `[[schedule]]` entries and the settings they share,
//! read from a spanned TOML tree so every problem is reported with `file:line:col`, all in one
//! pass, with the same diagnostic codes as runbooks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Tz;
use runbook_engine::diagnostic::{suggest, Code, Diagnostic};
use runbook_engine::duration::parse_duration;
use runbook_engine::source::Span;
use runbook_engine::{Diagnostics, Source};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::cron::CronSpec;
use crate::notify::{NotifyFormat, NotifySpec, When};

type Value<'i> = Spanned<DeValue<'i>>;

const TOP_KEYS: &[&str] = &[
    "schedule",
    "state_file",
    "evidence_dir",
    "textfile_dir",
    "shutdown_grace",
    "kill_grace",
    "notify",
];
const ENTRY_KEYS: &[&str] = &[
    "name",
    "runbook",
    "params",
    "cron",
    "timezone",
    "jitter",
    "overlap",
    "catch_up",
    "max_duration",
    "evidence_dir",
    "notify",
];
const NOTIFY_KEYS: &[&str] = &["url", "format", "on", "headers", "timeout", "retries"];

/// What to do when an entry's time comes while its previous run is still going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// Do not start this one (logged, counted in `runbook_schedule_skipped_total`).
    Skip,
    /// Start it when the running one ends; at most one waits.
    Queue,
}

/// What to do on start for fire times missed while the scheduler was not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    None,
    /// Fire once (not once per missed time) when a time was missed since the last fire.
    Latest,
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    /// Where the entry's `name`, `runbook` and `params` are written, for later messages.
    pub name_span: Span,
    pub runbook_span: Span,
    pub params_span: Option<Span>,
    /// The runbook, resolved against the schedule file's directory.
    pub runbook: PathBuf,
    /// The runbook path as written (relative paths are kept for exported units).
    pub runbook_as_written: String,
    /// `--set` values, in the file's order.
    pub params: Vec<(String, String)>,
    pub cron: CronSpec,
    pub jitter: Duration,
    pub overlap: Overlap,
    pub catch_up: CatchUp,
    pub max_duration: Option<Duration>,
    pub evidence_dir: PathBuf,
    pub notify: Option<NotifySpec>,
}

impl Entry {
    /// `--set name=value` arguments for the child run.
    pub fn set_args(&self) -> Vec<String> {
        self.params
            .iter()
            .flat_map(|(k, v)| ["--set".to_owned(), format!("{k}={v}")])
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct ScheduleFile {
    pub source: Arc<Source>,
    /// The directory relative paths in the file are resolved against.
    pub dir: PathBuf,
    pub state_file: PathBuf,
    pub textfile_dir: Option<PathBuf>,
    /// On SIGTERM/SIGINT, how long running drills may go on before they are cancelled.
    pub shutdown_grace: Duration,
    /// After a child is sent SIGTERM (cancel or `max_duration`), how long until it is told
    /// again (the runbook then kills its steps) and, after as long again, killed.
    pub kill_grace: Duration,
    pub entries: Vec<Entry>,
}

impl ScheduleFile {
    /// Name of this scheduler's metrics file in a textfile directory.
    pub fn textfile_name(&self) -> String {
        let stem: String = self
            .source
            .path()
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!("runbook_schedule_{stem}.prom")
    }
}

/// Reads and checks a schedule file: the file, or every problem found.
pub fn load(path: &Path) -> Result<ScheduleFile, Diagnostics> {
    let source = runbook_engine::load_source(path)
        .map_err(|e| Diagnostics(vec![Diagnostic::error(Code::Unreadable, e.to_string())]))?;
    let dir = std::fs::canonicalize(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let mut reader = Reader {
        src: source.clone(),
        diags: Diagnostics::default(),
    };
    let file = reader.file(&dir);
    let mut diags = reader.diags;
    if diags.has_errors() {
        diags.sort();
        return Err(diags);
    }
    file.ok_or(diags)
}

struct Reader {
    src: Arc<Source>,
    diags: Diagnostics,
}

fn get<'a, 'i>(table: &'a DeTable<'i>, key: &str) -> Option<&'a Value<'i>> {
    table
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == key)
        .map(|(_, v)| v)
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// Entry names become unit file names and Kubernetes object names.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 52
        && matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

impl Reader {
    fn error(&mut self, code: Code, span: Span, message: impl Into<String>, label: &str) {
        let d = Diagnostic::error(code, message).at(&self.src, span, label);
        self.diags.push(d);
    }

    fn file(&mut self, dir: &Path) -> Option<ScheduleFile> {
        let text = self.src.text().to_owned();
        let root = match DeTable::parse(&text) {
            Ok(root) => root,
            Err(err) => {
                let span = err.span().map_or(0..0, |s| s.start..s.end.max(s.start + 1));
                let message = err.message().trim().to_owned();
                let first = message.lines().next().unwrap_or("invalid TOML").to_owned();
                self.error(
                    Code::TomlSyntax,
                    span,
                    format!("invalid TOML: {first}"),
                    &first,
                );
                return None;
            }
        };
        let root = root.get_ref();
        self.check_keys(root, TOP_KEYS, "the top level of a schedule file");
        let path_of = |s: String| dir.join(s);
        let state_file = get(root, "state_file")
            .and_then(|v| self.string(v, "state_file"))
            .map(|(s, _)| path_of(s));
        let evidence_dir = get(root, "evidence_dir")
            .and_then(|v| self.string(v, "evidence_dir"))
            .map_or_else(|| dir.join("proof"), |(s, _)| path_of(s));
        let textfile_dir = get(root, "textfile_dir")
            .and_then(|v| self.string(v, "textfile_dir"))
            .map(|(s, _)| path_of(s));
        let shutdown_grace = get(root, "shutdown_grace")
            .and_then(|v| self.duration(v, "shutdown_grace"))
            .unwrap_or(Duration::from_secs(60));
        let kill_grace = get(root, "kill_grace")
            .and_then(|v| self.duration(v, "kill_grace"))
            .unwrap_or(Duration::from_secs(30));
        let notify = get(root, "notify").and_then(|v| self.notify(v));

        let mut entries = Vec::new();
        match get(root, "schedule") {
            Some(v) => match v.get_ref() {
                DeValue::Array(items) => {
                    for item in items.iter() {
                        if let Some(e) = self.entry(item, dir, &evidence_dir, notify.as_ref()) {
                            entries.push(e);
                        }
                    }
                }
                _ => self.wrong_type(v, "schedule", "an array of tables (`[[schedule]]`)"),
            },
            None => {
                let d = Diagnostic::error(Code::MissingKey, "the schedule file has no entries")
                    .at(&self.src, 0..0, "expected at least one `[[schedule]]` table")
                    .help("add:\n[[schedule]]\nname = \"nightly-restore\"\nrunbook = \"restore.toml\"\ncron = \"0 2 * * *\"");
                self.diags.push(d);
            }
        }
        let mut seen: BTreeMap<String, Span> = BTreeMap::new();
        for e in &entries {
            if let Some(first) = seen.insert(e.name.to_lowercase(), e.name_span.clone()) {
                let first = self.src.line_col(first.start);
                self.diags.push(
                    Diagnostic::error(
                        Code::DuplicateStep,
                        format!("two schedule entries are named `{}`", e.name),
                    )
                    .at(
                        &self.src,
                        e.name_span.clone(),
                        "a second entry with this name",
                    )
                    .note(format!(
                        "the first is at {}:{}:{}",
                        self.src.path().display(),
                        first.line,
                        first.column
                    )),
                );
            }
        }
        let stem = self
            .src
            .path()
            .file_stem()
            .map_or_else(|| "schedules".into(), |s| s.to_string_lossy().into_owned());
        Some(ScheduleFile {
            source: self.src.clone(),
            dir: dir.to_path_buf(),
            state_file: state_file.unwrap_or_else(|| dir.join(format!("{stem}.state.json"))),
            textfile_dir,
            shutdown_grace,
            kill_grace,
            entries,
        })
    }

    fn entry(
        &mut self,
        v: &Value<'_>,
        dir: &Path,
        evidence_dir: &Path,
        notify: Option<&NotifySpec>,
    ) -> Option<Entry> {
        let DeValue::Table(t) = v.get_ref() else {
            self.wrong_type(v, "schedule", "a table");
            return None;
        };
        self.check_keys(t, ENTRY_KEYS, "a `[[schedule]]` entry");
        let name = self.required_string(t, "name", v.span());
        if let Some((n, span)) = &name {
            if !valid_name(n) {
                self.error(
                    Code::BadId,
                    span.clone(),
                    format!("schedule name `{n}` may contain only letters, digits, `-`, `_` and `.`, start with a letter or digit, and be at most 52 characters"),
                    "not a valid name",
                );
            }
        }
        let runbook = self.required_string(t, "runbook", v.span());
        let tz = match get(t, "timezone").and_then(|v| self.string(v, "timezone")) {
            None => Some(Tz::UTC),
            Some((text, span)) => match text.parse::<Tz>() {
                Ok(tz) => Some(tz),
                Err(_) => {
                    let mut d = Diagnostic::error(
                        Code::BadValue,
                        format!("`{text}` is not an IANA time zone"),
                    )
                    .at(&self.src, span, "unknown time zone");
                    if let Some(near) =
                        suggest(&text, chrono_tz::TZ_VARIANTS.iter().map(|z| z.name()))
                    {
                        d = d.help(format!("did you mean `{near}`?"));
                    } else {
                        d = d
                            .help("write a name like `UTC`, `Europe/Berlin` or `America/New_York`");
                    }
                    self.diags.push(d);
                    None
                }
            },
        };
        let cron = self.required_string(t, "cron", v.span()).and_then(|(text, span)| {
            match CronSpec::parse(&text, tz.unwrap_or(Tz::UTC)) {
                // `0 0 31 2 *` parses, but the scheduler would wait for it forever.
                Ok(c) if c.upcoming(chrono::Utc::now(), 1).is_empty() => {
                    let d = Diagnostic::error(
                        Code::BadValue,
                        format!("`cron = \"{text}\"` never fires: no date matches it"),
                    )
                    .at(&self.src, span, "never fires")
                    .help("check the day of month against the month (there is no 31 February)");
                    self.diags.push(d);
                    None
                }
                Ok(c) => Some(c),
                Err(why) => {
                    let d = Diagnostic::error(Code::BadValue, format!("invalid `cron`: {why}"))
                        .at(&self.src, span, "not a cron expression")
                        .help("5 fields `minute hour day-of-month month day-of-week` (`0 2 * * *`), or 6 with seconds first (`*/30 * * * * *`)");
                    self.diags.push(d);
                    None
                }
            }
        });
        let params = get(t, "params").map(|p| self.params(p)).unwrap_or_default();
        let params_span = get(t, "params").map(Spanned::span);
        let jitter = get(t, "jitter")
            .and_then(|v| self.duration(v, "jitter"))
            .unwrap_or_default();
        let overlap = match get(t, "overlap").and_then(|v| self.string(v, "overlap")) {
            None => Overlap::Skip,
            Some((s, _)) if s == "skip" => Overlap::Skip,
            Some((s, _)) if s == "queue" => Overlap::Queue,
            Some((s, span)) => {
                self.bad_choice(span, "overlap", &s, &["skip", "queue"]);
                Overlap::Skip
            }
        };
        let catch_up = match get(t, "catch_up").and_then(|v| self.string(v, "catch_up")) {
            None => CatchUp::None,
            Some((s, _)) if s == "none" => CatchUp::None,
            Some((s, _)) if s == "latest" => CatchUp::Latest,
            Some((s, span)) => {
                self.bad_choice(span, "catch_up", &s, &["none", "latest"]);
                CatchUp::None
            }
        };
        let max_duration = get(t, "max_duration").and_then(|v| self.duration(v, "max_duration"));
        let evidence_dir = get(t, "evidence_dir")
            .and_then(|v| self.string(v, "evidence_dir"))
            .map_or_else(|| evidence_dir.to_path_buf(), |(s, _)| dir.join(s));
        let own_notify = get(t, "notify").and_then(|v| self.notify(v));
        let (name, name_span) = name?;
        let (runbook, runbook_span) = runbook?;
        tz?;
        Some(Entry {
            name,
            name_span,
            runbook_span,
            params_span,
            runbook: dir.join(&runbook),
            runbook_as_written: runbook,
            params,
            cron: cron?,
            jitter,
            overlap,
            catch_up,
            max_duration,
            evidence_dir,
            notify: own_notify.or_else(|| notify.cloned()),
        })
    }

    fn params(&mut self, v: &Value<'_>) -> Vec<(String, String)> {
        let DeValue::Table(t) = v.get_ref() else {
            self.wrong_type(v, "params", "a table like `{ cluster = \"staging\" }`");
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, val) in t.iter() {
            let key = k.get_ref().as_ref().to_owned();
            let text = match val.get_ref() {
                DeValue::String(s) => s.to_string(),
                DeValue::Integer(i) => i.as_str().to_owned(),
                DeValue::Float(f) => f.as_str().to_owned(),
                DeValue::Boolean(b) => b.to_string(),
                _ => {
                    self.wrong_type(val, &key, "a string, number or boolean");
                    continue;
                }
            };
            out.push((key, text));
        }
        out
    }

    fn notify(&mut self, v: &Value<'_>) -> Option<NotifySpec> {
        let DeValue::Table(t) = v.get_ref() else {
            self.wrong_type(v, "notify", "a table");
            return None;
        };
        self.check_keys(t, NOTIFY_KEYS, "`[notify]`");
        let url = self.required_string(t, "url", v.span());
        if let Some((u, span)) = &url {
            if reqwest::Url::parse(u).is_err() {
                self.error(
                    Code::BadValue,
                    span.clone(),
                    "`url` is not a URL",
                    "expected `https://…`",
                );
            }
        }
        let format = match get(t, "format").and_then(|v| self.string(v, "format")) {
            None => NotifyFormat::Generic,
            Some((s, _)) if s == "generic" => NotifyFormat::Generic,
            Some((s, _)) if s == "slack" => NotifyFormat::Slack,
            Some((s, span)) => {
                self.bad_choice(span, "format", &s, &["generic", "slack"]);
                NotifyFormat::Generic
            }
        };
        let mut on = Vec::new();
        match get(t, "on") {
            None => on = crate::notify::default_on(),
            Some(list) => match list.get_ref() {
                DeValue::Array(items) => {
                    for item in items.iter() {
                        let Some((s, span)) = self.string(item, "on") else {
                            continue;
                        };
                        match s.as_str() {
                            "failure" => on.push(When::Failure),
                            "success" => on.push(When::Success),
                            "rto_missed" => on.push(When::RtoMissed),
                            "always" => on.push(When::Always),
                            _ => self.bad_choice(
                                span,
                                "on",
                                &s,
                                &["failure", "success", "rto_missed", "always"],
                            ),
                        }
                    }
                }
                _ => self.wrong_type(list, "on", "an array like `[\"failure\"]`"),
            },
        }
        let mut headers = BTreeMap::new();
        if let Some(h) = get(t, "headers") {
            match h.get_ref() {
                DeValue::Table(ht) => {
                    for (k, val) in ht.iter() {
                        let key = k.get_ref().as_ref().to_owned();
                        if let Some((s, _)) = self.string(val, &key) {
                            headers.insert(key, s);
                        }
                    }
                }
                _ => self.wrong_type(h, "headers", "a table of strings"),
            }
        }
        let timeout = get(t, "timeout")
            .and_then(|v| self.duration(v, "timeout"))
            .unwrap_or_else(crate::notify::default_timeout);
        let retries = match get(t, "retries") {
            None => crate::notify::default_retries(),
            Some(v) => match v.get_ref() {
                DeValue::Integer(i) => match i.as_str().parse::<u32>() {
                    Ok(n) if n <= 20 => n,
                    _ => {
                        self.error(
                            Code::BadValue,
                            v.span(),
                            "`retries` must be between 0 and 20",
                            "out of range",
                        );
                        0
                    }
                },
                _ => {
                    self.wrong_type(v, "retries", "an integer");
                    0
                }
            },
        };
        Some(NotifySpec {
            url: url?.0,
            format,
            on,
            headers,
            timeout,
            retries,
        })
    }

    fn check_keys(&mut self, table: &DeTable<'_>, allowed: &[&str], what: &str) {
        for (key, _) in table.iter() {
            let name = key.get_ref().as_ref();
            if allowed.contains(&name) {
                continue;
            }
            let mut d = Diagnostic::error(
                Code::UnknownKey,
                format!("unknown key `{name}` in {what}"),
            )
            .at(&self.src, key.span(), "unknown key");
            d = match suggest(name, allowed.iter().copied()) {
                Some(near) => d.help(format!("did you mean `{near}`?")),
                None => d.help(format!(
                    "valid keys here: {}",
                    allowed
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            };
            self.diags.push(d);
        }
    }

    fn wrong_type(&mut self, v: &Value<'_>, key: &str, expected: &str) {
        let found = type_name(v.get_ref());
        self.error(
            Code::WrongType,
            v.span(),
            format!("`{key}` must be {expected}, found {found}"),
            &format!("expected {expected}"),
        );
    }

    fn bad_choice(&mut self, span: Span, key: &str, got: &str, allowed: &[&str]) {
        let list = allowed
            .iter()
            .map(|a| format!("`{a}`"))
            .collect::<Vec<_>>()
            .join(" or ");
        self.error(
            Code::BadValue,
            span,
            format!("`{key}` must be {list}, found `{got}`"),
            "not allowed here",
        );
    }

    fn string(&mut self, v: &Value<'_>, key: &str) -> Option<(String, Span)> {
        match v.get_ref() {
            DeValue::String(text) => Some((text.to_string(), v.span())),
            _ => {
                self.wrong_type(v, key, "a string");
                None
            }
        }
    }

    fn required_string(
        &mut self,
        t: &DeTable<'_>,
        key: &str,
        table_span: Span,
    ) -> Option<(String, Span)> {
        match get(t, key) {
            Some(v) => self.string(v, key),
            None => {
                let start = table_span.start;
                self.error(
                    Code::MissingKey,
                    start..start,
                    format!("missing `{key}`"),
                    &format!("this table needs `{key}`"),
                );
                None
            }
        }
    }

    fn duration(&mut self, v: &Value<'_>, key: &str) -> Option<Duration> {
        match v.get_ref() {
            DeValue::String(text) => match parse_duration(text) {
                Ok(d) => Some(d),
                Err(why) => {
                    self.error(
                        Code::BadDuration,
                        v.span(),
                        format!("invalid duration for `{key}`: {why}"),
                        "expected a duration like `90s`, `10m` or `1h30m`",
                    );
                    None
                }
            },
            _ => {
                self.wrong_type(v, key, "a duration string like `90s`");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<ScheduleFile, Diagnostics> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.toml");
        std::fs::write(&path, text).expect("write");
        load(&path)
    }

    #[test]
    fn reads_an_entry_with_defaults() {
        let f = load_text(
            "[[schedule]]\nname = \"a\"\nrunbook = \"r.toml\"\ncron = \"0 2 * * *\"\nparams = { cluster = \"staging\", n = 3 }\n",
        )
        .expect("loads");
        let e = &f.entries[0];
        assert_eq!(e.overlap, Overlap::Skip);
        assert_eq!(e.catch_up, CatchUp::None);
        assert_eq!(e.set_args(), ["--set", "cluster=staging", "--set", "n=3"]);
        assert!(f.state_file.ends_with("s.state.json"));
        assert!(e.evidence_dir.ends_with("proof"));
    }

    #[test]
    fn reports_every_problem_with_positions() {
        let err = load_text(
            "[[schedule]]\nname = \"a\"\nrunbook = \"r.toml\"\ncron = \"0 2 * *\"\ntimezone = \"Europe/Berlim\"\noverlap = \"wait\"\njiter = \"1s\"\n",
        )
        .expect_err("fails");
        let text: Vec<String> = err.0.iter().map(ToString::to_string).collect();
        let all = text.join("\n");
        assert!(all.contains("s.toml:4:8: invalid `cron`"), "{all}");
        assert!(
            all.contains("s.toml:5:12: `Europe/Berlim` is not an IANA time zone"),
            "{all}"
        );
        assert!(
            all.contains("s.toml:6:11: `overlap` must be `skip` or `queue`"),
            "{all}"
        );
        assert!(all.contains("s.toml:7:1: unknown key `jiter`"), "{all}");
    }
}
