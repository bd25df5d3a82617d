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

/// Shows a string with every control character escaped as `\u{..}` (ESC
/// as `\u{1b}`, a newline as `\u{a}`), for human-readable output.
pub(crate) struct Escaped<'a>(pub(crate) &'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(char::is_control) {
            f.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            write!(f, "\\u{{{:x}}}", c as u32)?;
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::Escaped;

    #[test]
    fn control_characters_are_shown_escaped() {
        let hostile = "1.0\u{1b}]0;owned\u{7}\u{9b}2J\nnext\u{0}\u{7f} é";
        assert_eq!(
            Escaped(hostile).to_string(),
            "1.0\\u{1b}]0;owned\\u{7}\\u{9b}2J\\u{a}next\\u{0}\\u{7f} é"
        );
        assert_eq!(Escaped("plain text").to_string(), "plain text");
    }
}
