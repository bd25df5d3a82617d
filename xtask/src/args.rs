//! Command-line parsing shared by the subcommands, on lexopt: the usage error
//! every `Options::parse` returns, with messages that name the subcommand and
//! the argument that was wrong.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

use lexopt::{Arg, Parser};

/// Why a command line is not run.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Usage {
    /// `-h` or `--help`: print the usage, exit 0.
    Help,
    /// What was wrong with the arguments: print it and the usage, exit 2.
    Wrong(String),
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Help => f.write_str("the usage was asked for (-h, --help)"),
            Self::Wrong(message) => f.write_str(message),
        }
    }
}

impl From<String> for Usage {
    fn from(message: String) -> Self {
        Self::Wrong(message)
    }
}

impl From<&str> for Usage {
    fn from(message: &str) -> Self {
        Self::Wrong(message.to_owned())
    }
}

impl Usage {
    /// An argument `command` does not take.
    pub(crate) fn unexpected(command: &str, arg: Arg<'_>) -> Self {
        Self::Wrong(format!("{command}: unexpected argument {:?}", text(&arg)))
    }
}

/// An argument as it was typed (options with their dashes).
pub(crate) fn text(arg: &Arg<'_>) -> String {
    match arg {
        Arg::Short(c) => format!("-{c}"),
        Arg::Long(name) => format!("--{name}"),
        Arg::Value(value) => value.to_string_lossy().into_owned(),
    }
}

/// The arguments of one subcommand, read with lexopt; errors name the command.
pub(crate) struct Args {
    command: &'static str,
    parser: Parser,
}

impl Args {
    /// `args` are what follows the subcommand's name.
    pub(crate) fn new<I>(command: &'static str, args: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<OsString>,
    {
        Self {
            command,
            parser: Parser::from_args(args),
        }
    }

    /// The next argument; `-h`/`--help` anywhere ends parsing with [`Usage::Help`].
    pub(crate) fn next(&mut self) -> Result<Option<Arg<'_>>, Usage> {
        let command = self.command;
        match self.parser.next() {
            Ok(Some(Arg::Short('h') | Arg::Long("help"))) => Err(Usage::Help),
            Ok(arg) => Ok(arg),
            Err(lexopt::Error::UnexpectedValue { option, value }) => Err(Usage::Wrong(format!(
                "{command}: {option} takes no value (got {value:?})"
            ))),
            Err(e) => Err(Usage::Wrong(format!("{command}: {e}"))),
        }
    }

    /// The value of the option `flag` just read (`--flag V` or `--flag=V`).
    pub(crate) fn value(&mut self, flag: &str) -> Result<OsString, Usage> {
        let command = self.command;
        self.parser.value().map_err(|e| match e {
            lexopt::Error::MissingValue { .. } => {
                Usage::Wrong(format!("{command}: {flag} needs a value"))
            }
            e => Usage::Wrong(format!("{command}: {flag}: {e}")),
        })
    }

    /// The value of `flag`, as text.
    pub(crate) fn string(&mut self, flag: &str) -> Result<String, Usage> {
        self.value(flag)?.into_string().map_err(|value| {
            Usage::Wrong(format!(
                "{}: {flag} {value:?} is not valid UTF-8",
                self.command
            ))
        })
    }

    /// The value of `flag`, as a path.
    pub(crate) fn path(&mut self, flag: &str) -> Result<PathBuf, Usage> {
        self.value(flag).map(PathBuf::from)
    }
}

#[cfg(test)]
mod tests {
    use lexopt::Arg::{Long, Value};

    use super::*;

    #[test]
    fn options_values_and_help_read() {
        let mut args = Args::new("x", ["--a=1", "--b", "2", "pos", "--c"]);
        assert_eq!(args.next(), Ok(Some(Long("a"))));
        assert_eq!(args.string("--a").unwrap(), "1");
        assert_eq!(args.next(), Ok(Some(Long("b"))));
        assert_eq!(args.path("--b").unwrap(), PathBuf::from("2"));
        assert_eq!(args.next(), Ok(Some(Value("pos".into()))));
        assert_eq!(args.next(), Ok(Some(Long("c"))));
        assert_eq!(
            args.value("--c").unwrap_err(),
            Usage::Wrong("x: --c needs a value".into())
        );
        let mut args = Args::new("x", ["pos", "-h"]);
        assert!(args.next().unwrap().is_some());
        assert_eq!(args.next(), Err(Usage::Help));
        let mut args = Args::new("x", ["--help"]);
        assert_eq!(args.next(), Err(Usage::Help));
    }

    #[test]
    fn errors_name_the_command_and_the_argument() {
        let mut args = Args::new("dist", ["--strict=yes"]);
        assert_eq!(args.next(), Ok(Some(Long("strict"))));
        assert_eq!(
            args.next().unwrap_err().to_string(),
            "dist: --strict takes no value (got \"yes\")"
        );
        assert_eq!(
            Usage::unexpected("sign", Long("force")).to_string(),
            "sign: unexpected argument \"--force\""
        );
        assert_eq!(
            Usage::unexpected("sign", Value("e".into())).to_string(),
            "sign: unexpected argument \"e\""
        );
    }
}
