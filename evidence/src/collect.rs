//! Copying what a step names in `collect` into the bundle. Runs on the recorder's thread, which
//! every run event goes through, so nothing here may block: only regular files are opened (a
//! FIFO, a socket or a device could block forever or never end), with `O_NONBLOCK` in case one
//! was swapped in, and each file is read up to [`MAX_FILE`] bytes.
//!
//! Inside a collected directory, symbolic links are not followed: a link could lead out of the
//! directory (to credentials) or back into it (a loop). Each one skipped is reported, as is
//! every other entry that is not copied. A path the runbook names itself may be a link: the
//! runbook asked for what it points to.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{File, FileType, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::redact::ByteRedactor;

/// The most read of one collected file; the copy of a longer one is cut there, with a note.
/// It bounds the time and the disk a file that keeps growing (or `/proc/kcore`) can take.
pub const MAX_FILE: u64 = 1024 * 1024 * 1024;

/// Notes about one `collect` entry, at most; the rest are counted in a last note.
const MAX_NOTES: usize = 50;

/// What was left out of (or changed in) a copy, one sentence each, naming the path.
#[derive(Debug, Default)]
pub struct Notes {
    pub lines: Vec<String>,
    dropped: usize,
}

impl Notes {
    fn push(&mut self, note: String) {
        if self.lines.len() < MAX_NOTES {
            self.lines.push(note);
        } else {
            self.dropped += 1;
        }
    }

    /// The notes, with a count of those past [`MAX_NOTES`].
    pub fn into_lines(mut self) -> Vec<String> {
        if self.dropped > 0 {
            self.lines.push(format!(
                "and {} more entries not copied or changed",
                self.dropped
            ));
        }
        self.lines
    }
}

/// Copies `src` (the entry the runbook named, shown as `shown`) to `dest`: a regular file, or a
/// directory tree of regular files. Text files (no NUL byte) pass through `redactor`; other
/// files are copied as they are. Fails when `src` cannot be read or is neither a regular file
/// nor a directory; what is skipped inside a directory is returned as notes.
pub fn copy(
    src: &Path,
    dest: &Path,
    shown: &str,
    redactor: &ByteRedactor,
) -> std::io::Result<Notes> {
    copy_with_limit(src, dest, shown, redactor, MAX_FILE)
}

fn copy_with_limit(
    src: &Path,
    dest: &Path,
    shown: &str,
    redactor: &ByteRedactor,
    limit: u64,
) -> std::io::Result<Notes> {
    let mut notes = Notes::default();
    // Followed: the runbook named this path itself.
    let meta = std::fs::metadata(src)?;
    if meta.is_dir() {
        copy_tree(src, dest, shown, redactor, limit, &mut notes)?;
    } else if meta.is_file() {
        let file = open_regular(src, true)?;
        if copy_file(file, dest, redactor, limit)? {
            notes.push(truncated(shown, limit));
        }
    } else {
        return Err(not_regular(&meta.file_type()));
    }
    Ok(notes)
}

/// Copies the regular files and directories under `src`, without following links.
fn copy_tree(
    src: &Path,
    dest: &Path,
    shown: &str,
    redactor: &ByteRedactor,
    limit: u64,
    notes: &mut Notes,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dest)?;
    // (source, destination, shown) of the directories left to copy; a stack, not recursion,
    // so a deep tree cannot exhaust the thread's stack.
    let mut dirs = vec![(src.to_path_buf(), dest.to_path_buf(), shown.to_owned())];
    while let Some((dir, to, shown)) = dirs.pop() {
        let mut entries: Vec<_> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries.filter_map(Result::ok).collect(),
            // The top directory's error is the caller's; a subdirectory's is a note.
            Err(e) if dir == src => return Err(e),
            Err(e) => {
                notes.push(format!("`{shown}`: not copied: {e}"));
                continue;
            }
        };
        entries.sort_by_key(std::fs::DirEntry::file_name);
        let stored = stored_names(
            entries
                .iter()
                .map(|e| without_secrets(&e.file_name(), redactor)),
        );
        for (entry, stored) in entries.into_iter().zip(stored) {
            // Shown and stored without the secrets it may hold.
            let name = without_secrets(&entry.file_name(), redactor);
            let path = entry.path();
            let what = format!("{shown}/{}", escaped(&name));
            let target = to.join(&stored);
            let kind = entry.file_type();
            if stored != name && kind.as_ref().is_ok_and(|k| k.is_dir() || k.is_file()) {
                notes.push(format!(
                    "`{what}`: copied as `{shown}/{}`: its name has a control character or \
                     bytes that are not UTF-8",
                    escaped(&stored)
                ));
            }
            let kind = match kind {
                Ok(kind) => kind,
                Err(e) => {
                    notes.push(format!("`{what}`: not copied: {e}"));
                    continue;
                }
            };
            if kind.is_dir() {
                match std::fs::create_dir_all(&target) {
                    Ok(()) => dirs.push((path, target, what)),
                    Err(e) => notes.push(format!("`{what}`: not copied: {e}")),
                }
            } else if kind.is_file() {
                let copied = open_regular(&path, false)
                    .and_then(|file| copy_file(file, &target, redactor, limit));
                match copied {
                    Ok(false) => {}
                    Ok(true) => notes.push(truncated(&what, limit)),
                    Err(e) => notes.push(format!("`{what}`: not copied: {e}")),
                }
            } else if kind.is_symlink() {
                let to = std::fs::read_link(&path)
                    .map(|t| escaped(t.as_os_str()))
                    .unwrap_or_else(|_| "?".into());
                notes.push(format!("`{what}` -> `{to}`: symlink not followed"));
            } else {
                notes.push(format!("`{what}`: {}", not_regular(&kind)));
            }
        }
    }
    Ok(())
}

/// Opens a file for reading without blocking (a FIFO put in place of a file since it was
/// looked at), and checks what was opened is a regular file. `follow`: whether a symbolic
/// link may be followed.
fn open_regular(path: &Path, follow: bool) -> std::io::Result<File> {
    let mut flags = nix::fcntl::OFlag::O_NONBLOCK;
    if !follow {
        flags |= nix::fcntl::OFlag::O_NOFOLLOW;
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        return Err(not_regular(&kind));
    }
    Ok(file)
}

/// Why a file of this kind is not collected.
fn not_regular(kind: &FileType) -> std::io::Error {
    let what = if kind.is_fifo() {
        "a named pipe (FIFO)"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    };
    std::io::Error::other(format!(
        "{what}: not copied (only regular files and directories are collected; reading \
         anything else could block the run or never end)"
    ))
}

fn truncated(shown: &str, limit: u64) -> String {
    format!(
        "`{shown}`: only its first {} copied (the limit for one collected file)",
        human_bytes(limit)
    )
}

fn human_bytes(n: u64) -> String {
    if n >= 1024 * 1024 * 1024 && n % (1024 * 1024 * 1024) == 0 {
        format!("{} GiB", n / (1024 * 1024 * 1024))
    } else if n >= 1024 * 1024 && n % (1024 * 1024) == 0 {
        format!("{} MiB", n / (1024 * 1024))
    } else {
        format!("{n} bytes")
    }
}

/// Copies at most `limit` bytes of an open regular file to `dest`, redacted if it is text (no
/// NUL byte in what is copied). Returns whether the file was longer than `limit`.
fn copy_file(
    mut file: File,
    dest: &Path,
    redactor: &ByteRedactor,
    limit: u64,
) -> std::io::Result<bool> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // First pass: text or binary. Read again rather than held in memory: the file can be large.
    let mut binary = false;
    let mut buf = vec![0u8; 256 * 1024];
    {
        let mut head = (&file).take(limit);
        loop {
            let n = head.read(&mut buf)?;
            if n == 0 {
                break;
            }
            if buf[..n].contains(&0) {
                binary = true;
                break;
            }
        }
    }
    file.seek(SeekFrom::Start(0))?;
    let mut out = std::io::BufWriter::new(File::create(dest)?);
    let mut input = (&file).take(limit);
    if binary {
        std::io::copy(&mut input, &mut out)?;
    } else {
        crate::redact::copy_redacted(redactor, &mut input, &mut out, &mut buf)?;
    }
    out.flush()?;
    // Anything left past the limit?
    let mut one = [0u8; 1];
    Ok((&file).read(&mut one)? > 0)
}

/// The names the entries of one directory get in the bundle, in order: a name with a control
/// character (a newline) or bytes that are not UTF-8 cannot be written in `SHA256SUMS` as it
/// is, nor shown, so each such character becomes `_`, with `-2`, `-3`, … before the extension
/// when that name is already taken in the directory. Other names are kept.
fn stored_names(names: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let names: Vec<OsString> = names.collect();
    let mut taken: HashSet<OsString> = names
        .iter()
        .filter(|n| sanitized(n).is_none())
        .cloned()
        .collect();
    names
        .into_iter()
        .map(|name| match sanitized(&name) {
            None => name,
            Some(safe) => {
                let (stem, ext) = match safe.rfind('.') {
                    Some(dot) if dot > 0 => safe.split_at(dot),
                    _ => (safe.as_str(), ""),
                };
                let mut candidate = OsString::from(&safe);
                let mut n = 2;
                while taken.contains(&candidate) {
                    candidate = OsString::from(format!("{stem}-{n}{ext}"));
                    n += 1;
                }
                taken.insert(candidate.clone());
                candidate
            }
        })
        .collect()
}

/// A file name with any secret in it replaced by its placeholder: the name is written in
/// the bundle's tree and in `SHA256SUMS`.
fn without_secrets(name: &OsStr, redactor: &ByteRedactor) -> OsString {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::ffi::OsStringExt;
    let redacted = redactor.redact(name.as_bytes());
    if redacted == name.as_bytes() {
        name.to_owned()
    } else {
        OsString::from_vec(redacted)
    }
}

/// `name` with control characters and bytes that are not UTF-8 replaced by `_`, or None when
/// it has none.
pub fn sanitized(name: &OsStr) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = name.as_bytes();
    let clean = std::str::from_utf8(bytes).is_ok_and(|s| !s.chars().any(char::is_control));
    if clean {
        return None;
    }
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            out.push(if c.is_control() { '_' } else { c });
        }
        if !chunk.invalid().is_empty() {
            out.push('_');
        }
    }
    Some(out)
}

/// A file name for a note: UTF-8 as is, with control characters, `\` and bytes that are not
/// UTF-8 escaped (`\n`, `\x1b`, `\xff`), so a note is one line and says which file it means.
pub fn escaped(name: &OsStr) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for chunk in name.as_bytes().utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => {
                    let mut b = [0u8; 4];
                    for byte in c.encode_utf8(&mut b).bytes() {
                        out.push_str(&format!("\\x{byte:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    /// The files under `dir`, relative, sorted.
    fn listing(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("read dir") {
                let p = e.expect("entry").path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(dir) {
                    out.push(rel.to_path_buf());
                }
            }
        }
        out.sort();
        out
    }

    fn mkfifo(path: &Path) {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    }

    /// Regression: a FIFO in a collected directory blocked the recorder in open() forever.
    #[test]
    fn fifos_sockets_and_devices_are_noted_not_opened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("d");
        std::fs::create_dir(&d).expect("mkdir");
        std::fs::write(d.join("a.txt"), "x\n").expect("write");
        mkfifo(&d.join("pipe"));
        let _sock = std::os::unix::net::UnixListener::bind(d.join("sock")).expect("bind");
        let dest = dir.path().join("out");
        let started = Instant::now();
        let notes = copy(&d, &dest, "d", &ByteRedactor::default())
            .expect("copy")
            .into_lines();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(listing(&dest), vec![PathBuf::from("a.txt")]);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].starts_with("`d/pipe`: a named pipe (FIFO): not copied"));
        assert!(notes[1].starts_with("`d/sock`: a socket: not copied"));

        // Named at the top: the same, as an error for the record.
        let err = copy(
            &d.join("pipe"),
            &dest.join("p"),
            "d/pipe",
            &ByteRedactor::default(),
        )
        .expect_err("a FIFO is refused");
        assert!(err
            .to_string()
            .starts_with("a named pipe (FIFO): not copied"));
        let err = copy(
            Path::new("/dev/zero"),
            &dest.join("z"),
            "/dev/zero",
            &ByteRedactor::default(),
        )
        .expect_err("a device is refused");
        assert!(err
            .to_string()
            .starts_with("a character device: not copied"));
        assert!(!dest.join("p").exists() && !dest.join("z").exists());
    }

    /// Regression: `ln -s . s/self` made 40 nested copies and lost every file; a link to
    /// `/etc/hostname` was followed out of the directory.
    #[test]
    fn links_inside_a_directory_are_noted_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = dir.path().join("s");
        std::fs::create_dir_all(s.join("sub")).expect("mkdir");
        std::fs::write(s.join("a.txt"), "x\n").expect("write");
        std::fs::write(s.join("sub/b.txt"), "y\n").expect("write");
        std::os::unix::fs::symlink(".", s.join("self")).expect("ln");
        std::os::unix::fs::symlink("..", s.join("sub/up")).expect("ln");
        std::os::unix::fs::symlink("/etc/hostname", s.join("link")).expect("ln");
        std::os::unix::fs::symlink("nowhere", s.join("dangling")).expect("ln");
        let dest = dir.path().join("out");
        let notes = copy(&s, &dest, "s", &ByteRedactor::default())
            .expect("copy")
            .into_lines();
        assert_eq!(
            listing(&dest),
            vec![PathBuf::from("a.txt"), PathBuf::from("sub/b.txt")]
        );
        assert_eq!(
            notes,
            vec![
                "`s/dangling` -> `nowhere`: symlink not followed",
                "`s/link` -> `/etc/hostname`: symlink not followed",
                "`s/self` -> `.`: symlink not followed",
                "`s/sub/up` -> `..`: symlink not followed",
            ]
        );
        // Named at the top, a link is followed.
        let notes = copy(
            &s.join("link"),
            &dest.join("h"),
            "s/link",
            &ByteRedactor::default(),
        )
        .expect("copy");
        assert!(notes.lines.is_empty());
        assert!(dest.join("h").is_file());
    }

    #[test]
    fn a_file_past_the_limit_is_cut_with_a_note() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("big.log");
        std::fs::write(&src, "0123456789".repeat(100)).expect("write");
        let dest = dir.path().join("copy");
        let notes = copy_with_limit(&src, &dest, "big.log", &ByteRedactor::default(), 256)
            .expect("copy")
            .into_lines();
        assert_eq!(std::fs::read(&dest).expect("read").len(), 256);
        assert_eq!(
            notes,
            vec!["`big.log`: only its first 256 bytes copied (the limit for one collected file)"]
        );
        let notes =
            copy_with_limit(&src, &dest, "big.log", &ByteRedactor::default(), 1000).expect("copy");
        assert!(notes.lines.is_empty(), "exactly at the limit is whole");
    }

    #[test]
    fn text_is_redacted_and_binary_copied_as_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = ByteRedactor::new(&[("pw".into(), "hunter2-secret".into())]);
        std::fs::write(dir.path().join("t.txt"), "pw=hunter2-secret\n").expect("write");
        std::fs::write(dir.path().join("b.bin"), b"\0hunter2-secret").expect("write");
        copy(
            &dir.path().join("t.txt"),
            &dir.path().join("t2"),
            "t.txt",
            &r,
        )
        .expect("copy");
        copy(
            &dir.path().join("b.bin"),
            &dir.path().join("b2"),
            "b.bin",
            &r,
        )
        .expect("copy");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("t2")).expect("read"),
            "pw=[REDACTED:pw]\n"
        );
        assert_eq!(
            std::fs::read(dir.path().join("b2")).expect("read"),
            b"\0hunter2-secret"
        );
    }

    /// Regression: a collected name with a newline or bytes that are not UTF-8 made SHA256SUMS
    /// unreadable (`evidence verify` failed on an untouched bundle).
    #[test]
    fn unsafe_names_are_stored_under_safe_unique_names() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("out");
        std::fs::create_dir(&d).expect("mkdir");
        for name in [
            &b"new\nline.txt"[..],
            b"new_line.txt",
            b"new\tline.txt",
            b"bad\xffutf8",
            b"caf\xc3\xa9 ok.txt",
        ] {
            std::fs::write(d.join(OsStr::from_bytes(name)), name).expect("write");
        }
        let dest = dir.path().join("copy");
        let notes = copy(&d, &dest, "out", &ByteRedactor::default())
            .expect("copy")
            .into_lines();
        assert_eq!(
            listing(&dest),
            [
                "bad_utf8",
                "café ok.txt",
                "new_line-2.txt",
                "new_line-3.txt",
                "new_line.txt"
            ]
            .map(PathBuf::from)
        );
        // The file that had the name keeps it.
        assert_eq!(
            std::fs::read(dest.join("new_line.txt")).expect("read"),
            b"new_line.txt"
        );
        assert_eq!(
            notes,
            [
                "`out/bad\\xffutf8`: copied as `out/bad_utf8`: its name has a control character or bytes that are not UTF-8",
                "`out/new\\tline.txt`: copied as `out/new_line-2.txt`: its name has a control character or bytes that are not UTF-8",
                "`out/new\\nline.txt`: copied as `out/new_line-3.txt`: its name has a control character or bytes that are not UTF-8",
            ]
        );
    }

    #[test]
    fn names_are_escaped_for_notes() {
        use std::os::unix::ffi::OsStrExt;
        assert_eq!(
            escaped(OsStr::from_bytes(b"new\nline\\bad\xffutf8\x1b\xc3\xa9")),
            "new\\nline\\\\bad\\xffutf8\\x1bé"
        );
    }
}
