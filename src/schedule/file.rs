//! The schedule file (`schedules.toml`): `[[schedule]]` entries and the settings they share,
//! read from a spanned TOML tree so every problem is reported with `file:line:col`, all in one
//! pass, with the same diagnostic codes as runbooks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Tz;
use runbook_engine::analyzer::reader::{get, ShiftedSpans, TomlReader, Value};
use runbook_engine::diagnostic::{suggest, Code, Diagnostic};
use runbook_engine::source::Span;
use runbook_engine::{Diagnostics, Source};
use toml::de::{DeTable, DeValue};

use super::cron::CronSpec;
use crate::notify::NotifySpec;

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
    let mut r = TomlReader::new(source.clone());
    let text = source.text().to_owned();
    let file = match r.parse(&text) {
        Some((root, s)) => {
            let mut reader = Reader { r, s };
            let file = reader.file(root.get_ref(), &dir);
            r = reader.r;
            file
        }
        None => None,
    };
    let mut diags = r.diags;
    if diags.has_errors() {
        diags.sort();
        return Err(diags);
    }
    file.ok_or(diags)
}

struct Reader {
    r: TomlReader,
    s: ShiftedSpans,
}

/// Entry names become unit file names and Kubernetes object names.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 52
        && matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

impl Reader {
    fn file(&mut self, root: &DeTable<'_>, dir: &Path) -> Option<ScheduleFile> {
        self.r
            .check_keys(root, TOP_KEYS, "the top level of a schedule file", &self.s);
        let path_of = |s: String| dir.join(s);
        let state_file = get(root, "state_file")
            .and_then(|v| self.r.string(v, "state_file", &self.s))
            .map(|(s, _)| path_of(s));
        let evidence_dir = get(root, "evidence_dir")
            .and_then(|v| self.r.string(v, "evidence_dir", &self.s))
            .map_or_else(|| dir.join("proof"), |(s, _)| path_of(s));
        let textfile_dir = get(root, "textfile_dir")
            .and_then(|v| self.r.string(v, "textfile_dir", &self.s))
            .map(|(s, _)| path_of(s));
        let shutdown_grace = get(root, "shutdown_grace")
            .and_then(|v| self.r.duration(v, "shutdown_grace", &self.s))
            .unwrap_or(Duration::from_secs(60));
        let kill_grace = get(root, "kill_grace")
            .and_then(|v| self.r.duration(v, "kill_grace", &self.s))
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
                _ => self.r.wrong_type(
                    v,
                    "schedule",
                    "an array of tables (`[[schedule]]`)",
                    &self.s,
                ),
            },
            None => {
                let d = Diagnostic::error(Code::MissingKey, "the schedule file has no entries")
                    .at(&self.r.src, 0..0, "expected at least one `[[schedule]]` table")
                    .help("add:\n[[schedule]]\nname = \"nightly-restore\"\nrunbook = \"restore.toml\"\ncron = \"0 2 * * *\"");
                self.r.push(d);
            }
        }
        let mut seen: BTreeMap<String, Span> = BTreeMap::new();
        for e in &entries {
            if let Some(first) = seen.insert(e.name.to_lowercase(), e.name_span.clone()) {
                let first = self.r.src.line_col(first.start);
                self.r.push(
                    Diagnostic::error(
                        Code::DuplicateStep,
                        format!("two schedule entries are named `{}`", e.name),
                    )
                    .at(
                        &self.r.src,
                        e.name_span.clone(),
                        "a second entry with this name",
                    )
                    .note(format!(
                        "the first is at {}:{}:{}",
                        self.r.src.path().display(),
                        first.line,
                        first.column
                    )),
                );
            }
        }
        let stem = self
            .r
            .src
            .path()
            .file_stem()
            .map_or_else(|| "schedules".into(), |s| s.to_string_lossy().into_owned());
        Some(ScheduleFile {
            source: self.r.src.clone(),
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
            self.r.wrong_type(v, "schedule", "a table", &self.s);
            return None;
        };
        self.r
            .check_keys(t, ENTRY_KEYS, "a `[[schedule]]` entry", &self.s);
        let name = self.r.required_string(t, "name", v.span(), &self.s);
        if let Some((n, span)) = &name {
            if !valid_name(n) {
                self.r.error(
                    Code::BadId,
                    span.clone(),
                    format!("schedule name `{n}` may contain only letters, digits, `-`, `_` and `.`, start with a letter or digit, and be at most 52 characters"),
                    "not a valid name",
                );
            }
        }
        let runbook = self.r.required_string(t, "runbook", v.span(), &self.s);
        let tz = match get(t, "timezone").and_then(|v| self.r.string(v, "timezone", &self.s)) {
            None => Some(Tz::UTC),
            Some((text, span)) => match text.parse::<Tz>() {
                Ok(tz) => Some(tz),
                Err(_) => {
                    let mut d = Diagnostic::error(
                        Code::BadValue,
                        format!("`{text}` is not an IANA time zone"),
                    )
                    .at(&self.r.src, span, "unknown time zone");
                    if let Some(near) =
                        suggest(&text, chrono_tz::TZ_VARIANTS.iter().map(|z| z.name()))
                    {
                        d = d.help(format!("did you mean `{near}`?"));
                    } else {
                        d = d
                            .help("write a name like `UTC`, `Europe/Berlin` or `America/New_York`");
                    }
                    self.r.push(d);
                    None
                }
            },
        };
        let cron = self.r.required_string(t, "cron", v.span(), &self.s).and_then(|(text, span)| {
            match CronSpec::parse(&text, tz.unwrap_or(Tz::UTC)) {
                // `0 0 31 2 *` parses, but the scheduler would wait for it forever.
                Ok(c) if c.upcoming(chrono::Utc::now(), 1).is_empty() => {
                    let d = Diagnostic::error(
                        Code::BadValue,
                        format!("`cron = \"{text}\"` never fires: no date matches it"),
                    )
                    .at(&self.r.src, span, "never fires")
                    .help("check the day of month against the month (there is no 31 February)");
                    self.r.push(d);
                    None
                }
                Ok(c) => Some(c),
                Err(why) => {
                    let d = Diagnostic::error(Code::BadValue, format!("invalid `cron`: {why}"))
                        .at(&self.r.src, span, "not a cron expression")
                        .help("5 fields `minute hour day-of-month month day-of-week` (`0 2 * * *`), or 6 with seconds first (`*/30 * * * * *`)");
                    self.r.push(d);
                    None
                }
            }
        });
        let params = get(t, "params").map(|p| self.params(p)).unwrap_or_default();
        let params_span = get(t, "params").map(|p| self.s.span(p.span()));
        let jitter = get(t, "jitter")
            .and_then(|v| self.r.duration(v, "jitter", &self.s))
            .unwrap_or_default();
        let overlap = match get(t, "overlap").and_then(|v| self.r.string(v, "overlap", &self.s)) {
            None => Overlap::Skip,
            Some((s, _)) if s == "skip" => Overlap::Skip,
            Some((s, _)) if s == "queue" => Overlap::Queue,
            Some((s, span)) => {
                self.r.bad_choice(span, "overlap", &s, &["skip", "queue"]);
                Overlap::Skip
            }
        };
        let catch_up = match get(t, "catch_up").and_then(|v| self.r.string(v, "catch_up", &self.s))
        {
            None => CatchUp::None,
            Some((s, _)) if s == "none" => CatchUp::None,
            Some((s, _)) if s == "latest" => CatchUp::Latest,
            Some((s, span)) => {
                self.r.bad_choice(span, "catch_up", &s, &["none", "latest"]);
                CatchUp::None
            }
        };
        let max_duration =
            get(t, "max_duration").and_then(|v| self.r.duration(v, "max_duration", &self.s));
        let evidence_dir = get(t, "evidence_dir")
            .and_then(|v| self.r.string(v, "evidence_dir", &self.s))
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
            self.r.wrong_type(
                v,
                "params",
                "a table like `{ cluster = \"staging\" }`",
                &self.s,
            );
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
                    self.r
                        .wrong_type(val, &key, "a string, number or boolean", &self.s);
                    continue;
                }
            };
            out.push((key, text));
        }
        out
    }

    fn notify(&mut self, v: &Value<'_>) -> Option<NotifySpec> {
        self.r.notify(v, &self.s).map(|(spec, _, _)| spec)
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

    /// A schedule file's `[notify]` is read by the runbook rules: a URL that cannot work is an
    /// error when the scheduler starts, reported at the table without the URL's secret path.
    #[test]
    fn notify_is_read_by_the_runbook_rules() {
        let entry = "[[schedule]]\nname = \"a\"\nrunbook = \"r.toml\"\ncron = \"0 2 * * *\"\n";
        let err = load_text(&format!(
            "[notify]\nurl = \"ftp://hooks.example.test/T000/SECRETPATH\"\nretries = 21\n{entry}"
        ))
        .expect_err("fails");
        let all: Vec<String> = err.0.iter().map(ToString::to_string).collect();
        let all = all.join("\n");
        assert!(
            all.contains("s.toml:1:1: `[notify]`: `url` scheme `ftp` is not supported"),
            "{all}"
        );
        assert!(
            all.contains("`retries` must be a whole number from 0 to 20"),
            "{all}"
        );
        assert!(!all.contains("SECRETPATH"), "{all}");
        let f = load_text(&format!(
            "[notify]\nurl = \"https://hooks.example.test/x\"\non = [\"always\"]\n{entry}"
        ))
        .expect("loads");
        let spec = f.entries[0].notify.as_ref().expect("inherited");
        assert_eq!(spec.retries, 3);
        assert_eq!(spec.url, "https://hooks.example.test/x");
    }
}
