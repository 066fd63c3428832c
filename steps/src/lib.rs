//! Step runners: the [`StepRunner`](runbook_engine::runner::StepRunner) implementations that do
//! the work. Each knows how to run one attempt and nothing about graphs, retries or evidence.

pub mod dispatch;
pub mod http;
pub mod local;
pub mod screenshot;
pub mod ssh;
pub mod tcp;

pub use dispatch::Dispatcher;
pub use local::{stop_leftover_group, stop_processes_left_by_run, stop_run_processes, LocalRunner};
