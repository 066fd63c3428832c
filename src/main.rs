//! The `runbook` command line: argument parsing, wiring the engine to the step runners and the
//! evidence recorder, progress display and error rendering. Everything else lives in the
//! `engine`, `steps` and `evidence` crates.

/// stdout and stderr may be closed (`runbook run … 2>&1 | head`): printing must never stop the
/// runner before the bundle is sealed, so these shadow the std macros, which panic on a write
/// error.
macro_rules! eprintln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

macro_rules! eprint {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

macro_rules! println {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

macro_rules! print {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

mod ansible_inventory;
mod approve;
mod bundles;
mod cli;
mod commands;
mod console;
mod context;
mod exit;
mod inventory_cmd;
mod inventory_load;
mod lock;
mod notify;
mod passphrase;
mod render;
mod schedule;
mod session;
mod signals;
mod timestamp;

fn main() {
    std::process::exit(commands::main());
}
