//! End-to-end tests: the real `runbook` binary on runbooks written by each test, running real
//! processes, writing real bundles.

mod assessor;
mod automation;
mod capture;
mod common;
mod corpus;
mod day2;
mod diagnostics;
mod drills;
mod durability;
mod evidence;
mod execution;
mod expressions;
mod hosts;
mod lab;
mod lab_ansible;
mod lab_harness;
mod output_edges;
mod probes;
mod processes;
mod redaction;
mod rke2;
mod schedule;
mod trust;
mod write_ahead;
