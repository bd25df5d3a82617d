//! `cargo xtask sign-task --key KEY TASK.json --out TASK.dsse.json`
//! (docs/operations.md, "Deploying workloads with tasks"): checks a task's
//! shape as the server and agents will, signs its bytes as they are with the
//! offline deploy key into a DSSE envelope, checks the envelope the way an
//! agent will, and writes it.

use std::ffi::OsString;
use std::fs;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use lexopt::Arg;
use stella_proto::dsse::{self, SigningKey};
use stella_proto::task::{self, PAYLOAD_TYPE, Task};

use crate::args::{Args, Usage};
use crate::sign::{WriteMode, write_atomic};

/// `cargo xtask sign-task` options.
#[derive(Debug)]
pub(crate) struct Options {
    key: PathBuf,
    task: PathBuf,
    out: PathBuf,
}

impl Options {
    /// Parses `--key KEY TASK.json --out TASK.dsse.json`.
    pub(crate) fn parse<I>(args: I) -> Result<Self, Usage>
    where
        I: IntoIterator,
        I::Item: Into<OsString>,
    {
        const CMD: &str = "sign-task";
        let (mut key, mut task, mut out) = (None, None, None);
        let mut args = Args::new(CMD, args);
        while let Some(arg) = args.next()? {
            match arg {
                Arg::Long("key") => key = Some(args.path("--key")?),
                Arg::Long("out") => out = Some(args.path("--out")?),
                Arg::Value(value) if task.is_none() => task = Some(PathBuf::from(value)),
                other => return Err(Usage::unexpected(CMD, other)),
            }
        }
        Ok(Self {
            key: key.ok_or("sign-task: --key KEY is required")?,
            task: task.ok_or("sign-task: the task file TASK.json is required")?,
            out: out.ok_or("sign-task: --out TASK.dsse.json is required")?,
        })
    }
}

/// Signs the task file.
pub(crate) fn sign_task(opts: &Options) -> Result<(), String> {
    let key_text = fs::read_to_string(&opts.key)
        .map_err(|e| format!("sign-task: cannot read key {}: {e}", opts.key.display()))?;
    let key = SigningKey::from_pem(&key_text)
        .map_err(|e| format!("sign-task: key {}: {e}", opts.key.display()))?;
    let payload = fs::read(&opts.task)
        .map_err(|e| format!("sign-task: cannot read {}: {e}", opts.task.display()))?;
    if payload.len() > task::MAX_ENVELOPE_BYTES {
        return Err(format!(
            "sign-task: {} is {} bytes, more than a task envelope may hold ({})",
            opts.task.display(),
            payload.len(),
            task::MAX_ENVELOPE_BYTES
        ));
    }
    let parsed = Task::from_json(&payload)
        .map_err(|e| format!("sign-task: {}: {e}", opts.task.display()))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    parsed
        .check_fresh(now)
        .map_err(|e| format!("sign-task: {}: {e}", opts.task.display()))?;
    let json = dsse::sign(&key, PAYLOAD_TYPE, &payload).to_json();
    // Check what we are about to hand over the way the server and an agent will.
    let checked = task::check_envelope(json.as_bytes())
        .map_err(|e| format!("sign-task: the new envelope is refused: {e}"))?;
    dsse::verify(json.as_bytes(), PAYLOAD_TYPE, &key.public_key())
        .map_err(|e| format!("sign-task: the new envelope does not verify: {e}"))?;
    write_atomic(
        &opts.out,
        format!("{json}\n").as_bytes(),
        0o644,
        WriteMode::Replace,
    )
    .map_err(|e| format!("sign-task: {e}"))?;
    println!(
        "signed {} task {} (server id {}) with key {}: {}",
        parsed.spec.type_name(),
        parsed.id,
        checked.server_id(),
        key.public_key().fingerprint(),
        opts.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn parses_the_documented_arguments() {
        let opts =
            Options::parse(args(&["--key", "d.key", "t.json", "--out", "t.dsse.json"])).unwrap();
        assert_eq!(opts.key, PathBuf::from("d.key"));
        assert_eq!(opts.task, PathBuf::from("t.json"));
        assert_eq!(opts.out, PathBuf::from("t.dsse.json"));
        for (list, want) in [
            (&["t.json", "--out", "o"][..], "--key KEY is required"),
            (&["--key", "k", "--out", "o"], "TASK.json is required"),
            (
                &["--key", "k", "t.json"],
                "--out TASK.dsse.json is required",
            ),
            (&["--key", "k", "a", "b"], "unexpected argument"),
        ] {
            let err = Options::parse(args(list)).unwrap_err().to_string();
            assert!(err.contains(want), "{list:?}: {err}");
        }
    }

    #[test]
    fn signs_a_good_task_and_refuses_a_bad_one() {
        let dir = std::env::temp_dir().join(format!("xtask-sign-task-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let (key, pem) = SigningKey::generate().unwrap();
        let key_path = dir.join("deploy.key");
        fs::write(&key_path, pem).unwrap();
        let good = r#"{"id":"t1","type":"file","not_after":"2099-01-01T00:00:00Z","audience":{"selector":{}},"path":"/etc/x","content_base64":"eA==","mode":"0644"}"#;
        let task_path = dir.join("t.json");
        fs::write(&task_path, good).unwrap();
        let out = dir.join("t.dsse.json");
        let opts = Options {
            key: key_path,
            task: task_path.clone(),
            out: out.clone(),
        };
        sign_task(&opts).unwrap();
        let written = fs::read(&out).unwrap();
        let payload = dsse::verify(&written, PAYLOAD_TYPE, &key.public_key()).unwrap();
        assert_eq!(payload, good.as_bytes(), "the task's bytes, as they are");
        for (bad, want) in [
            (good.replace("/etc/x", "etc/x"), "absolute"),
            (good.replace("\"file\"", "\"shell\""), "unknown"),
            (good.replace("2099", "2000"), "expired"),
            ("{".to_owned(), "JSON"),
        ] {
            fs::write(&task_path, &bad).unwrap();
            let _ = fs::remove_file(&out);
            let err = sign_task(&opts).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
            assert!(!out.exists(), "nothing written for {bad}");
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
