//! `server.reachable`: DNS, TCP, TLS with mTLS and an authenticated request,
//! with latency. The probe also reads the server's clock for `time.skew`.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use miniserde::json;
use stella_proto::api::SelfView;
use stella_proto::states::InactiveReason;

use super::{Finding, Probe, now_ms};
use crate::{identity, tls, transport};

impl super::Doctor<'_> {
    pub(super) fn reachable(&self) -> Finding {
        let (f, probe) = self.probe_server();
        *self.probe.borrow_mut() = Some(probe);
        f
    }

    /// DNS, TCP, then TLS with the client certificate and an authenticated
    /// request that changes nothing on the server.
    pub(super) fn probe_server(&self) -> (Finding, Probe) {
        let failed = |f: Finding| {
            let probe = Probe {
                finding_status: f.status,
                skew_ms: None,
            };
            (f, probe)
        };
        let agent = match self.state.agent_file() {
            Ok(a) => a,
            Err(_) => {
                return failed(fail!(
                    "server.reachable/unknown",
                    "agent.json is unreadable"
                ));
            }
        };
        let Ok((host, port)) = tls::host_port(&agent.server) else {
            return failed(fail!(
                "server.reachable/url",
                "server URL {} is invalid",
                agent.server
            ));
        };
        let t0 = Instant::now();
        let addr = match (host.as_str(), port)
            .to_socket_addrs()
            .map(|mut a| a.next())
        {
            Ok(Some(a)) => a,
            _ => return failed(fail!("server.reachable/dns", "cannot resolve {host}")),
        };
        let dns = t0.elapsed();
        let t1 = Instant::now();
        if let Err(e) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            return failed(fail!(
                "server.reachable/tcp",
                "cannot connect to {addr}: {e}"
            ));
        }
        let tcp = t1.elapsed();
        let ident = match identity::Identity::load(self.state) {
            Ok(i) => i,
            Err(e) => {
                return failed(fail!(
                    "server.reachable/identity",
                    "cannot load the identity: {e}"
                ));
            }
        };
        let mut client = match transport::http_client(
            &ident.ca_der,
            Some((&ident.cert_der, &ident.key_pem)),
            Duration::from_secs(5),
        ) {
            Ok(c) => c,
            Err(e) => return failed(fail!("server.reachable/tls", "TLS setup failed: {e}")),
        };
        let sent_ms = now_ms();
        let t2 = Instant::now();
        let answer = transport::get(&mut client, &format!("{}/v1/agents/self", agent.server));
        let latency = t2.elapsed();
        let received_ms = now_ms();
        let (status, text) = match answer {
            Ok(a) => a,
            Err(e) => {
                return failed(fail!(
                    "server.reachable/tls",
                    "TLS or HTTP to {} failed: {e}",
                    agent.server
                ));
            }
        };
        match status {
            200 => {}
            401 | 403 => {
                return failed(fail!(
                    "server.reachable/refused",
                    "the server refuses this agent: {}",
                    transport::error_message(&text)
                ));
            }
            other => {
                return failed(fail!(
                    "server.reachable/http",
                    "the server answered {other}"
                ));
            }
        }
        let view: Option<SelfView> = json::from_str(&text).ok();
        let skew_ms = view
            .as_ref()
            .map(|v| (sent_ms + received_ms) / 2 - v.server_time_ms as i64);
        let f = if view
            .as_ref()
            .is_some_and(|v| v.reason == Some(InactiveReason::Deactivated))
        {
            warn!(
                "server.reachable/deactivated",
                "reachable, but this agent is deactivated by an administrator"
            )
        } else if latency > Duration::from_secs(1) {
            warn!(
                "server.reachable/slow",
                "{} answered in {} ms",
                agent.server,
                latency.as_millis()
            )
        } else {
            pass!(
                "server.reachable/ok",
                "{} answered in {:.1} ms (DNS {:.1} ms, TCP {:.1} ms)",
                agent.server,
                latency.as_secs_f64() * 1e3,
                dns.as_secs_f64() * 1e3,
                tcp.as_secs_f64() * 1e3
            )
        };
        let probe = Probe {
            finding_status: f.status,
            skew_ms,
        };
        (f, probe)
    }
}
