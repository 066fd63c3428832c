//! Routes each attempt to the runner for its kind and place: a shell command here or on a
//! host over SSH, an HTTP or TCP probe, a screenshot, a file upload. The one
//! [`StepRunner`] the CLI hands to the executor.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use runbook_engine::event::{AttemptOutcome, FailureKind, Stream};
use runbook_engine::runbook::RequestKind;
use runbook_engine::runner::{AttemptContext, BoxFuture, OutputSink, StepRunner};

use crate::local::LocalRunner;

/// Runs every kind of attempt; holds what lives longer than one attempt (SSH connections).
#[derive(Default)]
pub struct Dispatcher {
    local: LocalRunner,
}

impl Dispatcher {
    pub fn new() -> Self {
        Self::default()
    }
}

impl StepRunner for Dispatcher {
    fn run<'a>(
        &'a self,
        ctx: AttemptContext,
        out: &'a mut OutputSink,
    ) -> BoxFuture<'a, AttemptOutcome> {
        Box::pin(async move {
            match (ctx.kind, ctx.host.is_some()) {
                (None, false) => self.local.run(ctx, out).await,
                (Some(RequestKind::Upload), false) => upload_local(&ctx, out).await,
                (kind, remote) => failed(
                    FailureKind::Config,
                    format!(
                        "{} {} is not supported by this build",
                        kind.map_or("a command", RequestKind::key),
                        if remote { "on a host" } else { "here" }
                    ),
                ),
            }
        })
    }
}

pub(crate) fn failed(failure: FailureKind, message: impl Into<String>) -> AttemptOutcome {
    AttemptOutcome::Failed {
        failure,
        message: message.into(),
    }
}

/// `upload = { src | content, dest, mode }` as rendered.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadSpec {
    pub src: Option<PathBuf>,
    pub content: Option<String>,
    pub dest: String,
    /// Octal, as a string (`"0600"`) or a number written in octal digits (`600`).
    pub mode: Option<serde_json::Value>,
}

impl UploadSpec {
    pub fn parse(spec: &serde_json::Value) -> Result<Self, String> {
        serde_json::from_value(spec.clone()).map_err(|e| format!("upload: {e}"))
    }

    /// The bytes to write: `content`, or the `src` file (relative to the runbook).
    pub fn bytes(&self, base_dir: &Path) -> Result<Bytes, String> {
        match (&self.content, &self.src) {
            (Some(c), None) => Ok(Bytes::from(c.clone())),
            (None, Some(src)) => {
                let path = base_dir.join(src);
                std::fs::read(&path)
                    .map(Bytes::from)
                    .map_err(|e| format!("upload: cannot read `{}`: {e}", path.display()))
            }
            _ => Err("upload: needs exactly one of `src` and `content`".into()),
        }
    }

    pub fn mode(&self) -> Result<Option<u32>, String> {
        let text = match &self.mode {
            None => return Ok(None),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            Some(other) => return Err(format!("upload: `mode = {other}` is not an octal mode")),
        };
        u32::from_str_radix(text.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .map(Some)
            .ok_or_else(|| {
                format!("upload: `mode = \"{text}\"` is not an octal mode like \"0644\"")
            })
    }
}

/// Writes an upload on this machine: a temporary sibling, its mode, then a rename, so a
/// reader sees the old file or the new one, never half of one.
async fn upload_local(ctx: &AttemptContext, out: &mut OutputSink) -> AttemptOutcome {
    let result = async {
        let spec = UploadSpec::parse(&ctx.spec)?;
        let data = spec.bytes(&ctx.base_dir)?;
        let mode = spec.mode()?;
        let dest = ctx.cwd.join(&spec.dest);
        let dir = dest.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::Builder::new()
            .prefix(".runbook-upload-")
            .tempfile_in(dir)
            .map_err(|e| format!("upload: {}: {e}", dir.display()))?;
        std::io::Write::write_all(&mut tmp, &data)
            .map_err(|e| format!("upload: {}: {e}", tmp.path().display()))?;
        if let Some(m) = mode {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(m))
                .map_err(|e| format!("upload: chmod {}: {e}", tmp.path().display()))?;
        }
        tmp.persist(&dest)
            .map_err(|e| format!("upload: {}: {}", dest.display(), e.error))?;
        Ok::<_, String>(format!(
            "wrote {} bytes to {}{}\n",
            data.len(),
            dest.display(),
            mode.map(|m| format!(" (mode {m:04o})")).unwrap_or_default()
        ))
    }
    .await;
    match result {
        Ok(line) => {
            out.write(Stream::Stdout, Bytes::from(line)).await;
            AttemptOutcome::Exited { code: 0 }
        }
        Err(message) => failed(FailureKind::Config, message),
    }
}
