//! stella-server: the fleet server (`init`, `serve`) and its admin commands.
#![forbid(unsafe_code)]

mod admin;
mod api;
mod app;
mod ca;
mod cli;
mod config;
mod error;
mod fsutil;
mod http;
mod lifecycle;
mod log;
mod records;
mod releases;
mod renewal;
mod rollout;
mod serve;
mod store;
mod tokens;

use std::io::Write;
use std::process::ExitCode;

use cli::Command;
use error::Error;

fn run() -> Result<(), Error> {
    match cli::parse(std::env::args_os())? {
        Command::Help => {
            let _ = writeln!(std::io::stdout(), "{}", cli::USAGE);
            Ok(())
        }
        Command::Version => {
            let _ = writeln!(
                std::io::stdout(),
                "stella-server {}",
                env!("CARGO_PKG_VERSION")
            );
            Ok(())
        }
        Command::Init { data_dir, sans } => serve::init(&data_dir, &sans),
        Command::Serve(opts) => serve::serve(opts),
        Command::TokenCreate {
            target,
            ttl,
            uses,
            labels,
        } => admin::token_create(&target, ttl, uses, labels),
        Command::AgentsList { target, json } => admin::agents_list(&target, json),
        Command::AgentsShow { target, id, json } => admin::agents_show(&target, &id, json),
        Command::AgentsAct { target, id, action } => admin::agents_act(&target, &id, action),
        Command::ConfigSet {
            target,
            scope,
            file,
        } => admin::config_set(&target, &scope, &file),
        Command::ConfigShow { target, agent } => admin::config_show(&target, agent.as_deref()),
        Command::Drift { target, json } => admin::drift(&target, json),
        Command::ReleaseImport { target, dir } => admin::release_import(&target, &dir),
        Command::ReleaseList { target, json } => admin::release_list(&target, json),
        Command::AgentsUpdate {
            target,
            id,
            release,
        } => admin::agents_update(&target, &id, &release),
        Command::RolloutStart {
            target,
            release,
            stages,
            soak,
            max_failures,
            selector,
        } => admin::rollout_start(&target, &release, stages, soak, max_failures, selector),
        Command::RolloutShow { target, id, json } => {
            admin::rollout_show(&target, id.as_deref(), json)
        }
        Command::RolloutAct { target, id, action } => admin::rollout_act(&target, &id, &action),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Usage(msg)) => {
            eprintln!("stella-server: {msg} (see `stella-server --help`)");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("stella-server: {e}");
            ExitCode::FAILURE
        }
    }
}
