//! `identity.key`: the key file is present, mode 0600, and matches the
//! certificate.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use super::Finding;
use crate::identity;
use crate::state::{AGENT_KEY, NEXT_CERT};

impl super::Doctor<'_> {
    pub(super) fn key(&self) -> Finding {
        let path = self.state.path(AGENT_KEY);
        let Ok(meta) = fs::metadata(&path) else {
            return fail!("identity.key/missing", "agent.key is missing");
        };
        let key = self
            .state
            .read_text(AGENT_KEY)
            .ok()
            .and_then(|pem| stella_proto::pem::decode("PRIVATE KEY", &pem).ok())
            .and_then(|der| identity::load_key(&der).ok());
        let Some(key) = key else {
            return fail!(
                "identity.key/unparsable",
                "agent.key is not a P-256 PKCS#8 key"
            );
        };
        let matches = self
            .cert_info()
            .is_some_and(|c| c.spki == identity::key_spki(&key));
        if !matches {
            if self.state.path(NEXT_CERT).exists() {
                return fail!(
                    "identity.key/interrupted",
                    "a certificate renewal was interrupted: agent.key and agent.pem differ"
                );
            }
            return fail!(
                "identity.key/mismatch",
                "agent.key does not match agent.pem"
            );
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode != 0o600 {
            return fail!(
                "identity.key/mode",
                "agent.key has mode {mode:04o}; it must be 0600"
            );
        }
        pass!(
            "identity.key/ok",
            "agent.key matches the certificate, mode 0600"
        )
    }
}
