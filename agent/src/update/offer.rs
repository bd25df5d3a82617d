//! An update offer from a heartbeat answer: the checks it must pass — the
//! target, the DSSE signature with the release key pinned in the state dir
//! (never one from the server), the payload type, the artifact's digest, and
//! the version (no downgrade unless the signed statement allows it) — and,
//! within the update window, the start (or resumption) of its download.

use stella_proto::api::UpdateOffer;
use stella_proto::config::Settings;
use stella_proto::dsse::{Envelope, PublicKey};
use stella_proto::release::{self, Statement, Version};

use super::download::Download;
use super::{Updater, now_secs};
use crate::error::Error;
use crate::state::{RELEASE_KEY, StateDir, StateFile};
use crate::{host, log};

/// A release offer the agent accepted, as far as the signed statement says.
#[derive(Debug)]
pub(super) struct Accepted {
    pub(super) version: String,
    pub(super) sha256: String,
}

/// Checks an offer: target, signature with the pinned key, payload type,
/// the artifact's digest, and the version (no downgrade unless allowed).
fn accept(state: &StateDir, offer: &UpdateOffer) -> Result<Accepted, String> {
    if offer.target != host::TARGET {
        return Err(format!(
            "the offer is for {}, this agent is {}",
            offer.target,
            host::TARGET
        ));
    }
    let key_pem = state.read_text(RELEASE_KEY).map_err(|e| match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            format!("no release key is pinned ({RELEASE_KEY} is missing from the state dir)")
        }
        other => format!("no release key is pinned: {other}"),
    })?;
    let key = PublicKey::from_pem(&key_pem).map_err(|e| format!("{RELEASE_KEY}: {e}"))?;
    let envelope = Envelope::from_json(offer.envelope.as_bytes())
        .map_err(|e| format!("release envelope: {e}"))?;
    let payload = envelope
        .verify(release::PAYLOAD_TYPE, &key)
        .map_err(|e| format!("release {}: {e}", offer.version))?;
    let statement =
        Statement::from_json(&payload).map_err(|e| format!("release statement: {e}"))?;
    let name = format!("{}/stella-agent", host::TARGET);
    let subject = statement
        .subject_for(&name)
        .ok_or_else(|| format!("the signed release has no {name}"))?;
    let version = statement.version().map_err(|e| e.to_string())?;
    let running = Version::parse(host::VERSION).map_err(|e| format!("running version: {e}"))?;
    if version <= running {
        let allowed = statement
            .allow_downgrade_from()
            .map_err(|e| e.to_string())?;
        let permitted = version < running && allowed.is_some_and(|from| running <= from);
        if !permitted {
            return Err(format!(
                "release {version} is not newer than the running {running}, and its statement does not allow a downgrade from {running}"
            ));
        }
    }
    Ok(Accepted {
        version: version.to_string(),
        sha256: subject.sha256().unwrap_or_default().to_owned(),
    })
}

impl Updater {
    /// Handles an offer from a heartbeat answer: refusals are recorded and
    /// reported, and change nothing on disk.
    pub(crate) fn offer(
        &mut self,
        state: &StateDir,
        saved: &mut StateFile,
        offer: &UpdateOffer,
        settings: &Settings,
    ) {
        if offer.version == host::VERSION || saved.update.is_some() {
            return;
        }
        if self
            .download
            .as_ref()
            .is_some_and(|d| d.offer.version == offer.version)
        {
            return;
        }
        if saved
            .update_failure
            .as_ref()
            .is_some_and(|f| f.version == offer.version)
        {
            return;
        }
        // From here on, the log lines explain the update if it fails.
        log::capture_start(Vec::new());
        let accepted = match accept(state, offer) {
            Ok(a) => a,
            Err(error) => {
                log::warn(
                    "update refused",
                    &[("version", &offer.version), ("error", &error)],
                );
                self.waiting = None;
                super::record_failure(state, saved, offer.version.clone(), error, false);
                return;
            }
        };
        let hour = ((now_secs() / 3600) % 24) as u8;
        if !settings.update_allowed_at(hour) {
            if self.waiting.as_deref() != Some(accepted.version.as_str()) {
                log::info(
                    "update offered; it waits for this agent's update_window",
                    &[("version", &accepted.version)],
                );
                self.waiting = Some(accepted.version);
            }
            return;
        }
        self.waiting = None;
        log::info(
            "update accepted; downloading",
            &[("version", &accepted.version), ("size", &offer.size)],
        );
        let part = state.staging_part(&accepted.version, host::TARGET);
        self.download = Some(Download::start(offer, accepted, part));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::PathBuf;
    use stella_proto::dsse::SigningKey;
    use stella_proto::release::Subject;

    struct Fixture {
        dir: PathBuf,
        key: SigningKey,
    }

    impl Fixture {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("stella-update-unit-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            let (key, _) = SigningKey::generate().unwrap();
            fs::write(dir.join(RELEASE_KEY), key.public_key().to_pem()).unwrap();
            Self { dir, key }
        }

        fn state(&self) -> StateDir {
            StateDir::new(self.dir.clone())
        }

        fn offer(
            &self,
            signer: &SigningKey,
            payload_type: &str,
            version: &str,
            downgrade: Option<&str>,
            target: &str,
        ) -> UpdateOffer {
            let subject = vec![Subject::new(&format!("{target}/stella-agent"), &[7; 32])];
            let statement = Statement::new(version, downgrade, subject).unwrap();
            let envelope =
                stella_proto::dsse::sign(signer, payload_type, statement.to_json().as_bytes());
            UpdateOffer {
                version: version.to_owned(),
                target: host::TARGET.to_owned(),
                path: "/x".into(),
                size: 1,
                envelope: envelope.to_json(),
                probation_ms: 1000,
            }
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn accepts_a_newer_release_signed_with_the_pinned_key() {
        let f = Fixture::new("ok");
        let offer = f.offer(&f.key, release::PAYLOAD_TYPE, "99.0.0", None, host::TARGET);
        let accepted = accept(&f.state(), &offer).unwrap();
        assert_eq!(accepted.version, "99.0.0");
        assert_eq!(accepted.sha256, "07".repeat(32));
    }

    #[test]
    fn refuses_each_bad_offer() {
        let f = Fixture::new("bad");
        let (other, _) = SigningKey::generate().unwrap();
        let cases = [
            (
                f.offer(&other, release::PAYLOAD_TYPE, "99.0.0", None, host::TARGET),
                "no signature verifies",
            ),
            (
                f.offer(&f.key, "application/json", "99.0.0", None, host::TARGET),
                "application/json",
            ),
            (
                f.offer(&f.key, release::PAYLOAD_TYPE, "0.0.1", None, host::TARGET),
                "not newer",
            ),
            (
                f.offer(
                    &f.key,
                    release::PAYLOAD_TYPE,
                    "0.0.1",
                    Some("0.0.5"),
                    host::TARGET,
                ),
                "not newer",
            ),
            (
                f.offer(
                    &f.key,
                    release::PAYLOAD_TYPE,
                    "99.0.0",
                    None,
                    "sparc-unknown-none",
                ),
                "has no",
            ),
        ];
        for (offer, needle) in cases {
            let err = accept(&f.state(), &offer).unwrap_err();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        let mut foreign = f.offer(&f.key, release::PAYLOAD_TYPE, "99.0.0", None, host::TARGET);
        foreign.target = "mips-unknown-linux-musl".into();
        assert!(
            accept(&f.state(), &foreign)
                .unwrap_err()
                .contains("the offer is for mips")
        );
        fs::remove_file(f.dir.join(RELEASE_KEY)).unwrap();
        let unpinned = f.offer(&f.key, release::PAYLOAD_TYPE, "99.0.0", None, host::TARGET);
        assert!(
            accept(&f.state(), &unpinned)
                .unwrap_err()
                .contains("no release key is pinned")
        );
    }

    #[test]
    fn a_downgrade_needs_the_running_version_in_the_allowance() {
        let f = Fixture::new("down");
        let running = Version::parse(host::VERSION).unwrap();
        let allowed = f.offer(
            &f.key,
            release::PAYLOAD_TYPE,
            "0.0.1",
            Some(&running.to_string()),
            host::TARGET,
        );
        assert!(accept(&f.state(), &allowed).is_ok());
    }
}
