//! stella-agent: the edge agent. One static binary, one thread. This file
//! parses the arguments, runs the command in the library, and maps its
//! error to an exit code.
#![deny(unsafe_code)]

use std::process::ExitCode;

use stella_agent::{EXIT_REVOKED, Error};

fn main() -> ExitCode {
    match stella_agent::parse_args(std::env::args_os()).and_then(stella_agent::run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Usage(msg)) => {
            eprintln!("stella-agent: {msg} (see `stella-agent --help`)");
            ExitCode::from(2)
        }
        // Whoever read the output has all they wanted (`| head -1`).
        Err(Error::StdoutClosed) => ExitCode::SUCCESS,
        // The report said it all; exit 1 without another line.
        Err(Error::ChecksFailed) => ExitCode::FAILURE,
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
