//! Staged rollouts (docs/design.md section 6): a release, ordered stages (percent
//! of the eligible fleet, or `count:N` for a canary), a label/target
//! selector, a soak time and a failure threshold. Membership is deterministic
//! and cumulative: eligible agents are ordered by a hash of (rollout id,
//! agent id) and stage k takes the first ⌈share × eligible⌉ of them, so the
//! same agents are the canaries however often the server restarts. A stage
//! is done when its active members run the new version and stayed healthy
//! (active, doctor not failing) for the soak time; failures above the
//! threshold pause the rollout. No stage waits forever: a member offered the
//! release that has not committed within `--agent-timeout` is `timed_out`
//! (counted like a failure), and a member silent for the whole deadline is
//! `skipped` (offline). Offers are made only inside the rollout's UTC
//! maintenance window (`--window`, `--days`). The engine here is pure;
//! `app` drives it against the live fleet and the store.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use stella_proto::api::Labels;
use stella_proto::states::UpdatePhase;

use crate::lifecycle::Fleet;
use crate::records::{AgentStatus, RolloutRecord};
use crate::refusal::Refusal;

pub(crate) const RUNNING: &str = "running";
pub(crate) const PAUSED: &str = "paused";
pub(crate) const COMPLETED: &str = "completed";
pub(crate) const ABORTED: &str = "aborted";

/// One stage's size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Share {
    /// Percent of the eligible fleet (0 < p ≤ 100).
    Percent(f64),
    /// A fixed number of agents (a canary).
    Count(u64),
}

/// The longest soak a rollout may ask for: longer is a typo (or `u64::MAX`)
/// that would hold a stage open for ever.
pub(crate) const MAX_SOAK: Duration = Duration::from_secs(30 * 86_400);

/// How long a member has to commit once offered, unless `--agent-timeout`
/// says otherwise.
pub(crate) const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(3600);
/// The longest `--agent-timeout`: as for the soak, longer is a typo.
pub(crate) const MAX_AGENT_TIMEOUT: Duration = MAX_SOAK;

/// Days of the week, Monday first, as `--days` spells them.
const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// A UTC maintenance window: minutes of the day `[start, end)`, wrapping
/// midnight when `end <= start`, on the days in `days` (bit 0 = Monday). A
/// window that wraps belongs to the day it starts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    start: u16,
    end: u16,
    days: u8,
}

const EVERY_DAY: u8 = 0x7f;

/// Minutes of the day of `HH:MM` (`24:00` only where `end_of_day`).
fn minutes(text: &str, end_of_day: bool) -> Option<u16> {
    let (h, m) = text.split_once(':')?;
    if h.len() != 2 || m.len() != 2 || !(h.bytes().chain(m.bytes())).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    match (h, m) {
        (24, 0) if end_of_day => Some(24 * 60),
        (0..=23, 0..=59) => Some(h * 60 + m),
        _ => None,
    }
}

/// Parses `--window HH:MM-HH:MM` into (start, end) minutes of the day.
pub(crate) fn parse_window(text: &str) -> Result<(u16, u16), String> {
    let bad = || {
        format!(
            "--window {text:?} must be HH:MM-HH:MM in UTC, like 22:00-04:00 (it may wrap midnight)"
        )
    };
    let (a, b) = text.split_once('-').ok_or_else(bad)?;
    let start = minutes(a, false).ok_or_else(bad)?;
    let end = minutes(b, true).ok_or_else(bad)?;
    if start == end % (24 * 60) {
        return Err(format!(
            "--window {text:?} is empty or the whole day: leave --window out to allow any time"
        ));
    }
    Ok((start, end))
}

/// Parses `--days`: days and ranges, comma-separated (`mon-fri`,
/// `sat,sun`, `fri-mon`); returns a bit set, bit 0 = Monday.
pub(crate) fn parse_days(text: &str) -> Result<u8, String> {
    let bad = |what: &str| {
        format!(
            "--days {text:?}: {what}; use day names {} and ranges, like mon-fri or sat,sun",
            DAY_NAMES.join(",")
        )
    };
    let day = |name: &str| {
        DAY_NAMES
            .iter()
            .position(|d| d.eq_ignore_ascii_case(name))
            .ok_or_else(|| bad(&format!("{name:?} is not a day")))
    };
    let mut set = 0u8;
    for item in text.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(bad("an empty item"));
        }
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut d = a;
                loop {
                    set |= 1 << d;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => set |= 1 << day(item)?,
        }
    }
    Ok(set)
}

impl Window {
    /// The window of a rollout: `None` when neither a window nor days are set.
    pub(crate) fn parse(window: Option<&str>, days: Option<&str>) -> Result<Option<Self>, String> {
        let (start, end) = match window {
            Some(w) => parse_window(w)?,
            None if days.is_some() => (0, 24 * 60),
            None => return Ok(None),
        };
        let days = days.map_or(Ok(EVERY_DAY), parse_days)?;
        Ok(Some(Window { start, end, days }))
    }

    /// Whether offers may be made at `unix_ms`.
    pub(crate) fn is_open(&self, unix_ms: u64) -> bool {
        let secs = unix_ms / 1000;
        let minute = ((secs % 86_400) / 60) as u16;
        // 1970-01-01 was a Thursday (Monday = 0).
        let weekday = ((secs / 86_400 + 3) % 7) as u8;
        let on = |day: u8| self.days & (1 << day) != 0;
        if self.start < self.end {
            (self.start..self.end).contains(&minute) && on(weekday)
        } else if minute >= self.start {
            on(weekday)
        } else {
            minute < self.end && on((weekday + 6) % 7)
        }
    }
}

/// Checks a rollout's deadline and window (`--agent-timeout`, `--window`,
/// `--days`), for the API and the CLI alike.
pub(crate) fn check_schedule(
    agent_timeout: Option<Duration>,
    window: Option<&str>,
    days: Option<&str>,
) -> Result<(), String> {
    if let Some(t) = agent_timeout
        && (t.is_zero() || t > MAX_AGENT_TIMEOUT)
    {
        return Err(format!(
            "--agent-timeout {} must be more than 0 and at most {}",
            stella_proto::format_duration(t),
            stella_proto::format_duration(MAX_AGENT_TIMEOUT)
        ));
    }
    Window::parse(window, days).map(drop)
}

/// Checks the plan of a new rollout, for the API and the CLI alike: each
/// stage a whole percent 1-100 (`10`, `10%`) or `count:N`, canaries first,
/// each kind strictly increasing, the last 100, and a soak of at most
/// [`MAX_SOAK`].
pub(crate) fn check_plan(stages: &[String], soak: Duration) -> Result<Vec<Share>, String> {
    if stages.is_empty() {
        return Err("a rollout needs at least one stage".to_owned());
    }
    let mut shares = Vec::with_capacity(stages.len());
    for s in stages {
        let share = if s.starts_with("count:") {
            Share::parse(s)?
        } else {
            let digits = s.strip_suffix('%').unwrap_or(s);
            match digits.parse::<u8>() {
                Ok(p) if (1..=100).contains(&p) && digits.bytes().all(|b| b.is_ascii_digit()) => {
                    Share::Percent(f64::from(p))
                }
                _ => {
                    return Err(format!(
                        "stage {s:?} must be a whole percent from 1 to 100, or count:N"
                    ));
                }
            }
        };
        let increasing = match (shares.last(), share) {
            (None, _) => true,
            (Some(Share::Count(a)), Share::Count(b)) => *a < b,
            (Some(Share::Percent(a)), Share::Percent(b)) => *a < b,
            (Some(Share::Count(_)), Share::Percent(_)) => true,
            (Some(Share::Percent(_)), Share::Count(_)) => false,
        };
        if !increasing {
            return Err(format!(
                "stages {} must increase (count:N canaries first, then percents)",
                stages.join(",")
            ));
        }
        shares.push(share);
    }
    if !matches!(shares.last(), Some(Share::Percent(p)) if *p >= 100.0) {
        return Err("the last stage must be 100 (the whole eligible fleet)".to_owned());
    }
    if soak > MAX_SOAK {
        return Err(format!(
            "--soak {} is longer than the most a stage may soak, {}",
            stella_proto::format_duration(soak),
            stella_proto::format_duration(MAX_SOAK)
        ));
    }
    Ok(shares)
}

impl Share {
    /// Parses a stored stage: `10`, `12.5`, `100` or `count:N` (rollouts
    /// recorded before [`check_plan`] may hold fractions).
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        if let Some(n) = s.strip_prefix("count:") {
            return match n.parse::<u64>() {
                Ok(n) if n > 0 => Ok(Share::Count(n)),
                _ => Err(format!("stage {s:?}: count:N needs N ≥ 1")),
            };
        }
        match s.trim_end_matches('%').parse::<f64>() {
            Ok(p) if p > 0.0 && p <= 100.0 => Ok(Share::Percent(p)),
            _ => Err(format!(
                "stage {s:?} must be a percent in (0, 100] or count:N"
            )),
        }
    }

    /// Agents in the stage (cumulative) out of `eligible`.
    pub(crate) fn of(self, eligible: usize) -> usize {
        match self {
            Share::Percent(p) => ((p / 100.0) * eligible as f64).ceil() as usize,
            Share::Count(n) => n as usize,
        }
        .min(eligible)
    }
}

impl RolloutRecord {
    pub(crate) fn shares(&self) -> Vec<Share> {
        self.stages
            .iter()
            .filter_map(|s| Share::parse(s).ok())
            .collect()
    }

    /// Whether the rollout still holds its agents (no other may take them).
    pub(crate) fn is_live(&self) -> bool {
        self.status == RUNNING || self.status == PAUSED
    }

    /// How long (ms) a member has to commit once offered.
    pub(crate) fn agent_timeout_ms(&self) -> u64 {
        self.agent_timeout_ms
            .unwrap_or(DEFAULT_AGENT_TIMEOUT.as_millis() as u64)
    }

    /// Its maintenance window (stored ones were checked when it started).
    pub(crate) fn window(&self) -> Option<Window> {
        Window::parse(self.window.as_deref(), self.days.as_deref())
            .ok()
            .flatten()
    }

    /// Whether offers may be made at `now_ms`.
    pub(crate) fn window_open(&self, now_ms: u64) -> bool {
        self.window().is_none_or(|w| w.is_open(now_ms))
    }
}

/// What the engine needs to know of one agent.
#[derive(Debug, Clone)]
pub(crate) struct AgentFacts {
    pub(crate) id: String,
    pub(crate) active: bool,
    pub(crate) revoked: bool,
    pub(crate) labels: Labels,
    pub(crate) target: String,
    pub(crate) version: String,
    pub(crate) doctor_failing: bool,
    /// The agent reported that the update to this version failed (or was
    /// rolled back).
    pub(crate) failed_version: Option<String>,
    /// Unix ms of its last heartbeat (0: never).
    pub(crate) last_heartbeat_ms: u64,
    /// The update phase it reported, and the version that report concerns.
    pub(crate) phase: UpdatePhase,
    pub(crate) phase_version: String,
    /// The release it was offered in a heartbeat answer, and since when (ms).
    pub(crate) offered: Option<(String, u64)>,
}

/// The bucket of an agent in a rollout: the first 8 bytes of
/// SHA-256(rollout id, 0, agent id).
pub(crate) fn bucket(rollout_id: &str, agent_id: &str) -> u64 {
    let mut input = Vec::with_capacity(rollout_id.len() + agent_id.len() + 1);
    input.extend_from_slice(rollout_id.as_bytes());
    input.push(0);
    input.extend_from_slice(agent_id.as_bytes());
    let digest = stella_proto::hash::sha256(&input);
    u64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8]))
}

/// Whether an agent may take part: not revoked, matching the selector, and
/// with an artifact for its target in the release.
pub(crate) fn eligible(rec: &RolloutRecord, a: &AgentFacts, targets: &HashSet<String>) -> bool {
    if a.revoked || !targets.contains(&a.target) {
        return false;
    }
    rec.selector.iter().all(|(k, v)| match k.as_str() {
        "target" => a.target == *v,
        _ => a.labels.get(k) == Some(v),
    })
}

/// The eligible agents in rollout order.
pub(crate) fn order<'a>(rollout_id: &str, eligible: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut keyed: Vec<(u64, &str)> = eligible.map(|id| (bucket(rollout_id, id), id)).collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, id)| id).collect()
}

/// Cumulative member counts per stage for `n` eligible agents (never
/// shrinking from one stage to the next).
pub(crate) fn cumulative(shares: &[Share], n: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(shares.len());
    let mut last = 0;
    for s in shares {
        last = last.max(s.of(n));
        out.push(last);
    }
    out
}

/// Per-stage numbers, as `rollout show` prints them.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct StageStats {
    pub(crate) agents: usize,
    pub(crate) updated: usize,
    pub(crate) failed: usize,
    pub(crate) state: &'static str,
    pub(crate) members: Vec<String>,
    /// Members by phase (see [`Evaluation::phase_of`]).
    pub(crate) phases: BTreeMap<String, usize>,
    /// Of `failed`, members that timed out.
    pub(crate) timed_out: usize,
}

/// A change the engine asks for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    StartSoak(u64),
    StopSoak,
    /// Open the next stage at this time (ms).
    Advance(u64),
    Complete,
    Pause(String),
}

/// The result of evaluating one rollout against the fleet.
#[derive(Debug, Default)]
pub(crate) struct Evaluation {
    pub(crate) stages: Vec<StageStats>,
    /// Agents that may be offered the release now.
    pub(crate) offered: Vec<String>,
    pub(crate) change: Option<Change>,
    /// Whether the maintenance window allows offers now.
    pub(crate) window_open: bool,
}

/// How one member stands in a rollout at one time: the rules of the
/// deadline (`timed_out`, `skipped`) and of failures, in one place.
struct Judge<'a> {
    rec: &'a RolloutRecord,
    ignored: HashSet<&'a str>,
    now_ms: u64,
    timeout_ms: u64,
    opened_ms: u64,
}

impl<'a> Judge<'a> {
    fn new(rec: &'a RolloutRecord, now_ms: u64) -> Self {
        Judge {
            rec,
            ignored: rec.ignored_failures.iter().map(String::as_str).collect(),
            now_ms,
            timeout_ms: rec.agent_timeout_ms(),
            opened_ms: rec
                .stage_opened_ms
                .unwrap_or(rec.created_at.saturating_mul(1000)),
        }
    }

    fn updated(&self, a: &AgentFacts) -> bool {
        a.version == self.rec.release
    }

    /// It reported that the update to the release failed or rolled back.
    fn failed(&self, a: &AgentFacts) -> bool {
        a.failed_version.as_deref() == Some(self.rec.release.as_str())
    }

    /// Offered the release, and not committed (nor failed) within the
    /// deadline, counted from the offer or the last resume (a member that
    /// had timed out before that resume stays timed out).
    fn timed_out(&self, a: &AgentFacts) -> bool {
        let Some((version, at)) = &a.offered else {
            return false;
        };
        let since = if self.ignored.contains(a.id.as_str()) {
            *at
        } else {
            (*at).max(self.rec.resumed_ms.unwrap_or(0))
        };
        *version == self.rec.release
            && !self.updated(a)
            && !self.failed(a)
            && self.now_ms.saturating_sub(since) >= self.timeout_ms
    }

    /// Inactive and silent for a whole deadline since its stage opened.
    fn skipped(&self, a: &AgentFacts) -> bool {
        !a.active
            && !self.updated(a)
            && !self.failed(a)
            && !self.timed_out(a)
            && self.now_ms.saturating_sub(self.opened_ms) >= self.timeout_ms
            && self.now_ms.saturating_sub(a.last_heartbeat_ms) >= self.timeout_ms
    }

    /// It failed, and an admin has not resumed past that failure (such a
    /// member is not offered the release again).
    fn failure_counts(&self, a: &AgentFacts) -> bool {
        self.failed(a) && !self.ignored.contains(a.id.as_str())
    }

    /// A failure that counts toward `--max-failures` (not one an admin
    /// already looked at and resumed past).
    fn counted(&self, a: &AgentFacts) -> bool {
        (self.failed(a) || self.timed_out(a)) && !self.ignored.contains(a.id.as_str())
    }

    /// Whether the member no longer holds its stage.
    fn settled(&self, a: &AgentFacts) -> bool {
        !a.active || self.failed(a) || self.timed_out(a) || (self.updated(a) && !a.doctor_failing)
    }

    /// The phase `rollout show` counts the member under; `open`: its stage
    /// has opened.
    fn phase_of<'f>(&self, a: &'f AgentFacts, open: bool) -> Cow<'f, str> {
        // Known phases are counted by their spelling, without allocating
        // (the controller counts every member every second).
        let known = |phase: &'f UpdatePhase| match phase {
            UpdatePhase::Unknown(_) => Cow::Owned(phase.to_string()),
            other => Cow::Borrowed(other.as_str()),
        };
        let about_release = a.phase_version == self.rec.release;
        if self.updated(a) {
            return match &a.phase {
                UpdatePhase::Swapped | UpdatePhase::Probation if about_release => known(&a.phase),
                _ => Cow::Borrowed(UpdatePhase::Committed.as_str()),
            };
        }
        if self.failed(a) {
            return known(&a.phase);
        }
        if self.timed_out(a) {
            return Cow::Borrowed("timed_out");
        }
        if self.skipped(a) {
            return Cow::Borrowed("skipped");
        }
        if !open {
            return Cow::Borrowed("pending");
        }
        let offered = a
            .offered
            .as_ref()
            .is_some_and(|(v, _)| *v == self.rec.release);
        match &a.phase {
            UpdatePhase::Idle | UpdatePhase::Failed | UpdatePhase::RolledBack if offered => {
                Cow::Borrowed("offered")
            }
            UpdatePhase::Idle | UpdatePhase::Failed | UpdatePhase::RolledBack => {
                Cow::Borrowed("waiting")
            }
            // A phase this server does not know is counted as `unknown(…)`.
            other if about_release => known(other),
            _ if offered => Cow::Borrowed("offered"),
            _ => Cow::Borrowed("waiting"),
        }
    }
}

/// Evaluates a rollout. Pure: the same inputs give the same answer.
pub(crate) fn evaluate(
    rec: &RolloutRecord,
    agents: &[AgentFacts],
    targets: &HashSet<String>,
    now_ms: u64,
) -> Evaluation {
    let by_id: HashMap<&str, &AgentFacts> = agents.iter().map(|a| (a.id.as_str(), a)).collect();
    let ordered = order(
        &rec.id,
        agents
            .iter()
            .filter(|a| eligible(rec, a, targets))
            .map(|a| a.id.as_str()),
    );
    let shares = rec.shares();
    let bounds = cumulative(&shares, ordered.len());
    let judge = Judge::new(rec, now_ms);
    let open = rec.open_stage as usize;
    let mut eval = Evaluation {
        window_open: rec.window_open(now_ms),
        ..Evaluation::default()
    };
    let mut start = 0;
    for (k, &end) in bounds.iter().enumerate() {
        let slice = &ordered[start..end];
        let members: Vec<&AgentFacts> = slice
            .iter()
            .filter_map(|id| by_id.get(id).copied())
            .collect();
        let state = match k.cmp(&open) {
            std::cmp::Ordering::Less => "done",
            std::cmp::Ordering::Equal if rec.status == COMPLETED => "done",
            std::cmp::Ordering::Equal if rec.healthy_since_ms != 0 => "soaking",
            std::cmp::Ordering::Equal => "open",
            std::cmp::Ordering::Greater => "pending",
        };
        let mut phases: BTreeMap<String, usize> = BTreeMap::new();
        for a in &members {
            let phase = judge.phase_of(a, k <= open);
            match phases.get_mut(phase.as_ref()) {
                Some(n) => *n += 1,
                None => {
                    phases.insert(phase.into_owned(), 1);
                }
            }
        }
        eval.stages.push(StageStats {
            agents: members.len(),
            updated: members.iter().filter(|a| judge.updated(a)).count(),
            failed: members.iter().filter(|a| judge.counted(a)).count(),
            timed_out: members
                .iter()
                .filter(|a| judge.timed_out(a) && judge.counted(a))
                .count(),
            state,
            members: slice.iter().map(|s| (*s).to_owned()).collect(),
            phases,
        });
        if k <= open && rec.status == RUNNING && eval.window_open {
            eval.offered.extend(
                members
                    .iter()
                    .filter(|a| !judge.updated(a) && !judge.failure_counts(a))
                    .map(|a| a.id.clone()),
            );
        }
        start = end;
    }
    if rec.status != RUNNING {
        return eval;
    }
    let Some(stage) = eval.stages.get(open) else {
        eval.change = Some(Change::Complete);
        return eval;
    };
    // Too many failures in the open stage: stop offering.
    if stage.failed > 0 && stage.failed as f64 > rec.max_failures * stage.agents as f64 {
        let timed_out = match stage.timed_out {
            0 => String::new(),
            n => format!(
                " ({n} timed out after {})",
                stella_proto::format_duration(Duration::from_millis(rec.agent_timeout_ms()))
            ),
        };
        eval.change = Some(Change::Pause(format!(
            "stage {} ({}): {} of {} agents failed to update{timed_out}, over the threshold of {}",
            open + 1,
            rec.stages[open],
            stage.failed,
            stage.agents,
            rec.max_failures
        )));
        eval.offered.clear();
        return eval;
    }
    let slice = &ordered[bounds[..open].last().copied().unwrap_or(0)..bounds[open]];
    let settled = slice
        .iter()
        .filter_map(|id| by_id.get(id))
        .all(|a| judge.settled(a));
    eval.change = match (settled, rec.healthy_since_ms) {
        (false, 0) => None,
        (false, _) => Some(Change::StopSoak),
        (true, 0) => Some(Change::StartSoak(now_ms)),
        (true, since) if now_ms.saturating_sub(since) >= rec.soak_ms => {
            if open + 1 >= rec.stages.len() {
                Some(Change::Complete)
            } else {
                Some(Change::Advance(now_ms))
            }
        }
        (true, _) => None,
    };
    eval
}

/// Rollouts in memory, and which agent is offered which release now.
#[derive(Debug, Default)]
pub(crate) struct Rollouts {
    pub(crate) records: BTreeMap<String, RolloutRecord>,
    /// Agent id → release version, from the last evaluation.
    pub(crate) offered: HashMap<String, String>,
    /// Last per-stage numbers, by rollout id.
    pub(crate) stats: HashMap<String, Vec<StageStats>>,
}

/// The facts of every agent, for the engine.
pub(crate) fn facts(fleet: &Fleet) -> Vec<AgentFacts> {
    fleet
        .agents
        .values()
        .map(|live| {
            let r = &live.record;
            let hb = &live.hb;
            AgentFacts {
                id: r.id.clone(),
                active: r.status == AgentStatus::Active,
                revoked: r.status == AgentStatus::Revoked,
                labels: r.labels.clone(),
                target: r.platform.target.clone(),
                version: live.version().to_owned(),
                doctor_failing: hb.doctor.fail > 0,
                failed_version: hb.failed_version().map(str::to_owned),
                last_heartbeat_ms: hb.last_heartbeat_ms,
                phase: UpdatePhase::parse(&hb.update_state),
                phase_version: hb.update_version.clone(),
                offered: hb.offered_version.clone().zip(hb.offered_at_ms),
            }
        })
        .collect()
}

/// Applies the engine's change to the record; returns the audit action.
pub(crate) fn apply(rec: &mut RolloutRecord, change: &Change) -> &'static str {
    match change {
        Change::StartSoak(at) => {
            rec.healthy_since_ms = *at;
            "rollout.soak"
        }
        Change::StopSoak => {
            rec.healthy_since_ms = 0;
            "rollout.soak_reset"
        }
        Change::Advance(at) => {
            rec.open_stage += 1;
            rec.healthy_since_ms = 0;
            rec.stage_opened_ms = Some(*at);
            "rollout.advance"
        }
        Change::Complete => {
            rec.open_stage = rec.stages.len() as u32;
            rec.status = COMPLETED.into();
            rec.healthy_since_ms = 0;
            "rollout.complete"
        }
        Change::Pause(reason) => {
            rec.status = PAUSED.into();
            rec.reason = Some(reason.clone());
            "rollout.pause_on_failures"
        }
    }
}

/// What `rollout start` asks for.
#[derive(Debug)]
pub(crate) struct StartRequest<'a> {
    pub(crate) release: &'a str,
    pub(crate) stages: &'a [String],
    pub(crate) soak: Duration,
    pub(crate) max_failures: f64,
    pub(crate) selector: Labels,
    /// `--agent-timeout`; `None`: [`DEFAULT_AGENT_TIMEOUT`].
    pub(crate) agent_timeout: Option<Duration>,
    pub(crate) window: Option<String>,
    pub(crate) days: Option<String>,
}

/// Checks a `rollout start` (stages, threshold, selector, a release with
/// agents for `targets`) and makes the rollout `id` to record.
pub(crate) fn check_start(
    req: StartRequest<'_>,
    targets: &HashSet<String>,
    id: String,
    now: u64,
) -> Result<RolloutRecord, Refusal> {
    check_plan(req.stages, req.soak).map_err(Refusal::bad_request)?;
    check_schedule(
        req.agent_timeout,
        req.window.as_deref(),
        req.days.as_deref(),
    )
    .map_err(Refusal::bad_request)?;
    if !(0.0..=1.0).contains(&req.max_failures) {
        return Err(Refusal::bad_request(format!(
            "--max-failures {} must be between 0 and 1",
            req.max_failures
        )));
    }
    crate::tokens::check_labels(&req.selector).map_err(Refusal::bad_request)?;
    if targets.is_empty() {
        return Err(Refusal::not_found(format!(
            "no release {} with an agent artifact has been imported",
            req.release
        )));
    }
    Ok(RolloutRecord {
        id,
        release: req.release.to_owned(),
        stages: req.stages.to_vec(),
        soak_ms: req.soak.as_millis() as u64,
        max_failures: req.max_failures,
        selector: req.selector,
        status: RUNNING.into(),
        reason: None,
        open_stage: 0,
        healthy_since_ms: 0,
        created_at: now,
        ignored_failures: Vec::new(),
        agent_timeout_ms: Some(
            req.agent_timeout
                .unwrap_or(DEFAULT_AGENT_TIMEOUT)
                .as_millis() as u64,
        ),
        window: req.window,
        days: req.days,
        stage_opened_ms: Some(now.saturating_mul(1000)),
        resumed_ms: None,
    })
}

/// Refuses a new rollout that would take an agent a live one holds.
pub(crate) fn check_no_clash<'a>(
    rec: &RolloutRecord,
    targets: &HashSet<String>,
    live: impl Iterator<Item = (&'a RolloutRecord, HashSet<String>)>,
    agents: &[AgentFacts],
) -> Result<(), Refusal> {
    for (other, other_targets) in live {
        let clash = agents
            .iter()
            .find(|a| eligible(rec, a, targets) && eligible(other, a, &other_targets));
        if let Some(a) = clash {
            return Err(Refusal::conflict(format!(
                "agent {} is already in rollout {} ({}, release {}); pause is not enough: abort it or narrow --selector",
                a.id, other.id, other.status, other.release
            )));
        }
    }
    Ok(())
}

/// `rollout pause|resume|abort`: the rollout afterwards, or `Ok(None)` when
/// nothing changes. Resuming forgets the failures seen so far (`agents`).
pub(crate) fn act(
    rec: &RolloutRecord,
    action: &str,
    agents: &[AgentFacts],
    now_ms: u64,
) -> Result<Option<RolloutRecord>, Refusal> {
    let mut rec = rec.clone();
    match (action, rec.status.as_str()) {
        (_, COMPLETED | ABORTED) => {
            return Err(Refusal::conflict(format!(
                "rollout {} is {}: it cannot be changed",
                rec.id, rec.status
            )));
        }
        ("pause", RUNNING) => {
            rec.status = PAUSED.into();
            rec.reason = Some("paused by an administrator".into());
        }
        ("resume", PAUSED) => {
            // Failures and time-outs seen so far were looked at: only new
            // ones count, and members still under way get a whole deadline.
            let judge = Judge::new(&rec, now_ms);
            let ignored: Vec<String> = agents
                .iter()
                .filter(|a| judge.failed(a) || judge.timed_out(a))
                .map(|a| a.id.clone())
                .collect();
            rec.ignored_failures = ignored;
            rec.status = RUNNING.into();
            rec.reason = None;
            rec.healthy_since_ms = 0;
            rec.stage_opened_ms = Some(now_ms);
            rec.resumed_ms = Some(now_ms);
        }
        ("abort", _) => {
            rec.status = ABORTED.into();
            rec.reason = Some("aborted by an administrator".into());
        }
        ("pause", PAUSED) | ("resume", RUNNING) => return Ok(None),
        (other, _) => {
            return Err(Refusal::bad_request(format!(
                "unknown rollout action {other:?}"
            )));
        }
    }
    Ok(Some(rec))
}

/// The admin view of a rollout, from an evaluation of it.
pub(crate) fn view(
    rec: &RolloutRecord,
    eval: Evaluation,
    with_members: bool,
) -> stella_proto::api::RolloutView {
    let window_open = eval.window_open;
    let stages = rec
        .stages
        .iter()
        .zip(eval.stages)
        .map(|(spec, s)| stella_proto::api::RolloutStageView {
            stage: spec.clone(),
            percent: match Share::parse(spec) {
                Ok(Share::Percent(p)) => Some(p),
                _ => None,
            },
            agents: s.agents as u64,
            updated: s.updated as u64,
            failed: s.failed as u64,
            state: s.state.to_owned(),
            members: with_members.then_some(s.members),
            phases: Some(
                s.phases
                    .into_iter()
                    .map(|(phase, n)| (phase, n as u64))
                    .collect(),
            ),
        })
        .collect();
    stella_proto::api::RolloutView {
        id: rec.id.clone(),
        release: rec.release.clone(),
        status: rec.status.clone(),
        reason: rec.reason.clone(),
        stages,
        soak: stella_proto::format_duration(Duration::from_millis(rec.soak_ms)),
        max_failures: rec.max_failures,
        selector: rec.selector.clone(),
        created_at: stella_proto::time::rfc3339(rec.created_at),
        agent_timeout: Some(stella_proto::format_duration(Duration::from_millis(
            rec.agent_timeout_ms(),
        ))),
        window: rec.window.clone(),
        days: rec.days.clone(),
        window_open: Some(window_open),
    }
}

/// Loads stored rollouts.
pub(crate) fn load(rows: Vec<RolloutRecord>) -> Rollouts {
    Rollouts {
        records: rows.into_iter().map(|r| (r.id.clone(), r)).collect(),
        ..Rollouts::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(n: usize) -> Vec<AgentFacts> {
        (0..n)
            .map(|i| AgentFacts {
                id: stella_proto::id::agent_id_from_bytes((i as u128 * 7919 + 13).to_be_bytes()),
                active: true,
                revoked: false,
                labels: Labels::from([(
                    "env".to_owned(),
                    if i % 4 == 0 { "dev" } else { "prod" }.to_owned(),
                )]),
                target: "x86_64-unknown-linux-musl".into(),
                version: "1.0.0".into(),
                doctor_failing: false,
                failed_version: None,
                last_heartbeat_ms: 0,
                phase: UpdatePhase::Idle,
                phase_version: "1.0.0".into(),
                offered: None,
            })
            .collect()
    }

    fn rollout(stages: &[&str], selector: &[(&str, &str)]) -> RolloutRecord {
        RolloutRecord {
            id: "rol_test".into(),
            release: "1.1.0".into(),
            stages: stages.iter().map(|s| (*s).to_owned()).collect(),
            soak_ms: 1000,
            max_failures: 0.05,
            selector: selector
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            status: RUNNING.into(),
            reason: None,
            open_stage: 0,
            healthy_since_ms: 0,
            created_at: 0,
            ignored_failures: Vec::new(),
            agent_timeout_ms: None,
            window: None,
            days: None,
            stage_opened_ms: None,
            resumed_ms: None,
        }
    }

    fn targets() -> HashSet<String> {
        HashSet::from(["x86_64-unknown-linux-musl".to_owned()])
    }

    #[test]
    fn ten_thousand_agents_hit_every_stage_share_exactly() {
        let agents = fleet(10_000);
        let mut rec = rollout(&["count:1", "10", "50", "100"], &[]);
        let mut seen_before: Vec<String> = Vec::new();
        for (stage, want) in [(0u32, 1usize), (1, 1_000), (2, 5_000), (3, 10_000)] {
            rec.open_stage = stage;
            let eval = evaluate(&rec, &agents, &targets(), 0);
            let cumulative: usize = eval.stages[..=stage as usize]
                .iter()
                .map(|s| s.agents)
                .sum();
            assert!(
                cumulative.abs_diff(want) <= 1,
                "stage {stage}: {cumulative} agents for a target of {want}"
            );
            assert_eq!(eval.offered.len(), cumulative);
            // Cumulative: everyone offered before is still offered.
            assert!(
                seen_before.iter().all(|id| eval.offered.contains(id)),
                "stage {stage} dropped earlier members"
            );
            seen_before = eval.offered;
        }
    }

    #[test]
    fn membership_is_deterministic_and_depends_on_the_rollout() {
        let agents = fleet(2_000);
        let rec = rollout(&["10", "100"], &[]);
        let first = evaluate(&rec, &agents, &targets(), 0).offered;
        let mut shuffled = agents.clone();
        shuffled.reverse();
        shuffled.rotate_left(777);
        let mut again = evaluate(&rec, &shuffled, &targets(), 0).offered;
        let mut first_sorted = first;
        first_sorted.sort();
        again.sort();
        assert_eq!(
            first_sorted, again,
            "the same agents whatever the input order"
        );
        let mut other = rec;
        other.id = "rol_other".into();
        let mut theirs = evaluate(&other, &agents, &targets(), 0).offered;
        theirs.sort();
        assert_ne!(first_sorted, theirs, "another rollout picks other canaries");
    }

    #[test]
    fn the_selector_and_targets_limit_eligibility() {
        let mut agents = fleet(400);
        agents[1].target = "aarch64-unknown-linux-musl".into();
        agents[2].revoked = true;
        let rec = rollout(&["100"], &[("env", "prod")]);
        let eval = evaluate(&rec, &agents, &targets(), 0);
        let prod = agents
            .iter()
            .filter(|a| a.labels["env"] == "prod" && !a.revoked && a.target.starts_with("x86"))
            .count();
        assert_eq!(eval.stages[0].agents, prod);
        assert!(
            !eval.offered.contains(&agents[0].id),
            "dev agents are not selected"
        );
        assert!(!eval.offered.contains(&agents[1].id) && !eval.offered.contains(&agents[2].id));
    }

    #[test]
    fn a_stage_soaks_then_opens_the_next_and_the_last_completes() {
        let mut agents = fleet(100);
        let mut rec = rollout(&["10", "100"], &[]);
        let members = evaluate(&rec, &agents, &targets(), 0).stages[0]
            .members
            .clone();
        assert_eq!(
            evaluate(&rec, &agents, &targets(), 0).change,
            None,
            "nobody updated yet"
        );
        for a in agents.iter_mut().filter(|a| members.contains(&a.id)) {
            a.version = "1.1.0".into();
        }
        assert_eq!(
            evaluate(&rec, &agents, &targets(), 5_000).change,
            Some(Change::StartSoak(5_000))
        );
        rec.healthy_since_ms = 5_000;
        assert_eq!(
            evaluate(&rec, &agents, &targets(), 5_500).change,
            None,
            "still soaking"
        );
        // A member's doctor fails: the soak starts over.
        let sick = agents.iter_mut().find(|a| members.contains(&a.id)).unwrap();
        sick.doctor_failing = true;
        assert_eq!(
            evaluate(&rec, &agents, &targets(), 5_600).change,
            Some(Change::StopSoak)
        );
        agents.iter_mut().for_each(|a| a.doctor_failing = false);
        assert_eq!(
            evaluate(&rec, &agents, &targets(), 6_000).change,
            Some(Change::Advance(6_000))
        );
        rec.open_stage = 1;
        rec.healthy_since_ms = 0;
        agents.iter_mut().for_each(|a| a.version = "1.1.0".into());
        assert_eq!(
            evaluate(&rec, &agents, &targets(), 7_000).change,
            Some(Change::StartSoak(7_000))
        );
        rec.healthy_since_ms = 7_000;
        assert_eq!(
            evaluate(&rec, &agents, &targets(), 8_000).change,
            Some(Change::Complete)
        );
    }

    #[test]
    fn failures_over_the_threshold_pause_and_stop_offers() {
        let mut agents = fleet(100);
        let rec = rollout(&["count:1", "100"], &[]);
        let canary = evaluate(&rec, &agents, &targets(), 0).stages[0].members[0].clone();
        let a = agents.iter_mut().find(|a| a.id == canary).unwrap();
        a.failed_version = Some("1.1.0".into());
        let eval = evaluate(&rec, &agents, &targets(), 0);
        assert!(
            matches!(eval.change, Some(Change::Pause(ref r)) if r.contains("1 of 1 agents failed")),
            "{:?}",
            eval.change
        );
        assert!(eval.offered.is_empty());
        // Offline members do not hold a stage back.
        let mut quiet = fleet(10);
        let rec = rollout(&["100"], &[]);
        quiet.iter_mut().for_each(|a| a.active = false);
        assert_eq!(
            evaluate(&rec, &quiet, &targets(), 1).change,
            Some(Change::StartSoak(1))
        );
    }

    #[test]
    fn a_plan_has_whole_increasing_stages_and_a_sane_soak() {
        let plan = |stages: &str, soak_s: u64| {
            let stages: Vec<String> = stages.split(',').map(str::to_owned).collect();
            check_plan(&stages, Duration::from_secs(soak_s))
        };
        assert_eq!(
            plan("count:1,count:5,10,50%,100", 600),
            Ok(vec![
                Share::Count(1),
                Share::Count(5),
                Share::Percent(10.0),
                Share::Percent(50.0),
                Share::Percent(100.0)
            ])
        );
        assert!(plan("100", 30 * 86_400).is_ok());
        for bad in [
            "1e2", "12.5", "0", "101", "+50,100", " 50,100", "0x10,100", "", "50,",
        ] {
            let got = plan(&format!("{bad},100").replace(",100,100", ",100"), 60);
            assert!(
                got.as_ref().is_err_and(|e| e.contains("whole percent")),
                "{bad}: {got:?}"
            );
        }
        for bad in [
            "50,10,100",
            "50,50,100",
            "count:5,count:1,100",
            "10,count:1,100",
        ] {
            let got = plan(bad, 60);
            assert!(
                got.as_ref().is_err_and(|e| e.contains("increase")),
                "{bad}: {got:?}"
            );
        }
        assert!(plan("50", 60).is_err_and(|e| e.contains("last stage")));
        assert!(plan("100", 30 * 86_400 + 1).is_err_and(|e| e.contains("--soak")));
        assert!(plan("100", u64::MAX).is_err());
    }

    /// 2024-01-01T00:00:00Z, a Monday, in ms.
    const MONDAY: u64 = 1_704_067_200_000;
    const HOUR: u64 = 3_600_000;
    const DAY: u64 = 24 * HOUR;

    #[test]
    fn a_window_may_wrap_midnight_and_belongs_to_the_day_it_starts() {
        let w = Window::parse(Some("22:00-04:00"), Some("mon-fri"))
            .unwrap()
            .unwrap();
        for (at, open) in [
            (MONDAY + 23 * HOUR, true),
            (MONDAY + DAY + 3 * HOUR, true),
            (MONDAY + DAY + 4 * HOUR, false),
            (MONDAY + 12 * HOUR, false),
            (MONDAY + HOUR, false),
            (MONDAY + 5 * DAY + HOUR, true),
            (MONDAY + 5 * DAY + 23 * HOUR, false),
        ] {
            assert_eq!(
                w.is_open(at),
                open,
                "{}",
                stella_proto::time::rfc3339(at / 1000)
            );
        }
        let day = Window::parse(Some("09:30-17:00"), None).unwrap().unwrap();
        assert!(day.is_open(MONDAY + 9 * HOUR + 30 * 60_000));
        assert!(!day.is_open(MONDAY + 9 * HOUR + 29 * 60_000));
        let weekend = Window::parse(None, Some("sat,sun")).unwrap().unwrap();
        assert!(weekend.is_open(MONDAY + 6 * DAY + 23 * HOUR));
        assert!(!weekend.is_open(MONDAY + 7 * DAY));
        assert_eq!(parse_days("fri-mon"), Ok(0b111_0001));
        assert_eq!(Window::parse(None, None), Ok(None));
        assert!(Window::parse(Some("00:00-24:00"), None).is_err());
        for bad in [
            "22-04",
            "22:00",
            "25:00-01:00",
            "22:00-22:00",
            "2:00-04:00",
            "22:60-01:00",
            "",
        ] {
            let err = parse_window(bad).unwrap_err();
            assert!(err.starts_with(&format!("--window {bad:?}")), "{err}");
        }
        for bad in ["monday", "mon-", "", "mon,,fri", "1-5"] {
            let err = parse_days(bad).unwrap_err();
            assert!(err.starts_with(&format!("--days {bad:?}")), "{err}");
        }
        assert!(check_schedule(Some(Duration::ZERO), None, None).is_err());
        assert!(check_schedule(Some(Duration::from_secs(31 * 86_400)), None, None).is_err());
        assert!(
            check_schedule(
                Some(Duration::from_secs(60)),
                Some("22:00-04:00"),
                Some("mon-fri")
            )
            .is_ok()
        );
    }

    #[test]
    fn outside_the_window_nobody_is_offered() {
        let agents = fleet(10);
        let mut rec = rollout(&["100"], &[]);
        rec.window = Some("22:00-04:00".into());
        let closed = evaluate(&rec, &agents, &targets(), MONDAY + 12 * HOUR);
        assert!(closed.offered.is_empty() && !closed.window_open);
        assert_eq!(closed.stages[0].phases.get("waiting"), Some(&10));
        let open = evaluate(&rec, &agents, &targets(), MONDAY + 23 * HOUR);
        assert_eq!((open.offered.len(), open.window_open), (10, true));
    }

    #[test]
    fn a_member_stuck_downloading_times_out_and_counts_as_a_failure() {
        let mut agents = fleet(4);
        let mut rec = rollout(&["100"], &[]);
        rec.agent_timeout_ms = Some(HOUR);
        rec.max_failures = 0.0;
        let t0 = MONDAY;
        for a in &mut agents {
            a.offered = Some(("1.1.0".into(), t0));
            a.last_heartbeat_ms = t0;
        }
        // Three commit; one stays in `downloading`.
        for a in &mut agents[1..] {
            a.version = "1.1.0".into();
        }
        agents[0].phase = UpdatePhase::Downloading;
        agents[0].phase_version = "1.1.0".into();
        let before = evaluate(&rec, &agents, &targets(), t0 + HOUR - 1);
        assert_eq!(before.change, None, "the stage waits within the deadline");
        assert_eq!(before.stages[0].phases.get("downloading"), Some(&1));
        assert_eq!(before.stages[0].phases.get("committed"), Some(&3));
        let after = evaluate(&rec, &agents, &targets(), t0 + HOUR);
        assert_eq!((after.stages[0].failed, after.stages[0].timed_out), (1, 1));
        assert_eq!(after.stages[0].phases.get("timed_out"), Some(&1));
        assert!(
            matches!(&after.change, Some(Change::Pause(r)) if r.contains("1 of 4 agents failed to update (1 timed out after 1h)")),
            "{:?}",
            after.change
        );
        // Under a threshold it allows, the stage goes on without it.
        rec.max_failures = 0.25;
        assert_eq!(
            evaluate(&rec, &agents, &targets(), t0 + HOUR).change,
            Some(Change::StartSoak(t0 + HOUR))
        );
        // Resumed past it, the time-out no longer counts and holds nothing.
        rec.max_failures = 0.0;
        let resumed = act(&rec, "pause", &agents, t0 + HOUR).unwrap().unwrap();
        let resumed = act(&resumed, "resume", &agents, t0 + HOUR)
            .unwrap()
            .unwrap();
        assert_eq!(resumed.ignored_failures, [agents[0].id.clone()]);
        let eval = evaluate(&resumed, &agents, &targets(), t0 + HOUR + 1);
        assert_eq!(eval.stages[0].failed, 0);
        assert_eq!(eval.change, Some(Change::StartSoak(t0 + HOUR + 1)));
    }

    #[test]
    fn members_are_counted_by_phase_and_unknown_phases_shown_as_such() {
        let mut agents = fleet(5);
        let rec = rollout(&["count:2", "100"], &[]);
        let eval = evaluate(&rec, &agents, &targets(), 0);
        let canaries = &eval.stages[0].members;
        for a in agents.iter_mut().filter(|a| canaries.contains(&a.id)) {
            a.offered = Some(("1.1.0".into(), 0));
            a.phase_version = "1.1.0".into();
        }
        let first = agents.iter_mut().find(|a| a.id == canaries[0]).unwrap();
        first.phase = UpdatePhase::parse("hibernating");
        let eval = evaluate(&rec, &agents, &targets(), 1);
        assert_eq!(
            eval.stages[0].phases,
            BTreeMap::from([
                ("offered".to_owned(), 1),
                ("unknown(hibernating)".to_owned(), 1)
            ])
        );
        assert_eq!(
            eval.stages[1].phases,
            BTreeMap::from([("pending".to_owned(), 3)])
        );
    }

    #[test]
    fn a_member_offline_for_the_whole_deadline_is_skipped_and_still_offered() {
        let mut agents = fleet(3);
        let mut rec = rollout(&["100"], &[]);
        rec.agent_timeout_ms = Some(HOUR);
        rec.stage_opened_ms = Some(MONDAY);
        agents[0].active = false;
        agents[0].last_heartbeat_ms = MONDAY - DAY;
        let early = evaluate(&rec, &agents, &targets(), MONDAY + HOUR - 1);
        assert_eq!(early.stages[0].phases.get("skipped"), None);
        let late = evaluate(&rec, &agents, &targets(), MONDAY + HOUR);
        assert_eq!(late.stages[0].phases.get("skipped"), Some(&1));
        assert_eq!(late.stages[0].failed, 0, "skipped is not a failure");
        assert!(
            late.offered.contains(&agents[0].id),
            "offered when it returns"
        );
    }

    #[test]
    fn a_rollout_stored_before_deadlines_and_windows_still_loads() {
        let old = r#"{"id":"rol_old","release":"1.1.0","stages":["100"],"soak_ms":1000,
            "max_failures":0.05,"selector":{},"status":"running","reason":null,"open_stage":0,
            "healthy_since_ms":0,"created_at":100,"ignored_failures":[]}"#;
        let rec: RolloutRecord = miniserde::json::from_str(old).unwrap();
        assert_eq!(rec.agent_timeout_ms(), 3_600_000);
        assert!(rec.window().is_none() && rec.window_open(0));
        let view = view(&rec, evaluate(&rec, &fleet(2), &targets(), 0), false);
        assert_eq!(view.agent_timeout.as_deref(), Some("1h"));
        assert_eq!(view.window, None);
    }

    #[test]
    fn stage_specs_parse() {
        assert_eq!(Share::parse("count:1"), Ok(Share::Count(1)));
        assert_eq!(Share::parse("12.5"), Ok(Share::Percent(12.5)));
        assert!(
            Share::parse("0").is_err()
                && Share::parse("101").is_err()
                && Share::parse("count:0").is_err()
        );
        assert_eq!(
            cumulative(
                &[Share::Count(5), Share::Percent(1.0), Share::Percent(100.0)],
                100
            ),
            [5, 5, 100]
        );
    }
}
