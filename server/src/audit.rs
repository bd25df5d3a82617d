//! The audit log's rules: who acts (an admin token, an agent, the server)
//! and from where, the outcome of an act, the line each act leaves, and which
//! lines a query selects. The store appends a change's line in the same
//! transaction as the change; a refusal (nothing changed) is appended alone.
//! The log is append-only: nothing changes or deletes a line.
//!
//! Who acts is set around an operation with [`acting_as`] (the API does, for
//! the request it serves) and read by [`line`] where the store writes the
//! line, so that every store method keeps its signature: an operation runs
//! on one thread from start to commit, and what runs with no actor set (the
//! timeout monitor, the rollout controller) is the server's own act.

use std::cell::RefCell;
use std::net::IpAddr;

use stella_proto::admin::AuditEntry;
use stella_proto::time::rfc3339;

use crate::records::{AgentRecord, AuditRecord};

/// The actor of the server's own acts.
pub(crate) const SERVER: &str = "server";
/// Entries per page of `GET /v1/admin/audit`, by default and at most.
pub(crate) const DEFAULT_LIMIT: usize = 100;
pub(crate) const MAX_LIMIT: usize = 1000;

/// Who acts: an admin token's name or an agent id, and the address the
/// request came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Actor {
    /// Empty when a refused caller could not be identified.
    pub(crate) name: String,
    pub(crate) source: Option<IpAddr>,
}

impl Actor {
    pub(crate) fn new(name: impl Into<String>, source: IpAddr) -> Self {
        Self {
            name: name.into(),
            source: Some(source),
        }
    }
}

thread_local! {
    static ACTING: RefCell<Option<Actor>> = const { RefCell::new(None) };
}

/// Restores the previous actor when an operation ends, panics included.
struct Restore(Option<Actor>);

impl Drop for Restore {
    fn drop(&mut self) {
        let previous = self.0.take();
        ACTING.with(|a| *a.borrow_mut() = previous);
    }
}

/// Runs `work` (on this thread) with `actor` as the author of every audit
/// line it writes.
pub(crate) fn acting_as<T>(actor: &Actor, work: impl FnOnce() -> T) -> T {
    let previous = ACTING.with(|a| a.borrow_mut().replace(actor.clone()));
    let _restore = Restore(previous);
    work()
}

/// Who acts now on this thread: `None` for the server itself.
pub(crate) fn current() -> Option<Actor> {
    ACTING.with(|a| a.borrow().clone())
}

/// How an act that changed nothing ended (a change's line says `ok`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Refused (4xx): nothing was changed.
    Refused,
    /// Failed on the server's side (5xx): nothing was changed.
    Failed,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }

    /// The outcome of an act that changed nothing, answered with HTTP
    /// `status`: the server's failure (5xx) or a refusal.
    pub(crate) fn of_unchanged(status: u16) -> Self {
        if status >= 500 {
            Outcome::Failed
        } else {
            Outcome::Refused
        }
    }
}

/// The line of a change by whoever acts now (see [`acting_as`]).
pub(crate) fn line(at: u64, action: &str, subject: &str, detail: &str) -> AuditRecord {
    let actor = current();
    AuditRecord {
        at,
        action: action.to_owned(),
        subject: subject.to_owned(),
        detail: detail.to_owned(),
        actor: Some(actor.as_ref().map_or(SERVER, |a| &a.name).to_owned()),
        source: actor.and_then(|a| a.source).map(|s| s.to_string()),
        outcome: None,
    }
}

/// The line of a change whose actor is known only where it is written (an
/// enrolling agent gets its id inside the enrollment), from the current
/// source.
pub(crate) fn line_by(
    at: u64,
    actor: &str,
    action: &str,
    subject: &str,
    detail: &str,
) -> AuditRecord {
    AuditRecord {
        actor: Some(actor.to_owned()),
        ..line(at, action, subject, detail)
    }
}

/// The line of an enrollment. The new agent acts: it presented the token.
pub(crate) fn enrolled(at: u64, token: &str, agent: &AgentRecord, serial: &str) -> AuditRecord {
    line_by(
        at,
        &agent.id,
        "agent.enroll",
        &agent.id,
        &format!("token={token} name={} serial={serial}", agent.name),
    )
}

/// What the audit log says of each change a store records, the same for
/// every backend.
pub(crate) mod detail {
    use crate::records::{
        AdminTokenRecord, ReleaseRecord, TaskRecord, TaskResultRecord, TokenRecord,
        UpdateFailureRecord,
    };
    use stella_proto::time::rfc3339;

    pub(crate) fn token_created(t: &TokenRecord) -> String {
        format!("uses={} expires_at={}", t.uses, rfc3339(t.expires_at))
    }

    pub(crate) fn status_changed(before: &str, after: &str) -> String {
        format!("{before} -> {after}")
    }

    pub(crate) fn release_imported(r: &ReleaseRecord) -> String {
        format!("files={}", r.files.len())
    }

    pub(crate) fn config_set(version: u64, hash: &str) -> String {
        format!("version={version} hash={hash}")
    }

    pub(crate) fn update_failed(f: &UpdateFailureRecord) -> String {
        format!(
            "{} {}: {}",
            f.report.phase.as_str(),
            f.report.version,
            f.report.reason
        )
    }

    pub(crate) fn task_created(t: &TaskRecord) -> String {
        format!("task_id={} type={}", t.task_id, t.task_type)
    }

    pub(crate) fn task_result(r: &TaskResultRecord) -> String {
        format!("agent={} status={}", r.agent, r.status.as_str())
    }

    pub(crate) fn admin_token_created(t: &AdminTokenRecord) -> String {
        let expires = t.expires_at.map_or_else(|| "never".to_owned(), rfc3339);
        format!("role={} expires_at={expires}", t.role)
    }
}

/// The line of an act that was refused or failed (nothing was changed).
pub(crate) fn unchanged(
    at: u64,
    actor: &Actor,
    outcome: Outcome,
    action: &str,
    subject: &str,
    detail: &str,
) -> AuditRecord {
    AuditRecord {
        at,
        action: action.to_owned(),
        subject: subject.to_owned(),
        detail: detail.to_owned(),
        actor: Some(actor.name.clone()),
        source: actor.source.map(|s| s.to_string()),
        outcome: Some(outcome.as_str().to_owned()),
    }
}

/// The line as the API shows it.
pub(crate) fn entry(seq: u64, r: &AuditRecord) -> AuditEntry {
    AuditEntry {
        seq,
        time: rfc3339(r.at),
        actor: r.actor.clone().unwrap_or_else(|| SERVER.to_owned()),
        source: r.source.clone().unwrap_or_default(),
        action: r.action.clone(),
        target: r.subject.clone(),
        outcome: r.outcome.clone().unwrap_or_else(|| "ok".to_owned()),
        detail: r.detail.clone(),
    }
}

/// Which lines `audit` and `GET /v1/admin/audit` show.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Query {
    /// Lines at or after this time (unix seconds).
    pub(crate) since: Option<u64>,
    /// Lines by or about this agent.
    pub(crate) agent: Option<String>,
    /// Lines by this actor.
    pub(crate) actor: Option<String>,
}

impl Query {
    pub(crate) fn matches(&self, r: &AuditRecord) -> bool {
        let actor = r.actor.as_deref().unwrap_or(SERVER);
        self.since.is_none_or(|t| r.at >= t)
            && self
                .agent
                .as_deref()
                .is_none_or(|a| r.subject == a || actor == a)
            && self.actor.as_deref().is_none_or(|a| actor == a)
    }
}

/// `--since`/`since=`: a duration back from `now` (`24h`) or an RFC 3339
/// time.
pub(crate) fn parse_since(s: &str, now: u64) -> Result<u64, String> {
    if let Some(t) = stella_proto::time::parse_rfc3339(s) {
        return Ok(t);
    }
    stella_proto::parse_duration(s)
        .map(|d| now.saturating_sub(d.as_secs()))
        .map_err(|_| {
            format!("invalid since {s:?}: use a duration back from now (24h) or an RFC 3339 time")
        })
}

/// `limit=`: 1 to [`MAX_LIMIT`], [`DEFAULT_LIMIT`] when absent.
pub(crate) fn parse_limit(s: Option<&str>) -> Result<usize, String> {
    match s.map(str::parse::<usize>) {
        None => Ok(DEFAULT_LIMIT),
        Some(Ok(n)) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(_) => Err(format!("limit must be 1 to {MAX_LIMIT}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_name_who_acts_and_the_server_otherwise() {
        let own = line(1, "agent.timeout", "agt_a", "");
        assert_eq!(own.actor.as_deref(), Some(SERVER));
        assert_eq!(own.source, None);
        let admin = Actor::new("ci", IpAddr::from([10, 0, 0, 1]));
        let by_admin = acting_as(&admin, || line(2, "config.set", "global", ""));
        assert_eq!(by_admin.actor.as_deref(), Some("ci"));
        assert_eq!(by_admin.source.as_deref(), Some("10.0.0.1"));
        assert_eq!(current(), None, "restored after the operation");
        let e = entry(7, &by_admin);
        assert_eq!(
            (e.seq, e.outcome.as_str(), e.target.as_str()),
            (7, "ok", "global")
        );
        let refused = unchanged(3, &admin, Outcome::Refused, "agent.revoke", "agt_b", "403");
        assert_eq!(entry(8, &refused).outcome, "refused");
    }

    #[test]
    fn queries_select_by_time_agent_and_actor() {
        let admin = Actor::new("ci", IpAddr::from([10, 0, 0, 1]));
        let revoke = acting_as(&admin, || line(100, "agent.revoke", "agt_a", ""));
        let enroll = line_by(50, "agt_b", "agent.enroll", "agt_b", "");
        let q = |since, agent: Option<&str>, actor: Option<&str>| Query {
            since,
            agent: agent.map(str::to_owned),
            actor: actor.map(str::to_owned),
        };
        assert!(q(Some(100), None, None).matches(&revoke));
        assert!(!q(Some(100), None, None).matches(&enroll));
        assert!(q(None, Some("agt_a"), None).matches(&revoke));
        assert!(q(None, Some("agt_b"), None).matches(&enroll));
        assert!(q(None, None, Some("ci")).matches(&revoke));
        assert!(!q(None, None, Some("ci")).matches(&enroll));
        assert_eq!(parse_since("24h", 100_000), Ok(100_000 - 86_400));
        assert_eq!(parse_since("2026-01-01T00:00:00Z", 0), Ok(1_767_225_600));
        assert!(parse_since("yesterday", 0).is_err());
        assert_eq!(parse_limit(None), Ok(DEFAULT_LIMIT));
        assert!(parse_limit(Some("0")).is_err());
        assert!(parse_limit(Some("1001")).is_err());
    }
}
