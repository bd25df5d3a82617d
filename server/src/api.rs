//! The HTTP API under `/v1/`: routing, authentication of each caller (token
//! for registration, client certificate for agents, bearer token for admins),
//! JSON bodies in and out, `/healthz` and `/metrics`.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use miniserde::json;
use stella_proto::api::{
    ChallengeRequest, ConfigSetRequest, HeartbeatRequest, HeartbeatResponse, RecoverRequest,
    RegisterRequest, RenewRequest, TokenCreateRequest,
};
use stella_proto::time::rfc3339;

use crate::app::{App, Metrics, lock, now_ms};
use crate::error::Error;
use crate::http::{Request, Response};
use crate::lifecycle::{self, Transition};
use crate::records::{DEACTIVATED, HEARTBEAT_TIMEOUT, INACTIVE, REVOKED};
use crate::{releases, renewal, tokens};

/// The agent behind a verified client certificate.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub(crate) agent_id: String,
    /// Hex serial of the presented certificate.
    pub(crate) serial: String,
}

impl Peer {
    /// Reads the agent id (CN, which must equal the `stella://agent/` URI SAN)
    /// and serial from a client certificate that rustls already verified
    /// against our CA.
    pub(crate) fn from_certificate(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
        let sans = cert.subject_alternative_name().ok()??;
        let uri_matches = sans.value.general_names.iter().any(|name| {
            matches!(name, x509_parser::extensions::GeneralName::URI(uri)
                if uri.strip_prefix(stella_proto::AGENT_URI_PREFIX) == Some(cn))
        });
        if !uri_matches || !stella_proto::id::is_agent_id(cn) {
            return None;
        }
        Some(Self {
            agent_id: cn.to_owned(),
            serial: stella_proto::hash::hex(cert.raw_serial()),
        })
    }
}

fn error_status(e: &Error) -> u16 {
    match e {
        Error::Invalid(_) | Error::Usage(_) => 400,
        Error::NotFound(_) => 404,
        Error::Conflict(_) => 409,
        _ => 500,
    }
}

fn error_response(e: &Error) -> Response {
    let status = error_status(e);
    if status == 500 {
        crate::log::warn("request failed", &[("error", e)]);
    }
    Response::error(status, e.to_string())
}

fn parse_json<T: miniserde::Deserialize>(req: &Request) -> Result<T, Response> {
    let is_json = req.content_type.as_deref().is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
    });
    if !is_json {
        return Err(Response::error(
            415,
            "the body must be JSON (Content-Type: application/json)",
        ));
    }
    let text = std::str::from_utf8(&req.body)
        .map_err(|_| Response::error(400, "the body is not UTF-8"))?;
    json::from_str(text).map_err(|_| {
        Response::error(
            400,
            format!("the body is not valid JSON for {} {}", req.method, req.path),
        )
    })
}

/// Answers one request.
pub(crate) async fn handle(
    app: &Arc<App>,
    peer: Option<&Peer>,
    source: IpAddr,
    req: Request,
) -> Response {
    Metrics::bump(&app.metrics.requests);
    let path = req.path.split('?').next().unwrap_or("").to_owned();
    match (req.method.as_str(), path.as_str()) {
        ("GET", "/healthz") => Response::new(200, "text/plain", b"ok\n".to_vec()),
        ("GET", "/metrics") => metrics(app),
        ("POST", "/v1/agents/register") => register(app, &req, source).await,
        ("POST", "/v1/agents/heartbeat") => heartbeat(app, peer, &req).await,
        ("POST", "/v1/agents/certificate") => renew(app, peer, &req).await,
        ("GET", "/v1/agents/self") => whoami(app, peer),
        ("GET", p) if p.starts_with("/v1/releases/") => {
            let parts: Vec<&str> = p["/v1/releases/".len()..].split('/').collect();
            match parts.as_slice() {
                [version, target] => artifact(app, peer, &req, version, target),
                _ => Response::error(404, format!("no such release path {p}")),
            }
        }
        ("POST", "/v1/agents/challenge") => match parse_json::<ChallengeRequest>(&req) {
            Ok(body) => answer(renewal::challenge(app, &body), 200),
            Err(resp) => resp,
        },
        ("POST", "/v1/agents/recover") => match parse_json::<RecoverRequest>(&req) {
            Ok(body) => {
                let app = app.clone();
                answer(
                    smol::unblock(move || renewal::recover(&app, &body)).await,
                    200,
                )
            }
            Err(resp) => resp,
        },
        (_, p) if p.starts_with("/v1/admin/") => match authorize_admin(app, &req) {
            Ok(()) => admin(app, &req, &path).await,
            Err(resp) => resp,
        },
        (
            _,
            "/healthz"
            | "/metrics"
            | "/v1/agents/register"
            | "/v1/agents/heartbeat"
            | "/v1/agents/certificate"
            | "/v1/agents/challenge"
            | "/v1/agents/recover"
            | "/v1/agents/self",
        ) => Response::error(405, format!("{} is not allowed on {path}", req.method)),
        _ => Response::error(404, format!("no such endpoint: {} {path}", req.method)),
    }
}

/// A JSON answer, or the refusal as a JSON error.
fn answer<T: miniserde::Serialize>(
    result: Result<T, crate::app::Refused>,
    status: u16,
) -> Response {
    match result {
        Ok(body) => Response::json(status, json::to_string(&body)),
        Err(refused) => Response::error(refused.status, refused.message),
    }
}

/// The calling agent as the server sees it; changes nothing.
fn whoami(app: &App, peer: Option<&Peer>) -> Response {
    let Some(peer) = peer else {
        return Response::error(
            401,
            "this endpoint needs the agent's client certificate (mTLS)",
        );
    };
    let fleet = lock(&app.fleet);
    let Some(agent) = fleet.agents.get(&peer.agent_id) else {
        return Response::error(
            401,
            format!("agent {} is not known to this server", peer.agent_id),
        );
    };
    let r = &agent.record;
    if r.status == REVOKED || !r.accepts_serial(&peer.serial) {
        return Response::error(
            401,
            format!("agent {} is revoked or its certificate superseded", r.id),
        );
    }
    let now = now_ms();
    let view = stella_proto::api::SelfView {
        agent_id: r.id.clone(),
        status: r.status.clone(),
        reason: r.reason.clone(),
        server_time: rfc3339(now / 1000),
        server_time_ms: now,
    };
    Response::json(200, json::to_string(&view))
}

async fn renew(app: &Arc<App>, peer: Option<&Peer>, req: &Request) -> Response {
    let Some(peer) = peer else {
        return Response::error(
            401,
            "renewal needs the agent's current client certificate (mTLS); an expired agent recovers via /v1/agents/challenge",
        );
    };
    let body: RenewRequest = match parse_json(req) {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    {
        let fleet = lock(&app.fleet);
        match fleet.agents.get(&peer.agent_id) {
            Some(agent) if agent.record.status == REVOKED => {
                return Response::error(
                    401,
                    format!(
                        "agent {} is revoked: enroll the host again with a new token",
                        peer.agent_id
                    ),
                );
            }
            Some(agent) if !agent.record.accepts_serial(&peer.serial) => {
                return Response::error(
                    401,
                    format!(
                        "certificate {} of agent {} has been superseded or revoked",
                        peer.serial, peer.agent_id
                    ),
                );
            }
            Some(_) => {}
            None => {
                return Response::error(
                    401,
                    format!("agent {} is not known to this server", peer.agent_id),
                );
            }
        }
    }
    let app = app.clone();
    let peer = peer.clone();
    answer(
        smol::unblock(move || renewal::renew(&app, &peer, &body)).await,
        200,
    )
}

async fn register(app: &Arc<App>, req: &Request, source: IpAddr) -> Response {
    if let Some(wait) = lock(&app.registration_failures).blocked_for(source, now_ms()) {
        Metrics::bump(&app.metrics.rate_limited);
        let mut resp = Response::error(
            429,
            format!("too many failed registrations from {source}; retry in {wait}s"),
        );
        resp.extra_headers.push(("retry-after", wait.to_string()));
        return resp;
    }
    let body: RegisterRequest = match parse_json(req) {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let app2 = app.clone();
    match smol::unblock(move || tokens::enroll(&app2, body)).await {
        Ok(answer) => Response::json(201, json::to_string(&answer)),
        Err(refused) => {
            if refused.status == 401 {
                lock(&app.registration_failures).record(source, now_ms());
            }
            Response::error(refused.status, refused.message)
        }
    }
}

async fn heartbeat(app: &Arc<App>, peer: Option<&Peer>, req: &Request) -> Response {
    let Some(peer) = peer else {
        return Response::error(401, "heartbeats need the agent's client certificate (mTLS)");
    };
    let body: HeartbeatRequest = match parse_json(req) {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    if body.capabilities.len() > 32
        || body.version.len() > 64
        || body.config_hash.len() > 80
        || body.doctor.failing.len() > 32
    {
        return Response::error(400, "heartbeat fields are over their size limits");
    }
    let (reactivate, retire_previous) = {
        let fleet = lock(&app.fleet);
        let Some(agent) = fleet.agents.get(&peer.agent_id) else {
            return Response::error(
                401,
                format!(
                    "agent {} is not known to this server: enroll it again",
                    peer.agent_id
                ),
            );
        };
        if let Err(resp) = check_current(agent, peer) {
            return resp;
        }
        let r = &agent.record;
        (
            r.status == INACTIVE && r.reason.as_deref() == Some(HEARTBEAT_TIMEOUT),
            r.previous_serial.is_some() && r.cert_serial == peer.serial,
        )
    };
    if reactivate {
        let app2 = app.clone();
        let id = peer.agent_id.clone();
        let changed =
            smol::unblock(move || lifecycle::transition(&app2, &[&id], Transition::HeardFrom));
        if let Err(e) = changed.await {
            return error_response(&e);
        }
    }
    if retire_previous {
        // The agent uses its new certificate: the old one is refused from now on.
        let app2 = app.clone();
        let (id, serial) = (peer.agent_id.clone(), peer.serial.clone());
        let retired = smol::unblock(move || {
            lifecycle::change_agents(&app2, &[&id], "agent.certificate_in_use", |r| {
                let retire = r.cert_serial == serial && r.previous_serial.is_some();
                if retire {
                    r.previous_serial = None;
                }
                Ok(retire)
            })
        });
        if let Err(e) = retired.await {
            return error_response(&e);
        }
    }
    let now = now_ms();
    let answer = {
        let mut fleet = lock(&app.fleet);
        let fleet = &mut *fleet;
        let Some(agent) = fleet.agents.get_mut(&peer.agent_id) else {
            return Response::error(
                401,
                format!("agent {} is not known to this server", peer.agent_id),
            );
        };
        // Re-check: an admin may have acted while we reactivated.
        if let Err(resp) = check_current(agent, peer) {
            return resp;
        }
        let hb = &mut agent.hb;
        hb.last_heartbeat_ms = now;
        hb.seq = body.seq;
        hb.uptime_s = body.uptime_s;
        hb.version = body.version;
        hb.config_hash = body.config_hash;
        hb.config_drift = body.config_drift;
        hb.config_error = body.config_error;
        hb.doctor = body.doctor;
        hb.update_state = body.update.state;
        hb.update_version = body.update.version;
        hb.update_error = body.update.error;
        hb.capabilities = body.capabilities;
        agent.last_seen_ms = now;
        let desired = agent.desired.clone();
        let hb = &mut agent.hb;
        if hb.config_hash == desired.hash && !hb.config_drift {
            hb.drift_since_ms = 0;
        } else if hb.drift_since_ms == 0 {
            hb.drift_since_ms = now;
        }
        // Push the document only when the agent runs another one and has not
        // already refused this one: an in-sync heartbeat carries the hash alone.
        let refused = hb
            .config_error
            .as_ref()
            .is_some_and(|e| e.hash == desired.hash);
        let push = hb.config_hash != desired.hash && !refused;
        let update = offered_release(app, agent);
        let answer = HeartbeatResponse {
            update,
            interval_ms: agent.interval(app.settings.heartbeat_interval).as_millis() as u64,
            server_time: rfc3339(now / 1000),
            renew: agent.record.renew_requested,
            config_hash: desired.hash.clone(),
            config: push.then(|| desired.doc.clone()),
        };
        if !fleet.dirty.contains(&peer.agent_id) {
            fleet.dirty.insert(peer.agent_id.clone());
        }
        answer
    };
    Metrics::bump(&app.metrics.heartbeats);
    Response::json(200, json::to_string(&answer))
}

/// The release to offer an agent now: its direct offer, unless it already
/// runs that version or reported that the update to it failed.
fn offered_release(
    app: &App,
    agent: &lifecycle::LiveAgent,
) -> Option<stella_proto::api::UpdateOffer> {
    let from_rollout;
    let version = match agent.record.update_offer.as_deref() {
        Some(v) => v,
        None => {
            from_rollout = lock(&app.rollouts).offered.get(&agent.record.id).cloned()?;
            from_rollout.as_str()
        }
    };
    let hb = &agent.hb;
    if hb.version == version || (hb.update_state == "failed" && hb.update_version == version) {
        return None;
    }
    releases::offer(app, version, &agent.record.platform.target)
}

/// Serves an agent the artifact of a release for a target, from the blob
/// store, honouring a single `Range: bytes=` request.
fn artifact(
    app: &App,
    peer: Option<&Peer>,
    req: &Request,
    version: &str,
    target: &str,
) -> Response {
    let Some(peer) = peer else {
        return Response::error(
            401,
            "release downloads need the agent's client certificate (mTLS)",
        );
    };
    {
        let fleet = lock(&app.fleet);
        match fleet.agents.get(&peer.agent_id) {
            Some(a) if a.record.status != REVOKED && a.record.accepts_serial(&peer.serial) => {}
            _ => {
                return Response::error(
                    401,
                    format!("agent {} may not download releases", peer.agent_id),
                );
            }
        }
    }
    let Some((path, size)) = releases::artifact(app, version, target) else {
        return Response::error(404, format!("release {version} has no agent for {target}"));
    };
    let (start, end) = match req.range.as_deref().map(|r| parse_range(r, size)) {
        None => (0, size),
        Some(Some(range)) => range,
        Some(None) => {
            let mut resp = Response::error(
                416,
                format!(
                    "range {:?} is outside the {size} bytes",
                    req.range.as_deref().unwrap_or("")
                ),
            );
            resp.extra_headers
                .push(("content-range", format!("bytes */{size}")));
            return resp;
        }
    };
    let mut resp = Response::new(
        if req.range.is_some() { 206 } else { 200 },
        "application/octet-stream",
        Vec::new(),
    );
    resp.file = Some(crate::http::FileBody {
        path,
        start,
        len: end - start,
    });
    resp.extra_headers.push(("accept-ranges", "bytes".into()));
    if req.range.is_some() {
        resp.extra_headers.push((
            "content-range",
            format!("bytes {start}-{}/{size}", end.saturating_sub(1)),
        ));
    }
    resp
}

/// `bytes=START-` or `bytes=START-END` (inclusive) → [start, end) within `size`.
fn parse_range(header: &str, size: u64) -> Option<(u64, u64)> {
    let spec = header.trim().strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end = match b.trim() {
        "" => size,
        e => e.parse::<u64>().ok()?.saturating_add(1).min(size),
    };
    (start < end && start < size).then_some((start, end))
}

/// Refuses a certificate that is not the agent's current one, and agents that
/// may not talk to us.
fn check_current(agent: &lifecycle::LiveAgent, peer: &Peer) -> Result<(), Response> {
    let r = &agent.record;
    if r.status == REVOKED {
        return Err(Response::error(
            401,
            format!(
                "agent {} is revoked: enroll the host again with a new token",
                r.id
            ),
        ));
    }
    if !r.accepts_serial(&peer.serial) {
        return Err(Response::error(
            401,
            format!(
                "certificate {} of agent {} has been superseded or revoked",
                peer.serial, r.id
            ),
        ));
    }
    if r.status == INACTIVE && r.reason.as_deref() == Some(DEACTIVATED) {
        return Err(Response::error(
            403,
            format!("agent {} is deactivated by an administrator", r.id),
        ));
    }
    Ok(())
}

/// Agents per page of `GET /v1/admin/agents`, by default and at most.
const AGENT_PAGE: usize = 1000;
const MAX_AGENT_PAGE: usize = 10_000;

/// The value of `name` in the request's query string (no percent-decoding:
/// our values are ids and label text).
fn query_param(path: &str, name: &str) -> Option<String> {
    let query = path.split_once('?')?.1;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn authorize_admin(app: &App, req: &Request) -> Result<(), Response> {
    let presented = req
        .authorization
        .as_deref()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented else {
        return Err(Response::error(
            401,
            "admin endpoints need Authorization: Bearer <admin token>",
        ));
    };
    let hash = stella_proto::token::hash_secret(presented);
    if stella_proto::token::constant_time_eq(&hash, &app.admin_sha256) {
        Ok(())
    } else {
        Err(Response::error(401, "the admin token is not valid"))
    }
}

async fn admin(app: &Arc<App>, req: &Request, path: &str) -> Response {
    let rest = &path["/v1/admin/".len()..];
    let parts: Vec<&str> = rest.split('/').collect();
    match (req.method.as_str(), parts.as_slice()) {
        ("POST", ["tokens"]) => {
            let body: TokenCreateRequest = match parse_json(req) {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            let app = app.clone();
            let result = smol::unblock(move || {
                tokens::create(
                    &app,
                    Duration::from_millis(body.ttl_ms),
                    body.uses,
                    body.labels,
                )
            })
            .await;
            match result {
                Ok(answer) => Response::json(201, json::to_string(&answer)),
                Err(e) => error_response(&e),
            }
        }
        ("POST", ["config"]) => {
            let body: ConfigSetRequest = match parse_json(req) {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            let app = app.clone();
            match smol::unblock(move || crate::config::set(&app, &body.scope, &body.config)).await {
                Ok(view) => Response::json(200, json::to_string(&view)),
                Err(e) => error_response(&e),
            }
        }
        ("GET", ["config"]) => {
            let agent = query_param(&req.path, "agent");
            match crate::config::show(app, agent.as_deref()) {
                Ok(view) => Response::json(200, json::to_string(&view)),
                Err(e) => error_response(&e),
            }
        }
        ("GET", ["drift"]) => Response::json(200, json::to_string(&crate::config::drift(app))),
        ("POST", ["rollouts"]) => {
            let body: stella_proto::api::RolloutStartRequest = match parse_json(req) {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            let app2 = app.clone();
            let started = smol::unblock(move || {
                crate::rollout::start(
                    &app2,
                    &body.release,
                    &body.stages,
                    Duration::from_millis(body.soak_ms),
                    body.max_failures,
                    body.selector,
                )
            })
            .await;
            match started {
                Ok(rec) => Response::json(
                    201,
                    json::to_string(&crate::rollout::view(app, &rec, false)),
                ),
                Err(e) => error_response(&e),
            }
        }
        ("GET", ["rollouts"]) => {
            let records: Vec<_> = lock(&app.rollouts).records.values().cloned().collect();
            let views: Vec<_> = records
                .iter()
                .map(|r| crate::rollout::view(app, r, false))
                .collect();
            Response::json(200, json::to_string(&views))
        }
        ("GET", ["rollouts", id]) => {
            let rec = lock(&app.rollouts).records.get(*id).cloned();
            match rec {
                Some(rec) => {
                    let members = query_param(&req.path, "members").as_deref() == Some("1");
                    Response::json(
                        200,
                        json::to_string(&crate::rollout::view(app, &rec, members)),
                    )
                }
                None => Response::error(404, format!("no rollout with id {id}")),
            }
        }
        ("POST", ["rollouts", id, action]) => {
            let app2 = app.clone();
            let (id, action) = ((*id).to_owned(), (*action).to_owned());
            match smol::unblock(move || crate::rollout::act(&app2, &id, &action)).await {
                Ok(rec) => Response::json(
                    200,
                    json::to_string(&crate::rollout::view(app, &rec, false)),
                ),
                Err(e) => error_response(&e),
            }
        }
        ("POST", ["releases"]) => {
            let body: stella_proto::api::ReleaseImportRequest = match parse_json(req) {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            let app = app.clone();
            let dir = std::path::PathBuf::from(body.dir);
            match smol::unblock(move || releases::import(&app, &app.data_dir, &dir)).await {
                Ok(view) => Response::json(201, json::to_string(&view)),
                Err(e) => error_response(&e),
            }
        }
        ("GET", ["releases"]) => {
            let list: Vec<_> = lock(&app.releases)
                .by_version
                .values()
                .map(releases::view)
                .collect();
            Response::json(200, json::to_string(&list))
        }
        ("POST", ["agents", id, "update"]) => {
            let body: stella_proto::api::AgentUpdateRequest = match parse_json(req) {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            let target = match lock(&app.fleet).agents.get(*id) {
                Some(live) => live.record.platform.target.clone(),
                None => return Response::error(404, format!("no agent with id {id}")),
            };
            let Some(files) = lock(&app.releases)
                .by_version
                .get(&body.release)
                .map(|r| r.files.clone())
            else {
                return Response::error(
                    404,
                    format!("no release {} has been imported", body.release),
                );
            };
            if !files
                .iter()
                .any(|f| f.name == releases::agent_artifact(&target))
            {
                return Response::error(
                    409,
                    format!(
                        "release {} has no agent for {target} (agent {id}'s target)",
                        body.release
                    ),
                );
            }
            let app2 = app.clone();
            let id = (*id).to_owned();
            let release = body.release;
            let result = smol::unblock(move || {
                lifecycle::change_agents(&app2, &[&id], "agent.update_offered", |r| {
                    if r.status == REVOKED {
                        return Err(Error::Conflict(format!("agent {} is revoked", r.id)));
                    }
                    let changed = r.update_offer.as_deref() != Some(release.as_str());
                    r.update_offer = Some(release.clone());
                    Ok(changed)
                })
            })
            .await;
            match result {
                Ok(records) => match lock(&app.fleet).agents.get(&records[0].id) {
                    Some(live) => Response::json(200, json::to_string(&lifecycle::view(live))),
                    None => Response::error(404, "agent vanished"),
                },
                Err(e) => error_response(&e),
            }
        }
        ("GET", ["agents"]) => {
            // Pages in id order (`?limit=N&after=ID`), so that listing a fleet
            // of 100,000 never holds all of it as views and JSON at once.
            let limit = match query_param(&req.path, "limit").map(|l| l.parse::<usize>()) {
                None => AGENT_PAGE,
                Some(Ok(n)) if (1..=MAX_AGENT_PAGE).contains(&n) => n,
                Some(_) => {
                    return Response::error(400, format!("limit must be 1 to {MAX_AGENT_PAGE}"));
                }
            };
            let after = query_param(&req.path, "after").unwrap_or_default();
            let fleet = lock(&app.fleet);
            let mut ids: Vec<&str> = fleet
                .agents
                .keys()
                .map(String::as_str)
                .filter(|id| *id > after.as_str())
                .collect();
            if ids.len() > limit {
                ids.select_nth_unstable(limit);
                ids.truncate(limit);
            }
            ids.sort_unstable();
            let views: Vec<_> = ids
                .iter()
                .filter_map(|id| fleet.agents.get(*id))
                .map(|a| lifecycle::view(a))
                .collect();
            drop(fleet);
            Response::json(200, json::to_string(&views))
        }
        ("GET", ["agents", id]) => {
            let fleet = lock(&app.fleet);
            match fleet.agents.get(*id) {
                Some(live) => Response::json(200, json::to_string(&lifecycle::view(live))),
                None => Response::error(404, format!("no agent with id {id}")),
            }
        }
        ("POST", ["agents", id, action]) => {
            let transition = match *action {
                "deactivate" => Some(Transition::Deactivate),
                "activate" => Some(Transition::Activate),
                "revoke" => Some(Transition::Revoke),
                "renew" => None,
                other => return Response::error(404, format!("unknown agent action {other:?}")),
            };
            if !stella_proto::id::is_agent_id(id) {
                return Response::error(404, format!("no agent with id {id}"));
            }
            let app2 = app.clone();
            let id = (*id).to_owned();
            let result = smol::unblock(move || match transition {
                Some(t) => lifecycle::transition(&app2, &[&id], t),
                None => lifecycle::change_agents(&app2, &[&id], "agent.renew_requested", |r| {
                    if r.status == REVOKED {
                        return Err(Error::Conflict(format!(
                            "agent {} is revoked: it gets no new certificate",
                            r.id
                        )));
                    }
                    let changed = !r.renew_requested;
                    r.renew_requested = true;
                    Ok(changed)
                }),
            })
            .await;
            match result {
                Ok(_) => {
                    let fleet = lock(&app.fleet);
                    match fleet.agents.get(parts[1]) {
                        Some(live) => Response::json(200, json::to_string(&lifecycle::view(live))),
                        None => Response::error(404, format!("no agent with id {}", parts[1])),
                    }
                }
                Err(e) => error_response(&e),
            }
        }
        _ => Response::error(
            404,
            format!("no such admin endpoint: {} {path}", req.method),
        ),
    }
}

fn metrics(app: &App) -> Response {
    let counts = lock(&app.fleet).count_by_status();
    let m = &app.metrics;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let mut out = String::with_capacity(1024);
    out.push_str("# HELP stella_agents Agents by lifecycle status.\n# TYPE stella_agents gauge\n");
    for (status, n) in counts {
        let _ = writeln!(out, "stella_agents{{status=\"{status}\"}} {n}");
    }
    for (name, help, value) in [
        (
            "stella_enrollments_total",
            "Agents enrolled.",
            load(&m.enrollments),
        ),
        (
            "stella_heartbeats_total",
            "Heartbeats accepted.",
            load(&m.heartbeats),
        ),
        (
            "stella_token_failures_total",
            "Enrollments refused for their token.",
            load(&m.token_failures),
        ),
        (
            "stella_http_requests_total",
            "HTTP requests answered.",
            load(&m.requests),
        ),
        (
            "stella_tls_handshake_failures_total",
            "TLS handshakes that failed.",
            load(&m.tls_failures),
        ),
        (
            "stella_rate_limited_total",
            "Registrations refused with 429 after repeated token failures.",
            load(&m.rate_limited),
        ),
        (
            "stella_connections_refused_total",
            "Connections closed at once: the open-file limit was reached.",
            load(&m.connections_refused),
        ),
        (
            "stella_certificate_renewals_total",
            "Certificates renewed over mTLS.",
            load(&m.renewals),
        ),
        (
            "stella_certificate_recoveries_total",
            "Expired certificates recovered with the old key.",
            load(&m.recoveries),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP stella_start_time_seconds When the server started.\n# TYPE stella_start_time_seconds gauge\nstella_start_time_seconds {}",
        app.started_ms / 1000
    );
    Response::new(200, "text/plain; version=0.0.4", out.into_bytes())
}
