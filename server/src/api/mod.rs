//! The HTTP API under `/v1/`: the route table (each route with how its
//! caller authenticates, the role an admin route needs, and the action its
//! audit line names), the one authentication gate every request passes
//! before its body is read, and thin agent handlers that parse JSON, call
//! `app`, and format the answer. Admin routes are in `admin`, `/metrics` in
//! `metrics`. One admin route streams its body instead of reading it whole:
//! the artifact upload (`upload_artifact`). A refused admin request,
//! enrollment, renewal or recovery leaves an audit line here (a 429 from the
//! brakes does not: they exist to bound what a flood costs).

mod admin;
mod console;
mod metrics;
mod openapi;

use std::net::IpAddr;
use std::sync::Arc;

use miniserde::json;
use stella_proto::api::{
    ChallengeRequest, HeartbeatRequest, RecoverRequest, RegisterRequest, RenewRequest,
};

use crate::app::{App, Metrics};
use crate::audit::Actor;
use crate::error::Error;
use crate::http::{self, Request, Response};
use crate::lifecycle::Act;
use crate::refusal::{Refusal, Why};
use crate::roles::{Caller, Role};
use crate::store::{ChangeKind, StoreError};

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

/// How a route's caller proves who it is, checked before the body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Auth {
    /// Anyone (health, metrics).
    Open,
    /// Registration: the token is in the body (the `tokens` rules check it);
    /// a source with many failed registrations is braked first (429).
    Registration,
    /// Recovery of an expired agent: no certificate, a signed challenge.
    Anonymous,
    /// An agent's client certificate, checked against its status and
    /// current serial for this act.
    Agent(Act),
    /// An admin bearer token with at least this role.
    Admin(Role),
}

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Healthz,
    Metrics,
    Register,
    Heartbeat,
    Certificate,
    WhoAmI,
    Challenge,
    Recover,
    Artifact,
    /// A task artifact (image archive) by sha256, for agents.
    TaskArtifact,
    /// An artifact upload: the body is streamed to the blob store.
    ArtifactUpload,
    /// One of the admin routes listed below (`admin` dispatches it).
    Admin,
    /// A path under `/v1/admin/` that no admin route names: 404, after the
    /// token was checked (an unknown admin path tells a caller without a
    /// token nothing), so that only listed routes reach the admin handlers.
    NoSuchAdmin,
    /// `docs/openapi.json`, embedded at build time.
    OpenApi,
    /// The web console's assets under `/ui/`.
    Console,
    /// `/ui` without its slash: sent to `/ui/`.
    ConsoleRedirect,
}

/// One route: a method and a path. A `{name}` segment matches any one
/// segment; `*` at the end matches any path under it and marks a fallback,
/// taken only when no listed route matches (fallbacks are not documented
/// routes: `docs/openapi.json` lists every other `/v1/` route).
#[derive(Debug)]
struct Route {
    method: Option<&'static str>,
    path: &'static str,
    auth: Auth,
    endpoint: Endpoint,
    /// What the audit line of a refused request names.
    action: &'static str,
}

/// An admin route needing `role`.
const fn admin(
    method: &'static str,
    path: &'static str,
    role: Role,
    action: &'static str,
) -> Route {
    Route {
        method: Some(method),
        path,
        auth: Auth::Admin(role),
        endpoint: Endpoint::Admin,
        action,
    }
}

/// A route table entry that is not an admin route, briefly.
const fn at(
    method: &'static str,
    path: &'static str,
    auth: Auth,
    endpoint: Endpoint,
    action: &'static str,
) -> Route {
    Route {
        method: Some(method),
        path,
        auth,
        endpoint,
        action,
    }
}

/// Every route, with how its caller authenticates. An admin route that is
/// not listed here is not reachable: this table is what `docs/openapi.json`
/// is checked against.
const ROUTES: &[Route] = &[
    at("GET", "/healthz", Auth::Open, Endpoint::Healthz, "healthz"),
    at("GET", "/metrics", Auth::Open, Endpoint::Metrics, "metrics"),
    at(
        "GET",
        "/v1/openapi.json",
        Auth::Open,
        Endpoint::OpenApi,
        "openapi",
    ),
    at(
        "GET",
        "/ui",
        Auth::Open,
        Endpoint::ConsoleRedirect,
        "console",
    ),
    at("GET", "/ui/*", Auth::Open, Endpoint::Console, "console"),
    at(
        "POST",
        "/v1/agents/register",
        Auth::Registration,
        Endpoint::Register,
        "agent.enroll",
    ),
    at(
        "POST",
        "/v1/agents/heartbeat",
        Auth::Agent(Act::Heartbeat),
        Endpoint::Heartbeat,
        "agent.heartbeat",
    ),
    at(
        "POST",
        "/v1/agents/certificate",
        Auth::Agent(Act::Renew),
        Endpoint::Certificate,
        "agent.certificate",
    ),
    at(
        "GET",
        "/v1/agents/self",
        Auth::Agent(Act::WhoAmI),
        Endpoint::WhoAmI,
        "agent.self",
    ),
    at(
        "POST",
        "/v1/agents/challenge",
        Auth::Anonymous,
        Endpoint::Challenge,
        "agent.challenge",
    ),
    at(
        "POST",
        "/v1/agents/recover",
        Auth::Anonymous,
        Endpoint::Recover,
        "agent.recover",
    ),
    at(
        "GET",
        "/v1/releases/{version}/{target}",
        Auth::Agent(Act::Download),
        Endpoint::Artifact,
        "release.download",
    ),
    // Any other path under it: the same gate, then 404 from `artifact`.
    at(
        "GET",
        "/v1/releases/*",
        Auth::Agent(Act::Download),
        Endpoint::Artifact,
        "release.download",
    ),
    at(
        "GET",
        "/v1/artifacts/{sha256}",
        Auth::Agent(Act::Download),
        Endpoint::TaskArtifact,
        "artifact.download",
    ),
    // Streamed to the blob store by `upload_artifact`, never read whole.
    at(
        "POST",
        "/v1/admin/artifacts",
        Auth::Admin(Role::Admin),
        Endpoint::ArtifactUpload,
        "artifact.upload",
    ),
    // Admin routes, each with the role it needs (see `roles::Role`).
    admin("GET", "/v1/admin/fleet", Role::Read, "fleet.show"),
    admin("POST", "/v1/admin/tasks", Role::Operate, "task.create"),
    admin("GET", "/v1/admin/tasks", Role::Read, "tasks.list"),
    admin("GET", "/v1/admin/tasks/{id}", Role::Read, "task.show"),
    admin(
        "POST",
        "/v1/admin/tasks/{id}/cancel",
        Role::Operate,
        "task.cancel",
    ),
    admin("GET", "/v1/admin/whoami", Role::Read, "admin.whoami"),
    admin("GET", "/v1/admin/agents", Role::Read, "agents.list"),
    admin("GET", "/v1/admin/agents/{id}", Role::Read, "agent.show"),
    admin(
        "GET",
        "/v1/admin/agents/{id}/doctor",
        Role::Read,
        "agent.doctor_report",
    ),
    admin(
        "POST",
        "/v1/admin/agents/{id}/deactivate",
        Role::Operate,
        "agent.deactivate",
    ),
    admin(
        "POST",
        "/v1/admin/agents/{id}/activate",
        Role::Operate,
        "agent.activate",
    ),
    admin(
        "POST",
        "/v1/admin/agents/{id}/renew",
        Role::Operate,
        "agent.renew_requested",
    ),
    admin(
        "POST",
        "/v1/admin/agents/{id}/update",
        Role::Operate,
        "agent.update_offered",
    ),
    admin(
        "POST",
        "/v1/admin/agents/{id}/doctor",
        Role::Operate,
        "agent.doctor_requested",
    ),
    admin(
        "POST",
        "/v1/admin/agents/{id}/revoke",
        Role::Admin,
        "agent.revoke",
    ),
    admin(
        "POST",
        "/v1/admin/doctor",
        Role::Operate,
        "agent.doctor_requested",
    ),
    admin(
        "POST",
        "/v1/admin/doctor-report",
        Role::Read,
        "doctor_report.show",
    ),
    admin("GET", "/v1/admin/config", Role::Read, "config.show"),
    admin("POST", "/v1/admin/config", Role::Operate, "config.set"),
    admin("GET", "/v1/admin/drift", Role::Read, "drift.show"),
    admin("GET", "/v1/admin/rollouts", Role::Read, "rollouts.list"),
    admin("POST", "/v1/admin/rollouts", Role::Operate, "rollout.start"),
    admin("GET", "/v1/admin/rollouts/{id}", Role::Read, "rollout.show"),
    admin(
        "POST",
        "/v1/admin/rollouts/{id}/pause",
        Role::Operate,
        "rollout.pause",
    ),
    admin(
        "POST",
        "/v1/admin/rollouts/{id}/resume",
        Role::Operate,
        "rollout.resume",
    ),
    admin(
        "POST",
        "/v1/admin/rollouts/{id}/abort",
        Role::Operate,
        "rollout.abort",
    ),
    admin("GET", "/v1/admin/releases", Role::Read, "releases.list"),
    admin("POST", "/v1/admin/releases", Role::Admin, "release.import"),
    admin("POST", "/v1/admin/tokens", Role::Admin, "token.create"),
    admin("GET", "/v1/admin/audit", Role::Read, "audit.read"),
    admin(
        "GET",
        "/v1/admin/admin-tokens",
        Role::Admin,
        "admin_tokens.list",
    ),
    admin(
        "POST",
        "/v1/admin/admin-tokens",
        Role::Admin,
        "admin_token.create",
    ),
    admin(
        "POST",
        "/v1/admin/admin-tokens/{name}/revoke",
        Role::Admin,
        "admin_token.revoke",
    ),
    admin("POST", "/v1/admin/backup", Role::Admin, "server.backup"),
    // Anything else under /v1/admin/ is answered 404 once authenticated
    // (so that a caller without a token learns nothing of what exists). It
    // needs role admin: an admin route added without its own entry above
    // fails closed, never open to a read token.
    Route {
        method: None,
        path: "/v1/admin/*",
        auth: Auth::Admin(Role::Admin),
        endpoint: Endpoint::NoSuchAdmin,
        action: "admin.unknown",
    },
];

impl Route {
    fn matches_path(&self, path: &str) -> bool {
        if let Some(prefix) = self.path.strip_suffix('*') {
            return path.starts_with(prefix);
        }
        let (mut want, mut got) = (self.path.split('/'), path.split('/'));
        loop {
            match (want.next(), got.next()) {
                (None, None) => return true,
                (Some(w), Some(g)) if w.starts_with('{') && !g.is_empty() => {}
                (Some(w), Some(g)) if w == g => {}
                _ => return false,
            }
        }
    }

    /// A fallback (`*`), taken when no listed route matches.
    fn is_fallback(&self) -> bool {
        self.path.ends_with('*')
    }

    /// What the request acts on: the path's first `{name}` segment.
    fn target(&self, path: &str) -> String {
        self.path
            .split('/')
            .zip(path.split('/'))
            .find(|(w, _)| w.starts_with('{'))
            .map(|(_, g)| g.to_owned())
            .unwrap_or_default()
    }
}

/// The route for a request: 404 for an unknown path, 405 for a known exact
/// path with another method.
fn route(method: &str, path: &str) -> Result<&'static Route, Refusal> {
    let mut other_method = false;
    for r in ROUTES.iter().filter(|r| r.matches_path(path)) {
        if r.method.is_none_or(|m| m == method) {
            return Ok(r);
        }
        // Paths with parameters and fallbacks answer 404 for another
        // method, as they always did (only exact paths say 405).
        other_method |= !r.is_fallback() && !r.path.contains('{');
    }
    Err(if other_method {
        Refusal::new(
            Why::MethodNotAllowed,
            format!("{method} is not allowed on {path}"),
        )
    } else {
        Refusal::not_found(format!("no such endpoint: {method} {path}"))
    })
}

/// A request whose route and caller passed the gate; its body may be read.
#[derive(Debug)]
pub(crate) struct Admitted {
    route: &'static Route,
    /// The admin token that called (admin routes).
    caller: Option<Caller>,
}

impl Admitted {
    /// Whether the body is streamed (`upload_artifact`) rather than read
    /// whole under the request body limit.
    pub(crate) fn streams_body(&self) -> bool {
        self.route.endpoint == Endpoint::ArtifactUpload
    }

    /// Who calls, from `source`, for the audit log.
    pub(crate) fn actor(&self, source: IpAddr) -> Actor {
        let name = self.caller.as_ref().map(|c| c.name.clone());
        Actor::new(name.unwrap_or_default(), source)
    }
}

/// The authentication gate: finds the request's route and authenticates its
/// caller from the head alone (client certificate, bearer token and its
/// role, source), so that a caller who fails gets 401/403 whatever the body,
/// its type or its size. Every request passes here before its body is read.
pub(crate) fn admit(
    app: &Arc<App>,
    peer: Option<&Peer>,
    source: IpAddr,
    head: &Request,
) -> Result<Admitted, Response> {
    Metrics::bump(&app.metrics.requests);
    let path = http::path_of(&head.path);
    let refused_here = |r: Refusal| {
        let mut resp = refused(r);
        if path == "/ui" || path.starts_with("/ui/") {
            console::protect(&mut resp);
        }
        resp
    };
    let route = route(&head.method, path).map_err(refused_here)?;
    match authenticate(app, route, peer, source, head) {
        Ok(caller) => Ok(Admitted { route, caller }),
        Err((refusal, caller)) => {
            if matches!(route.auth, Auth::Admin(_))
                && refusal.why == Why::Unauthorized
                && caller.is_none()
            {
                app.share_failure(ChangeKind::AdminFailure, source);
            }
            let audited = matches!(route.auth, Auth::Admin(_) | Auth::Agent(Act::Renew));
            if audited && refusal.why != Why::TooManyRequests {
                // Off the async threads, and not waited for: the caller's
                // answer does not depend on it.
                let name = caller
                    .map(|c| c.name)
                    .or_else(|| peer.map(|p| p.agent_id.clone()));
                let actor = Actor::new(name.unwrap_or_default(), source);
                let (app, target, status) = (app.clone(), route.target(path), refusal.status());
                let detail = refusal.message.clone();
                smol::unblock(move || {
                    app.audit_unchanged(&actor, status, route.action, &target, &detail)
                })
                .detach();
            }
            Err(refused_here(refusal))
        }
    }
}

/// The caller of `route`: the admin token for admin routes (`None` for the
/// others). A refusal comes with the admin token when it was valid but its
/// role too small.
fn authenticate(
    app: &App,
    route: &Route,
    peer: Option<&Peer>,
    source: IpAddr,
    head: &Request,
) -> Result<Option<Caller>, (Refusal, Option<Caller>)> {
    match route.auth {
        Auth::Open | Auth::Anonymous => Ok(None),
        Auth::Registration => app
            .check_registration_rate(source)
            .map(|()| None)
            .map_err(|r| (r, None)),
        Auth::Admin(needed) => {
            let caller = app
                .check_admin_from(source, head.authorization.as_deref())
                .map_err(|r| (r, None))?;
            let what = format!("{} {}", head.method, route.path);
            match crate::roles::require(&caller, needed, &what) {
                Ok(()) => Ok(Some(caller)),
                Err(r) => Err((r, Some(caller))),
            }
        }
        Auth::Agent(act) => {
            let Some(peer) = peer else {
                return Err((
                    Refusal::unauthorized(match act {
                        Act::Heartbeat => "heartbeats need the agent's client certificate (mTLS)",
                        Act::Renew => {
                            "renewal needs the agent's current client certificate (mTLS); an expired agent recovers via /v1/agents/challenge"
                        }
                        Act::Download => {
                            "release downloads need the agent's client certificate (mTLS)"
                        }
                        Act::WhoAmI => "this endpoint needs the agent's client certificate (mTLS)",
                    }),
                    None,
                ));
            };
            app.check_agent(&peer.agent_id, &peer.serial, act)
                .map(|()| None)
                .map_err(|r| (r, None))
        }
    }
}

/// The answer to a refusal: its status and `{"error": "..."}`.
fn refused(r: Refusal) -> Response {
    let mut resp = Response::error(r.status(), r.message);
    if let Some(wait) = r.retry_after {
        resp.extra_headers.push(("retry-after", wait.to_string()));
    }
    resp
}

/// The answer to a failure: a refusal as such, a store that cannot write
/// now as 503 (nothing was changed; try again), anything else as 500.
fn failed(e: Error) -> Response {
    match e {
        Error::Refused(r) => refused(r),
        Error::Store(e @ StoreError::Unavailable { .. }) => {
            crate::log::warn("request failed", &[("error", &e)]);
            let mut resp = Response::error(503, e.to_string());
            resp.extra_headers.push(("retry-after", "5".to_owned()));
            resp
        }
        // A blob that could not be written for lack of space: the same.
        Error::Io { ref source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
            crate::log::warn("request failed", &[("error", &e)]);
            let mut resp = Response::error(503, e.to_string());
            resp.extra_headers.push(("retry-after", "5".to_owned()));
            resp
        }
        other => {
            crate::log::warn("request failed", &[("error", &other)]);
            Response::error(500, other.to_string())
        }
    }
}

/// A JSON answer with `status`, or the failure.
fn answer<T: miniserde::Serialize, E: Into<Error>>(result: Result<T, E>, status: u16) -> Response {
    match result {
        Ok(body) => Response::json(status, json::to_string(&body)),
        Err(e) => failed(e.into()),
    }
}

/// Runs blocking work (signing, durable writes) off the async threads, by
/// `actor`: the audit lines it writes name them.
async fn blocking<T: Send + 'static>(
    app: &Arc<App>,
    actor: &Actor,
    work: impl FnOnce(&App) -> T + Send + 'static,
) -> T {
    let (app, actor) = (app.clone(), actor.clone());
    smol::unblock(move || crate::audit::acting_as(&actor, || work(&app))).await
}

/// Answers an admitted request from the connection's `peer`.
pub(crate) async fn handle(
    app: &Arc<App>,
    admitted: Admitted,
    peer: Option<&Peer>,
    source: IpAddr,
    req: Request,
) -> Response {
    let route = admitted.route;
    let path = http::path_of(&req.path);
    if let Some(caller) = &admitted.caller {
        let actor = Actor::new(caller.name.clone(), source);
        let resp = if route.endpoint == Endpoint::NoSuchAdmin {
            refused(Refusal::not_found(format!(
                "no such admin endpoint: {} {path}",
                req.method
            )))
        } else {
            admin::admin(app, &req, caller, &actor).await
        };
        if resp.status >= 400 {
            let (target, detail) = (route.target(path), error_text(&resp));
            let (status, by) = (resp.status, actor.clone());
            blocking(app, &actor, move |app| {
                app.audit_unchanged(&by, status, route.action, &target, &detail)
            })
            .await;
        }
        return resp;
    }
    match (route.endpoint, peer) {
        (Endpoint::Healthz, _) => healthz(app),
        (Endpoint::Metrics, _) => metrics::metrics(app),
        (Endpoint::Register, _) => {
            let body = parse_json::<RegisterRequest>(&req);
            // The token's id names what a refused enrollment tried.
            let token_id = body.as_ref().ok().and_then(|b| {
                let id = b.token.split('.').next()?;
                stella_proto::token::is_token_id(id).then(|| id.to_owned())
            });
            let resp = match body {
                Ok(body) => answer(
                    blocking(app, &Actor::new("", source), move |app| {
                        app.enroll(body, source)
                    })
                    .await,
                    201,
                ),
                Err(r) => refused(r),
            };
            audit_refused(app, &resp, Actor::new("", source), route, token_id).await;
            resp
        }
        (Endpoint::Heartbeat, Some(peer)) => match parse_json::<HeartbeatRequest>(&req) {
            Ok(body) => answer(app.heartbeat(&peer.agent_id, &peer.serial, body).await, 200),
            Err(r) => refused(r),
        },
        (Endpoint::Certificate, Some(peer)) => {
            let actor = Actor::new(peer.agent_id.clone(), source);
            let resp = match parse_json::<RenewRequest>(&req) {
                Ok(body) => {
                    let peer = peer.clone();
                    answer(
                        blocking(app, &actor, move |app| {
                            app.renew(&peer.agent_id, &peer.serial, &body)
                        })
                        .await,
                        200,
                    )
                }
                Err(r) => refused(r),
            };
            let target = Some(peer.agent_id.clone());
            audit_refused(app, &resp, actor, route, target).await;
            resp
        }
        (Endpoint::WhoAmI, Some(peer)) => answer(app.self_view(&peer.agent_id), 200),
        (Endpoint::Challenge, _) => match parse_json::<ChallengeRequest>(&req) {
            Ok(body) => answer(app.challenge(&body), 200),
            Err(r) => refused(r),
        },
        (Endpoint::Recover, _) => {
            let body = parse_json::<RecoverRequest>(&req);
            // The agent id is the one claimed: the line of a refusal shows
            // who tried to be whom.
            let claimed = body
                .as_ref()
                .ok()
                .map(|b| b.agent_id.chars().take(64).collect::<String>());
            let actor = Actor::new(claimed.clone().unwrap_or_default(), source);
            let resp = match body {
                Ok(body) => answer(
                    blocking(app, &actor, move |app| app.recover(&body)).await,
                    200,
                ),
                Err(r) => refused(r),
            };
            audit_refused(app, &resp, actor, route, claimed).await;
            resp
        }
        (Endpoint::Artifact, Some(peer)) => {
            artifact(app, &Actor::new(peer.agent_id.clone(), source), &req).await
        }
        (Endpoint::TaskArtifact, Some(peer)) => {
            task_artifact(app, &Actor::new(peer.agent_id.clone(), source), &req).await
        }
        // Streamed by `upload_artifact`; never read whole.
        (Endpoint::ArtifactUpload, _) => refused(Refusal::bad_request(
            "artifact uploads are streamed, not read whole",
        )),
        (Endpoint::OpenApi, _) => openapi::document(),
        (Endpoint::Console, _) => console::asset(http::path_of(&req.path)),
        (Endpoint::ConsoleRedirect, _) => console::redirect(),
        // The gate admits admin routes only with a caller.
        (Endpoint::Admin | Endpoint::NoSuchAdmin, _) => refused(Refusal::unauthorized(
            "admin endpoints need Authorization: Bearer <admin token>",
        )),
        // The gate admits agent endpoints only with a peer.
        (
            Endpoint::Heartbeat
            | Endpoint::Certificate
            | Endpoint::WhoAmI
            | Endpoint::Artifact
            | Endpoint::TaskArtifact,
            None,
        ) => refused(Refusal::unauthorized(
            "this endpoint needs the agent's client certificate (mTLS)",
        )),
    }
}

/// The `error` of a JSON error answer.
fn error_text(resp: &Response) -> String {
    std::str::from_utf8(&resp.body)
        .ok()
        .and_then(|t| json::from_str::<stella_proto::api::ErrorBody>(t).ok())
        .map(|b| b.error)
        .unwrap_or_default()
}

/// Leaves the audit line of a refused (4xx but 429) or failed agent act.
async fn audit_refused(
    app: &Arc<App>,
    resp: &Response,
    actor: Actor,
    route: &'static Route,
    target: Option<String>,
) {
    if resp.status < 400 || resp.status == 429 {
        return;
    }
    let (status, detail) = (resp.status, error_text(resp));
    let (target, by) = (target.unwrap_or_default(), actor.clone());
    blocking(app, &actor, move |app| {
        app.audit_unchanged(&by, status, route.action, &target, &detail)
    })
    .await;
}

/// `ok`, or 503 with the reason while the store cannot write.
fn healthz(app: &App) -> Response {
    match app.store.health().unwritable {
        None => Response::new(200, "text/plain", b"ok\n".to_vec()),
        Some(why) => Response::new(
            503,
            "text/plain",
            format!("store unwritable: {why}\n").into_bytes(),
        ),
    }
}

/// Serves an agent the artifact of a release for a target, from the blob
/// store, honouring a single `Range: bytes=` request.
async fn artifact(app: &Arc<App>, actor: &Actor, req: &Request) -> Response {
    let path = http::path_of(&req.path);
    let parts: Vec<&str> = path["/v1/releases/".len()..].split('/').collect();
    let [version, target] = parts.as_slice() else {
        return refused(Refusal::not_found(format!("no such release path {path}")));
    };
    let Some(sha256) = app.artifact(version, target) else {
        return refused(Refusal::not_found(format!(
            "release {version} has no agent for {target}"
        )));
    };
    let missing = format!("release {version}'s agent for {target} (blob {sha256}) is not stored");
    serve_blob(app, actor, req, sha256, missing).await
}

/// Serves an agent a task artifact by its sha256, from the blob store, with
/// Range as for releases.
async fn task_artifact(app: &Arc<App>, actor: &Actor, req: &Request) -> Response {
    let path = http::path_of(&req.path);
    let sha256 = path["/v1/artifacts/".len()..].to_owned();
    let missing = format!("no artifact {sha256}");
    serve_blob(app, actor, req, sha256, missing).await
}

/// Serves blob `sha256` from the local file, filled from the store first
/// when this server has none (PostgreSQL: another server stored it).
async fn serve_blob(
    app: &Arc<App>,
    actor: &Actor,
    req: &Request,
    sha256: String,
    missing: String,
) -> Response {
    let found = match app.cached_blob(&sha256) {
        Some(found) => Ok(Some(found)),
        None => blocking(app, actor, move |app| app.local_blob(&sha256)).await,
    };
    match found {
        Ok(Some((file, size))) => serve_file(req, file, size),
        Ok(None) => refused(Refusal::not_found(missing)),
        Err(e) => failed(e),
    }
}

/// Answers with `file` (`size` bytes), or the one range `Range: bytes=` asks.
fn serve_file(req: &Request, file: std::path::PathBuf, size: u64) -> Response {
    let (start, end) = match req.range.as_deref().map(|r| http::parse_range(r, size)) {
        None => (0, size),
        Some(Some(range)) => range,
        Some(None) => {
            let mut resp = refused(Refusal::new(
                Why::RangeNotSatisfiable,
                format!(
                    "range {:?} is outside the {size} bytes",
                    req.range.as_deref().unwrap_or("")
                ),
            ));
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
    resp.file = Some(http::FileBody {
        path: file,
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

/// `POST /v1/admin/artifacts` (admitted as admin): streams the body into
/// a blob file, hashing it while written, hands it to the store (with
/// PostgreSQL, into the database, so that every server serves it), and only
/// then answers its sha256. Task archives and `release import`'s files.
/// Returns the answer, and whether the whole body was read (else the
/// connection must close).
pub(crate) async fn upload_artifact<S: smol::io::AsyncRead + Unpin>(
    app: &Arc<App>,
    actor: &Actor,
    stream: &mut S,
    buf: &mut Vec<u8>,
    head: http::Head,
) -> (Response, bool) {
    if head.body_len == 0 {
        let whole = http::skip_body(stream, buf, &head).await.is_ok();
        return (
            refused(Refusal::bad_request(
                "the artifact is empty: send its bytes as the body",
            )),
            whole,
        );
    }
    let mut writer = match blocking(app, actor, |app| {
        crate::blobs::BlobWriter::create(&app.data_dir)
            .map_err(|e| Error::io("cannot store the artifact", e))
    })
    .await
    {
        Ok(w) => w,
        Err(e) => return (failed(e), false),
    };
    let mut write_error = None;
    let streamed = http::stream_body(
        stream,
        buf,
        head,
        crate::tasks::MAX_ARTIFACT_BYTES,
        app.settings.request_timeout,
        &mut |piece| {
            writer.write(piece).map_err(|e| {
                let kind = e.kind();
                write_error = Some(e);
                std::io::Error::from(kind)
            })
        },
    )
    .await;
    match streamed {
        Ok(_) => {}
        Err(http::ReadError::Reject(resp)) => return (resp, false),
        Err(http::ReadError::Timeout) => {
            return (Response::error(408, "the artifact stopped arriving"), false);
        }
        Err(http::ReadError::Closed | http::ReadError::Io(_)) => {
            let resp = match write_error {
                Some(e) => failed(Error::io("cannot write the artifact", e)),
                None => Response::error(400, "the artifact upload was cut short"),
            };
            return (resp, false);
        }
    }
    let stored = blocking(app, actor, move |app| {
        let (sha256, size) = writer
            .finish()
            .map_err(|e| Error::io("cannot store the artifact", e))?;
        // In the store before the answer: any server serves it then.
        app.store_blob(&sha256, size)?;
        let line = crate::audit::line(
            crate::app::now_secs(),
            "artifact.upload",
            &sha256,
            &format!("size={size}"),
        );
        app.store.append_audit(&line)?;
        Ok::<_, Error>((sha256, size))
    })
    .await;
    match stored {
        Ok((sha256, size)) => {
            crate::log::info("artifact stored", &[("sha256", &sha256), ("size", &size)]);
            let body = stella_proto::api::ArtifactCreated { sha256, size };
            (Response::json(201, json::to_string(&body)), true)
        }
        Err(e) => (failed(e), true),
    }
}

/// The body of a JSON request as it is (a signed envelope must reach the
/// store byte for byte), after the same Content-Type check as `parse_json`.
fn json_body(req: &Request) -> Result<&[u8], Refusal> {
    check_json_type(req)?;
    Ok(&req.body)
}

fn check_json_type(req: &Request) -> Result<(), Refusal> {
    let is_json = req.content_type.as_deref().is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
    });
    if !is_json {
        return Err(Refusal::new(
            Why::UnsupportedMediaType,
            "the body must be JSON (Content-Type: application/json)",
        ));
    }
    Ok(())
}

fn parse_json<T: miniserde::Deserialize>(req: &Request) -> Result<T, Refusal> {
    check_json_type(req)?;
    let text = std::str::from_utf8(&req.body)
        .map_err(|e| Refusal::bad_request(format!("the body is not UTF-8: {e}")))?;
    // miniserde's error carries no detail: the message names the request.
    json::from_str(text).map_err(|_| {
        Refusal::bad_request(format!(
            "the body is not valid JSON for {} {}",
            req.method,
            http::path_of(&req.path)
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::app::{AgentAction, lock};

    #[test]
    fn every_route_is_found_with_its_auth() {
        let cases = [
            ("GET", "/healthz", Ok(Auth::Open)),
            ("GET", "/metrics", Ok(Auth::Open)),
            ("POST", "/v1/agents/register", Ok(Auth::Registration)),
            (
                "POST",
                "/v1/agents/heartbeat",
                Ok(Auth::Agent(Act::Heartbeat)),
            ),
            (
                "POST",
                "/v1/agents/certificate",
                Ok(Auth::Agent(Act::Renew)),
            ),
            ("GET", "/v1/agents/self", Ok(Auth::Agent(Act::WhoAmI))),
            ("POST", "/v1/agents/challenge", Ok(Auth::Anonymous)),
            ("POST", "/v1/agents/recover", Ok(Auth::Anonymous)),
            (
                "GET",
                "/v1/releases/1.0.0/t",
                Ok(Auth::Agent(Act::Download)),
            ),
            ("DELETE", "/v1/admin/anything", Ok(Auth::Admin(Role::Admin))),
            ("GET", "/v1/admin/whoami", Ok(Auth::Admin(Role::Read))),
            ("GET", "/v1/admin/audit", Ok(Auth::Admin(Role::Read))),
            ("GET", "/v1/admin/agents/agt_x", Ok(Auth::Admin(Role::Read))),
            (
                "POST",
                "/v1/admin/agents/agt_x/deactivate",
                Ok(Auth::Admin(Role::Operate)),
            ),
            (
                "POST",
                "/v1/admin/agents/agt_x/revoke",
                Ok(Auth::Admin(Role::Admin)),
            ),
            ("POST", "/v1/admin/config", Ok(Auth::Admin(Role::Operate))),
            (
                "POST",
                "/v1/admin/rollouts/r1/abort",
                Ok(Auth::Admin(Role::Operate)),
            ),
            ("POST", "/v1/admin/releases", Ok(Auth::Admin(Role::Admin))),
            ("POST", "/v1/admin/tokens", Ok(Auth::Admin(Role::Admin))),
            (
                "POST",
                "/v1/admin/admin-tokens",
                Ok(Auth::Admin(Role::Admin)),
            ),
            (
                "GET",
                "/v1/admin/admin-tokens",
                Ok(Auth::Admin(Role::Admin)),
            ),
            ("POST", "/v1/admin/backup", Ok(Auth::Admin(Role::Admin))),
            // An empty segment is no id: the catch-all answers (404).
            (
                "POST",
                "/v1/admin/agents//revoke",
                Ok(Auth::Admin(Role::Admin)),
            ),
            // Not in the table: needs admin (fails closed).
            (
                "GET",
                "/v1/admin/agents/agt_x/bogus",
                Ok(Auth::Admin(Role::Admin)),
            ),
            ("POST", "/v1/admin/artifacts", Ok(Auth::Admin(Role::Admin))),
            ("POST", "/v1/admin/tasks", Ok(Auth::Admin(Role::Operate))),
            ("GET", "/v1/admin/tasks/abc", Ok(Auth::Admin(Role::Read))),
            ("GET", "/v1/artifacts/ab", Ok(Auth::Agent(Act::Download))),
            ("POST", "/v1/artifacts/ab", Err(404)),
            ("GET", "/v1/admin/fleet", Ok(Auth::Admin(Role::Read))),
            ("GET", "/v1/openapi.json", Ok(Auth::Open)),
            ("GET", "/ui/", Ok(Auth::Open)),
            ("GET", "/ui/console.js", Ok(Auth::Open)),
            ("GET", "/ui", Ok(Auth::Open)),
            ("POST", "/ui/", Err(404)),
            ("POST", "/v1/openapi.json", Err(405)),
            ("GET", "/v1/agents/heartbeat", Err(405)),
            ("POST", "/healthz", Err(405)),
            ("POST", "/v1/releases/1.0.0/t", Err(404)),
            ("GET", "/v1/nothing", Err(404)),
            ("GET", "/", Err(404)),
        ];
        for (method, path, want) in cases {
            let got = route(method, path).map(|r| r.auth).map_err(|e| e.status());
            assert_eq!(got, want, "{method} {path}");
        }
    }

    #[test]
    fn only_listed_admin_routes_reach_the_admin_handlers() {
        let endpoint = |method, path| route(method, path).map(|r| r.endpoint);
        assert_eq!(endpoint("GET", "/v1/admin/agents"), Ok(Endpoint::Admin));
        assert_eq!(
            endpoint("POST", "/v1/admin/agents/agt_x/revoke"),
            Ok(Endpoint::Admin)
        );
        for (method, path) in [
            ("POST", "/v1/admin/agents/agt_x/explode"),
            ("GET", "/v1/admin/agents/agt_x/revoke"),
            ("POST", "/v1/admin/agents//revoke"),
            ("GET", "/v1/admin/nothing"),
            ("GET", "/v1/admin/../agents/self"),
        ] {
            assert_eq!(
                endpoint(method, path),
                Ok(Endpoint::NoSuchAdmin),
                "{method} {path}"
            );
        }
    }

    /// A running server's state over a fresh data dir, without sockets.
    fn app(name: &str) -> (Arc<App>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("stella-api-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        crate::ca::init(&dir, &["localhost".into()], crate::app::now_secs()).unwrap();
        let ca = crate::ca::Ca::load(&dir).unwrap();
        let admin = stella_proto::hash::hex(&stella_proto::token::hash_secret("admin-secret"));
        let store = crate::store::RedbStore::create(&dir.join("server.redb"), &admin).unwrap();
        let settings = crate::app::Settings {
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_misses: 3,
            cert_lifetime: Duration::from_secs(86_400),
            expired_grace: Duration::from_secs(86_400),
            update_probation: Duration::from_secs(60),
            flush_every: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(90),
            request_timeout: Duration::from_secs(10),
            max_handshakes: 16,
        };
        let app = App::load(settings, Box::new(store), ca, dir.clone(), 100).unwrap();
        (Arc::new(app), dir)
    }

    fn enroll(app: &App, token: &str, name: &str) -> Peer {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let body = format!(
            r#"{{"token":"{token}","csr":{},"name":"{name}","platform":{{"os":"linux","arch":"x86_64","target":"t"}},"version":"1","capabilities":[]}}"#,
            json::to_string(&csr)
        );
        let req: RegisterRequest = json::from_str(&body).unwrap();
        let answer = app.enroll(req, IpAddr::from([127, 0, 0, 1])).unwrap();
        let serial = lock(&app.fleet).agents[&answer.agent_id]
            .record
            .cert_serial
            .clone();
        Peer {
            agent_id: answer.agent_id,
            serial,
        }
    }

    fn status(
        app: &Arc<App>,
        peer: Option<&Peer>,
        method: &str,
        path: &str,
        auth: Option<&str>,
    ) -> u16 {
        // Whatever the body would be: the gate sees the head only.
        let head = Request {
            method: method.into(),
            path: path.into(),
            authorization: auth.map(str::to_owned),
            ..Request::default()
        };
        match admit(app, peer, IpAddr::from([127, 0, 0, 1]), &head) {
            Ok(_) => 200,
            Err(resp) => resp.status,
        }
    }

    #[test]
    fn the_gate_decides_on_the_head_alone() {
        let (app, dir) = app("gate");
        let token = app
            .create_token(Duration::from_secs(60), 3, Default::default())
            .unwrap()
            .token;
        let good = enroll(&app, &token, "good");
        let revoked = enroll(&app, &token, "revoked");
        let paused = enroll(&app, &token, "paused");
        app.act_on_agent(
            &revoked.agent_id,
            AgentAction::Transition(crate::lifecycle::Transition::Revoke),
        )
        .unwrap();
        app.act_on_agent(
            &paused.agent_id,
            AgentAction::Transition(crate::lifecycle::Transition::Deactivate),
        )
        .unwrap();
        let superseded = Peer {
            agent_id: good.agent_id.clone(),
            serial: "0badc0de".into(),
        };
        let unknown = Peer {
            agent_id: stella_proto::id::agent_id_from_bytes([9; 16]),
            serial: good.serial.clone(),
        };
        let agent_routes = [
            ("POST", "/v1/agents/heartbeat"),
            ("POST", "/v1/agents/certificate"),
            ("GET", "/v1/agents/self"),
            ("GET", "/v1/releases/1.0.0/t"),
            ("GET", "/v1/artifacts/00"),
        ];
        for (method, path) in agent_routes {
            assert_eq!(status(&app, Some(&good), method, path, None), 200, "{path}");
            for (who, peer) in [
                ("revoked", Some(&revoked)),
                ("superseded", Some(&superseded)),
                ("unknown", Some(&unknown)),
                ("no certificate", None),
            ] {
                assert_eq!(
                    status(&app, peer, method, path, None),
                    401,
                    "{who} on {path}"
                );
            }
        }
        assert_eq!(
            status(&app, Some(&paused), "POST", "/v1/agents/heartbeat", None),
            403
        );
        assert_eq!(
            status(&app, Some(&paused), "POST", "/v1/agents/certificate", None),
            200,
            "a deactivated agent may renew"
        );
        for auth in [None, Some("Bearer wrong"), Some("admin-secret")] {
            assert_eq!(
                status(&app, None, "POST", "/v1/admin/tokens", auth),
                401,
                "{auth:?}"
            );
        }
        assert_eq!(
            status(
                &app,
                Some(&good),
                "POST",
                "/v1/admin/tokens",
                Some("Bearer admin-secret")
            ),
            200
        );
        // The store's one admin token hash became root, role admin.
        let root = &app.admin_token_views()[0];
        assert_eq!((root.name.as_str(), root.role.as_str()), ("root", "admin"));
        // Scoped tokens: the role is checked at the gate too.
        let viewer = app
            .create_admin_token("viewer", "read", None)
            .unwrap()
            .token;
        let viewer = format!("Bearer {viewer}");
        let viewer = Some(viewer.as_str());
        assert_eq!(status(&app, None, "GET", "/v1/admin/agents", viewer), 200);
        assert_eq!(
            status(&app, None, "POST", "/v1/admin/agents/agt_x/revoke", viewer),
            403
        );
        assert_eq!(status(&app, None, "POST", "/v1/admin/config", viewer), 403);
        app.revoke_admin_token("viewer").unwrap();
        assert_eq!(status(&app, None, "GET", "/v1/admin/agents", viewer), 401);
        for (method, path) in [
            ("POST", "/v1/agents/register"),
            ("POST", "/v1/agents/challenge"),
            ("POST", "/v1/agents/recover"),
            ("GET", "/healthz"),
        ] {
            assert_eq!(
                status(&app, None, method, path, None),
                200,
                "{path} is open"
            );
        }
        drop(app);
        let _ = std::fs::remove_dir_all(dir);
    }
}
