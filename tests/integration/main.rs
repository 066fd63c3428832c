//! End-to-end tests: the real `runbook` binary on runbooks written by each test, running real
//! processes, writing real bundles.

mod assessor;
mod common;
mod diagnostics;
mod durability;
mod evidence;
mod execution;
mod expressions;
mod processes;
