//! Deployment tasks (docs/design.md, "Tasks"): what the server checks when a
//! signed task is created (its shape, not its signature: the server does not
//! know the deploy key and never alters the envelope), who it is delivered
//! to and until when, who is told to cancel it, what a reported result may
//! hold, and a task's aggregate state.
//!
//! # Rules
//!
//! - A task is delivered, in heartbeat answers, to each agent in its audience
//!   (its listed ids, or the agents whose labels include its selector) while
//!   the task is not cancelled, `not_after` has not passed, and that agent
//!   has reported nothing on it. Any report stops delivery to that agent.
//! - A cancelled task's id is sent in `cancel_tasks` to each agent whose
//!   latest report is `running`, until it reports a final status.
//! - An agent's latest report on a task replaces its earlier one.
//! - The state of a task is, in this order: `cancelled` once cancelled;
//!   `running` while some agent reports `running`; `pending` while an agent of
//!   the audience has not reported and `not_after` has not passed; `failed`
//!   when some agent reported a final status other than `succeeded`;
//!   `expired` when `not_after` passed before every agent of the audience
//!   reported; otherwise `succeeded`. The audience counted is its
//!   non-revoked agents known now, plus every agent that reported.

use std::collections::BTreeMap;

use stella_proto::api::{Labels, TaskDelivery, TaskResultReport};
use stella_proto::states::{TaskState, TaskStatus};
use stella_proto::task::{self, Audience, CheckedEnvelope, TaskError};

use crate::records::{TaskRecord, TaskResultRecord};
use crate::refusal::Refusal;

/// Most results one heartbeat may carry (an agent sends at most
/// `task::MAX_RESULTS_PER_HEARTBEAT`; this only refuses nonsense).
pub(crate) const MAX_REPORTS_PER_HEARTBEAT: usize = 64;

/// Envelope bytes one heartbeat answer carries at most (one task always
/// goes, whatever its size): the rest wait for the next heartbeat.
pub(crate) const MAX_DELIVERY_BYTES: usize = task::MAX_ENVELOPE_BYTES;

/// Largest artifact `task artifact` may upload (bytes).
pub(crate) const MAX_ARTIFACT_BYTES: u64 = 4 << 30;

/// A task in memory: its record, its audience, and each agent's latest
/// status.
#[derive(Debug, Clone)]
pub(crate) struct LiveTask {
    pub(crate) record: TaskRecord,
    pub(crate) audience: Audience,
    pub(crate) statuses: BTreeMap<String, TaskStatus>,
}

impl LiveTask {
    fn new(record: TaskRecord) -> Self {
        let audience = audience_of(&record);
        Self {
            record,
            audience,
            statuses: BTreeMap::new(),
        }
    }
}

/// The audience a record stores.
fn audience_of(record: &TaskRecord) -> Audience {
    match (&record.agents, &record.selector) {
        (Some(agents), _) => Audience::Agents(agents.clone()),
        (None, Some(selector)) => Audience::Selector(selector.clone()),
        // Never written so; an empty list reaches nobody.
        (None, None) => Audience::Agents(Vec::new()),
    }
}

/// `agents:ID,ID` or `selector:K=V,K=V` (`selector:` alone: every agent).
pub(crate) fn audience_text(audience: &Audience) -> String {
    match audience {
        Audience::Agents(ids) => format!("agents:{}", ids.join(",")),
        Audience::Selector(selector) => {
            let pairs: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("selector:{}", pairs.join(","))
        }
    }
}

/// Every task, with each agent's latest status: a cache of the store.
#[derive(Debug, Default)]
pub(crate) struct Tasks {
    pub(crate) by_id: BTreeMap<String, LiveTask>,
}

impl Tasks {
    /// The tasks and results the store holds.
    pub(crate) fn load(records: Vec<TaskRecord>, results: &[TaskResultRecord]) -> Self {
        let mut tasks = Self::default();
        for record in records {
            tasks.insert(record);
        }
        tasks.record_results(results);
        tasks
    }

    pub(crate) fn insert(&mut self, record: TaskRecord) {
        match self.by_id.get_mut(&record.id) {
            Some(live) => live.record = record,
            None => {
                self.by_id.insert(record.id.clone(), LiveTask::new(record));
            }
        }
    }

    /// Mirrors stored results.
    pub(crate) fn record_results(&mut self, results: &[TaskResultRecord]) {
        for r in results {
            if let Some(live) = self.by_id.get_mut(&r.task) {
                live.statuses.insert(r.agent.clone(), r.status.clone());
            }
        }
    }

    /// Whether storing `result` changes what is known: a report for an
    /// unknown task is dropped, and the same status again is not written
    /// again (an agent repeats its report until an answer arrives).
    pub(crate) fn is_news(&self, result: &TaskResultRecord) -> bool {
        self.by_id
            .get(&result.task)
            .is_some_and(|live| live.statuses.get(&result.agent) != Some(&result.status))
    }

    /// What a heartbeat answer carries for agent `agent_id` with `labels` at
    /// `now` (Unix seconds): the tasks to deliver (oldest first, within
    /// [`MAX_DELIVERY_BYTES`]) and the ids to cancel; `None` for none.
    pub(crate) fn for_agent(
        &self,
        agent_id: &str,
        labels: &Labels,
        now: u64,
    ) -> (Option<Vec<TaskDelivery>>, Option<Vec<String>>) {
        let mut deliver: Vec<&TaskRecord> = Vec::new();
        let mut cancel = Vec::new();
        for live in self.by_id.values() {
            let status = live.statuses.get(agent_id);
            if live.record.cancelled_at.is_some() {
                if status == Some(&TaskStatus::Running) {
                    cancel.push(live.record.id.clone());
                }
                continue;
            }
            if status.is_none()
                && now <= live.record.not_after
                && live.audience.includes(agent_id, labels)
            {
                deliver.push(&live.record);
            }
        }
        deliver.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        let mut tasks = Vec::new();
        let mut bytes = 0;
        for record in deliver {
            bytes += record.envelope.len();
            if !tasks.is_empty() && bytes > MAX_DELIVERY_BYTES {
                break;
            }
            tasks.push(TaskDelivery {
                id: record.id.clone(),
                envelope: record.envelope.clone(),
            });
        }
        (
            (!tasks.is_empty()).then_some(tasks),
            (!cancel.is_empty()).then_some(cancel),
        )
    }
}

/// The refusal for a task that fails the shape check.
fn refuse(e: TaskError) -> Refusal {
    Refusal::bad_request(format!("invalid task: {e}"))
}

/// Checks a task envelope sent to `task create` at `now` (Unix seconds) and
/// makes its record: the DSSE shape, the payload type, the task's shape, and
/// that it has not expired. Nothing about the signature.
pub(crate) fn check_new(envelope: &[u8], now: u64) -> Result<TaskRecord, Refusal> {
    let checked: CheckedEnvelope = task::check_envelope(envelope).map_err(refuse)?;
    checked.task.check_fresh(now).map_err(refuse)?;
    let text = std::str::from_utf8(envelope)
        .map_err(|_| Refusal::bad_request("invalid task: the envelope is not UTF-8"))?;
    let (agents, selector) = match &checked.task.audience {
        Audience::Agents(ids) => (Some(ids.clone()), None),
        Audience::Selector(selector) => (None, Some(selector.clone())),
    };
    Ok(TaskRecord {
        id: checked.server_id(),
        task_id: checked.task.id.clone(),
        task_type: checked.task.spec.type_name().to_owned(),
        // Exactly as received: the agent verifies these bytes' signature.
        envelope: text.to_owned(),
        not_after: checked.task.not_after_unix,
        agents,
        selector,
        created_at: now,
        cancelled_at: None,
    })
}

/// Refuses a heartbeat with more than [`MAX_REPORTS_PER_HEARTBEAT`] results.
pub(crate) fn check_reports(reports: &[TaskResultReport]) -> Result<(), Refusal> {
    if reports.len() > MAX_REPORTS_PER_HEARTBEAT {
        return Err(Refusal::bad_request(format!(
            "invalid task_results: {} entries, at most {MAX_REPORTS_PER_HEARTBEAT}",
            reports.len()
        )));
    }
    Ok(())
}

/// A report from `agent` as stored at `now`, its texts bounded (the agent
/// bounds them already; a longer one is cut, not refused, so that a result
/// is never lost for its size). `None` for an id that names no task.
pub(crate) fn result_record(
    agent: &str,
    report: TaskResultReport,
    now: u64,
) -> Option<TaskResultRecord> {
    if !task::is_server_task_id(&report.id) {
        return None;
    }
    let time = |t: Option<String>| {
        t.filter(|t| stella_proto::time::parse_rfc3339(t).is_some() && t.len() <= 40)
    };
    let status = match report.status {
        TaskStatus::Unknown(text) => TaskStatus::Unknown(stella_proto::text::report_text(
            &text.chars().take(32).collect::<String>(),
        )),
        known => known,
    };
    Some(TaskResultRecord {
        task: report.id,
        agent: agent.to_owned(),
        status,
        reason: report.reason.map(|r| stella_proto::text::report_text(&r)),
        exit_code: report.exit_code,
        output: report.output.map(|o| task::output_tail(&o)),
        started: time(report.started),
        finished: time(report.finished),
        reported_at: now,
    })
}

/// The state of `live` at `now` (Unix seconds), given the agents of its
/// audience known now (see the module's rules).
pub(crate) fn state(live: &LiveTask, audience_now: &[&str], now: u64) -> TaskState {
    if live.record.cancelled_at.is_some() {
        return TaskState::Cancelled;
    }
    if live.statuses.values().any(|s| *s == TaskStatus::Running) {
        return TaskState::Running;
    }
    let unreported = audience_now
        .iter()
        .any(|id| !live.statuses.contains_key(*id));
    let expired = now > live.record.not_after;
    if (unreported || live.statuses.is_empty()) && !expired {
        return TaskState::Pending;
    }
    if live.statuses.values().any(|s| *s != TaskStatus::Succeeded) {
        return TaskState::Failed;
    }
    if unreported || live.statuses.is_empty() {
        return TaskState::Expired;
    }
    TaskState::Succeeded
}

#[cfg(test)]
mod tests {
    use super::*;

    use stella_proto::dsse;

    const A: &str = "agt_aaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "agt_baaaaaaaaaaaaaaaaaaaaaaaaa";
    /// 2030-01-01T00:00:00Z.
    const NOT_AFTER: u64 = 1_893_456_000;

    fn envelope(payload: &str) -> String {
        let (key, _) = dsse::SigningKey::generate().unwrap();
        dsse::sign(&key, task::PAYLOAD_TYPE, payload.as_bytes()).to_json()
    }

    fn file_task(id: &str, audience: &str) -> String {
        format!(
            r#"{{"id":"{id}","type":"file","not_after":"2030-01-01T00:00:00Z","audience":{audience},"path":"/etc/x","content_base64":"eA==","mode":"0644"}}"#
        )
    }

    fn record(id: &str, audience: &str, created_at: u64) -> TaskRecord {
        let mut r = check_new(envelope(&file_task(id, audience)).as_bytes(), 0).unwrap();
        r.created_at = created_at;
        r
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn report(id: &str, status: TaskStatus) -> TaskResultReport {
        TaskResultReport {
            id: id.to_owned(),
            status,
            reason: None,
            exit_code: None,
            output: None,
            started: None,
            finished: None,
        }
    }

    #[test]
    fn a_new_task_is_checked_and_keeps_its_envelope() {
        let text = envelope(&file_task("t1", r#"{"selector":{"role":"web"}}"#));
        let r = check_new(text.as_bytes(), 100).unwrap();
        assert_eq!(r.envelope, text);
        assert_eq!((r.task_id.as_str(), r.task_type.as_str()), ("t1", "file"));
        assert_eq!(r.id.len(), 16);
        assert_eq!(r.not_after, NOT_AFTER);
        assert_eq!(r.selector, Some(labels(&[("role", "web")])));
        let expired = check_new(text.as_bytes(), NOT_AFTER + 1).unwrap_err();
        assert!(expired.message.contains("expired"), "{}", expired.message);
        for bad in [
            "not json".to_owned(),
            envelope(r#"{"id":"x","type":"shell"}"#),
            envelope(&file_task("t1", "{}")),
        ] {
            assert_eq!(check_new(bad.as_bytes(), 0).unwrap_err().status(), 400);
        }
    }

    #[test]
    fn tasks_reach_their_audience_until_it_reports() {
        let mut tasks = Tasks::default();
        let by_label = record("web", r#"{"selector":{"role":"web"}}"#, 20);
        let by_id = record("one", &format!(r#"{{"agents":["{A}"]}}"#), 10);
        tasks.insert(by_label.clone());
        tasks.insert(by_id.clone());
        let web = labels(&[("role", "web")]);
        let (deliver, cancel) = tasks.for_agent(A, &web, 0);
        let ids: Vec<String> = deliver.unwrap().into_iter().map(|d| d.id).collect();
        assert_eq!(ids, [by_id.id.clone(), by_label.id.clone()], "oldest first");
        assert!(cancel.is_none());
        let (deliver, _) = tasks.for_agent(B, &web, 0);
        assert_eq!(deliver.unwrap()[0].envelope, by_label.envelope);
        assert_eq!(tasks.for_agent(B, &Labels::new(), 0), (None, None));
        assert_eq!(tasks.for_agent(A, &web, NOT_AFTER + 1), (None, None));

        let running = result_record(A, report(&by_label.id, TaskStatus::Running), 5).unwrap();
        assert!(tasks.is_news(&running));
        tasks.record_results(std::slice::from_ref(&running));
        assert!(!tasks.is_news(&running));
        let (deliver, _) = tasks.for_agent(A, &web, 0);
        assert_eq!(deliver.unwrap().len(), 1);

        // Cancelled: no more deliveries, and the running agent is told.
        let mut cancelled = by_label.clone();
        cancelled.cancelled_at = Some(30);
        tasks.insert(cancelled);
        let (deliver, cancel) = tasks.for_agent(A, &web, 0);
        assert_eq!(deliver.unwrap()[0].id, by_id.id);
        assert_eq!(cancel, Some(vec![by_label.id.clone()]));
        assert_eq!(tasks.for_agent(B, &web, 0), (None, None));
        let stopped = result_record(A, report(&by_label.id, TaskStatus::Cancelled), 6).unwrap();
        tasks.record_results(&[stopped]);
        assert!(tasks.for_agent(A, &web, 0).1.is_none());
    }

    #[test]
    fn reports_are_bounded_and_unknown_ids_dropped() {
        let mut r = report("0123456789abcdef", TaskStatus::Failed);
        r.output = Some("x\n".repeat(1000));
        r.reason = Some("r".repeat(5000));
        r.started = Some("2026-11-30T04:00:00Z".into());
        r.finished = Some("yesterday".into());
        let stored = result_record(A, r, 7).unwrap();
        assert_eq!(
            stored.output.unwrap().lines().count(),
            task::MAX_OUTPUT_LINES
        );
        assert!(stored.reason.unwrap().len() <= stella_proto::text::MAX_REPORT_TEXT);
        assert_eq!(stored.started.as_deref(), Some("2026-11-30T04:00:00Z"));
        assert_eq!(stored.finished, None);
        assert!(result_record(A, report("../x", TaskStatus::Failed), 7).is_none());
        let tasks = Tasks::default();
        let orphan = result_record(A, report("0123456789abcdef", TaskStatus::Failed), 7);
        assert!(!tasks.is_news(&orphan.unwrap()));
        assert!(check_reports(&vec![report("x", TaskStatus::Running); 65]).is_err());
    }

    #[test]
    fn the_state_aggregates_the_audience() {
        let mut live = LiveTask::new(record("t", r#"{"selector":{}}"#, 0));
        let state_at = |live: &LiveTask, now| state(live, &[A, B], now);
        assert_eq!(state(&live, &[], 0), TaskState::Pending);
        assert_eq!(state(&live, &[], NOT_AFTER + 1), TaskState::Expired);
        assert_eq!(state_at(&live, 0), TaskState::Pending);
        live.statuses.insert(A.into(), TaskStatus::Running);
        assert_eq!(state_at(&live, 0), TaskState::Running);
        live.statuses.insert(A.into(), TaskStatus::Succeeded);
        assert_eq!(state_at(&live, 0), TaskState::Pending);
        assert_eq!(state_at(&live, NOT_AFTER + 1), TaskState::Expired);
        live.statuses.insert(B.into(), TaskStatus::Succeeded);
        assert_eq!(state_at(&live, 0), TaskState::Succeeded);
        live.statuses.insert(B.into(), TaskStatus::Refused);
        assert_eq!(state_at(&live, 0), TaskState::Failed);
        live.statuses
            .insert(B.into(), TaskStatus::Unknown("new".into()));
        assert_eq!(state_at(&live, 0), TaskState::Failed);
        live.record.cancelled_at = Some(1);
        assert_eq!(state_at(&live, 0), TaskState::Cancelled);
    }

    #[test]
    fn audiences_read_back_as_text() {
        assert_eq!(
            audience_text(&Audience::Agents(vec![A.into(), B.into()])),
            format!("agents:{A},{B}")
        );
        assert_eq!(
            audience_text(&Audience::Selector(labels(&[("a", "1"), ("b", "2")]))),
            "selector:a=1,b=2"
        );
    }
}
