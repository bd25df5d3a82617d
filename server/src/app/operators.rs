//! The operator's surface at run time: scoped admin tokens (minting,
//! listing, revoking, and turning the single admin token of an older store
//! into `root`), reading the audit log and appending the lines of refused
//! acts, and taking a backup while serving.

use std::time::Duration;

use stella_proto::admin::{AdminTokenCreateResponse, AdminTokenView, AuditPage};
use stella_proto::time::rfc3339;

use super::{App, lock, now_secs};
use crate::audit::{self, Actor, Outcome, Query};
use crate::backup;
use crate::error::Error;
use crate::log;
use crate::records::AdminTokenRecord;
use crate::refusal::Refusal;
use crate::roles::{self, Role};
use crate::store::Store;

/// The admin tokens of `store`. A store made before scoped tokens has only
/// the hash of its one admin token: that token becomes `root`, role
/// `admin`, so an existing data dir keeps working.
pub(super) fn load_admin_tokens(store: &dyn Store) -> Result<Vec<AdminTokenRecord>, Error> {
    let tokens = store.admin_tokens()?;
    if !tokens.is_empty() {
        return Ok(tokens);
    }
    let root = roles::from_hash(
        roles::ROOT,
        Role::Admin,
        store.admin_token_sha256()?,
        now_secs(),
        None,
    );
    store.insert_admin_token(&root)?;
    log::info(
        "admin token root made from the store's admin token",
        &[("role", &root.role)],
    );
    Ok(vec![root])
}

impl App {
    /// Mints an admin token. Returns the only copy of its secret. Blocking.
    pub(crate) fn create_admin_token(
        &self,
        name: &str,
        role: &str,
        ttl: Option<Duration>,
    ) -> Result<AdminTokenCreateResponse, Error> {
        let role = roles::check_create(name, role, ttl)?;
        let mut random = [0u8; 32];
        crate::fsutil::random_bytes(&mut random)?;
        let secret = stella_proto::hash::hex(&random);
        let record = roles::record(name, role, &secret, now_secs(), ttl);
        // Held across the write so that two creations of one name, or more
        // than the limit, cannot both pass the check.
        let mut tokens = lock(&self.admin_tokens);
        roles::check_room(&tokens, name)?;
        self.store.insert_admin_token(&record)?;
        tokens.push(record.clone());
        drop(tokens);
        log::info("admin token created", &[("name", &name), ("role", &role)]);
        Ok(AdminTokenCreateResponse {
            token: secret,
            name: record.name,
            role: record.role,
            expires_at: record.expires_at.map(rfc3339),
        })
    }

    /// Every admin token, without secrets.
    pub(crate) fn admin_token_views(&self) -> Vec<AdminTokenView> {
        let now = now_secs();
        let mut views: Vec<AdminTokenView> = lock(&self.admin_tokens)
            .iter()
            .map(|t| roles::view(t, now))
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }

    /// Revokes an admin token: its next request gets 401. Blocking.
    pub(crate) fn revoke_admin_token(&self, name: &str) -> Result<AdminTokenView, Error> {
        roles::check_name(name)?;
        let now = now_secs();
        let mut tokens = lock(&self.admin_tokens);
        let record = self
            .store
            .update_admin_token(name, now, "admin_token.revoke", &mut |t| {
                roles::revoke(t, now)
            })?;
        if let Some(cached) = tokens.iter_mut().find(|t| t.name == name) {
            *cached = record.clone();
        }
        drop(tokens);
        log::info("admin token revoked", &[("name", &name)]);
        Ok(roles::view(&record, now))
    }

    /// A page of the audit log: up to `limit` lines after `after` that
    /// `query` selects, and where the next page starts.
    pub(crate) fn audit_page(
        &self,
        query: &Query,
        after: Option<u64>,
        limit: usize,
    ) -> Result<AuditPage, Error> {
        let mut lines = self
            .store
            .audit_page(after, limit.saturating_add(1), &|r| query.matches(r))?;
        let more = lines.len() > limit;
        lines.truncate(limit);
        Ok(AuditPage {
            next: if more {
                lines.last().map(|(seq, _)| *seq)
            } else {
                None
            },
            entries: lines.iter().map(|(seq, r)| audit::entry(*seq, r)).collect(),
        })
    }

    /// Appends the line of an act that changed nothing (refused or failed)
    /// answered with HTTP `status`. Blocking. A failure to write is logged:
    /// the answer to the caller stands.
    pub(crate) fn audit_unchanged(
        &self,
        actor: &Actor,
        status: u16,
        action: &str,
        subject: &str,
        detail: &str,
    ) {
        let outcome = Outcome::of_unchanged(status);
        let line = audit::unchanged(now_secs(), actor, outcome, action, subject, detail);
        if let Err(e) = self.store.append_audit(&line) {
            log::warn(
                "cannot write an audit line",
                &[("action", &action), ("error", &e)],
            );
        }
    }

    /// A backup of the store (one read transaction) and of the data dir
    /// files a server needs, the CA key only with `include_ca_key`. Blocking.
    pub(crate) fn backup(&self, include_ca_key: bool) -> Result<Vec<u8>, Error> {
        if include_ca_key && !self.ca.can_issue() {
            return Err(Refusal::conflict(
                "this server has no CA key to put into the backup (it was restored without one)",
            )
            .into());
        }
        let mut out = backup::Writer::new();
        self.store.snapshot(&mut |table, key, value| {
            out.row(table, key, value);
            Ok(())
        })?;
        for name in backup::FILES {
            if *name == crate::ca::CA_KEY && !include_ca_key {
                continue;
            }
            let path = self.data_dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => out.file(name, &bytes),
                // A data dir whose admin.token was removed (the operator
                // keeps it elsewhere) is backed up without it.
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        && *name == crate::roles::ADMIN_TOKEN_FILE => {}
                Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
            }
        }
        // Blobs are written before their release record and never changed,
        // so every release in the snapshot finds its files here.
        let blobs = self.data_dir.join("blobs").join("sha256");
        if let Ok(dir) = std::fs::read_dir(&blobs) {
            let mut names: Vec<String> = dir
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .map(|n| format!("blobs/sha256/{n}"))
                .filter(|n| backup::allowed_file(n))
                .collect();
            names.sort();
            for name in names {
                let path = self.data_dir.join(&name);
                let bytes = std::fs::read(&path)
                    .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
                out.file(&name, &bytes);
            }
        }
        let (rows, files) = (out.rows, out.files);
        let bytes = out.finish();
        let detail = format!(
            "rows={rows} files={files} bytes={} ca_key={include_ca_key}",
            bytes.len()
        );
        self.store
            .append_audit(&audit::line(now_secs(), "server.backup", "", &detail))?;
        log::info(
            "backup taken",
            &[
                ("rows", &rows),
                ("files", &files),
                ("ca_key", &include_ca_key),
            ],
        );
        Ok(bytes)
    }
}
