//! Enrollment: pin the server's CA, make a key pair here, send a CSR with a
//! one-time token, and store the identity the server issues. A retry after a
//! lost answer reuses the same key, so the server returns the same agent.
//! Zero-touch enrollment from `bootstrap.json` is in `zero_touch`.

use std::path::PathBuf;
use std::time::Duration;

use miniserde::json;
use stella_proto::RegistrationToken;
use stella_proto::api::{Labels, RegisterRequest, RegisterResponse};

use crate::error::Error;
use crate::state::{AGENT_CERT, AGENT_JSON, AGENT_KEY, AgentFile, CA_CERT, StateDir};
use crate::{fault, host, identity, log, tls, transport};

pub(crate) mod zero_touch;

/// How the agent learns to trust the server.
#[derive(Debug, Clone)]
pub(crate) enum CaTrust {
    /// A CA certificate file brought along.
    File(PathBuf),
    /// `sha256:HEX` of the CA's SubjectPublicKeyInfo.
    Hash([u8; 32]),
}

/// `stella-agent bootstrap` arguments.
#[derive(Debug, Clone)]
pub(crate) struct BootstrapOptions {
    pub(crate) server: String,
    pub(crate) token: RegistrationToken,
    pub(crate) ca: CaTrust,
    pub(crate) name: Option<String>,
    pub(crate) labels: Labels,
    /// The offline release key to pin (PEM SubjectPublicKeyInfo).
    pub(crate) release_key: Option<PathBuf>,
    /// The offline key that signs tasks (PEM SubjectPublicKeyInfo);
    /// default: the pinned release key.
    pub(crate) deploy_key: Option<PathBuf>,
}

/// Reads and checks a PEM Ed25519 public key given on the command line.
fn read_key(path: &std::path::Path, flag: &str) -> Result<String, Error> {
    let pem = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("cannot read {flag} {}", path.display()), e))?;
    stella_proto::dsse::PublicKey::from_pem(&pem)
        .map_err(|e| Error::malformed(format!("{flag} {}", path.display()), e))?;
    Ok(pem)
}

/// Enrolls this host; afterwards `agent.json` exists.
pub(crate) fn enroll(state: &StateDir, opts: &BootstrapOptions) -> Result<String, Error> {
    if state.is_enrolled() {
        let existing = state.agent_file()?;
        return Err(Error::Invalid(format!(
            "{} is already enrolled as {} with {}; use a new state dir to enroll again",
            state.root().display(),
            existing.id,
            existing.server
        )));
    }
    let server = opts.server.trim_end_matches('/').to_owned();
    let release_key = match &opts.release_key {
        Some(path) => Some(read_key(path, "--release-key")?),
        None => None,
    };
    let deploy_key = match &opts.deploy_key {
        Some(path) => Some(read_key(path, "--deploy-key")?),
        None => None,
    };
    tls::host_port(&server)?;

    // Trust first: a wrong pin stops us before the token leaves the host.
    let ca_der = match &opts.ca {
        CaTrust::File(path) => {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| Error::io(format!("cannot read --ca-file {}", path.display()), e))?;
            identity::cert_der_from_pem(&pem, &path.display().to_string())?
        }
        CaTrust::Hash(pin) => tls::discover_pinned_ca(&server, *pin)?,
    };
    let ca_hash = identity::ca_pin(&ca_der)?;

    state.create()?;
    // The key is made once and kept: if the answer is lost, the next attempt
    // sends the same key and the server answers with the same registration.
    let key_der = match state.read_text(AGENT_KEY) {
        Ok(pem) => stella_proto::pem::decode("PRIVATE KEY", &pem)
            .map_err(|e| Error::malformed(AGENT_KEY, e))?,
        Err(_) => {
            let der = identity::generate_key()?;
            state.write_atomic(
                AGENT_KEY,
                stella_proto::pem::encode("PRIVATE KEY", &der).as_bytes(),
                0o600,
            )?;
            der
        }
    };
    let key = identity::load_key(&key_der)?;
    let name = opts.name.clone().unwrap_or_else(host::hostname);
    let request = RegisterRequest {
        token: opts.token.expose(),
        csr: identity::csr_pem(&key, &name)?,
        name: name.clone(),
        platform: host::platform(),
        version: host::VERSION.to_owned(),
        capabilities: host::capabilities(),
        labels: Some(opts.labels.clone()),
    };
    let mut client = transport::http_client(&ca_der, None, Duration::from_secs(30))?;
    let url = format!("{server}/v1/agents/register");
    let (status, body) = transport::post_json(&mut client, &url, &json::to_string(&request))
        .map_err(|e| Error::network(format!("cannot reach {server}"), e))?;
    if !(200..300).contains(&status) {
        return Err(Error::Refused {
            status,
            message: transport::error_message(&body),
        });
    }
    fault::point("bootstrap-after-register");
    let answer: RegisterResponse = json::from_str(&body).map_err(|miniserde::Error| {
        Error::Invalid(format!(
            "{server} answered the registration with unexpected JSON"
        ))
    })?;

    // Check what we were given before keeping it.
    if !stella_proto::id::is_agent_id(&answer.agent_id) {
        return Err(Error::Invalid(format!(
            "the server issued a malformed agent id {:?}",
            answer.agent_id
        )));
    }
    let cert_der = identity::cert_der_from_pem(&answer.certificate, "issued certificate")?;
    let cert = crate::der::cert_info(&cert_der)?;
    if cert.spki != identity::key_spki(&key) {
        return Err(Error::Invalid(
            "the issued certificate is not for this agent's key".into(),
        ));
    }
    let answered_ca = identity::cert_der_from_pem(&answer.ca, "CA in the answer")?;
    if answered_ca != ca_der {
        return Err(Error::Invalid(
            "the server answered with a different CA than the pinned one".into(),
        ));
    }

    let binary_sha256 = std::env::current_exe()
        .ok()
        .and_then(|exe| host::file_sha256(&exe).ok());
    let mut first_state = crate::state::StateFile {
        heartbeat_interval_ms: answer.heartbeat_interval_ms,
        binary_sha256,
        ..Default::default()
    };
    let mut config = crate::config::ConfigState::load(&first_state);
    config.apply(state, &mut first_state, &answer.config)?;
    state.save_state(&first_state)?;
    state.write_atomic(
        CA_CERT,
        stella_proto::pem::encode("CERTIFICATE", &ca_der).as_bytes(),
        0o644,
    )?;
    state.write_atomic(AGENT_CERT, answer.certificate.as_bytes(), 0o644)?;
    if let Some(pem) = &release_key {
        state.write_atomic(crate::state::RELEASE_KEY, pem.as_bytes(), 0o644)?;
    }
    // Without --deploy-key, tasks are signed with the release key (pinned
    // now, or earlier by install.sh for a zero-touch bundle).
    let deploy_key = deploy_key.or_else(|| state.read_text(crate::state::RELEASE_KEY).ok());
    if let Some(pem) = &deploy_key {
        state.write_atomic(crate::state::DEPLOY_KEY, pem.as_bytes(), 0o644)?;
    }
    // agent.json last: its presence marks a finished enrollment.
    state.write_json(
        AGENT_JSON,
        &AgentFile {
            id: answer.agent_id.clone(),
            server,
            ca_hash,
            name: Some(name),
            labels: Some(answer.labels.clone()),
        },
        0o600,
    )?;
    log::info(
        "enrolled",
        &[
            ("agent", &answer.agent_id),
            ("cert_not_after", &answer.cert_not_after),
            ("state_dir", &state.root().display()),
        ],
    );
    Ok(answer.agent_id)
}
