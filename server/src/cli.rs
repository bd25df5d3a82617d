//! Command line of `stella-server`: raw parse with lexopt into a checked
//! `Command`. Usage errors exit with code 2.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use lexopt::prelude::*;
use stella_proto::api::Labels;

use crate::error::Error;

/// Default data dir (also `STELLA_DATA_DIR`).
pub(crate) const DEFAULT_DATA_DIR: &str = "/var/lib/stella-server";

pub(crate) const USAGE: &str = "\
usage:
  stella-server init  --data-dir DIR [--san NAME]... [--store URL]
  stella-server serve --data-dir DIR [--store URL] [--listen ADDR] [--heartbeat-interval D]
                      [--heartbeat-misses N] [--cert-lifetime D] [--expired-grace D]
                      [--update-probation D] [--max-handshakes N]
  stella-server migrate --from DATA_DIR --to postgres://…
  stella-server token create [--ttl D] [--uses N] [--label K=V]...
  stella-server agents list [--json] | agents show ID [--doctor] [--json]
  stella-server agents deactivate|activate|revoke|renew ID
  stella-server agents doctor ID|--selector K=V... [--remediate-dry-run]
  stella-server doctor-report --selector K=V... [--json]
  stella-server release import DIR | release list [--json]
  stella-server agents update ID --release V
  stella-server rollout start --release V --stages count:1,10,50,100 [--soak D]
                              [--max-failures R] [--selector K=V]...
                              [--agent-timeout D] [--window HH:MM-HH:MM] [--days mon-fri]
  stella-server rollout show ID [--json] | rollout list [--json]
  stella-server rollout pause|resume|abort ID
  stella-server config set --scope global|label:K=V|agent:ID FILE.json
  stella-server config show [--agent ID]
  stella-server drift [--json]
  stella-server task create TASK.dsse.json | task list [--agent ID] [--json]
  stella-server task show ID [--json] | task cancel ID | task artifact FILE
  stella-server admin-token create --name NAME --role read|operate|admin [--ttl D]
  stella-server admin-token list [--json] | admin-token revoke NAME
  stella-server audit [--since D|TIME] [--agent ID] [--actor NAME] [--json]
  stella-server backup --out FILE [--include-ca-key]
  stella-server restore --from FILE --data-dir DIR
  stella-server version

Admin commands reach the running server found from --data-dir (server.url,
admin.token, ca.pem), or --server URL with --ca FILE and STELLA_ADMIN_TOKEN.
Durations: 90s, 5m, 24h, 30d. --data-dir defaults to $STELLA_DATA_DIR or
/var/lib/stella-server. --store (or $STELLA_STORE) puts the store in PostgreSQL:
postgres://USER:PASSWORD@HOST:PORT/DB[?sslmode=require&sslrootcert=CA.pem];
without it the store is a redb file in the data dir.";

/// Where admin commands send their requests.
#[derive(Debug, Clone, Default)]
pub(crate) struct AdminTarget {
    pub(crate) data_dir: PathBuf,
    pub(crate) server: Option<String>,
    pub(crate) ca: Option<PathBuf>,
}

/// `serve` settings from the command line.
#[derive(Debug, Clone)]
pub(crate) struct ServeOptions {
    pub(crate) data_dir: PathBuf,
    /// A PostgreSQL URL; `None`: redb in the data dir.
    pub(crate) store: Option<String>,
    pub(crate) listen: String,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) heartbeat_misses: u32,
    pub(crate) cert_lifetime: Duration,
    pub(crate) expired_grace: Duration,
    pub(crate) update_probation: Duration,
    /// TLS handshakes in progress at once; more are closed at once.
    pub(crate) max_handshakes: usize,
}

/// Default for `serve --max-handshakes`: on a 2-core box a handshake costs
/// about a millisecond of CPU, so 256 at once is a quarter second of work
/// queued at worst, and with a 200 ms round trip still admits over 1,000
/// handshakes/s; in memory it is a few MiB of TLS state.
pub(crate) const DEFAULT_MAX_HANDSHAKES: usize = 256;

/// A lifecycle action on one agent.
#[derive(Debug, Clone, Copy)]
pub(crate) enum AgentAction {
    Deactivate,
    Activate,
    Revoke,
    /// Ask the agent to renew its certificate at its next heartbeat.
    Renew,
}

impl AgentAction {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AgentAction::Deactivate => "deactivate",
            AgentAction::Activate => "activate",
            AgentAction::Revoke => "revoke",
            AgentAction::Renew => "renew",
        }
    }
}

/// A parsed command.
#[derive(Debug)]
pub(crate) enum Command {
    Help,
    Version,
    Init {
        data_dir: PathBuf,
        sans: Vec<String>,
        /// A PostgreSQL URL; `None`: redb in the data dir.
        store: Option<String>,
    },
    Serve(ServeOptions),
    /// Copy a data dir's redb store into an empty PostgreSQL database.
    Migrate {
        from: PathBuf,
        to: String,
    },
    TokenCreate {
        target: AdminTarget,
        ttl: Duration,
        uses: u32,
        labels: Labels,
    },
    AgentsList {
        target: AdminTarget,
        json: bool,
    },
    AgentsShow {
        target: AdminTarget,
        id: String,
        json: bool,
        /// The last doctor report instead of the agent.
        doctor: bool,
    },
    /// Ask one agent (or every agent matching a selector) for a doctor report.
    AgentsDoctor {
        target: AdminTarget,
        id: Option<String>,
        selector: Labels,
        remediate_dry_run: bool,
    },
    DoctorReport {
        target: AdminTarget,
        selector: Labels,
        json: bool,
    },
    AgentsAct {
        target: AdminTarget,
        id: String,
        action: AgentAction,
    },
    ConfigSet {
        target: AdminTarget,
        scope: String,
        file: PathBuf,
    },
    ConfigShow {
        target: AdminTarget,
        agent: Option<String>,
    },
    Drift {
        target: AdminTarget,
        json: bool,
    },
    ReleaseImport {
        target: AdminTarget,
        dir: PathBuf,
    },
    ReleaseList {
        target: AdminTarget,
        json: bool,
    },
    AgentsUpdate {
        target: AdminTarget,
        id: String,
        release: String,
    },
    RolloutStart {
        target: AdminTarget,
        release: String,
        stages: Vec<String>,
        soak: Duration,
        max_failures: f64,
        selector: Labels,
        agent_timeout: Option<Duration>,
        window: Option<String>,
        days: Option<String>,
    },
    RolloutShow {
        target: AdminTarget,
        id: Option<String>,
        json: bool,
    },
    RolloutAct {
        target: AdminTarget,
        id: String,
        action: String,
    },
    /// Queue a signed task (its DSSE envelope file).
    TaskCreate {
        target: AdminTarget,
        file: PathBuf,
    },
    TaskList {
        target: AdminTarget,
        agent: Option<String>,
        json: bool,
    },
    TaskShow {
        target: AdminTarget,
        id: String,
        json: bool,
    },
    TaskCancel {
        target: AdminTarget,
        id: String,
    },
    /// Upload an image archive for container tasks.
    TaskArtifact {
        target: AdminTarget,
        file: PathBuf,
    },
    AdminTokenCreate {
        target: AdminTarget,
        name: String,
        role: String,
        ttl: Option<Duration>,
    },
    AdminTokenList {
        target: AdminTarget,
        json: bool,
    },
    AdminTokenRevoke {
        target: AdminTarget,
        name: String,
    },
    Audit {
        target: AdminTarget,
        /// Unix seconds.
        since: Option<u64>,
        agent: Option<String>,
        actor: Option<String>,
        json: bool,
    },
    Backup {
        target: AdminTarget,
        out: PathBuf,
        include_ca_key: bool,
    },
    Restore {
        from: PathBuf,
        data_dir: PathBuf,
    },
}

fn usage(msg: impl Into<String>) -> Error {
    Error::Usage(msg.into())
}

fn lex(e: lexopt::Error) -> Error {
    usage(e.to_string())
}

fn string(v: OsString, flag: &str) -> Result<String, Error> {
    v.into_string()
        .map_err(|_| usage(format!("{flag} must be valid UTF-8")))
}

fn duration(v: OsString, flag: &str) -> Result<Duration, Error> {
    let s = string(v, flag)?;
    stella_proto::parse_duration(&s).map_err(|e| usage(format!("{flag}: {e}")))
}

/// Parses `K=V` into the label map.
pub(crate) fn label(v: OsString, labels: &mut Labels) -> Result<(), Error> {
    let s = string(v, "--label")?;
    let (k, val) = s
        .split_once('=')
        .ok_or_else(|| usage(format!("--label {s:?} must be KEY=VALUE")))?;
    labels.insert(k.to_owned(), val.to_owned());
    crate::tokens::check_labels(labels).map_err(usage)
}

/// `--store URL` (or `$STELLA_STORE`): a PostgreSQL URL.
fn store_url(value: OsString) -> Result<String, Error> {
    let url = string(value, "--store")?;
    if !crate::store::is_postgres_url(&url) {
        return Err(usage(format!(
            "--store {:?} is not a postgres:// URL (without --store the store is redb in the data dir)",
            crate::store::redact(&url)
        )));
    }
    Ok(url)
}

fn default_store() -> Result<Option<String>, Error> {
    match std::env::var_os("STELLA_STORE") {
        Some(v) if !v.is_empty() => store_url(v).map(Some),
        _ => Ok(None),
    }
}

fn default_data_dir() -> PathBuf {
    std::env::var_os("STELLA_DATA_DIR")
        .map_or_else(|| PathBuf::from(DEFAULT_DATA_DIR), PathBuf::from)
}

/// Sets one of the options every admin command accepts.
fn admin_opt(flag: &str, value: OsString, t: &mut AdminTarget) -> Result<(), Error> {
    match flag {
        "data-dir" => t.data_dir = value.into(),
        "server" => t.server = Some(string(value, "--server")?),
        _ => t.ca = Some(value.into()),
    }
    Ok(())
}

/// Parses the process arguments.
pub(crate) fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, Error> {
    let mut p = lexopt::Parser::from_iter(args);
    let first = match p.next().map_err(lex)? {
        None => return Err(usage("missing command")),
        Some(Long("help") | Short('h')) => return Ok(Command::Help),
        Some(Long("version") | Short('V')) => return Ok(Command::Version),
        Some(Value(v)) => string(v, "command")?,
        Some(other) => return Err(usage(other.unexpected().to_string())),
    };
    let mut target = AdminTarget {
        data_dir: default_data_dir(),
        ..AdminTarget::default()
    };
    let cmd = match first.as_str() {
        "help" => Command::Help,
        "version" => Command::Version,
        "init" => {
            let mut sans = Vec::new();
            let mut store = default_store()?;
            while let Some(arg) = p.next().map_err(lex)? {
                match arg {
                    Long("data-dir") => target.data_dir = p.value().map_err(lex)?.into(),
                    Long("san") => sans.push(string(p.value().map_err(lex)?, "--san")?),
                    Long("store") => store = Some(store_url(p.value().map_err(lex)?)?),
                    other => return Err(usage(other.unexpected().to_string())),
                }
            }
            Command::Init {
                data_dir: target.data_dir,
                sans,
                store,
            }
        }
        "migrate" => {
            let (mut from, mut to) = (None, None);
            while let Some(arg) = p.next().map_err(lex)? {
                match arg {
                    Long("from") => from = Some(PathBuf::from(p.value().map_err(lex)?)),
                    Long("to") => to = Some(store_url(p.value().map_err(lex)?)?),
                    other => return Err(usage(other.unexpected().to_string())),
                }
            }
            let (Some(from), Some(to)) = (from, to) else {
                return Err(usage("migrate needs --from DATA_DIR and --to postgres://…"));
            };
            Command::Migrate { from, to }
        }
        "serve" => {
            let mut o = ServeOptions {
                data_dir: target.data_dir,
                store: default_store()?,
                listen: "0.0.0.0:8443".into(),
                heartbeat_interval: Duration::from_secs(30),
                heartbeat_misses: 3,
                cert_lifetime: Duration::from_secs(30 * 86_400),
                expired_grace: Duration::from_secs(30 * 86_400),
                update_probation: Duration::from_secs(300),
                max_handshakes: DEFAULT_MAX_HANDSHAKES,
            };
            while let Some(arg) = p.next().map_err(lex)? {
                match arg {
                    Long("data-dir") => o.data_dir = p.value().map_err(lex)?.into(),
                    Long("store") => o.store = Some(store_url(p.value().map_err(lex)?)?),
                    Long("listen") => o.listen = string(p.value().map_err(lex)?, "--listen")?,
                    Long("heartbeat-interval") => {
                        o.heartbeat_interval =
                            duration(p.value().map_err(lex)?, "--heartbeat-interval")?
                    }
                    Long("heartbeat-misses") => {
                        o.heartbeat_misses = p.value().map_err(lex)?.parse().map_err(lex)?
                    }
                    Long("cert-lifetime") => {
                        o.cert_lifetime = duration(p.value().map_err(lex)?, "--cert-lifetime")?
                    }
                    Long("update-probation") => {
                        o.update_probation =
                            duration(p.value().map_err(lex)?, "--update-probation")?
                    }
                    Long("expired-grace") => {
                        o.expired_grace = duration(p.value().map_err(lex)?, "--expired-grace")?
                    }
                    Long("max-handshakes") => {
                        let value = string(p.value().map_err(lex)?, "--max-handshakes")?;
                        o.max_handshakes = match value.parse::<usize>() {
                            Ok(n) if n >= 1 => n,
                            _ => {
                                return Err(usage(format!(
                                    "--max-handshakes {value:?} is not a number of at least 1"
                                )));
                            }
                        };
                    }
                    other => return Err(usage(other.unexpected().to_string())),
                }
            }
            if o.heartbeat_interval < Duration::from_millis(100) {
                return Err(usage("--heartbeat-interval must be at least 100ms"));
            }
            if o.heartbeat_misses == 0 {
                return Err(usage("--heartbeat-misses must be at least 1"));
            }
            if o.cert_lifetime < Duration::from_secs(10) {
                return Err(usage("--cert-lifetime must be at least 10s"));
            }
            Command::Serve(o)
        }
        "token" => {
            match p.next().map_err(lex)? {
                Some(Value(v)) if v == "create" => {}
                _ => return Err(usage("expected `token create`")),
            }
            let (mut ttl, mut uses, mut labels) = (Duration::from_secs(3600), 1u32, Labels::new());
            while let Some(arg) = p.next().map_err(lex)? {
                match arg {
                    Long(flag @ ("data-dir" | "server" | "ca")) => {
                        let flag = flag.to_owned();
                        admin_opt(&flag, p.value().map_err(lex)?, &mut target)?
                    }
                    Long("ttl") => ttl = duration(p.value().map_err(lex)?, "--ttl")?,
                    Long("uses") => uses = p.value().map_err(lex)?.parse().map_err(lex)?,
                    Long("label") => label(p.value().map_err(lex)?, &mut labels)?,
                    other => return Err(usage(other.unexpected().to_string())),
                }
            }
            if uses == 0 {
                return Err(usage("--uses must be at least 1"));
            }
            Command::TokenCreate {
                target,
                ttl,
                uses,
                labels,
            }
        }
        "agents" => {
            let sub = match p.next().map_err(lex)? {
                Some(Value(v)) => string(v, "agents subcommand")?,
                _ => {
                    return Err(usage(
                        "expected `agents list|show|deactivate|activate|revoke`",
                    ));
                }
            };
            let (mut json, mut id, mut release) = (false, None::<String>, None::<String>);
            let (mut doctor, mut dry_run, mut selector) = (false, false, Labels::new());
            while let Some(arg) = p.next().map_err(lex)? {
                match arg {
                    Long(flag @ ("data-dir" | "server" | "ca")) => {
                        let flag = flag.to_owned();
                        admin_opt(&flag, p.value().map_err(lex)?, &mut target)?
                    }
                    Long("json") => json = true,
                    Long("doctor") if sub == "show" => doctor = true,
                    Long("remediate-dry-run") if sub == "doctor" => dry_run = true,
                    Long("selector") if sub == "doctor" => {
                        label(p.value().map_err(lex)?, &mut selector)?
                    }
                    Long("release") if sub == "update" => {
                        release = Some(string(p.value().map_err(lex)?, "--release")?)
                    }
                    Value(v) if id.is_none() => id = Some(string(v, "agent id")?),
                    other => return Err(usage(other.unexpected().to_string())),
                }
            }
            let need_id = |id: Option<String>| {
                id.ok_or_else(|| usage(format!("`agents {sub}` needs an agent id")))
            };
            match sub.as_str() {
                "list" => {
                    if id.is_some() {
                        return Err(usage("`agents list` takes no agent id"));
                    }
                    Command::AgentsList { target, json }
                }
                "update" => Command::AgentsUpdate {
                    id: need_id(id)?,
                    target,
                    release: release
                        .ok_or_else(|| usage("`agents update` needs --release VERSION"))?,
                },
                "show" => Command::AgentsShow {
                    id: need_id(id)?,
                    target,
                    json,
                    doctor,
                },
                "doctor" => {
                    if id.is_some() != selector.is_empty() {
                        return Err(usage(
                            "`agents doctor` needs an agent id or --selector K=V, not both",
                        ));
                    }
                    Command::AgentsDoctor {
                        target,
                        id,
                        selector,
                        remediate_dry_run: dry_run,
                    }
                }
                "deactivate" | "activate" | "revoke" | "renew" => Command::AgentsAct {
                    id: need_id(id)?,
                    target,
                    action: match sub.as_str() {
                        "deactivate" => AgentAction::Deactivate,
                        "activate" => AgentAction::Activate,
                        "revoke" => AgentAction::Revoke,
                        _ => AgentAction::Renew,
                    },
                },
                other => return Err(usage(format!("unknown agents subcommand {other:?}"))),
            }
        }
        "config" => {
            let sub = match p.next().map_err(lex)? {
                Some(Value(v)) => string(v, "config subcommand")?,
                _ => return Err(usage("expected `config set` or `config show`")),
            };
            let (mut scope, mut agent, mut file) =
                (None::<String>, None::<String>, None::<PathBuf>);
            while let Some(arg) = p.next().map_err(lex)? {
                match arg {
                    Long(flag @ ("data-dir" | "server" | "ca")) => {
                        let flag = flag.to_owned();
                        admin_opt(&flag, p.value().map_err(lex)?, &mut target)?
                    }
                    Long("scope") if sub == "set" => {
                        scope = Some(string(p.value().map_err(lex)?, "--scope")?)
                    }
                    Long("agent") if sub == "show" => {
                        agent = Some(string(p.value().map_err(lex)?, "--agent")?)
                    }
                    Value(v) if sub == "set" && file.is_none() => file = Some(v.into()),
                    other => return Err(usage(other.unexpected().to_string())),
                }
            }
            match sub.as_str() {
                "set" => Command::ConfigSet {
                    target,
                    scope: scope.ok_or_else(|| {
                        usage("`config set` needs --scope global|label:K=V|agent:ID")
                    })?,
                    file: file.ok_or_else(|| usage("`config set` needs a JSON file"))?,
                },
                "show" => Command::ConfigShow { target, agent },
                other => return Err(usage(format!("unknown config subcommand {other:?}"))),
            }
        }
        "release" => {
            let sub = match p.next().map_err(lex)? {
                Some(Value(v)) => string(v, "release subcommand")?,
                _ => return Err(usage("expected `release import DIR` or `release list`")),
            };
            let (mut json, mut dir) = (false, None::<PathBuf>);
            while let Some(arg) = p.next().map_err(lex)? {
                match arg {
                    Long(flag @ ("data-dir" | "server" | "ca")) => {
                        let flag = flag.to_owned();
                        admin_opt(&flag, p.value().map_err(lex)?, &mut target)?
                    }
                    Long("json") if sub == "list" => json = true,
                    Value(v) if sub == "import" && dir.is_none() => dir = Some(v.into()),
                    other => return Err(usage(other.unexpected().to_string())),
                }
            }
            match sub.as_str() {
                "import" => Command::ReleaseImport {
                    target,
                    dir: dir.ok_or_else(|| usage("`release import` needs a release directory"))?,
                },
                "list" => Command::ReleaseList { target, json },
                other => return Err(usage(format!("unknown release subcommand {other:?}"))),
            }
        }
        "rollout" => {
            let sub = match p.next().map_err(lex)? {
                Some(Value(v)) => string(v, "rollout subcommand")?,
                _ => {
                    return Err(usage(
                        "expected `rollout start|show|list|pause|resume|abort`",
                    ));
                }
            };
            let (mut json, mut id, mut release, mut stages) =
                (false, None::<String>, None::<String>, None::<String>);
            let (mut soak, mut max_failures, mut selector) =
                (Duration::from_secs(600), 0.05f64, Labels::new());
            let (mut agent_timeout, mut window, mut days) =
                (None::<Duration>, None::<String>, None::<String>);
            while let Some(arg) = p.next().map_err(lex)? {
                match arg {
                    Long(flag @ ("data-dir" | "server" | "ca")) => {
                        let flag = flag.to_owned();
                        admin_opt(&flag, p.value().map_err(lex)?, &mut target)?
                    }
                    Long("json") => json = true,
                    Long("release") if sub == "start" => {
                        release = Some(string(p.value().map_err(lex)?, "--release")?)
                    }
                    Long("stages") if sub == "start" => {
                        stages = Some(string(p.value().map_err(lex)?, "--stages")?)
                    }
                    Long("soak") if sub == "start" => {
                        soak = duration(p.value().map_err(lex)?, "--soak")?
                    }
                    Long("max-failures") if sub == "start" => {
                        let text = string(p.value().map_err(lex)?, "--max-failures")?;
                        max_failures = text
                            .parse()
                            .ok()
                            .filter(|r: &f64| (0.0..=1.0).contains(r))
                            .ok_or_else(|| {
                                usage(format!(
                                    "--max-failures {text:?} must be a ratio between 0 and 1"
                                ))
                            })?;
                    }
                    Long("selector") if sub == "start" => {
                        label(p.value().map_err(lex)?, &mut selector)?
                    }
                    Long("agent-timeout") if sub == "start" => {
                        agent_timeout = Some(duration(p.value().map_err(lex)?, "--agent-timeout")?)
                    }
                    Long("window") if sub == "start" => {
                        window = Some(string(p.value().map_err(lex)?, "--window")?)
                    }
                    Long("days") if sub == "start" => {
                        days = Some(string(p.value().map_err(lex)?, "--days")?)
                    }
                    Value(v) if sub != "start" && id.is_none() => {
                        id = Some(string(v, "rollout id")?)
                    }
                    other => return Err(usage(other.unexpected().to_string())),
                }
            }
            match sub.as_str() {
                "start" => {
                    let stages: Vec<String> = stages
                        .ok_or_else(|| {
                            usage("`rollout start` needs --stages, e.g. count:1,10,50,100")
                        })?
                        .split(',')
                        .map(|s| s.trim().to_owned())
                        .collect();
                    crate::rollout::check_plan(&stages, soak).map_err(usage)?;
                    crate::rollout::check_schedule(
                        agent_timeout,
                        window.as_deref(),
                        days.as_deref(),
                    )
                    .map_err(usage)?;
                    Command::RolloutStart {
                        target,
                        release: release
                            .ok_or_else(|| usage("`rollout start` needs --release VERSION"))?,
                        stages,
                        soak,
                        max_failures,
                        selector,
                        agent_timeout,
                        window,
                        days,
                    }
                }
                "show" => Command::RolloutShow {
                    id: Some(id.ok_or_else(|| usage("`rollout show` needs a rollout id"))?),
                    target,
                    json,
                },
                "list" => Command::RolloutShow {
                    id: None,
                    target,
                    json,
                },
                "pause" | "resume" | "abort" => Command::RolloutAct {
                    id: id.ok_or_else(|| usage(format!("`rollout {sub}` needs a rollout id")))?,
                    target,
                    action: sub,
                },
                other => return Err(usage(format!("unknown rollout subcommand {other:?}"))),
            }
        }
        "doctor-report" => {
            let (mut json, mut selector) = (false, Labels::new());
            while let Some(arg) = p.next().map_err(lex)? {
                match arg {
                    Long(flag @ ("data-dir" | "server" | "ca")) => {
                        let flag = flag.to_owned();
                        admin_opt(&flag, p.value().map_err(lex)?, &mut target)?
                    }
                    Long("json") => json = true,
                    Long("selector") => label(p.value().map_err(lex)?, &mut selector)?,
                    other => return Err(usage(other.unexpected().to_string())),
                }
            }
            if selector.is_empty() {
                return Err(usage("`doctor-report` needs --selector K=V"));
            }
            Command::DoctorReport {
                target,
                selector,
                json,
            }
        }
        "task" => {
            let sub = match p.next().map_err(lex)? {
                Some(Value(v)) => string(v, "task subcommand")?,
                _ => return Err(usage("expected `task create|list|show|cancel|artifact`")),
            };
            let (mut json, mut agent, mut arg) = (false, None::<String>, None::<OsString>);
            while let Some(next) = p.next().map_err(lex)? {
                match next {
                    Long(flag @ ("data-dir" | "server" | "ca")) => {
                        let flag = flag.to_owned();
                        admin_opt(&flag, p.value().map_err(lex)?, &mut target)?
                    }
                    Long("json") if sub == "list" || sub == "show" => json = true,
                    Long("agent") if sub == "list" => {
                        agent = Some(string(p.value().map_err(lex)?, "--agent")?)
                    }
                    Value(v) if sub != "list" && arg.is_none() => arg = Some(v),
                    other => return Err(usage(other.unexpected().to_string())),
                }
            }
            let need = |what: &str| arg.ok_or_else(|| usage(format!("`task {sub}` needs {what}")));
            match sub.as_str() {
                "create" => Command::TaskCreate {
                    file: need("a signed task file (TASK.dsse.json)")?.into(),
                    target,
                },
                "list" => Command::TaskList {
                    target,
                    agent,
                    json,
                },
                "show" => Command::TaskShow {
                    id: string(need("a task id")?, "task id")?,
                    target,
                    json,
                },
                "cancel" => Command::TaskCancel {
                    id: string(need("a task id")?, "task id")?,
                    target,
                },
                "artifact" => Command::TaskArtifact {
                    file: need("an image archive file")?.into(),
                    target,
                },
                other => return Err(usage(format!("unknown task subcommand {other:?}"))),
            }
        }
        "drift" => {
            let mut json = false;
            while let Some(arg) = p.next().map_err(lex)? {
                match arg {
                    Long(flag @ ("data-dir" | "server" | "ca")) => {
                        let flag = flag.to_owned();
                        admin_opt(&flag, p.value().map_err(lex)?, &mut target)?
                    }
                    Long("json") => json = true,
                    other => return Err(usage(other.unexpected().to_string())),
                }
            }
            Command::Drift { target, json }
        }
        "admin-token" => {
            let sub = match p.next().map_err(lex)? {
                Some(Value(v)) => string(v, "admin-token subcommand")?,
                _ => return Err(usage("expected `admin-token create|list|revoke`")),
            };
            let (mut name, mut role, mut ttl, mut json) =
                (None::<String>, None::<String>, None::<Duration>, false);
            while let Some(arg) = p.next().map_err(lex)? {
                match arg {
                    Long(flag @ ("data-dir" | "server" | "ca")) => {
                        let flag = flag.to_owned();
                        admin_opt(&flag, p.value().map_err(lex)?, &mut target)?
                    }
                    Long("name") if sub == "create" => {
                        name = Some(string(p.value().map_err(lex)?, "--name")?)
                    }
                    Long("role") if sub == "create" => {
                        role = Some(string(p.value().map_err(lex)?, "--role")?)
                    }
                    Long("ttl") if sub == "create" => {
                        ttl = Some(duration(p.value().map_err(lex)?, "--ttl")?)
                    }
                    Long("json") if sub == "list" => json = true,
                    Value(v) if sub == "revoke" && name.is_none() => {
                        name = Some(string(v, "admin token name")?)
                    }
                    other => return Err(usage(other.unexpected().to_string())),
                }
            }
            match sub.as_str() {
                "create" => {
                    let name =
                        name.ok_or_else(|| usage("`admin-token create` needs --name NAME"))?;
                    let role = role.ok_or_else(|| {
                        usage("`admin-token create` needs --role read|operate|admin")
                    })?;
                    crate::roles::check_create(&name, &role, ttl).map_err(|r| usage(r.message))?;
                    Command::AdminTokenCreate {
                        target,
                        name,
                        role,
                        ttl,
                    }
                }
                "list" => Command::AdminTokenList { target, json },
                "revoke" => {
                    let name = name.ok_or_else(|| usage("`admin-token revoke` needs a NAME"))?;
                    crate::roles::check_name(&name).map_err(|r| usage(r.message))?;
                    Command::AdminTokenRevoke { target, name }
                }
                other => return Err(usage(format!("unknown admin-token subcommand {other:?}"))),
            }
        }
        "audit" => {
            let (mut since, mut agent, mut actor, mut json) =
                (None::<u64>, None::<String>, None::<String>, false);
            while let Some(arg) = p.next().map_err(lex)? {
                match arg {
                    Long(flag @ ("data-dir" | "server" | "ca")) => {
                        let flag = flag.to_owned();
                        admin_opt(&flag, p.value().map_err(lex)?, &mut target)?
                    }
                    Long("since") => {
                        let text = string(p.value().map_err(lex)?, "--since")?;
                        since = Some(
                            crate::audit::parse_since(&text, crate::app::now_secs())
                                .map_err(|e| usage(format!("--since: {e}")))?,
                        );
                    }
                    Long("agent") => agent = Some(string(p.value().map_err(lex)?, "--agent")?),
                    Long("actor") => actor = Some(string(p.value().map_err(lex)?, "--actor")?),
                    Long("json") => json = true,
                    other => return Err(usage(other.unexpected().to_string())),
                }
            }
            for (flag, value) in [("--agent", &agent), ("--actor", &actor)] {
                if value.as_deref().is_some_and(|v| {
                    v.is_empty() || v.len() > 128 || v.chars().any(char::is_control)
                }) {
                    return Err(usage(format!("{flag} must be 1-128 printable characters")));
                }
            }
            Command::Audit {
                target,
                since,
                agent,
                actor,
                json,
            }
        }
        "backup" => {
            let (mut out, mut include_ca_key) = (None::<PathBuf>, false);
            while let Some(arg) = p.next().map_err(lex)? {
                match arg {
                    Long(flag @ ("data-dir" | "server" | "ca")) => {
                        let flag = flag.to_owned();
                        admin_opt(&flag, p.value().map_err(lex)?, &mut target)?
                    }
                    Long("out") => out = Some(p.value().map_err(lex)?.into()),
                    Long("include-ca-key") => include_ca_key = true,
                    other => return Err(usage(other.unexpected().to_string())),
                }
            }
            Command::Backup {
                target,
                out: out.ok_or_else(|| usage("`backup` needs --out FILE"))?,
                include_ca_key,
            }
        }
        "restore" => {
            let (mut from, mut data_dir) = (None::<PathBuf>, None::<PathBuf>);
            while let Some(arg) = p.next().map_err(lex)? {
                match arg {
                    Long("from") => from = Some(p.value().map_err(lex)?.into()),
                    Long("data-dir") => data_dir = Some(p.value().map_err(lex)?.into()),
                    other => return Err(usage(other.unexpected().to_string())),
                }
            }
            Command::Restore {
                from: from.ok_or_else(|| usage("`restore` needs --from FILE"))?,
                // Never the default data dir: a restore names where it goes.
                data_dir: data_dir.ok_or_else(|| usage("`restore` needs --data-dir DIR"))?,
            }
        }
        other => return Err(usage(format!("unknown command {other:?}"))),
    };
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<OsString> {
        std::iter::once("stella-server")
            .chain(s.split_whitespace())
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn parses_the_documented_commands() {
        let Command::Serve(o) = parse(args("serve --data-dir /d --listen 127.0.0.1:0 --heartbeat-interval 1s --heartbeat-misses 2 --cert-lifetime 30s")).unwrap() else {
            panic!()
        };
        assert_eq!(o.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(o.max_handshakes, DEFAULT_MAX_HANDSHAKES);
        let Command::Serve(limited) = parse(args("serve --max-handshakes 8")).unwrap() else {
            panic!()
        };
        assert_eq!(limited.max_handshakes, 8);
        assert_eq!(
            (o.heartbeat_misses, o.cert_lifetime),
            (2, Duration::from_secs(30))
        );
        let Command::TokenCreate {
            ttl, uses, labels, ..
        } = parse(args("token create --ttl 10m --label site=lab --uses 3")).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (ttl, uses, labels["site"].as_str()),
            (Duration::from_secs(600), 3, "lab")
        );
        assert!(matches!(
            parse(args("agents revoke agt_x --data-dir /d")).unwrap(),
            Command::AgentsAct { .. }
        ));
        let Command::TaskList { agent, json, .. } =
            parse(args("task list --agent agt_x --json")).unwrap()
        else {
            panic!()
        };
        assert_eq!((agent.as_deref(), json), (Some("agt_x"), true));
        assert!(matches!(
            parse(args("task create t.dsse.json")).unwrap(),
            Command::TaskCreate { .. }
        ));
        assert!(matches!(
            parse(args("task artifact image.tar")).unwrap(),
            Command::TaskArtifact { .. }
        ));
    }

    #[test]
    fn usage_errors_name_the_problem() {
        for (line, needle) in [
            ("serve --heartbeat-interval 5", "invalid duration"),
            ("token create --label nope", "KEY=VALUE"),
            ("agents show", "needs an agent id"),
            ("agents doctor", "needs an agent id or --selector"),
            ("agents doctor agt_x --selector env=prod", "not both"),
            ("agents doctor --selector env", "KEY=VALUE"),
            ("doctor-report --json", "needs --selector"),
            ("task create", "needs a signed task file"),
            ("task show", "needs a task id"),
            ("task list abc", "abc"),
            ("task cancel --json x", "json"),
            ("task run x", "unknown task subcommand"),
            ("frobnicate", "unknown command"),
            ("serve --bogus", "bogus"),
            ("serve --max-handshakes 0", "--max-handshakes \"0\""),
            ("serve --max-handshakes many", "at least 1"),
            ("admin-token", "expected `admin-token"),
            ("admin-token create --role read", "needs --name"),
            ("admin-token create --name ci", "needs --role"),
            ("admin-token create --name ci --role root", "invalid role"),
            (
                "admin-token create --name a/b --role read",
                "invalid admin token name",
            ),
            ("admin-token create --name ci --role read --ttl 0s", "ttl"),
            ("admin-token revoke", "needs a NAME"),
            ("admin-token list --name x", "name"),
            ("audit --since yesterday", "--since"),
            ("audit --agent", "--agent"),
            ("backup", "needs --out"),
            ("backup --out f --bogus", "bogus"),
            ("restore --from f", "needs --data-dir"),
            ("restore --data-dir d", "needs --from"),
        ] {
            let err = parse(args(line)).unwrap_err();
            assert!(matches!(err, Error::Usage(_)), "{line}");
            assert!(err.to_string().contains(needle), "{line}: {err}");
        }
    }
}
