//! Agent configuration as both sides see it: the keys an agent understands and
//! their validation, the scope merge (global < label < agent), and the
//! canonical JSON (sorted keys, no whitespace) whose SHA-256 is the config hash.

use std::fmt;
use std::time::Duration;

use miniserde::json::{self, Object, Value};

use crate::api::Labels;
use crate::logfmt::Level;

/// What the agent does about findings it can fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remediation {
    Off,
    DryRun,
    Auto,
}

impl Remediation {
    pub fn as_str(self) -> &'static str {
        match self {
            Remediation::Off => "off",
            Remediation::DryRun => "dry-run",
            Remediation::Auto => "auto",
        }
    }
}

/// A validated configuration, with defaults for what it does not set.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Overrides the server's default heartbeat interval.
    pub heartbeat_interval: Option<Duration>,
    pub doctor_interval: Duration,
    pub remediation: Remediation,
    pub log_level: Level,
    /// Bytes that must stay free in the state dir.
    pub disk_min_free: u64,
    pub max_clock_skew: Duration,
    /// UTC hours `[start, end)` in which updates may apply (may wrap midnight).
    pub update_window: Option<(u8, u8)>,
    pub labels: Labels,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            heartbeat_interval: None,
            doctor_interval: Duration::from_secs(300),
            remediation: Remediation::Off,
            log_level: Level::Info,
            disk_min_free: 64 << 20,
            max_clock_skew: Duration::from_secs(30),
            update_window: None,
            labels: Labels::new(),
        }
    }
}

impl Settings {
    /// Whether `hour` (UTC, 0–23) is inside the update window.
    pub fn update_allowed_at(&self, hour: u8) -> bool {
        match self.update_window {
            None => true,
            Some((start, end)) if start < end => (start..end).contains(&hour),
            Some((start, end)) => hour >= start || hour < end,
        }
    }
}

/// Everything wrong with a configuration document, in one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config: {}", self.problems.join("; "))
    }
}

impl std::error::Error for ConfigError {}

/// The keys an agent understands.
pub const KEYS: [&str; 8] = [
    "heartbeat_interval",
    "doctor_interval",
    "remediation",
    "log_level",
    "disk_min_free",
    "max_clock_skew",
    "update_window",
    "labels",
];

fn duration_in(
    key: &str,
    v: &Value,
    min: Duration,
    max: Duration,
    problems: &mut Vec<String>,
) -> Option<Duration> {
    let Value::String(s) = v else {
        problems.push(format!("{key} must be a duration string like \"30s\""));
        return None;
    };
    match crate::parse_duration(s) {
        Ok(d) if d >= min && d <= max => Some(d),
        Ok(_) => {
            problems.push(format!(
                "{key} {s:?} is out of range ({} to {})",
                crate::format_duration(min),
                crate::format_duration(max)
            ));
            None
        }
        Err(e) => {
            problems.push(format!("{key}: {e}"));
            None
        }
    }
}

/// Parses `1048576`, `"64MiB"`, `"500MB"`, `"2GiB"`...
fn bytes(key: &str, v: &Value, problems: &mut Vec<String>) -> Option<u64> {
    let parsed = match v {
        Value::Number(json::Number::U64(n)) => Some(*n),
        Value::String(s) => {
            let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            let (digits, unit) = s.split_at(split);
            let scale: Option<u64> = match unit.trim() {
                "" | "B" => Some(1),
                "KB" => Some(1_000),
                "MB" => Some(1_000_000),
                "GB" => Some(1_000_000_000),
                "KiB" => Some(1 << 10),
                "MiB" => Some(1 << 20),
                "GiB" => Some(1 << 30),
                _ => None,
            };
            match (digits.parse::<u64>().ok(), scale) {
                (Some(n), Some(scale)) => n.checked_mul(scale),
                _ => None,
            }
        }
        _ => None,
    };
    match parsed {
        Some(n) if n <= 1 << 40 => Some(n),
        _ => {
            problems.push(format!(
                "{key} must be a byte count like 67108864 or \"64MiB\" (at most 1TiB)"
            ));
            None
        }
    }
}

/// Validates a configuration document; unknown keys are errors too.
pub fn parse_settings(doc: &Value) -> Result<Settings, ConfigError> {
    let Value::Object(map) = doc else {
        return Err(ConfigError {
            problems: vec!["the configuration must be a JSON object".into()],
        });
    };
    let mut s = Settings::default();
    let mut problems = Vec::new();
    let secs = Duration::from_secs;
    for (key, v) in map.iter() {
        match key.as_str() {
            "heartbeat_interval" => {
                s.heartbeat_interval = duration_in(key, v, secs(1), secs(86_400), &mut problems)
            }
            "doctor_interval" => {
                if let Some(d) = duration_in(key, v, secs(1), secs(7 * 86_400), &mut problems) {
                    s.doctor_interval = d;
                }
            }
            "max_clock_skew" => {
                if let Some(d) = duration_in(key, v, secs(1), secs(3600), &mut problems) {
                    s.max_clock_skew = d;
                }
            }
            "remediation" => match v {
                Value::String(r) if r == "off" => s.remediation = Remediation::Off,
                Value::String(r) if r == "dry-run" => s.remediation = Remediation::DryRun,
                Value::String(r) if r == "auto" => s.remediation = Remediation::Auto,
                _ => problems.push("remediation must be \"off\", \"dry-run\" or \"auto\"".into()),
            },
            "log_level" => match v {
                Value::String(l) if Level::parse(l).is_some() => {
                    s.log_level = Level::parse(l).unwrap_or(Level::Info)
                }
                _ => problems
                    .push("log_level must be \"debug\", \"info\", \"warn\" or \"error\"".into()),
            },
            "disk_min_free" => {
                if let Some(n) = bytes(key, v, &mut problems) {
                    s.disk_min_free = n;
                }
            }
            "update_window" => match v {
                Value::Null => s.update_window = None,
                Value::String(w) => {
                    let hours = w
                        .split_once('-')
                        .and_then(|(a, b)| Some((a.parse::<u8>().ok()?, b.parse::<u8>().ok()?)))
                        .filter(|(a, b)| *a < 24 && *b <= 24 && a != b);
                    match hours {
                        Some(h) => s.update_window = Some(h),
                        None => problems.push(format!(
                            "update_window {w:?} must be \"START-END\" in UTC hours, like \"02-05\" or \"22-04\""
                        )),
                    }
                }
                _ => problems.push("update_window must be a string like \"02-05\" or null".into()),
            },
            "labels" => match v {
                Value::Object(labels) => {
                    for (k, lv) in labels.iter() {
                        match lv {
                            Value::String(text)
                                if !k.is_empty() && k.len() <= 63 && text.len() <= 63 =>
                            {
                                s.labels.insert(k.clone(), text.clone());
                            }
                            _ => problems.push(format!("labels.{k} must be a short string")),
                        }
                    }
                }
                _ => problems.push("labels must be an object of strings".into()),
            },
            other => problems.push(format!(
                "unknown key {other:?} (known: {})",
                KEYS.join(", ")
            )),
        }
    }
    if problems.is_empty() {
        Ok(s)
    } else {
        Err(ConfigError { problems })
    }
}

/// The canonical form: keys sorted (byte order), no whitespace.
pub fn canonical(doc: &Value) -> String {
    // miniserde objects are BTreeMaps (sorted by key) and it writes no spaces.
    json::to_string(doc)
}

/// Hex SHA-256 of the canonical form.
pub fn hash(doc: &Value) -> String {
    crate::hash::hex(&crate::hash::sha256(canonical(doc).as_bytes()))
}

/// The empty configuration `{}`.
pub fn empty() -> Value {
    Value::Object(Object::new())
}

/// Merges layers in order (later wins), key by key at the top level: an agent
/// scope that sets `labels` replaces the whole `labels` of a wider scope.
pub fn merge<'a>(layers: impl IntoIterator<Item = &'a Value>) -> Value {
    let mut out = Object::new();
    for layer in layers {
        if let Value::Object(map) = layer {
            for (k, v) in map.iter() {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    Value::Object(out)
}

/// Parses a JSON document.
pub fn parse(text: &str) -> Option<Value> {
    json::from_str(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Value {
        parse(text).unwrap()
    }

    #[test]
    fn canonical_bytes_are_pinned() {
        let doc = v(r#"{ "b": {"y": [1, "x", null, true], "a": -2, "m": 1.5},
                         "a": "é\n\"q\"", "c": {} }"#);
        assert_eq!(
            canonical(&doc),
            r#"{"a":"é\n\"q\"","b":{"a":-2,"m":1.5,"y":[1,"x",null,true]},"c":{}}"#
        );
        assert_eq!(
            hash(&doc),
            crate::hash::hex(&crate::hash::sha256(canonical(&doc).as_bytes()))
        );
        assert_eq!(
            hash(&empty()),
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        // Key order and spacing do not change the hash.
        assert_eq!(
            hash(&v(r#"{"x":1,"y":2}"#)),
            hash(&v("{ \"y\" : 2 , \"x\" : 1 }"))
        );
    }

    #[test]
    fn merges_global_then_label_then_agent() {
        let global = v(r#"{"log_level":"info","heartbeat_interval":"30s","labels":{"a":"1"}}"#);
        let label = v(r#"{"log_level":"warn","remediation":"dry-run"}"#);
        let agent = v(r#"{"remediation":"auto","labels":{"b":"2"}}"#);
        let merged = merge([&global, &label, &agent]);
        assert_eq!(
            canonical(&merged),
            r#"{"heartbeat_interval":"30s","labels":{"b":"2"},"log_level":"warn","remediation":"auto"}"#
        );
    }

    #[test]
    fn validates_every_key() {
        let s = parse_settings(&v(r#"{"heartbeat_interval":"5s","doctor_interval":"1m","remediation":"auto",
            "log_level":"debug","disk_min_free":"64MiB","max_clock_skew":"10s","update_window":"22-04",
            "labels":{"env":"prod"}}"#))
        .unwrap();
        assert_eq!(s.heartbeat_interval, Some(Duration::from_secs(5)));
        assert_eq!(
            (s.remediation, s.log_level, s.disk_min_free),
            (Remediation::Auto, Level::Debug, 64 << 20)
        );
        assert!(
            s.update_allowed_at(23)
                && s.update_allowed_at(3)
                && !s.update_allowed_at(4)
                && !s.update_allowed_at(12)
        );
        assert_eq!(parse_settings(&empty()).unwrap(), Settings::default());
    }

    #[test]
    fn refuses_wrong_types_ranges_and_unknown_keys() {
        for (doc, needle) in [
            (r#"{"heartbeat_interval":5}"#, "duration string"),
            (r#"{"heartbeat_interval":"0s"}"#, "out of range"),
            (r#"{"remediation":"sometimes"}"#, "remediation must be"),
            (r#"{"log_level":"loud"}"#, "log_level must be"),
            (r#"{"disk_min_free":"lots"}"#, "byte count"),
            (r#"{"update_window":"25-03"}"#, "update_window"),
            (r#"{"labels":{"a":1}}"#, "labels.a"),
            (r#"{"colour":"blue"}"#, "unknown key \"colour\""),
            (r#"[1,2]"#, "must be a JSON object"),
        ] {
            let err = parse_settings(&v(doc)).unwrap_err();
            assert!(err.to_string().contains(needle), "{doc}: {err}");
        }
        let two = parse_settings(&v(r#"{"colour":"blue","log_level":7}"#)).unwrap_err();
        assert_eq!(two.problems.len(), 2);
    }
}
