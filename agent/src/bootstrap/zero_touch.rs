//! Zero-touch enrollment (docs/design.md section 3): `stella-agent run` on a host
//! that is not enrolled but has a `bootstrap.json` (server URL, token, CA
//! pin) in its state dir enrolls with it first, then deletes the file so the
//! token does not stay on disk. The bundle installer checks the same file
//! with the same parser.

use std::fs::{self, File};

use miniserde::{Deserialize, Serialize, json};
use stella_proto::RegistrationToken;
use stella_proto::api::Labels;

use super::{BootstrapOptions, CaTrust};
use crate::error::{Cause, Error};
use crate::state::{BOOTSTRAP_JSON, CA_CERT, StateDir};
use crate::{identity, log, tls};

/// Largest `bootstrap.json` read.
const MAX_BOOTSTRAP_BYTES: u64 = 64 << 10;

/// `bootstrap.json`: the server, a registration token, and the CA's pin
/// (`sha256:HEX` of its SubjectPublicKeyInfo). The bundle also carries the
/// CA itself as `ca.pem`; the agent checks that the two agree.
#[derive(Serialize, Deserialize, Debug)]
pub(crate) struct BootstrapFile {
    pub(crate) server: String,
    pub(crate) token: String,
    pub(crate) ca_hash: String,
}

/// A checked `bootstrap.json`.
pub(crate) struct Bootstrap {
    pub(crate) server: String,
    pub(crate) token: RegistrationToken,
    pub(crate) pin: [u8; 32],
}

pub(crate) fn parse_bootstrap(bytes: &[u8]) -> Result<Bootstrap, String> {
    let file: BootstrapFile = std::str::from_utf8(bytes)
        .ok()
        .and_then(|t| json::from_str(t).ok())
        .ok_or("it is not JSON of the shape {\"server\", \"token\", \"ca_hash\"}")?;
    if !file.server.starts_with("https://") {
        return Err(format!("server {:?} is not an https:// URL", file.server));
    }
    tls::host_port(&file.server).map_err(|e| e.to_string())?;
    let token = RegistrationToken::parse(&file.token).map_err(|e| format!("token: {e}"))?;
    let pin = stella_proto::hash::parse_pin(&file.ca_hash)?;
    Ok(Bootstrap {
        server: file.server,
        token,
        pin,
    })
}

/// A CA pin as `sha256:HEX`.
pub(crate) fn pin_text(pin: &[u8; 32]) -> String {
    format!("sha256:{}", stella_proto::hash::hex(pin))
}

/// Zero-touch, at the start of `run`: a host that is not enrolled but has
/// `bootstrap.json` in its state dir enrolls with it, then deletes it (the
/// token must not stay on disk). A failed enrollment keeps the file, so the
/// next start (systemd restarts the agent) tries again. On an enrolled host
/// a leftover file (a crash right after enrolling) is deleted.
pub(crate) fn zero_touch(state: &StateDir) -> Result<(), Error> {
    let path = state.path(BOOTSTRAP_JSON);
    let present = fs::symlink_metadata(&path).is_ok();
    if !present {
        return Ok(());
    }
    if state.is_enrolled() {
        forget_bootstrap(state)?;
        log::warn(
            "deleted a bootstrap.json left over from enrollment",
            &[("path", &path.display())],
        );
        return Ok(());
    }
    let kept = |e: Cause| Error::Failed {
        context: format!(
            "zero-touch enrollment with {} failed (the file is kept; the next start tries again)",
            path.display()
        ),
        source: e,
    };
    let meta =
        fs::metadata(&path).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    if meta.len() > MAX_BOOTSTRAP_BYTES {
        return Err(kept(
            format!("it is larger than {MAX_BOOTSTRAP_BYTES} bytes").into(),
        ));
    }
    let text = state.read_text(BOOTSTRAP_JSON)?;
    let boot = parse_bootstrap(text.as_bytes()).map_err(|e| kept(e.into()))?;
    // The CA the bundle brought along, which must be the pinned one.
    let ca = if state.path(CA_CERT).exists() {
        let pem = state.read_text(CA_CERT)?;
        let der = identity::cert_der_from_pem(&pem, CA_CERT).map_err(|e| kept(e.into()))?;
        let found = identity::ca_pin(&der).map_err(|e| kept(e.into()))?;
        let want = pin_text(&boot.pin);
        if found != want {
            return Err(kept(
                format!("{CA_CERT} in the state dir is {found}, but bootstrap.json pins {want}")
                    .into(),
            ));
        }
        CaTrust::File(state.path(CA_CERT))
    } else {
        CaTrust::Hash(boot.pin)
    };
    log::info(
        "not enrolled; enrolling with bootstrap.json (zero-touch)",
        &[("server", &boot.server), ("token", &boot.token.id())],
    );
    let opts = BootstrapOptions {
        server: boot.server,
        token: boot.token,
        ca,
        name: None,
        labels: Labels::new(),
        // install.sh pinned the bundle's key already.
        release_key: None,
        // The deploy key defaults to the pinned release key.
        deploy_key: None,
    };
    let id = super::enroll(state, &opts).map_err(|e| kept(e.into()))?;
    forget_bootstrap(state)?;
    log::info(
        "zero-touch enrollment done; bootstrap.json deleted",
        &[("agent", &id)],
    );
    Ok(())
}

/// Deletes `bootstrap.json` durably.
fn forget_bootstrap(state: &StateDir) -> Result<(), Error> {
    state.remove(BOOTSTRAP_JSON)?;
    File::open(state.root())
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("cannot sync {}", state.root().display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_files_are_checked() {
        let pin = format!("sha256:{}", "ab".repeat(32));
        let good = format!(
            r#"{{"server":"https://10.0.0.1:8443","token":"abc123.0123456789abcdefghijklmnopqrstuv","ca_hash":"{pin}"}}"#
        );
        let boot = parse_bootstrap(good.as_bytes()).unwrap();
        assert_eq!(boot.server, "https://10.0.0.1:8443");
        assert_eq!(boot.pin, [0xab; 32]);
        for (bad, why) in [
            (good.replace("https://", "http://"), "https://"),
            (good.replace("abc123.", "abc123"), "malformed token"),
            (good.replace(&pin, "sha256:00"), "sha256:"),
            ("{}".to_owned(), "not JSON of the shape"),
            ("\u{0}".to_owned(), "not JSON of the shape"),
        ] {
            let err = parse_bootstrap(bad.as_bytes()).map(|_| ()).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
