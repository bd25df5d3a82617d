//! stella-agent: the edge agent. One static binary, one thread: enrollment,
//! mTLS identity, heartbeats, and (as they land) update, config and doctor.
#![forbid(unsafe_code)]

mod bootstrap;
mod cli;
mod config;
mod der;
mod error;
mod fault;
mod heartbeat;
mod host;
mod identity;
mod log;
mod state;
mod status;
mod transport;

use std::process::ExitCode;

use cli::Command;
use error::Error;
use state::StateDir;

/// Exit code when the server refuses this agent for good (revoked): the
/// systemd unit does not restart on it.
const EXIT_REVOKED: u8 = 3;

fn run() -> Result<(), Error> {
    if let Some(level) = std::env::var("STELLA_LOG_LEVEL")
        .ok()
        .and_then(|l| log::Level::parse(&l))
    {
        log::set_level(level);
    }
    let inv = cli::parse(std::env::args_os())?;
    let state = StateDir::new(inv.state_dir);
    match inv.command {
        Command::Help => {
            println!("{}", cli::USAGE);
            Ok(())
        }
        Command::Version => {
            println!("stella-agent {} {}", host::VERSION, host::TARGET);
            Ok(())
        }
        Command::Bootstrap(opts) => {
            let id = bootstrap::enroll(&state, &opts)?;
            println!("{id}");
            Ok(())
        }
        Command::Run => {
            if !state.is_enrolled() {
                return Err(Error::Invalid(format!(
                    "{} holds no enrolled agent: run `stella-agent bootstrap` first",
                    state.root().display()
                )));
            }
            heartbeat::run(&state)
        }
        Command::Status { json } => status::print(&state, json),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Usage(msg)) => {
            eprintln!("stella-agent: {msg} (see `stella-agent --help`)");
            ExitCode::from(2)
        }
        Err(e @ Error::Revoked(_)) => {
            eprintln!("stella-agent: {e}");
            ExitCode::from(EXIT_REVOKED)
        }
        Err(e) => {
            eprintln!("stella-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
