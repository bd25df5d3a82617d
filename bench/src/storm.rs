//! The reconnect storm: every enrolled simulated agent reconnects at the same
//! instant (a server back from an outage), each with its own mTLS handshake
//! and one heartbeat, retrying a failed attempt the way `stella-agent run`
//! does (capped exponential backoff with full jitter, agent/src/run.rs
//! `RetrySchedule`). Measures the time until every agent has a heartbeat
//! acknowledged, and handshakes per second.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use smol::future::FutureExt;

use crate::enroll::Enrolled;
use crate::http::{self, Conn};
use crate::tls::Target;

/// One attempt (connect, handshake, heartbeat) gives up after this long, as
/// the agent's transport does.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Per-second buckets kept for the rates.
const BUCKETS: usize = 1800;

/// A small per-agent random source (xorshift64*): units in [0, 1).
struct Jitter(u64);

impl Jitter {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What the storm measured.
#[derive(Default)]
pub(crate) struct Outcome {
    pub(crate) agents: usize,
    /// Agents with an acknowledged heartbeat.
    pub(crate) acked: usize,
    /// From the start to the last acknowledgement.
    pub(crate) all_acked: Duration,
    /// Seconds from the start to each agent's acknowledgement.
    pub(crate) ack_secs: Vec<f64>,
    pub(crate) attempts: u64,
    pub(crate) handshakes: u64,
    /// Attempts that failed: closed by the server before or during the
    /// handshake (shed), timed out, or anything else.
    pub(crate) closed: u64,
    pub(crate) timed_out: u64,
    pub(crate) other_errors: u64,
    pub(crate) first_error: Option<String>,
    /// Completed handshakes in the busiest second.
    pub(crate) peak_handshakes_per_s: u64,
    /// Most retries one agent needed.
    pub(crate) max_failures: u32,
}

enum Failure {
    Closed(String),
    TimedOut,
    Other(String),
}

/// One attempt: a new connection, its handshake, one heartbeat.
async fn attempt(
    target: &Target,
    config: Arc<rustls::ClientConfig>,
    request: &[u8],
    handshakes: &[AtomicU64],
    started: Instant,
) -> Result<Conn, Failure> {
    let work = async {
        let tls = target.connect(config).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionAborted => Failure::Closed(e.to_string()),
            _ => Failure::Other(format!("connect: {e}")),
        })?;
        let second = (started.elapsed().as_secs() as usize).min(BUCKETS - 1);
        handshakes[second].fetch_add(1, Ordering::Relaxed);
        let mut conn = Conn::new(tls);
        match conn.exchange(request).await {
            Ok((200, _)) => Ok(conn),
            Ok((status, body)) => Err(Failure::Other(format!(
                "status {status}: {}",
                String::from_utf8_lossy(body)
            ))),
            Err(e) => Err(Failure::Closed(format!("heartbeat: {e}"))),
        }
    };
    let timeout = async {
        smol::Timer::after(ATTEMPT_TIMEOUT).await;
        Err(Failure::TimedOut)
    };
    work.or(timeout).await
}

/// Runs the storm: all of `agents` at once, retrying with the agent's
/// schedule for `interval`, until every one is acknowledged or `deadline`.
pub(crate) async fn run(
    target: &Arc<Target>,
    agents: &[Enrolled],
    interval: Duration,
    deadline: Duration,
    seed: u64,
) -> Result<Outcome, String> {
    let mut jobs = Vec::with_capacity(agents.len());
    for a in agents {
        let config = target.config(Some((&a.cert_der, &a.key_der)))?;
        let body = format!("{{\"seq\":1{}", crate::load::body_tail(&a.config_hash));
        let mut request = Vec::with_capacity(1024);
        http::request(
            &mut request,
            "POST",
            "/v1/agents/heartbeat",
            None,
            Some(body.as_bytes()),
        );
        jobs.push((config, request));
    }
    let handshakes: Arc<[AtomicU64]> = (0..BUCKETS).map(|_| AtomicU64::new(0)).collect();
    let outcome = Arc::new(Mutex::new(Outcome {
        agents: agents.len(),
        ..Outcome::default()
    }));
    // Connections of acknowledged agents stay open, as the agents' do.
    let kept = Arc::new(Mutex::new(Vec::with_capacity(agents.len())));
    let started = Instant::now();
    let tasks: Vec<_> = jobs
        .into_iter()
        .enumerate()
        .map(|(i, (config, request))| {
            let (target, handshakes, outcome, kept) = (
                target.clone(),
                handshakes.clone(),
                outcome.clone(),
                kept.clone(),
            );
            let mut jitter = Jitter(seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            crate::EX.spawn(async move {
                let mut failures = 0u32;
                loop {
                    let result =
                        attempt(&target, config.clone(), &request, &handshakes, started).await;
                    let acked = {
                        let mut o = outcome.lock().unwrap_or_else(|p| p.into_inner());
                        o.attempts += 1;
                        match result {
                            Ok(conn) => {
                                let at = started.elapsed();
                                o.acked += 1;
                                o.all_acked = o.all_acked.max(at);
                                o.ack_secs.push(at.as_secs_f64());
                                o.max_failures = o.max_failures.max(failures);
                                Some(conn)
                            }
                            Err(failure) => {
                                let message = match failure {
                                    Failure::Closed(m) => {
                                        o.closed += 1;
                                        m
                                    }
                                    Failure::TimedOut => {
                                        o.timed_out += 1;
                                        "attempt timed out".to_owned()
                                    }
                                    Failure::Other(m) => {
                                        o.other_errors += 1;
                                        m
                                    }
                                };
                                o.first_error.get_or_insert(message);
                                None
                            }
                        }
                    };
                    if let Some(conn) = acked {
                        kept.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
                        return;
                    }
                    failures += 1;
                    let wait = stella_proto::backoff::retry_window(interval, failures)
                        .mul_f64(jitter.unit());
                    if started.elapsed() + wait > deadline {
                        return;
                    }
                    smol::Timer::after(wait).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await;
    }
    let mut o = std::mem::take(&mut *outcome.lock().unwrap_or_else(|p| p.into_inner()));
    o.handshakes = handshakes.iter().map(|b| b.load(Ordering::Relaxed)).sum();
    o.peak_handshakes_per_s = handshakes
        .iter()
        .map(|b| b.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0);
    o.ack_secs.sort_by(f64::total_cmp);
    drop(kept);
    Ok(o)
}
