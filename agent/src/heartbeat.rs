//! One heartbeat exchange (docs/design.md section 4): the body this agent sends
//! as of its saved state, the POST over the kept mTLS connection with the
//! buffers reused from beat to beat, and what the answer means (accepted,
//! deactivated, revoked, or a failure to retry). The scheduler that repeats
//! it is `run`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use miniserde::json;
use stella_proto::api::{HeartbeatRequest, HeartbeatResponse};

use crate::config::ConfigState;
use crate::error::Error;
use crate::identity::Identity;
use crate::state::{StateDir, StateFile};
use crate::update::Updater;
use crate::{host, log, transport};

/// The interval before the server has asked for one.
pub(crate) const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
const MIN_INTERVAL: Duration = Duration::from_millis(100);
const MAX_INTERVAL: Duration = Duration::from_secs(86_400);

/// Why one heartbeat did not get through.
pub(crate) enum Refusal {
    /// 403: an administrator deactivated us. Keep trying, slowly.
    Deactivated(String),
    /// 401: revoked, superseded or unknown. Stop.
    Rejected(String),
    /// Network trouble, server errors, garbage answers: retry with backoff.
    Failed(Error),
}

/// The interval the server asked for, within sane bounds.
pub(crate) fn clamp_interval(ms: u64) -> Duration {
    Duration::from_millis(ms).clamp(MIN_INTERVAL, MAX_INTERVAL)
}

pub(crate) fn wall_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The heartbeat URL, checked once.
pub(crate) fn heartbeat_url(server: &str) -> Result<String, Error> {
    let url = format!("{server}/v1/agents/heartbeat");
    crate::tls::host_port(&url).map_err(|e| {
        Error::malformed(
            format!("server URL {server:?} in agent.json is not a URL"),
            e,
        )
    })?;
    Ok(url)
}

/// Buffers reused by every heartbeat.
#[derive(Debug, Default)]
pub(crate) struct Buffers {
    body: String,
    answer: String,
    /// The decoded answer; a plain acknowledgement reuses its strings.
    ack: HeartbeatResponse,
}

/// Sends `beat` and reads what the server makes of it.
pub(crate) fn exchange<'b>(
    client: &mut transport::Client,
    url: &str,
    beat: &HeartbeatRequest,
    buf: &'b mut Buffers,
) -> Result<&'b HeartbeatResponse, Refusal> {
    beat.write_json(&mut buf.body);
    // A keep-alive connection the server closed fails once; a fresh one is
    // tried at once before this counts as a failure.
    let status = match transport::post_json_into(client, url, &buf.body, &mut buf.answer) {
        Ok(status) => status,
        Err(first) => {
            log::debug(
                "heartbeat failed, retrying on a new connection",
                &[("error", &first)],
            );
            transport::post_json_into(client, url, &buf.body, &mut buf.answer)
                .map_err(|e| Refusal::Failed(Error::network(format!("POST {url}"), e)))?
        }
    };
    let text = &buf.answer;
    match status {
        // miniserde's error is a unit struct: there is no detail to keep.
        200 if buf.ack.read_plain_ack(text) => Ok(&buf.ack),
        200 => match json::from_str(text) {
            Ok(ack) => {
                buf.ack = ack;
                Ok(&buf.ack)
            }
            // miniserde's error is a unit struct: there is no detail to keep.
            Err(miniserde::Error) => Err(Refusal::Failed(Error::Invalid(
                "the heartbeat answer is not valid JSON".into(),
            ))),
        },
        401 => Err(Refusal::Rejected(transport::error_message(text))),
        403 => Err(Refusal::Deactivated(transport::error_message(text))),
        other => Err(Refusal::Failed(Error::Invalid(format!(
            "server answered {other}: {}",
            transport::error_message(text)
        )))),
    }
}

/// A heartbeat body for this agent, as of its saved state.
pub(crate) fn new_beat(
    saved: &StateFile,
    config: &ConfigState,
    updater: &Updater,
) -> HeartbeatRequest {
    HeartbeatRequest {
        seq: saved.heartbeat_seq,
        version: host::VERSION.to_owned(),
        uptime_s: 0,
        config_hash: config.hash.clone(),
        config_drift: false,
        config_error: None,
        doctor: Default::default(),
        update: updater.report(saved),
        capabilities: host::capabilities(),
        doctor_report: None,
        update_failure: None,
    }
}

/// Records an acknowledged heartbeat in the saved state.
pub(crate) fn record_ack(saved: &mut StateFile, seq: u64, interval: Duration, server_time: &str) {
    stella_proto::time::write_rfc3339(saved.last_heartbeat.get_or_insert_default(), wall_now());
    saved.heartbeat_seq = seq;
    saved.heartbeat_interval_ms = interval.as_millis() as u64;
    // The previous allocation is reused.
    let kept = saved.server_time.get_or_insert_default();
    kept.clear();
    kept.push_str(server_time);
}

/// Sends one heartbeat now, outside the run loop (remediation); returns its
/// sequence number.
pub(crate) fn send_one(state: &StateDir) -> Result<u64, Error> {
    let ident = Identity::load(state)?;
    let mut saved = state.state_file();
    let config = ConfigState::load(&saved);
    let mut client = transport::http_client(
        &ident.ca_der,
        Some((&ident.cert_der, &ident.key_pem)),
        Duration::from_secs(30),
    )?;
    let mut beat = new_beat(&saved, &config, &Updater::default());
    beat.seq += 1;
    beat.config_drift = config.drift;
    let url = heartbeat_url(&ident.server)?;
    match exchange(&mut client, &url, &beat, &mut Buffers::default()) {
        Ok(answer) => {
            let interval = clamp_interval(answer.interval_ms);
            record_ack(&mut saved, beat.seq, interval, &answer.server_time);
            state.save_state(&saved)?;
            Ok(beat.seq)
        }
        Err(Refusal::Rejected(m) | Refusal::Deactivated(m)) => Err(Error::Network {
            context: m,
            source: None,
        }),
        Err(Refusal::Failed(e)) => Err(e),
    }
}
