//! `stella-agent remediate`: map doctor findings to fixes through one pattern
//! table (`check id/code` globs → action), apply the safe ones, re-run the
//! matched checks and report before/after. `--dry-run` prints the plan and
//! writes nothing. Some patterns only advise.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use miniserde::{Serialize, json};
use stella_proto::api::{DoctorSummary, RemediationActionView, RemediationView};

use stella_proto::states::CheckStatus;

use crate::doctor::{CheckResult, Doctor, JsonSummary, Report};
use crate::error::Error;
use crate::identity::Identity;
use crate::state::{AGENT_CERT, AGENT_KEY, CONFIG_JSON, NEXT_CERT, NEXT_KEY, StateDir};
use crate::{heartbeat, log, renewal, transport};

/// What a pattern does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Renew the certificate now (recover it if expired).
    RenewNow,
    /// `chmod 0600 agent.key`.
    ChmodKey,
    /// Finish an interrupted key/certificate swap.
    FinishRenewal,
    /// Rewrite `config.json` with the applied configuration.
    RestoreConfig,
    /// Remove staged downloads and stale temp files.
    PurgeStaging,
    /// Remove stale temp files.
    RemoveStaleTemp,
    /// `chmod 0700` the state dir.
    ChmodStateDir,
    /// Connect and send a heartbeat now.
    HeartbeatNow,
    /// Put `<binary>.prev` back after an interrupted update swap.
    FinishRollback,
    /// Nothing the agent can safely do: tell the operator.
    Advise(&'static str),
}

/// One row of the pattern table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pattern {
    pub(crate) glob: &'static str,
    pub(crate) action: Action,
}

const fn p(glob: &'static str, action: Action) -> Pattern {
    Pattern { glob, action }
}

/// The remediation table: the first pattern matching a finding's code wins.
#[rustfmt::skip]
pub(crate) const PATTERNS: &[Pattern] = &[
    //  check id / finding code         action
    p("identity.renewal/*",            Action::RenewNow),
    p("identity.certificate/expired",  Action::RenewNow),
    p("identity.key/mode",             Action::ChmodKey),
    p("identity.key/interrupted",      Action::FinishRenewal),
    p("config.drift/*",                Action::RestoreConfig),
    p("storage.space/*",               Action::PurgeStaging),
    p("storage.writable/stale-temp",   Action::RemoveStaleTemp),
    p("storage.writable/mode",         Action::ChmodStateDir),
    p("heartbeat.recent/*",            Action::HeartbeatNow),
    p("update.integrity/interrupted",  Action::FinishRollback),
    p("time.skew/*",                   Action::Advise("enable NTP (e.g. `timedatectl set-ntp true`) and check the clock")),
    p("server.reachable/deactivated",  Action::Advise("ask an administrator to run `stella-server agents activate ID`")),
    p("server.reachable/*",            Action::Advise("check DNS, routes and firewalls towards the server URL in agent.json")),
    p("update.integrity/*",            Action::Advise("the binary differs from the installed one: reinstall it from a signed bundle")),
    p("host.resources/*",              Action::Advise("free memory, raise the open-file limit (LimitNOFILE=) or reduce load")),
    p("storage.writable/*",            Action::Advise("make the state dir writable by the agent (mode 0700, read-write mount)")),
    p("identity.*",                    Action::Advise("the identity is damaged: enroll this host again with a new token")),
];

/// `*` matches any run of characters (including `/` and `.`).
pub(crate) fn glob_match(glob: &str, text: &str) -> bool {
    match glob.split_once('*') {
        None => glob == text,
        Some((head, rest)) => {
            let Some(tail) = text.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob_match(rest, &tail[i..]))
        }
    }
}

/// The pattern for a finding, if any.
pub(crate) fn pattern_for(code: &str) -> Option<&'static Pattern> {
    PATTERNS.iter().find(|p| glob_match(p.glob, code))
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::RenewNow => "renew-certificate",
        Action::ChmodKey => "chmod-key",
        Action::FinishRenewal => "finish-renewal",
        Action::RestoreConfig => "restore-config",
        Action::PurgeStaging => "purge-staging",
        Action::RemoveStaleTemp => "remove-stale-temp",
        Action::ChmodStateDir => "chmod-state-dir",
        Action::HeartbeatNow => "heartbeat-now",
        Action::FinishRollback => "finish-rollback",
        Action::Advise(_) => "advise",
    }
}

fn server_url(state: &StateDir) -> String {
    state
        .agent_file()
        .map(|a| a.server)
        .unwrap_or_else(|_| "the server".into())
}

fn list(paths: &[std::path::PathBuf]) -> String {
    if paths.is_empty() {
        return "nothing".into();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Exactly what an action would do: files, modes, requests.
pub(crate) fn describe(action: Action, state: &StateDir) -> String {
    match action {
        Action::RenewNow => format!(
            "make a new key in {}, POST a CSR to {}/v1/agents/certificate (or /v1/agents/recover if expired), then swap {} and {}",
            state.path(NEXT_KEY).display(),
            server_url(state),
            AGENT_KEY,
            AGENT_CERT
        ),
        Action::ChmodKey => format!("chmod 0600 {}", state.path(AGENT_KEY).display()),
        Action::FinishRenewal => format!(
            "rename {NEXT_KEY} to {AGENT_KEY} and {NEXT_CERT} to {AGENT_CERT} in {} (whichever still pair up)",
            state.root().display()
        ),
        Action::RestoreConfig => format!(
            "rewrite {} with the applied configuration",
            state.path(CONFIG_JSON).display()
        ),
        Action::PurgeStaging => {
            let mut files = state.staged_files();
            files.extend(state.stale_temp_files());
            format!("remove {}", list(&files))
        }
        Action::RemoveStaleTemp => format!("remove {}", list(&state.stale_temp_files())),
        Action::ChmodStateDir => format!("chmod 0700 {}", state.root().display()),
        Action::HeartbeatNow => format!(
            "POST a heartbeat to {}/v1/agents/heartbeat",
            server_url(state)
        ),
        Action::FinishRollback => {
            let install = state
                .state_file()
                .update
                .map(|m| m.install_path)
                .unwrap_or_default();
            format!("rename {install}.prev to {install} and clear the update marker in state.json")
        }
        Action::Advise(text) => text.to_owned(),
    }
}

fn remove_all(paths: &[std::path::PathBuf]) -> Result<String, Error> {
    for path in paths {
        fs::remove_file(path)
            .map_err(|e| Error::io(format!("cannot remove {}", path.display()), e))?;
    }
    Ok(format!("removed {} file(s)", paths.len()))
}

fn chmod(path: &std::path::Path, mode: u32) -> Result<String, Error> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(format!("cannot chmod {}", path.display()), e))?;
    Ok(format!("{} is now mode {mode:04o}", path.display()))
}

/// Applies one action from a standalone `remediate` run.
pub(crate) fn apply(action: Action, state: &StateDir) -> Result<String, Error> {
    match action {
        Action::RenewNow => {
            renewal::finish_interrupted_renewal(state)?;
            let ident = Identity::load(state)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let renewed = if now >= ident.cert.not_after {
                renewal::recover(state, &ident)
            } else {
                let mut client = transport::http_client(
                    &ident.ca_der,
                    Some((&ident.cert_der, &ident.key_pem)),
                    Duration::from_secs(30),
                )?;
                renewal::renew(state, &ident, &mut client)
            };
            match renewed {
                Ok(new) => Ok(format!(
                    "renewed: serial {} until {}",
                    new.cert.serial,
                    stella_proto::time::rfc3339(new.cert.not_after)
                )),
                Err(e) => Err(e.into_error()),
            }
        }
        Action::ChmodKey => chmod(&state.path(AGENT_KEY), 0o600),
        Action::ChmodStateDir => chmod(state.root(), 0o700),
        Action::FinishRenewal => match renewal::finish_interrupted_renewal(state)? {
            true => Ok("finished the interrupted renewal".into()),
            false => Ok("nothing left to finish".into()),
        },
        Action::RestoreConfig => {
            let mut saved = state.state_file();
            if saved.config.is_none() {
                return Ok("no configuration applied yet: nothing to restore".into());
            }
            let mut config = crate::config::ConfigState::load(&saved);
            config.restore(state)?;
            saved.config_hash.get_or_insert_with(|| config.hash.clone());
            Ok(format!(
                "restored the applied configuration {}",
                config.hash
            ))
        }
        Action::PurgeStaging => {
            let mut files = state.staged_files();
            files.extend(state.stale_temp_files());
            remove_all(&files)
        }
        Action::RemoveStaleTemp => remove_all(&state.stale_temp_files()),
        Action::HeartbeatNow => {
            heartbeat::send_one(state).map(|seq| format!("heartbeat {seq} acknowledged"))
        }
        Action::FinishRollback => crate::update::finish_rollback(state),
        Action::Advise(text) => Ok(text.to_owned()),
    }
}

#[derive(Serialize)]
struct ActionRecord {
    pattern: String,
    check: String,
    action: String,
    applied: bool,
    result: String,
}

#[derive(Serialize)]
struct RemediationReport {
    dry_run: bool,
    actions: Vec<ActionRecord>,
    before: JsonSummary,
    after: JsonSummary,
}

/// The plan for a report: (finding, pattern) for each warning or failure.
pub(crate) fn plan(report: &Report) -> Vec<(&CheckResult, &'static Pattern)> {
    report
        .checks
        .iter()
        .filter(|c| matches!(c.status, CheckStatus::Warn | CheckStatus::Fail))
        .filter_map(|c| pattern_for(c.code).map(|p| (c, p)))
        .collect()
}

/// Runs doctor, applies (or, dry, describes) the matched actions, re-runs the
/// matched checks. Returns whether anything still fails afterwards.
pub(crate) fn remediate(state: &StateDir, dry_run: bool, as_json: bool) -> Result<bool, Error> {
    let before = Doctor::new(state).run_all();
    let before_summary = before.summary();
    let mut records = Vec::new();
    let mut after = before.clone();
    for (check, pattern) in plan(&before) {
        let description = describe(pattern.action, state);
        let (applied, result) = match pattern.action {
            Action::Advise(text) => (false, format!("advice: {text}")),
            _ if dry_run => (false, format!("would {description}")),
            action => match apply(action, state) {
                Ok(r) => (true, r),
                Err(e) => (false, format!("failed: {e}")),
            },
        };
        if applied {
            // Re-run the check on fresh state.
            let rerun = Doctor::new(state).run_one(check.id);
            if let Some(slot) = after.checks.iter_mut().find(|c| c.id == check.id) {
                *slot = rerun;
            }
        }
        records.push(ActionRecord {
            pattern: pattern.glob.to_owned(),
            check: check.code.to_owned(),
            action: action_name(pattern.action).to_owned(),
            applied,
            result,
        });
    }
    let after_summary = if dry_run {
        before_summary.clone()
    } else {
        after.summary()
    };
    if as_json {
        outln!(
            "{}",
            json::to_string(&RemediationReport {
                dry_run,
                actions: records,
                before: JsonSummary::from(&before_summary),
                after: JsonSummary::from(&after_summary),
            })
        );
    } else {
        print_plain(dry_run, &records, &before_summary, &after_summary)?;
    }
    Ok(after_summary.fail > 0)
}

fn print_plain(
    dry_run: bool,
    records: &[ActionRecord],
    before: &DoctorSummary,
    after: &DoctorSummary,
) -> Result<(), Error> {
    if records.is_empty() {
        outln!("nothing to remediate: no warnings or failures with a known fix");
    }
    for r in records {
        let mark = match (r.applied, r.action.as_str()) {
            (_, "advise") => "[i]",
            (true, _) => "[✓]",
            (false, _) if dry_run => "[ ]",
            (false, _) => "[✗]",
        };
        outln!("{mark} {:<32} {:<30} {}", r.check, r.pattern, r.result);
    }
    let line = |s: &DoctorSummary| {
        format!(
            "{} pass, {} warn, {} fail, {} skip",
            s.pass, s.warn, s.fail, s.skip
        )
    };
    outln!("\nbefore: {}", line(before));
    if dry_run {
        outln!("dry run: nothing was changed");
    } else {
        outln!("after:  {}", line(after));
    }
    Ok(())
}

/// The remediation plan for `report`, described and never applied (the
/// server's `agents doctor --remediate-dry-run`).
pub(crate) fn dry_run_view(state: &StateDir, report: &Report) -> RemediationView {
    let summary = crate::doctor::counts(&report.summary());
    let actions = plan(report)
        .into_iter()
        .map(|(check, pattern)| RemediationActionView {
            pattern: pattern.glob.to_owned(),
            check: check.code.to_owned(),
            action: action_name(pattern.action).to_owned(),
            applied: false,
            result: match pattern.action {
                Action::Advise(text) => format!("advice: {text}"),
                action => format!("would {}", describe(action, state)),
            },
        })
        .collect();
    RemediationView {
        dry_run: true,
        actions,
        before: summary.clone(),
        after: summary,
    }
}

/// In the running agent with `remediation: auto`: applies the safe actions the
/// loop does not already take care of (renewal and heartbeats are scheduled by
/// the loop itself; config drift is restored on every heartbeat). With
/// `dry-run`, logs the plan only.
pub(crate) fn in_loop(state: &StateDir, report: &Report, apply_fixes: bool) -> (bool, bool) {
    let (mut renew_now, mut beat_now) = (false, false);
    for (check, pattern) in plan(report) {
        match pattern.action {
            Action::RenewNow if apply_fixes => renew_now = true,
            Action::HeartbeatNow if apply_fixes => beat_now = true,
            Action::RestoreConfig
            | Action::FinishRenewal
            | Action::FinishRollback
            | Action::Advise(_) => {}
            action if apply_fixes => match apply(action, state) {
                Ok(result) => {
                    log::info("remediated", &[("check", &check.code), ("result", &result)])
                }
                Err(e) => log::warn(
                    "remediation failed",
                    &[("check", &check.code), ("error", &e)],
                ),
            },
            action => log::info(
                "remediation planned (dry-run)",
                &[("check", &check.code), ("would", &describe(action, state))],
            ),
        }
    }
    (renew_now, beat_now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_codes() {
        assert!(glob_match("identity.renewal/*", "identity.renewal/due"));
        assert!(glob_match("identity.*", "identity.key/mismatch"));
        assert!(glob_match("identity.key/mode", "identity.key/mode"));
        assert!(!glob_match("identity.key/mode", "identity.key/mismatch"));
        assert!(!glob_match("config.drift/*", "config.driftx/edited"));
        assert!(glob_match("*", "anything/at-all"));
        assert!(glob_match("a*b*c", "a--b--c"));
        assert!(!glob_match("a*b*c", "a--c--b"));
    }

    #[test]
    fn every_fixable_finding_has_its_pattern() {
        for (code, want) in [
            ("identity.renewal/due", Action::RenewNow),
            ("identity.renewal/overdue", Action::RenewNow),
            ("identity.key/mode", Action::ChmodKey),
            ("identity.key/interrupted", Action::FinishRenewal),
            ("config.drift/edited", Action::RestoreConfig),
            ("config.drift/missing", Action::RestoreConfig),
            ("storage.space/low", Action::PurgeStaging),
            ("storage.writable/stale-temp", Action::RemoveStaleTemp),
            ("storage.writable/mode", Action::ChmodStateDir),
            ("heartbeat.recent/stale", Action::HeartbeatNow),
        ] {
            assert_eq!(pattern_for(code).map(|p| p.action), Some(want), "{code}");
        }
        assert!(matches!(
            pattern_for("time.skew/skew").map(|p| p.action),
            Some(Action::Advise(_))
        ));
        assert!(matches!(
            pattern_for("identity.key/mismatch").map(|p| p.action),
            Some(Action::Advise(_))
        ));
    }
}
