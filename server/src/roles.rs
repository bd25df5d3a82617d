//! Scoped admin tokens and their roles: what each role may do, the rules for
//! minting and revoking a token (only its secret's hash is kept), and
//! deciding whether a presented bearer token is valid (compared in constant
//! time against every stored hash) and allowed a route. Pure: `app` drives
//! it, the store keeps the records, the route table names the role each
//! admin route needs.

use std::fmt;
use std::time::Duration;

use stella_proto::admin::AdminTokenView;
use stella_proto::time::rfc3339;

use crate::records::AdminTokenRecord;
use crate::refusal::Refusal;

/// The file in the data dir holding the `root` token's secret (0600), for
/// admin commands run on the server's host.
pub(crate) const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The token `init` makes, and what an old single admin token becomes.
pub(crate) const ROOT: &str = "root";
/// Longest lifetime an admin token may be given.
pub(crate) const MAX_ADMIN_TOKEN_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Admin tokens kept at most (revoked ones count): every authentication
/// compares against each of them.
pub(crate) const MAX_ADMIN_TOKENS: usize = 1000;

/// What an admin token may do; each role may do everything the ones before
/// it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Role {
    /// Lists and shows.
    Read,
    /// Also deactivates, activates, renews, offers updates, sets config,
    /// asks for doctor reports and acts on rollouts.
    Operate,
    /// Also revokes agents, creates tokens (enrollment and admin), imports
    /// releases and takes backups.
    Admin,
}

impl Role {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Role::Read),
            "operate" => Some(Role::Operate),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Operate => "operate",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The admin token behind a request that passed authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    pub(crate) name: String,
    pub(crate) role: Role,
}

/// Checks what `admin-token create` asks for.
pub(crate) fn check_create(name: &str, role: &str, ttl: Option<Duration>) -> Result<Role, Refusal> {
    check_name(name)?;
    let role = Role::parse(role).ok_or_else(|| {
        Refusal::bad_request(format!("invalid role {role:?}: use read, operate or admin"))
    })?;
    if let Some(ttl) = ttl
        && (ttl.is_zero() || ttl > MAX_ADMIN_TOKEN_TTL)
    {
        return Err(Refusal::bad_request(format!(
            "admin token ttl must be between 1s and {}",
            stella_proto::format_duration(MAX_ADMIN_TOKEN_TTL)
        )));
    }
    Ok(role)
}

/// Admin token names: 1-64 characters of `[A-Za-z0-9._-]`.
pub(crate) fn check_name(name: &str) -> Result<(), Refusal> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        let shown: String = name.chars().take(64).collect();
        Err(Refusal::bad_request(format!(
            "invalid admin token name {shown:?}: use 1-64 characters of [A-Za-z0-9._-]"
        )))
    }
}

/// The stored form of a new admin token whose secret is `secret`.
pub(crate) fn record(
    name: &str,
    role: Role,
    secret: &str,
    now: u64,
    ttl: Option<Duration>,
) -> AdminTokenRecord {
    from_hash(
        name,
        role,
        stella_proto::hash::hex(&stella_proto::token::hash_secret(secret)),
        now,
        ttl,
    )
}

/// The stored form of an admin token from its secret's hex SHA-256 (the old
/// single admin token of a store made before scoped tokens becomes `root`).
pub(crate) fn from_hash(
    name: &str,
    role: Role,
    secret_sha256: String,
    now: u64,
    ttl: Option<Duration>,
) -> AdminTokenRecord {
    AdminTokenRecord {
        name: name.to_owned(),
        role: role.as_str().to_owned(),
        secret_sha256,
        created_at: now,
        expires_at: ttl.map(|t| now + t.as_secs().max(1)),
        revoked_at: None,
    }
}

/// Whether another token may be created beside `existing`.
pub(crate) fn check_room(existing: &[AdminTokenRecord], name: &str) -> Result<(), Refusal> {
    if let Some(old) = existing.iter().find(|t| t.name == name) {
        return Err(Refusal::conflict(match old.revoked_at {
            Some(_) => format!("admin token {name} exists already (revoked: names are not reused)"),
            None => format!("admin token {name} exists already"),
        }));
    }
    if existing.len() >= MAX_ADMIN_TOKENS {
        return Err(Refusal::conflict(format!(
            "there are {MAX_ADMIN_TOKENS} admin tokens already (revoked ones count)"
        )));
    }
    Ok(())
}

/// Revokes `token`: `Ok(true)` to write it, `Ok(false)` when it was
/// revoked already (nothing to write).
pub(crate) fn revoke(token: &mut AdminTokenRecord, now: u64) -> Result<bool, Refusal> {
    if token.revoked_at.is_some() {
        return Ok(false);
    }
    token.revoked_at = Some(now);
    Ok(true)
}

/// `active`, `expired` or `revoked`.
pub(crate) fn state(token: &AdminTokenRecord, now: u64) -> &'static str {
    if token.revoked_at.is_some() {
        "revoked"
    } else if token.expires_at.is_some_and(|at| at <= now) {
        "expired"
    } else {
        "active"
    }
}

/// An admin token as `admin-token list` shows it.
pub(crate) fn view(token: &AdminTokenRecord, now: u64) -> AdminTokenView {
    AdminTokenView {
        name: token.name.clone(),
        role: token.role.clone(),
        created_at: rfc3339(token.created_at),
        expires_at: token.expires_at.map(rfc3339),
        revoked_at: token.revoked_at.map(rfc3339),
        state: state(token, now).to_owned(),
    }
}

/// Finds the caller behind `Authorization: Bearer <token>`. The presented
/// secret's hash is compared with every stored one in constant time, without
/// stopping at a match, so the time taken says nothing about which (or
/// whether one) matched. Unknown, revoked and expired tokens get 401.
pub(crate) fn authenticate(
    tokens: &[AdminTokenRecord],
    authorization: Option<&str>,
    now: u64,
) -> Result<Caller, Refusal> {
    let presented = authorization
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented else {
        return Err(Refusal::unauthorized(
            "admin endpoints need Authorization: Bearer <admin token>",
        ));
    };
    let hash = stella_proto::token::hash_secret(presented);
    let mut found = None;
    for (i, token) in tokens.iter().enumerate() {
        let stored = stella_proto::hash::unhex(&token.secret_sha256).unwrap_or_default();
        if stella_proto::token::constant_time_eq(&hash, &stored) {
            found = Some(i);
        }
    }
    let Some(token) = found.map(|i| &tokens[i]) else {
        return Err(Refusal::unauthorized("the admin token is not valid"));
    };
    if let Some(at) = token.revoked_at {
        return Err(Refusal::unauthorized(format!(
            "admin token {} was revoked at {}",
            token.name,
            rfc3339(at)
        )));
    }
    if let Some(at) = token.expires_at
        && at <= now
    {
        return Err(Refusal::unauthorized(format!(
            "admin token {} expired at {}",
            token.name,
            rfc3339(at)
        )));
    }
    let role = Role::parse(&token.role).ok_or_else(|| {
        Refusal::unauthorized(format!(
            "admin token {} has an unknown role {:?}",
            token.name, token.role
        ))
    })?;
    Ok(Caller {
        name: token.name.clone(),
        role,
    })
}

/// Allows `caller` what needs `needed`, or refuses (403) naming the role
/// it would need.
pub(crate) fn require(caller: &Caller, needed: Role, what: &str) -> Result<(), Refusal> {
    if caller.role >= needed {
        Ok(())
    } else {
        Err(Refusal::forbidden(format!(
            "{what} needs role {needed}; admin token {} has role {}",
            caller.name, caller.role
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Vec<AdminTokenRecord> {
        let mut revoked = record("old", Role::Admin, "s-old", 0, None);
        revoked.revoked_at = Some(50);
        vec![
            record(ROOT, Role::Admin, "s-root", 0, None),
            record(
                "viewer",
                Role::Read,
                "s-view",
                0,
                Some(Duration::from_secs(100)),
            ),
            revoked,
        ]
    }

    #[test]
    fn roles_are_ordered_and_refusals_name_the_role_needed() {
        assert!(Role::Admin > Role::Operate && Role::Operate > Role::Read);
        let viewer = Caller {
            name: "viewer".into(),
            role: Role::Read,
        };
        assert!(require(&viewer, Role::Read, "x").is_ok());
        let refused = require(&viewer, Role::Operate, "POST /v1/admin/config").unwrap_err();
        assert_eq!(refused.status(), 403);
        assert!(refused.message.contains("needs role operate"), "{refused}");
        assert!(
            refused.message.contains("viewer has role read"),
            "{refused}"
        );
    }

    #[test]
    fn authentication_finds_the_token_and_refuses_revoked_and_expired_ones() {
        let t = tokens();
        let caller = authenticate(&t, Some("Bearer s-root"), 10).unwrap();
        assert_eq!((caller.name.as_str(), caller.role), (ROOT, Role::Admin));
        let viewer = authenticate(&t, Some("Bearer s-view"), 10).unwrap();
        assert_eq!(viewer.role, Role::Read);
        for (auth, now, needle) in [
            (None, 10, "need Authorization"),
            (Some("s-root"), 10, "need Authorization"),
            (Some("Bearer nope"), 10, "not valid"),
            (Some("Bearer s-view"), 100, "viewer expired"),
            (Some("Bearer s-old"), 10, "old was revoked"),
        ] {
            let e = authenticate(&t, auth, now).unwrap_err();
            assert_eq!(e.status(), 401, "{auth:?}");
            assert!(e.message.contains(needle), "{auth:?}: {e}");
        }
    }

    #[test]
    fn creation_checks_name_role_ttl_and_room() {
        assert_eq!(
            check_create("ci-1", "operate", None).unwrap(),
            Role::Operate
        );
        for (name, role, ttl) in [
            ("", "read", None),
            ("a b", "read", None),
            ("ok", "root", None),
            ("ok", "read", Some(Duration::ZERO)),
        ] {
            assert_eq!(check_create(name, role, ttl).unwrap_err().status(), 400);
        }
        let t = tokens();
        assert_eq!(check_room(&t, "old").unwrap_err().status(), 409);
        assert!(check_room(&t, "new").is_ok());
        let mut v = t[1].clone();
        assert!(revoke(&mut v, 5).unwrap());
        assert!(!revoke(&mut v, 6).unwrap());
        assert_eq!(state(&v, 7), "revoked");
        assert_eq!(state(&t[1], 100), "expired");
        assert_eq!(state(&t[0], 100), "active");
    }
}
