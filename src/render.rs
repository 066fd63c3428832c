//! Rendering engine diagnostics for people: `file:line:col`, the source line, a caret, help.

use std::collections::HashMap;
use std::io::IsTerminal;

use codespan_reporting::diagnostic as cs;
use codespan_reporting::files::SimpleFiles;
use codespan_reporting::term::{self, termcolor};
use runbook_engine::diagnostic::{Diagnostic, Severity};

/// Whether to colour stderr: a terminal, and `NO_COLOR` unset.
pub fn stderr_color() -> bool {
    std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal()
}

pub fn diagnostics_to_string(diags: &[Diagnostic], color: bool) -> String {
    let mut files = SimpleFiles::new();
    let mut ids: HashMap<*const runbook_engine::Source, usize> = HashMap::new();
    let mut buffer = if color {
        termcolor::Buffer::ansi()
    } else {
        termcolor::Buffer::no_color()
    };
    let config = term::Config::default();
    for d in diags {
        // A snippet of a megabyte-long line (minified or generated TOML) would bury the message:
        // such a diagnostic says where in words instead.
        if let Some(l) = d
            .primary
            .iter()
            .find(|l| longest_line(&l.source, &l.span) > MAX_SNIPPET_LINE)
        {
            let lc = l.source.line_col(l.span.start);
            let label = if l.message.is_empty() || d.message.contains(&l.message) {
                String::new()
            } else {
                format!("{}; ", l.message)
            };
            let message = format!(
                "{}:{}:{}: {} ({label}the line is too long to show)",
                l.source.path().display(),
                lc.line,
                lc.column,
                d.message,
            );
            let base = match d.severity {
                Severity::Error => cs::Diagnostic::error(),
                Severity::Warning => cs::Diagnostic::warning(),
            };
            let notes = d
                .notes
                .iter()
                .map(|n| format!("note: {n}"))
                .chain(d.help.iter().map(|h| format!("help: {h}")))
                .collect();
            let out = base
                .with_code(d.code.as_str())
                .with_message(message)
                .with_notes(notes);
            let _ = term::emit(&mut buffer, &config, &files, &out);
            continue;
        }
        let mut labels = Vec::new();
        for (primary, label) in d
            .primary
            .iter()
            .map(|l| (true, l))
            .chain(d.secondary.iter().map(|l| (false, l)))
        {
            let key = std::sync::Arc::as_ptr(&label.source);
            let id = *ids.entry(key).or_insert_with(|| {
                files.add(
                    label.source.path().display().to_string(),
                    label.source.text().to_owned(),
                )
            });
            let l = if primary {
                cs::Label::primary(id, label.span.clone())
            } else {
                cs::Label::secondary(id, label.span.clone())
            };
            labels.push(l.with_message(label.message.clone()));
        }
        let mut notes: Vec<String> = d.notes.iter().map(|n| format!("note: {n}")).collect();
        if let Some(h) = &d.help {
            notes.push(format!("help: {h}"));
        }
        let base = match d.severity {
            Severity::Error => cs::Diagnostic::error(),
            Severity::Warning => cs::Diagnostic::warning(),
        };
        let out = base
            .with_code(d.code.as_str())
            .with_message(d.message.clone())
            .with_labels(labels)
            .with_notes(notes);
        let _ = term::emit(&mut buffer, &config, &files, &out);
    }
    String::from_utf8_lossy(buffer.as_slice()).into_owned()
}

/// Longest line, in bytes, that a span touches.
fn longest_line(source: &runbook_engine::Source, span: &std::ops::Range<usize>) -> usize {
    // Bytes, not `str` slices: a span need not fall on a character boundary here.
    let bytes = source.text().as_bytes();
    let (from, to) = (span.start.min(bytes.len()), span.end.min(bytes.len()));
    let start = bytes[..from]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let end = bytes[to..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |i| to + i);
    bytes[start..end]
        .split(|&b| b == b'\n')
        .map(<[u8]>::len)
        .max()
        .unwrap_or(0)
}

/// Lines longer than this are not shown in snippets.
const MAX_SNIPPET_LINE: usize = 1000;

/// Prints an error for which there is no source position (a missing file, a bad flag).
pub fn error(message: &str) {
    if stderr_color() {
        eprintln!("\x1b[1;31merror\x1b[0m: {message}");
    } else {
        eprintln!("error: {message}");
    }
}

/// Prints a warning: something the operator should know that does not stop the command.
pub fn warning(message: &str) {
    if stderr_color() {
        eprintln!("\x1b[1;33mwarning\x1b[0m: {message}");
    } else {
        eprintln!("warning: {message}");
    }
}

/// A file that could not be read, as a diagnostic (pointing at the first byte that is not
/// UTF-8 when that is why).
pub(crate) fn print_load_error(path: &std::path::Path, e: &runbook_engine::LoadError) {
    use runbook_engine::diagnostic::{Code, Diagnostic};
    let mut d = Diagnostic::error(Code::Unreadable, e.to_string());
    if let runbook_engine::LoadError::NotUtf8 { offset, .. } = e {
        if let Ok(bytes) = std::fs::read(path) {
            let text = String::from_utf8_lossy(&bytes[..(*offset).min(bytes.len())]).into_owned();
            let source = runbook_engine::Source::new(path, text.clone() + "\u{fffd}");
            d = d
                .at(&source, text.len()..text.len() + 1, "not UTF-8")
                .help("save the file as UTF-8 text");
        }
    }
    print_diagnostics(&runbook_engine::Diagnostics(vec![d]));
}

/// Diagnostics on stderr, coloured when it is a terminal.
pub(crate) fn print_diagnostics(diags: &runbook_engine::Diagnostics) {
    if !diags.0.is_empty() {
        eprint!("{}", diagnostics_to_string(&diags.0, stderr_color()));
    }
}
