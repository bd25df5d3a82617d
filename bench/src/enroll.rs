//! Enrollment of simulated agents: key pairs and CSRs made ahead of the clock,
//! then `POST /v1/agents/register` over K keep-alive connections (no client
//! certificate; the token authenticates), timing each answer.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use miniserde::json;
use stella_proto::api::{Platform, RegisterRequest, RegisterResponse};

use crate::http::{self, Conn};
use crate::tls::Target;

/// An enrollment ready to send.
pub(crate) struct Pending {
    key_der: Vec<u8>,
    request: Vec<u8>,
}

/// An enrolled simulated agent.
pub(crate) struct Enrolled {
    pub(crate) cert_der: Vec<u8>,
    pub(crate) key_der: Vec<u8>,
    pub(crate) config_hash: String,
}

/// What an enrollment run did.
#[derive(Default)]
pub(crate) struct Outcome {
    pub(crate) enrolled: Vec<Enrolled>,
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) elapsed: Duration,
    /// Microseconds per enrollment, request sent to answer read.
    pub(crate) latencies_us: Vec<u32>,
}

fn one(token: &str, index: usize) -> Result<Pending, String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("key generation: {e}"))?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .and_then(|csr| csr.pem())
        .map_err(|e| format!("CSR: {e}"))?;
    let body = RegisterRequest {
        token: token.to_owned(),
        csr,
        name: format!("bench-{index:06}"),
        platform: Platform {
            os: "linux".into(),
            arch: "x86_64".into(),
            target: "x86_64-unknown-linux-musl".into(),
        },
        version: env!("CARGO_PKG_VERSION").into(),
        capabilities: vec!["systemd".into()],
        labels: None,
    };
    let mut request = Vec::with_capacity(1024);
    let body = json::to_string(&body);
    http::request(
        &mut request,
        "POST",
        "/v1/agents/register",
        None,
        Some(body.as_bytes()),
    );
    Ok(Pending {
        key_der: key.serialize_der(),
        request,
    })
}

/// Makes `count` key pairs and requests (numbered from `first`) on `threads`
/// OS threads.
pub(crate) fn prepare(
    token: &str,
    first: usize,
    count: usize,
    threads: usize,
) -> Result<Vec<Pending>, String> {
    let threads = threads.clamp(1, 16);
    let per = count.div_ceil(threads).max(1);
    let parts: Vec<Result<Vec<Pending>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..count)
            .step_by(per)
            .map(|start| {
                let end = (start + per).min(count);
                s.spawn(move || (start..end).map(|i| one(token, first + i)).collect())
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a CSR thread panicked".into()))
            })
            .collect()
    });
    let mut out = Vec::with_capacity(count);
    for part in parts {
        out.extend(part?);
    }
    Ok(out)
}

/// Sends every pending enrollment over `concurrency` connections; keeps the
/// issued identities when `keep`.
pub(crate) async fn run(
    target: &Arc<Target>,
    pending: Vec<Pending>,
    concurrency: usize,
    keep: bool,
) -> Result<Outcome, String> {
    let config = target.config(None)?;
    let queue = Arc::new(Mutex::new(pending));
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (target, config, queue, outcome) = (
                target.clone(),
                config.clone(),
                queue.clone(),
                outcome.clone(),
            );
            crate::EX.spawn(async move {
                let mut conn: Option<Conn> = None;
                loop {
                    let Some(job) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                        break;
                    };
                    if conn.is_none() {
                        match target.connect(config.clone()).await {
                            Ok(tls) => conn = Some(Conn::new(tls)),
                            Err(e) => {
                                record_error(&outcome, format!("connect: {e}"));
                                continue;
                            }
                        }
                    }
                    let Some(c) = conn.as_mut() else { continue };
                    let t0 = Instant::now();
                    let answer = c.exchange(&job.request).await;
                    let us = t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                    match answer {
                        Ok((201, body)) => {
                            let parsed = std::str::from_utf8(body)
                                .ok()
                                .and_then(|t| json::from_str::<RegisterResponse>(t).ok());
                            let Some(resp) = parsed else {
                                record_error(&outcome, "unparsable registration answer".into());
                                continue;
                            };
                            let cert_der = if keep {
                                match stella_proto::pem::decode("CERTIFICATE", &resp.certificate) {
                                    Ok(der) => der,
                                    Err(e) => {
                                        record_error(&outcome, format!("issued certificate: {e}"));
                                        continue;
                                    }
                                }
                            } else {
                                Vec::new()
                            };
                            let mut o = outcome.lock().unwrap_or_else(|p| p.into_inner());
                            o.ok += 1;
                            o.latencies_us.push(us);
                            if keep {
                                o.enrolled.push(Enrolled {
                                    cert_der,
                                    key_der: job.key_der,
                                    config_hash: resp.config_hash,
                                });
                            }
                        }
                        Ok((status, body)) => {
                            let text = String::from_utf8_lossy(body).into_owned();
                            record_error(&outcome, format!("status {status}: {text}"));
                        }
                        Err(e) => {
                            conn = None;
                            record_error(&outcome, format!("exchange: {e}"));
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await;
    }
    let mut o = std::mem::take(&mut *outcome.lock().unwrap_or_else(|p| p.into_inner()));
    o.elapsed = started.elapsed();
    Ok(o)
}

fn record_error(outcome: &Mutex<Outcome>, message: String) {
    let mut o = outcome.lock().unwrap_or_else(|p| p.into_inner());
    o.errors += 1;
    if o.first_error.is_none() {
        eprintln!("stella-loadgen: enrollment error: {message}");
        o.first_error = Some(message);
    }
}
