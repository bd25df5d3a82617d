//! Agent lifecycle, as rules: the in-memory fleet (the store's agents plus
//! heartbeat soft state), the state machine (active, inactive with a reason,
//! revoked) as a function of state and transition, the one "may this agent
//! act" check every agent endpoint uses, and what a heartbeat changes and
//! gets back. Pure: `app` applies these to the store and the shared fleet.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use stella_proto::api::{
    AgentView, DoctorReport, HeartbeatRequest, MAX_DOCTOR_REPORT, MAX_FAILURE_LINE,
    MAX_FAILURE_LINES, UpdateFailureReport,
};
use stella_proto::states::CheckStatus;
use stella_proto::time::rfc3339;

use crate::config::{Configs, Desired};
use crate::records::{AgentRecord, AgentStatus, HeartbeatState, InactiveReason};
use crate::refusal::Refusal;
use crate::store::{Store, StoreError};

/// One agent as the running server knows it.
#[derive(Debug)]
pub(crate) struct LiveAgent {
    pub(crate) record: AgentRecord,
    pub(crate) hb: HeartbeatState,
    /// When the agent was last heard of or given a fresh start (ms): drives
    /// the heartbeat-timeout monitor.
    pub(crate) last_seen_ms: u64,
    /// The configuration it should run.
    pub(crate) desired: Arc<Desired>,
}

impl LiveAgent {
    /// The heartbeat interval this agent is asked to keep.
    pub(crate) fn interval(&self, default: Duration) -> Duration {
        self.desired.heartbeat_interval.unwrap_or(default)
    }

    /// Whether the agent is overdue: active, and silent for more than
    /// `misses` of its intervals.
    pub(crate) fn is_overdue(&self, now_ms: u64, default: Duration, misses: u32) -> bool {
        let allowed_ms = self.interval(default).as_millis() as u64 * u64::from(misses);
        self.record.status == AgentStatus::Active
            && now_ms.saturating_sub(self.last_seen_ms) > allowed_ms
    }

    /// The version it runs (reported, else declared at enrollment).
    pub(crate) fn version(&self) -> &str {
        if self.hb.version.is_empty() {
            &self.record.version
        } else {
            &self.hb.version
        }
    }
}

/// All agents, by id.
#[derive(Debug, Default)]
pub(crate) struct Fleet {
    /// Boxed: a `LiveAgent` is ~670 bytes, and a map stores its values in
    /// power-of-two bucket arrays, up to half of them empty.
    pub(crate) agents: HashMap<String, Box<LiveAgent>>,
    /// Agents whose heartbeat state is newer than the store's.
    pub(crate) dirty: HashSet<String>,
}

impl Fleet {
    /// Builds the fleet from the store. Agents get a fresh start from
    /// `started_ms`: the server being down is not the agents' fault.
    /// Rows are streamed from the store into the map: no second copy of the
    /// fleet exists at any time.
    pub(crate) fn load(
        store: &dyn Store,
        configs: &mut Configs,
        started_ms: u64,
    ) -> Result<Self, StoreError> {
        let mut agents = HashMap::new();
        store.load_agents(&mut |record, hb| {
            let last_seen_ms = hb.last_heartbeat_ms.max(started_ms);
            let desired = configs.desired(&record);
            agents.insert(
                record.id.clone(),
                Box::new(LiveAgent {
                    record,
                    hb,
                    last_seen_ms,
                    desired,
                }),
            );
        })?;
        Ok(Self {
            agents,
            dirty: HashSet::new(),
        })
    }

    /// Counts of agents by status, for `/metrics`.
    pub(crate) fn count_by_status(&self) -> [(AgentStatus, usize); 3] {
        let mut counts = [
            (AgentStatus::Active, 0),
            (AgentStatus::Inactive, 0),
            (AgentStatus::Revoked, 0),
        ];
        for agent in self.agents.values() {
            if let Some(slot) = counts.iter_mut().find(|(s, _)| *s == agent.record.status) {
                slot.1 += 1;
            }
        }
        counts
    }

    /// Recomputes every agent's desired configuration (after a change); an
    /// agent that no longer runs what it should drifts from `now_ms`.
    pub(crate) fn refresh_desired(&mut self, configs: &mut Configs, now_ms: u64) {
        configs.clear_cache();
        for live in self.agents.values_mut() {
            live.desired = configs.desired(&live.record);
            if live.hb.config_hash != live.desired.hash && live.hb.drift_since_ms == 0 {
                live.hb.drift_since_ms = now_ms;
            }
        }
    }

    /// Puts a record another server wrote in the fleet: mirrors it, or
    /// takes in an agent enrolled through another server (from `now_ms`,
    /// as a fresh enrollment).
    pub(crate) fn adopt(&mut self, record: AgentRecord, configs: &mut Configs, now_ms: u64) {
        if self.agents.contains_key(&record.id) {
            self.mirror(record, now_ms);
            return;
        }
        let desired = configs.desired(&record);
        self.agents.insert(
            record.id.clone(),
            Box::new(LiveAgent {
                record,
                hb: HeartbeatState::default(),
                last_seen_ms: now_ms,
                desired,
            }),
        );
    }

    /// Takes the heartbeat state another server saved for agent `id` when
    /// it is newer than this server's (the agent heartbeats there now);
    /// returns whether it did. Not marked dirty: it is stored already.
    pub(crate) fn merge_heartbeat(&mut self, id: &str, hb: HeartbeatState) -> bool {
        let Some(live) = self.agents.get_mut(id) else {
            return false;
        };
        if hb.last_heartbeat_ms <= live.hb.last_heartbeat_ms {
            return false;
        }
        live.last_seen_ms = live.last_seen_ms.max(hb.last_heartbeat_ms);
        live.hb = hb;
        true
    }

    /// Gives every agent a fresh start from `now_ms`, as at start-up: a
    /// server that just took over the timeout monitor may have missed
    /// heartbeats others received, which is not the agents' fault.
    pub(crate) fn fresh_start(&mut self, now_ms: u64) {
        for live in self.agents.values_mut() {
            live.last_seen_ms = live.last_seen_ms.max(now_ms);
        }
    }

    /// Puts a freshly committed record in the fleet.
    pub(crate) fn mirror(&mut self, record: AgentRecord, now_ms: u64) {
        if let Some(live) = self.agents.get_mut(&record.id) {
            if record.status == AgentStatus::Active && live.record.status != AgentStatus::Active {
                // A fresh start: do not time out again before it could heartbeat.
                live.last_seen_ms = live.last_seen_ms.max(now_ms);
            }
            live.record = record;
        }
    }
}

/// What an admin or the server does to an agent's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    Deactivate,
    Activate,
    Revoke,
    /// No heartbeat for `--heartbeat-misses` intervals.
    TimedOut,
    /// A heartbeat arrived from an agent marked timed out.
    HeardFrom,
}

impl Transition {
    /// The audit action.
    pub(crate) fn action(self) -> &'static str {
        match self {
            Transition::Deactivate => "agent.deactivate",
            Transition::Activate => "agent.activate",
            Transition::Revoke => "agent.revoke",
            Transition::TimedOut => "agent.heartbeat_timeout",
            Transition::HeardFrom => "agent.heartbeat_resumed",
        }
    }

    /// The status and reason after this transition from (`status`,
    /// `reason`): `Ok(None)` when nothing changes. Revoked is final.
    pub(crate) fn next(
        self,
        id: &str,
        status: AgentStatus,
        reason: Option<InactiveReason>,
    ) -> Result<Option<(AgentStatus, Option<InactiveReason>)>, Refusal> {
        use AgentStatus::{Active, Inactive, Revoked};
        use InactiveReason::{Deactivated, HeartbeatTimeout};
        Ok(Some(match (self, status, reason) {
            (Transition::Deactivate | Transition::Activate, Revoked, _) => {
                return Err(Refusal::conflict(format!(
                    "agent {id} is revoked, and revoked is final: enroll the host again with a new token"
                )));
            }
            (_, Revoked, _) => return Ok(None),
            (Transition::Revoke, _, _) => (Revoked, None),
            (Transition::Deactivate, Inactive, Some(Deactivated)) => return Ok(None),
            (Transition::Deactivate, _, _) => (Inactive, Some(Deactivated)),
            (Transition::Activate, Active, _) => return Ok(None),
            (Transition::Activate, _, _) => (Active, None),
            (Transition::TimedOut, Active, _) => (Inactive, Some(HeartbeatTimeout)),
            (Transition::HeardFrom, Inactive, Some(HeartbeatTimeout)) => (Active, None),
            (Transition::TimedOut | Transition::HeardFrom, _, _) => return Ok(None),
        }))
    }

    /// Applies the transition to a record; `Ok(false)` when nothing changes.
    pub(crate) fn apply(self, r: &mut AgentRecord) -> Result<bool, Refusal> {
        match self.next(&r.id, r.status, r.reason)? {
            Some((status, reason)) => {
                r.status = status;
                r.reason = reason;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// What an agent asks to do with its client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Act {
    /// Heartbeat: a deactivated agent is told so (403) and keeps trying.
    Heartbeat,
    /// Renew its certificate: allowed while deactivated, so that it is still
    /// reachable when activated again.
    Renew,
    /// Download a release artifact.
    Download,
    /// Ask how the server sees it.
    WhoAmI,
}

/// Whether the agent `agent_id` (its record, if known), presenting the
/// certificate `serial`, may `act`. Unknown, revoked and superseded
/// certificates get 401; a deactivated agent's heartbeat gets 403.
pub(crate) fn may_act(
    record: Option<&AgentRecord>,
    agent_id: &str,
    serial: &str,
    act: Act,
) -> Result<(), Refusal> {
    let Some(r) = record else {
        return Err(Refusal::unauthorized(format!(
            "agent {agent_id} is not known to this server: enroll it again"
        )));
    };
    if r.status == AgentStatus::Revoked {
        return Err(Refusal::unauthorized(format!(
            "agent {} is revoked: enroll the host again with a new token",
            r.id
        )));
    }
    if !r.accepts_serial(serial) {
        return Err(Refusal::unauthorized(format!(
            "certificate {serial} of agent {} has been superseded or revoked",
            r.id
        )));
    }
    if act == Act::Heartbeat && r.is_deactivated() {
        return Err(Refusal::forbidden(format!(
            "agent {} is deactivated by an administrator",
            r.id
        )));
    }
    Ok(())
}

/// Most capabilities or failing doctor checks a heartbeat may list.
const MAX_HEARTBEAT_LIST: usize = 32;
/// Longest error text an agent may report (config or update).
const MAX_ERROR_TEXT: usize = stella_proto::text::MAX_REPORT_TEXT;

/// Refuses a heartbeat with a field over its limit or with a control
/// character anywhere (an operator's terminal prints these strings), naming
/// the field: the same rules as registration. A cheap scan, once per string.
pub(crate) fn check_heartbeat(body: &HeartbeatRequest) -> Result<(), Refusal> {
    use crate::tokens::check_text;
    check_text("version", &body.version, 1, 64)?;
    check_text("config_hash", &body.config_hash, 0, 80)?;
    if let Some(e) = &body.config_error {
        check_text("config_error.hash", &e.hash, 0, 80)?;
        check_text("config_error.error", &e.error, 0, MAX_ERROR_TEXT)?;
    }
    check_list("capabilities", &body.capabilities, 32)?;
    check_list("doctor.failing", &body.doctor.failing, 64)?;
    let update = &body.update;
    // No check of `update.state`: a phase this server does not know (or
    // cannot print) is kept, cleaned (`phase_text`), never refused.
    check_text("update.version", &update.version, 0, 64)?;
    if let Some(error) = &update.error {
        check_text("update.error", error, 0, MAX_ERROR_TEXT)?;
    }
    if let Some(report) = &body.doctor_report {
        check_doctor_report(report)?;
    }
    if let Some(failure) = &body.update_failure {
        check_update_failure(failure)?;
    }
    if let Some(results) = &body.task_results {
        crate::tasks::check_reports(results)?;
    }
    Ok(())
}

/// Refuses a failed-update report with too many or too long log lines, or
/// with a control character anywhere (the agent bounds and cleans them).
fn check_update_failure(failure: &UpdateFailureReport) -> Result<(), Refusal> {
    use crate::tokens::check_text;
    check_text("update_failure.version", &failure.version, 0, 64)?;
    check_text("update_failure.reason", &failure.reason, 0, MAX_ERROR_TEXT)?;
    if failure.lines.len() > MAX_FAILURE_LINES {
        return Err(Refusal::bad_request(format!(
            "invalid update_failure.lines: {} lines, at most {MAX_FAILURE_LINES}",
            failure.lines.len()
        )));
    }
    failure
        .lines
        .iter()
        .try_for_each(|line| check_text("update_failure.lines", line, 0, MAX_FAILURE_LINE))
}

/// Refuses an uploaded doctor report over `MAX_DOCTOR_REPORT` (as JSON), with
/// an unknown status, or with a control character in any string.
fn check_doctor_report(report: &DoctorReport) -> Result<(), Refusal> {
    use crate::tokens::check_text;
    let size = miniserde::json::to_string(report).len();
    if size > MAX_DOCTOR_REPORT {
        return Err(Refusal::bad_request(format!(
            "invalid doctor_report: {size} bytes, at most {MAX_DOCTOR_REPORT}"
        )));
    }
    if report.checks.len() > MAX_HEARTBEAT_LIST {
        return Err(Refusal::bad_request(format!(
            "invalid doctor_report.checks: {} entries, at most {MAX_HEARTBEAT_LIST}",
            report.checks.len()
        )));
    }
    for c in &report.checks {
        check_text("doctor_report.checks.id", &c.id, 1, 64)?;
        if CheckStatus::parse(&c.status).is_none() {
            return Err(Refusal::bad_request(format!(
                "invalid doctor_report.checks.status: {:?} is not pass, warn, fail or skip",
                c.status
            )));
        }
        check_text("doctor_report.checks.code", &c.code, 0, 128)?;
        check_text(
            "doctor_report.checks.message",
            &c.message,
            0,
            MAX_ERROR_TEXT,
        )?;
    }
    if let Some(plan) = &report.remediation {
        for a in &plan.actions {
            check_text("doctor_report.remediation.pattern", &a.pattern, 0, 128)?;
            check_text("doctor_report.remediation.check", &a.check, 0, 128)?;
            check_text("doctor_report.remediation.action", &a.action, 0, 64)?;
            check_text(
                "doctor_report.remediation.result",
                &a.result,
                0,
                MAX_ERROR_TEXT,
            )?;
        }
    }
    Ok(())
}

fn check_list(field: &str, items: &[String], max_len: usize) -> Result<(), Refusal> {
    if items.len() > MAX_HEARTBEAT_LIST {
        return Err(Refusal::bad_request(format!(
            "invalid {field}: {} entries, at most {MAX_HEARTBEAT_LIST}",
            items.len()
        )));
    }
    items
        .iter()
        .try_for_each(|item| crate::tokens::check_text(field, item, 1, max_len))
}

/// Longest update phase kept; a longer one is cut.
const MAX_PHASE_TEXT: usize = 32;

/// An update phase as the server keeps it: as spelled when printable and
/// short (always, for the phases it knows), else cut to
/// [`MAX_PHASE_TEXT`] characters with control characters as `?`.
pub(crate) fn phase_text(phase: &str) -> std::borrow::Cow<'_, str> {
    if phase.len() <= MAX_PHASE_TEXT && !phase.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(phase);
    }
    std::borrow::Cow::Owned(
        phase
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .take(MAX_PHASE_TEXT)
            .collect(),
    )
}

/// Durable changes a heartbeat causes before it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct HeartbeatEffects {
    /// The agent was timed out: it is active again.
    pub(crate) reactivate: bool,
    /// The agent uses its new certificate: the one it replaced is refused
    /// from now on.
    pub(crate) retire_previous: bool,
}

/// What a heartbeat with certificate `serial` changes durably.
pub(crate) fn heartbeat_effects(r: &AgentRecord, serial: &str) -> HeartbeatEffects {
    HeartbeatEffects {
        reactivate: r.status == AgentStatus::Inactive
            && r.reason == Some(InactiveReason::HeartbeatTimeout),
        retire_previous: r.previous_serial.is_some() && r.cert_serial == serial,
    }
}

/// Forgets the replaced certificate once the agent presents its new one
/// `serial`; `false` when there is nothing to retire.
pub(crate) fn retire_previous(r: &mut AgentRecord, serial: &str) -> bool {
    let retire = r.cert_serial == serial && r.previous_serial.is_some();
    if retire {
        r.previous_serial = None;
    }
    retire
}

/// Records a heartbeat's soft state at `now_ms`; returns whether the answer
/// carries the desired configuration document (only when the agent runs
/// another one and has not already refused this one: an in-sync heartbeat
/// carries the hash alone).
pub(crate) fn record_heartbeat(agent: &mut LiveAgent, body: HeartbeatRequest, now_ms: u64) -> bool {
    let hb = &mut agent.hb;
    hb.last_heartbeat_ms = now_ms;
    hb.seq = body.seq;
    hb.uptime_s = body.uptime_s;
    hb.version = body.version;
    hb.config_hash = body.config_hash;
    hb.config_drift = body.config_drift;
    hb.config_error = body.config_error;
    hb.doctor = body.doctor;
    // Stored as text: a phase this server does not know is kept as the
    // agent spelled it (see `UpdatePhase::Unknown`), made printable.
    let phase = phase_text(body.update.state.as_str());
    if hb.update_state != phase {
        hb.update_state = phase.into_owned();
    }
    hb.update_version = body.update.version;
    hb.update_error = body.update.error;
    hb.update_bytes = body.update.bytes;
    hb.update_total = body.update.total;
    hb.capabilities = body.capabilities;
    agent.last_seen_ms = now_ms;
    let desired = &agent.desired;
    if hb.config_hash == desired.hash && !hb.config_drift {
        hb.drift_since_ms = 0;
    } else if hb.drift_since_ms == 0 {
        hb.drift_since_ms = now_ms;
    }
    let refused = hb
        .config_error
        .as_ref()
        .is_some_and(|e| e.hash == desired.hash);
    hb.config_hash != desired.hash && !refused
}

/// The release version to offer an agent now: its direct offer, else the
/// rollout's; unless it already runs that version or reported that the
/// update to it failed.
pub(crate) fn offered_version<'a>(
    agent: &'a LiveAgent,
    from_rollout: Option<&'a str>,
) -> Option<&'a str> {
    let version = agent.record.update_offer.as_deref().or(from_rollout)?;
    let hb = &agent.hb;
    let failed = hb.failed_version() == Some(version);
    (hb.version != version && !failed).then_some(version)
}

/// Records that a heartbeat answer offers `version`: the first offer of a
/// version starts its rollout deadline (`--agent-timeout`).
pub(crate) fn note_offer(hb: &mut HeartbeatState, version: &str, now_ms: u64) {
    if hb.offered_version.as_deref() != Some(version) {
        hb.offered_version = Some(version.to_owned());
        hb.offered_at_ms = Some(now_ms);
    }
}

/// The admin view of one agent.
pub(crate) fn view(live: &LiveAgent) -> AgentView {
    let r = &live.record;
    let hb = &live.hb;
    let version = live.version();
    AgentView {
        id: r.id.clone(),
        name: r.name.clone(),
        // `AgentView` is read by the e2e tests as strings too: typed at the
        // server's records, spelled here.
        status: r.status,
        reason: r.reason,
        version: version.to_owned(),
        target: r.platform.target.clone(),
        labels: r.labels.clone(),
        capabilities: if hb.last_heartbeat_ms == 0 {
            r.capabilities.clone()
        } else {
            hb.capabilities.clone()
        },
        last_heartbeat: (hb.last_heartbeat_ms != 0).then(|| rfc3339(hb.last_heartbeat_ms / 1000)),
        cert_not_after: rfc3339(r.cert_not_after),
        config_hash: (!hb.config_hash.is_empty()).then(|| hb.config_hash.clone()),
        platform: r.platform.clone(),
        enrolled_at: rfc3339(r.enrolled_at),
        cert_serial: r.cert_serial.clone(),
        heartbeat_seq: hb.seq,
        uptime_s: hb.uptime_s,
        doctor: hb.doctor.clone(),
        update: hb.update_report(version),
        config_error: hb
            .config_error
            .as_ref()
            .filter(|e| e.hash == live.desired.hash)
            .map(|e| e.error.clone()),
        // Kept in the store, not in the fleet: `app` adds it.
        last_failure: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Configs;
    use AgentStatus::{Active, Inactive, Revoked};
    use InactiveReason::{Deactivated, HeartbeatTimeout};

    fn record(status: AgentStatus, reason: Option<InactiveReason>) -> AgentRecord {
        AgentRecord::sample(status, reason)
    }

    fn live(r: AgentRecord) -> LiveAgent {
        let mut configs = Configs::default();
        let desired = configs.desired(&r);
        LiveAgent {
            record: r,
            hb: HeartbeatState::default(),
            last_seen_ms: 0,
            desired,
        }
    }

    #[test]
    fn the_state_machine_table() {
        let states = [
            (Active, None),
            (Inactive, Some(HeartbeatTimeout)),
            (Inactive, Some(Deactivated)),
            (Revoked, None),
        ];
        let same = Ok(None);
        let conflict = Err(409);
        // (transition, [result from each state above]).
        #[allow(clippy::type_complexity)]
        let table: [(
            Transition,
            [Result<Option<(AgentStatus, Option<InactiveReason>)>, u16>; 4],
        ); 5] = [
            (
                Transition::Deactivate,
                [
                    Ok(Some((Inactive, Some(Deactivated)))),
                    Ok(Some((Inactive, Some(Deactivated)))),
                    same,
                    conflict,
                ],
            ),
            (
                Transition::Activate,
                [
                    same,
                    Ok(Some((Active, None))),
                    Ok(Some((Active, None))),
                    conflict,
                ],
            ),
            (
                Transition::Revoke,
                [
                    Ok(Some((Revoked, None))),
                    Ok(Some((Revoked, None))),
                    Ok(Some((Revoked, None))),
                    same,
                ],
            ),
            (
                Transition::TimedOut,
                [
                    Ok(Some((Inactive, Some(HeartbeatTimeout)))),
                    same,
                    same,
                    same,
                ],
            ),
            (
                Transition::HeardFrom,
                [same, Ok(Some((Active, None))), same, same],
            ),
        ];
        for (transition, expected) in table {
            for ((status, reason), want) in states.iter().zip(expected) {
                let got = transition
                    .next("agt_a", *status, *reason)
                    .map_err(|r| r.status());
                assert_eq!(got, want, "{transition:?} from {status}/{reason:?}");
            }
        }
    }

    #[test]
    fn one_check_decides_who_may_act() {
        let cases = [
            (Act::Heartbeat, Active, None, "new", Ok(())),
            (Act::Heartbeat, Active, None, "old", Ok(())),
            (Act::Heartbeat, Active, None, "other", Err(401)),
            (Act::Heartbeat, Revoked, None, "new", Err(401)),
            (Act::Heartbeat, Inactive, Some(Deactivated), "new", Err(403)),
            (
                Act::Heartbeat,
                Inactive,
                Some(HeartbeatTimeout),
                "new",
                Ok(()),
            ),
            (Act::Renew, Inactive, Some(Deactivated), "new", Ok(())),
            (Act::Renew, Revoked, None, "new", Err(401)),
            (Act::Download, Inactive, Some(Deactivated), "old", Ok(())),
            (Act::Download, Active, None, "other", Err(401)),
            (Act::WhoAmI, Inactive, Some(Deactivated), "new", Ok(())),
            (Act::WhoAmI, Revoked, None, "new", Err(401)),
        ];
        for (act, status, reason, serial, want) in cases {
            let r = record(status, reason);
            let got = may_act(Some(&r), &r.id, serial, act).map_err(|e| e.status());
            assert_eq!(got, want, "{act:?} by {status}/{reason:?} with {serial}");
        }
        for act in [Act::Heartbeat, Act::Renew, Act::Download, Act::WhoAmI] {
            assert_eq!(may_act(None, "agt_x", "s", act).unwrap_err().status(), 401);
        }
    }

    #[test]
    fn heartbeat_effects_reactivate_and_retire() {
        let r = record(Inactive, Some(HeartbeatTimeout));
        assert_eq!(
            heartbeat_effects(&r, "new"),
            HeartbeatEffects {
                reactivate: true,
                retire_previous: true
            }
        );
        // Still on the old certificate: the new one is not known to work yet.
        assert!(!heartbeat_effects(&r, "old").retire_previous);
        assert!(!heartbeat_effects(&record(Active, None), "old").reactivate);
        let mut r = record(Active, None);
        assert!(!retire_previous(&mut r, "old"));
        assert!(retire_previous(&mut r, "new"));
        assert_eq!(r.previous_serial, None);
        assert!(!retire_previous(&mut r, "new"), "nothing left to retire");
    }

    fn beat(config_hash: &str, drift: bool) -> HeartbeatRequest {
        let mut body: HeartbeatRequest = miniserde::json::from_str(
            r#"{"seq":1,"version":"1.0.0","uptime_s":1,"config_hash":"","config_drift":false,"doctor":{"pass":0,"warn":0,"fail":0,"skip":0,"failing":[]},"update":{"state":"idle","version":"1.0.0"},"capabilities":[]}"#,
        )
        .expect("heartbeat JSON");
        body.config_hash = config_hash.to_owned();
        body.config_drift = drift;
        body
    }

    #[test]
    fn a_heartbeat_tracks_drift_and_pushes_only_what_is_needed() {
        let mut a = live(record(Active, None));
        let desired = a.desired.hash.clone();
        assert!(record_heartbeat(&mut a, beat("other", false), 1_000));
        assert_eq!(a.hb.drift_since_ms, 1_000);
        assert!(record_heartbeat(&mut a, beat("other", false), 2_000));
        assert_eq!(a.hb.drift_since_ms, 1_000, "drift keeps its start");
        assert!(!record_heartbeat(&mut a, beat(&desired, true), 3_000));
        assert_eq!(a.hb.drift_since_ms, 1_000, "edited on disk: still drifting");
        assert!(!record_heartbeat(&mut a, beat(&desired, false), 4_000));
        assert_eq!((a.hb.drift_since_ms, a.last_seen_ms), (0, 4_000));
        // A document the agent refused is not sent again.
        let mut refused = beat("other", false);
        refused.config_error = Some(stella_proto::api::ConfigRefusal {
            hash: desired,
            error: "bad".into(),
        });
        assert!(!record_heartbeat(&mut a, refused, 5_000));
    }

    #[test]
    fn every_string_of_a_heartbeat_is_checked_and_the_field_named() {
        assert_eq!(check_heartbeat(&beat("abc", false)), Ok(()));
        type Breaks = fn(&mut HeartbeatRequest);
        let cases: [(&str, Breaks); 11] = [
            ("doctor_report.checks.message", |b| {
                b.doctor_report = Some(report("bad\u{1b}[2J"))
            }),
            ("doctor_report.checks.status", |b| {
                let mut r = report("m");
                r.checks[0].status = "fine".into();
                b.doctor_report = Some(r)
            }),
            ("doctor_report: ", |b| {
                let mut r = report("m");
                r.checks = vec![r.checks[0].clone(); 32];
                r.checks
                    .iter_mut()
                    .for_each(|c| c.message = "m".repeat(1024));
                b.doctor_report = Some(r)
            }),
            ("version", |b| b.version = "1.0\u{1b}]0;x\u{7}".into()),
            ("version", |b| b.version = "9".repeat(65)),
            ("config_hash", |b| b.config_hash = "h\n".into()),
            ("capabilities", |b| {
                b.capabilities = vec!["docker\u{9b}".into()]
            }),
            ("capabilities", |b| b.capabilities = vec!["x".into(); 33]),
            ("doctor.failing", |b| {
                b.doctor.failing = vec!["\u{0}".into()]
            }),
            ("update.error", |b| b.update.error = Some("e".repeat(1025))),
            ("config_error.error", |b| {
                b.config_error = Some(stella_proto::api::ConfigRefusal {
                    hash: "h".into(),
                    error: "bad\u{1b}[2J".into(),
                })
            }),
        ];
        for (field, break_it) in cases {
            let mut body = beat("abc", false);
            break_it(&mut body);
            let refused = check_heartbeat(&body).expect_err(field);
            assert_eq!(refused.status(), 400);
            assert!(
                refused.message.starts_with(&format!("invalid {field}")),
                "{field}: {}",
                refused.message
            );
            assert!(!refused.message.contains('\u{1b}'), "{}", refused.message);
            assert!(refused.message.len() < 300, "{}", refused.message);
        }
    }

    fn report(message: &str) -> DoctorReport {
        DoctorReport {
            checks: vec![stella_proto::api::DoctorCheckView {
                id: "identity.key".into(),
                status: "warn".into(),
                code: "identity.key/mode".into(),
                message: message.into(),
                duration_us: 1,
            }],
            summary: Default::default(),
            remediation: None,
        }
    }

    #[test]
    fn a_doctor_report_within_its_limit_is_accepted() {
        let mut body = beat("abc", false);
        body.doctor_report = Some(report("key mode 0644"));
        assert_eq!(check_heartbeat(&body), Ok(()));
    }

    #[test]
    fn offers_skip_the_running_and_the_failed_version() {
        let mut a = live(record(Active, None));
        assert_eq!(offered_version(&a, None), None);
        assert_eq!(offered_version(&a, Some("1.1.0")), Some("1.1.0"));
        a.record.update_offer = Some("1.2.0".into());
        assert_eq!(
            offered_version(&a, Some("1.1.0")),
            Some("1.2.0"),
            "direct first"
        );
        a.hb.version = "1.2.0".into();
        assert_eq!(offered_version(&a, None), None, "already runs it");
        a.hb.version = "1.0.0".into();
        a.hb.update_state = "failed".into();
        a.hb.update_version = "1.2.0".into();
        assert_eq!(offered_version(&a, None), None, "failed before");
        a.hb.update_state = "rolled_back".into();
        assert_eq!(offered_version(&a, None), None, "rolled back before");
        let mut hb = HeartbeatState::default();
        note_offer(&mut hb, "1.2.0", 5);
        note_offer(&mut hb, "1.2.0", 9);
        assert_eq!(
            (hb.offered_version.as_deref(), hb.offered_at_ms),
            (Some("1.2.0"), Some(5))
        );
    }

    #[test]
    fn overdue_after_the_allowed_misses() {
        let mut a = live(record(Active, None));
        let interval = Duration::from_secs(1);
        a.last_seen_ms = 10_000;
        assert!(!a.is_overdue(13_000, interval, 3));
        assert!(a.is_overdue(13_001, interval, 3));
        a.record.status = Inactive;
        assert!(
            !a.is_overdue(20_000, interval, 3),
            "only active agents time out"
        );
    }
}
