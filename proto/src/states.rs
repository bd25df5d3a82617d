//! Typed states shared by agent, server and admin CLI: agent status and its
//! inactive reason, update phase, doctor check id and check status, a task
//! result's status and a task's aggregate state. Each has
//! one wire spelling (`as_str`), parsed back by `parse`; on the wire and in
//! `--json` output they are the same JSON strings as before they were typed.

use std::fmt;

use miniserde::de::Visitor;
use miniserde::ser::Fragment;
use miniserde::{Deserialize, Serialize};

/// Declares a closed enum of unit variants with one wire spelling each.
macro_rules! wire_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The wire spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The value spelled `text`, if there is one.
            pub fn parse(text: &str) -> Option<Self> {
                match text {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn begin(&self) -> Fragment<'_> {
                Fragment::Str(self.as_str().into())
            }
        }

        impl Deserialize for $name {
            fn begin(out: &mut Option<Self>) -> &mut dyn Visitor {
                miniserde::make_place!(Place);
                impl Visitor for Place<$name> {
                    fn string(&mut self, s: &str) -> miniserde::Result<()> {
                        self.out = Some($name::parse(s).ok_or(miniserde::Error)?);
                        Ok(())
                    }
                }
                Place::new(out)
            }
        }
    };
}

wire_enum! {
    /// Lifecycle status of an agent.
    AgentStatus {
        Active = "active",
        /// See [`InactiveReason`].
        Inactive = "inactive",
        /// Terminal: the host must enroll again.
        Revoked = "revoked",
    }
}

wire_enum! {
    /// Why an agent is `inactive`.
    InactiveReason {
        /// No heartbeat for `--heartbeat-misses` intervals.
        HeartbeatTimeout = "heartbeat_timeout",
        /// An administrator deactivated it.
        Deactivated = "deactivated",
    }
}

wire_enum! {
    /// Outcome of one doctor check.
    CheckStatus {
        Pass = "pass",
        Warn = "warn",
        Fail = "fail",
        Skip = "skip",
    }
}

wire_enum! {
    /// The 11 doctor checks, in the order they run and print.
    CheckId {
        IdentityCertificate = "identity.certificate",
        IdentityRenewal = "identity.renewal",
        IdentityKey = "identity.key",
        ServerReachable = "server.reachable",
        TimeSkew = "time.skew",
        HeartbeatRecent = "heartbeat.recent",
        ConfigDrift = "config.drift",
        StorageSpace = "storage.space",
        StorageWritable = "storage.writable",
        UpdateIntegrity = "update.integrity",
        HostResources = "host.resources",
    }
}

/// Where an agent stands with an update, as its heartbeat reports it.
/// A phase this build does not know (from a newer agent) is kept as
/// `Unknown` with its text, so that it is shown rather than refused.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum UpdatePhase {
    /// No update under way.
    #[default]
    Idle,
    /// An offer was accepted and is about to be fetched.
    Offered,
    /// The artifact is being fetched.
    Downloading,
    /// Size, digest and signature checked.
    Verified,
    /// The new binary is running its self-test.
    SelfTest,
    /// The new binary is in place.
    Swapped,
    /// The new version must prove itself.
    Probation,
    /// The new version passed probation.
    Committed,
    /// The update to the reported version failed.
    Failed,
    /// The new version failed probation and the old one is back.
    RolledBack,
    /// The update did not finish within its deadline.
    TimedOut,
    /// A phase this build does not know, as the agent spelled it.
    Unknown(String),
}

impl UpdatePhase {
    /// Every phase this build knows.
    pub const KNOWN: [UpdatePhase; 11] = [
        UpdatePhase::Idle,
        UpdatePhase::Offered,
        UpdatePhase::Downloading,
        UpdatePhase::Verified,
        UpdatePhase::SelfTest,
        UpdatePhase::Swapped,
        UpdatePhase::Probation,
        UpdatePhase::Committed,
        UpdatePhase::Failed,
        UpdatePhase::RolledBack,
        UpdatePhase::TimedOut,
    ];

    /// The wire spelling.
    pub fn as_str(&self) -> &str {
        match self {
            UpdatePhase::Idle => "idle",
            UpdatePhase::Offered => "offered",
            UpdatePhase::Downloading => "downloading",
            UpdatePhase::Verified => "verified",
            UpdatePhase::SelfTest => "self-test",
            UpdatePhase::Swapped => "swapped",
            UpdatePhase::Probation => "probation",
            UpdatePhase::Committed => "committed",
            UpdatePhase::Failed => "failed",
            UpdatePhase::RolledBack => "rolled_back",
            UpdatePhase::TimedOut => "timed_out",
            UpdatePhase::Unknown(text) => text,
        }
    }

    /// The phase spelled `text`; never fails (see `Unknown`).
    pub fn parse(text: &str) -> Self {
        UpdatePhase::KNOWN
            .iter()
            .find(|p| p.as_str() == text)
            .cloned()
            .unwrap_or_else(|| UpdatePhase::Unknown(text.to_owned()))
    }
}

impl PartialEq<&str> for UpdatePhase {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Display for UpdatePhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdatePhase::Unknown(text) => write!(f, "unknown({text})"),
            known => f.write_str(known.as_str()),
        }
    }
}

impl Serialize for UpdatePhase {
    fn begin(&self) -> Fragment<'_> {
        Fragment::Str(self.as_str().into())
    }
}

impl Deserialize for UpdatePhase {
    fn begin(out: &mut Option<Self>) -> &mut dyn Visitor {
        miniserde::make_place!(Place);
        impl Visitor for Place<UpdatePhase> {
            fn string(&mut self, s: &str) -> miniserde::Result<()> {
                self.out = Some(UpdatePhase::parse(s));
                Ok(())
            }
        }
        Place::new(out)
    }
}

wire_enum! {
    /// A task as a whole, aggregated over its audience's results (see
    /// `server/src/tasks.rs` for the rule).
    TaskState {
        /// Some agent of the audience has not reported yet.
        Pending = "pending",
        /// Some agent runs it.
        Running = "running",
        /// Every agent of the audience succeeded.
        Succeeded = "succeeded",
        /// Some agent reported a final status other than `succeeded`.
        Failed = "failed",
        /// An administrator cancelled it.
        Cancelled = "cancelled",
        /// `not_after` passed before every agent of the audience reported.
        Expired = "expired",
    }
}

/// Where one agent stands with one task, as its heartbeat reports it. A
/// status this build does not know (from a newer agent) is kept as `Unknown`
/// with its text, so that a heartbeat is never refused for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskStatus {
    /// Not run: signature, audience, expiry, capability or replay check failed.
    Refused,
    /// Started; a final status follows.
    Running,
    Succeeded,
    Failed,
    /// Killed at the task's timeout.
    TimedOut,
    /// Stopped on a cancel from the server.
    Cancelled,
    /// Was running when the agent stopped; never re-run.
    Interrupted,
    /// A status this build does not know, as the agent spelled it.
    Unknown(String),
}

impl TaskStatus {
    /// Every status this build knows.
    pub const KNOWN: [TaskStatus; 7] = [
        TaskStatus::Refused,
        TaskStatus::Running,
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::TimedOut,
        TaskStatus::Cancelled,
        TaskStatus::Interrupted,
    ];

    /// The wire spelling.
    pub fn as_str(&self) -> &str {
        match self {
            TaskStatus::Refused => "refused",
            TaskStatus::Running => "running",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::TimedOut => "timed_out",
            TaskStatus::Cancelled => "cancelled",
            TaskStatus::Interrupted => "interrupted",
            TaskStatus::Unknown(text) => text,
        }
    }

    /// The status spelled `text`; never fails (see `Unknown`).
    pub fn parse(text: &str) -> Self {
        TaskStatus::KNOWN
            .iter()
            .find(|s| s.as_str() == text)
            .cloned()
            .unwrap_or_else(|| TaskStatus::Unknown(text.to_owned()))
    }

    /// Whether the agent is done with the task (everything but `running`).
    pub fn is_final(&self) -> bool {
        *self != TaskStatus::Running
    }
}

impl PartialEq<&str> for TaskStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskStatus::Unknown(text) => write!(f, "unknown({text})"),
            known => f.write_str(known.as_str()),
        }
    }
}

impl Serialize for TaskStatus {
    fn begin(&self) -> Fragment<'_> {
        Fragment::Str(self.as_str().into())
    }
}

impl Deserialize for TaskStatus {
    fn begin(out: &mut Option<Self>) -> &mut dyn Visitor {
        miniserde::make_place!(Place);
        impl Visitor for Place<TaskStatus> {
            fn string(&mut self, s: &str) -> miniserde::Result<()> {
                self.out = Some(TaskStatus::parse(s));
                Ok(())
            }
        }
        Place::new(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use miniserde::json;

    #[test]
    fn closed_enums_round_trip_as_their_old_strings() {
        for s in AgentStatus::ALL {
            let text = json::to_string(s);
            assert_eq!(text, format!("\"{}\"", s.as_str()));
            assert_eq!(json::from_str::<AgentStatus>(&text).unwrap(), *s);
        }
        assert_eq!(
            InactiveReason::HeartbeatTimeout.as_str(),
            "heartbeat_timeout"
        );
        assert_eq!(CheckId::ALL.len(), 11);
        assert_eq!(CheckId::ALL[0].as_str(), "identity.certificate");
        assert_eq!(CheckId::ALL[10].as_str(), "host.resources");
        for id in CheckId::ALL {
            assert_eq!(CheckId::parse(id.as_str()), Some(*id));
        }
        assert_eq!(CheckStatus::parse("warn"), Some(CheckStatus::Warn));
    }

    #[test]
    fn closed_enums_refuse_unknown_text() {
        assert!(json::from_str::<AgentStatus>("\"asleep\"").is_err());
        assert!(json::from_str::<AgentStatus>("1").is_err());
        assert_eq!(CheckId::parse("identity"), None);
    }

    #[test]
    fn an_unknown_update_phase_is_kept_and_shown_as_unknown() {
        let phase: UpdatePhase = json::from_str("\"hibernating\"").unwrap();
        assert_eq!(phase, UpdatePhase::Unknown("hibernating".into()));
        assert_eq!(phase.to_string(), "unknown(hibernating)");
        assert_eq!(json::to_string(&phase), "\"hibernating\"");
        for known in &UpdatePhase::KNOWN {
            let text = json::to_string(known);
            assert_eq!(&json::from_str::<UpdatePhase>(&text).unwrap(), known);
        }
        assert_eq!(UpdatePhase::parse("self-test"), UpdatePhase::SelfTest);
    }

    #[test]
    fn task_statuses_round_trip_and_keep_unknown_ones() {
        for known in &TaskStatus::KNOWN {
            let text = json::to_string(known);
            assert_eq!(&json::from_str::<TaskStatus>(&text).unwrap(), known);
        }
        assert_eq!(TaskStatus::parse("timed_out"), TaskStatus::TimedOut);
        let odd: TaskStatus = json::from_str("\"paused\"").unwrap();
        assert_eq!(odd, TaskStatus::Unknown("paused".into()));
        assert!(odd.is_final() && !TaskStatus::Running.is_final());
        assert_eq!(json::to_string(&odd), "\"paused\"");
        assert_eq!(TaskState::parse("expired"), Some(TaskState::Expired));
    }
}
