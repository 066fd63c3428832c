//! `collect`: asks the evidence consumer to copy the files a step names.

#[allow(clippy::wildcard_imports)]
use super::*;

impl StepTask {
    pub(super) async fn collect(
        &self,
        spec: &StepSpec,
        host: Option<&Arc<Host>>,
        cwd: &std::path::Path,
    ) {
        let step = self.step();
        let mut scope = self.scope(host);
        for tpl in &spec.collect {
            let message = match tpl.render(&self.host, &mut scope) {
                Ok(name) => {
                    let (receipt, copied) = crate::event::Receipt::new();
                    emit(
                        &self.events,
                        RunEvent::Collect {
                            at: Utc::now(),
                            receipt,
                            step: step.id.clone(),
                            path: cwd.join(&name),
                            name,
                        },
                    )
                    .await;
                    // Completes when the recorder has copied the file.
                    if self.barrier {
                        let _ = copied.await;
                    }
                    continue;
                }
                Err(e) => format!("step `{}`: could not collect `{}`: {e}", step.id, tpl.raw()),
            };
            emit(
                &self.events,
                RunEvent::Note {
                    at: Utc::now(),
                    message,
                },
            )
            .await;
        }
    }
}
