//! The `upload` step kind run on this machine (a host step's upload goes over SSH, in
//! `dispatch`): the rendered settings and an atomic write.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use runbook_engine::event::{AttemptOutcome, FailureKind, Stream};
use runbook_engine::runner::{AttemptContext, OutputSink};

use crate::dispatch::failed;

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
        self.mode
            .as_ref()
            .map(|m| runbook_engine::request_check::mode(m).map_err(|e| format!("upload: {e}")))
            .transpose()
    }
}

/// Writes an upload on this machine: a temporary sibling, its mode, then a rename, so a
/// reader sees the old file or the new one, never half of one.
pub(crate) async fn run_attempt(ctx: &AttemptContext, out: &mut OutputSink) -> AttemptOutcome {
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
