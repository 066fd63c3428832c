//! `runbook evidence list | show | export`: finding and presenting bundles.

use std::path::{Path, PathBuf};

use runbook_evidence::manifest::Manifest;

fn load(bundle: &Path) -> Result<Manifest, String> {
    let path = bundle.join("manifest.json");
    let data =
        std::fs::read(&path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    serde_json::from_slice(&data)
        .map_err(|e| format!("`{}` is not a runbook manifest: {e}", path.display()))
}

/// What `list` and `show` call a bundle's status. A manifest that still says `running` while no
/// live run holds its runbook's lock (looking, not locking) belongs to a run that died before
/// it could seal it (`kill -9`, a crash, a full disk): calling that "running" would send an
/// operator to wait for nothing.
fn shown_status(bundle: &Path, m: &Manifest) -> &'static str {
    if m.status != runbook_engine::event::RunStatus::Running {
        return m.status.as_str();
    }
    let runbook_dir = bundle.parent().unwrap_or(Path::new("."));
    match crate::lock::RunLock::live_holder(runbook_dir) {
        Some(h) if h.run_id == m.run_id => m.status.as_str(),
        _ => STOPPED_UNSEALED,
    }
}

const STOPPED_UNSEALED: &str = "stopped unsealed";

/// Said once under a list or a summary that shows [`STOPPED_UNSEALED`].
const STOPPED_UNSEALED_HELP: &str = "stopped unsealed: its run ended without sealing the \
bundle (killed, crashed, or its evidence could not be written); `runbook resume BUNDLE` \
continues it, `runbook evidence repair BUNDLE` records it as interrupted\n";

/// Every bundle under `<dir>/<runbook>/`, oldest first.
pub fn find(dir: &Path) -> Vec<(PathBuf, Manifest)> {
    let mut out = Vec::new();
    for rb in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for b in std::fs::read_dir(rb.path()).into_iter().flatten().flatten() {
            if let Ok(m) = load(&b.path()) {
                out.push((b.path(), m));
            }
        }
    }
    out.sort_by_key(|(_, m)| m.started_at);
    out
}

pub fn list(dir: &Path) -> Result<String, String> {
    if !dir.is_dir() {
        return Err(format!("`{}` is not a directory of bundles", dir.display()));
    }
    let bundles = find(dir);
    let mut out = format!(
        "{:<20}  {:<24}  {:<8}  {:<17}  {:>9}  {:<20}  BUNDLE\n",
        "STARTED (UTC)", "RUNBOOK", "RUN", "STATUS", "DURATION", "OPERATOR"
    );
    let mut unsealed = false;
    for (path, m) in &bundles {
        let status = shown_status(path, m);
        unsealed |= status == STOPPED_UNSEALED;
        let duration = m
            .duration_seconds
            .map(|d| {
                runbook_engine::duration::format_duration(std::time::Duration::from_secs_f64(
                    d.max(0.0),
                ))
            })
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<20}  {:<24}  {:<8}  {:<17}  {:>9}  {:<20}  {}\n",
            m.started_at.format("%Y-%m-%d %H:%M:%S"),
            m.runbook.name,
            m.run_id,
            status,
            duration,
            format!("{}@{}", m.operator.user, m.operator.host),
            path.display()
        ));
    }
    out.push_str(&format!("{} bundle(s)\n", bundles.len()));
    if unsealed {
        out.push_str(STOPPED_UNSEALED_HELP);
    }
    Ok(out)
}

pub fn show(bundle: &Path) -> Result<String, String> {
    let m = load(bundle)?;
    let mut out = String::new();
    let title = m
        .runbook
        .title
        .clone()
        .unwrap_or_else(|| m.runbook.name.clone());
    out.push_str(&format!("{title}\n"));
    out.push_str(&format!(
        "  runbook   {} ({}), sha256 {}\n",
        m.runbook.name,
        m.runbook.path,
        &m.runbook.sha256[..16.min(m.runbook.sha256.len())]
    ));
    let status = shown_status(bundle, &m);
    out.push_str(&format!(
        "  run       {}  status {}\n",
        m.run_id,
        status.to_uppercase()
    ));
    if status == STOPPED_UNSEALED {
        out.push_str(&format!("            {STOPPED_UNSEALED_HELP}"));
    }
    out.push_str(&format!(
        "  operator  {}@{} (uid {})\n",
        m.operator.user, m.operator.host, m.operator.uid
    ));
    out.push_str(&format!(
        "  started   {}   finished {}\n",
        m.started_at.to_rfc3339(),
        m.finished_at.map_or_else(|| "-".into(), |t| t.to_rfc3339())
    ));
    if !m.runbook.refs.is_empty() {
        out.push_str(&format!("  refs      {}\n", m.runbook.refs.join(", ")));
    }
    out.push_str("\n  STEP                      STATUS      ATTEMPTS  DURATION  NOTE\n");
    for s in &m.steps {
        out.push_str(&format!(
            "  {:<24}  {:<10}  {:>8}  {:>8}  {}\n",
            s.id,
            s.status.map_or("not run", |st| st.as_str()),
            s.attempts.len(),
            runbook_engine::duration::format_duration(std::time::Duration::from_secs_f64(
                s.duration_seconds.max(0.0)
            )),
            s.reason.as_deref().unwrap_or("")
        ));
    }
    for a in &m.approvals {
        out.push_str(&format!(
            "\n  {} {} by {} at {}",
            a.step,
            if a.granted { "approved" } else { "refused" },
            a.by,
            a.at.to_rfc3339()
        ));
    }
    for n in &m.notes {
        out.push_str(&format!("\n  note: {}", n.message));
    }
    let signed = bundle.join("SHA256SUMS.minisig").is_file();
    out.push_str(&format!(
        "\n\n  report: {}\n  signed: {}; check with `runbook evidence verify {}{}`\n",
        bundle.join("report.html").display(),
        if signed { "yes" } else { "no" },
        bundle.display(),
        if signed { " --pubkey KEY.pub" } else { "" }
    ));
    Ok(out)
}

/// Writes `<bundle-name>.tar.gz` (or `to`) holding the bundle under its own name. The files
/// are stored byte for byte, so `SHA256SUMS` and the signature verify after extraction. An
/// existing file is replaced only when `overwrite`.
pub fn export(bundle: &Path, to: Option<&Path>, overwrite: bool) -> Result<PathBuf, String> {
    load(bundle)?;
    let name = bundle
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .ok_or_else(|| format!("`{}` has no name", bundle.display()))?;
    let dest = to.map_or_else(
        || PathBuf::from(format!("{name}.tar.gz")),
        Path::to_path_buf,
    );
    let io = |e: std::io::Error| format!("cannot write `{}`: {e}", dest.display());
    // `create_new` refuses an existing file without a window between checking and creating.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(overwrite)
        .truncate(overwrite)
        .create_new(!overwrite)
        .open(&dest)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                format!(
                    "`{}` already exists; pass `--force` to overwrite it",
                    dest.display()
                )
            } else {
                io(e)
            }
        })?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    tar.append_dir_all(&name, bundle).map_err(io)?;
    let gz = tar.into_inner().map_err(io)?;
    let file = gz.finish().map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(dest)
}
