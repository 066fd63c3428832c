//! End-to-end tests: the real `runbook` binary on runbooks written by each test, running real
//! processes, writing real bundles.

mod assessor;
mod common;
mod corpus;
mod diagnostics;
mod drills;
mod durability;
mod evidence;
mod execution;
mod expressions;
mod hosts;
mod lab;
mod output_edges;
mod probes;
mod processes;
mod rke2;
mod schedule;
