//! `/metrics`: agents by status and the server's counters, as Prometheus
//! text.

use std::fmt::Write as _;

use crate::app::{App, Metrics, lock};
use crate::http::Response;

pub(super) fn metrics(app: &App) -> Response {
    let counts = lock(&app.fleet).count_by_status();
    let m = &app.metrics;
    let store = app.store.health();
    let load = Metrics::load;
    let mut out = String::with_capacity(1024);
    out.push_str("# HELP stella_agents Agents by lifecycle status.\n# TYPE stella_agents gauge\n");
    for (status, n) in counts {
        let _ = writeln!(out, "stella_agents{{status=\"{status}\"}} {n}");
    }
    for (name, help, value) in [
        (
            "stella_enrollments_total",
            "Agents enrolled.",
            load(&m.enrollments),
        ),
        (
            "stella_heartbeats_total",
            "Heartbeats accepted.",
            load(&m.heartbeats),
        ),
        (
            "stella_token_failures_total",
            "Enrollments refused for their token.",
            load(&m.token_failures),
        ),
        (
            "stella_http_requests_total",
            "HTTP requests answered.",
            load(&m.requests),
        ),
        (
            "stella_tls_handshake_failures_total",
            "TLS handshakes that failed.",
            load(&m.tls_failures),
        ),
        (
            "stella_rate_limited_total",
            "Registrations and admin calls refused with 429 after repeated failures from one address.",
            load(&m.rate_limited),
        ),
        (
            "stella_connections_refused_total",
            "Connections closed at once: the open-file limit was reached.",
            load(&m.connections_refused),
        ),
        (
            "stella_tls_handshakes_total",
            "TLS handshakes completed.",
            load(&m.handshakes),
        ),
        (
            "stella_handshakes_shed_total",
            "Connections closed before their TLS handshake because --max-handshakes were in progress (the client retries later).",
            load(&m.handshakes_shed),
        ),
        (
            "stella_certificate_renewals_total",
            "Certificates renewed over mTLS.",
            load(&m.renewals),
        ),
        (
            "stella_certificate_recoveries_total",
            "Expired certificates recovered with the old key.",
            load(&m.recoveries),
        ),
        (
            "stella_cluster_changes_applied_total",
            "Changes other servers made, applied from the store's change feed.",
            load(&m.changes_applied),
        ),
        (
            "stella_store_errors_total",
            "Store operations that failed (I/O errors such as a full disk, among others).",
            store.errors,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP stella_tls_handshakes_in_progress TLS handshakes in progress (at most --max-handshakes).\n# TYPE stella_tls_handshakes_in_progress gauge\nstella_tls_handshakes_in_progress {}",
        load(&m.handshakes_in_progress)
    );
    let _ = writeln!(
        out,
        "# HELP stella_start_time_seconds When the server started.\n# TYPE stella_start_time_seconds gauge\nstella_start_time_seconds {}",
        app.started_ms / 1000
    );
    let _ = writeln!(
        out,
        "# HELP stella_store_writable Whether the last store write succeeded (0 while the store cannot write).\n# TYPE stella_store_writable gauge\nstella_store_writable {}",
        u8::from(store.unwritable.is_none())
    );
    let _ = writeln!(
        out,
        "# HELP stella_leader Whether this server does the singleton work now (timeout monitor, rollout controller): always 1 on a store it alone writes.\n# TYPE stella_leader gauge\nstella_leader {}",
        u8::from(app.leads().is_some())
    );
    Response::new(200, "text/plain; version=0.0.4", out.into_bytes())
}
