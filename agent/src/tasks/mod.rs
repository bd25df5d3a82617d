//! Deployment tasks (docs/design.md, "Tasks"): signed work the heartbeat
//! answer delivers. Each delivery passes `intake` (signature with the
//! pinned deploy key, audience, expiry, capabilities, replays) or is
//! refused with its reason; accepted tasks run one at a time, polled from
//! the scheduler (`runner`, `file`, `container`), within their timeout, and
//! can be cancelled. Every result is sent with the following heartbeats
//! until one carrying it is acknowledged. The `journal` remembers accepted
//! tasks across restarts: one that was running when the agent stopped is
//! reported `interrupted` and never run again.

mod artifact;
mod container;
mod file;
mod intake;
mod journal;
mod runner;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Instant;

use stella_proto::api::{TaskDelivery, TaskResultReport};
use stella_proto::states::TaskStatus;
use stella_proto::task::{MAX_RESULTS_PER_HEARTBEAT, Task, TaskSpec};
use stella_proto::time::rfc3339;

use self::container::ContainerJob;
use self::intake::{Decision, Me};
use self::journal::{Entry, Journal};
use self::runner::Output;
use crate::heartbeat::wall_now;
use crate::log;
use crate::state::{STAGING_DIR, StateDir};
use crate::transport::Client;

pub(crate) use self::intake::deploy_key;

/// How an executor ended.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) status: TaskStatus,
    pub(crate) reason: Option<String>,
    pub(crate) exit_code: Option<i32>,
}

/// What an executor may use during a scheduler turn.
pub(crate) struct Ctx<'a> {
    pub(crate) state: &'a StateDir,
    pub(crate) client: &'a mut Client,
    pub(crate) server: &'a str,
}

/// The task that runs.
struct Current {
    entry: Entry,
    deadline: Instant,
    output: Output,
    job: ContainerJob,
}

/// The agent's tasks: the journal, the queue, the running one and the
/// results still to send.
pub(crate) struct Tasks {
    /// `Err`: `tasks.json` is unreadable; every task is refused (running one
    /// could be a replay) until it is fixed.
    journal: Result<Journal, String>,
    me: Me,
    /// The state dir and this binary: no file task may write there.
    state_root: PathBuf,
    binary: Option<PathBuf>,
    queue: VecDeque<(String, Task)>,
    current: Option<Current>,
    /// Results not yet acknowledged, oldest first.
    results: Vec<Entry>,
    /// How many of `results` the heartbeat in flight carries.
    sent: usize,
    /// A result was added: heartbeat now.
    report_now: bool,
}

impl Tasks {
    /// Loads the journal and turns every task it shows running (the agent
    /// stopped under it) into an `interrupted` result.
    pub(crate) fn start(
        state: &StateDir,
        agent_id: &str,
        labels: Option<stella_proto::api::Labels>,
    ) -> Self {
        let mut tasks = Tasks {
            journal: Journal::load(state).map_err(|e| e.to_string()),
            me: Me {
                id: agent_id.to_owned(),
                labels,
                capabilities: crate::host::capabilities(),
            },
            state_root: std::path::absolute(state.root())
                .unwrap_or_else(|_| state.root().to_owned()),
            binary: std::env::current_exe().ok(),
            queue: VecDeque::new(),
            current: None,
            results: Vec::new(),
            sent: 0,
            report_now: false,
        };
        let _ = std::fs::remove_file(state.path(STAGING_DIR).join("task.out"));
        match &mut tasks.journal {
            Err(e) => log::error(
                "tasks are refused until the journal is fixed",
                &[("error", e)],
            ),
            Ok(journal) => {
                let stopped: Vec<Entry> = journal.with_status("running").cloned().collect();
                for mut entry in stopped {
                    entry.status = TaskStatus::Interrupted.as_str().to_owned();
                    entry.reason =
                        Some("the agent stopped while the task ran; it is not run again".into());
                    entry.finished = Some(rfc3339(wall_now()));
                    log::warn(
                        "task interrupted by an agent restart",
                        &[("task", &entry.server_id), ("id", &entry.id)],
                    );
                    if let Err(e) = journal.record(state, entry.clone(), wall_now()) {
                        log::error("cannot write the task journal", &[("error", &e)]);
                    }
                    tasks.results.push(entry);
                }
            }
        }
        tasks
    }

    /// The capabilities the heartbeat reports (kept for the type check).
    pub(crate) fn set_capabilities(&mut self, capabilities: &[String]) {
        if self.me.capabilities != capabilities {
            self.me.capabilities = capabilities.to_vec();
        }
    }

    /// Puts the results to send into `out` (up to the per-heartbeat cap);
    /// without results it is `None`, and nothing is allocated.
    pub(crate) fn fill(&mut self, out: &mut Option<Vec<TaskResultReport>>) {
        self.sent = self.results.len().min(MAX_RESULTS_PER_HEARTBEAT);
        if self.sent == 0 {
            *out = None;
            return;
        }
        let out = out.get_or_insert_default();
        out.clear();
        out.extend(self.results[..self.sent].iter().map(to_wire));
    }

    /// The heartbeat carrying the results was acknowledged: they are dropped.
    pub(crate) fn acknowledged(&mut self) {
        self.results.drain(..self.sent.min(self.results.len()));
        self.sent = 0;
    }

    /// Whether a result was added since the last call.
    pub(crate) fn take_report_now(&mut self) -> bool {
        std::mem::take(&mut self.report_now)
    }

    fn is_known(&self, server_id: &str) -> bool {
        self.current
            .as_ref()
            .is_some_and(|c| c.entry.server_id == server_id)
            || self.queue.iter().any(|(id, _)| id == server_id)
            || self.results.iter().any(|r| r.server_id == server_id)
    }

    /// The server id under which a signed id is queued or running.
    fn signed_id_taken(&self, signed_id: &str) -> Option<String> {
        self.current
            .iter()
            .map(|c| (&c.entry.server_id, &c.entry.id))
            .chain(self.queue.iter().map(|(s, t)| (s, &t.id)))
            .find(|(_, id)| *id == signed_id)
            .map(|(s, _)| s.clone())
    }

    /// Takes the deliveries and cancellations of a heartbeat answer.
    pub(crate) fn receive(
        &mut self,
        state: &StateDir,
        deliveries: &[TaskDelivery],
        cancels: &[String],
    ) {
        for cancel in cancels {
            self.cancel(state, cancel);
        }
        if deliveries.is_empty() {
            return;
        }
        let key = deploy_key(state);
        for delivery in deliveries {
            if self.is_known(&delivery.id) {
                continue;
            }
            let now = wall_now();
            let decision = match &self.journal {
                Err(e) => Decision::Refuse(format!("the task journal is unreadable: {e}")),
                Ok(journal) => {
                    let mut decision = intake::check(
                        &delivery.id,
                        &delivery.envelope,
                        key.as_ref().map_err(String::as_str),
                        &self.me,
                        journal,
                        now,
                    );
                    if let Decision::Run(task) = &decision
                        && let Some(other) = self.signed_id_taken(&task.id)
                    {
                        decision = Decision::Refuse(format!(
                            "replayed task id {:?}: this agent already has it as task {other}",
                            task.id
                        ));
                    }
                    if let Decision::Run(task) = &decision
                        && let TaskSpec::File(f) = &task.spec
                        && let Some(why) =
                            file::refuse_path(&f.path, &self.state_root, self.binary.as_deref())
                    {
                        decision = Decision::Refuse(why);
                    }
                    decision
                }
            };
            match decision {
                Decision::Refuse(reason) => {
                    log::warn(
                        "task refused",
                        &[("task", &delivery.id), ("reason", &reason)],
                    );
                    self.report_now = true;
                    self.results.push(Entry {
                        id: String::new(),
                        server_id: delivery.id.clone(),
                        not_after: 0,
                        status: TaskStatus::Refused.as_str().to_owned(),
                        reason: Some(reason),
                        exit_code: None,
                        output: None,
                        started: None,
                        finished: Some(rfc3339(now)),
                    });
                }
                Decision::Duplicate => {
                    // The answer to our result was lost: send it again.
                    if let Ok(journal) = &self.journal
                        && let Some(entry) = journal.by_server_id(&delivery.id)
                    {
                        self.results.push(entry.clone());
                        self.report_now = true;
                    }
                }
                Decision::Run(task) => {
                    log::info(
                        "task accepted",
                        &[
                            ("task", &delivery.id),
                            ("id", &task.id),
                            ("type", &task.spec.type_name()),
                        ],
                    );
                    self.queue.push_back((delivery.id.clone(), *task));
                }
            }
        }
    }

    fn cancel(&mut self, state: &StateDir, server_id: &str) {
        if let Some(current) = &mut self.current
            && current.entry.server_id == server_id
        {
            current.job.abort(
                TaskStatus::Cancelled,
                "cancelled by the server".into(),
                &mut current.output,
            );
            return;
        }
        if let Some(at) = self.queue.iter().position(|(id, _)| id == server_id)
            && let Some((server_id, task)) = self.queue.remove(at)
        {
            let mut entry = new_entry(
                &server_id,
                &task,
                TaskStatus::Cancelled,
                Some("cancelled before it started".into()),
            );
            entry.finished = Some(rfc3339(wall_now()));
            self.finish(state, entry);
        }
    }

    fn record(&mut self, state: &StateDir, entry: &Entry) {
        if let Ok(journal) = &mut self.journal
            && let Err(e) = journal.record(state, entry.clone(), wall_now())
        {
            log::error("cannot write the task journal", &[("error", &e)]);
        }
    }

    fn finish(&mut self, state: &StateDir, entry: Entry) {
        log::info(
            "task finished",
            &[
                ("task", &entry.server_id),
                ("status", &entry.status),
                ("reason", &entry.reason.as_deref().unwrap_or("")),
            ],
        );
        self.record(state, &entry);
        // A `running` not sent yet says nothing the final result does not.
        self.results
            .retain(|r| !(r.server_id == entry.server_id && r.status == "running"));
        self.results.push(entry);
        self.report_now = true;
    }

    /// One scheduler turn: starts the next task, polls the running one,
    /// enforces its timeout. Returns true while a task runs (the scheduler
    /// polls again soon).
    pub(crate) fn step(&mut self, state: &StateDir, client: &mut Client, server: &str) -> bool {
        if self.current.is_none()
            && let Some((server_id, task)) = self.queue.pop_front()
        {
            self.begin(state, server_id, task);
        }
        let Some(current) = &mut self.current else {
            return false;
        };
        if Instant::now() >= current.deadline {
            current.job.abort(
                TaskStatus::TimedOut,
                "the task's timeout passed".into(),
                &mut current.output,
            );
        }
        let mut ctx = Ctx {
            state,
            client,
            server,
        };
        let Some(outcome) = current.job.poll(&mut ctx, &mut current.output) else {
            return true;
        };
        let Some(current) = self.current.take() else {
            return false;
        };
        let mut entry = current.entry;
        entry.status = outcome.status.as_str().to_owned();
        entry.reason = outcome.reason;
        entry.exit_code = outcome.exit_code;
        entry.output = Some(stella_proto::task::output_tail(&current.output.tail()));
        entry.finished = Some(rfc3339(wall_now()));
        current.output.remove();
        self.finish(state, entry);
        !self.queue.is_empty()
    }

    fn begin(&mut self, state: &StateDir, server_id: String, task: Task) {
        // Journaled as running before anything runs: a restart now reports
        // it interrupted instead of running it twice.
        let mut entry = new_entry(&server_id, &task, TaskStatus::Running, None);
        entry.started = Some(rfc3339(wall_now()));
        self.record(state, &entry);
        self.results.push(entry.clone());
        self.report_now = true;
        match task.spec {
            TaskSpec::File(f) => {
                let (status, reason, output): (TaskStatus, Option<String>, String) =
                    match file::write(&f.path, &f.content, f.mode) {
                        Ok(file::Wrote::Unchanged) => (
                            TaskStatus::Succeeded,
                            Some("unchanged".to_owned()),
                            format!("{} is unchanged", f.path),
                        ),
                        Ok(file::Wrote::Written) => (
                            TaskStatus::Succeeded,
                            None,
                            format!(
                                "wrote {} ({} bytes, mode {:04o})",
                                f.path,
                                f.content.len(),
                                f.mode
                            ),
                        ),
                        Err(e) => (
                            TaskStatus::Failed,
                            Some(format!("cannot write {}: {e}", f.path)),
                            String::new(),
                        ),
                    };
                entry.status = status.as_str().to_owned();
                entry.reason = reason;
                entry.output = (!output.is_empty()).then_some(output);
                entry.finished = Some(rfc3339(wall_now()));
                self.finish(state, entry);
            }
            TaskSpec::Container(c) => {
                let cli = if self.me.capabilities.iter().any(|c| c == "podman") {
                    "podman"
                } else {
                    "docker"
                };
                let _ = state.create_staging();
                let output = match Output::create(&state.path(STAGING_DIR).join("task.out")) {
                    Ok(output) => output,
                    Err(e) => {
                        entry.status = TaskStatus::Failed.as_str().to_owned();
                        entry.reason = Some(format!("cannot create the task's output file: {e}"));
                        entry.finished = Some(rfc3339(wall_now()));
                        self.finish(state, entry);
                        return;
                    }
                };
                self.current = Some(Current {
                    deadline: Instant::now() + task.timeout,
                    job: ContainerJob::new(c, cli, &server_id),
                    output,
                    entry,
                });
            }
        }
    }
}

fn new_entry(server_id: &str, task: &Task, status: TaskStatus, reason: Option<String>) -> Entry {
    Entry {
        id: task.id.clone(),
        server_id: server_id.to_owned(),
        not_after: task.not_after_unix,
        status: status.as_str().to_owned(),
        reason,
        exit_code: None,
        output: None,
        started: None,
        finished: None,
    }
}

fn to_wire(entry: &Entry) -> TaskResultReport {
    TaskResultReport {
        id: entry.server_id.clone(),
        status: TaskStatus::parse(&entry.status),
        reason: entry.reason.clone(),
        exit_code: entry.exit_code,
        output: entry.output.clone(),
        started: entry.started.clone(),
        finished: entry.finished.clone(),
    }
}

#[cfg(test)]
mod tests {
    use stella_proto::api::Labels;
    use stella_proto::dsse::{self, SigningKey};
    use stella_proto::task::{self, PAYLOAD_TYPE};

    use super::*;

    const AGENT: &str = "agt_aaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn delivery(key: &SigningKey, id: &str, content: &str) -> TaskDelivery {
        let json = format!(
            r#"{{"id":"{id}","type":"file","not_after":"2100-01-01T00:00:00Z","audience":{{"agents":["{AGENT}"]}},"path":"/nonexistent-dir/x","content_base64":"{content}","mode":"0644"}}"#
        );
        TaskDelivery {
            id: task::server_task_id(json.as_bytes()),
            envelope: dsse::sign(key, PAYLOAD_TYPE, json.as_bytes()).to_json(),
        }
    }

    fn statuses(tasks: &mut Tasks) -> Vec<(String, String)> {
        let mut out = None;
        tasks.fill(&mut out);
        out.unwrap_or_default()
            .into_iter()
            .map(|r| (r.id, r.status.as_str().to_owned()))
            .collect()
    }

    #[test]
    fn deliveries_are_queued_refused_cancelled_and_reported_until_acknowledged() {
        let dir = std::env::temp_dir().join(format!("stella-tasks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = StateDir::new(dir.clone());
        state.create().unwrap();
        let (key, _) = SigningKey::generate().unwrap();
        state
            .write_atomic(
                crate::state::DEPLOY_KEY,
                key.public_key().to_pem().as_bytes(),
                0o644,
            )
            .unwrap();
        let mut tasks = Tasks::start(&state, AGENT, Some(Labels::new()));
        let mut out = None;
        tasks.fill(&mut out);
        assert!(out.is_none(), "no results, no allocation");

        let a = delivery(&key, "a", "aGkK");
        let replay = delivery(&key, "a", "aGkhCg==");
        tasks.receive(&state, &[a.clone(), replay.clone(), a.clone()], &[]);
        assert_eq!(tasks.queue.len(), 1);
        assert!(tasks.take_report_now());
        assert_eq!(statuses(&mut tasks), [(replay.id, "refused".into())]);
        tasks.acknowledged();
        assert!(statuses(&mut tasks).is_empty());

        // Cancelled before it ran: journaled, reported.
        tasks.receive(&state, &[], std::slice::from_ref(&a.id));
        assert!(tasks.queue.is_empty());
        assert_eq!(statuses(&mut tasks), [(a.id.clone(), "cancelled".into())]);
        // A heartbeat that failed keeps the result; an acknowledged one drops it.
        assert_eq!(statuses(&mut tasks).len(), 1);
        tasks.acknowledged();
        // Delivered again (the answer to the report was lost): the same
        // result again, nothing run.
        tasks.receive(&state, std::slice::from_ref(&a), &[]);
        assert!(tasks.queue.is_empty());
        assert_eq!(statuses(&mut tasks), [(a.id.clone(), "cancelled".into())]);
        tasks.acknowledged();

        // A task the journal shows running when the agent starts.
        let b = delivery(&key, "b", "aGkK");
        let mut journal = Journal::load(&state).unwrap();
        let entry = Entry {
            id: "b".into(),
            server_id: b.id.clone(),
            not_after: 4_102_444_800,
            status: "running".into(),
            reason: None,
            exit_code: None,
            output: None,
            started: None,
            finished: None,
        };
        journal.record(&state, entry, 0).unwrap();
        let mut restarted = Tasks::start(&state, AGENT, Some(Labels::new()));
        assert_eq!(
            statuses(&mut restarted),
            [(b.id.clone(), "interrupted".into())]
        );
        restarted.acknowledged();
        restarted.receive(&state, std::slice::from_ref(&b), &[]);
        assert!(restarted.queue.is_empty(), "never run again");
        assert_eq!(statuses(&mut restarted), [(b.id, "interrupted".into())]);

        // An unreadable journal refuses everything.
        std::fs::write(state.path(crate::state::TASKS_JSON), "{").unwrap();
        let mut broken = Tasks::start(&state, AGENT, Some(Labels::new()));
        let c = delivery(&key, "c", "aGkK");
        broken.receive(&state, std::slice::from_ref(&c), &[]);
        assert!(broken.queue.is_empty());
        assert_eq!(statuses(&mut broken), [(c.id, "refused".into())]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
