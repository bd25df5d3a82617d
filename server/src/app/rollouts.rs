//! Rollouts at run time: the controller that evaluates every live rollout
//! each second against the fleet (records its transitions durably, refreshes
//! who is offered what), and the admin's start, pause, resume, abort and
//! views.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use stella_proto::api::RolloutView;

use super::{App, lock, now_ms, now_secs};
use crate::error::Error;
use crate::log;
use crate::records::RolloutRecord;
use crate::refusal::{Refusal, Why};
use crate::rollout::{self, AgentFacts, StartRequest};
use crate::store::StoreError;

impl App {
    fn facts(&self) -> Vec<AgentFacts> {
        rollout::facts(&lock(&self.fleet))
    }

    fn release_targets(&self, version: &str) -> HashSet<String> {
        lock(&self.releases).targets(version)
    }

    /// One pass of the controller. Blocking.
    pub(crate) fn rollout_tick(&self) -> Result<(), Error> {
        let agents = self.facts();
        let live: Vec<RolloutRecord> = lock(&self.rollouts)
            .records
            .values()
            .filter(|r| r.is_live())
            .cloned()
            .collect();
        let mut offered = HashMap::new();
        let mut stats = HashMap::new();
        for mut rec in live {
            let targets = self.release_targets(&rec.release);
            let eval = rollout::evaluate(&rec, &agents, &targets, now_ms());
            // Every server offers what the rollout's state says; only the
            // leader moves that state on (fenced: a deposed leader's write
            // is refused).
            let leader = self.leads();
            if let (Some(change), Some(fence)) = (eval.change.clone(), leader) {
                let before = rec.clone();
                let written = {
                    let _serial = lock(&self.lifecycle_lock);
                    let action = rollout::apply(&mut rec, &change);
                    self.as_leader(fence, || {
                        self.store.put_rollout(
                            &rec,
                            Some(&before),
                            now_secs(),
                            action,
                            &format!("{change:?}"),
                        )
                    })
                    .map(|()| action)
                };
                match written {
                    Ok(action) => {
                        log::info(
                            "rollout changed",
                            &[
                                ("rollout", &rec.id),
                                ("action", &action),
                                ("stage", &(rec.open_stage + 1)),
                            ],
                        );
                        lock(&self.rollouts)
                            .records
                            .insert(rec.id.clone(), rec.clone());
                    }
                    // An admin acted on it through another server a moment
                    // ago: read it again and judge next time.
                    Err(StoreError::Aborted(r)) if r.why == Why::Conflict => {
                        log::info(
                            "rollout changed elsewhere; reloading",
                            &[("rollout", &rec.id)],
                        );
                        self.reload_rollouts()?;
                        rec = before;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            // Offers follow the state as it is now (a pause stops them at once).
            let eval = if eval.change.is_some() {
                rollout::evaluate(&rec, &agents, &targets, now_ms())
            } else {
                eval
            };
            for id in eval.offered {
                offered.insert(id, rec.release.clone());
            }
            stats.insert(rec.id.clone(), eval.stages);
        }
        let mut rollouts = lock(&self.rollouts);
        rollouts.offered = offered;
        for (id, s) in stats {
            rollouts.stats.insert(id, s);
        }
        Ok(())
    }

    /// `rollout start`. Blocking.
    pub(crate) fn start_rollout(&self, req: StartRequest<'_>) -> Result<RolloutView, Error> {
        let targets = self.release_targets(req.release);
        let mut random = [0u8; 16];
        crate::fsutil::random_bytes(&mut random)?;
        let id = format!(
            "rol_{}",
            &stella_proto::id::agent_id_from_bytes(random)[4..16]
        );
        let rec = rollout::check_start(req, &targets, id, now_secs())?;
        let agents = self.facts();
        let _serial = lock(&self.lifecycle_lock);
        {
            let live: Vec<RolloutRecord> = lock(&self.rollouts)
                .records
                .values()
                .filter(|r| r.is_live())
                .cloned()
                .collect();
            let with_targets = live.iter().map(|r| (r, self.release_targets(&r.release)));
            rollout::check_no_clash(&rec, &targets, with_targets, &agents)?;
        }
        self.store.put_rollout(
            &rec,
            None,
            now_secs(),
            "rollout.start",
            &format!(
                "release={} stages={} selector={:?}",
                rec.release,
                rec.stages.join(","),
                rec.selector
            ),
        )?;
        lock(&self.rollouts)
            .records
            .insert(rec.id.clone(), rec.clone());
        log::info(
            "rollout started",
            &[("rollout", &rec.id), ("release", &rec.release)],
        );
        Ok(self.rollout_view_of(&rec, false))
    }

    /// `rollout pause|resume|abort`: acts at once (durable, then offers stop
    /// or resume). Blocking.
    pub(crate) fn act_on_rollout(&self, id: &str, action: &str) -> Result<RolloutView, Error> {
        let _serial = lock(&self.lifecycle_lock);
        let rec = lock(&self.rollouts)
            .records
            .get(id)
            .cloned()
            .ok_or_else(|| Refusal::not_found(format!("no rollout with id {id}")))?;
        let Some(acted) = rollout::act(&rec, action, &self.facts(), now_ms())? else {
            return Ok(self.rollout_view_of(&rec, false));
        };
        let (before, rec) = (rec, acted);
        self.store.put_rollout(
            &rec,
            Some(&before),
            now_secs(),
            &format!("rollout.{action}"),
            rec.reason.as_deref().unwrap_or(""),
        )?;
        {
            let mut rollouts = lock(&self.rollouts);
            if !rec.is_live() || rec.status == rollout::PAUSED {
                rollouts.offered.retain(|_, v| *v != rec.release);
            }
            rollouts.records.insert(id.to_owned(), rec.clone());
        }
        log::info("rollout changed", &[("rollout", &id), ("action", &action)]);
        Ok(self.rollout_view_of(&rec, false))
    }

    fn rollout_view_of(&self, rec: &RolloutRecord, with_members: bool) -> RolloutView {
        let agents = self.facts();
        let targets = self.release_targets(&rec.release);
        let eval = rollout::evaluate(rec, &agents, &targets, now_ms());
        rollout::view(rec, eval, with_members)
    }

    /// One rollout, evaluated now.
    pub(crate) fn rollout_view(
        &self,
        id: &str,
        with_members: bool,
    ) -> Result<RolloutView, Refusal> {
        let rec = lock(&self.rollouts).records.get(id).cloned();
        match rec {
            Some(rec) => Ok(self.rollout_view_of(&rec, with_members)),
            None => Err(Refusal::not_found(format!("no rollout with id {id}"))),
        }
    }

    /// Every rollout, evaluated now.
    pub(crate) fn rollout_views(&self) -> Vec<RolloutView> {
        let records: Vec<RolloutRecord> = lock(&self.rollouts).records.values().cloned().collect();
        records
            .iter()
            .map(|r| self.rollout_view_of(r, false))
            .collect()
    }
}

/// Runs the controller every second for the life of the server.
pub(crate) async fn controller(app: Arc<App>) {
    loop {
        smol::Timer::after(Duration::from_secs(1)).await;
        let app2 = app.clone();
        if let Err(e) = smol::unblock(move || app2.rollout_tick()).await {
            log::warn("rollout controller failed", &[("error", &e)]);
        }
    }
}
