//! Interoperability with the real `minisign` (Debian package `minisign`): signatures and keys
//! made here are accepted by it, and the other way round. These tests fail (never skip) when
//! `minisign` is not installed.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use runbook_evidence::sign::{self, PublicKey, SecretKey, SignError};

fn minisign() -> Command {
    match Command::new("minisign").arg("-v").output() {
        Ok(out) if out.status.success() => Command::new("minisign"),
        Ok(out) => panic!(
            "`minisign -v` failed ({}): reinstall it with `apt-get install minisign`",
            out.status
        ),
        Err(e) => panic!(
            "minisign is not installed ({e}): these interoperability tests need the real tool; \
             install it with `apt-get install minisign`"
        ),
    }
}

/// Runs minisign with `stdin` fed in, panicking with its output unless it succeeds.
fn run(args: &[&str], stdin: &str, dir: &Path) -> Output {
    let mut child = minisign()
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn minisign");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("minisign output");
    assert!(
        out.status.success(),
        "minisign {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_expect_failure(args: &[&str], dir: &Path) -> Output {
    let out = minisign()
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("minisign");
    assert!(
        !out.status.success(),
        "minisign {args:?} unexpectedly succeeded"
    );
    out
}

fn write(dir: &Path, name: &str, data: &[u8]) {
    std::fs::write(dir.join(name), data).expect("write");
}

/// (a) A signature made here verifies with `minisign -V` (by `.pub` file and by `-P`), also
/// with `-H` (prehashed required); altered data fails.
#[test]
fn minisign_verifies_our_signatures() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (sk, pk) = sign::generate("interop");
    let data = b"0123abcd  manifest.json\n";
    write(dir, "SHA256SUMS", data);
    write(dir, "ours.pub", pk.to_minisign().as_bytes());
    let tc = "timestamp:1795632157\tfile:SHA256SUMS\trun:5acbfb1e";
    write(
        dir,
        "SHA256SUMS.minisig",
        sign::sign_file(&sk, data, tc).as_bytes(),
    );

    let out = run(&["-Vm", "SHA256SUMS", "-p", "ours.pub"], "", dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Signature and comment signature verified"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("Trusted comment: {tc}")),
        "{stdout}"
    );

    let out = run(
        &["-Vm", "SHA256SUMS", "-P", &pk.to_base64(), "-H", "-Q"],
        "",
        dir,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), tc);

    write(dir, "SHA256SUMS", b"0123abcd  manifest.jsoN\n");
    let out = run_expect_failure(&["-Vm", "SHA256SUMS", "-p", "ours.pub"], dir);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Signature verification failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (b) A key made by `minisign -G -W` (unencrypted): its signatures, prehashed (default) and
/// legacy (`-l`), verify here; the secret key loads here and signs what minisign accepts.
#[test]
fn we_verify_minisign_signatures_and_load_its_unencrypted_keys() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    run(&["-G", "-W", "-p", "m.pub", "-s", "m.key"], "", dir);
    let pk = PublicKey::from_file(&dir.join("m.pub")).expect("minisign public key");
    let data = b"hello from minisign\n";
    write(dir, "data.txt", data);

    run(
        &["-S", "-s", "m.key", "-m", "data.txt", "-t", "prehashed tc"],
        "",
        dir,
    );
    let sig = std::fs::read_to_string(dir.join("data.txt.minisig")).expect("sig");
    assert!(sign::inspect(&sig).expect("parses").prehashed);
    let tc = sign::verify(&pk, data, &sig).expect("minisign's ED signature verifies");
    assert_eq!(tc.as_str(), "prehashed tc");
    assert!(matches!(
        sign::verify(&pk, b"hello from minisigN\n", &sig),
        Err(SignError::BadSignature)
    ));

    run(
        &[
            "-S",
            "-l",
            "-s",
            "m.key",
            "-m",
            "data.txt",
            "-x",
            "legacy.minisig",
            "-t",
            "legacy tc",
        ],
        "",
        dir,
    );
    let sig = std::fs::read_to_string(dir.join("legacy.minisig")).expect("sig");
    assert!(!sign::inspect(&sig).expect("parses").prehashed);
    let tc = sign::verify(&pk, data, &sig).expect("minisign's legacy Ed signature verifies");
    assert_eq!(tc.as_str(), "legacy tc");

    let text = std::fs::read_to_string(dir.join("m.key")).expect("key");
    assert!(!SecretKey::is_encrypted(&text).expect("parses"));
    let sk = SecretKey::from_minisign(&text, None).expect("minisign -W secret key loads");
    assert_eq!(sk.public_key(), pk);
    write(
        dir,
        "data.txt.minisig",
        sign::sign_file(&sk, data, "signed by runbook").as_bytes(),
    );
    run(&["-Vm", "data.txt", "-p", "m.pub"], "", dir);

    // Our unencrypted key file is accepted by `minisign -S`.
    let (ours, ours_pub) = sign::generate("runbook key");
    write(
        dir,
        "ours.key",
        ours.to_minisign(None).expect("key").as_bytes(),
    );
    write(dir, "ours.pub", ours_pub.to_minisign().as_bytes());
    run(
        &[
            "-S",
            "-s",
            "ours.key",
            "-m",
            "data.txt",
            "-x",
            "o.minisig",
            "-t",
            "x",
        ],
        "",
        dir,
    );
    run(
        &["-Vm", "data.txt", "-x", "o.minisig", "-p", "ours.pub"],
        "",
        dir,
    );
}

/// (c) A password-protected key made by `minisign -G` (scrypt, 1 GiB; password fed on stdin,
/// which minisign reads with `fgets` when it is not a terminal) loads here with the password,
/// and an encrypted key written here is accepted by `minisign -S`.
#[test]
fn encrypted_keys_work_both_ways() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let password = "correct horse battery staple";
    run(
        &["-G", "-p", "e.pub", "-s", "e.key", "-c", "made by minisign"],
        &format!("{password}\n{password}\n"),
        dir,
    );
    let pk = PublicKey::from_file(&dir.join("e.pub")).expect("public key");
    let text = std::fs::read_to_string(dir.join("e.key")).expect("key");
    assert!(SecretKey::is_encrypted(&text).expect("parses"));
    assert!(matches!(
        SecretKey::from_minisign(&text, None),
        Err(SignError::PasswordRequired)
    ));
    let sk = SecretKey::from_minisign(&text, Some(password)).expect("decrypts");
    assert_eq!(sk.public_key(), pk);
    assert_eq!(sk.comment(), "made by minisign");
    let data = b"signed with a key minisign encrypted\n";
    write(dir, "d", data);
    write(
        dir,
        "d.minisig",
        sign::sign_file(&sk, data, "tc").as_bytes(),
    );
    run(&["-Vm", "d", "-p", "e.pub"], "", dir);

    let (ours, ours_pub) = sign::generate("encrypted by runbook");
    write(
        dir,
        "o.key",
        ours.to_minisign(Some(password))
            .expect("encrypts")
            .as_bytes(),
    );
    write(dir, "o.pub", ours_pub.to_minisign().as_bytes());
    run(
        &[
            "-S",
            "-s",
            "o.key",
            "-m",
            "d",
            "-x",
            "o.minisig",
            "-t",
            "ours",
        ],
        &format!("{password}\n"),
        dir,
    );
    let sig = std::fs::read_to_string(dir.join("o.minisig")).expect("sig");
    assert_eq!(
        sign::verify(&ours_pub, data, &sig)
            .expect("verifies")
            .as_str(),
        "ours"
    );
}
