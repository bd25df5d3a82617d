//! The server's logger: logfmt lines on stderr.

use std::fmt::Display;

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
