//! `runbook schedule`: drills (or any runbook) on cron schedules. Owns the schedule file
//! ([`file`]), cron handling ([`cron`]), the long-running scheduler ([`scheduler`]) and the
//! children it starts ([`child`]), its state file ([`state`]) and metrics ([`metrics`]), what a
//! schedule expected of an evidence directory ([`expected`], for `verify --chain`), and
//! the export to systemd timers and Kubernetes CronJobs ([`export`]).

pub mod child;
pub mod cron;
pub mod expected;
pub mod export;
pub mod file;
pub mod metrics;
pub mod scheduler;
pub mod state;

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use clap::{Args, Subcommand};
use runbook_engine::Diagnostics;

use crate::exit;
use crate::render::{self, diagnostics_to_string, stderr_color};
use file::{CatchUp, Overlap, ScheduleFile};

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Run the scheduler: fire every entry at its cron times until SIGTERM or SIGINT
    #[command(
        after_help = "Examples:\n  runbook schedule run schedules.toml\n  runbook schedule run schedules.toml --metrics-addr 127.0.0.1:9464\n\nOn SIGTERM/SIGINT no new runs start; running drills get `shutdown_grace` (default 60s)\nto finish and are then cancelled (their bundles are sealed as cancelled); exit 0.\nA second signal cancels them at once."
    )]
    Run {
        /// The schedule file
        file: PathBuf,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464)
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<String>,
        /// Stop firing after this long (e.g. `10m`), then shut down as on SIGTERM
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
        stop_after: Option<Duration>,
    },
    /// Print each entry's next fire times (in its time zone) and its last fire
    List {
        /// The schedule file
        file: PathBuf,
        /// How many fire times per entry
        #[arg(short = 'n', long, default_value_t = 5)]
        count: usize,
    },
    /// Write systemd service + timer units, or Kubernetes CronJob manifests, per entry
    #[command(
        after_help = "Examples:\n  runbook schedule export schedules.toml --systemd /etc/systemd/system\n  runbook schedule export schedules.toml --cronjob k8s/ --image registry.example/runbook:0.1.0\n\nFails (writing nothing) when an entry's cron expression cannot be expressed by the target."
    )]
    Export(ExportArgs),
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The schedule file
    pub file: PathBuf,
    /// Write `runbook-<name>.service` and `.timer` here
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "cronjob",
        required_unless_present = "cronjob"
    )]
    pub systemd: Option<PathBuf>,
    /// Write `runbook-<name>.yaml` CronJob manifests here
    #[arg(long, value_name = "DIR", required_unless_present = "systemd")]
    pub cronjob: Option<PathBuf>,
    /// Container image with `runbook` and the runbooks (CronJob)
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    /// Persistent volume claim for evidence bundles, mounted at /evidence (CronJob)
    #[arg(long, value_name = "NAME", default_value = "runbook-evidence")]
    pub pvc: String,
    /// Where relative runbook paths are found inside the image (CronJob)
    #[arg(long, value_name = "DIR", default_value = "/runbooks")]
    pub runbook_root: String,
    /// Namespace for the CronJobs
    #[arg(long)]
    pub namespace: Option<String>,
    /// The `runbook` executable the services run [default: this one]
    #[arg(long, value_name = "PATH")]
    pub runbook_bin: Option<PathBuf>,
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    runbook_engine::duration::parse_duration(s)
}

pub fn command(cmd: &ScheduleCommand) -> i32 {
    match cmd {
        ScheduleCommand::Run {
            file,
            metrics_addr,
            stop_after,
        } => {
            let (schedule, names) = match load_checked(file) {
                Ok(x) => x,
                Err(code) => return code,
            };
            scheduler::run(
                schedule,
                names,
                scheduler::Options {
                    metrics_addr: metrics_addr.clone(),
                    stop_after: *stop_after,
                },
            )
        }
        ScheduleCommand::List { file, count } => list(file, *count),
        ScheduleCommand::Export(args) => export(args),
    }
}

fn print_diagnostics(diags: &Diagnostics) {
    eprint!("{}", diagnostics_to_string(&diags.0, stderr_color()));
}

fn load(path: &Path) -> Result<ScheduleFile, i32> {
    file::load(path).map_err(|diags| {
        print_diagnostics(&diags);
        let n = diags.error_count().max(1);
        render::error(&format!(
            "`{}` has {n} error{}",
            path.display(),
            if n == 1 { "" } else { "s" }
        ));
        exit::USAGE
    })
}

/// The schedule file and the name of each entry's runbook, every runbook compiled: a broken
/// runbook is reported before the scheduler starts, not at 2 a.m.
fn load_checked(path: &Path) -> Result<(ScheduleFile, Vec<String>), i32> {
    use runbook_engine::diagnostic::{Code, Diagnostic};
    let schedule = load(path)?;
    let host = runbook_engine::expr::ExprHost::new();
    let mut names = Vec::new();
    let mut failed = false;
    // Problems with what an entry names are shown at the entry, in the schedule file.
    let at = |span: &runbook_engine::source::Span, message: String, label: &str| {
        let d =
            Diagnostic::error(Code::BadValue, message).at(&schedule.source, span.clone(), label);
        print_diagnostics(&Diagnostics(vec![d]));
    };
    for e in &schedule.entries {
        let source = match runbook_engine::load_source(&e.runbook) {
            Ok(s) => s,
            Err(err) => {
                at(
                    &e.runbook_span,
                    format!("entry `{}`: {err}", e.name),
                    "this runbook",
                );
                failed = true;
                continue;
            }
        };
        match runbook_engine::compile(&source, &host) {
            Ok((rb, _, warnings)) => {
                if !warnings.0.is_empty() {
                    print_diagnostics(&warnings);
                }
                let sets: Vec<String> = e.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                if let Err(errs) =
                    runbook_engine::params::BoundParams::bind(&rb, &sets, |v| std::env::var(v).ok())
                {
                    for err in errs {
                        at(
                            e.params_span.as_ref().unwrap_or(&e.runbook_span),
                            format!("entry `{}`: {err}", e.name),
                            "for this runbook",
                        );
                    }
                    failed = true;
                }
                names.push(rb.meta.name.clone());
            }
            Err(diags) => {
                print_diagnostics(&diags);
                render::error(&format!(
                    "entry `{}`: `{}` has errors",
                    e.name,
                    e.runbook.display()
                ));
                failed = true;
            }
        }
    }
    if failed {
        return Err(exit::USAGE);
    }
    Ok((schedule, names))
}

fn list(path: &Path, count: usize) -> i32 {
    // The same checks as `run` and `export`: a listing must not look fine for an entry that
    // cannot run.
    let (schedule, _) = match load_checked(path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let state = match state::State::load(&schedule.state_file) {
        Ok(s) => s,
        Err(e) => {
            render::error(&e.to_string());
            return exit::USAGE;
        }
    };
    let now = Utc::now();
    let fmt = "%Y-%m-%d %H:%M:%S %Z (%:z)";
    for e in &schedule.entries {
        let tz = e.cron.tz;
        println!(
            "{}: `{}` cron `{}` in {} (overlap {}, catch-up {}{}{})",
            e.name,
            e.runbook_as_written,
            e.cron.text,
            tz.name(),
            match e.overlap {
                Overlap::Skip => "skip",
                Overlap::Queue => "queue",
            },
            match e.catch_up {
                CatchUp::None => "none",
                CatchUp::Latest => "latest",
            },
            if e.jitter.is_zero() {
                String::new()
            } else {
                format!(
                    ", jitter {}",
                    runbook_engine::duration::format_spec(e.jitter)
                )
            },
            e.max_duration
                .map(|d| format!(", max {}", runbook_engine::duration::format_spec(d)))
                .unwrap_or_default(),
        );
        match state.entries.get(&e.name) {
            Some(s) if s.last_fire.is_some() => {
                let when = s
                    .last_fire
                    .map(|t| t.with_timezone(&tz).format(fmt).to_string())
                    .unwrap_or_default();
                let outcome = s
                    .last_outcome
                    .as_ref()
                    .map(|o| format!(" — {}", o.status))
                    .unwrap_or_default();
                println!("  last fire: {when}{outcome}");
            }
            _ => println!("  last fire: never"),
        }
        for t in e.cron.upcoming(now, count) {
            println!("  next: {}", t.with_timezone(&tz).format(fmt));
        }
    }
    exit::OK
}

fn export(args: &ExportArgs) -> i32 {
    let (schedule, _) = match load_checked(&args.file) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let (dir, result) = if let Some(dir) = &args.systemd {
        let bin = args
            .runbook_bin
            .clone()
            .or_else(|| std::env::current_exe().ok())
            .unwrap_or_else(|| PathBuf::from("/usr/local/bin/runbook"));
        (
            dir,
            export::systemd(&schedule, &export::SystemdOptions { runbook_bin: bin }),
        )
    } else if let Some(dir) = &args.cronjob {
        let Some(image) = &args.image else {
            render::error("`--cronjob` needs `--image IMAGE`: the container image with `runbook` and the runbooks");
            return exit::USAGE;
        };
        (
            dir,
            export::cronjobs(
                &schedule,
                &export::CronJobOptions {
                    image: image.clone(),
                    pvc: args.pvc.clone(),
                    runbook_root: args.runbook_root.clone(),
                    namespace: args.namespace.clone(),
                },
            ),
        )
    } else {
        render::error("say where to: `--systemd DIR` or `--cronjob DIR`");
        return exit::USAGE;
    };
    let (units, warnings) = match result {
        Ok(x) => x,
        Err(errors) => {
            for e in errors {
                render::error(&e.to_string());
            }
            render::error("nothing was written");
            return exit::USAGE;
        }
    };
    for w in warnings {
        eprintln!("warning: {w}");
    }
    if let Err(e) = std::fs::create_dir_all(dir) {
        render::error(&format!("cannot create `{}`: {e}", dir.display()));
        return exit::USAGE;
    }
    for u in units {
        let path = dir.join(&u.name);
        if let Err(e) = std::fs::write(&path, u.text) {
            render::error(&format!("cannot write `{}`: {e}", path.display()));
            return exit::RUN_FAILED;
        }
        println!("{}", path.display());
    }
    exit::OK
}
