//! A step with `on`: its hosts, parallel or in rolling batches with a failure budget and
//! gates between batches, blocks of sub-steps per host, and failures grouped by reason.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Where a gate stands: `before the first batch` (batch 0) or `after batch N`.
fn gate_place(batch: usize) -> String {
    if batch == 0 {
        "before the first batch".to_owned()
    } else {
        format!("after batch {batch}")
    }
}

/// Rolling batches: sizes as written, the last size repeating until every host has one.
fn split_batches(hosts: &[Arc<Host>], sizes: &[Budget]) -> Vec<Vec<Arc<Host>>> {
    let total = hosts.len();
    let mut out = Vec::new();
    let mut i = 0;
    let mut k = 0;
    while i < total {
        let size = sizes
            .get(k)
            .or(sizes.last())
            .map_or(1, |b| b.of(total))
            .max(1);
        // A growing list (`[1, "25%", "100%"]`) gives sizes of the whole, not increments.
        let n = size.min(total - i);
        out.push(hosts[i..i + n].to_vec());
        i += n;
        k += 1;
    }
    out
}

/// Failed hosts grouped by why, in the order they first appear: `a, b (exit code 1: FAIL os:
/// …); c (refused)`. Fifty hosts failing the same way make one short line, not fifty. Reasons
/// that differ only by naming their own host (``connection to `a` (10.0.0.1:22) refused``)
/// count as the same: the group says ``connection to each host refused``.
fn hosts_by_reason(failures: &[(&str, &str)]) -> String {
    const NAMES_SHOWN: usize = 8;
    // (generic reason, first host's own reason, hosts)
    let mut groups: Vec<(String, &str, Vec<&str>)> = Vec::new();
    for (host, reason) in failures {
        let generic = generic_reason(reason, host);
        match groups.iter_mut().find(|(g, _, _)| *g == generic) {
            Some((_, _, hosts)) => hosts.push(host),
            None => groups.push((generic, reason, vec![host])),
        }
    }
    groups
        .iter()
        .map(|(generic, own, hosts)| {
            let mut names = hosts
                .iter()
                .take(NAMES_SHOWN)
                .copied()
                .collect::<Vec<_>>()
                .join(", ");
            if hosts.len() > NAMES_SHOWN {
                names.push_str(&format!(" and {} more", hosts.len() - NAMES_SHOWN));
            }
            let reason: &str = if hosts.len() == 1 { own } else { generic };
            format!("{names} ({reason})")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `reason` with its own host's name, and the address in parentheses right after it, replaced
/// by "each host".
fn generic_reason(reason: &str, host: &str) -> String {
    let quoted = format!("`{host}`");
    let Some(at) = reason.find(&quoted) else {
        return reason.to_string();
    };
    let mut rest = &reason[at + quoted.len()..];
    if let Some(inner) = rest.strip_prefix(" (") {
        if let Some(end) = inner.find(')') {
            if !inner[..end].contains(char::is_whitespace) {
                rest = &inner[end + 1..];
            }
        }
    }
    format!(
        "{}each host{}",
        &reason[..at],
        rest.replace(&quoted, "the host")
    )
}

impl StepTask {
    /// Runs a step with `on` on each selected host, as its strategy says.
    #[allow(clippy::too_many_lines)]
    pub(super) async fn fan_out(
        &self,
        step: &StepSpec,
        selector: &Selector,
        offset: u32,
    ) -> StepResult {
        let result = |status, attempts, reason: Option<String>| StepResult {
            status,
            attempts,
            duration: Duration::ZERO,
            reason,
            outputs: None,
            skipped_by_when: false,
            deferred: false,
            targets: Vec::new(),
        };
        let hosts = match self.state.inventory().select(selector) {
            Ok(h) => h,
            Err(e) => {
                return result(
                    StepStatus::Failed,
                    offset,
                    Some(format!("`on = \"{selector}\"`: {e}")),
                )
            }
        };
        if hosts.is_empty() {
            return StepResult {
                skipped_by_when: true,
                ..result(
                    StepStatus::Skipped,
                    offset,
                    Some(format!("no host matches `on = \"{selector}\"`")),
                )
            };
        }
        let total = hosts.len();
        let budget = step.strategy.max_failures.of(total);
        let (batches, limit, pause, gate, gate_first) = match &step.strategy.kind {
            StrategyKind::Parallel { limit } => (vec![hosts.clone()], *limit, None, None, false),
            StrategyKind::Rolling {
                batches,
                pause,
                gate,
                gate_before_first,
            } => (
                split_batches(&hosts, batches),
                None,
                pause.as_ref().and_then(|p| p.resolve(&self.plan.params)),
                gate.as_ref(),
                *gate_before_first,
            ),
        };
        // On resume, hosts that finished their part with success are not run again — unless
        // the operator picked the step again, or per-host outputs would have to be restored
        // (they are not recorded per host).
        let keep_earlier =
            !self.plan.selected[self.index] || !(self.plan.rerun_selected || step.always);
        let declares_outputs = !step.outputs.is_empty()
            || matches!(&step.action, Action::Block { steps } if steps.iter().any(|s| !s.outputs.is_empty()));
        let done_earlier: Arc<std::collections::HashMap<String, u32>> =
            Arc::new(if keep_earlier && !declares_outputs {
                self.plan.prior[self.index]
                    .done_targets
                    .iter()
                    .cloned()
                    .collect()
            } else {
                std::collections::HashMap::new()
            });
        let step_limit = Arc::new(Semaphore::new(limit.unwrap_or(total).max(1)));
        let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut done: Vec<(Arc<Host>, TargetRun)> = Vec::with_capacity(total);
        let mut stop: Option<String> = None;
        for (b, batch) in batches.iter().enumerate() {
            if let (Some(gate), true, 0, None) = (gate, gate_first, b, &stop) {
                if let Err(why) = self.gate(step, gate, 0, &done).await {
                    stop = Some(why);
                }
            }
            if stop.is_none() && b > 0 {
                if let Some(p) = pause {
                    tokio::select! {
                        () = tokio::time::sleep(p) => {}
                        () = self.cancel.cancelled() => {}
                    }
                }
                if let Some(gate) = gate {
                    if let Err(why) = self.gate(step, gate, b, &done).await {
                        stop = Some(why);
                    }
                }
            }
            if self.cancel.is_cancelled() && stop.is_none() {
                stop = Some("the run was cancelled".into());
            }
            if let Some(why) = &stop {
                for h in batch {
                    done.push((h.clone(), TargetRun::not_started(offset, why)));
                }
                continue;
            }
            let mut tasks = JoinSet::new();
            for (pos, h) in batch.iter().enumerate() {
                let me = self.clone();
                let h = h.clone();
                let step_limit = step_limit.clone();
                let failed = failed.clone();
                let done_earlier = done_earlier.clone();
                tasks.spawn(async move {
                    let step = me.step();
                    if let Some(&attempts) = done_earlier.get(&h.name) {
                        let run = TargetRun::succeeded_earlier(attempts);
                        me.target_finished(step, &h, &run).await;
                        return (pos, h, run);
                    }
                    let permit = step_limit.acquire_owned().await.ok();
                    let so_far = failed.load(std::sync::atomic::Ordering::SeqCst);
                    if permit.is_none() || so_far > budget {
                        let why = format!(
                            "{so_far} host(s) failed, more than `max_failures` ({budget}) allows"
                        );
                        return (pos, h, TargetRun::not_started(offset, &why));
                    }
                    let run = me.run_host(step, &h, offset).await;
                    me.target_finished(step, &h, &run).await;
                    if run.status == StepStatus::Failed {
                        failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    (pos, h, run)
                });
            }
            let mut in_batch: Vec<(usize, Arc<Host>, TargetRun)> = Vec::new();
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok(r) => in_batch.push(r),
                    Err(e) => panic!("host task failed: {e}"),
                }
            }
            in_batch.sort_by_key(|(pos, _, _)| *pos);
            let batch_failed = in_batch
                .iter()
                .filter(|(_, _, r)| r.status == StepStatus::Failed)
                .count();
            done.extend(in_batch.into_iter().map(|(_, h, r)| (h, r)));
            let failed_now = failed.load(std::sync::atomic::Ordering::SeqCst);
            if matches!(step.strategy.kind, StrategyKind::Rolling { .. }) {
                emit(
                    &self.events,
                    RunEvent::Batch {
                        at: Utc::now(),
                        step: step.id.clone(),
                        number: b + 1,
                        hosts: batch.iter().map(|h| h.name.clone()).collect(),
                        failed: batch_failed,
                        gate: None,
                    },
                )
                .await;
            }
            if failed_now > budget && stop.is_none() {
                stop = Some(format!(
                    "{failed_now} host(s) failed, more than `max_failures` ({budget}) allows"
                ));
            }
        }
        // Selection order, whatever order hosts finished in.
        done.sort_by_key(|(h, _)| hosts.iter().position(|x| x.name == h.name));
        let mut hosts_map = Map::new();
        let mut targets = Vec::with_capacity(done.len());
        let mut attempts = offset;
        let mut failures = Vec::new();
        let mut cancelled = false;
        for (h, r) in &done {
            attempts = attempts.max(r.attempts);
            let mut m = r.output.clone().unwrap_or_default();
            m.insert("status".into(), r.status.as_str().into());
            m.insert(
                "reason".into(),
                r.reason.clone().map_or(Dynamic::UNIT, Into::into),
            );
            m.entry("outputs".into())
                .or_insert_with(|| Dynamic::from_map(Map::new()));
            hosts_map.insert(h.name.as_str().into(), Dynamic::from_map(m));
            match r.status {
                StepStatus::Failed => {
                    failures.push((h.name.as_str(), r.reason.as_deref().unwrap_or("failed")));
                }
                StepStatus::Cancelled => cancelled = true,
                _ => {}
            }
            targets.push(TargetResult {
                target: h.name.clone(),
                status: r.status,
                attempts: r.attempts,
                reason: r.reason.clone(),
            });
        }
        // `steps.<id>` is the first host's result, with every host's under `hosts`.
        let first = done.iter().find(|(_, r)| r.output.is_some());
        let mut output = first
            .and_then(|(_, r)| r.output.clone())
            .unwrap_or_default();
        output.insert("hosts".into(), Dynamic::from_map(hosts_map));
        self.store(Some(output));
        let outputs = first.and_then(|(_, r)| r.outputs_json(&self.state));
        let ran = done
            .iter()
            .filter(|(_, r)| r.status != StepStatus::Skipped)
            .count();
        let (status, reason) = if cancelled || (self.cancel.is_cancelled() && ran < total) {
            (
                StepStatus::Cancelled,
                Some("cancelled while running".into()),
            )
        } else if failures.len() > budget || stop.is_some() {
            let mut why = if failures.is_empty() {
                String::new()
            } else {
                format!(
                    "{} of {total} host(s) failed: {}",
                    failures.len(),
                    hosts_by_reason(&failures)
                )
            };
            if let Some(s) = &stop {
                if ran < total {
                    if !why.is_empty() {
                        why.push_str("; ");
                    }
                    why.push_str(&format!("{} host(s) not started: {s}", total - ran));
                }
            }
            (StepStatus::Failed, Some(why))
        } else if !failures.is_empty() {
            (
                StepStatus::Succeeded,
                Some(format!(
                    "{} of {total} host(s) failed, within `max_failures` ({budget}): {}",
                    failures.len(),
                    hosts_by_reason(&failures)
                )),
            )
        } else if done.iter().all(|(_, r)| r.status == StepStatus::Skipped) {
            (StepStatus::Skipped, Some("skipped on every host".into()))
        } else {
            (StepStatus::Succeeded, None)
        };
        StepResult {
            outputs,
            targets,
            ..result(status, attempts, reason)
        }
    }

    /// Records that a host finished its part of the step, before the next batch (or the
    /// step's end): what `resume` reads to leave it alone.
    async fn target_finished(&self, step: &StepSpec, host: &Host, run: &TargetRun) {
        emit(
            &self.events,
            RunEvent::TargetFinished {
                at: Utc::now(),
                step: step.id.clone(),
                result: TargetResult {
                    target: host.name.clone(),
                    status: run.status,
                    attempts: run.attempts,
                    reason: run.reason.clone(),
                },
            },
        )
        .await;
    }

    /// Between two batches of a rolling step: what must hold before the next starts.
    pub(super) async fn gate(
        &self,
        step: &StepSpec,
        gate: &Gate,
        batch: usize,
        done: &[(Arc<Host>, TargetRun)],
    ) -> Result<(), String> {
        let outcome = match gate {
            Gate::Expr(e) => {
                let mut scope = self.scope(None);
                let mut info = Map::new();
                info.insert("batch".into(), Dynamic::from_int(batch as i64));
                info.insert(
                    "hosts".into(),
                    Dynamic::from_array(
                        done.iter()
                            .map(|(h, _)| Dynamic::from(h.name.clone()))
                            .collect(),
                    ),
                );
                info.insert(
                    "failed".into(),
                    Dynamic::from_int(
                        done.iter()
                            .filter(|(_, r)| r.status == StepStatus::Failed)
                            .count() as i64,
                    ),
                );
                scope.push_constant("output", info);
                let (value, effects) = self.host.eval_with_effects(&e.expr, &mut scope);
                apply_effects(&self.state, &self.events, Some(step), effects).await;
                match condition(&self.plan, &self.state, "`gate`", e, value) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(format!(
                        "the gate {} was false: {}",
                        gate_place(batch),
                        e.expr.text.trim()
                    )),
                    Err(m) => Err(m),
                }
            }
            Gate::Step(probe) => {
                let label: Target = Arc::from(format!("gate-{batch}").as_str());
                let r = self.run_target(probe, label, None, false, 0).await;
                if r.status == StepStatus::Succeeded {
                    Ok(())
                } else {
                    Err(format!(
                        "the gate {} failed: {}",
                        gate_place(batch),
                        r.reason.as_deref().unwrap_or("failed")
                    ))
                }
            }
        };
        emit(
            &self.events,
            RunEvent::Note {
                at: Utc::now(),
                message: match &outcome {
                    Ok(()) => format!("{}: gate {} passed", step.id, gate_place(batch)),
                    Err(why) => format!("{}: {why}", step.id),
                },
            },
        )
        .await;
        outcome
    }

    /// A step (or block) on one host.
    pub(super) async fn run_host(
        &self,
        step: &StepSpec,
        host: &Arc<Host>,
        offset: u32,
    ) -> TargetRun {
        let label: Target = Arc::from(host.name.as_str());
        let Action::Block { steps } = &step.action else {
            return self
                .run_target(step, label, Some(host), !step.local, offset)
                .await;
        };
        let mut failed: Option<(StepStatus, String)> = None;
        let mut attempts = 0;
        let mut block = Map::new();
        for sub in steps {
            if failed.is_some() && !sub.always {
                continue;
            }
            // A cleanup sub-step (`uncordon` after a drain) runs also when the run is being
            // cancelled: under the third interrupt's token, as a `run_on_cancel` step does.
            // The sub-steps before it on this host are in its scope as `block`.
            let this = if sub.run_on_cancel && self.cancel.is_cancelled() {
                StepTask {
                    cancel: self.abort.clone(),
                    force: self.abort.clone(),
                    block: Some(block.clone()),
                    ..self.clone()
                }
            } else {
                StepTask {
                    block: Some(block.clone()),
                    ..self.clone()
                }
            };
            let sub_label: Target = Arc::from(format!("{}/{}", host.name, sub.id).as_str());
            if let Some(when) = &sub.when {
                let (value, effects) = this
                    .host
                    .eval_with_effects(&when.expr, &mut this.scope(Some(host)));
                apply_effects(&self.state, &self.events, Some(step), effects).await;
                match condition(&self.plan, &self.state, "`when`", when, value) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(m) => {
                        failed.get_or_insert((StepStatus::Failed, format!("`{}`: {m}", sub.id)));
                        continue;
                    }
                }
            }
            // Resumed: a sub-step's attempts go on from those its target already made.
            let sub_offset = self.plan.prior[self.index]
                .target_attempts
                .get(&*sub_label)
                .copied()
                .unwrap_or(0);
            let r = this
                .run_target(sub, sub_label, Some(host), !sub.local, sub_offset)
                .await;
            attempts += r.attempts;
            let mut m = r.output.clone().unwrap_or_default();
            m.insert("status".into(), r.status.as_str().into());
            block.insert(sub.id.as_str().into(), Dynamic::from_map(m));
            if r.status != StepStatus::Succeeded
                && !(sub.continue_on_failure && r.status == StepStatus::Failed)
            {
                failed.get_or_insert((
                    r.status,
                    format!("`{}`: {}", sub.id, r.reason.as_deref().unwrap_or("failed")),
                ));
            }
        }
        let mut output = Map::new();
        output.insert("steps".into(), Dynamic::from_map(block));
        let (status, reason) = match failed {
            None => (StepStatus::Succeeded, None),
            Some((StepStatus::Cancelled, why)) => (StepStatus::Cancelled, Some(why)),
            Some((_, why)) => (StepStatus::Failed, Some(why)),
        };
        TargetRun {
            status,
            attempts: offset + attempts,
            reason,
            output: Some(output),
            outputs: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::hosts_by_reason;

    #[test]
    fn failed_hosts_are_grouped_by_reason_and_long_groups_are_cut() {
        let many: Vec<String> = (0..10).map(|i| format!("w{i}")).collect();
        let mut failures: Vec<(&str, &str)> =
            vec![("s1", "refused"), ("s2", "exit code 1: FAIL os")];
        failures.extend(many.iter().map(|h| (h.as_str(), "exit code 1: FAIL os")));
        failures.push(("s3", "refused"));
        assert_eq!(
            hosts_by_reason(&failures),
            "s1, s3 (refused); s2, w0, w1, w2, w3, w4, w5, w6 and 3 more (exit code 1: FAIL os)"
        );
    }

    #[test]
    fn reasons_that_only_name_their_own_host_are_one_group() {
        let failures = [
            (
                "n1",
                "connection to `n1` (10.0.0.1:22) refused (after 3 attempts)",
            ),
            (
                "n2",
                "connection to `n2` ([fd00::2]:2222) refused (after 3 attempts)",
            ),
            (
                "n3",
                "authentication as `root` on `n3` failed; tried: agent",
            ),
            ("n4", "connecting to `n4` timed out after 10.0s"),
        ];
        assert_eq!(
            hosts_by_reason(&failures),
            "n1, n2 (connection to each host refused (after 3 attempts)); \
             n3 (authentication as `root` on `n3` failed; tried: agent); \
             n4 (connecting to `n4` timed out after 10.0s)"
        );
        let same = [
            (
                "n1",
                "no key exchange algorithm in common with `n1`: the server offers a",
            ),
            (
                "n2",
                "no key exchange algorithm in common with `n2`: the server offers a",
            ),
        ];
        assert_eq!(
            hosts_by_reason(&same),
            "n1, n2 (no key exchange algorithm in common with each host: the server offers a)"
        );
    }
}
