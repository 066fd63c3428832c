//! The `runbook` command line: argument parsing, wiring the engine to the step runners and the
//! evidence recorder, progress display and error rendering. Everything else lives in the
//! `engine`, `steps` and `evidence` crates.

mod approve;
mod bundles;
mod cli;
mod commands;
mod console;
mod context;
mod lock;
mod render;
mod session;

fn main() {
    std::process::exit(commands::main());
}
