//! stella-server: the fleet server (`init`, `serve`) and its admin commands;
//! everything is in the library, this prints the error and picks the exit code.
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    match stella_server::run(std::env::args_os()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_usage() => {
            eprintln!("stella-server: {e} (see `stella-server --help`)");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("stella-server: {e}");
            ExitCode::FAILURE
        }
    }
}
