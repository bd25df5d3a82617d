//! Admin routes under `/v1/admin/` (the gate checked the bearer token and
//! its role): parse, call `app`, format.

use std::sync::Arc;
use std::time::Duration;

use miniserde::json;
use stella_proto::api::{
    AgentUpdateRequest, ConfigSetRequest, DoctorAsk, DoctorAsked, Labels, ReleaseImportRequest,
    RolloutStartRequest, TokenCreateRequest,
};
use stella_proto::states::AgentStatus;

use stella_proto::admin::{AdminTokenCreateRequest, BackupRequest, WhoAmI};

use super::{blocking, failed, json_body, parse_json};
use crate::app::{AgentAction, AgentFilter, App};
use crate::audit::{self, Actor};
use crate::error::Error;
use crate::http::{self, Request, Response};
use crate::refusal::Refusal;
use crate::roles::Caller;
use crate::rollout::StartRequest;

/// Agents per page of `GET /v1/admin/agents`, by default and at most.
const AGENT_PAGE: usize = 1000;
const MAX_AGENT_PAGE: usize = 10_000;

/// A query parameter, percent-decoded; a broken encoding is refused.
fn query(req: &Request, name: &str) -> Result<Option<String>, Refusal> {
    http::query_param(&req.path, name).map_err(Refusal::bad_request)
}

/// The filter of `GET /v1/admin/agents`: `status`, `label=K=V[,K=V...]`,
/// `version`, `target`, `name` (part of the name or id).
fn agent_filter(req: &Request) -> Result<AgentFilter, Refusal> {
    let status = match query(req, "status")?.filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(AgentStatus::parse(&s).ok_or_else(|| {
            Refusal::bad_request(format!(
                "status {s:?} is not one of active, inactive, revoked"
            ))
        })?),
    };
    let mut labels = Labels::new();
    for pair in query(req, "label")?.iter().flat_map(|l| l.split(',')) {
        let pair = pair.trim();
        if pair.is_empty() {
            continue;
        }
        match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                labels.insert(k.trim().to_owned(), v.trim().to_owned());
            }
            _ => {
                return Err(Refusal::bad_request(format!(
                    "label {pair:?} is not KEY=VALUE"
                )));
            }
        }
    }
    let text = |name| query(req, name).map(|v| v.filter(|v: &String| !v.is_empty()));
    Ok(AgentFilter {
        status,
        labels,
        version: text("version")?,
        target: text("target")?,
        name: text("name")?,
    })
}

pub(super) async fn admin(
    app: &Arc<App>,
    req: &Request,
    caller: &Caller,
    actor: &Actor,
) -> Response {
    match admin_route(app, req, caller, actor).await {
        Ok(resp) => resp,
        Err(e) => failed(e),
    }
}

async fn admin_route(
    app: &Arc<App>,
    req: &Request,
    caller: &Caller,
    actor: &Actor,
) -> Result<Response, Error> {
    let path = http::path_of(&req.path);
    let parts: Vec<&str> = path["/v1/admin/".len()..].split('/').collect();
    let json = |status: u16, body: String| Ok(Response::json(status, body));
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["whoami"]) => json(
            200,
            json::to_string(&WhoAmI {
                name: caller.name.clone(),
                role: caller.role.as_str().to_owned(),
            }),
        ),
        ("GET", ["audit"]) => {
            let now = crate::app::now_secs();
            let since = match query(req, "since")? {
                Some(s) => Some(audit::parse_since(&s, now).map_err(Refusal::bad_request)?),
                None => None,
            };
            let text = |name: &str| -> Result<Option<String>, Refusal> {
                match query(req, name)? {
                    Some(v) if v.is_empty() || v.len() > 128 || v.chars().any(char::is_control) => {
                        Err(Refusal::bad_request(format!(
                            "{name} must be 1-128 printable characters"
                        )))
                    }
                    other => Ok(other),
                }
            };
            let q = audit::Query {
                since,
                agent: text("agent")?,
                actor: text("actor")?,
            };
            let limit = audit::parse_limit(query(req, "limit")?.as_deref())
                .map_err(Refusal::bad_request)?;
            let after = match query(req, "after")? {
                None => None,
                Some(a) if a.is_empty() || a == "null" => None,
                Some(a) => Some(a.parse::<u64>().map_err(|_| {
                    Refusal::bad_request(format!("after {a:?} must be a sequence number"))
                })?),
            };
            let page = blocking(app, actor, move |app| app.audit_page(&q, after, limit)).await?;
            json(200, json::to_string(&page))
        }
        ("GET", ["admin-tokens"]) => json(200, json::to_string(&app.admin_token_views())),
        ("POST", ["admin-tokens"]) => {
            let body: AdminTokenCreateRequest = parse_json(req)?;
            let created = blocking(app, actor, move |app| {
                app.create_admin_token(
                    &body.name,
                    &body.role,
                    body.ttl_ms.map(Duration::from_millis),
                )
            })
            .await?;
            json(201, json::to_string(&created))
        }
        ("POST", ["admin-tokens", name, "revoke"]) => {
            let name = (*name).to_owned();
            let view = blocking(app, actor, move |app| app.revoke_admin_token(&name)).await?;
            json(200, json::to_string(&view))
        }
        ("POST", ["backup"]) => {
            // An empty body asks for the default (no CA key).
            let body: BackupRequest = if req.body.is_empty() {
                BackupRequest::default()
            } else {
                parse_json(req)?
            };
            let bytes = blocking(app, actor, move |app| app.backup(body.include_ca_key)).await?;
            Ok(Response::new(200, "application/octet-stream", bytes))
        }
        ("POST", ["tokens"]) => {
            let body: TokenCreateRequest = parse_json(req)?;
            let created = blocking(app, actor, move |app| {
                app.create_token(Duration::from_millis(body.ttl_ms), body.uses, body.labels)
            })
            .await?;
            json(201, json::to_string(&created))
        }
        ("POST", ["config"]) => {
            let body: ConfigSetRequest = parse_json(req)?;
            let view = blocking(app, actor, move |app| {
                app.set_config(&body.scope, &body.config)
            })
            .await?;
            json(200, json::to_string(&view))
        }
        ("GET", ["config"]) => {
            let agent = query(req, "agent")?;
            json(200, json::to_string(&app.show_config(agent.as_deref())?))
        }
        ("GET", ["drift"]) => json(200, json::to_string(&app.drift())),
        ("POST", ["rollouts"]) => {
            let body: RolloutStartRequest = parse_json(req)?;
            let view = blocking(app, actor, move |app| {
                app.start_rollout(StartRequest {
                    release: &body.release,
                    stages: &body.stages,
                    soak: Duration::from_millis(body.soak_ms),
                    max_failures: body.max_failures,
                    selector: body.selector.clone(),
                    agent_timeout: body.agent_timeout_ms.map(Duration::from_millis),
                    window: body.window.clone(),
                    days: body.days.clone(),
                })
            })
            .await?;
            json(201, json::to_string(&view))
        }
        ("GET", ["rollouts"]) => json(200, json::to_string(&app.rollout_views())),
        ("GET", ["rollouts", id]) => {
            let members = query(req, "members")?.as_deref() == Some("1");
            json(200, json::to_string(&app.rollout_view(id, members)?))
        }
        ("POST", ["rollouts", id, action]) => {
            let (id, action) = ((*id).to_owned(), (*action).to_owned());
            let view = blocking(app, actor, move |app| app.act_on_rollout(&id, &action)).await?;
            json(200, json::to_string(&view))
        }
        ("POST", ["releases"]) => {
            let body: ReleaseImportRequest = parse_json(req)?;
            let view = match (body.dir, body.envelope) {
                (None, Some(envelope)) => {
                    blocking(app, actor, move |app| {
                        app.import_uploaded_release(&envelope)
                    })
                    .await?
                }
                (Some(dir), None) => {
                    let dir = std::path::PathBuf::from(dir);
                    blocking(app, actor, move |app| app.import_release(&dir)).await?
                }
                _ => {
                    return Err(Refusal::bad_request(
                        "give either envelope (the release.dsse.json of uploaded files) or dir (a directory on the server's host)",
                    )
                    .into());
                }
            };
            json(201, json::to_string(&view))
        }
        ("GET", ["releases"]) => json(200, json::to_string(&app.release_views())),
        ("POST", ["agents", id, "update"]) => {
            let body: AgentUpdateRequest = parse_json(req)?;
            let id = (*id).to_owned();
            let view =
                blocking(app, actor, move |app| app.offer_release(&id, &body.release)).await?;
            json(200, json::to_string(&view))
        }
        ("GET", ["agents"]) => {
            let limit = match query(req, "limit")?.map(|l| l.parse::<usize>()) {
                None => AGENT_PAGE,
                Some(Ok(n)) if (1..=MAX_AGENT_PAGE).contains(&n) => n,
                Some(_) => {
                    return Err(Refusal::bad_request(format!(
                        "limit must be 1 to {MAX_AGENT_PAGE}"
                    ))
                    .into());
                }
            };
            let after = query(req, "after")?.unwrap_or_default();
            let offset = match query(req, "offset")?.map(|o| o.parse::<usize>()) {
                None => 0,
                Some(Ok(n)) => n,
                Some(Err(_)) => {
                    return Err(Refusal::bad_request("offset must be a whole number from 0").into());
                }
            };
            let filter = agent_filter(req)?;
            let (page, total) = app.agent_query(&filter, &after, offset, limit);
            let mut resp = Response::json(200, json::to_string(&page));
            // The page stays a plain array (as `agents list --json` prints
            // it); how many agents match in all travels beside it.
            resp.extra_headers
                .push(("x-total-count", total.to_string()));
            Ok(resp)
        }
        ("GET", ["fleet"]) => json(200, json::to_string(&app.fleet_summary())),
        ("GET", ["agents", id]) => {
            let id = (*id).to_owned();
            let view = blocking(app, actor, move |app| app.agent_detail(&id)).await?;
            json(200, json::to_string(&view))
        }
        ("POST", ["agents", id, "doctor"]) => {
            let body: DoctorAsk = parse_json(req)?;
            let id = (*id).to_owned();
            let asked = blocking(app, actor, move |app| {
                app.ask_doctor(Some(&id), None, body.remediate_dry_run)
            })
            .await?;
            json(200, json::to_string(&DoctorAsked { asked }))
        }
        ("GET", ["agents", id, "doctor"]) => {
            let id = (*id).to_owned();
            let view = blocking(app, actor, move |app| app.doctor_report_view(&id)).await?;
            json(200, json::to_string(&view))
        }
        ("POST", ["doctor"]) => {
            let body: DoctorAsk = parse_json(req)?;
            let selector = body.selector.unwrap_or_default();
            let asked = blocking(app, actor, move |app| {
                app.ask_doctor(None, Some(&selector), body.remediate_dry_run)
            })
            .await?;
            json(200, json::to_string(&DoctorAsked { asked }))
        }
        ("POST", ["doctor-report"]) => {
            let body: DoctorAsk = parse_json(req)?;
            let selector = body.selector.unwrap_or_default();
            let report =
                blocking(app, actor, move |app| app.fleet_doctor_report(&selector)).await?;
            json(200, json::to_string(&report))
        }
        ("POST", ["tasks"]) => {
            let body = json_body(req)?.to_vec();
            let created = blocking(app, actor, move |app| app.create_task(&body)).await?;
            json(201, json::to_string(&created))
        }
        ("GET", ["tasks"]) => {
            let agent = query(req, "agent")?;
            let views = blocking(app, actor, move |app| app.task_views(agent.as_deref())).await?;
            json(200, json::to_string(&views))
        }
        ("GET", ["tasks", id]) => {
            let id = (*id).to_owned();
            let view = blocking(app, actor, move |app| app.task_view(&id)).await?;
            json(200, json::to_string(&view))
        }
        ("POST", ["tasks", id, "cancel"]) => {
            let id = (*id).to_owned();
            let view = blocking(app, actor, move |app| app.cancel_task(&id)).await?;
            json(200, json::to_string(&view))
        }
        ("POST", ["agents", id, action]) => {
            let Some(action) = AgentAction::parse(action) else {
                return Err(Refusal::not_found(format!("unknown agent action {action:?}")).into());
            };
            let id = (*id).to_owned();
            let view = blocking(app, actor, move |app| app.act_on_agent(&id, action)).await?;
            json(200, json::to_string(&view))
        }
        _ => {
            Err(Refusal::not_found(format!("no such admin endpoint: {} {path}", req.method)).into())
        }
    }
}
