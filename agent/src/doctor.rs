//! `stella-agent doctor`: the 11 checks of DESIGN.md section 8. Each returns
//! pass, warn, fail or skip with a stable `id/finding` code, a one-line
//! message and its duration. Checks only read: they never write a byte (the
//! write probe is `access(2)` plus the mount's read-only flag). Results live
//! in fixed-capacity storage; a message is a fixed-size string.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::fs;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use miniserde::json;
use stella_proto::api::{DoctorSummary, SelfView};
use stella_proto::config::Settings;
use stella_proto::time::rfc3339;

use crate::der::{self, CertInfo};
use crate::identity;
use crate::state::{
    AGENT_CERT, AGENT_KEY, CA_CERT, CONFIG_JSON, MarkerPhase, NEXT_CERT, StateDir, StateFile,
};
use crate::{sys, tls, transport};

/// The checks, in the order they run and print.
pub(crate) const CHECK_IDS: [&str; 11] = [
    "identity.certificate",
    "identity.renewal",
    "identity.key",
    "server.reachable",
    "time.skew",
    "heartbeat.recent",
    "config.drift",
    "storage.space",
    "storage.writable",
    "update.integrity",
    "host.resources",
];

/// The finding of each identity-dependent check on a host not yet enrolled.
const NOT_ENROLLED: [&str; 9] = [
    "identity.certificate/not-enrolled",
    "identity.renewal/not-enrolled",
    "identity.key/not-enrolled",
    "server.reachable/not-enrolled",
    "time.skew/not-enrolled",
    "heartbeat.recent/not-enrolled",
    "config.drift/not-enrolled",
    "storage.writable/not-enrolled",
    "update.integrity/not-enrolled",
];

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Pass,
    Warn,
    Fail,
    Skip,
}

impl Status {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
            Status::Skip => "skip",
        }
    }

    fn mark(self) -> &'static str {
        match self {
            Status::Pass => "[✓]",
            Status::Warn => "[!]",
            Status::Fail => "[✗]",
            Status::Skip => "[-]",
        }
    }
}

/// A one-line message without heap allocation (long text is cut).
pub(crate) type Message = heapless::String<200>;

/// One check's result.
#[derive(Debug, Clone)]
pub(crate) struct CheckResult {
    pub(crate) id: &'static str,
    pub(crate) status: Status,
    /// `id/finding`, stable: remediation patterns match on it.
    pub(crate) code: &'static str,
    pub(crate) message: Message,
    pub(crate) duration_us: u64,
}

/// All results of one run.
#[derive(Debug, Clone, Default)]
pub(crate) struct Report {
    pub(crate) checks: heapless::Vec<CheckResult, 11>,
}

impl Report {
    /// Counts by status, and the failing ids.
    pub(crate) fn summary(&self) -> DoctorSummary {
        let mut s = DoctorSummary::default();
        for c in &self.checks {
            match c.status {
                Status::Pass => s.pass += 1,
                Status::Warn => s.warn += 1,
                Status::Fail => {
                    s.fail += 1;
                    s.failing.push(c.id.to_owned());
                }
                Status::Skip => s.skip += 1,
            }
        }
        s
    }

    pub(crate) fn any_failed(&self) -> bool {
        self.checks.iter().any(|c| c.status == Status::Fail)
    }
}

/// What a finding is, before timing is added.
struct Finding {
    status: Status,
    code: &'static str,
    message: Message,
}

fn finding(status: Status, code: &'static str, args: std::fmt::Arguments<'_>) -> Finding {
    let mut message = Message::new();
    // A message longer than the buffer is cut, never an error.
    let _ = message.write_fmt(args);
    Finding {
        status,
        code,
        message,
    }
}

macro_rules! pass { ($code:literal, $($t:tt)*) => { finding(Status::Pass, $code, format_args!($($t)*)) } }
macro_rules! warn { ($code:literal, $($t:tt)*) => { finding(Status::Warn, $code, format_args!($($t)*)) } }
macro_rules! fail { ($code:literal, $($t:tt)*) => { finding(Status::Fail, $code, format_args!($($t)*)) } }
macro_rules! skip { ($code:literal, $($t:tt)*) => { finding(Status::Skip, $code, format_args!($($t)*)) } }

/// What the server said when probed, shared by the reachability and clock checks.
#[derive(Debug, Clone)]
struct Probe {
    finding_status: Status,
    /// Local clock minus server clock (ms), if the server answered.
    skew_ms: Option<i64>,
}

/// Everything the checks read.
pub(crate) struct Doctor<'a> {
    pub(crate) state: &'a StateDir,
    pub(crate) saved: StateFile,
    pub(crate) settings: Settings,
    probe: RefCell<Option<Probe>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `90s`-style text for a number of seconds.
fn human(secs: u64) -> String {
    match secs {
        s if s >= 2 * 86_400 => format!("{}d", s / 86_400),
        s if s >= 2 * 3600 => format!("{}h", s / 3600),
        s if s >= 120 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// Why a PEM certificate of the state dir could not be read.
enum PemProblem {
    Missing,
    Unparsable,
}

fn pem_cert(state: &StateDir, name: &str) -> Result<Vec<u8>, PemProblem> {
    let text = state.read_text(name).map_err(|_| PemProblem::Missing)?;
    identity::cert_der_from_pem(&text, name).map_err(|_| PemProblem::Unparsable)
}

impl<'a> Doctor<'a> {
    pub(crate) fn new(state: &'a StateDir) -> Self {
        let saved = state.state_file();
        let settings = crate::config::ConfigState::load(&saved).settings;
        Self {
            state,
            saved,
            settings,
            probe: RefCell::new(None),
        }
    }

    /// Runs every check.
    pub(crate) fn run_all(&self) -> Report {
        let mut report = Report::default();
        for id in CHECK_IDS {
            let _ = report.checks.push(self.run_one(id));
        }
        report
    }

    /// Runs one check by id.
    pub(crate) fn run_one(&self, id: &'static str) -> CheckResult {
        let start = Instant::now();
        let needs_identity = !matches!(id, "host.resources" | "storage.space");
        let f = if needs_identity && !self.state.is_enrolled() {
            let code = NOT_ENROLLED
                .iter()
                .find(|c| c.starts_with(id))
                .copied()
                .unwrap_or("doctor/not-enrolled");
            finding(
                Status::Skip,
                code,
                format_args!("this host is not enrolled (no agent.json)"),
            )
        } else {
            match id {
                "identity.certificate" => self.certificate(),
                "identity.renewal" => self.renewal(),
                "identity.key" => self.key(),
                "server.reachable" => self.reachable(),
                "time.skew" => self.skew(),
                "heartbeat.recent" => self.heartbeat(),
                "config.drift" => self.config(),
                "storage.space" => self.space(),
                "storage.writable" => self.writable(),
                "update.integrity" => self.integrity(),
                _ => self.resources(),
            }
        };
        CheckResult {
            id,
            status: f.status,
            code: f.code,
            message: f.message,
            duration_us: start.elapsed().as_micros() as u64,
        }
    }

    fn cert_info(&self) -> Option<CertInfo> {
        pem_cert(self.state, AGENT_CERT)
            .ok()
            .and_then(|d| der::cert_info(&d).ok())
    }

    fn certificate(&self) -> Finding {
        let cert_der = match pem_cert(self.state, AGENT_CERT) {
            Ok(d) => d,
            Err(PemProblem::Missing) => {
                return fail!(
                    "identity.certificate/missing",
                    "agent.pem is missing from the state dir"
                );
            }
            Err(PemProblem::Unparsable) => {
                return fail!(
                    "identity.certificate/unparsable",
                    "agent.pem is not a PEM certificate"
                );
            }
        };
        let Ok(info) = der::cert_info(&cert_der) else {
            return fail!(
                "identity.certificate/unparsable",
                "agent.pem is not a valid X.509 certificate"
            );
        };
        let ca_der = match pem_cert(self.state, CA_CERT) {
            Ok(d) => d,
            Err(_) => {
                return fail!(
                    "identity.certificate/ca-missing",
                    "ca.pem is missing or unreadable"
                );
            }
        };
        let pinned = self
            .state
            .agent_file()
            .map(|a| a.ca_hash)
            .unwrap_or_default();
        if identity::ca_pin(&ca_der).ok().as_deref() != Some(pinned.as_str()) {
            return fail!(
                "identity.certificate/ca-pin",
                "ca.pem does not match the pinned CA hash {pinned}"
            );
        }
        let now = now_secs();
        if now < info.not_before {
            return fail!(
                "identity.certificate/not-yet-valid",
                "valid only from {} (check the clock)",
                rfc3339(info.not_before)
            );
        }
        if now >= info.not_after {
            return fail!(
                "identity.certificate/expired",
                "expired at {}",
                rfc3339(info.not_after)
            );
        }
        let anchor = rustls_pki_types::CertificateDer::from(ca_der.as_slice());
        let leaf = rustls_pki_types::CertificateDer::from(cert_der.as_slice());
        let chained = webpki::anchor_from_trusted_cert(&anchor)
            .ok()
            .is_some_and(|ta| {
                webpki::EndEntityCert::try_from(&leaf).is_ok_and(|ee| {
                    ee.verify_for_usage(
                        &[webpki::ring::ECDSA_P256_SHA256],
                        &[ta],
                        &[],
                        rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(now)),
                        webpki::KeyUsage::client_auth(),
                        None,
                        None,
                    )
                    .is_ok()
                })
            });
        if !chained {
            return fail!(
                "identity.certificate/untrusted",
                "agent.pem does not chain to the pinned CA"
            );
        }
        pass!(
            "identity.certificate/ok",
            "valid until {}, chains to the pinned CA",
            rfc3339(info.not_after)
        )
    }

    fn renewal(&self) -> Finding {
        let Some(info) = self.cert_info() else {
            return skip!("identity.renewal/no-certificate", "no readable certificate");
        };
        let now = now_secs();
        let lifetime = info.not_after.saturating_sub(info.not_before).max(1);
        let left = info.not_after.saturating_sub(now);
        let due = info.not_before + lifetime * 60 / 100;
        if left == 0 {
            return fail!(
                "identity.renewal/expired",
                "the certificate expired at {}",
                rfc3339(info.not_after)
            );
        }
        if left * 10 < lifetime {
            return fail!(
                "identity.renewal/overdue",
                "only {} left of {}: renewal is overdue",
                human(left),
                human(lifetime)
            );
        }
        if now >= due {
            return warn!(
                "identity.renewal/due",
                "renewal due: {} left of {}",
                human(left),
                human(lifetime)
            );
        }
        pass!(
            "identity.renewal/ok",
            "renewal window opens in {} ({} left)",
            human(due - now),
            human(left)
        )
    }

    fn key(&self) -> Finding {
        let path = self.state.path(AGENT_KEY);
        let Ok(meta) = fs::metadata(&path) else {
            return fail!("identity.key/missing", "agent.key is missing");
        };
        let key = self
            .state
            .read_text(AGENT_KEY)
            .ok()
            .and_then(|pem| stella_proto::pem::decode("PRIVATE KEY", &pem).ok())
            .and_then(|der| identity::load_key(&der).ok());
        let Some(key) = key else {
            return fail!(
                "identity.key/unparsable",
                "agent.key is not a P-256 PKCS#8 key"
            );
        };
        let matches = self
            .cert_info()
            .is_some_and(|c| c.spki == identity::key_spki(&key));
        if !matches {
            if self.state.path(NEXT_CERT).exists() {
                return fail!(
                    "identity.key/interrupted",
                    "a certificate renewal was interrupted: agent.key and agent.pem differ"
                );
            }
            return fail!(
                "identity.key/mismatch",
                "agent.key does not match agent.pem"
            );
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode != 0o600 {
            return fail!(
                "identity.key/mode",
                "agent.key has mode {mode:04o}; it must be 0600"
            );
        }
        pass!(
            "identity.key/ok",
            "agent.key matches the certificate, mode 0600"
        )
    }

    fn reachable(&self) -> Finding {
        let (f, probe) = self.probe_server();
        *self.probe.borrow_mut() = Some(probe);
        f
    }

    /// DNS, TCP, then TLS with the client certificate and an authenticated
    /// request that changes nothing on the server.
    fn probe_server(&self) -> (Finding, Probe) {
        let failed = |f: Finding| {
            let probe = Probe {
                finding_status: f.status,
                skew_ms: None,
            };
            (f, probe)
        };
        let agent = match self.state.agent_file() {
            Ok(a) => a,
            Err(_) => {
                return failed(fail!(
                    "server.reachable/unknown",
                    "agent.json is unreadable"
                ));
            }
        };
        let Ok((host, port)) = tls::host_port(&agent.server) else {
            return failed(fail!(
                "server.reachable/url",
                "server URL {} is invalid",
                agent.server
            ));
        };
        let t0 = Instant::now();
        let addr = match (host.as_str(), port)
            .to_socket_addrs()
            .map(|mut a| a.next())
        {
            Ok(Some(a)) => a,
            _ => return failed(fail!("server.reachable/dns", "cannot resolve {host}")),
        };
        let dns = t0.elapsed();
        let t1 = Instant::now();
        if let Err(e) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            return failed(fail!(
                "server.reachable/tcp",
                "cannot connect to {addr}: {e}"
            ));
        }
        let tcp = t1.elapsed();
        let ident = match identity::Identity::load(self.state) {
            Ok(i) => i,
            Err(e) => {
                return failed(fail!(
                    "server.reachable/identity",
                    "cannot load the identity: {e}"
                ));
            }
        };
        let client = match transport::http_client(
            &ident.ca_der,
            Some((&ident.cert_der, &ident.key_pem)),
            Duration::from_secs(5),
        ) {
            Ok(c) => c,
            Err(e) => return failed(fail!("server.reachable/tls", "TLS setup failed: {e}")),
        };
        let sent_ms = now_ms();
        let t2 = Instant::now();
        let answer = transport::get(&client, &format!("{}/v1/agents/self", agent.server));
        let latency = t2.elapsed();
        let received_ms = now_ms();
        let (status, text) = match answer {
            Ok(a) => a,
            Err(e) => {
                return failed(fail!(
                    "server.reachable/tls",
                    "TLS or HTTP to {} failed: {e}",
                    agent.server
                ));
            }
        };
        match status {
            200 => {}
            401 | 403 => {
                return failed(fail!(
                    "server.reachable/refused",
                    "the server refuses this agent: {}",
                    transport::error_message(&text)
                ));
            }
            other => {
                return failed(fail!(
                    "server.reachable/http",
                    "the server answered {other}"
                ));
            }
        }
        let view: Option<SelfView> = json::from_str(&text).ok();
        let skew_ms = view
            .as_ref()
            .map(|v| (sent_ms + received_ms) / 2 - v.server_time_ms as i64);
        let f = if view
            .as_ref()
            .is_some_and(|v| v.reason.as_deref() == Some("deactivated"))
        {
            warn!(
                "server.reachable/deactivated",
                "reachable, but this agent is deactivated by an administrator"
            )
        } else if latency > Duration::from_secs(1) {
            warn!(
                "server.reachable/slow",
                "{} answered in {} ms",
                agent.server,
                latency.as_millis()
            )
        } else {
            pass!(
                "server.reachable/ok",
                "{} answered in {:.1} ms (DNS {:.1} ms, TCP {:.1} ms)",
                agent.server,
                latency.as_secs_f64() * 1e3,
                dns.as_secs_f64() * 1e3,
                tcp.as_secs_f64() * 1e3
            )
        };
        let probe = Probe {
            finding_status: f.status,
            skew_ms,
        };
        (f, probe)
    }

    fn skew(&self) -> Finding {
        if self.probe.borrow().is_none() {
            let (_, probe) = self.probe_server();
            *self.probe.borrow_mut() = Some(probe);
        }
        let probe = self.probe.borrow().clone();
        let Some(skew) = probe.and_then(|p| p.skew_ms.filter(|_| p.finding_status != Status::Fail))
        else {
            return skip!("time.skew/unknown", "the server's clock could not be read");
        };
        let allowed = self.settings.max_clock_skew.as_millis() as i64;
        if skew.abs() > allowed {
            return fail!(
                "time.skew/skew",
                "the local clock is {} ms {} the server's (allowed {})",
                skew.abs(),
                if skew > 0 { "ahead of" } else { "behind" },
                stella_proto::format_duration(self.settings.max_clock_skew)
            );
        }
        pass!(
            "time.skew/ok",
            "within {} ms of the server's clock (allowed {})",
            skew.abs(),
            stella_proto::format_duration(self.settings.max_clock_skew)
        )
    }

    fn heartbeat(&self) -> Finding {
        let interval = match self.saved.heartbeat_interval_ms {
            0 => 30_000,
            ms => ms,
        } / 1000;
        let Some(last) = self
            .saved
            .last_heartbeat
            .as_deref()
            .and_then(stella_proto::time::parse_rfc3339)
        else {
            return warn!("heartbeat.recent/never", "no heartbeat acknowledged yet");
        };
        let age = now_secs().saturating_sub(last);
        if age > 3 * interval.max(1) {
            return fail!(
                "heartbeat.recent/stale",
                "last acknowledged {} ago (more than 3 intervals of {})",
                human(age),
                human(interval)
            );
        }
        pass!(
            "heartbeat.recent/ok",
            "last acknowledged {} ago (interval {})",
            human(age),
            human(interval)
        )
    }

    fn config(&self) -> Finding {
        let (Some(applied), Some(hash)) = (&self.saved.config, &self.saved.config_hash) else {
            return skip!("config.drift/none", "no configuration applied yet");
        };
        let Ok(bytes) = fs::read(self.state.path(CONFIG_JSON)) else {
            return fail!("config.drift/missing", "config.json is missing");
        };
        if bytes == applied.as_bytes() {
            return pass!(
                "config.drift/ok",
                "config.json matches the applied config {}",
                &hash[..hash.len().min(12)]
            );
        }
        let parses = std::str::from_utf8(&bytes)
            .ok()
            .and_then(stella_proto::config::parse)
            .is_some();
        if !parses {
            return fail!(
                "config.drift/unparsable",
                "config.json was changed and is not valid JSON"
            );
        }
        warn!(
            "config.drift/edited",
            "config.json was edited: it differs from the applied config {}",
            &hash[..hash.len().min(12)]
        )
    }

    fn space(&self) -> Finding {
        let dir = if self.state.root().exists() {
            self.state.root()
        } else {
            Path::new("/")
        };
        let stats = match sys::statvfs(dir) {
            Ok(s) => s,
            Err(e) => {
                return fail!(
                    "storage.space/unknown",
                    "cannot read free space of {}: {e}",
                    dir.display()
                );
            }
        };
        // Room for one staged update on top of the configured reserve.
        let binary = std::env::current_exe()
            .and_then(fs::metadata)
            .map_or(0, |m| m.len());
        let needed = self.settings.disk_min_free + 2 * binary;
        if stats.avail_bytes < needed {
            return fail!(
                "storage.space/low",
                "{} free, {} needed ({} reserve + room to stage an update; {} in staging/)",
                mib(stats.avail_bytes),
                mib(needed),
                mib(self.settings.disk_min_free),
                mib(self.state.staging_bytes())
            );
        }
        if stats.avail_inodes < 1024 {
            return fail!(
                "storage.space/inodes",
                "only {} inodes free",
                stats.avail_inodes
            );
        }
        pass!(
            "storage.space/ok",
            "{} and {} inodes free (need {})",
            mib(stats.avail_bytes),
            stats.avail_inodes,
            mib(needed)
        )
    }

    fn writable(&self) -> Finding {
        let root = self.state.root();
        let Ok(meta) = fs::metadata(root) else {
            return fail!(
                "storage.writable/missing",
                "the state dir {} is missing",
                root.display()
            );
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode != 0o700 {
            return fail!(
                "storage.writable/mode",
                "the state dir has mode {mode:04o}; it must be 0700"
            );
        }
        if sys::statvfs(root).is_ok_and(|s| s.read_only) {
            return fail!(
                "storage.writable/read-only",
                "the state dir is on a read-only filesystem"
            );
        }
        if !sys::can_write(root).unwrap_or(false) {
            return fail!(
                "storage.writable/denied",
                "this process cannot write to the state dir"
            );
        }
        let stale = self.state.stale_temp_files();
        if let Some(first) = stale.first() {
            return warn!(
                "storage.writable/stale-temp",
                "{} stale temp file(s), e.g. {}",
                stale.len(),
                first
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            );
        }
        pass!(
            "storage.writable/ok",
            "mode 0700, writable, no stale temp files"
        )
    }

    fn integrity(&self) -> Finding {
        if let Some(m) = &self.saved.update
            && m.phase == MarkerPhase::Swapping
        {
            return fail!(
                "update.integrity/interrupted",
                "an update to {} was interrupted during the binary swap",
                m.to_version
            );
        }
        // On probation the new binary is the one to match.
        let probation = self
            .saved
            .update
            .as_ref()
            .filter(|m| m.phase == MarkerPhase::Probation)
            .map(|m| &m.to_sha256);
        let Some(recorded) = probation.or(self.saved.binary_sha256.as_ref()) else {
            return skip!(
                "update.integrity/unrecorded",
                "no installed digest recorded for this binary"
            );
        };
        let exe = match std::env::current_exe() {
            Ok(p) => p,
            Err(e) => {
                return fail!(
                    "update.integrity/unreadable",
                    "cannot locate the running binary: {e}"
                );
            }
        };
        match crate::host::file_sha256(&exe) {
            Ok(digest) if &digest == recorded => {
                pass!(
                    "update.integrity/ok",
                    "{} matches its installed digest {}",
                    exe.display(),
                    &digest[..12]
                )
            }
            Ok(digest) => fail!(
                "update.integrity/mismatch",
                "{} has digest {} but {} was installed",
                exe.display(),
                &digest[..12],
                &recorded[..recorded.len().min(12)]
            ),
            Err(e) => fail!(
                "update.integrity/unreadable",
                "cannot read {}: {e}",
                exe.display()
            ),
        }
    }

    fn resources(&self) -> Finding {
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let available_kib: Option<u64> = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok());
        let limits = fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let nofile: Option<u64> = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok());
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let load: Option<f64> = fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()));
        let per_core = load.map(|l| l / cores);
        if let Some(kib) = available_kib {
            if kib < 16 * 1024 {
                return fail!(
                    "host.resources/memory",
                    "only {} of memory available",
                    mib(kib * 1024)
                );
            }
            if kib < 32 * 1024 {
                return warn!(
                    "host.resources/memory",
                    "only {} of memory available",
                    mib(kib * 1024)
                );
            }
        }
        if nofile.is_some_and(|n| n < 256) {
            return warn!(
                "host.resources/nofile",
                "open-file limit is {}; 256 or more is advised",
                nofile.unwrap_or(0)
            );
        }
        if per_core.is_some_and(|l| l > 4.0) {
            return warn!(
                "host.resources/load",
                "load {:.2} per core",
                per_core.unwrap_or(0.0)
            );
        }
        pass!(
            "host.resources/ok",
            "{} available, open-file limit {}, load {:.2} per core",
            available_kib.map_or("?".to_owned(), |k| mib(k * 1024)),
            nofile.map_or("?".to_owned(), |n| n.to_string()),
            per_core.unwrap_or(0.0)
        )
    }
}

#[derive(miniserde::Serialize)]
struct JsonCheck<'a> {
    id: &'a str,
    status: &'a str,
    code: &'a str,
    message: &'a str,
    duration_us: u64,
}

#[derive(miniserde::Serialize)]
pub(crate) struct JsonSummary {
    pub(crate) pass: u32,
    pub(crate) warn: u32,
    pub(crate) fail: u32,
    pub(crate) skip: u32,
}

impl From<&DoctorSummary> for JsonSummary {
    fn from(s: &DoctorSummary) -> Self {
        Self {
            pass: s.pass,
            warn: s.warn,
            fail: s.fail,
            skip: s.skip,
        }
    }
}

#[derive(miniserde::Serialize)]
struct JsonReport<'a> {
    checks: Vec<JsonCheck<'a>>,
    summary: JsonSummary,
}

/// The report as `doctor --json` prints it.
pub(crate) fn to_json(report: &Report) -> String {
    let checks = report
        .checks
        .iter()
        .map(|c| JsonCheck {
            id: c.id,
            status: c.status.as_str(),
            code: c.code,
            message: &c.message,
            duration_us: c.duration_us,
        })
        .collect();
    json::to_string(&JsonReport {
        checks,
        summary: JsonSummary::from(&report.summary()),
    })
}

/// Prints the table; `verbose` adds each finding's code and duration.
pub(crate) fn print_table(report: &Report, verbose: bool) {
    for c in &report.checks {
        println!("{} {:<21} {}", c.status.mark(), c.id, c.message);
        if verbose {
            println!(
                "    {:<21} {} in {:.1} ms",
                "",
                c.code,
                c.duration_us as f64 / 1000.0
            );
        }
    }
    let s = report.summary();
    println!(
        "\n{} passed, {} warning{}, {} failed, {} skipped",
        s.pass,
        s.warn,
        if s.warn == 1 { "" } else { "s" },
        s.fail,
        s.skip
    );
}
