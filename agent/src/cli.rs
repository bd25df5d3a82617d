//! Command line of `stella-agent`: raw parse with lexopt into a checked
//! `Command`. Usage errors exit with code 2.

use std::ffi::OsString;
use std::path::PathBuf;

use lexopt::prelude::*;
use stella_proto::RegistrationToken;
use stella_proto::api::Labels;

use crate::bootstrap::{BootstrapOptions, CaTrust};
use crate::error::Error;
use crate::install::InstallOptions;
use crate::state::DEFAULT_STATE_DIR;

pub(crate) const USAGE: &str = "\
usage:
  stella-agent bootstrap --server URL --token T (--ca-file F | --ca-hash sha256:H)
                         [--name N] [--label K=V]... [--release-key FILE]
                         [--deploy-key FILE]
  stella-agent run
  stella-agent doctor [--json] [-v]
  stella-agent remediate [--dry-run] [--json]
  stella-agent status [--json]
  stella-agent self-test
  stella-agent install --bundle DIR [--prefix P]
  stella-agent version
All commands take --state-dir DIR (default $STELLA_STATE_DIR or /var/lib/stella-agent).";

/// A parsed command.
#[derive(Debug)]
pub(crate) enum Command {
    Help,
    Version,
    Bootstrap(BootstrapOptions),
    Run,
    SelfTest,
    Status { json: bool },
    Doctor { json: bool, verbose: bool },
    Remediate { json: bool, dry_run: bool },
    Install(InstallOptions),
}

/// The command and the state dir it works on.
#[derive(Debug)]
pub struct Invocation {
    pub(crate) state_dir: PathBuf,
    pub(crate) command: Command,
}

fn usage(msg: impl Into<String>) -> Error {
    Error::Usage(msg.into())
}

fn lex(e: lexopt::Error) -> Error {
    usage(e.to_string())
}

fn string(v: OsString, what: &str) -> Result<String, Error> {
    v.into_string()
        .map_err(|v| usage(format!("{what} must be valid UTF-8, not {}", v.display())))
}

/// Parses the process arguments.
pub(crate) fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Invocation, Error> {
    let mut p = lexopt::Parser::from_iter(args);
    let mut state_dir = std::env::var_os("STELLA_STATE_DIR")
        .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), PathBuf::from);
    let mut command: Option<String> = None;
    let (mut json, mut server, mut token, mut ca_file, mut ca_hash, mut name) = (
        false,
        None::<String>,
        None::<String>,
        None::<PathBuf>,
        None::<String>,
        None::<String>,
    );
    let mut labels = Labels::new();
    let (mut verbose, mut dry_run) = (false, false);
    let mut release_key: Option<PathBuf> = None;
    let mut deploy_key: Option<PathBuf> = None;
    let (mut bundle, mut prefix) = (None::<PathBuf>, None::<PathBuf>);
    while let Some(arg) = p.next().map_err(lex)? {
        match arg {
            Long("help") | Short('h') => {
                return Ok(Invocation {
                    state_dir,
                    command: Command::Help,
                });
            }
            Long("version") | Short('V') => {
                return Ok(Invocation {
                    state_dir,
                    command: Command::Version,
                });
            }
            Long("state-dir") => state_dir = p.value().map_err(lex)?.into(),
            Long("json") => json = true,
            Long("verbose") | Short('v') => verbose = true,
            Long("dry-run") => dry_run = true,
            Long("server") => server = Some(string(p.value().map_err(lex)?, "--server")?),
            Long("token") => token = Some(string(p.value().map_err(lex)?, "--token")?),
            Long("ca-file") => ca_file = Some(p.value().map_err(lex)?.into()),
            Long("ca-hash") => ca_hash = Some(string(p.value().map_err(lex)?, "--ca-hash")?),
            Long("name") => name = Some(string(p.value().map_err(lex)?, "--name")?),
            Long("release-key") => release_key = Some(p.value().map_err(lex)?.into()),
            Long("deploy-key") => deploy_key = Some(p.value().map_err(lex)?.into()),
            Long("bundle") => bundle = Some(p.value().map_err(lex)?.into()),
            Long("prefix") => prefix = Some(p.value().map_err(lex)?.into()),
            Long("label") => {
                let s = string(p.value().map_err(lex)?, "--label")?;
                let (k, v) = s
                    .split_once('=')
                    .ok_or_else(|| usage(format!("--label {s:?} must be KEY=VALUE")))?;
                labels.insert(k.to_owned(), v.to_owned());
            }
            Value(v) if command.is_none() => command = Some(string(v, "command")?),
            other => return Err(usage(other.unexpected().to_string())),
        }
    }
    let command = command.ok_or_else(|| usage("missing command"))?;
    let only = |allowed: &[&str]| -> Result<(), Error> {
        let given = [
            ("json", json),
            ("server", server.is_some()),
            ("token", token.is_some()),
            ("ca-file", ca_file.is_some()),
            ("ca-hash", ca_hash.is_some()),
            ("name", name.is_some()),
            ("label", !labels.is_empty()),
            ("verbose", verbose),
            ("dry-run", dry_run),
            ("release-key", release_key.is_some()),
            ("deploy-key", deploy_key.is_some()),
            ("bundle", bundle.is_some()),
            ("prefix", prefix.is_some()),
        ];
        match given
            .iter()
            .find(|(flag, set)| *set && !allowed.contains(flag))
        {
            Some((flag, _)) => Err(usage(format!("`{command}` does not take --{flag}"))),
            None => Ok(()),
        }
    };
    let command = match command.as_str() {
        "help" => Command::Help,
        "version" => {
            only(&[])?;
            Command::Version
        }
        "run" => {
            only(&[])?;
            Command::Run
        }
        "self-test" => {
            only(&[])?;
            Command::SelfTest
        }
        "status" => {
            only(&["json"])?;
            Command::Status { json }
        }
        "doctor" => {
            only(&["json", "verbose"])?;
            Command::Doctor { json, verbose }
        }
        "remediate" => {
            only(&["json", "dry-run"])?;
            Command::Remediate { json, dry_run }
        }
        "install" => {
            only(&["bundle", "prefix"])?;
            let bundle = bundle.ok_or_else(|| usage("install needs --bundle DIR"))?;
            Command::Install(InstallOptions {
                bundle,
                prefix: prefix.unwrap_or_else(|| PathBuf::from("/")),
            })
        }
        "bootstrap" => {
            only(&[
                "server",
                "token",
                "ca-file",
                "ca-hash",
                "name",
                "label",
                "release-key",
                "deploy-key",
            ])?;
            let server = server.ok_or_else(|| usage("bootstrap needs --server URL"))?;
            let token = token.ok_or_else(|| usage("bootstrap needs --token T"))?;
            let token =
                RegistrationToken::parse(&token).map_err(|e| usage(format!("--token: {e}")))?;
            let ca = match (ca_file, ca_hash) {
                (Some(f), None) => CaTrust::File(f),
                (None, Some(h)) => CaTrust::Hash(stella_proto::hash::parse_pin(&h).map_err(usage)?),
                (None, None) => {
                    return Err(usage(
                        "bootstrap needs --ca-file F or --ca-hash sha256:H to trust the server",
                    ));
                }
                (Some(_), Some(_)) => {
                    return Err(usage("give either --ca-file or --ca-hash, not both"));
                }
            };
            if let Some(n) = &name
                && (n.is_empty() || n.len() > 64 || n.chars().any(char::is_control))
            {
                return Err(usage(format!(
                    "--name {n:?} must be 1-64 printable characters"
                )));
            }
            Command::Bootstrap(BootstrapOptions {
                server,
                token,
                ca,
                name,
                labels,
                release_key,
                deploy_key,
            })
        }
        other => return Err(usage(format!("unknown command {other:?}"))),
    };
    Ok(Invocation { state_dir, command })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<OsString> {
        std::iter::once("stella-agent")
            .chain(s.split_whitespace())
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn parses_bootstrap() {
        let inv = parse(args(
            "bootstrap --server https://127.0.0.1:1 --token abc123.0123456789abcdefghijklmnopqrstuv \
             --ca-hash sha256:0000000000000000000000000000000000000000000000000000000000000000 --state-dir /s --name box1 --label site=lab",
        ))
        .unwrap();
        assert_eq!(inv.state_dir, PathBuf::from("/s"));
        let Command::Bootstrap(o) = inv.command else {
            panic!()
        };
        assert_eq!(o.name.as_deref(), Some("box1"));
        assert_eq!(o.labels["site"], "lab");
        assert!(matches!(o.ca, CaTrust::Hash(_)));
    }

    #[test]
    fn usage_errors_name_the_problem() {
        for (line, needle) in [
            (
                "bootstrap --server https://x --token nope --ca-file f",
                "malformed token",
            ),
            (
                "bootstrap --server https://x --token abc123.0123456789abcdefghijklmnopqrstuv",
                "--ca-file F or --ca-hash",
            ),
            (
                "bootstrap --server https://x --token abc123.0123456789abcdefghijklmnopqrstuv --ca-hash md5:1",
                "sha256:",
            ),
            ("run --json", "does not take --json"),
            ("install", "install needs --bundle DIR"),
            ("run --bundle b", "does not take --bundle"),
            ("fly", "unknown command"),
            ("", "missing command"),
        ] {
            let err = parse(args(line)).unwrap_err();
            assert!(matches!(err, Error::Usage(_)), "{line}");
            assert!(err.to_string().contains(needle), "{line}: {err}");
        }
    }
}
