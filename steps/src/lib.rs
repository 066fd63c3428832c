//! Step runners: the [`StepRunner`](runbook_engine::runner::StepRunner) implementations that do
//! the work. Each knows how to run one attempt and nothing about graphs, retries or evidence.

pub mod dispatch;
pub mod local;
pub mod ssh;

/// Declares the runners of the step kinds with a settings table: `Variant => module`, each
/// module with `pub(crate) async fn run_attempt(ctx, out)`. The match over the engine's `RequestKind`
/// is exhaustive: a kind the engine declares without a runner here does not compile.
macro_rules! request_runners {
    ($($variant:ident => $module:ident),+ $(,)?) => {
        $(pub mod $module;)+

        /// Runs an attempt of a step kind on this machine.
        async fn local_request(
            kind: runbook_engine::runbook::RequestKind,
            ctx: &runbook_engine::runner::AttemptContext,
            out: &mut runbook_engine::runner::OutputSink,
        ) -> runbook_engine::event::AttemptOutcome {
            match kind {
                $(runbook_engine::runbook::RequestKind::$variant => $module::run_attempt(ctx, out).await,)+
            }
        }
    };
}

request_runners! {
    Http => http,
    Tcp => tcp,
    Screenshot => screenshot,
    Upload => upload,
}

pub use dispatch::Dispatcher;
pub use local::{stop_leftover_group, stop_processes_left_by_run, stop_run_processes, LocalRunner};
