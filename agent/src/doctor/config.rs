//! `config.drift`: `config.json` parses and matches the applied
//! configuration.

use std::fs;

use super::Finding;
use crate::state::CONFIG_JSON;

impl super::Doctor<'_> {
    pub(super) fn config(&self) -> Finding {
        let (Some(applied), Some(hash)) = (&self.saved.config, &self.saved.config_hash) else {
            return skip!("config.drift/none", "no configuration applied yet");
        };
        let Ok(bytes) = fs::read(self.state.path(CONFIG_JSON)) else {
            return fail!("config.drift/missing", "config.json is missing");
        };
        if bytes == applied.as_bytes() {
            return pass!(
                "config.drift/ok",
                "config.json matches the applied config {}",
                &hash[..hash.len().min(12)]
            );
        }
        let parses = std::str::from_utf8(&bytes)
            .ok()
            .and_then(stella_proto::config::parse)
            .is_some();
        if !parses {
            return fail!(
                "config.drift/unparsable",
                "config.json was changed and is not valid JSON"
            );
        }
        warn!(
            "config.drift/edited",
            "config.json was edited: it differs from the applied config {}",
            &hash[..hash.len().min(12)]
        )
    }
}
