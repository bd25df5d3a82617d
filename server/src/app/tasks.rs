//! Tasks at run time: creating one (checked, durable, then in memory),
//! cancelling it, storing agents' results from heartbeats (durable before
//! the answer), what a heartbeat answer carries, and the admin's task views.
//! Image archives (artifacts) are blobs (`app::blobs`). The rules are in
//! `tasks`.

use std::collections::BTreeMap;

use stella_proto::api::{
    Labels, TaskCreated, TaskDelivery, TaskResultReport, TaskResultView, TaskView,
};
use stella_proto::time::rfc3339;

use super::{App, lock, now_secs};
use crate::error::Error;
use crate::records::{AgentStatus, TaskResultRecord};
use crate::refusal::Refusal;
use crate::store::StoreError;
use crate::tasks::{self, LiveTask};

impl App {
    /// `task create`: checks the envelope, stores it, and queues it for its
    /// audience. The same envelope twice is a 409. Blocking.
    pub(crate) fn create_task(&self, envelope: &[u8]) -> Result<TaskCreated, Error> {
        let record = tasks::check_new(envelope, now_secs())?;
        let conflict = || {
            Refusal::conflict(format!(
                "task {} (signed id {}) exists already",
                record.id, record.task_id
            ))
        };
        if lock(&self.tasks).by_id.contains_key(&record.id) {
            return Err(conflict().into());
        }
        match self.store.insert_task(&record) {
            Err(StoreError::Exists { .. }) => return Err(conflict().into()),
            other => other?,
        }
        crate::log::info(
            "task created",
            &[
                ("task", &record.id),
                ("task_id", &record.task_id),
                ("type", &record.task_type),
            ],
        );
        let created = TaskCreated {
            id: record.id.clone(),
            task_id: record.task_id.clone(),
        };
        lock(&self.tasks).insert(record);
        Ok(created)
    }

    /// `task cancel ID`: no more deliveries; agents running it are told to
    /// stop. Cancelling twice changes nothing. Blocking.
    pub(crate) fn cancel_task(&self, id: &str) -> Result<TaskView, Error> {
        let record = {
            let tasks = lock(&self.tasks);
            let Some(live) = tasks.by_id.get(id) else {
                return Err(Refusal::not_found(format!("no task with id {id}")).into());
            };
            live.record.clone()
        };
        if record.cancelled_at.is_none() {
            let now = now_secs();
            let mut cancelled = record;
            cancelled.cancelled_at = Some(now);
            self.store.put_task(&cancelled, now, "task.cancel")?;
            crate::log::info("task cancelled", &[("task", &id)]);
            lock(&self.tasks).insert(cancelled);
        }
        self.task_view(id)
    }

    /// Stores the results a heartbeat of `agent_id` carries, durably, before
    /// it is answered. Results for unknown tasks, and repeats of a known
    /// status, are not written. Blocking.
    pub(crate) fn store_task_results(
        &self,
        agent_id: &str,
        reports: Vec<TaskResultReport>,
    ) -> Result<(), Error> {
        let now = now_secs();
        let news: Vec<TaskResultRecord> = {
            let tasks = lock(&self.tasks);
            reports
                .into_iter()
                .filter_map(|r| tasks::result_record(agent_id, r, now))
                .filter(|r| tasks.is_news(r))
                .collect()
        };
        if news.is_empty() {
            return Ok(());
        }
        self.store.put_task_results(&news)?;
        for r in &news {
            crate::log::info(
                "task result",
                &[
                    ("task", &r.task),
                    ("agent", &agent_id),
                    ("status", &r.status),
                ],
            );
        }
        lock(&self.tasks).record_results(&news);
        Ok(())
    }

    /// The tasks and cancels for a heartbeat answer to `agent_id`.
    pub(crate) fn tasks_for(
        &self,
        agent_id: &str,
        labels: &Labels,
    ) -> (Option<Vec<TaskDelivery>>, Option<Vec<String>>) {
        let tasks = lock(&self.tasks);
        if tasks.by_id.is_empty() {
            return (None, None);
        }
        tasks.for_agent(agent_id, labels, now_secs())
    }

    /// The non-revoked agents known now that are in each task's audience.
    fn audiences(&self, live: &[LiveTask]) -> Vec<Vec<String>> {
        let fleet = lock(&self.fleet);
        live.iter()
            .map(|t| {
                let mut ids: Vec<String> = fleet
                    .agents
                    .values()
                    .filter(|a| a.record.status != AgentStatus::Revoked)
                    .filter(|a| t.audience.includes(&a.record.id, &a.record.labels))
                    .map(|a| a.record.id.clone())
                    .collect();
                ids.sort_unstable();
                ids
            })
            .collect()
    }

    fn view(
        live: &LiveTask,
        audience: &[String],
        results: Vec<TaskResultRecord>,
        now: u64,
        with_output: bool,
    ) -> TaskView {
        let refs: Vec<&str> = audience.iter().map(String::as_str).collect();
        TaskView {
            id: live.record.id.clone(),
            task_id: live.record.task_id.clone(),
            task_type: live.record.task_type.clone(),
            status: tasks::state(live, &refs, now),
            not_after: rfc3339(live.record.not_after),
            created_at: rfc3339(live.record.created_at),
            cancelled_at: live.record.cancelled_at.map(rfc3339),
            audience: tasks::audience_text(&live.audience),
            results: results
                .into_iter()
                .map(|r| TaskResultView {
                    agent: r.agent,
                    status: r.status,
                    exit_code: r.exit_code,
                    output: if with_output { r.output } else { None },
                    started: r.started,
                    finished: r.finished,
                    reason: r.reason,
                    reported_at: rfc3339(r.reported_at),
                })
                .collect(),
        }
    }

    /// `task show ID`. Blocking.
    pub(crate) fn task_view(&self, id: &str) -> Result<TaskView, Error> {
        let live = {
            let tasks = lock(&self.tasks);
            let Some(live) = tasks.by_id.get(id) else {
                return Err(Refusal::not_found(format!("no task with id {id}")).into());
            };
            live.clone()
        };
        let audience = self.audiences(std::slice::from_ref(&live)).remove(0);
        let results = self.store.task_results(Some(id))?;
        Ok(Self::view(&live, &audience, results, now_secs(), true))
    }

    /// `task list [--agent ID]`: every task (oldest first), or those for
    /// which agent `agent` is in the audience or has reported; results
    /// without their output. Blocking.
    pub(crate) fn task_views(&self, agent: Option<&str>) -> Result<Vec<TaskView>, Error> {
        let mut live: Vec<LiveTask> = lock(&self.tasks).by_id.values().cloned().collect();
        live.sort_by(|a, b| {
            (a.record.created_at, &a.record.id).cmp(&(b.record.created_at, &b.record.id))
        });
        let audiences = self.audiences(&live);
        let mut results: BTreeMap<String, Vec<TaskResultRecord>> = BTreeMap::new();
        for r in self.store.task_results(None)? {
            results.entry(r.task.clone()).or_default().push(r);
        }
        let now = now_secs();
        let mut views = Vec::new();
        for (live, audience) in live.iter().zip(&audiences) {
            if let Some(agent) = agent
                && !audience.iter().any(|a| a == agent)
                && !live.statuses.contains_key(agent)
            {
                continue;
            }
            let mine = results.remove(&live.record.id).unwrap_or_default();
            views.push(Self::view(live, audience, mine, now, false));
        }
        Ok(views)
    }
}
