//! The closed-loop load: N simulated agents, each on its own mTLS keep-alive
//! connection with its own certificate, sending heartbeats (or, as the
//! baseline, `GET /healthz`) back to back for a fixed window, timing each.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use miniserde::json;
use stella_proto::api::{DoctorSummary, HeartbeatRequest, HeartbeatResponse, UpdateReport};

use crate::enroll::Enrolled;
use crate::http::{self, Conn};
use crate::tls::Target;

/// What each request of a round is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Heartbeat,
    Healthz,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Heartbeat => "heartbeat",
            Kind::Healthz => "healthz",
        }
    }
}

/// One simulated agent's connection and heartbeat state.
pub(crate) struct Simulated {
    conn: Conn,
    seq: u64,
    /// The heartbeat body after `{"seq":N`.
    body_tail: String,
    request: Vec<u8>,
    body: Vec<u8>,
    checked: bool,
}

impl Simulated {
    fn heartbeat_request(&mut self) {
        use std::io::Write;
        self.seq += 1;
        self.body.clear();
        let _ = write!(self.body, "{{\"seq\":{}{}", self.seq, self.body_tail);
        self.request.clear();
        http::request(
            &mut self.request,
            "POST",
            "/v1/agents/heartbeat",
            None,
            Some(&self.body),
        );
    }
}

/// The heartbeat an idle, healthy agent sends (what `stella-agent run` sends
/// between config changes), without its leading `{"seq":0`.
fn body_tail(config_hash: &str) -> String {
    let beat = HeartbeatRequest {
        seq: 0,
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_s: 3600,
        config_hash: config_hash.to_owned(),
        config_drift: false,
        config_error: None,
        doctor: DoctorSummary {
            pass: 9,
            warn: 1,
            fail: 0,
            skip: 1,
            failing: Vec::new(),
        },
        update: UpdateReport {
            state: stella_proto::states::UpdatePhase::Idle,
            version: env!("CARGO_PKG_VERSION").into(),
            error: None,
            bytes: None,
            total: None,
        },
        capabilities: vec!["systemd".into()],
        doctor_report: None,
        update_failure: None,
    };
    let text = json::to_string(&beat);
    text.strip_prefix("{\"seq\":0")
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("HeartbeatRequest JSON no longer starts with seq: {text}"))
}

/// Opened connections and what it took.
pub(crate) struct Opened {
    pub(crate) sims: Vec<Simulated>,
    pub(crate) elapsed: Duration,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
}

/// Opens one mTLS connection per agent, `parallel` handshakes at a time.
pub(crate) async fn open(
    target: &Arc<Target>,
    agents: &[Enrolled],
    parallel: usize,
) -> Result<Opened, String> {
    let mut jobs = Vec::with_capacity(agents.len());
    for a in agents {
        jobs.push((
            target.config(Some((&a.cert_der, &a.key_der)))?,
            body_tail(&a.config_hash),
        ));
    }
    let started = Instant::now();
    let queue = Arc::new(std::sync::Mutex::new(jobs));
    let workers: Vec<_> = (0..parallel.max(1))
        .map(|_| {
            let (target, queue) = (target.clone(), queue.clone());
            crate::EX.spawn(async move {
                let mut sims = Vec::new();
                let mut errors = 0u64;
                let mut first_error = None;
                loop {
                    let job = queue.lock().unwrap_or_else(|p| p.into_inner()).pop();
                    let Some((config, body_tail)) = job else {
                        break;
                    };
                    match target.connect(config).await {
                        Ok(tls) => sims.push(Simulated {
                            conn: Conn::new(tls),
                            seq: 0,
                            body_tail,
                            request: Vec::with_capacity(1024),
                            body: Vec::with_capacity(512),
                            checked: false,
                        }),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
                (sims, errors, first_error)
            })
        })
        .collect();
    let mut out = Opened {
        sims: Vec::with_capacity(agents.len()),
        elapsed: Duration::ZERO,
        errors: 0,
        first_error: None,
    };
    for w in workers {
        let (sims, errors, first) = w.await;
        out.sims.extend(sims);
        out.errors += errors;
        if out.first_error.is_none() {
            out.first_error = first;
        }
    }
    out.elapsed = started.elapsed();
    Ok(out)
}

/// What one round measured.
pub(crate) struct Round {
    /// Responses with the expected status inside the window.
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) window: Duration,
    pub(crate) latencies_us: Vec<u32>,
}

/// Runs every connection in a closed loop: `warmup` unrecorded, then
/// `window` recorded. Connections that fail are dropped.
pub(crate) async fn round(
    sims: Vec<Simulated>,
    kind: Kind,
    warmup: Duration,
    window: Duration,
) -> (Vec<Simulated>, Round) {
    let stop = Arc::new(AtomicBool::new(false));
    let recording = Arc::new(AtomicBool::new(false));
    let mut healthz = Vec::new();
    http::request(&mut healthz, "GET", "/healthz", None, None);
    let healthz: Arc<[u8]> = healthz.into();
    let tasks: Vec<_> = sims
        .into_iter()
        .map(|mut sim| {
            let (stop, recording, healthz) = (stop.clone(), recording.clone(), healthz.clone());
            crate::EX.spawn(async move {
                let mut ok = 0u64;
                let mut errors = 0u64;
                let mut first_error = None;
                let mut latencies = Vec::new();
                let mut alive = true;
                while !stop.load(Ordering::Relaxed) {
                    if kind == Kind::Heartbeat {
                        sim.heartbeat_request();
                    }
                    let req: &[u8] = match kind {
                        Kind::Heartbeat => &sim.request,
                        Kind::Healthz => &healthz,
                    };
                    let t0 = Instant::now();
                    let answer = sim.conn.exchange(req).await;
                    let us = t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                    let rec = recording.load(Ordering::Relaxed);
                    match answer {
                        Ok((200, body)) => {
                            // Check the first answer of each connection fully.
                            if kind == Kind::Heartbeat && !sim.checked {
                                let parsed = std::str::from_utf8(body)
                                    .ok()
                                    .and_then(|t| json::from_str::<HeartbeatResponse>(t).ok());
                                if parsed.is_none() {
                                    errors += 1;
                                    first_error.get_or_insert_with(|| {
                                        "unparsable heartbeat answer".to_owned()
                                    });
                                }
                                sim.checked = true;
                            }
                            if rec {
                                ok += 1;
                                latencies.push(us);
                            }
                        }
                        Ok((status, body)) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| {
                                format!("status {status}: {}", String::from_utf8_lossy(body))
                            });
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| e.to_string());
                            alive = false;
                            break;
                        }
                    }
                }
                (alive.then_some(sim), ok, errors, first_error, latencies)
            })
        })
        .collect();
    smol::Timer::after(warmup).await;
    recording.store(true, Ordering::Relaxed);
    let started = Instant::now();
    smol::Timer::after(window).await;
    recording.store(false, Ordering::Relaxed);
    let measured = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut kept = Vec::with_capacity(tasks.len());
    let mut out = Round {
        ok: 0,
        errors: 0,
        first_error: None,
        window: measured,
        latencies_us: Vec::new(),
    };
    for t in tasks {
        let (sim, ok, errors, first, lat) = t.await;
        kept.extend(sim);
        out.ok += ok;
        out.errors += errors;
        if out.first_error.is_none() {
            out.first_error = first;
        }
        out.latencies_us.extend(lat);
    }
    (kept, out)
}
