//! Tokens and enrollment at run time: minting a token, the brake on failed
//! registrations per source, and enrolling an agent (the CSR signed, then the
//! `tokens` rules decided inside the store's transaction, then the new agent
//! added to the fleet).

use std::net::IpAddr;
use std::time::Duration;

use stella_proto::RegistrationToken;
use stella_proto::api::{Labels, RegisterRequest, RegisterResponse, TokenCreateResponse};
use stella_proto::time::rfc3339;

use super::{App, Metrics, lock, now_ms, now_secs};
use crate::error::Error;
use crate::lifecycle::LiveAgent;
use crate::log;
use crate::records::{CertRecord, HeartbeatState};
use crate::refusal::{Refusal, Why};
use crate::store::ChangeKind;
use crate::tokens::{self, Decision};

impl App {
    /// Mints a token. Returns the only copy of its secret. Blocking.
    pub(crate) fn create_token(
        &self,
        ttl: Duration,
        uses: u32,
        labels: Labels,
    ) -> Result<TokenCreateResponse, Error> {
        tokens::check_create(ttl, uses, &labels)?;
        let mut random = [0u8; 38];
        crate::fsutil::random_bytes(&mut random)?;
        let token = RegistrationToken::from_random(&random);
        let record = tokens::record(&token, now_secs(), ttl, uses, labels);
        self.store.insert_token(&record)?;
        log::info(
            "token created",
            &[
                ("token", &record.id),
                ("uses", &uses),
                ("expires_at", &rfc3339(record.expires_at)),
            ],
        );
        Ok(TokenCreateResponse {
            token: token.expose(),
            id: record.id,
            expires_at: rfc3339(record.expires_at),
            uses,
        })
    }

    /// Refuses (429) a source with too many failed registrations lately.
    pub(crate) fn check_registration_rate(&self, source: IpAddr) -> Result<(), Refusal> {
        let Some(wait) = lock(&self.registration_failures).blocked_for(source, now_ms()) else {
            return Ok(());
        };
        Metrics::bump(&self.metrics.rate_limited);
        let mut refusal = Refusal::new(
            Why::TooManyRequests,
            format!("too many failed registrations from {source}; retry in {wait}s"),
        );
        refusal.retry_after = Some(wait);
        Err(refusal)
    }

    /// Enrolls an agent from `source`. Blocking: signs and commits.
    pub(crate) fn enroll(
        &self,
        req: RegisterRequest,
        source: IpAddr,
    ) -> Result<RegisterResponse, Error> {
        let result = self.enroll_checked(req);
        if let Err(Error::Refused(r)) = &result
            && r.why == Why::Unauthorized
        {
            lock(&self.registration_failures).record(source, now_ms());
            // Every server's brake counts it (best effort: the local one
            // holds anyway).
            self.share_failure_now(ChangeKind::RegistrationFailure, source);
        }
        result
    }

    fn enroll_checked(&self, req: RegisterRequest) -> Result<RegisterResponse, Error> {
        let reg = tokens::check_registration(req)?;
        let csr = crate::ca::check_csr(&reg.request.csr)?;
        let now = now_secs();
        let mut random = [0u8; 16];
        crate::fsutil::random_bytes(&mut random)?;
        let agent_id = stella_proto::id::agent_id_from_bytes(random);
        let issued = self
            .ca
            .issue_agent_cert(&csr, &agent_id, now, self.settings.cert_lifetime)?;
        let cert = CertRecord {
            agent_id: agent_id.clone(),
            serial: issued.serial,
            pem: issued.pem,
            issued_at: now,
            not_after: issued.not_after,
        };
        let token = reg.token.clone();
        let key_sha256 = csr.key_sha256.clone();
        let agent = tokens::new_agent(reg, agent_id, csr.key_sha256, &cert, now);

        let _serial = lock(&self.lifecycle_lock);
        let mut configs = lock(&self.configs);
        let mut decision = None;
        let stored = self
            .store
            .enroll(token.id(), &key_sha256, &mut |state| {
                // A backend may run the rule again when it retries a transaction.
                let d = tokens::decide(state, &token, now, agent.clone(), cert.clone())?;
                let write = match &d {
                    Decision::Enroll(new) => Some((**new).clone()),
                    Decision::Existing(_) => None,
                };
                decision = Some(d);
                Ok(write)
            })
            .map_err(Error::from);
        if let Err(Error::Refused(refusal)) = &stored {
            Metrics::bump(&self.metrics.token_failures);
            log::warn("enrollment refused", &[("error", &refusal.message)]);
        }
        stored?;
        let (agent, cert) = match decision {
            Some(Decision::Enroll(new)) => {
                Metrics::bump(&self.metrics.enrollments);
                let desired = configs.desired(&new.agent);
                lock(&self.fleet).agents.insert(
                    new.agent.id.clone(),
                    Box::new(LiveAgent {
                        record: new.agent.clone(),
                        hb: <HeartbeatState as Default>::default(),
                        last_seen_ms: now_ms(),
                        desired,
                    }),
                );
                log::info(
                    "agent enrolled",
                    &[
                        ("agent", &new.agent.id),
                        ("name", &new.agent.name),
                        ("token", &token.id()),
                    ],
                );
                (new.agent, new.cert)
            }
            Some(Decision::Existing(prior)) => {
                log::info(
                    "enrollment retried: answering with the earlier registration",
                    &[("agent", &prior.agent.id), ("token", &token.id())],
                );
                (prior.agent, prior.cert)
            }
            None => {
                return Err(Refusal::conflict("the store did not run the enrollment rule").into());
            }
        };
        let desired = configs.desired(&agent);
        drop(configs);
        Ok(RegisterResponse {
            config: desired.doc.clone(),
            config_hash: desired.hash.clone(),
            agent_id: agent.id,
            certificate: cert.pem,
            ca: self.ca.cert_pem.clone(),
            cert_not_after: rfc3339(cert.not_after),
            heartbeat_interval_ms: self.settings.heartbeat_interval.as_millis() as u64,
            labels: agent.labels,
        })
    }
}
