//! Command-line definition.

use std::path::PathBuf;

use crate::exit;
use clap::{Args, Parser, Subcommand, ValueEnum};

const AFTER_HELP: &str = "\
Examples:
  runbook check runbooks/examples/local-drill.toml
  runbook plan runbooks/examples/local-drill.toml --set settle_seconds=3
  runbook run runbooks/examples/local-drill.toml --parallel 4
  runbook graph runbooks/examples/local-drill.toml --format mermaid

Exit codes: 0 ok, 1 run failed, 2 usage or runbook error, 3 evidence verification failed,
4 awaiting approval, 5 drill failed (steps succeeded, RTO/RPO missed or not measured),
130 interrupted.
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
    /// Make a key pair for signing bundles (minisign format)
    #[command(
        after_help = "Examples:\n  runbook keygen                      # runbook.key (unencrypted) + runbook.pub\n  RUNBOOK_SIGN_PASSWORD=… runbook keygen -s ci.key -p ci.pub\n\nSign runs with `runbook run … --sign-key runbook.key`; give assessors runbook.pub."
    )]
    Keygen {
        /// Where the secret key goes
        #[arg(short = 's', long, default_value = "runbook.key")]
        secret_key: PathBuf,
        /// Where the public key goes
        #[arg(short = 'p', long, default_value = "runbook.pub")]
        public_key: PathBuf,
        /// Overwrite existing key files
        #[arg(long)]
        force: bool,
        /// Encrypt the secret key with this password (scrypt, as minisign does)
        #[arg(long, env = "RUNBOOK_SIGN_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
    /// Continue an interrupted, failed, cancelled or waiting run in its bundle
    #[command(
        after_help = "Examples:\n  runbook resume proof/rke2-upgrade/20261125T101500Z-1a2b3c4d\n  runbook resume BUNDLE --approve upgrade-servers\n  runbook resume BUNDLE --from join-agents\n\nSteps that succeeded are not run again (recorded as `succeeded earlier`); secrets are\nread again from their sources (environment, --set), never from the bundle."
    )]
    Resume(ResumeArgs),
    /// Work with evidence bundles
    Evidence {
        #[command(subcommand)]
        command: EvidenceCommand,
    },
    /// Show or export an inventory (an inventory file, or a runbook's `[runbook] inventory`)
    Inventory {
        #[command(subcommand)]
        command: InventoryCommand,
    },
    /// Print a shell completion script: `runbook completions bash > /etc/bash_completion.d/runbook`
    Completions {
        /// bash, zsh, fish, elvish or powershell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `runbook man | man -l -`
    Man,
    /// Run runbooks (drills) on cron schedules, list fire times, export to systemd or Kubernetes
    Schedule {
        #[command(subcommand)]
        command: crate::schedule::ScheduleCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum InventoryCommand {
    /// List hosts with their address, user, groups and host-key policy
    Show {
        /// An inventory file, or a runbook naming one
        file: PathBuf,
        /// Only the hosts this selector picks (`servers[0]`, `all,!bastion`)
        #[arg(long, value_name = "SELECTOR")]
        select: Option<String>,
        /// Every effective connection setting of each host and where it came from
        /// (inventory, its [defaults], ssh_config file:line, or the built-in default)
        #[arg(long)]
        settings: bool,
    },
    /// Convert an Ansible inventory (INI or YAML) into a runbook inventory
    #[command(
        after_help = "Examples:\n  runbook inventory import hosts.ini > inventory/lab.toml\n  runbook inventory import inventory.yml -o inventory/lab.toml\n\nRunbooks and --inventory can also name the Ansible file directly."
    )]
    Import {
        /// The Ansible inventory file
        file: PathBuf,
        /// Write here instead of stdout (an existing file is kept unless --force)
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Replace an existing output file
        #[arg(long)]
        force: bool,
    },
    /// Write the inventory in a form other tools read
    #[command(
        after_help = "Examples:\n  runbook inventory export runbooks/inventory/lab.toml --format ansible > hosts.ini\n  ansible-playbook -i hosts.ini site.yml"
    )]
    Export {
        /// An inventory file, or a runbook naming one
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = ExportFormat::Ansible)]
        format: ExportFormat,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    /// Ansible INI inventory
    Ansible,
    /// Ansible YAML inventory
    AnsibleYaml,
}

#[derive(Debug, Subcommand)]
pub enum EvidenceCommand {
    /// Check a bundle: every checksum, no file missing or extra, journal, manifest and logs
    /// agree, the signature and its trusted comment, the RFC 3161 time-stamp (exit 3 on any
    /// problem, or when a signature or time-stamp could not be checked; 2 if the path is not a
    /// bundle)
    #[command(
        after_help = "Examples:\n  runbook evidence verify proof/rke2-upgrade/20261125T101500Z-1a2b3c4d --pubkey runbook.pub\n  runbook evidence verify BUNDLE --pubkey runbook.pub --tsa-ca tsa-ca.pem --require-signature\n  runbook evidence verify --chain proof/rke2-upgrade --pubkey runbook.pub --schedule drills.toml\n\nA signed bundle verified without a trusted key fails (exit 3): give --pubkey, or\n--trusted-keys FILE / RUNBOOK_TRUSTED_KEYS (one or more minisign public keys). An unsigned\nbundle passes on its checksums alone, and says so, unless --require-signature is given.\n\nThe same checks with independent tools:\n  cd BUNDLE && minisign -Vm SHA256SUMS -p runbook.pub && sha256sum -c SHA256SUMS\n  openssl ts -verify -data SHA256SUMS -in SHA256SUMS.tsr -CAfile tsa-ca.pem"
    )]
    Verify(VerifyArgs),
    /// List the bundles under an evidence directory: when, what, status, who
    List {
        /// The evidence directory
        #[arg(default_value = "proof", env = "RUNBOOK_EVIDENCE_DIR")]
        dir: PathBuf,
    },
    /// Summarise one bundle in the terminal
    Show { bundle: PathBuf },
    /// Pack a bundle as `.tar.gz`; its checksums and signature still verify once unpacked
    Export {
        bundle: PathBuf,
        /// Output file [default: <bundle name>.tar.gz]
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Overwrite the output file if it exists
        #[arg(long)]
        force: bool,
    },
    /// Rebuild a bundle's manifest.json and SHA256SUMS from its journal (after a crash)
    #[command(
        after_help = "Examples:\n  runbook evidence repair proof/rke2-upgrade/20261125T101500Z-1a2b3c4d\n  runbook evidence repair BUNDLE --sign-key runbook.key   # keep it signed\n\nA bundle that is sealed (its run finished) or verifies has nothing to repair and is\nrefused: repairing rewrites SHA256SUMS, which drops its signature unless --sign-key is given."
    )]
    Repair {
        /// The bundle directory
        bundle: PathBuf,
        /// Repair even a bundle that is sealed or verifies (its signature is dropped unless
        /// --sign-key is given)
        #[arg(long)]
        force: bool,
        /// Sign the rewritten SHA256SUMS with this minisign secret key
        #[arg(long, value_name = "KEY", env = "RUNBOOK_SIGN_KEY")]
        sign_key: Option<PathBuf>,
        /// Password of an encrypted signing key
        #[arg(
            long,
            env = "RUNBOOK_SIGN_PASSWORD",
            hide_env_values = true,
            value_name = "PASSWORD"
        )]
        sign_password: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The bundle directory
    #[arg(required_unless_present = "chain")]
    pub bundle: Option<PathBuf>,
    /// Walk every bundle of a runbook (`<evidence dir>/<runbook>`, or an evidence directory
    /// for all its runbooks): each bundle checked, and each one's link to the one before it
    #[arg(long, value_name = "DIR", conflicts_with = "bundle")]
    pub chain: Option<PathBuf>,
    /// Public key (`.pub` file, or the base64 key) the signature must verify with
    #[arg(long, value_name = "KEY")]
    pub pubkey: Option<String>,
    /// A file of trusted public keys (minisign `.pub` files concatenated, or base64 lines);
    /// the signature must verify with the one its key id names
    #[arg(long, value_name = "FILE", env = "RUNBOOK_TRUSTED_KEYS")]
    pub trusted_keys: Option<PathBuf>,
    /// Fail (exit 3) when the bundle is not signed
    #[arg(long)]
    pub require_signature: bool,
    /// CA certificate(s) (PEM) the time-stamping authority's certificate must chain to
    #[arg(long, value_name = "FILE", env = "RUNBOOK_TSA_CA")]
    pub tsa_ca: Option<PathBuf>,
    /// With --chain: the schedule file that runs this runbook; each scheduled fire time with
    /// no bundle is reported as a gap, and a missing last-run bundle as missing
    #[arg(long, value_name = "FILE", requires = "chain")]
    pub schedule: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// The bundle directory of the run to continue
    pub bundle: PathBuf,
    /// Resume even though the runbook file changed since the run started
    #[arg(long)]
    pub allow_changed: bool,
    /// Approve a step that has `approve` (repeatable); recorded with your user@host
    #[arg(long, value_name = "STEP")]
    pub approve: Vec<String>,
    #[command(flatten)]
    pub params: ParamArgs,
    #[command(flatten)]
    pub selection: Selection,
    #[command(flatten)]
    pub exec: ExecArgs,
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
    /// The inventory for steps with `on` [default: `[runbook] inventory`]
    #[arg(long, short = 'i', value_name = "FILE", env = "RUNBOOK_INVENTORY")]
    pub inventory: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The runbook file
    pub file: PathBuf,
    #[command(flatten)]
    pub params: ParamArgs,
    #[command(flatten)]
    pub selection: Selection,
    /// Where evidence bundles go [default: `[runbook] evidence_dir`, else ./proof]
    #[arg(long, value_name = "DIR", env = "RUNBOOK_EVIDENCE_DIR")]
    pub evidence_dir: Option<PathBuf>,
    /// Print the plan; run only the steps' `plan` commands (terraform plan, ansible --check)
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub exec: ExecArgs,
}

/// How a run executes and reports: shared by `run` and `resume`.
/// When a record that announces an action must be on disk (`--durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// Written to the journal file before the action starts: `kill -9` of the runner loses
    /// nothing; synced to disk in groups at most 50 ms later.
    Process,
    /// Also synced to disk (`fdatasync`) before the action starts: a power cut loses nothing.
    Power,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// How many attempts may run at once [default: number of CPUs]
    #[arg(long, short = 'j', value_name = "N")]
    pub parallel: Option<usize>,
    /// How many host attempts may run at once over SSH [default: 50]
    #[arg(long, value_name = "N")]
    pub forks: Option<usize>,
    /// Print a JSON summary on stdout at the end
    #[arg(long)]
    pub json: bool,
    /// Print every output line of every step, prefixed with its step id
    #[arg(long, short = 'v')]
    pub stream: bool,
    /// Plain line-per-event output even on a terminal
    #[arg(long)]
    pub no_progress: bool,
    /// Take over the run lock of a run that died without finishing
    #[arg(long)]
    pub break_lock: bool,
    /// What the journal survives before a step's action starts: `process` (the runner being
    /// killed: the record is written first) or `power` (a power cut too: it is also synced to
    /// disk first, which costs a disk flush per batch of starts)
    #[arg(long, value_enum, default_value_t = Durability::Process, env = "RUNBOOK_DURABILITY")]
    pub durability: Durability,
    #[command(flatten)]
    pub signing: Signing,
}

#[derive(Debug, Args)]
pub struct Signing {
    /// Sign the bundle's SHA256SUMS with this minisign secret key at the end
    #[arg(long, value_name = "KEY", env = "RUNBOOK_SIGN_KEY")]
    pub sign_key: Option<PathBuf>,
    /// Password of an encrypted signing key
    #[arg(
        long,
        env = "RUNBOOK_SIGN_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    pub sign_password: Option<String>,
    /// Also write metrics.prom to this node_exporter textfile directory
    #[arg(long, value_name = "DIR", env = "RUNBOOK_TEXTFILE_DIR")]
    pub textfile_dir: Option<PathBuf>,
    /// Fail the run when a secret had to be redacted from step output (it was printed)
    #[arg(long)]
    pub fail_on_leak: bool,
    /// Get an RFC 3161 time-stamp of SHA256SUMS from this time-stamping authority (stored as
    /// SHA256SUMS.tsr)
    #[arg(long, value_name = "URL", env = "RUNBOOK_TIMESTAMP_URL")]
    pub timestamp_url: Option<String>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Runbook files
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// The inventory for steps with `on`, as `run --inventory` takes it [default: each
    /// runbook's `[runbook] inventory`]
    #[arg(long, short = 'i', value_name = "FILE", env = "RUNBOOK_INVENTORY")]
    pub inventory: Option<PathBuf>,
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

/// `runbook completions SHELL`: the completion script on stdout.
pub fn completions(shell: clap_complete::Shell) -> i32 {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "runbook", &mut std::io::stdout());
    exit::OK
}

/// `runbook man`: the man page (roff) on stdout.
pub fn man() -> i32 {
    use clap::CommandFactory;
    let page = clap_mangen::Man::new(Cli::command());
    match page.render(&mut std::io::stdout()) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("runbook man: {e}");
            exit::RUN_FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn completion_scripts_are_valid_for_their_shell() {
        let mut cmd = Cli::command();
        let mut bash = Vec::new();
        clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, "runbook", &mut bash);
        let text = String::from_utf8(bash).expect("utf-8");
        assert!(
            text.contains("inventory") && text.contains("import"),
            "{text}"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("runbook.bash");
        std::fs::write(&file, &text).expect("write");
        let checked = std::process::Command::new("bash")
            .arg("-n")
            .arg(&file)
            .output()
            .expect("bash");
        assert!(checked.status.success(), "{checked:?}");
    }

    #[test]
    fn man_page_lists_the_commands() {
        let mut page = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut page)
            .expect("render");
        let text = String::from_utf8(page).expect("utf-8");
        assert!(
            text.starts_with(".ie") || text.contains(".TH runbook 1"),
            "{text}"
        );
        assert!(
            text.contains("completions") && text.contains("inventory"),
            "{text}"
        );
    }
}
