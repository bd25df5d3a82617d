//! The server's output: logfmt log lines on stderr, and command output on
//! stdout that a closed pipe ends quietly.

use std::fmt::Display;

use crate::error::Error;

pub(crate) use stella_proto::logfmt::Level;

/// Writes one log line to stderr.
pub(crate) fn log(level: Level, msg: &str, fields: &[(&str, &dyn Display)]) {
    let mut scratch = String::new();
    let stderr = std::io::stderr();
    let _ = stella_proto::logfmt::write_line(&mut stderr.lock(), &mut scratch, level, msg, fields);
}

pub(crate) fn info(msg: &str, fields: &[(&str, &dyn Display)]) {
    log(Level::Info, msg, fields);
}

pub(crate) fn warn(msg: &str, fields: &[(&str, &dyn Display)]) {
    log(Level::Warn, msg, fields);
}

/// Writes to stdout. A closed pipe (`agents list | head -1`) comes back as
/// an I/O error that `run` ends quietly on.
pub(crate) fn print(args: std::fmt::Arguments<'_>) -> Result<(), Error> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_fmt(args)
        .and_then(|()| stdout.flush())
        .map_err(|e| Error::io("cannot write to stdout", e))
}
