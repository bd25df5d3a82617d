//! Fuzz entry points for every parser of untrusted input in Stella. Each
//! `fuzz_targets/<name>.rs` is a one-line libFuzzer target calling the
//! function of the same name here; `cargo test` (stable, no libFuzzer) replays
//! every seed in `corpus/<name>/` and every crash kept in `regressions/<name>/`
//! through the same functions.
//!
//! Besides "does not panic", the targets check properties a parser must keep:
//! what parses re-encodes to something that parses to the same value, and
//! refusals carry the statuses the API documents.
//!
//! The server's HTTP framing and CSR check and the agent's DER reader are
//! called in the agent's and the server's libraries, as the binaries call them.
#![forbid(unsafe_code)]

use std::cmp::Ordering;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use miniserde::{Deserialize, Serialize, json};
use stella_agent::der;
use stella_proto::dsse::{self, Envelope, PublicKey, SigningKey};
use stella_proto::release::{self, Statement, Version};
use stella_proto::{api, config, hash, id, pem, time, token};
use stella_server::{ca, http};

/// A fuzz target: takes any bytes, panics on a bug.
pub type Target = fn(&[u8]);

/// Every target by name: the names of `fuzz_targets/*.rs`, `corpus/*` and
/// `regressions/*`.
pub const TARGETS: &[(&str, Target)] = &[
    ("http_request", http_request),
    ("der_cert", der_cert),
    ("csr", csr),
    ("token", token),
    ("duration", duration),
    ("rfc3339", rfc3339),
    ("pem", pem),
    ("config", config),
    ("dsse", dsse),
    ("statement", statement),
    ("api_json", api_json),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

// ---------------------------------------------------------------------------
// Server: HTTP/1.1 request framing (server/src/http.rs `read_request`).

/// A byte stream that hands out its input in pieces of at most `step` bytes,
/// so heads and bodies split at every possible point are exercised.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl smol::io::AsyncRead for Trickle<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let n = this.data.len().min(buf.len()).min(this.step);
        buf[..n].copy_from_slice(&this.data[..n]);
        this.data = &this.data[n..];
        Poll::Ready(Ok(n))
    }
}

/// The server reads requests from a connection: the first byte picks how the
/// bytes arrive (whole, or in pieces of 1–128 bytes), the rest is the stream,
/// which may hold several pipelined requests.
pub fn http_request(data: &[u8]) {
    const MAX_BODY: usize = 4096;
    const SECOND: Duration = Duration::from_secs(1);
    let Some((&how, input)) = data.split_first() else {
        return;
    };
    let step = if how < 128 {
        usize::MAX
    } else {
        usize::from(how - 127)
    };
    let mut stream = Trickle { data: input, step };
    let mut buf = Vec::new();
    let mut out = Vec::new();
    smol::block_on(async {
        for _ in 0..16 {
            let answer =
                match http::read_request(&mut stream, &mut buf, SECOND, SECOND, MAX_BODY).await {
                    Ok(req) => {
                        assert!(req.body.len() <= MAX_BODY, "body over the limit accepted");
                        // What the router answers for an unknown path echoes it back.
                        let resp = http::Response::error(
                            404,
                            format!("no such endpoint: {} {}", req.method, req.path),
                        );
                        (resp, req.keep_alive)
                    }
                    Err(http::ReadError::Reject(resp)) => {
                        assert!(
                            matches!(resp.status, 400 | 413 | 431 | 501),
                            "unexpected refusal status {}",
                            resp.status
                        );
                        (resp, false)
                    }
                    Err(_) => return,
                };
            let (resp, keep_alive) = answer;
            // Every refusal body is the documented JSON error shape.
            let body = std::str::from_utf8(&resp.body).expect("error bodies are UTF-8");
            json::from_str::<api::ErrorBody>(body).expect("error bodies are {\"error\": ...}");
            http::write_response(&mut smol::io::sink(), &resp, keep_alive, &mut out)
                .await
                .expect("writing to a sink");
            if !keep_alive {
                return;
            }
        }
    });
}

// ---------------------------------------------------------------------------
// Agent: the certificate the server issues (agent/src/der.rs `cert_info`).

/// The agent reads serial, validity and key of the certificate it is issued.
pub fn der_cert(data: &[u8]) {
    if let Ok(info) = der::cert_info(data) {
        assert!(info.spki.len() <= data.len());
        assert!(info.serial.len().is_multiple_of(2));
    }
}

// ---------------------------------------------------------------------------
// Server: CSRs in registrations (server/src/ca.rs `check_csr`).

/// The server's check of a registration's PEM CSR; a refusal must say why.
fn check_csr(csr_pem: &str) {
    if let Err(e) = ca::check_csr(csr_pem) {
        assert!(!e.to_string().is_empty(), "a CSR refusal without a reason");
    }
}

/// The server decodes the PEM CSR of a registration and checks it; the input
/// is tried as PEM text, and as DER wrapped in PEM (so the fuzzer reaches the
/// DER parser without having to learn base64).
pub fn csr(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        check_csr(text);
    }
    check_csr(&pem::encode("CERTIFICATE REQUEST", data));
}

// ---------------------------------------------------------------------------
// proto: small string formats.

/// Registration tokens, CA pins, hex and agent ids.
pub fn token(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = stella_proto::RegistrationToken::parse(s) {
        assert_eq!(t.expose(), s);
        assert!(token::is_token_id(t.id()));
        assert!(t.matches_hash(&t.secret_hash()));
        assert!(
            !format!("{t:?}").contains(t.secret()),
            "Debug shows the secret"
        );
    }
    if let Ok(pin) = hash::parse_pin(s) {
        assert_eq!(
            format!("sha256:{}", hash::hex(&pin)),
            s.to_ascii_lowercase()
        );
    }
    if let Some(bytes) = hash::unhex(s) {
        assert_eq!(hash::hex(&bytes), s.to_ascii_lowercase());
    }
    if id::is_agent_id(s) {
        // 26 base32 characters carry the 128 bits the id was made from.
        let value = s[id::AGENT_ID_PREFIX.len()..].bytes().fold(0u128, |v, c| {
            let digit = b"abcdefghijklmnopqrstuvwxyz234567"
                .iter()
                .position(|&a| a == c)
                .expect("agent id alphabet");
            (v << 5) | digit as u128
        });
        assert_eq!(id::agent_id_from_bytes(value.to_be_bytes()), s);
    }
}

/// Durations (`90s`, `5m`, ...) from command lines and config.
pub fn duration(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match stella_proto::parse_duration(s) {
        Ok(d) => {
            let formatted = stella_proto::format_duration(d);
            assert_eq!(
                stella_proto::parse_duration(&formatted),
                Ok(d),
                "{formatted}"
            );
        }
        Err(e) => drop(e.to_string()),
    }
}

/// RFC 3339 times, both ways.
pub fn rfc3339(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data)
        && let Some(t) = time::parse_rfc3339(s)
    {
        assert_eq!(time::parse_rfc3339(&time::rfc3339(t)), Some(t), "{s}");
    }
    // Any time up to the year 9999 formats to something that parses back.
    if let Some(bytes) = data.get(..8) {
        let t = u64::from_le_bytes(bytes.try_into().expect("8 bytes")) % 253_402_300_800;
        assert_eq!(time::parse_rfc3339(&time::rfc3339(t)), Some(t));
    }
}

/// PEM blocks of every label we read, and the release key files.
pub fn pem(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for label in [
        "CERTIFICATE",
        "PRIVATE KEY",
        "PUBLIC KEY",
        "CERTIFICATE REQUEST",
    ] {
        if let Ok(blocks) = pem::decode_all(label, text) {
            for der in blocks {
                assert_eq!(pem::decode(label, &pem::encode(label, &der)), Ok(der));
            }
        }
    }
    if let Ok(key) = PublicKey::from_pem(text) {
        assert_eq!(PublicKey::from_pem(&key.to_pem()), Ok(key));
    }
    if let Ok(key) = SigningKey::from_pem(text) {
        let _ = key.public_key();
    }
}

// ---------------------------------------------------------------------------
// proto: configuration documents (pushed by the server, edited on disk).

/// A configuration document: parse, validate, canonical form and hash.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(doc) = config::parse(text) else {
        return;
    };
    if let Err(e) = config::parse_settings(&doc) {
        drop(e.to_string());
    }
    // The canonical form parses, and is a fixed point for documents whose
    // numbers are all 64-bit integers: their hash does not change when the
    // server stores them or an agent receives them. Other numbers (fractions,
    // integers past 64 bits) become f64, which miniserde does not parse back
    // exactly (regressions/config/): the server must refuse those.
    let canonical = config::canonical(&doc);
    let again = config::parse(&canonical).expect("the canonical form parses");
    if !has_float(&doc) {
        assert_eq!(config::canonical(&again), canonical);
        assert_eq!(config::hash(&again), config::hash(&doc));
        // Merging a document over itself changes nothing.
        if matches!(doc, json::Value::Object(_)) {
            assert_eq!(config::canonical(&config::merge([&doc, &again])), canonical);
        }
    }
}

/// Whether a number anywhere in `doc` is held as an f64.
fn has_float(doc: &json::Value) -> bool {
    let mut stack = vec![doc];
    while let Some(v) = stack.pop() {
        match v {
            json::Value::Number(json::Number::F64(_)) => return true,
            json::Value::Array(items) => stack.extend(items.iter()),
            json::Value::Object(map) => stack.extend(map.values()),
            _ => {}
        }
    }
    false
}

// ---------------------------------------------------------------------------
// proto: signed releases.

/// The release key the `dsse` target verifies with (a fixed test key: seed
/// 32 × 0x07), so a signed seed envelope reaches the statement parser.
pub fn fixed_release_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&[7; 32]);
        SigningKey::from_pkcs8_der(&der).expect("fixed Ed25519 test key")
    })
}

/// A DSSE envelope as the agent gets it in an update offer and a bundle,
/// verified with a pinned key, and its statement; and as a task envelope.
pub fn dsse(data: &[u8]) {
    let key = fixed_release_key().public_key();
    if let Ok(envelope) = Envelope::from_json(data) {
        assert_eq!(
            Envelope::from_json(envelope.to_json().as_bytes()).as_ref(),
            Ok(&envelope),
            "a parsed envelope re-encodes to itself"
        );
        match envelope.verify(release::PAYLOAD_TYPE, &key) {
            Ok(payload) => statement(&payload),
            Err(e) => drop(e.to_string()),
        }
    }
    let _ = dsse::verify(data, release::PAYLOAD_TYPE, &key);
    // The same bytes as a task envelope, checked as the server does at
    // `task create` (and the agent before it verifies).
    if let Ok(checked) = stella_proto::task::check_envelope(data) {
        assert_eq!(
            stella_proto::task::Task::from_json(&checked.payload).as_ref(),
            Ok(&checked.task),
            "a checked task parses again to itself"
        );
        assert!(stella_proto::task::is_server_task_id(&checked.server_id()));
    }
}

/// An in-toto release statement, and the version and path grammars it uses.
pub fn statement(data: &[u8]) {
    match Statement::from_json(data) {
        Ok(st) => {
            assert_eq!(
                Statement::from_json(st.to_json().as_bytes()).as_ref(),
                Ok(&st)
            );
            let version = st.version().expect("validated");
            if let Some(from) = st.allow_downgrade_from().expect("validated") {
                assert!(from > version);
            }
            for subject in &st.subject {
                assert!(st.subject_for(&subject.name).is_some());
            }
        }
        Err(e) => drop(e.to_string()),
    }
    // Two versions, split at the first newline: precedence is a total order.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (a, b) = text.split_once('\n').unwrap_or((text, "1.0.0"));
    let _ = release::check_subject_name(a);
    if let (Ok(va), Ok(vb)) = (Version::parse(a), Version::parse(b)) {
        assert_eq!(va.cmp(&vb), vb.cmp(&va).reverse());
        assert_eq!(va == vb, va.cmp(&vb) == Ordering::Equal);
        assert_eq!(Version::parse(&va.to_string()).ok(), Some(va));
        assert_eq!(
            release::compare_versions(a, b).ok(),
            Some(Version::parse(a).ok().cmp(&Version::parse(b).ok()))
        );
    }
}

// ---------------------------------------------------------------------------
// proto: every JSON body of the API.

/// What parses re-encodes to JSON that parses again. (Not to the same text:
/// numbers held as f64 may move by one unit in the last place; see `config`.)
fn json_round_trip<T: Serialize + Deserialize>(text: &str) {
    if let Ok(value) = json::from_str::<T>(text) {
        let encoded = json::to_string(&value);
        if json::from_str::<T>(&encoded).is_err() {
            panic!("the re-encoded body does not parse: {encoded}");
        }
    }
}

/// Every request and answer body of `/v1/`: the first byte picks the type.
pub fn api_json(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let all: &[fn(&str)] = &[
        // Requests the server parses.
        json_round_trip::<api::RegisterRequest>,
        json_round_trip::<api::HeartbeatRequest>,
        json_round_trip::<api::RenewRequest>,
        json_round_trip::<api::ChallengeRequest>,
        json_round_trip::<api::RecoverRequest>,
        json_round_trip::<api::TokenCreateRequest>,
        json_round_trip::<api::ConfigSetRequest>,
        json_round_trip::<api::RolloutStartRequest>,
        json_round_trip::<api::ReleaseImportRequest>,
        json_round_trip::<api::AgentUpdateRequest>,
        // Answers the agent parses.
        json_round_trip::<api::RegisterResponse>,
        json_round_trip::<api::HeartbeatResponse>,
        json_round_trip::<api::CertificateResponse>,
        json_round_trip::<api::ChallengeResponse>,
        json_round_trip::<api::SelfView>,
        json_round_trip::<api::ErrorBody>,
        json_round_trip::<api::UpdateOffer>,
        // Answers the admin CLI parses.
        json_round_trip::<api::TokenCreateResponse>,
        json_round_trip::<Vec<api::AgentView>>,
        json_round_trip::<api::AgentView>,
        json_round_trip::<api::ConfigShowResponse>,
        json_round_trip::<api::ConfigScopeView>,
        json_round_trip::<Vec<api::DriftRow>>,
        json_round_trip::<Vec<api::ReleaseView>>,
        json_round_trip::<api::RolloutView>,
        json_round_trip::<api::RolloutStageView>,
        // Parts.
        json_round_trip::<api::Platform>,
        json_round_trip::<api::DoctorSummary>,
        json_round_trip::<api::UpdateReport>,
        json_round_trip::<api::ConfigRefusal>,
        json_round_trip::<api::ReleaseFileView>,
    ];
    all[usize::from(which) % all.len()](text);
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        out.retain(|p| p.is_file());
        out.sort();
        out
    }

    /// Replays every seed and every kept crash through its target; names the
    /// file that fails.
    #[test]
    fn corpus_and_regressions_replay() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut replayed = 0;
        let mut failed = Vec::new();
        for kind in ["corpus", "regressions"] {
            for dir in files_and_dirs(&root.join(kind)) {
                let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let run = target(name)
                    .unwrap_or_else(|| panic!("{} names no fuzz target", dir.display()));
                for file in files(&dir) {
                    let bytes = std::fs::read(&file).expect("read input");
                    if std::panic::catch_unwind(|| run(&bytes)).is_err() {
                        failed.push(file.display().to_string());
                    }
                    replayed += 1;
                }
            }
        }
        assert!(
            failed.is_empty(),
            "inputs that fail their target: {failed:#?}"
        );
        assert!(replayed >= TARGETS.len(), "only {replayed} inputs replayed");
    }

    fn files_and_dirs(dir: &Path) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        out.retain(|p| p.is_dir());
        out.sort();
        out
    }

    #[test]
    fn every_target_has_seeds() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for (name, _) in TARGETS {
            assert!(
                !files(&root.join("corpus").join(name)).is_empty(),
                "corpus/{name} has no seeds"
            );
            assert!(
                root.join("fuzz_targets")
                    .join(format!("{name}.rs"))
                    .is_file(),
                "fuzz_targets/{name}.rs is missing"
            );
        }
    }

    /// Writes the seeds that must be computed (a validly signed envelope and
    /// statement). Run with `cargo test -- --ignored write_computed_seeds`.
    #[test]
    #[ignore]
    fn write_computed_seeds() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        let st = Statement::new(
            "1.2.0",
            Some("1.3.0-rc.1"),
            vec![
                release::Subject::new("x86_64-unknown-linux-musl/stella-agent", &[1; 32]),
                release::Subject::new("aarch64-unknown-linux-musl/stella-agent", &[2; 32]),
            ],
        )
        .expect("statement");
        let envelope = dsse::sign(
            fixed_release_key(),
            release::PAYLOAD_TYPE,
            st.to_json().as_bytes(),
        );
        for (dir, name, bytes) in [
            ("dsse", "signed", envelope.to_json().into_bytes()),
            ("statement", "release", st.to_json().into_bytes()),
        ] {
            let dir = root.join(dir);
            std::fs::create_dir_all(&dir).expect("corpus dir");
            std::fs::write(dir.join(name), bytes).expect("write seed");
        }
        // The seed verifies, so the fuzzer starts past the signature check.
        dsse(&std::fs::read(root.join("dsse/signed")).expect("seed"));
        assert!(
            dsse::verify(
                &std::fs::read(root.join("dsse/signed")).expect("seed"),
                release::PAYLOAD_TYPE,
                &fixed_release_key().public_key()
            )
            .is_ok()
        );
    }
}
