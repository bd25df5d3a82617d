//! `stella-agent status`: what this agent is, from its state dir alone.

use miniserde::{Serialize, json};
use stella_proto::time::rfc3339;

use crate::error::Error;
use crate::host;
use crate::identity::Identity;
use crate::state::StateDir;

#[derive(Serialize)]
struct UpdateView {
    state: stella_proto::states::UpdatePhase,
    version: String,
}

#[derive(Serialize)]
struct StatusView {
    agent_id: String,
    server: String,
    version: String,
    cert_not_after: String,
    last_heartbeat: Option<String>,
    config_hash: Option<String>,
    update: UpdateView,
    /// Fingerprint of the pinned deploy key (what signs tasks), if any.
    deploy_key: Option<String>,
}

/// Prints the status; fails when the host is not enrolled.
pub(crate) fn print(state: &StateDir, as_json: bool) -> Result<(), Error> {
    if !state.is_enrolled() {
        return Err(Error::Invalid(format!(
            "{} holds no enrolled agent: run `stella-agent bootstrap` first",
            state.root().display()
        )));
    }
    let ident = Identity::load(state)?;
    let saved = state.state_file();
    let view = StatusView {
        agent_id: ident.id,
        server: ident.server,
        version: host::VERSION.to_owned(),
        cert_not_after: rfc3339(ident.cert.not_after),
        last_heartbeat: saved.last_heartbeat.clone(),
        config_hash: saved.config_hash.clone(),
        deploy_key: crate::tasks::deploy_key(state)
            .ok()
            .map(|k| k.fingerprint()),
        update: {
            let report = crate::update::Updater::default().report(&saved);
            UpdateView {
                state: report.state,
                version: report.version,
            }
        },
    };
    if as_json {
        outln!("{}", json::to_string(&view));
    } else {
        outln!("agent           {}", view.agent_id);
        outln!("server          {}", view.server);
        outln!("version         {} ({})", view.version, host::TARGET);
        outln!("certificate     valid until {}", view.cert_not_after);
        outln!(
            "last heartbeat  {}",
            view.last_heartbeat.as_deref().unwrap_or("never")
        );
        outln!(
            "config          {}",
            view.config_hash.as_deref().unwrap_or("none applied")
        );
        outln!(
            "deploy key      {}",
            view.deploy_key.as_deref().unwrap_or("none pinned")
        );
        outln!(
            "update          {} {}",
            view.update.state,
            view.update.version
        );
    }
    Ok(())
}
