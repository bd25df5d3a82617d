//! `stella-agent run`: the scheduler. One thread, one small deadline loop
//! over single exchanges — a heartbeat (`heartbeat`) over one mTLS
//! keep-alive connection with ±10% jitter, and after failures capped
//! exponential backoff with full jitter (`RetrySchedule`), a
//! certificate renewal (`renewal`), a doctor run with remediation, one
//! chunk of an update download (`update`), and a poll of the running
//! deployment task (`tasks`) — sleeping until the earliest is
//! due. Lifecycle answers are obeyed (403 deactivated: back off and keep
//! asking; 401 revoked: stop with exit code 3).

use std::thread::sleep;
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};
use stella_proto::api::MAX_DOCTOR_REPORT;
use stella_proto::config::Remediation;
use stella_proto::states::UpdatePhase;
use stella_proto::time::rfc3339;

use crate::config::ConfigState;
use crate::doctor::Doctor;
use crate::error::Error;
use crate::heartbeat::{
    self, Buffers, DEFAULT_INTERVAL, Refusal, clamp_interval, heartbeat_url, new_beat, record_ack,
    wall_now,
};
use crate::identity::Identity;
use crate::renewal::{self, RenewError};
use crate::state::{SaveBuffers, StateDir};
use crate::tasks::Tasks;
use crate::update::{self, Step, Updater};
use crate::{fault, host, log, remediate, transport};

/// Re-detect capabilities every this many heartbeats.
const CAPABILITY_REFRESH: u64 = 20;
/// How often a running task's child process is polled.
const TASK_POLL: Duration = Duration::from_millis(100);

/// A number in [0, 1) from the system's random source.
fn random_unit(rng: &SystemRandom) -> f64 {
    let mut b = [0u8; 4];
    let _ = rng.fill(&mut b);
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

/// `base` ± `spread` (a fraction), so a fleet started together drifts apart.
fn jittered(base: Duration, spread: f64, rng: &SystemRandom) -> Duration {
    base.mul_f64(1.0 - spread + 2.0 * spread * random_unit(rng))
}

/// How consecutive failed heartbeats (a refused connection, a timeout, a
/// 5xx, a 403 while deactivated) space the next attempt: capped exponential
/// backoff with full jitter. After failure n the wait is uniform in
/// [0, min(cap, interval·2^(n-1))], so the first retry after an outage is
/// spread over one whole interval and a fleet that lost its server together
/// does not come back together. A success resets it.
#[derive(Debug, Default)]
struct RetrySchedule {
    failures: u32,
}

impl RetrySchedule {
    /// The window the next wait is drawn from after `failures` failures
    /// (the rule is shared with the load generator that simulates agents).
    fn window(interval: Duration, failures: u32) -> Duration {
        stella_proto::backoff::retry_window(interval, failures)
    }

    /// Counts one more failure and returns the wait before the next
    /// attempt; `unit` is a random number in [0, 1).
    fn failed(&mut self, interval: Duration, unit: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        Self::window(interval, self.failures).mul_f64(unit.clamp(0.0, 1.0))
    }

    /// A heartbeat got through: returns how many had failed before it.
    fn succeeded(&mut self) -> u32 {
        std::mem::take(&mut self.failures)
    }
}

/// The wait before retrying a failed renewal: starts at 1% of the lifetime
/// (1 s to 1 min), doubles, capped at 10% of the lifetime (at most 1 h).
fn renewal_backoff(lifetime_secs: u64, failures: u32) -> Duration {
    let base = Duration::from_secs(lifetime_secs / 100)
        .clamp(Duration::from_secs(1), Duration::from_secs(60));
    let cap = Duration::from_secs(lifetime_secs / 10).clamp(base, Duration::from_secs(3600));
    (base * (1u32 << failures.saturating_sub(1).min(16))).min(cap)
}

/// The agent's running state.
struct Agent<'a> {
    state: &'a StateDir,
    ident: Identity,
    client: transport::Client,
    rng: SystemRandom,
    interval: Duration,
    /// Unix seconds when the certificate should be renewed.
    renew_at: u64,
    renew_failures: u32,
    retry: RetrySchedule,
}

impl Agent<'_> {
    fn idle(interval: Duration) -> Duration {
        (interval * 3).max(Duration::from_secs(60))
    }

    fn connect(ident: &Identity, interval: Duration) -> Result<transport::Client, Error> {
        transport::http_client(
            &ident.ca_der,
            Some((&ident.cert_der, &ident.key_pem)),
            Self::idle(interval),
        )
    }

    /// Counts a heartbeat that did not get through and returns when to try
    /// again (see [`RetrySchedule`]).
    fn failed_beat(&mut self) -> Duration {
        self.retry.failed(self.interval, random_unit(&self.rng))
    }

    fn refused(&self, message: &str) -> Error {
        log::error(
            "the server no longer accepts this agent; enroll this host again",
            &[("agent", &self.ident.id), ("error", &message)],
        );
        Error::Revoked(format!(
            "{} refused agent {}: {message}",
            self.ident.server, self.ident.id
        ))
    }

    /// Renews (or, once expired, recovers) the certificate. Failures are
    /// retried later with backoff; the working pair is never removed.
    fn renew(&mut self) -> Result<(), Error> {
        let expired = wall_now() >= self.ident.cert.not_after;
        let result = if expired {
            log::warn(
                "certificate expired; recovering with the old key",
                &[("not_after", &rfc3339(self.ident.cert.not_after))],
            );
            renewal::recover(self.state, &self.ident)
        } else {
            renewal::renew(self.state, &self.ident, &mut self.client)
        };
        match result {
            Ok(renewed) => {
                self.client = Self::connect(&renewed, self.interval)?;
                self.renew_at = renewal::renewal_due(&renewed.cert, &self.rng);
                self.ident = renewed;
                self.renew_failures = 0;
                log::info("next renewal scheduled", &[("at", &rfc3339(self.renew_at))]);
                Ok(())
            }
            Err(RenewError::Refused(message)) => Err(self.refused(&message)),
            Err(RenewError::Failed(error)) => {
                self.renew_failures += 1;
                let lifetime = self
                    .ident
                    .cert
                    .not_after
                    .saturating_sub(self.ident.cert.not_before);
                let wait = jittered(
                    renewal_backoff(lifetime, self.renew_failures),
                    0.2,
                    &self.rng,
                );
                self.renew_at = wall_now() + wait.as_secs().max(1);
                log::warn(
                    "certificate renewal failed; keeping the current certificate",
                    &[
                        ("error", &error),
                        ("failures", &self.renew_failures),
                        (
                            "retry_in",
                            &stella_proto::format_duration(Duration::from_secs(
                                wait.as_secs().max(1),
                            )),
                        ),
                    ],
                );
                Ok(())
            }
        }
    }
}

/// Runs until revoked (Err(Revoked)) or killed.
pub(crate) fn run(state: &StateDir) -> Result<(), Error> {
    renewal::finish_interrupted_renewal(state)?;
    let mut saved = state.state_file();
    // A swap, probation or rollback left by the previous process.
    Updater::on_start(state, &mut saved)?;
    let ident = Identity::load(state)?;
    let rng = SystemRandom::new();
    let started = Instant::now();
    let mut updater = Updater::default();
    let interval = match saved.heartbeat_interval_ms {
        0 => DEFAULT_INTERVAL,
        ms => clamp_interval(ms),
    };
    let mut agent = Agent {
        client: Agent::connect(&ident, interval)?,
        renew_at: renewal::renewal_due(&ident.cert, &rng),
        ident,
        state,
        rng,
        interval,
        renew_failures: 0,
        retry: RetrySchedule::default(),
    };
    let mut config = ConfigState::load(&saved);
    let log_level_from_env = std::env::var_os("STELLA_LOG_LEVEL").is_some();
    if !log_level_from_env {
        log::set_level(config.settings.log_level);
    }
    let url = heartbeat_url(&agent.ident.server)?;
    let labels = state.agent_file().ok().and_then(|a| a.labels);
    let mut tasks = Tasks::start(state, &agent.ident.id, labels);
    let mut buffers = Buffers::default();
    let mut save_buffers = SaveBuffers::default();
    // When state.json was last written (an old instant: write at the first ack).
    let mut persisted = Instant::now()
        .checked_sub(Duration::from_secs(86_400))
        .unwrap_or_else(Instant::now);
    let mut beat = new_beat(&saved, &config, &updater);
    log::info(
        "agent running",
        &[
            ("agent", &agent.ident.id),
            ("server", &agent.ident.server),
            ("version", &host::VERSION),
            ("cert_not_after", &rfc3339(agent.ident.cert.not_after)),
            ("renew_at", &rfc3339(agent.renew_at)),
        ],
    );
    let mut next_beat = Instant::now();
    let mut next_doctor = Instant::now();
    // The server asked for a doctor report (with a remediation dry run?).
    let mut doctor_asked: Option<bool> = None;
    // The last heartbeat carried the failed update's log and did not get
    // through; and how often one without it got through right after (the
    // server works but refuses the log).
    let mut failure_log_failed = false;
    let mut failure_log_refusals = 0u32;
    // The `lost-commit-ack` fault has dropped its one answer.
    let mut lost_commit_ack = false;
    loop {
        if wall_now() >= agent.renew_at {
            agent.renew()?;
        }
        if Instant::now() >= next_beat {
            // An expired certificate cannot heartbeat: wait for the recovery
            // that the renewal schedule (already due) keeps attempting.
            let wait = if wall_now() >= agent.ident.cert.not_after {
                Duration::from_secs(1)
            } else {
                beat.seq += 1;
                beat.uptime_s = started.elapsed().as_secs();
                if config.check_drift(state)
                    && config.settings.remediation == Remediation::Auto
                    && let Err(e) = config.restore(state)
                {
                    // Still drifted: the next heartbeat tries again.
                    log::warn("could not restore config.json", &[("error", &e)]);
                }
                if beat.config_hash != config.hash {
                    beat.config_hash.clone_from(&config.hash);
                }
                beat.config_drift = config.drift;
                if beat.config_error != config.refusal {
                    beat.config_error.clone_from(&config.refusal);
                }
                updater.fill_report(&saved, &mut beat.update);
                if beat.update_failure.is_none()
                    && !failure_log_failed
                    && saved
                        .update_failure
                        .as_ref()
                        .is_some_and(|f| f.reported != Some(true))
                {
                    beat.update_failure = update::failure_to_report(state, &saved);
                }
                let silent = saved.in_probation() && fault::active("probation-no-heartbeat");
                if beat.seq.is_multiple_of(CAPABILITY_REFRESH) {
                    beat.capabilities = host::capabilities();
                    tasks.set_capabilities(&beat.capabilities);
                }
                tasks.fill(&mut beat.task_results);
                let mut sent = if silent {
                    Err(Refusal::Failed(Error::Invalid(
                        "fault injected: no heartbeat in probation".into(),
                    )))
                } else {
                    heartbeat::exchange(&mut agent.client, &url, &beat, &mut buffers)
                };
                if sent.is_ok()
                    && beat.update.state == UpdatePhase::Committed
                    && !lost_commit_ack
                    && fault::active("lost-commit-ack")
                {
                    // The server took the heartbeat; its answer is lost.
                    lost_commit_ack = true;
                    sent = Err(Refusal::Failed(Error::Invalid(
                        "fault injected: the answer to the committing heartbeat is lost".into(),
                    )));
                }
                match sent {
                    Ok(answer) => {
                        let failed_before = agent.retry.succeeded();
                        if failed_before > 0 {
                            log::info(
                                "heartbeat accepted again",
                                &[("after_failures", &failed_before)],
                            );
                        }
                        // Delivered: the report goes once, results too.
                        beat.doctor_report = None;
                        // Stored by the server: the failure's log goes once,
                        // and `committed` was seen.
                        let mut delivered = false;
                        if let Some(sent_failure) = beat.update_failure.take() {
                            if let Some(f) = saved.update_failure.as_mut()
                                && f.version == sent_failure.version
                            {
                                f.reported = Some(true);
                            }
                            failure_log_refusals = 0;
                            delivered = true;
                        } else if std::mem::take(&mut failure_log_failed) {
                            failure_log_refusals += 1;
                            if failure_log_refusals >= 3
                                && let Some(f) = saved.update_failure.as_mut()
                            {
                                // Given up; the failure itself stays reported.
                                f.reported = Some(true);
                                failure_log_refusals = 0;
                                delivered = true;
                            }
                        }
                        if beat.update.state == UpdatePhase::Committed
                            && saved.committed.take().is_some()
                        {
                            delivered = true;
                        }
                        tasks.acknowledged();
                        tasks.receive(
                            state,
                            answer.tasks.as_deref().unwrap_or_default(),
                            answer.cancel_tasks.as_deref().unwrap_or_default(),
                        );
                        if let Some(directive) = &answer.doctor {
                            doctor_asked = Some(directive.remediate_dry_run);
                        }
                        let asked = clamp_interval(answer.interval_ms);
                        if asked != agent.interval {
                            log::info(
                                "heartbeat interval changed",
                                &[("interval", &stella_proto::format_duration(asked))],
                            );
                            agent.interval = asked;
                            agent.client = Agent::connect(&agent.ident, asked)?;
                        }
                        // A document that could not be written is reported
                        // (config_error) and written on a later heartbeat.
                        let applied = match &answer.config {
                            Some(doc) => config.apply(state, &mut saved, doc),
                            None => config.retry_pending(state, &mut saved, &answer.config_hash),
                        }
                        .unwrap_or(false);
                        if applied {
                            if !log_level_from_env {
                                log::set_level(config.settings.log_level);
                            }
                            // A shorter doctor interval takes effect now.
                            next_doctor =
                                next_doctor.min(Instant::now() + config.settings.doctor_interval);
                        }
                        if let Some(offer) = &answer.update {
                            updater.offer(state, &mut saved, offer, &config.settings);
                        }
                        let news = answer.config.is_some()
                            || answer.update.is_some()
                            || applied
                            || delivered;
                        record_ack(&mut saved, beat.seq, agent.interval, &answer.server_time);
                        // On probation this acknowledgement may commit the
                        // update (it writes state.json itself) or roll back.
                        Updater::probation_ack(state, &mut saved)?;
                        // Just committed: say so now, not an interval later.
                        let just_committed = saved.committed.is_some()
                            && beat.update.state != UpdatePhase::Committed;
                        if answer.renew {
                            log::info("the server asks for a certificate renewal now", &[]);
                            agent.renew_at = wall_now();
                        }
                        log::debug("heartbeat accepted", &[("seq", &beat.seq)]);
                        // A plain acknowledgement is written at most every two
                        // intervals (doctor allows three): half the writes and
                        // fsyncs on flash. Anything else is written at once.
                        if news || persisted.elapsed() >= agent.interval.mul_f64(1.7) {
                            match state.save_state_with(&saved, &mut save_buffers) {
                                Ok(()) => persisted = Instant::now(),
                                Err(e) => log::warn("could not save state", &[("error", &e)]),
                            }
                        }
                        #[cfg(feature = "bench-alloc")]
                        crate::alloc_count::report_if_asked(beat.seq);
                        if just_committed {
                            Duration::ZERO
                        } else {
                            jittered(agent.interval, 0.1, &agent.rng)
                        }
                    }
                    Err(Refusal::Rejected(message)) => return Err(agent.refused(&message)),
                    Err(Refusal::Deactivated(message)) => {
                        let wait = agent.failed_beat();
                        log::warn(
                            "agent is deactivated; will keep asking",
                            &[
                                ("error", &message),
                                ("retry_in", &stella_proto::format_duration(wait)),
                            ],
                        );
                        wait
                    }
                    Err(Refusal::Failed(error)) => {
                        // A report that did not get through is not retried:
                        // the request stays pending on the server, whose next
                        // answer asks again (a report it refuses cannot block
                        // the heartbeats).
                        beat.doctor_report = None;
                        // The next heartbeat goes without the failure's log: a
                        // server that refuses the log must not stop the
                        // heartbeats. It is tried again after one gets through.
                        failure_log_failed = beat.update_failure.take().is_some();
                        let wait = agent.failed_beat();
                        log::warn(
                            "heartbeat failed",
                            &[
                                ("error", &error),
                                ("failures", &agent.retry.failures),
                                ("retry_in", &stella_proto::format_duration(wait)),
                            ],
                        );
                        wait
                    }
                }
            };
            next_beat = Instant::now() + wait;
        }
        if let Some(dry_run) = doctor_asked.take() {
            // On request, never writing: the plan is described only, whatever
            // `remediation` says (the periodic run below applies `auto`).
            let report = Doctor::new(state).run_all();
            beat.doctor = report.summary();
            let mut upload = crate::doctor::to_upload(&report);
            if dry_run {
                upload.remediation = Some(remediate::dry_run_view(state, &report));
            }
            if miniserde::json::to_string(&upload).len() > MAX_DOCTOR_REPORT {
                upload.remediation = None;
                upload.checks.iter_mut().for_each(|c| c.message.clear());
            }
            log::info(
                "doctor report asked for by the server",
                &[("dry_run", &dry_run)],
            );
            beat.doctor_report = Some(upload);
            next_beat = Instant::now();
        }
        if Instant::now() >= next_doctor {
            let report = Doctor::new(state).run_all();
            beat.doctor = report.summary();
            if beat.doctor.fail > 0 {
                log::warn(
                    "doctor found failures",
                    &[("failing", &beat.doctor.failing.join(","))],
                );
            }
            let mode = config.settings.remediation;
            if mode != Remediation::Off {
                let (renew_now, beat_now) =
                    remediate::in_loop(state, &report, mode == Remediation::Auto);
                if renew_now {
                    agent.renew_at = wall_now();
                }
                if beat_now {
                    next_beat = Instant::now();
                }
            }
            next_doctor = Instant::now() + config.settings.doctor_interval;
        }
        Updater::check_probation_deadline(state, &mut saved)?;
        let step = updater.step(state, &mut saved, &mut agent.client, &agent.ident.server)?;
        if step == Step::Report {
            next_beat = Instant::now();
        }
        let downloading = step != Step::Idle;
        let task_running = tasks.step(state, &mut agent.client, &agent.ident.server);
        if tasks.take_report_now() {
            // A result goes out at once rather than an interval later.
            next_beat = next_beat.min(Instant::now());
        }
        // Sleep until the earliest of the next heartbeat, renewal and doctor
        // run (not at all while a download has more to fetch).
        let until_beat = next_beat.saturating_duration_since(Instant::now());
        let until_renewal = Duration::from_secs(agent.renew_at.saturating_sub(wall_now()));
        let until_doctor = next_doctor.saturating_duration_since(Instant::now());
        let nap = if downloading {
            Duration::ZERO
        } else if task_running {
            until_beat
                .min(until_renewal)
                .min(until_doctor)
                .min(TASK_POLL)
        } else {
            until_beat.min(until_renewal).min(until_doctor)
        };
        if !nap.is_zero() {
            sleep(nap);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeded source of units in [0, 1) (xorshift64*), so a failing case
    /// can be replayed.
    struct Seeded(u64);

    impl Seeded {
        fn unit(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
            (x >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn retries_are_fully_jittered_within_their_window() {
        let interval = Duration::from_secs(30);
        let mut rng = Seeded(0x5EED_0001);
        for failures in 1..=5u32 {
            let window = RetrySchedule::window(interval, failures);
            let waits: Vec<Duration> = (0..2000)
                .map(|_| {
                    let mut s = RetrySchedule {
                        failures: failures - 1,
                    };
                    s.failed(interval, rng.unit())
                })
                .collect();
            assert!(waits.iter().all(|w| *w <= window), "{failures}: {window:?}");
            // Full jitter: the waits cover the whole window, from near 0 to
            // near its end, not a band around it.
            let min = waits.iter().min().copied().unwrap_or_default();
            let max = waits.iter().max().copied().unwrap_or_default();
            assert!(min < window / 50, "{failures}: min {min:?} of {window:?}");
            assert!(
                max > window * 49 / 50,
                "{failures}: max {max:?} of {window:?}"
            );
            // And they are spread evenly: the mean is near the middle.
            let mean = waits.iter().sum::<Duration>() / 2000;
            assert!(
                mean > window * 45 / 100 && mean < window * 55 / 100,
                "{failures}: mean {mean:?} of {window:?}"
            );
        }
    }

    #[test]
    fn a_success_resets_the_schedule() {
        let interval = Duration::from_secs(30);
        let mut s = RetrySchedule::default();
        // The largest unit the source can give, so each wait is its window.
        let top = 1.0 - f64::EPSILON;
        let waits: Vec<u64> = (0..4)
            .map(|_| s.failed(interval, top).as_secs_f64().round() as u64)
            .collect();
        assert_eq!(waits, [30, 60, 120, 120]);
        assert_eq!(s.succeeded(), 4);
        assert_eq!(s.succeeded(), 0);
        assert_eq!(s.failed(interval, top).as_secs_f64().round() as u64, 30);
        assert_eq!(s.failed(interval, 0.0), Duration::ZERO);
    }

    #[test]
    fn renewal_backoff_is_capped_by_the_lifetime() {
        let month = 30 * 86_400;
        let waits: Vec<u64> = (1..=8)
            .map(|n| renewal_backoff(month, n).as_secs())
            .collect();
        assert_eq!(waits, [60, 120, 240, 480, 960, 1920, 3600, 3600]);
        let short: Vec<u64> = (1..=4).map(|n| renewal_backoff(30, n).as_secs()).collect();
        assert_eq!(short, [1, 2, 3, 3]);
    }

    #[test]
    fn jitter_stays_within_its_spread() {
        let rng = SystemRandom::new();
        let base = Duration::from_secs(30);
        for _ in 0..1000 {
            let j = jittered(base, 0.1, &rng);
            assert!(
                j >= Duration::from_secs(27) && j <= Duration::from_secs(33),
                "{j:?}"
            );
        }
    }
}
