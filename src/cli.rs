//! Command-line definition.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Exit codes, documented in `runbook --help` and docs/cli.md.
pub mod exit {
    pub const OK: i32 = 0;
    pub const RUN_FAILED: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const INTERRUPTED: i32 = 130;
}

const AFTER_HELP: &str = "\
Examples:
  runbook check runbooks/examples/local-drill.toml
  runbook plan runbooks/examples/local-drill.toml --set greeting=hi
  runbook run runbooks/examples/local-drill.toml --parallel 4
  runbook graph runbooks/examples/local-drill.toml --format mermaid

Exit codes: 0 ok, 1 run failed, 2 usage or runbook error, 130 interrupted.
Logs: RUST_LOG=debug runbook run …";

#[derive(Debug, Parser)]
#[command(
    name = "runbook",
    version,
    about = "Run infrastructure runbooks as dependency graphs, with retries, timeouts and tamper-evident evidence",
    after_help = AFTER_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a runbook and write an evidence bundle
    #[command(
        after_help = "Examples:\n  runbook run deploy.toml --set rke2_version=v1.31.5+rke2r1\n  runbook run deploy.toml --only first-server --evidence-dir /srv/proof\n  runbook run deploy.toml --dry-run"
    )]
    Run(RunArgs),
    /// Check runbooks for every problem, without running anything
    #[command(
        after_help = "Examples:\n  runbook check runbooks/*.toml\n\nExits 2 when any file has an error."
    )]
    Check(CheckArgs),
    /// Print the execution order with resolved commands
    Plan(PlanArgs),
    /// Print the dependency graph
    #[command(
        after_help = "Examples:\n  runbook graph deploy.toml --format dot | dot -Tsvg > deploy.svg\n  runbook graph deploy.toml --format mermaid"
    )]
    Graph(GraphArgs),
    /// Explain a diagnostic code such as RB0007
    Explain {
        /// The code, e.g. RB0007
        code: String,
    },
}

#[derive(Debug, Args)]
pub struct Selection {
    /// Run only this step (repeatable); its needs are taken as done
    #[arg(long, value_name = "STEP")]
    pub only: Vec<String>,
    /// Leave this step out (repeatable); steps that need it do not wait for it
    #[arg(long, value_name = "STEP")]
    pub skip: Vec<String>,
    /// Run this step and every step that depends on it
    #[arg(long, value_name = "STEP")]
    pub from: Option<String>,
}

#[derive(Debug, Args)]
pub struct ParamArgs {
    /// Set a parameter: `--set name=value` (repeatable)
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub set: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The runbook file
    pub file: PathBuf,
    #[command(flatten)]
    pub params: ParamArgs,
    #[command(flatten)]
    pub selection: Selection,
    /// How many attempts may run at once [default: number of CPUs]
    #[arg(long, short = 'j', value_name = "N")]
    pub parallel: Option<usize>,
    /// Where evidence bundles go [default: `[runbook] evidence_dir`, else ./proof]
    #[arg(long, value_name = "DIR", env = "RUNBOOK_EVIDENCE_DIR")]
    pub evidence_dir: Option<PathBuf>,
    /// Print the plan and stop: nothing runs, no bundle is written
    #[arg(long)]
    pub dry_run: bool,
    /// Print a JSON summary on stdout at the end
    #[arg(long)]
    pub json: bool,
    /// Print every output line of every step, prefixed with its step id
    #[arg(long, short = 'v')]
    pub stream: bool,
    /// Plain line-per-event output even on a terminal
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Runbook files
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    pub file: PathBuf,
    #[command(flatten)]
    pub params: ParamArgs,
    #[command(flatten)]
    pub selection: Selection,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum GraphFormat {
    Text,
    Dot,
    Mermaid,
}

#[derive(Debug, Args)]
pub struct GraphArgs {
    pub file: PathBuf,
    #[arg(long, value_enum, default_value_t = GraphFormat::Text)]
    pub format: GraphFormat,
}
