//! stella-server as a library: the fleet server (`init`, `serve`) and its
//! admin commands, behind `run`. `main.rs` is a thin wrapper; the fuzz
//! targets link the request framing (`http`) and the CSR check
//! (`ca::check_csr`) from here.
#![forbid(unsafe_code)]

mod admin;
mod api;
mod app;
mod audit;
mod backup;
mod blobs;
pub mod ca;
mod cli;
mod cluster;
mod config;
mod error;
mod fsutil;
pub mod http;
mod lifecycle;
mod log;
mod records;
mod refusal;
mod releases;
mod renewal;
mod roles;
mod rollout;
mod serve;
mod store;
mod tasks;
mod tokens;

use std::ffi::OsString;
use std::io::Write;

use cli::Command;
pub use error::Error;
pub use refusal::{Refusal, Why};
pub use store::StoreError;

/// Runs the command line `args` (the program name first).
pub fn run(args: impl IntoIterator<Item = OsString>) -> Result<(), Error> {
    match cli::parse(args)? {
        Command::Help => log::print(format_args!("{}\n", cli::USAGE)),
        Command::Version => log::print(format_args!(
            "stella-server {}\n",
            env!("CARGO_PKG_VERSION")
        )),
        Command::Init {
            data_dir,
            sans,
            store,
        } => serve::init(&data_dir, &sans, store.as_deref()),
        Command::Serve(opts) => serve::serve(opts),
        Command::Migrate { from, to } => serve::migrate(&from, &to),
        Command::TokenCreate {
            target,
            ttl,
            uses,
            labels,
        } => admin::token_create(&target, ttl, uses, labels),
        Command::AgentsList { target, json } => admin::agents_list(&target, json),
        Command::AgentsShow {
            target,
            id,
            json,
            doctor: false,
        } => admin::agents_show(&target, &id, json),
        Command::AgentsShow {
            target, id, json, ..
        } => admin::doctor_show(&target, &id, json),
        Command::AgentsDoctor {
            target,
            id,
            selector,
            remediate_dry_run,
        } => admin::agents_doctor(&target, id.as_deref(), selector, remediate_dry_run),
        Command::DoctorReport {
            target,
            selector,
            json,
        } => admin::doctor_report(&target, selector, json),
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
            agent_timeout,
            window,
            days,
        } => admin::rollout_start(
            &target,
            stella_proto::api::RolloutStartRequest {
                release,
                stages,
                soak_ms: soak.as_millis() as u64,
                max_failures,
                selector,
                agent_timeout_ms: agent_timeout.map(|d| d.as_millis() as u64),
                window,
                days,
            },
        ),
        Command::RolloutShow { target, id, json } => {
            admin::rollout_show(&target, id.as_deref(), json)
        }
        Command::RolloutAct { target, id, action } => admin::rollout_act(&target, &id, &action),
        Command::TaskCreate { target, file } => admin::task_create(&target, &file),
        Command::TaskList {
            target,
            agent,
            json,
        } => admin::task_list(&target, agent.as_deref(), json),
        Command::TaskShow { target, id, json } => admin::task_show(&target, &id, json),
        Command::TaskCancel { target, id } => admin::task_cancel(&target, &id),
        Command::TaskArtifact { target, file } => admin::task_artifact(&target, &file),
        Command::AdminTokenCreate {
            target,
            name,
            role,
            ttl,
        } => admin::admin_token_create(&target, &name, &role, ttl),
        Command::AdminTokenList { target, json } => admin::admin_token_list(&target, json),
        Command::AdminTokenRevoke { target, name } => admin::admin_token_revoke(&target, &name),
        Command::Audit {
            target,
            since,
            agent,
            actor,
            json,
        } => admin::audit(&target, since, agent.as_deref(), actor.as_deref(), json),
        Command::Backup {
            target,
            out,
            include_ca_key,
        } => admin::backup(&target, &out, include_ca_key),
        Command::Restore { from, data_dir } => serve::restore(&from, &data_dir),
    }
    .or_else(|e| {
        // `stella-server agents list | head -1`: the reader has what it wanted.
        if e.is_broken_pipe() {
            let _ = std::io::stderr().flush();
            Ok(())
        } else {
            Err(e)
        }
    })
}
