//! The signed release statement (DESIGN section 5): an in-toto Statement v1 whose
//! subjects are the release files by safe relative path with their sha256, and
//! whose predicate names the version; plus release versions and their order.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use miniserde::{Deserialize, Serialize};

/// DSSE payloadType of a release envelope.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

/// `_type` of an in-toto Statement v1.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";

/// `predicateType` of a Stella release.
pub const PREDICATE_TYPE: &str = "https://stella.dev/release/v1";

/// The envelope's file name in a release directory.
pub const ENVELOPE_FILE: &str = "release.dsse.json";

/// Longest subject name (bytes).
pub const MAX_NAME_BYTES: usize = 255;

/// Longest version string (bytes); versions end up in URLs and file names.
pub const MAX_VERSION_BYTES: usize = 64;

/// Why a statement, a version or a subject name was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReleaseError {
    /// Not JSON of the statement's shape.
    Json,
    /// `_type` is not [`STATEMENT_TYPE`].
    StatementType { found: String },
    /// `predicateType` is not [`PREDICATE_TYPE`].
    PredicateType { found: String },
    /// `field` (`version` or `allow_downgrade_from`) is not `MAJOR.MINOR.PATCH[-PRE]`.
    BadVersion { field: &'static str, value: String },
    /// `allow_downgrade_from` is not newer than `version`, so it allows nothing.
    DowngradeNotNewer { version: String, from: String },
    /// The statement names no files.
    NoSubjects,
    /// A subject name is not a safe relative path; `reason` says why.
    BadSubjectName { name: String, reason: &'static str },
    /// Two subjects have the same name.
    DuplicateSubject { name: String },
    /// A subject has no sha256 digest.
    NoSha256 { name: String },
    /// A subject's sha256 is not 64 lowercase hex digits.
    BadDigest { name: String, value: String },
}

/// At most 80 characters of untrusted text for an error line.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((end, _)) => format!("{}...", &s[..end]),
        None => s.to_owned(),
    }
}

impl fmt::Display for ReleaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Json => f.write_str(
                "release statement is not JSON of the in-toto shape \
                 {_type, subject: [{name, digest}], predicateType, predicate: {version, allow_downgrade_from}}",
            ),
            Self::StatementType { found } => write!(
                f,
                "statement _type {:?} is not {STATEMENT_TYPE:?}",
                shorten(found)
            ),
            Self::PredicateType { found } => write!(
                f,
                "predicateType {:?} is not {PREDICATE_TYPE:?}",
                shorten(found)
            ),
            Self::BadVersion { field, value } => write!(
                f,
                "{field} {:?} is not MAJOR.MINOR.PATCH with an optional -PRERELEASE \
                 (like 1.4.0 or 1.5.0-rc.1)",
                shorten(value)
            ),
            Self::DowngradeNotNewer { version, from } => write!(
                f,
                "allow_downgrade_from {from} is not newer than version {version}, so it allows no downgrade"
            ),
            Self::NoSubjects => f.write_str("release statement names no files (subject is empty)"),
            Self::BadSubjectName { name, reason } => {
                write!(f, "subject name {:?} is unsafe: {reason}", shorten(name))
            }
            Self::DuplicateSubject { name } => {
                write!(f, "subject {:?} appears more than once", shorten(name))
            }
            Self::NoSha256 { name } => {
                write!(f, "subject {:?} has no sha256 digest", shorten(name))
            }
            Self::BadDigest { name, value } => write!(
                f,
                "sha256 {:?} of subject {:?} is not 64 lowercase hex digits",
                shorten(value),
                shorten(name)
            ),
        }
    }
}

impl std::error::Error for ReleaseError {}

/// A release version: `MAJOR.MINOR.PATCH` with an optional `-PRERELEASE`
/// (semver 2.0 without build metadata), ordered by semver precedence.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
    /// Dot-separated pre-release identifiers; empty for a release.
    pub pre: String,
}

/// A numeric semver identifier: digits, no leading zero.
fn numeric(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

fn pre_identifier_ok(id: &str) -> bool {
    !id.is_empty()
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && (!id.bytes().all(|b| b.is_ascii_digit()) || id == "0" || !id.starts_with('0'))
}

impl Version {
    /// Parses `MAJOR.MINOR.PATCH[-PRE]`.
    pub fn parse(s: &str) -> Result<Self, ReleaseError> {
        Self::parse_field("version", s)
    }

    fn parse_field(field: &'static str, s: &str) -> Result<Self, ReleaseError> {
        let bad = || ReleaseError::BadVersion {
            field,
            value: s.to_owned(),
        };
        if s.len() > MAX_VERSION_BYTES {
            return Err(bad());
        }
        let (core, pre) = match s.split_once('-') {
            Some((core, pre)) => (core, pre),
            None => (s, ""),
        };
        if s.contains('-') && !pre.split('.').all(pre_identifier_ok) {
            return Err(bad());
        }
        let mut parts = core.split('.');
        let (Some(major), Some(minor), Some(patch), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        Ok(Self {
            major: numeric(major).ok_or_else(bad)?,
            minor: numeric(minor).ok_or_else(bad)?,
            patch: numeric(patch).ok_or_else(bad)?,
            pre: pre.to_owned(),
        })
    }

    /// Whether this is a pre-release (`1.5.0-rc.1`).
    pub fn is_prerelease(&self) -> bool {
        !self.pre.is_empty()
    }
}

impl FromStr for Version {
    type Err = ReleaseError;

    fn from_str(s: &str) -> Result<Self, ReleaseError> {
        Self::parse(s)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)?;
        if self.is_prerelease() {
            write!(f, "-{}", self.pre)?;
        }
        Ok(())
    }
}

/// Semver precedence of two pre-release identifiers.
fn cmp_identifier(a: &str, b: &str) -> Ordering {
    let digits = |s: &str| s.bytes().all(|c| c.is_ascii_digit());
    match (digits(a), digits(b)) {
        // No leading zeros, so the longer number is the larger; this also
        // orders numbers too big for u64.
        (true, true) => a.len().cmp(&b.len()).then_with(|| a.cmp(b)),
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => a.cmp(b),
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major, self.minor, self.patch)
            .cmp(&(other.major, other.minor, other.patch))
            .then_with(|| match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                // A pre-release comes before its release.
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => {
                    let mut a = self.pre.split('.');
                    let mut b = other.pre.split('.');
                    loop {
                        match (a.next(), b.next()) {
                            (None, None) => return Ordering::Equal,
                            (None, Some(_)) => return Ordering::Less,
                            (Some(_), None) => return Ordering::Greater,
                            (Some(x), Some(y)) => match cmp_identifier(x, y) {
                                Ordering::Equal => {}
                                unequal => return unequal,
                            },
                        }
                    }
                }
            })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Compares two version strings by semver precedence.
pub fn compare_versions(a: &str, b: &str) -> Result<Ordering, ReleaseError> {
    Ok(Version::parse(a)?.cmp(&Version::parse(b)?))
}

/// Checks that `name` is a safe relative path inside a release directory:
/// `/`-separated, no empty, `.` or `..` segment, no leading `/`, no backslash,
/// no control character (NUL included), at most [`MAX_NAME_BYTES`].
pub fn check_subject_name(name: &str) -> Result<(), ReleaseError> {
    let refuse = |reason| {
        Err(ReleaseError::BadSubjectName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return refuse("it is empty");
    }
    if name.len() > MAX_NAME_BYTES {
        return refuse("it is longer than 255 bytes");
    }
    if name.starts_with('/') {
        return refuse("it is an absolute path");
    }
    if name.contains('\\') {
        return refuse("it contains a backslash");
    }
    if name.contains('\0') {
        return refuse("it contains a NUL byte");
    }
    if name.chars().any(char::is_control) {
        return refuse("it contains a control character");
    }
    for segment in name.split('/') {
        match segment {
            "" => return refuse("it has an empty path segment"),
            "." => return refuse("it has a \".\" path segment"),
            ".." => return refuse("it has a \"..\" path segment"),
            _ => {}
        }
    }
    Ok(())
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// One release file: its path relative to the release directory and digests.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// `<target-triple>/stella-agent`, ...
    pub name: String,
    /// Algorithm name to lowercase hex; `sha256` is the one Stella checks.
    pub digest: BTreeMap<String, String>,
}

impl Subject {
    /// A subject with its sha256.
    pub fn new(name: &str, sha256: &[u8; 32]) -> Self {
        Self {
            name: name.to_owned(),
            digest: BTreeMap::from([("sha256".to_owned(), crate::hash::hex(sha256))]),
        }
    }

    /// The sha256 as lowercase hex, if there is one.
    pub fn sha256(&self) -> Option<&str> {
        self.digest.get("sha256").map(String::as_str)
    }
}

/// What a Stella release says about itself.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Predicate {
    pub version: String,
    /// Agents running a version newer than `version`, up to and including this
    /// one, may install this release although it is older; `null` allows no downgrade.
    pub allow_downgrade_from: Option<String>,
}

/// An in-toto Statement v1 for a Stella release.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub statement_type: String,
    pub subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    pub predicate: Predicate,
}

impl Statement {
    /// Builds a statement and checks it as a verifier would.
    pub fn new(
        version: &str,
        allow_downgrade_from: Option<&str>,
        subject: Vec<Subject>,
    ) -> Result<Self, ReleaseError> {
        let statement = Self {
            statement_type: STATEMENT_TYPE.to_owned(),
            subject,
            predicate_type: PREDICATE_TYPE.to_owned(),
            predicate: Predicate {
                version: version.to_owned(),
                allow_downgrade_from: allow_downgrade_from.map(str::to_owned),
            },
        };
        statement.validate()?;
        Ok(statement)
    }

    /// Parses and validates a statement (the payload of a verified envelope).
    pub fn from_json(bytes: &[u8]) -> Result<Self, ReleaseError> {
        let text = std::str::from_utf8(bytes).map_err(|_| ReleaseError::Json)?;
        let statement: Self = miniserde::json::from_str(text).map_err(|_| ReleaseError::Json)?;
        statement.validate()?;
        Ok(statement)
    }

    /// The statement as one line of JSON.
    pub fn to_json(&self) -> String {
        miniserde::json::to_string(self)
    }

    /// Checks the types, the versions, and every subject's name and sha256.
    pub fn validate(&self) -> Result<(), ReleaseError> {
        if self.statement_type != STATEMENT_TYPE {
            return Err(ReleaseError::StatementType {
                found: self.statement_type.clone(),
            });
        }
        if self.predicate_type != PREDICATE_TYPE {
            return Err(ReleaseError::PredicateType {
                found: self.predicate_type.clone(),
            });
        }
        let version = self.version()?;
        if let Some(from) = self.allow_downgrade_from()?
            && from <= version
        {
            return Err(ReleaseError::DowngradeNotNewer {
                version: version.to_string(),
                from: from.to_string(),
            });
        }
        if self.subject.is_empty() {
            return Err(ReleaseError::NoSubjects);
        }
        let mut seen = BTreeSet::new();
        for subject in &self.subject {
            check_subject_name(&subject.name)?;
            if !seen.insert(subject.name.as_str()) {
                return Err(ReleaseError::DuplicateSubject {
                    name: subject.name.clone(),
                });
            }
            let sha256 = subject.sha256().ok_or_else(|| ReleaseError::NoSha256 {
                name: subject.name.clone(),
            })?;
            if !is_sha256_hex(sha256) {
                return Err(ReleaseError::BadDigest {
                    name: subject.name.clone(),
                    value: sha256.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// The release version.
    pub fn version(&self) -> Result<Version, ReleaseError> {
        Version::parse_field("version", &self.predicate.version)
    }

    /// The newest running version allowed to downgrade to this release, if any.
    pub fn allow_downgrade_from(&self) -> Result<Option<Version>, ReleaseError> {
        self.predicate
            .allow_downgrade_from
            .as_deref()
            .map(|v| Version::parse_field("allow_downgrade_from", v))
            .transpose()
    }

    /// The subject for a file, by its path relative to the release directory.
    pub fn subject_for(&self, path: &str) -> Option<&Subject> {
        self.subject.iter().find(|s| s.name == path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "x86_64-unknown-linux-musl/stella-agent";

    fn statement() -> Statement {
        Statement::new(
            "1.4.0",
            None,
            vec![
                Subject::new(AGENT, &crate::hash::sha256(b"agent")),
                Subject::new(
                    "aarch64-unknown-linux-musl/stella-agent",
                    &crate::hash::sha256(b"arm"),
                ),
            ],
        )
        .unwrap()
    }

    /// `statement()` as JSON with `from` replaced by `to`, parsed.
    fn parse_edited(from: &str, to: &str) -> Result<Statement, ReleaseError> {
        let json = statement().to_json();
        assert!(json.contains(from), "{from} not in {json}");
        Statement::from_json(json.replacen(from, to, 1).as_bytes())
    }

    #[test]
    fn serializes_the_in_toto_shape() {
        let json = statement().to_json();
        let agent = crate::hash::hex(&crate::hash::sha256(b"agent"));
        assert!(json.starts_with(&format!(
            r#"{{"_type":"https://in-toto.io/Statement/v1","subject":[{{"name":"{AGENT}","digest":{{"sha256":"{agent}"}}}},"#
        )));
        assert!(json.ends_with(
            r#"],"predicateType":"https://stella.dev/release/v1","predicate":{"version":"1.4.0","allow_downgrade_from":null}}"#
        ));
        assert_eq!(Statement::from_json(json.as_bytes()).unwrap(), statement());
    }

    #[test]
    fn round_trips_with_a_downgrade_and_finds_subjects() {
        let s =
            Statement::new("1.4.0", Some("1.5.0"), vec![Subject::new(AGENT, &[7; 32])]).unwrap();
        assert!(s.to_json().contains(r#""allow_downgrade_from":"1.5.0""#));
        let back = Statement::from_json(s.to_json().as_bytes()).unwrap();
        assert_eq!(
            back.allow_downgrade_from().unwrap(),
            Some(Version::parse("1.5.0").unwrap())
        );
        assert_eq!(back.version().unwrap().to_string(), "1.4.0");
        assert_eq!(
            back.subject_for(AGENT).and_then(Subject::sha256),
            Some("07".repeat(32).as_str())
        );
        assert!(back.subject_for("x86_64-unknown-linux-musl").is_none());
        assert!(
            back.subject_for("/x86_64-unknown-linux-musl/stella-agent")
                .is_none()
        );
    }

    #[test]
    fn extra_digests_and_unknown_fields_are_ignored() {
        let s = parse_edited("{\"sha256\"", "{\"sha512\":\"abc\",\"sha256\"").unwrap();
        assert_eq!(s.subject[0].digest.len(), 2);
        assert!(parse_edited("\"predicate\":{", "\"predicate\":{\"note\":[1],").is_ok());
    }

    #[test]
    fn refuses_wrong_types() {
        assert_eq!(
            parse_edited("Statement/v1", "Statement/v0.1")
                .unwrap_err()
                .to_string(),
            "statement _type \"https://in-toto.io/Statement/v0.1\" is not \"https://in-toto.io/Statement/v1\""
        );
        assert_eq!(
            parse_edited("stella.dev/release/v1", "slsa.dev/provenance/v1")
                .unwrap_err()
                .to_string(),
            "predicateType \"https://slsa.dev/provenance/v1\" is not \"https://stella.dev/release/v1\""
        );
    }

    #[test]
    fn refuses_malformed_json() {
        for bad in [
            "",
            "{}",
            "[]",
            r#"{"_type":"https://in-toto.io/Statement/v1"}"#,
            "\u{0}",
        ] {
            assert_eq!(
                Statement::from_json(bad.as_bytes()),
                Err(ReleaseError::Json),
                "{bad:?}"
            );
        }
        assert_eq!(parse_edited("\"1.4.0\"", "140"), Err(ReleaseError::Json));
        assert_eq!(Statement::from_json(b"\xff"), Err(ReleaseError::Json));
    }

    #[test]
    fn refuses_bad_versions() {
        for bad in [
            "",
            "1",
            "1.4",
            "1.4.0.1",
            "v1.4.0",
            "01.4.0",
            "1.04.0",
            "1.4.00",
            "1.4.0-",
            "1.4.0-rc..1",
            "1.4.0-rc.01",
            "1.4.0+build",
            "1.4.0-rc_1",
            "-1.4.0",
            "1.4.x",
            " 1.4.0",
            "18446744073709551616.0.0",
        ] {
            assert!(Version::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(Version::parse(&format!("1.0.0-{}", "a".repeat(60))).is_err());
        let err = parse_edited("\"1.4.0\"", "\"1.4\"").unwrap_err();
        assert_eq!(
            err.to_string(),
            "version \"1.4\" is not MAJOR.MINOR.PATCH with an optional -PRERELEASE (like 1.4.0 or 1.5.0-rc.1)"
        );
        let err = parse_edited(
            "\"allow_downgrade_from\":null",
            "\"allow_downgrade_from\":\"next\"",
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("allow_downgrade_from \"next\""),
            "{err}"
        );
    }

    #[test]
    fn refuses_a_downgrade_bound_that_allows_nothing() {
        for from in ["1.4.0", "1.3.9", "1.4.0-rc.1"] {
            let err = Statement::new("1.4.0", Some(from), vec![Subject::new(AGENT, &[0; 32])])
                .unwrap_err();
            assert!(
                matches!(err, ReleaseError::DowngradeNotNewer { .. }),
                "{from}: {err}"
            );
        }
    }

    #[test]
    fn accepts_good_versions() {
        for good in [
            "0.0.0",
            "1.4.0",
            "10.20.30",
            "1.5.0-rc.1",
            "1.0.0-alpha-1.0",
            "1.0.0-0",
        ] {
            assert_eq!(Version::parse(good).unwrap().to_string(), good);
        }
    }

    #[test]
    fn versions_follow_semver_precedence() {
        // The example list of semver 2.0 section 11, in increasing order.
        let ordered = [
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
            "1.0.1",
            "1.2.0",
            "1.10.0",
            "2.0.0",
        ];
        for pair in ordered.windows(2) {
            assert_eq!(
                compare_versions(pair[0], pair[1]),
                Ok(Ordering::Less),
                "{} < {}",
                pair[0],
                pair[1]
            );
            assert_eq!(compare_versions(pair[1], pair[0]), Ok(Ordering::Greater));
        }
        assert_eq!(compare_versions("1.4.0", "1.4.0"), Ok(Ordering::Equal));
        assert_eq!(
            compare_versions(
                "1.0.0-99999999999999999999999",
                "1.0.0-100000000000000000000000"
            ),
            Ok(Ordering::Less)
        );
        assert!(compare_versions("1.4.0", "1.4").is_err());
    }

    #[test]
    fn refuses_unsafe_subject_names() {
        let long = "a".repeat(256);
        let cases = [
            ("", "it is empty"),
            ("/etc/passwd", "it is an absolute path"),
            ("../stella-agent", "it has a \"..\" path segment"),
            ("x86/../../etc", "it has a \"..\" path segment"),
            ("x86/..", "it has a \"..\" path segment"),
            ("./stella-agent", "it has a \".\" path segment"),
            ("x86/./stella-agent", "it has a \".\" path segment"),
            ("x86//stella-agent", "it has an empty path segment"),
            ("x86/", "it has an empty path segment"),
            ("x86\\stella-agent", "it contains a backslash"),
            ("stella\0agent", "it contains a NUL byte"),
            ("stella\nagent", "it contains a control character"),
            (long.as_str(), "it is longer than 255 bytes"),
        ];
        for (name, reason) in cases {
            assert_eq!(
                check_subject_name(name),
                Err(ReleaseError::BadSubjectName {
                    name: name.to_owned(),
                    reason
                }),
                "{name:?}"
            );
            let err =
                Statement::new("1.0.0", None, vec![Subject::new(name, &[0; 32])]).unwrap_err();
            assert!(err.to_string().contains(reason), "{err}");
        }
        assert!(check_subject_name(&"a".repeat(255)).is_ok());
        assert!(check_subject_name("..a/b..c/.d").is_ok());
        // Untrusted names are shortened in messages.
        let err = check_subject_name(&long).unwrap_err().to_string();
        assert!(err.len() < 160, "{err}");
        // The same refusals apply to a parsed statement.
        let err = parse_edited(AGENT, "../stella-agent").unwrap_err();
        assert!(matches!(err, ReleaseError::BadSubjectName { .. }), "{err}");
    }

    #[test]
    fn refuses_duplicate_and_missing_subjects() {
        let dup = Statement::new(
            "1.0.0",
            None,
            vec![Subject::new(AGENT, &[0; 32]), Subject::new(AGENT, &[1; 32])],
        )
        .unwrap_err();
        assert_eq!(
            dup.to_string(),
            format!("subject \"{AGENT}\" appears more than once")
        );
        assert_eq!(
            Statement::new("1.0.0", None, vec![]),
            Err(ReleaseError::NoSubjects)
        );
    }

    #[test]
    fn refuses_bad_digests() {
        let good = crate::hash::hex(&crate::hash::sha256(b"agent"));
        assert_eq!(
            parse_edited("\"sha256\"", "\"sha512\"")
                .unwrap_err()
                .to_string(),
            format!("subject \"{AGENT}\" has no sha256 digest")
        );
        for bad in [
            good.to_uppercase(),
            good[..63].to_owned(),
            format!("{good}0"),
            format!("{}g", &good[..63]),
            String::new(),
        ] {
            let err = parse_edited(&good, &bad).unwrap_err();
            assert_eq!(
                err,
                ReleaseError::BadDigest {
                    name: AGENT.to_owned(),
                    value: bad.clone()
                }
            );
        }
    }
}
