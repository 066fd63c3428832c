//! Signals from the first instant: `run` and `resume` catch SIGINT, SIGTERM and SIGHUP before
//! they take a lock or create a bundle, so no signal kills the runner outright (which would
//! leave a held lock and a bundle stuck at `running`). Until the run's own watcher
//! (`session::watch_signals`) takes over, a signal is only noted here; the watcher starts by
//! acting on it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

fn flag() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Catches the stop signals from now on.
pub fn install() {
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        // Registration fails only for forbidden signals; these are not.
        let _ = signal_hook::flag::register(sig, flag().clone());
    }
}

/// Whether a stop signal arrived since [`install`].
pub fn received() -> bool {
    flag().load(Ordering::SeqCst)
}
