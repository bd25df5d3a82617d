//! `stella-agent run`: the single-threaded heartbeat loop over one mTLS
//! keep-alive connection, with jitter, capped exponential backoff, and the
//! lifecycle answers (403 deactivated: back off and keep trying; 401 revoked:
//! stop with exit code 3).

use std::thread::sleep;
use std::time::{Duration, Instant};

use miniserde::json;
use ring::rand::{SecureRandom, SystemRandom};
use stella_proto::api::{ErrorBody, HeartbeatRequest, HeartbeatResponse, UpdateReport};

use crate::error::Error;
use crate::identity::{self, Identity};
use crate::state::StateDir;
use crate::{host, log};

const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
const MIN_INTERVAL: Duration = Duration::from_millis(100);
const MAX_INTERVAL: Duration = Duration::from_secs(86_400);
/// Longest answer we read from the server.
const MAX_ANSWER_BYTES: u64 = 64 * 1024;
/// Re-detect capabilities every this many heartbeats.
const CAPABILITY_REFRESH: u64 = 20;

/// Why one heartbeat did not get through.
enum Refusal {
    /// 403: an administrator deactivated us. Keep trying, slowly.
    Deactivated(String),
    /// 401: revoked, superseded or unknown. Stop.
    Rejected(String),
    /// Network trouble, server errors, garbage answers: retry with backoff.
    Failed(String),
}

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

/// The wait after `failures` consecutive failures: 1×, 2×, 4× the interval,
/// never more than 4×.
fn backoff(interval: Duration, failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(2);
    interval * factor
}

fn send(client: &ureq::Agent, url: &str, body: &str) -> Result<(u16, String), String> {
    let mut resp = client
        .post(url)
        .content_type("application/json")
        .send(body)
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER_BYTES)
        .read_to_string()
        .map_err(|e| e.to_string())?;
    Ok((status, text))
}

fn heartbeat_once(
    client: &ureq::Agent,
    url: &str,
    body: &str,
) -> Result<HeartbeatResponse, Refusal> {
    // A keep-alive connection the server closed fails once; a fresh one is
    // tried at once before this counts as a failure.
    let (status, text) = match send(client, url, body) {
        Ok(answer) => answer,
        Err(first) => {
            log::debug(
                "heartbeat failed, retrying on a new connection",
                &[("error", &first)],
            );
            send(client, url, body).map_err(Refusal::Failed)?
        }
    };
    let message =
        || json::from_str::<ErrorBody>(&text).map_or_else(|_| text.trim().to_owned(), |b| b.error);
    match status {
        200 => json::from_str(&text)
            .map_err(|_| Refusal::Failed("the heartbeat answer is not valid JSON".into())),
        401 => Err(Refusal::Rejected(message())),
        403 => Err(Refusal::Deactivated(message())),
        other => Err(Refusal::Failed(format!(
            "server answered {other}: {}",
            message()
        ))),
    }
}

/// Runs until revoked (Err(Revoked)) or killed.
pub(crate) fn run(state: &StateDir) -> Result<(), Error> {
    let ident = Identity::load(state)?;
    let rng = SystemRandom::new();
    let started = Instant::now();
    let mut saved = state.state_file();
    let mut interval = match saved.heartbeat_interval_ms {
        0 => DEFAULT_INTERVAL,
        ms => Duration::from_millis(ms).clamp(MIN_INTERVAL, MAX_INTERVAL),
    };
    let idle = |i: Duration| (i * 3).max(Duration::from_secs(60));
    let mut client = identity::http_client(
        &ident.ca_der,
        Some((&ident.cert_der, &ident.key_pem)),
        idle(interval),
    )?;
    let url = format!("{}/v1/agents/heartbeat", ident.server);
    let mut beat = HeartbeatRequest {
        seq: saved.heartbeat_seq,
        version: host::VERSION.to_owned(),
        uptime_s: 0,
        config_hash: String::new(),
        config_drift: false,
        doctor: Default::default(),
        update: UpdateReport {
            state: "idle".to_owned(),
            version: host::VERSION.to_owned(),
        },
        capabilities: host::capabilities(),
    };
    log::info(
        "agent running",
        &[
            ("agent", &ident.id),
            ("server", &ident.server),
            ("version", &host::VERSION),
            (
                "cert_not_after",
                &stella_proto::time::rfc3339(ident.cert.not_after),
            ),
        ],
    );
    let mut failures: u32 = 0;
    loop {
        beat.seq += 1;
        beat.uptime_s = started.elapsed().as_secs();
        if beat.seq.is_multiple_of(CAPABILITY_REFRESH) {
            beat.capabilities = host::capabilities();
        }
        let wait = match heartbeat_once(&client, &url, &json::to_string(&beat)) {
            Ok(answer) => {
                if failures > 0 {
                    log::info("heartbeat accepted again", &[("after_failures", &failures)]);
                }
                failures = 0;
                let asked =
                    Duration::from_millis(answer.interval_ms).clamp(MIN_INTERVAL, MAX_INTERVAL);
                if asked != interval {
                    log::info(
                        "heartbeat interval changed",
                        &[("interval", &stella_proto::format_duration(asked))],
                    );
                    interval = asked;
                    client = identity::http_client(
                        &ident.ca_der,
                        Some((&ident.cert_der, &ident.key_pem)),
                        idle(interval),
                    )?;
                }
                log::debug("heartbeat accepted", &[("seq", &beat.seq)]);
                saved.last_heartbeat = Some(stella_proto::time::rfc3339(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                ));
                saved.heartbeat_seq = beat.seq;
                saved.heartbeat_interval_ms = interval.as_millis() as u64;
                saved.server_time = Some(answer.server_time);
                if let Err(e) = state.save_state(&saved) {
                    log::warn("could not save state", &[("error", &e)]);
                }
                jittered(interval, 0.1, &rng)
            }
            Err(Refusal::Rejected(message)) => {
                log::error(
                    "the server no longer accepts this agent; enroll this host again",
                    &[("agent", &ident.id), ("error", &message)],
                );
                return Err(Error::Revoked(format!(
                    "{} refused agent {}: {message}",
                    ident.server, ident.id
                )));
            }
            Err(Refusal::Deactivated(message)) => {
                failures += 1;
                let wait = jittered(backoff(interval, failures), 0.1, &rng);
                log::warn(
                    "agent is deactivated; will keep asking",
                    &[
                        ("error", &message),
                        ("retry_in", &stella_proto::format_duration(wait)),
                    ],
                );
                wait
            }
            Err(Refusal::Failed(message)) => {
                failures += 1;
                let wait = jittered(backoff(interval, failures), 0.1, &rng);
                log::warn(
                    "heartbeat failed",
                    &[
                        ("error", &message),
                        ("failures", &failures),
                        ("retry_in", &stella_proto::format_duration(wait)),
                    ],
                );
                wait
            }
        };
        sleep(wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_four_intervals() {
        let i = Duration::from_secs(30);
        let waits: Vec<u64> = (1..=6).map(|n| backoff(i, n).as_secs()).collect();
        assert_eq!(waits, [30, 60, 120, 120, 120, 120]);
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
