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

/// Writes an upload on this machine with the one atomic write ([`runbook_engine::fs`]): a
/// synced temporary sibling with its mode, then a rename, so a reader sees the old file or the
/// new one, never half of one.
pub(crate) async fn run_attempt(ctx: &AttemptContext, out: &mut OutputSink) -> AttemptOutcome {
    let result = async {
        let spec = UploadSpec::parse(&ctx.spec)?;
        let data = spec.bytes(&ctx.base_dir)?;
        let mode = spec.mode()?;
        let dest = ctx.cwd.join(&spec.dest);
        // Owner-only unless `mode` says otherwise, set exactly (not through the umask).
        runbook_engine::fs::stage(&dest, 0o600, |file| {
            std::io::Write::write_all(file, &data)?;
            if let Some(m) = mode {
                use std::os::unix::fs::PermissionsExt;
                file.set_permissions(std::fs::Permissions::from_mode(m))?;
            }
            Ok(())
        })
        .and_then(runbook_engine::fs::Staged::commit)
        .map_err(|e| format!("upload: {}: {e}", dest.display()))?;
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use runbook_engine::runbook::{RequestKind, StepId};
    use tokio_util::sync::CancellationToken;

    use super::*;

    /// One local upload of `spec` in `dir`: its outcome and the names left in `dir`.
    async fn upload(dir: &Path, spec: serde_json::Value) -> (AttemptOutcome, Vec<String>) {
        let ctx = AttemptContext {
            step: StepId::new("put"),
            target: Arc::from("local"),
            attempt: 1,
            run_id: "r".into(),
            command: String::new(),
            shell: Vec::new(),
            env: Vec::new(),
            cwd: dir.to_owned(),
            timeout: None,
            kill_grace: std::time::Duration::from_secs(1),
            cancel: CancellationToken::new(),
            force: CancellationToken::new(),
            kind: Some(RequestKind::Upload),
            spec,
            host: None,
            jumps: Vec::new(),
            sudo: false,
            become_password: None,
            pty: false,
            secrets: Vec::new(),
            base_dir: dir.to_owned(),
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let mut out = OutputSink::new(tx, StepId::new("put"), Arc::from("local"), 1);
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let outcome = run_attempt(&ctx, &mut out).await;
        drop(out);
        drain.await.expect("drain");
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        (outcome, names)
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn a_local_upload_replaces_the_file_with_its_mode_and_leaves_nothing_beside_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("config.yaml");
        let (outcome, names) = upload(
            dir.path(),
            serde_json::json!({ "content": "one\n", "dest": "config.yaml" }),
        )
        .await;
        assert!(matches!(outcome, AttemptOutcome::Exited { code: 0 }), "{outcome:?}");
        assert_eq!(names, ["config.yaml"]);
        assert_eq!(std::fs::read_to_string(&dest).expect("read"), "one\n");
        assert_eq!(mode(&dest), 0o600, "owner-only without a mode");

        // A mode is set exactly, whatever the umask; the old file is replaced whole.
        let (outcome, names) = upload(
            dir.path(),
            serde_json::json!({ "content": "two\n", "dest": "config.yaml", "mode": "0664" }),
        )
        .await;
        assert!(matches!(outcome, AttemptOutcome::Exited { code: 0 }), "{outcome:?}");
        assert_eq!(names, ["config.yaml"]);
        assert_eq!(std::fs::read_to_string(&dest).expect("read"), "two\n");
        assert_eq!(mode(&dest), 0o664);

        // Into a directory that is not there: a failure naming the destination, nothing left.
        let (outcome, names) = upload(
            dir.path(),
            serde_json::json!({ "content": "x", "dest": "missing/config.yaml" }),
        )
        .await;
        assert!(
            matches!(&outcome, AttemptOutcome::Failed { message, .. } if message.contains("missing/config.yaml")),
            "{outcome:?}"
        );
        assert_eq!(names, ["config.yaml"]);
    }
}
