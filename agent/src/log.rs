//! The agent's logger: logfmt lines on stderr (journald collects them), with a
//! level that configuration can change at run time. While an update is under
//! way its lines are also kept (the last `MAX_FAILURE_LINES`, each bounded),
//! so that a failed update can be explained to the server after a rollback.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt::Display;
use std::io::Write;

use stella_proto::api::{MAX_FAILURE_LINE, MAX_FAILURE_LINES};
pub(crate) use stella_proto::logfmt::Level;
use stella_proto::text::bounded_line;

thread_local! {
    static THRESHOLD: Cell<Level> = const { Cell::new(Level::Info) };
    /// The lines of the update under way (`None`: no update, nothing kept).
    static CAPTURE: RefCell<Option<VecDeque<String>>> = const { RefCell::new(None) };
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
    if CAPTURE.with(|c| c.borrow().is_none()) {
        let _ =
            stella_proto::logfmt::write_line(&mut stderr.lock(), &mut scratch, level, msg, fields);
        return;
    }
    let mut line = Vec::new();
    let _ = stella_proto::logfmt::write_line(&mut line, &mut scratch, level, msg, fields);
    let _ = stderr.lock().write_all(&line);
    let text = bounded_line(&String::from_utf8_lossy(&line), MAX_FAILURE_LINE);
    CAPTURE.with(|c| {
        if let Some(kept) = c.borrow_mut().as_mut() {
            if kept.len() >= MAX_FAILURE_LINES {
                kept.pop_front();
            }
            kept.push_back(text);
        }
    });
}

/// Starts keeping the lines of an update, after `earlier` ones (from the
/// process before an exec); does nothing when already keeping them.
pub(crate) fn capture_start(earlier: Vec<String>) {
    CAPTURE.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            let mut kept: VecDeque<String> = earlier.into();
            while kept.len() > MAX_FAILURE_LINES {
                kept.pop_front();
            }
            *c = Some(kept);
        }
    });
}

/// The lines kept so far, still keeping.
pub(crate) fn captured() -> Vec<String> {
    CAPTURE.with(|c| c.borrow().iter().flatten().cloned().collect())
}

/// Stops keeping lines and returns them.
pub(crate) fn capture_take() -> Vec<String> {
    CAPTURE.with(|c| c.borrow_mut().take().map(Vec::from).unwrap_or_default())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_an_update_are_kept_bounded_only_while_asked() {
        info("before", &[]);
        assert!(captured().is_empty());
        capture_start(vec!["from the old process".into()]);
        for i in 0..100 {
            warn("download interrupted", &[("chunk", &i), ("error", &"a\nb")]);
        }
        let lines = capture_take();
        assert_eq!(lines.len(), MAX_FAILURE_LINES);
        assert!(lines[0].contains("chunk=36"), "{}", lines[0]);
        assert!(lines.iter().all(|l| !l.chars().any(char::is_control)));
        info("after", &[]);
        assert!(capture_take().is_empty());
    }
}
