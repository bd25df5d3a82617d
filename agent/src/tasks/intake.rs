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

#[cfg(test)]
mod tests {
    use stella_proto::dsse::{self, SigningKey};

    use super::*;
    use crate::tasks::journal::Entry;

    const AGENT: &str = "agt_aaaaaaaaaaaaaaaaaaaaaaaaaa";
    const NOW: u64 = 1_800_000_000;

    fn task_json(id: &str, audience: &str, task_type: &str) -> String {
        let fields = match task_type {
            "file" => r#""path":"/tmp/x","content_base64":"aGkK","mode":"0644""#.to_owned(),
            _ => format!(
                r#""name":"web","image":"localhost/web@sha256:{}""#,
                "ab".repeat(32)
            ),
        };
        format!(
            r#"{{"id":"{id}","type":"{task_type}","not_after":"2030-01-01T00:00:00Z","audience":{audience},{fields}}}"#
        )
    }

    fn signed(key: &SigningKey, json: &str) -> (String, String) {
        let env = dsse::sign(key, task::PAYLOAD_TYPE, json.as_bytes()).to_json();
        (task::server_task_id(json.as_bytes()), env)
    }

    fn me() -> Me {
        Me {
            id: AGENT.into(),
            labels: Some(Labels::from([("role".into(), "web".into())])),
            capabilities: vec!["systemd".into()],
        }
    }

    fn reason(d: Decision) -> String {
        match d {
            Decision::Refuse(r) => r,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn every_check_refuses_with_its_reason() {
        let (key, _) = SigningKey::generate().unwrap();
        let (other, _) = SigningKey::generate().unwrap();
        let pinned = key.public_key();
        let journal = Journal::default();
        let by_label = r#"{"selector":{"role":"web"}}"#;
        let check = |sid: &str, env: &str, me: &Me, journal: &Journal, now: u64| {
            check(sid, env, Ok(&pinned), me, journal, now)
        };

        let (sid, env) = signed(&key, &task_json("t1", by_label, "file"));
        assert!(matches!(
            check(&sid, &env, &me(), &journal, NOW),
            Decision::Run(_)
        ));
        let (sid2, env2) = signed(&other, &task_json("t1", by_label, "file"));
        assert!(reason(check(&sid2, &env2, &me(), &journal, NOW)).contains("signature"));
        // A payload the server altered: the signature no longer covers it.
        let tampered_json = task_json("t1", r#"{"selector":{}}"#, "file");
        let mut tampered = dsse::Envelope::from_json(env.as_bytes()).unwrap();
        tampered.payload = dsse::sign(&other, task::PAYLOAD_TYPE, tampered_json.as_bytes()).payload;
        let tampered_id = task::server_task_id(tampered_json.as_bytes());
        assert!(
            reason(check(
                &tampered_id,
                &tampered.to_json(),
                &me(),
                &journal,
                NOW
            ))
            .contains("signature")
        );
        // A server id that is not the payload's hash.
        assert!(
            reason(check("0123456789abcdef", &env, &me(), &journal, NOW)).contains("not the hash")
        );
        let db = Me {
            labels: Some(Labels::from([("role".into(), "db".into())])),
            ..me()
        };
        assert!(reason(check(&sid, &env, &db, &journal, NOW)).contains("audience"));
        let unlabelled = Me {
            labels: None,
            ..me()
        };
        assert!(
            reason(check(&sid, &env, &unlabelled, &journal, NOW))
                .contains("without recorded labels")
        );
        let (sid3, env3) = signed(
            &key,
            &task_json(
                "t3",
                r#"{"agents":["agt_bbbbbbbbbbbbbbbbbbbbbbbbbb"]}"#,
                "file",
            ),
        );
        assert!(reason(check(&sid3, &env3, &me(), &journal, NOW)).contains("audience"));
        assert!(reason(check(&sid, &env, &me(), &journal, 1_900_000_000)).contains("expired"));
        let (sid4, env4) = signed(&key, &task_json("t4", by_label, "container"));
        assert!(reason(check(&sid4, &env4, &me(), &journal, NOW)).contains("capabilities"));
        let podman = Me {
            capabilities: vec!["podman".into()],
            ..me()
        };
        assert!(matches!(
            check(&sid4, &env4, &podman, &journal, NOW),
            Decision::Run(_)
        ));
        let missing: Result<&PublicKey, &str> = Err("no deploy key is pinned");
        assert!(
            reason(super::check(&sid, &env, missing, &me(), &journal, NOW))
                .contains("no deploy key")
        );

        // Replays: the same signed id under another server id.
        let dir = std::env::temp_dir().join(format!("stella-intake-{}", std::process::id()));
        let state = StateDir::new(dir.clone());
        state.create().unwrap();
        let mut journal = Journal::default();
        journal
            .record(
                &state,
                Entry {
                    id: "t1".into(),
                    server_id: sid.clone(),
                    not_after: 1_893_456_000,
                    status: "succeeded".into(),
                    reason: None,
                    exit_code: None,
                    output: None,
                    started: None,
                    finished: None,
                },
                NOW,
            )
            .unwrap();
        assert!(matches!(
            check(&sid, &env, &me(), &journal, NOW),
            Decision::Duplicate
        ));
        let replay_json = task_json("t1", by_label, "file").replace("aGkK", "aGkhCg==");
        let (rsid, renv) = signed(&key, &replay_json);
        assert!(reason(check(&rsid, &renv, &me(), &journal, NOW)).contains("replayed"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
