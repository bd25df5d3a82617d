//! `cargo xtask keygen --out DIR` (docs/design.md section 5): makes the offline
//! Ed25519 release key, `DIR/release.key` (PKCS#8 PEM, 0600) and
//! `DIR/release.pub` (SubjectPublicKeyInfo PEM), and never overwrites a key.

use std::ffi::OsString;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use lexopt::Arg;

use stella_proto::dsse::SigningKey;

use crate::args::{Args, Usage};
use crate::sign::{WriteMode, write_atomic};

/// Private key file name.
pub(crate) const KEY_FILE: &str = "release.key";
/// Public key file name.
pub(crate) const PUB_FILE: &str = "release.pub";

/// `cargo xtask keygen` options.
#[derive(Debug)]
pub(crate) struct Options {
    out: PathBuf,
}

impl Options {
    /// Parses `--out DIR`.
    pub(crate) fn parse<I>(args: I) -> Result<Self, Usage>
    where
        I: IntoIterator,
        I::Item: Into<OsString>,
    {
        const CMD: &str = "keygen";
        let mut out = None;
        let mut args = Args::new(CMD, args);
        while let Some(arg) = args.next()? {
            match arg {
                Arg::Long("out") => out = Some(args.path("--out")?),
                other => return Err(Usage::unexpected(CMD, other)),
            }
        }
        match out {
            Some(out) if !out.as_os_str().is_empty() => Ok(Self { out }),
            _ => Err("keygen: --out DIR is required".into()),
        }
    }
}

/// Writes a new key pair into the output directory and prints the fingerprint.
pub(crate) fn keygen(opts: &Options) -> Result<(), String> {
    let dir = &opts.out;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("keygen: cannot create {}: {e}", dir.display()))?;
    let key_path = dir.join(KEY_FILE);
    let pub_path = dir.join(PUB_FILE);
    for path in [&key_path, &pub_path] {
        // symlink_metadata: a dangling symlink counts as existing too.
        if path.symlink_metadata().is_ok() {
            return Err(format!(
                "keygen: {} already exists; refusing to overwrite a release key \
                 (agents pin it; move it away first if you really mean to replace it)",
                path.display()
            ));
        }
    }
    let (key, private_pem) =
        SigningKey::generate().map_err(|e| format!("keygen: cannot make a key: {e}"))?;
    let public = key.public_key();
    write_atomic(&key_path, private_pem.as_bytes(), 0o600, WriteMode::New)
        .map_err(|e| format!("keygen: {e}"))?;
    if let Err(e) = write_atomic(&pub_path, public.to_pem().as_bytes(), 0o644, WriteMode::New) {
        // Without its public half the new key is useless; it was never used.
        let _ = std::fs::remove_file(&key_path);
        return Err(format!("keygen: {e}"));
    }
    println!(
        "wrote {} (private: keep it offline) and {}",
        key_path.display(),
        pub_path.display()
    );
    println!("release key fingerprint: {}", public.fingerprint());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn parses_out_and_refuses_the_rest() {
        assert_eq!(
            Options::parse(args(&["--out", "k"])).unwrap().out,
            PathBuf::from("k")
        );
        assert_eq!(
            Options::parse(args(&["--out=k"])).unwrap().out,
            PathBuf::from("k")
        );
        for bad in [
            &[][..],
            &["--out"],
            &["--out="],
            &["k"],
            &["--out", "k", "--force"],
        ] {
            assert!(Options::parse(args(bad)).is_err(), "{bad:?}");
        }
    }
}
