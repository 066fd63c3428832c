//! What changes while a plan runs: secrets registered at run time (`secret()`), hosts added by
//! `inventory.add_host`, and the drill clock. A [`Plan`] is fixed once made; the executor keeps
//! one [`RunState`] per run beside it.

use std::sync::{Arc, Mutex, RwLock};

use rhai::Scope;

use crate::inventory::{Inventory, NewHost};
use crate::plan::{Plan, RunInfo};
use crate::redact::Redactor;

/// A drill clock start or stop.
#[derive(Debug, Clone, Copy)]
pub struct ClockMark {
    pub start: bool,
    pub at: chrono::DateTime<chrono::Utc>,
    /// Monotonic: RTO is measured with this, immune to wall-clock steps (NTP).
    pub instant: tokio::time::Instant,
}

/// The mutable side of one run of a plan. Shared by the step tasks; every lock is held only
/// for a copy or a push, never across an await.
#[derive(Debug)]
pub struct RunState {
    /// Secret values known so far: the plan's secret params, then whatever `secret()` registers.
    redactor: RwLock<Redactor>,
    /// The hosts remote steps run on; grows when expressions call `inventory.add_host`.
    inventory: RwLock<Arc<Inventory>>,
    /// A drill's clock marks in order, from its clock steps and `drill.start_clock()`/
    /// `stop_clock()`: the monotonic instant measures, the wall-clock time is what evidence shows.
    clock: Mutex<Vec<ClockMark>>,
}

impl RunState {
    /// The state a run of `plan` starts from.
    pub fn new(plan: &Plan) -> Self {
        Self {
            redactor: RwLock::new(Redactor::new(plan.params.secrets())),
            inventory: RwLock::new(plan.inventory()),
            clock: Mutex::default(),
        }
    }

    /// The inventory as it is now.
    pub fn inventory(&self) -> Arc<Inventory> {
        self.inventory
            .read()
            .map_or_else(|_| Arc::new(Inventory::default()), |i| i.clone())
    }

    /// Adds hosts from `inventory.add_host`; each error says which host and why.
    pub fn add_hosts(&self, hosts: &[NewHost]) -> Vec<String> {
        let mut errors = Vec::new();
        if let Ok(mut i) = self.inventory.write() {
            let inv = Arc::make_mut(&mut i);
            for h in hosts {
                if let Err(e) = inv.add_host(h) {
                    errors.push(e.to_string());
                }
            }
        }
        errors
    }

    /// Records a drill clock start (`true`) or stop.
    pub fn clock(&self, start: bool, at: chrono::DateTime<chrono::Utc>) {
        if let Ok(mut c) = self.clock.lock() {
            c.push(ClockMark {
                start,
                at,
                instant: tokio::time::Instant::now(),
            });
        }
    }

    /// The clock marks so far, in order.
    pub fn clock_marks(&self) -> Vec<ClockMark> {
        self.clock.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Secret values known so far, for runners that must keep them out of what they print.
    pub fn secret_values(&self) -> Vec<String> {
        self.redactor
            .read()
            .map(|r| r.secrets().iter().map(|(_, v)| v.clone()).collect())
            .unwrap_or_default()
    }

    /// Redacts every secret known so far.
    pub fn redact(&self, text: &str) -> String {
        self.redactor
            .read()
            .map_or_else(|_| text.to_owned(), |r| r.redact_str(text))
    }

    /// Redacts every string (and key) of a JSON value with the secrets known so far.
    pub fn redact_json(&self, value: &mut serde_json::Value) {
        if let Ok(r) = self.redactor.read() {
            crate::redact::matcher::redact_json_with(value, &|s| r.redact_str(s));
        }
    }

    /// Adds secrets registered at run time (by `secret()`).
    pub fn add_secrets(&self, secrets: &[(String, String)]) {
        if let Ok(mut r) = self.redactor.write() {
            let mut all = r.secrets().to_vec();
            all.extend(secrets.iter().cloned());
            *r = Redactor::new(all);
        }
    }

    /// The scope every expression of this run starts from: the plan's, with the inventory as
    /// it is now.
    pub fn scope(&self, plan: &Plan, run: &RunInfo) -> Scope<'static> {
        let mut scope = plan.scope(run);
        scope.set_or_push("inventory", crate::expr::InventoryApi(self.inventory()));
        scope
    }
}
