//! `stella-agent doctor`: the runner of the 11 checks of docs/design.md section
//! 8 (one file each), their report, and its table and JSON output. Each
//! check returns pass, warn, fail or skip with a stable `id/finding` code, a
//! one-line message and its duration. Checks only read: they never write a
//! byte (the write probe is `access(2)` plus the mount's read-only flag).
//! Results live in fixed-capacity storage; a message is a fixed-size string.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use miniserde::json;
use stella_proto::api::DoctorSummary;
use stella_proto::config::Settings;
use stella_proto::states::{CheckId, CheckStatus};

use crate::error::Error;
use crate::identity;
use crate::state::{StateDir, StateFile};

/// Builds a finding: `pass!("id/finding", "message {}", args)`.
macro_rules! pass { ($code:literal, $($t:tt)*) => { $crate::doctor::finding(::stella_proto::states::CheckStatus::Pass, $code, format_args!($($t)*)) } }
macro_rules! warn { ($code:literal, $($t:tt)*) => { $crate::doctor::finding(::stella_proto::states::CheckStatus::Warn, $code, format_args!($($t)*)) } }
macro_rules! fail { ($code:literal, $($t:tt)*) => { $crate::doctor::finding(::stella_proto::states::CheckStatus::Fail, $code, format_args!($($t)*)) } }
macro_rules! skip { ($code:literal, $($t:tt)*) => { $crate::doctor::finding(::stella_proto::states::CheckStatus::Skip, $code, format_args!($($t)*)) } }

mod certificate;
mod config;
mod heartbeat;
mod integrity;
mod key;
mod reachable;
mod renewal;
mod resources;
mod skew;
mod space;
mod writable;

/// The finding of an identity-dependent check on a host not yet enrolled;
/// `None` for the checks that need no identity.
fn not_enrolled_code(id: CheckId) -> Option<&'static str> {
    match id {
        CheckId::IdentityCertificate => Some("identity.certificate/not-enrolled"),
        CheckId::IdentityRenewal => Some("identity.renewal/not-enrolled"),
        CheckId::IdentityKey => Some("identity.key/not-enrolled"),
        CheckId::ServerReachable => Some("server.reachable/not-enrolled"),
        CheckId::TimeSkew => Some("time.skew/not-enrolled"),
        CheckId::HeartbeatRecent => Some("heartbeat.recent/not-enrolled"),
        CheckId::ConfigDrift => Some("config.drift/not-enrolled"),
        CheckId::StorageWritable => Some("storage.writable/not-enrolled"),
        CheckId::UpdateIntegrity => Some("update.integrity/not-enrolled"),
        CheckId::StorageSpace | CheckId::HostResources => None,
    }
}

/// The table's mark for a status.
fn mark(status: CheckStatus) -> &'static str {
    match status {
        CheckStatus::Pass => "[✓]",
        CheckStatus::Warn => "[!]",
        CheckStatus::Fail => "[✗]",
        CheckStatus::Skip => "[-]",
    }
}

/// A one-line message without heap allocation (long text is cut).
pub(crate) type Message = heapless::String<200>;

/// One check's result.
#[derive(Debug, Clone)]
pub(crate) struct CheckResult {
    pub(crate) id: CheckId,
    pub(crate) status: CheckStatus,
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
                CheckStatus::Pass => s.pass += 1,
                CheckStatus::Warn => s.warn += 1,
                CheckStatus::Fail => {
                    s.fail += 1;
                    s.failing.push(c.id.as_str().to_owned());
                }
                CheckStatus::Skip => s.skip += 1,
            }
        }
        s
    }

    pub(crate) fn any_failed(&self) -> bool {
        self.checks.iter().any(|c| c.status == CheckStatus::Fail)
    }
}

/// What a finding is, before timing is added.
struct Finding {
    status: CheckStatus,
    code: &'static str,
    message: Message,
}

fn finding(status: CheckStatus, code: &'static str, args: std::fmt::Arguments<'_>) -> Finding {
    let mut message = Message::new();
    // A message longer than the buffer is cut, never an error.
    let _ = message.write_fmt(args);
    Finding {
        status,
        code,
        message,
    }
}

/// What the server said when probed, shared by the reachability and clock checks.
#[derive(Debug, Clone)]
struct Probe {
    finding_status: CheckStatus,
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
    // A finding, not an error: its fixed wording is what remediation and
    // operators match on, so the library's message is not carried.
    let Ok(text) = state.read_text(name) else {
        return Err(PemProblem::Missing);
    };
    identity::cert_der_from_pem(&text, name).or(Err(PemProblem::Unparsable))
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
        for &id in CheckId::ALL {
            let _ = report.checks.push(self.run_one(id));
        }
        report
    }

    /// Runs one check by id.
    pub(crate) fn run_one(&self, id: CheckId) -> CheckResult {
        let start = Instant::now();
        let not_enrolled = not_enrolled_code(id).filter(|_| !self.state.is_enrolled());
        let f = if let Some(code) = not_enrolled {
            finding(
                CheckStatus::Skip,
                code,
                format_args!("this host is not enrolled (no agent.json)"),
            )
        } else {
            match id {
                CheckId::IdentityCertificate => self.certificate(),
                CheckId::IdentityRenewal => self.renewal(),
                CheckId::IdentityKey => self.key(),
                CheckId::ServerReachable => self.reachable(),
                CheckId::TimeSkew => self.skew(),
                CheckId::HeartbeatRecent => self.heartbeat(),
                CheckId::ConfigDrift => self.config(),
                CheckId::StorageSpace => self.space(),
                CheckId::StorageWritable => self.writable(),
                CheckId::UpdateIntegrity => self.integrity(),
                CheckId::HostResources => self.resources(),
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
            id: c.id.as_str(),
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

/// The counts of a summary, as reports print them.
pub(crate) fn counts(s: &DoctorSummary) -> stella_proto::api::DoctorCounts {
    stella_proto::api::DoctorCounts {
        pass: s.pass,
        warn: s.warn,
        fail: s.fail,
        skip: s.skip,
    }
}

/// The report the server asked for (`agents doctor`): the same checks as
/// `doctor --json`, owned, for the next heartbeat.
pub(crate) fn to_upload(report: &Report) -> stella_proto::api::DoctorReport {
    stella_proto::api::DoctorReport {
        checks: report
            .checks
            .iter()
            .map(|c| stella_proto::api::DoctorCheckView {
                id: c.id.as_str().to_owned(),
                status: c.status.as_str().to_owned(),
                code: c.code.to_owned(),
                message: c.message.as_str().to_owned(),
                duration_us: c.duration_us,
            })
            .collect(),
        summary: counts(&report.summary()),
        remediation: None,
    }
}

/// Prints the table; `verbose` adds each finding's code and duration.
pub(crate) fn print_table(report: &Report, verbose: bool) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    write_table(&mut out, report, verbose).map_err(Error::stdout)
}

fn write_table(
    out: &mut impl std::io::Write,
    report: &Report,
    verbose: bool,
) -> std::io::Result<()> {
    for c in &report.checks {
        writeln!(
            out,
            "{} {:<21} {}",
            mark(c.status),
            c.id.as_str(),
            c.message
        )?;
        if verbose {
            writeln!(
                out,
                "    {:<21} {} in {:.1} ms",
                "",
                c.code,
                c.duration_us as f64 / 1000.0
            )?;
        }
    }
    let s = report.summary();
    writeln!(
        out,
        "\n{} passed, {} warning{}, {} failed, {} skipped",
        s.pass,
        s.warn,
        if s.warn == 1 { "" } else { "s" },
        s.fail,
        s.skip
    )
}

/// Prints the report as JSON, one line.
pub(crate) fn print_json(report: &Report) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", to_json(report)).map_err(Error::stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let mut report = Report::default();
        let _ = report.checks.push(CheckResult {
            id: CheckId::TimeSkew,
            status: CheckStatus::Warn,
            code: "time.skew/skew",
            message: Message::try_from("off by 3 s").unwrap_or_default(),
            duration_us: 1500,
        });
        report
    }

    #[test]
    fn the_table_pads_ids_and_counts_warnings() {
        let mut out = Vec::new();
        write_table(&mut out, &report(), true).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "[!] time.skew             off by 3 s\n    \
             {:<21} time.skew/skew in 1.5 ms\n\n0 passed, 1 warning, 0 failed, 0 skipped\n"
                .replace("{:<21}", &" ".repeat(21))
        );
    }

    #[test]
    fn json_spells_ids_and_statuses_as_on_the_wire() {
        assert_eq!(
            to_json(&report()),
            r#"{"checks":[{"id":"time.skew","status":"warn","code":"time.skew/skew","message":"off by 3 s","duration_us":1500}],"summary":{"pass":0,"warn":1,"fail":0,"skip":0}}"#
        );
    }
}
