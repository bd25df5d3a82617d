//! Deployment tasks: the signed task payload (DSSE payload type
//! [`PAYLOAD_TYPE`]), its shape check shared by the server (at `task create`)
//! and the agent (before running), audiences, the server's task id, and the
//! bounds of a result's output.
//!
//! The shape check is what can be checked without the deploy key; the agent
//! additionally verifies the signature, its audience, `not_after`, its
//! capabilities and replays.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use miniserde::Deserialize;

use crate::api::Labels;
use crate::dsse::{self, DsseError, Envelope};

/// DSSE payloadType of a task envelope.
pub const PAYLOAD_TYPE: &str = "application/vnd.stella.task+json";

/// Largest task envelope (bytes). With the rest of a heartbeat answer it fits
/// the agent's answer limit, and it fits a request body at `task create`.
pub const MAX_ENVELOPE_BYTES: usize = 48 * 1024;

/// Largest decoded `content_base64` of a file task (bytes): base64 twice
/// (in the task, then in the envelope) still fits [`MAX_ENVELOPE_BYTES`].
pub const MAX_FILE_BYTES: usize = 24 * 1024;

/// Longest signed task id (bytes).
pub const MAX_ID_BYTES: usize = 128;

/// Longest file path (bytes).
pub const MAX_PATH_BYTES: usize = 4096;

/// Most agents an `audience.agents` list names.
pub const MAX_AUDIENCE_AGENTS: usize = 1000;

/// Most labels in an `audience.selector`, and env entries, ports and health
/// command arguments of a container task.
pub const MAX_ENTRIES: usize = 64;

/// Longest label key or value, env value, or command argument (bytes).
pub const MAX_TEXT_BYTES: usize = 1024;

/// Run timeout of a task that names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Longest run timeout a task may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

/// Health check timeout of a container task whose health names none.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(30);

/// A result's output keeps at most this many last lines...
pub const MAX_OUTPUT_LINES: usize = 64;

/// ...and at most this many last bytes.
pub const MAX_OUTPUT_BYTES: usize = 8 * 1024;

/// Most results an agent sends in one heartbeat (the rest wait for the next):
/// four full outputs, escaped, stay well inside a request body.
pub const MAX_RESULTS_PER_HEARTBEAT: usize = 4;

/// Hex digits of the server's task id.
pub const SERVER_ID_HEX: usize = 16;

/// The server's id of a task: the first 16 hex digits of the sha256 of the
/// envelope's payload bytes. The same payload twice is the same task; a new
/// payload reusing a signed id is a new server task (which the agent refuses
/// as a replay).
pub fn server_task_id(payload: &[u8]) -> String {
    let mut hex = crate::hash::hex(&crate::hash::sha256(payload));
    hex.truncate(SERVER_ID_HEX);
    hex
}

/// Whether `s` has the shape of a server task id.
pub fn is_server_task_id(s: &str) -> bool {
    s.len() == SERVER_ID_HEX && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Why a task (or its envelope) was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TaskError {
    /// The envelope itself is malformed.
    Envelope(DsseError),
    /// The envelope carries no signature at all.
    Unsigned,
    /// The payload is not a JSON object of the task shape.
    Json,
    /// `type` is not one this build knows.
    UnknownType { found: String },
    /// A field is missing or wrong; `reason` says how.
    Field { field: &'static str, reason: String },
    /// `not_after` has passed.
    Expired { not_after: String },
}

/// At most 80 characters of untrusted text for an error line.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((end, _)) => format!("{}...", &s[..end]),
        None => s.to_owned(),
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Envelope(e) => write!(f, "task envelope: {e}"),
            Self::Unsigned => f.write_str("task envelope has no signatures"),
            Self::Json => f.write_str(
                "task is not a JSON object {id, type, not_after, audience, ...type fields}",
            ),
            Self::UnknownType { found } => write!(
                f,
                "task type {:?} is unknown (known: file, container)",
                shorten(found)
            ),
            Self::Field { field, reason } => write!(f, "task field {field}: {reason}"),
            Self::Expired { not_after } => {
                write!(
                    f,
                    "task expired: not_after {} has passed",
                    shorten(not_after)
                )
            }
        }
    }
}

impl std::error::Error for TaskError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Envelope(e) => Some(e),
            _ => None,
        }
    }
}

impl From<DsseError> for TaskError {
    fn from(e: DsseError) -> Self {
        Self::Envelope(e)
    }
}

fn field_error(field: &'static str, reason: impl Into<String>) -> TaskError {
    TaskError::Field {
        field,
        reason: reason.into(),
    }
}

/// Who a task is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// These agents, by id.
    Agents(Vec<String>),
    /// Agents whose labels include all of these (every agent when empty).
    Selector(Labels),
}

impl Audience {
    /// Whether the agent `agent_id` with `labels` is in the audience.
    pub fn includes(&self, agent_id: &str, labels: &Labels) -> bool {
        match self {
            Audience::Agents(ids) => ids.iter().any(|id| id == agent_id),
            Audience::Selector(selector) => selector
                .iter()
                .all(|(k, v)| labels.get(k).is_some_and(|have| have == v)),
        }
    }
}

/// `file`: write `content` to `path` with `mode`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileTask {
    /// Absolute, without `.` or `..` segments.
    pub path: String,
    pub content: Vec<u8>,
    /// Permission bits, at most `0o777`.
    pub mode: u32,
}

/// A container's health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Run inside the container; exit 0 is healthy.
    pub cmd: Vec<String>,
    pub timeout: Duration,
}

/// `container`: run `image` (by digest) under `name`, replacing the
/// container of that name once the new one is healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerTask {
    pub name: String,
    /// `REPO@sha256:<64 hex>`.
    pub image: String,
    /// sha256 of an image archive imported into the server, fetched from
    /// `/v1/artifacts/{sha256}` and loaded locally.
    pub image_archive: Option<String>,
    pub env: BTreeMap<String, String>,
    /// `[IP:]HOST:CONTAINER[/tcp|/udp]`.
    pub ports: Vec<String>,
    pub health: Option<HealthCheck>,
}

/// What a task does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskSpec {
    File(FileTask),
    Container(ContainerTask),
}

impl TaskSpec {
    /// The `type` field's value.
    pub fn type_name(&self) -> &'static str {
        match self {
            TaskSpec::File(_) => "file",
            TaskSpec::Container(_) => "container",
        }
    }

    /// Capabilities of which an agent needs one to run this type (none: every
    /// agent can).
    pub fn capabilities(&self) -> &'static [&'static str] {
        match self {
            TaskSpec::File(_) => &[],
            TaskSpec::Container(_) => &["podman", "docker"],
        }
    }
}

/// A checked task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// The signed id (what the agent remembers to refuse replays).
    pub id: String,
    /// As written in the task (RFC 3339 UTC).
    pub not_after: String,
    /// `not_after` in Unix seconds.
    pub not_after_unix: u64,
    pub audience: Audience,
    /// Run timeout.
    pub timeout: Duration,
    pub spec: TaskSpec,
}

#[derive(Deserialize)]
struct AudienceJson {
    agents: Option<Vec<String>>,
    selector: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct HealthJson {
    cmd: Option<Vec<String>>,
    timeout: Option<String>,
}

/// Every field any type has; the type decides which are read.
#[derive(Deserialize)]
struct TaskJson {
    id: Option<String>,
    #[serde(rename = "type")]
    task_type: Option<String>,
    not_after: Option<String>,
    audience: Option<AudienceJson>,
    timeout: Option<String>,
    path: Option<String>,
    content_base64: Option<String>,
    mode: Option<String>,
    name: Option<String>,
    image: Option<String>,
    image_archive: Option<String>,
    env: Option<BTreeMap<String, String>>,
    ports: Option<Vec<String>>,
    health: Option<HealthJson>,
}

fn required<T>(field: &'static str, value: Option<T>) -> Result<T, TaskError> {
    value.ok_or_else(|| field_error(field, "is missing"))
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// sha256 as 64 lowercase hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_id(id: &str) -> Result<(), TaskError> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(field_error(
            "id",
            format!("must be 1 to {MAX_ID_BYTES} bytes"),
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
    {
        return Err(field_error(
            "id",
            "may only hold ASCII letters, digits, '.', '_', '-' and ':'",
        ));
    }
    Ok(())
}

fn check_text(field: &'static str, s: &str) -> Result<(), TaskError> {
    if s.len() > MAX_TEXT_BYTES || has_control(s) {
        return Err(field_error(
            field,
            format!("entries must be at most {MAX_TEXT_BYTES} bytes without control characters"),
        ));
    }
    Ok(())
}

fn check_timeout(
    field: &'static str,
    text: Option<&str>,
    default: Duration,
    max: Duration,
) -> Result<Duration, TaskError> {
    let Some(text) = text else {
        return Ok(default);
    };
    let d = crate::parse_duration(text).map_err(|e| field_error(field, e.to_string()))?;
    if d < Duration::from_secs(1) || d > max {
        return Err(field_error(
            field,
            format!("must be between 1s and {}", crate::format_duration(max)),
        ));
    }
    Ok(d)
}

/// Checks that `path` is absolute, at most [`MAX_PATH_BYTES`], without control
/// characters, empty, `.` or `..` segments, and names something below `/`.
pub fn check_file_path(path: &str) -> Result<(), TaskError> {
    let refuse = |reason: &str| Err(field_error("path", format!("{:?} {reason}", shorten(path))));
    if !path.starts_with('/') {
        return refuse("is not an absolute path");
    }
    if path.len() > MAX_PATH_BYTES {
        return refuse("is too long");
    }
    if has_control(path) {
        return refuse("contains a control character");
    }
    if path == "/" || path.ends_with('/') {
        return refuse("names a directory");
    }
    for segment in path[1..].split('/') {
        match segment {
            "" => return refuse("has an empty path segment"),
            "." | ".." => return refuse("has a \".\" or \"..\" path segment"),
            _ => {}
        }
    }
    Ok(())
}

/// Parses an octal mode (`"0644"`, `"755"`), at most `0o777`.
pub fn parse_mode(text: &str) -> Result<u32, TaskError> {
    let bad = || {
        field_error(
            "mode",
            format!("{:?} is not 3 or 4 octal digits up to 0777", shorten(text)),
        )
    };
    if !(3..=4).contains(&text.len()) || !text.bytes().all(|b| matches!(b, b'0'..=b'7')) {
        return Err(bad());
    }
    let mode = u32::from_str_radix(text, 8).map_err(|_| bad())?;
    if mode > 0o777 {
        return Err(bad());
    }
    Ok(mode)
}

/// Checks a container name as podman and docker accept it.
fn check_container_name(name: &str) -> Result<(), TaskError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !ok {
        return Err(field_error(
            "name",
            format!(
                "{:?} is not a container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 128)",
                shorten(name)
            ),
        ));
    }
    Ok(())
}

/// Checks `REPO@sha256:<64 hex>`: a repository without a tag, pinned by digest.
pub fn check_image_reference(image: &str) -> Result<(), TaskError> {
    let bad = |reason: &str| {
        Err(field_error(
            "image",
            format!("{:?} {reason}", shorten(image)),
        ))
    };
    let Some((repo, digest)) = image.split_once('@') else {
        return bad("is not pinned by digest (REPO@sha256:<64 hex>)");
    };
    let Some(hex) = digest.strip_prefix("sha256:") else {
        return bad("is not pinned by a sha256 digest (REPO@sha256:<64 hex>)");
    };
    if !is_sha256_hex(hex) {
        return bad("has a digest that is not 64 lowercase hex digits");
    }
    let last = repo.rsplit('/').next().unwrap_or(repo);
    if repo.is_empty()
        || repo.len() > 255
        || repo.starts_with('/')
        || repo.ends_with('/')
        || repo.contains("//")
        || !repo
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b':'))
    {
        return bad("has a malformed repository name");
    }
    if last.contains(':') {
        return bad("carries a tag: deploy by digest only (REPO@sha256:<64 hex>)");
    }
    Ok(())
}

fn check_port(port: &str) -> Result<(), TaskError> {
    let bad = || {
        field_error(
            "ports",
            format!("{:?} is not [IP:]HOST:CONTAINER[/tcp|/udp]", shorten(port)),
        )
    };
    let (mapping, proto) = match port.split_once('/') {
        Some((m, p)) => (m, Some(p)),
        None => (port, None),
    };
    if !matches!(proto, None | Some("tcp") | Some("udp")) {
        return Err(bad());
    }
    let number = |s: &str| {
        !s.is_empty()
            && s.len() <= 5
            && s.bytes().all(|b| b.is_ascii_digit())
            && s.parse::<u32>().is_ok_and(|n| (1..=65_535).contains(&n))
    };
    let parts: Vec<&str> = mapping.split(':').collect();
    let ok = match parts.as_slice() {
        [host, container] => number(host) && number(container),
        [ip, host, container] => {
            ip.parse::<std::net::Ipv4Addr>().is_ok() && number(host) && number(container)
        }
        _ => false,
    };
    if !ok {
        return Err(bad());
    }
    Ok(())
}

fn check_env_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 256
        && !key.as_bytes()[0].is_ascii_digit()
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl Task {
    /// Parses and checks the task payload (the JSON inside the envelope).
    pub fn from_json(bytes: &[u8]) -> Result<Self, TaskError> {
        let text = std::str::from_utf8(bytes).map_err(|_| TaskError::Json)?;
        let raw: TaskJson = miniserde::json::from_str(text).map_err(|_| TaskError::Json)?;
        let id = required("id", raw.id)?;
        check_id(&id)?;
        let task_type = required("type", raw.task_type)?;
        let not_after = required("not_after", raw.not_after)?;
        let not_after_unix = crate::time::parse_rfc3339(&not_after).ok_or_else(|| {
            field_error(
                "not_after",
                format!(
                    "{:?} is not an RFC 3339 UTC time like 2026-12-01T00:00:00Z",
                    shorten(&not_after)
                ),
            )
        })?;
        let audience = match required("audience", raw.audience)? {
            AudienceJson {
                agents: Some(agents),
                selector: None,
            } => {
                if agents.is_empty() || agents.len() > MAX_AUDIENCE_AGENTS {
                    return Err(field_error(
                        "audience.agents",
                        format!("must name 1 to {MAX_AUDIENCE_AGENTS} agents"),
                    ));
                }
                if let Some(bad) = agents.iter().find(|a| !crate::id::is_agent_id(a)) {
                    return Err(field_error(
                        "audience.agents",
                        format!("{:?} is not an agent id", shorten(bad)),
                    ));
                }
                Audience::Agents(agents)
            }
            AudienceJson {
                agents: None,
                selector: Some(selector),
            } => {
                if selector.len() > MAX_ENTRIES {
                    return Err(field_error(
                        "audience.selector",
                        format!("has more than {MAX_ENTRIES} labels"),
                    ));
                }
                for (k, v) in &selector {
                    if k.is_empty() {
                        return Err(field_error("audience.selector", "has an empty key"));
                    }
                    check_text("audience.selector", k)?;
                    check_text("audience.selector", v)?;
                }
                Audience::Selector(selector)
            }
            _ => {
                return Err(field_error(
                    "audience",
                    "must be exactly one of {\"agents\": [ids]} or {\"selector\": {key: value}}",
                ));
            }
        };
        let timeout = check_timeout(
            "timeout",
            raw.timeout.as_deref(),
            DEFAULT_TIMEOUT,
            MAX_TIMEOUT,
        )?;
        let spec = match task_type.as_str() {
            "file" => {
                let path = required("path", raw.path)?;
                check_file_path(&path)?;
                let encoded = required("content_base64", raw.content_base64)?;
                let content = dsse::decode_base64("content_base64", &encoded)
                    .map_err(|_| field_error("content_base64", "is not base64"))?;
                if content.len() > MAX_FILE_BYTES {
                    return Err(field_error(
                        "content_base64",
                        format!("decodes to more than {MAX_FILE_BYTES} bytes"),
                    ));
                }
                let mode = parse_mode(&required("mode", raw.mode)?)?;
                TaskSpec::File(FileTask {
                    path,
                    content,
                    mode,
                })
            }
            "container" => {
                let name = required("name", raw.name)?;
                check_container_name(&name)?;
                let image = required("image", raw.image)?;
                check_image_reference(&image)?;
                if let Some(archive) = &raw.image_archive
                    && !is_sha256_hex(archive)
                {
                    return Err(field_error(
                        "image_archive",
                        "is not a sha256 of 64 lowercase hex digits",
                    ));
                }
                let env = raw.env.unwrap_or_default();
                if env.len() > MAX_ENTRIES {
                    return Err(field_error(
                        "env",
                        format!("has more than {MAX_ENTRIES} entries"),
                    ));
                }
                for (k, v) in &env {
                    if !check_env_key(k) {
                        return Err(field_error(
                            "env",
                            format!("{:?} is not a variable name", shorten(k)),
                        ));
                    }
                    check_text("env", v)?;
                }
                let ports = raw.ports.unwrap_or_default();
                if ports.len() > MAX_ENTRIES {
                    return Err(field_error(
                        "ports",
                        format!("has more than {MAX_ENTRIES} entries"),
                    ));
                }
                for port in &ports {
                    check_port(port)?;
                }
                let health = match raw.health {
                    None => None,
                    Some(h) => {
                        let cmd = required("health.cmd", h.cmd)?;
                        if cmd.is_empty() || cmd.len() > MAX_ENTRIES {
                            return Err(field_error(
                                "health.cmd",
                                format!("must have 1 to {MAX_ENTRIES} arguments"),
                            ));
                        }
                        for arg in &cmd {
                            check_text("health.cmd", arg)?;
                        }
                        let timeout = check_timeout(
                            "health.timeout",
                            h.timeout.as_deref(),
                            DEFAULT_HEALTH_TIMEOUT,
                            Duration::from_secs(600),
                        )?;
                        Some(HealthCheck { cmd, timeout })
                    }
                };
                TaskSpec::Container(ContainerTask {
                    name,
                    image,
                    image_archive: raw.image_archive,
                    env,
                    ports,
                    health,
                })
            }
            other => {
                return Err(TaskError::UnknownType {
                    found: other.to_owned(),
                });
            }
        };
        Ok(Task {
            id,
            not_after,
            not_after_unix,
            audience,
            timeout,
            spec,
        })
    }

    /// Refuses the task once `not_after` has passed at `now` (Unix seconds).
    pub fn check_fresh(&self, now_unix: u64) -> Result<(), TaskError> {
        if now_unix > self.not_after_unix {
            return Err(TaskError::Expired {
                not_after: self.not_after.clone(),
            });
        }
        Ok(())
    }
}

/// A task envelope checked for shape, without its signature: what the server
/// can check at `task create`, not knowing the deploy key.
#[derive(Debug, Clone)]
pub struct CheckedEnvelope {
    pub envelope: Envelope,
    /// The decoded payload (the task JSON as signed).
    pub payload: Vec<u8>,
    pub task: Task,
}

impl CheckedEnvelope {
    /// The server's id of this task ([`server_task_id`]).
    pub fn server_id(&self) -> String {
        server_task_id(&self.payload)
    }
}

/// Checks an envelope's shape (size, DSSE JSON, payload type, at least one
/// signature, signatures decode) and its task's shape. Signatures are not
/// verified: that needs the deploy key.
pub fn check_envelope(bytes: &[u8]) -> Result<CheckedEnvelope, TaskError> {
    if bytes.len() > MAX_ENVELOPE_BYTES {
        return Err(DsseError::TooLarge { len: bytes.len() }.into());
    }
    let envelope = Envelope::from_json(bytes)?;
    if envelope.payload_type != PAYLOAD_TYPE {
        return Err(DsseError::PayloadType {
            found: envelope.payload_type,
            expected: PAYLOAD_TYPE.to_owned(),
        }
        .into());
    }
    if envelope.signatures.is_empty() {
        return Err(TaskError::Unsigned);
    }
    if envelope.signatures.len() > dsse::MAX_SIGNATURES {
        return Err(DsseError::TooManySignatures {
            count: envelope.signatures.len(),
        }
        .into());
    }
    for (i, s) in envelope.signatures.iter().enumerate() {
        dsse::decode_base64(&format!("signatures[{i}].sig"), &s.sig)?;
    }
    let payload = dsse::decode_base64("payload", &envelope.payload)?;
    let task = Task::from_json(&payload)?;
    Ok(CheckedEnvelope {
        envelope,
        payload,
        task,
    })
}

/// The tail of a run's output as results carry it: the last
/// [`MAX_OUTPUT_LINES`] lines and at most [`MAX_OUTPUT_BYTES`] bytes, control
/// characters other than newline and tab shown as spaces.
pub fn output_tail(text: &str) -> String {
    let text = text.strip_suffix('\n').unwrap_or(text);
    let mut start = 0;
    if let Some((i, _)) = text.rmatch_indices('\n').nth(MAX_OUTPUT_LINES - 1) {
        start = i + 1;
    }
    if text.len() - start > MAX_OUTPUT_BYTES {
        start = text.len() - MAX_OUTPUT_BYTES;
        while !text.is_char_boundary(start) {
            start += 1;
        }
    }
    text[start..]
        .chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                ' '
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "agt_aaaaaaaaaaaaaaaaaaaaaaaaaa";
    const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn file_json() -> String {
        format!(
            r#"{{"id":"deploy-1","type":"file","not_after":"2030-01-01T00:00:00Z","audience":{{"agents":["{AGENT}"]}},"path":"/etc/app.conf","content_base64":"aGVsbG8K","mode":"0644"}}"#
        )
    }

    fn container_json() -> String {
        format!(
            r#"{{"id":"web-7","type":"container","not_after":"2030-01-01T00:00:00Z","timeout":"5m","audience":{{"selector":{{"role":"web"}}}},"name":"web","image":"localhost/web@sha256:{DIGEST}","image_archive":"{DIGEST}","env":{{"PORT":"80"}},"ports":["8080:80","127.0.0.1:9090:90/udp"],"health":{{"cmd":["true"],"timeout":"10s"}}}}"#
        )
    }

    fn edited(json: &str, from: &str, to: &str) -> Result<Task, TaskError> {
        assert!(json.contains(from), "{from} not in {json}");
        Task::from_json(json.replacen(from, to, 1).as_bytes())
    }

    #[test]
    fn parses_a_file_task() {
        let task = Task::from_json(file_json().as_bytes()).unwrap();
        assert_eq!(task.id, "deploy-1");
        assert_eq!(task.not_after_unix, 1_893_456_000);
        assert_eq!(task.timeout, DEFAULT_TIMEOUT);
        assert_eq!(task.audience, Audience::Agents(vec![AGENT.into()]));
        assert_eq!(
            task.spec,
            TaskSpec::File(FileTask {
                path: "/etc/app.conf".into(),
                content: b"hello\n".to_vec(),
                mode: 0o644,
            })
        );
        assert_eq!(task.spec.type_name(), "file");
        assert!(task.spec.capabilities().is_empty());
        assert!(task.check_fresh(1_893_456_000).is_ok());
        assert!(matches!(
            task.check_fresh(1_893_456_001),
            Err(TaskError::Expired { .. })
        ));
    }

    #[test]
    fn parses_a_container_task() {
        let task = Task::from_json(container_json().as_bytes()).unwrap();
        assert_eq!(task.timeout, Duration::from_secs(300));
        let TaskSpec::Container(c) = &task.spec else {
            panic!("{task:?}");
        };
        assert_eq!(c.name, "web");
        assert_eq!(c.image_archive.as_deref(), Some(DIGEST));
        assert_eq!(c.env["PORT"], "80");
        assert_eq!(c.ports.len(), 2);
        assert_eq!(
            c.health,
            Some(HealthCheck {
                cmd: vec!["true".into()],
                timeout: Duration::from_secs(10)
            })
        );
        assert_eq!(task.spec.capabilities(), ["podman", "docker"]);
        let minimal = format!(
            r#"{{"id":"w","type":"container","not_after":"2030-01-01T00:00:00Z","audience":{{"selector":{{}}}},"name":"w","image":"registry.example:5000/team/web@sha256:{DIGEST}"}}"#
        );
        let task = Task::from_json(minimal.as_bytes()).unwrap();
        assert!(task.audience.includes("agt_x", &Labels::new()));
    }

    #[test]
    fn audiences_match_ids_or_labels() {
        let labels = Labels::from([("role".into(), "web".into()), ("dc".into(), "1".into())]);
        let by_label = Audience::Selector(Labels::from([("role".into(), "web".into())]));
        assert!(by_label.includes("agt_x", &labels));
        assert!(!by_label.includes("agt_x", &Labels::new()));
        let by_id = Audience::Agents(vec![AGENT.into()]);
        assert!(by_id.includes(AGENT, &Labels::new()));
        assert!(!by_id.includes("agt_other", &labels));
    }

    #[test]
    fn refuses_bad_shapes() {
        let file = file_json();
        let container = container_json();
        let cases: Vec<(Result<Task, TaskError>, &str)> = vec![
            (Task::from_json(b"{"), "JSON"),
            (Task::from_json(b"[1]"), "JSON"),
            (
                edited(&file, r#""type":"file""#, r#""type":"shell""#),
                "unknown",
            ),
            (edited(&file, r#""id":"deploy-1""#, r#""id":"""#), "id"),
            (edited(&file, r#""id":"deploy-1""#, r#""id":"a b""#), "id"),
            (edited(&file, r#""id":"deploy-1","#, ""), "id: is missing"),
            (
                edited(&file, "2030-01-01T00:00:00Z", "tomorrow"),
                "not_after",
            ),
            (edited(&file, "/etc/app.conf", "etc/app.conf"), "absolute"),
            (edited(&file, "/etc/app.conf", "/etc/../app.conf"), ".."),
            (edited(&file, "/etc/app.conf", "/etc/./app.conf"), ".."),
            (edited(&file, "/etc/app.conf", "/etc//app.conf"), "empty"),
            (edited(&file, "/etc/app.conf", "/etc/"), "directory"),
            (edited(&file, "aGVsbG8K", "not base64!"), "base64"),
            (edited(&file, r#""0644""#, r#""644x""#), "octal"),
            (edited(&file, r#""0644""#, r#""4755""#), "octal"),
            (
                edited(&file, r#"{"agents":["#, r#"{"selector":{},"agents":["#),
                "exactly one",
            ),
            (edited(&file, AGENT, "agt_nope"), "agent id"),
            (
                edited(&file, r#""mode":"0644""#, r#""timeout":"0s","mode":"0644""#),
                "timeout",
            ),
            (
                edited(
                    &container,
                    "localhost/web@sha256:",
                    "localhost/web:latest@sha256:",
                ),
                "tag",
            ),
            (
                edited(&container, "localhost/web@sha256:", "localhost/web:sha256:"),
                "digest",
            ),
            (
                edited(&container, &format!("web@sha256:{DIGEST}"), "web:latest"),
                "digest",
            ),
            (
                edited(&container, r#""name":"web""#, r#""name":"-web""#),
                "container name",
            ),
            (
                edited(&container, r#""image_archive":"0"#, r#""image_archive":"X"#),
                "sha256",
            ),
            (edited(&container, "8080:80", "80"), "HOST:CONTAINER"),
            (
                edited(&container, "8080:80", "8080:99999"),
                "HOST:CONTAINER",
            ),
            (edited(&container, r#""PORT""#, r#""1PORT""#), "variable"),
            (
                edited(&container, r#""cmd":["true"]"#, r#""cmd":[]"#),
                "health.cmd",
            ),
        ];
        for (result, want) in cases {
            let err = result.expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} should say {want:?}");
        }
        let big = dsse::decode_base64("x", "AAAA")
            .unwrap()
            .repeat(MAX_FILE_BYTES);
        use base64::Engine;
        let huge = base64::engine::general_purpose::STANDARD.encode(big);
        assert!(edited(&file, "aGVsbG8K", &huge).is_err());
    }

    #[test]
    fn envelopes_are_checked_without_a_key() {
        let (key, _) = dsse::SigningKey::generate().unwrap();
        let env = dsse::sign(&key, PAYLOAD_TYPE, file_json().as_bytes());
        let checked = check_envelope(env.to_json().as_bytes()).unwrap();
        assert_eq!(checked.payload, file_json().as_bytes());
        assert_eq!(checked.task.id, "deploy-1");
        let id = checked.server_id();
        assert!(is_server_task_id(&id));
        assert_eq!(id, server_task_id(file_json().as_bytes()));
        assert_ne!(id, server_task_id(container_json().as_bytes()));
        // What the agent does with the same envelope and the key.
        let payload = dsse::verify(env.to_json().as_bytes(), PAYLOAD_TYPE, &key.public_key());
        assert_eq!(payload.unwrap(), file_json().as_bytes());

        let release = dsse::sign(&key, crate::release::PAYLOAD_TYPE, file_json().as_bytes());
        assert!(matches!(
            check_envelope(release.to_json().as_bytes()),
            Err(TaskError::Envelope(DsseError::PayloadType { .. }))
        ));
        let mut unsigned = env;
        unsigned.signatures.clear();
        assert_eq!(
            check_envelope(unsigned.to_json().as_bytes()).unwrap_err(),
            TaskError::Unsigned
        );
        assert!(matches!(
            check_envelope(b"{\"payloadType\":1}"),
            Err(TaskError::Envelope(DsseError::Json))
        ));
        let bad_task = dsse::sign(&key, PAYLOAD_TYPE, b"{\"id\":\"x\"}");
        assert!(check_envelope(bad_task.to_json().as_bytes()).is_err());
        assert!(check_envelope(&vec![b' '; MAX_ENVELOPE_BYTES + 1]).is_err());
    }

    #[test]
    fn the_largest_file_task_fits_an_envelope() {
        use base64::Engine;
        let content =
            base64::engine::general_purpose::STANDARD.encode(vec![0xffu8; MAX_FILE_BYTES]);
        let json = file_json().replace("aGVsbG8K", &content);
        let (key, _) = dsse::SigningKey::generate().unwrap();
        let env = dsse::sign(&key, PAYLOAD_TYPE, json.as_bytes()).to_json();
        assert!(env.len() <= MAX_ENVELOPE_BYTES, "{}", env.len());
        assert!(check_envelope(env.as_bytes()).is_ok());
    }

    #[test]
    fn output_keeps_the_bounded_tail() {
        assert_eq!(output_tail("a\nb\n"), "a\nb");
        assert_eq!(output_tail("x\u{1b}[1m\ty"), "x [1m\ty");
        let lines: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let tail = output_tail(&lines);
        assert_eq!(tail.lines().count(), MAX_OUTPUT_LINES);
        assert!(tail.starts_with("line 36\n") && tail.ends_with("line 99"));
        let long = "é".repeat(MAX_OUTPUT_BYTES);
        let tail = output_tail(&long);
        assert!(tail.len() <= MAX_OUTPUT_BYTES && tail.len() >= MAX_OUTPUT_BYTES - 1);
    }
}
