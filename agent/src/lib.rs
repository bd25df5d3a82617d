//! stella-agent as a library: enrollment, mTLS identity and renewal, the
//! heartbeat scheduler, signed self-update, signed deployment tasks,
//! configuration, doctor and remediation. `main.rs` parses the arguments and maps errors to exit
//! codes; the fuzz crate links [`der`], the certificate reader.
#![deny(unsafe_code)]

/// `println!` for command output: writes to a locked stdout, and where
/// `println!` would panic on a closed pipe (`stella-agent status | head -1`)
/// keeps the failure for the end of the command (`Error::StdoutClosed`, a
/// quiet exit 0).
macro_rules! outln {
    ($($t:tt)*) => {
        $crate::error::write_stdout(format_args!($($t)*))
    };
}

#[cfg(feature = "bench-alloc")]
mod alloc_count;
mod bootstrap;
mod cli;
mod config;
pub mod der;
mod doctor;
mod error;
mod fault;
mod heartbeat;
mod host;
mod identity;
mod install;
mod log;
mod ranged;
mod remediate;
mod renewal;
mod run;
mod state;
mod status;
mod sys;
mod tasks;
mod tls;
mod transport;
mod update;

use std::ffi::OsString;

use cli::Command;
pub use cli::Invocation;
pub use error::{Cause, Error};
use state::StateDir;

/// Exit code when the server refuses this agent for good (revoked): the
/// systemd unit does not restart on it.
pub const EXIT_REVOKED: u8 = 3;

/// Parses the command line (`std::env::args_os()`, program name first).
pub fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Invocation, Error> {
    cli::parse(args)
}

/// Runs a parsed command.
pub fn run(inv: Invocation) -> Result<(), Error> {
    let result = run_command(inv);
    match (result, error::stdout_failure()) {
        // A real failure is worth telling even to a reader who left.
        (Err(e), _) if !matches!(e, Error::ChecksFailed | Error::StdoutClosed) => Err(e),
        (_, Some(failure)) => Err(failure),
        (result, None) => result,
    }
}

fn run_command(inv: Invocation) -> Result<(), Error> {
    if let Some(level) = std::env::var("STELLA_LOG_LEVEL")
        .ok()
        .and_then(|l| log::Level::parse(&l))
    {
        log::set_level(level);
    }
    let state = StateDir::new(inv.state_dir);
    match inv.command {
        Command::Help => {
            outln!("{}", cli::USAGE);
            Ok(())
        }
        Command::Version => {
            outln!("stella-agent {} {}", host::VERSION, host::TARGET);
            Ok(())
        }
        Command::Bootstrap(opts) => {
            let id = bootstrap::enroll(&state, &opts)?;
            outln!("{id}");
            Ok(())
        }
        Command::Run => {
            // Zero-touch: enroll with bootstrap.json first, if there is one.
            bootstrap::zero_touch::zero_touch(&state)?;
            if !state.is_enrolled() {
                return Err(Error::Invalid(format!(
                    "{} holds no enrolled agent (and no {}): run `stella-agent bootstrap` first",
                    state.root().display(),
                    state::BOOTSTRAP_JSON
                )));
            }
            run::run(&state)
        }
        Command::Status { json } => status::print(&state, json),
        Command::SelfTest => update::run_self_test(&state),
        Command::Install(opts) => install::install(state.root(), &opts),
        Command::Doctor { json, verbose } => {
            let report = doctor::Doctor::new(&state).run_all();
            if json {
                doctor::print_json(&report)?;
            } else {
                doctor::print_table(&report, verbose)?;
            }
            if report.any_failed() {
                Err(Error::ChecksFailed)
            } else {
                Ok(())
            }
        }
        Command::Remediate { json, dry_run } => {
            let still_failing = remediate::remediate(&state, dry_run, json)?;
            if still_failing {
                Err(Error::ChecksFailed)
            } else {
                Ok(())
            }
        }
    }
}
