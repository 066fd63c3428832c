//! Asking a person on the terminal whether a step with `approve` may run. Without a terminal
//! the question is deferred: the run stops awaiting approval, and `runbook resume BUNDLE
//! --approve STEP` continues it, recording who approved.

use std::io::{BufRead, Write};

use runbook_engine::runbook::StepId;
use runbook_engine::runner::{Approval, Approver, BoxFuture};

pub struct TerminalApprover {
    pub operator: String,
}

impl Approver for TerminalApprover {
    fn ask<'a>(&'a self, step: &'a StepId, text: &'a str) -> BoxFuture<'a, Approval> {
        let (step, text, by) = (step.to_string(), text.to_owned(), self.operator.clone());
        Box::pin(async move {
            let answer = tokio::task::spawn_blocking(move || {
                let mut tty = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/tty")
                    .ok()?;
                write!(tty, "\napprove step `{step}`? {text}\n[y/N] ").ok()?;
                tty.flush().ok()?;
                let mut line = String::new();
                std::io::BufReader::new(tty).read_line(&mut line).ok()?;
                Some(line)
            })
            .await
            .ok()
            .flatten();
            match answer {
                None => Approval::Deferred,
                Some(a) if matches!(a.trim(), "y" | "Y" | "yes" | "YES") => {
                    Approval::Granted { by }
                }
                Some(_) => Approval::Refused { by },
            }
        })
    }
}
