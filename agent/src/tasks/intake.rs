//! What a delivered task must pass before anything runs: the shape (proto's
//! check), the signature with the deploy key pinned in the state dir (never
//! a key from the server), the server id being the hash of the signed
//! payload, this agent in the audience (its id, or the selector against the
//! labels it was enrolled with), `not_after` not passed, the type among this
//! host's capabilities, and the signed id not run before.

use stella_proto::api::Labels;
use stella_proto::dsse::PublicKey;
use stella_proto::task::{self, Task};

use super::journal::Journal;
use crate::error::Error;
use crate::state::{DEPLOY_KEY, RELEASE_KEY, StateDir};

/// Who this agent is, for the audience check.
#[derive(Debug, Default)]
pub(crate) struct Me {
    pub(crate) id: String,
    /// `None`: enrolled before tasks existed; only an id audience matches.
    pub(crate) labels: Option<Labels>,
    pub(crate) capabilities: Vec<String>,
}

/// What to do with a delivery.
#[derive(Debug)]
pub(crate) enum Decision {
    Run(Box<Task>),
    /// This delivery was accepted before (a lost answer): send its result again.
    Duplicate,
    Refuse(String),
}

/// The pinned deploy key: `deploy-key.pub`, or for an agent enrolled before
/// tasks existed, the release key it pinned.
pub(crate) fn deploy_key(state: &StateDir) -> Result<PublicKey, String> {
    let (name, pem) = match state.read_text(DEPLOY_KEY) {
        Ok(pem) => (DEPLOY_KEY, pem),
        Err(_) => match state.read_text(RELEASE_KEY) {
            Ok(pem) => (RELEASE_KEY, pem),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!(
                    "no deploy key is pinned ({DEPLOY_KEY} is missing from the state dir)"
                ));
            }
            Err(e) => return Err(format!("no deploy key is pinned: {e}")),
        },
    };
    PublicKey::from_pem(&pem).map_err(|e| format!("{name}: {e}"))
}

/// Checks one delivery (`server_id`, `envelope`).
pub(crate) fn check(
    server_id: &str,
    envelope: &str,
    key: Result<&PublicKey, &str>,
    me: &Me,
    journal: &Journal,
    now: u64,
) -> Decision {
    match check_task(server_id, envelope, key, me, now) {
        Err(reason) => Decision::Refuse(reason),
        Ok(task) => match journal.get(&task.id) {
            Some(seen) if seen.server_id == server_id => Decision::Duplicate,
            Some(seen) => Decision::Refuse(format!(
                "replayed task id {:?}: this agent already ran it as task {}",
                task.id, seen.server_id
            )),
            None => Decision::Run(Box::new(task)),
        },
    }
}

fn check_task(
    server_id: &str,
    envelope: &str,
    key: Result<&PublicKey, &str>,
    me: &Me,
    now: u64,
) -> Result<Task, String> {
    let checked = task::check_envelope(envelope.as_bytes()).map_err(|e| e.to_string())?;
    let key = key.map_err(str::to_owned)?;
    checked
        .envelope
        .verify(task::PAYLOAD_TYPE, key)
        .map_err(|e| format!("task signature: {e} (with the pinned deploy key)"))?;
    if checked.server_id() != server_id {
        return Err(format!(
            "the server's task id {server_id} is not the hash of the signed task ({})",
            checked.server_id()
        ));
    }
    let t = checked.task;
    let labels = me.labels.clone().unwrap_or_default();
    if !t.audience.includes(&me.id, &labels) {
        return Err(format!(
            "agent {} is not in the task's audience{}",
            me.id,
            if me.labels.is_none() {
                " (this agent was enrolled without recorded labels)"
            } else {
                ""
            }
        ));
    }
    t.check_fresh(now).map_err(|e| e.to_string())?;
    let needs = t.spec.capabilities();
    if !needs.is_empty() && !needs.iter().any(|c| me.capabilities.iter().any(|m| m == c)) {
        return Err(format!(
            "task type {} needs one of the capabilities {}; this agent has [{}]",
            t.spec.type_name(),
            needs.join(", "),
            me.capabilities.join(", ")
        ));
    }
    Ok(t)
}
