//! Signed releases against independent tools: `cargo xtask keygen` keys read by
//! openssl, `cargo xtask sign` envelopes whose digests match `sha256sum` and
//! whose signatures `openssl pkeyutl -verify` accepts over a PAE built here by
//! hand; symlinks and a second keygen are refused.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use stella_proto::dsse::{self, Envelope, PublicKey};
use stella_proto::release::{PAYLOAD_TYPE, Statement};
use stella_tests::{TempDir, bin, run, text, tool};

const AGENT: &str = "x86_64-unknown-linux-musl/stella-agent";

fn xtask(args: &[&str]) -> std::process::Output {
    run(Command::new(bin("xtask")).args(args))
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// Runs openssl, which must succeed; returns stdout.
fn openssl_ok(args: &[&str]) -> Vec<u8> {
    let out = tool("openssl", args);
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {stdout}{stderr}"
    );
    out.stdout
}

/// `sha256sum FILE`'s digest.
fn sha256sum(file: &Path) -> String {
    let out = tool("sha256sum", &[path(file)]);
    assert!(out.status.success(), "sha256sum failed: {:?}", text(&out));
    let (stdout, _) = text(&out);
    stdout
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_owned()
}

/// Base64-decodes with openssl rather than our own decoder.
fn openssl_unbase64(work: &Path, name: &str, b64: &str) -> Vec<u8> {
    let input = work.join(format!("{name}.b64"));
    let output = work.join(format!("{name}.bin"));
    fs::write(&input, b64).expect("write base64");
    openssl_ok(&[
        "base64",
        "-d",
        "-A",
        "-in",
        path(&input),
        "-out",
        path(&output),
    ]);
    fs::read(&output).expect("decoded file")
}

/// PAE by hand from the DSSE spec, independent of `stella_proto::dsse::pae`.
fn pae_by_hand(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Whether `openssl pkeyutl -verify` accepts `sig` over `message` with `public`.
fn openssl_verifies(work: &Path, public: &Path, message: &[u8], sig: &[u8]) -> bool {
    let (msg_file, sig_file) = (work.join("pae.bin"), work.join("sig.bin"));
    fs::write(&msg_file, message).expect("write pae.bin");
    fs::write(&sig_file, sig).expect("write sig.bin");
    let out = tool(
        "openssl",
        &[
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            path(public),
            "-rawin",
            "-in",
            path(&msg_file),
            "-sigfile",
            path(&sig_file),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.success(),
        stdout.contains("Signature Verified Successfully"),
        "{stdout}{stderr}"
    );
    out.status.success()
}

/// A release directory with one agent binary.
fn release_dir(tmp: &TempDir, bytes: &[u8]) -> std::path::PathBuf {
    let dir = tmp.join("release");
    fs::create_dir_all(dir.join("x86_64-unknown-linux-musl")).expect("mkdir");
    fs::write(dir.join(AGENT), bytes).expect("write agent");
    dir
}

fn sign_ok(key: &Path, version: &str, dir: &Path) -> Envelope {
    let out = xtask(&["sign", "--key", path(key), "--version", version, path(dir)]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "sign failed: {stdout}{stderr}");
    Envelope::from_json(&fs::read(dir.join("release.dsse.json")).expect("release.dsse.json"))
        .expect("release.dsse.json is a DSSE envelope")
}

#[test]
fn keygen_and_sign_interoperate_with_openssl_and_sha256sum() {
    let tmp = TempDir::new("signing");
    let keys = tmp.join("keys");
    let out = xtask(&["keygen", "--out", path(&keys)]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "keygen failed: {stdout}{stderr}");
    let (key, public) = (keys.join("release.key"), keys.join("release.pub"));
    let mode = |p: &Path| fs::metadata(p).expect("key file").permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600, "release.key must be 0600");
    assert_eq!(
        mode(&public) & 0o022,
        0,
        "release.pub must not be group/world writable"
    );

    // openssl reads both, and derives the same public key from the private one.
    openssl_ok(&["pkey", "-in", path(&key), "-noout"]);
    openssl_ok(&["pkey", "-pubin", "-in", path(&public), "-noout"]);
    let derived = openssl_ok(&["pkey", "-in", path(&key), "-pubout"]);
    assert_eq!(derived, fs::read(&public).expect("release.pub"));
    // The printed fingerprint is the sha256 of the DER SubjectPublicKeyInfo.
    let der = tmp.join("release.pub.der");
    openssl_ok(&[
        "pkey",
        "-pubin",
        "-in",
        path(&public),
        "-outform",
        "DER",
        "-out",
        path(&der),
    ]);
    let fingerprint = format!("sha256:{}", sha256sum(&der));
    assert!(
        stdout.contains(&format!("release key fingerprint: {fingerprint}")),
        "{stdout}"
    );

    // A second keygen never replaces the key.
    let before = fs::read(&key).expect("release.key");
    let again = xtask(&["keygen", "--out", path(&keys)]);
    assert_eq!(again.status.code(), Some(1), "{:?}", text(&again));
    assert!(
        text(&again).1.contains("already exists"),
        "{:?}",
        text(&again)
    );
    assert_eq!(fs::read(&key).expect("release.key"), before);

    let dir = release_dir(&tmp, b"\x7fELF pretend agent 1.4.0");
    let envelope = sign_ok(&key, "1.4.0", &dir);
    assert_eq!(envelope.payload_type, PAYLOAD_TYPE);
    assert_eq!(envelope.signatures.len(), 1);

    // The statement, decoded by openssl, names the file with sha256sum's digest.
    let payload = openssl_unbase64(tmp.path(), "payload", &envelope.payload);
    let statement = Statement::from_json(&payload).expect("a valid release statement");
    assert_eq!(statement.predicate.version, "1.4.0");
    assert_eq!(
        statement.subject.len(),
        1,
        "only the agent (not the envelope) is signed"
    );
    let subject = statement
        .subject_for(AGENT)
        .expect("the agent is a subject");
    assert_eq!(subject.sha256(), Some(sha256sum(&dir.join(AGENT)).as_str()));

    // openssl verifies the signature over a PAE built by hand.
    let sig = openssl_unbase64(tmp.path(), "sig", &envelope.signatures[0].sig);
    let pae = pae_by_hand(&envelope.payload_type, &payload);
    assert!(openssl_verifies(tmp.path(), &public, &pae, &sig));
    // ... and refuses it over anything else (the check is not vacuous).
    let mut tampered = payload.clone();
    tampered[payload.len() / 2] ^= 1;
    assert!(!openssl_verifies(
        tmp.path(),
        &public,
        &pae_by_hand(&envelope.payload_type, &tampered),
        &sig
    ));
    assert!(!openssl_verifies(
        tmp.path(),
        &public,
        &pae_by_hand("application/json", &payload),
        &sig
    ));

    // Our verifier, pinned to release.pub, agrees.
    let pinned = PublicKey::from_pem(&fs::read_to_string(&public).expect("release.pub"))
        .expect("release.pub parses");
    let envelope_bytes = fs::read(dir.join("release.dsse.json")).expect("envelope");
    assert_eq!(
        dsse::verify(&envelope_bytes, PAYLOAD_TYPE, &pinned).expect("verifies"),
        payload
    );

    // A tampered file no longer matches its signed digest.
    let mut bytes = fs::read(dir.join(AGENT)).expect("agent");
    bytes.push(0);
    fs::write(dir.join(AGENT), bytes).expect("tamper");
    assert_ne!(subject.sha256(), Some(sha256sum(&dir.join(AGENT)).as_str()));
}

#[test]
fn releases_signed_with_an_openssl_key_verify_with_its_public_key() {
    let tmp = TempDir::new("signing-openssl");
    let (key, public) = (tmp.join("ossl.key"), tmp.join("ossl.pub"));
    openssl_ok(&["genpkey", "-algorithm", "ed25519", "-out", path(&key)]);
    openssl_ok(&["pkey", "-in", path(&key), "-pubout", "-out", path(&public)]);
    let dir = release_dir(&tmp, b"agent");
    fs::create_dir_all(dir.join("aarch64-unknown-linux-musl")).expect("mkdir");
    fs::write(dir.join("aarch64-unknown-linux-musl/stella-agent"), b"arm").expect("write");
    let envelope = sign_ok(&key, "2.0.0-rc.1", &dir);

    let payload = openssl_unbase64(tmp.path(), "payload", &envelope.payload);
    let sig = openssl_unbase64(tmp.path(), "sig", &envelope.signatures[0].sig);
    assert!(openssl_verifies(
        tmp.path(),
        &public,
        &pae_by_hand(PAYLOAD_TYPE, &payload),
        &sig
    ));
    let statement = Statement::from_json(&payload).expect("statement");
    let names: Vec<&str> = statement.subject.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["aarch64-unknown-linux-musl/stella-agent", AGENT],
        "sorted by path"
    );

    // Signing again replaces the envelope (and does not sign the old one).
    let again = sign_ok(&key, "2.0.0", &dir);
    let payload = openssl_unbase64(tmp.path(), "payload", &again.payload);
    assert_eq!(
        Statement::from_json(&payload)
            .expect("statement")
            .subject
            .len(),
        2
    );
}

#[test]
fn signing_refuses_symlinks_and_bad_usage() {
    let tmp = TempDir::new("signing-refusals");
    let keys = tmp.join("keys");
    assert!(xtask(&["keygen", "--out", path(&keys)]).status.success());
    let key = keys.join("release.key");
    let dir = release_dir(&tmp, b"agent");
    std::os::unix::fs::symlink("/etc/passwd", dir.join("x86_64-unknown-linux-musl/passwd"))
        .expect("symlink");
    let out = xtask(&[
        "sign",
        "--key",
        path(&key),
        "--version",
        "1.0.0",
        path(&dir),
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("is a symlink"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one error line: {stderr}");
    assert!(!dir.join("release.dsse.json").exists());

    // Usage errors exit 2.
    for args in [
        &["sign", "--key", path(&key), path(&dir)][..],
        &["sign", "--key", path(&key), "--version", "1.0", path(&dir)],
        &["keygen"],
    ] {
        let out = xtask(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {:?}", text(&out));
    }
}
