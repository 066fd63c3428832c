//! What an evaluation asked for (secrets, log lines, new hosts, clock marks, notes), applied
//! and sent as events.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Sends what an evaluation asked for as events; registers secrets first so that nothing
/// emitted after them can carry them.
pub(super) async fn apply_effects(
    state: &RunState,
    events: &mpsc::Sender<RunEvent>,
    step: Option<&StepSpec>,
    effects: Effects,
) {
    if !effects.secrets.is_empty() {
        state.add_secrets(&effects.secrets);
        for (name, value) in effects.secrets {
            emit(
                events,
                RunEvent::SecretRegistered {
                    at: Utc::now(),
                    step: step.map(|s| s.id.clone()),
                    name,
                    value,
                },
            )
            .await;
        }
    }
    for message in effects.logs {
        emit(
            events,
            RunEvent::Log {
                at: Utc::now(),
                step: step.map(|s| s.id.clone()),
                message: state.redact(&message),
            },
        )
        .await;
    }
    for new in &effects.new_hosts {
        let errors = state.add_hosts(std::slice::from_ref(new));
        let added = state.inventory().host(&new.name).cloned();
        match (errors.first(), added) {
            (None, Some(h)) => {
                emit(
                    events,
                    RunEvent::HostAdded {
                        at: Utc::now(),
                        step: step.map(|s| s.id.clone()),
                        name: h.name.clone(),
                        address: state.redact(&h.address),
                        groups: h.groups.clone(),
                        spec: serde_json::from_str(&state.redact(&new.spec.to_string()))
                            .unwrap_or_default(),
                    },
                )
                .await;
            }
            (error, _) => {
                emit(
                    events,
                    RunEvent::Note {
                        at: Utc::now(),
                        message: format!(
                            "inventory.add_host(`{}`) failed: {}",
                            new.name,
                            error.map_or("unknown error", String::as_str)
                        ),
                    },
                )
                .await;
            }
        }
    }
    for start in effects.clock {
        state.clock(start, Utc::now());
        emit(
            events,
            RunEvent::Clock {
                at: Utc::now(),
                start,
                step: step.map(|s| s.id.clone()),
            },
        )
        .await;
    }
    for message in effects.notes {
        let message = match step {
            Some(s) => format!("{}: {}", s.id, state.redact(&message)),
            None => state.redact(&message),
        };
        emit(
            events,
            RunEvent::Note {
                at: Utc::now(),
                message,
            },
        )
        .await;
    }
}
