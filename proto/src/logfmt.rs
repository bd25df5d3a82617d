//! logfmt lines (`ts=... level=info msg="..." key=value`) for the agent's and
//! server's stderr, which journald collects. Formatting only: the caller owns
//! the writer.

use std::fmt::Display;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// Severity of a log line, in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    /// The name used in log lines and in the `log_level` setting.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }

    /// Parses `debug|info|warn|error`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "debug" => Level::Debug,
            "info" => Level::Info,
            "warn" => Level::Warn,
            "error" => Level::Error,
            _ => return None,
        })
    }
}

struct Quoted<'a>(&'a str);

impl Display for Quoted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plain = !self.0.is_empty()
            && self
                .0
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'=' && b != b'\\');
        if plain {
            return f.write_str(self.0);
        }
        f.write_str("\"")?;
        for c in self.0.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                c if c.is_control() => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => write!(f, "{c}")?,
            }
        }
        f.write_str("\"")
    }
}

/// Writes one line. Field values are quoted when they need it; a value is
/// formatted into `scratch`, which callers can reuse.
pub fn write_line(
    out: &mut impl Write,
    scratch: &mut String,
    level: Level,
    msg: &str,
    fields: &[(&str, &dyn Display)],
) -> std::io::Result<()> {
    use std::fmt::Write as _;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    write!(
        out,
        "ts={} level={} msg={}",
        crate::time::rfc3339(now),
        level.as_str(),
        Quoted(msg)
    )?;
    for (key, value) in fields {
        scratch.clear();
        let _ = write!(scratch, "{value}");
        write!(out, " {key}={}", Quoted(scratch))?;
    }
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_when_needed() {
        let mut out = Vec::new();
        let mut scratch = String::new();
        write_line(
            &mut out,
            &mut scratch,
            Level::Warn,
            "heartbeat refused",
            &[
                ("status", &403),
                ("error", &"agent is \"deactivated\""),
                ("id", &"agt_x"),
            ],
        )
        .unwrap();
        let line = String::from_utf8(out).unwrap();
        assert!(line.starts_with("ts="), "{line}");
        assert!(line.ends_with(
            " level=warn msg=\"heartbeat refused\" status=403 error=\"agent is \\\"deactivated\\\"\" id=agt_x\n"
        ), "{line}");
    }
}
