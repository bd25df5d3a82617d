//! The agent's logger: logfmt lines on stderr (journald collects them), with a
//! level that configuration can change at run time.

use std::cell::Cell;
use std::fmt::Display;

pub(crate) use stella_proto::logfmt::Level;

thread_local! {
    static THRESHOLD: Cell<Level> = const { Cell::new(Level::Info) };
}

/// Sets the lowest level that is written.
pub(crate) fn set_level(level: Level) {
    THRESHOLD.with(|t| t.set(level));
}

/// Writes one line if `level` is at or above the threshold.
pub(crate) fn log(level: Level, msg: &str, fields: &[(&str, &dyn Display)]) {
    if level < THRESHOLD.with(Cell::get) {
        return;
    }
    let mut scratch = String::new();
    let stderr = std::io::stderr();
    let _ = stella_proto::logfmt::write_line(&mut stderr.lock(), &mut scratch, level, msg, fields);
}

pub(crate) fn debug(msg: &str, fields: &[(&str, &dyn Display)]) {
    log(Level::Debug, msg, fields);
}

pub(crate) fn info(msg: &str, fields: &[(&str, &dyn Display)]) {
    log(Level::Info, msg, fields);
}

pub(crate) fn warn(msg: &str, fields: &[(&str, &dyn Display)]) {
    log(Level::Warn, msg, fields);
}

pub(crate) fn error(msg: &str, fields: &[(&str, &dyn Display)]) {
    log(Level::Error, msg, fields);
}
