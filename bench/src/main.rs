//! stella-loadgen: a simulated fleet for `cargo xtask bench`. It enrolls
//! agents with real CSRs and a real token, keeps their certificates in
//! memory, and drives the server over mTLS keep-alive connections; results go
//! to a `key=value` file that xtask turns into the table.
//!
//! ```text
//! stella-loadgen fleet --server URL --ca FILE --token T --out FILE
//!     [--enroll N] [--concurrency K] [--conns N,N] [--rounds R] [--warmup D]
//!     [--window D] [--fill TOTAL] [--fill-deadline D] [--threads T]
//! stella-loadgen storm --server URL --ca FILE --token T --out FILE --enroll N
//!     --ready FILE --go FILE [--interval D] [--timeout D] [--concurrency K]
//! stella-loadgen healthz --server URL --ca FILE --since-unix-ns NS [--timeout D]
//! stella-loadgen get --server URL --ca FILE --path P [--bearer-file F]
//! ```
#![forbid(unsafe_code)]

mod enroll;
mod http;
mod load;
mod storm;
mod tls;

use std::fmt::Display;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tls::Target;

/// The executor every task runs on (main thread plus `--threads - 1`).
static EX: smol::Executor<'static> = smol::Executor::new();

#[derive(Debug)]
struct Options {
    command: String,
    server: String,
    ca: PathBuf,
    token: String,
    out: Option<PathBuf>,
    enroll: usize,
    concurrency: usize,
    conns: Vec<usize>,
    rounds: usize,
    warmup: Duration,
    window: Duration,
    fill: usize,
    fill_deadline: Duration,
    threads: usize,
    since_unix_ns: u128,
    timeout: Duration,
    path: String,
    bearer_file: Option<PathBuf>,
    /// storm: written once the agents are enrolled; the storm starts when
    /// `go` appears (the server has been restarted meanwhile).
    ready: Option<PathBuf>,
    go: Option<PathBuf>,
    /// storm: the heartbeat interval the agents' retry schedule follows.
    interval: Duration,
}

fn parse() -> Result<Options, String> {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_env();
    let mut o = Options {
        command: String::new(),
        server: String::new(),
        ca: PathBuf::new(),
        token: String::new(),
        out: None,
        enroll: 1000,
        concurrency: 16,
        conns: vec![1000],
        rounds: 3,
        warmup: Duration::from_secs(2),
        window: Duration::from_secs(10),
        fill: 0,
        fill_deadline: Duration::from_secs(600),
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        since_unix_ns: 0,
        timeout: Duration::from_secs(300),
        path: String::new(),
        bearer_file: None,
        ready: None,
        go: None,
        interval: Duration::from_secs(30),
    };
    let err = |e: lexopt::Error| e.to_string();
    let text = |p: &mut lexopt::Parser| -> Result<String, String> {
        p.value()
            .map_err(err)?
            .into_string()
            .map_err(|_| "arguments must be UTF-8".to_owned())
    };
    let num = |s: String| -> Result<usize, String> {
        s.replace('_', "")
            .parse()
            .map_err(|_| format!("{s:?} is not a number"))
    };
    let dur = |s: String| stella_proto::parse_duration(&s).map_err(|e| e.to_string());
    while let Some(arg) = p.next().map_err(err)? {
        match arg {
            Value(v) if o.command.is_empty() => {
                o.command = v.into_string().map_err(|_| "bad command")?;
            }
            Long("server") => o.server = text(&mut p)?,
            Long("ca") => o.ca = text(&mut p)?.into(),
            Long("token") => o.token = text(&mut p)?,
            Long("out") => o.out = Some(text(&mut p)?.into()),
            Long("enroll") => o.enroll = num(text(&mut p)?)?,
            Long("concurrency") => o.concurrency = num(text(&mut p)?)?,
            Long("conns") => {
                o.conns = text(&mut p)?
                    .split(',')
                    .map(|s| num(s.to_owned()))
                    .collect::<Result<_, _>>()?;
            }
            Long("rounds") => o.rounds = num(text(&mut p)?)?.max(1),
            Long("warmup") => o.warmup = dur(text(&mut p)?)?,
            Long("window") => o.window = dur(text(&mut p)?)?,
            Long("fill") => o.fill = num(text(&mut p)?)?,
            Long("fill-deadline") => o.fill_deadline = dur(text(&mut p)?)?,
            Long("threads") => o.threads = num(text(&mut p)?)?.max(1),
            Long("since-unix-ns") => {
                o.since_unix_ns = text(&mut p)?
                    .parse()
                    .map_err(|_| "--since-unix-ns needs a number")?;
            }
            Long("timeout") => o.timeout = dur(text(&mut p)?)?,
            Long("path") => o.path = text(&mut p)?,
            Long("bearer-file") => o.bearer_file = Some(text(&mut p)?.into()),
            Long("ready") => o.ready = Some(text(&mut p)?.into()),
            Long("go") => o.go = Some(text(&mut p)?.into()),
            Long("interval") => o.interval = dur(text(&mut p)?)?,
            other => return Err(other.unexpected().to_string()),
        }
    }
    if o.server.is_empty() || o.ca.as_os_str().is_empty() {
        return Err("--server URL and --ca FILE are required".into());
    }
    Ok(o)
}

/// `key=value` lines, appended as they are known (a crash keeps what ran).
struct Results {
    file: Option<std::fs::File>,
}

impl Results {
    fn put(&mut self, key: &str, value: impl Display) {
        eprintln!("stella-loadgen: {key}={value}");
        if let Some(f) = &mut self.file {
            let _ = writeln!(f, "{key}={value}");
        }
    }
}

/// The `q` quantile (0..=1) of sorted values, nearest rank.
fn quantile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// What the rounds of one kind of request measured.
struct KindStats {
    kind: load::Kind,
    /// Responses per second, one per round.
    rps: Vec<f64>,
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

async fn fleet(o: &Options, out: &mut Results) -> Result<(), String> {
    let target = Arc::new(Target::new(&o.server, &o.ca)?);
    if o.token.is_empty() {
        return Err("fleet needs --token".into());
    }
    out.put("loadgen.threads", o.threads);

    // Enrollment: CSRs made before the clock starts; the rate is the server's.
    let t0 = Instant::now();
    let pending = enroll::prepare(&o.token, 0, o.enroll, o.threads)?;
    eprintln!(
        "stella-loadgen: made {} key pairs and CSRs in {:.1}s",
        pending.len(),
        t0.elapsed().as_secs_f64()
    );
    let mut e = enroll::run(&target, pending, o.concurrency, true).await?;
    e.latencies_us.sort_unstable();
    let secs = e.elapsed.as_secs_f64();
    out.put("enroll.count", e.ok);
    out.put("enroll.errors", e.errors);
    out.put("enroll.concurrency", o.concurrency);
    out.put("enroll.secs", format!("{secs:.2}"));
    out.put("enroll.rate", format!("{:.1}", e.ok as f64 / secs));
    out.put(
        "enroll.p50_ms",
        format!("{:.1}", f64::from(quantile(&e.latencies_us, 0.5)) / 1000.0),
    );
    out.put(
        "enroll.p99_ms",
        format!("{:.1}", f64::from(quantile(&e.latencies_us, 0.99)) / 1000.0),
    );
    if let Some(first) = &e.first_error {
        out.put("enroll.first_error", first.replace('\n', " "));
    }
    let agents = e.enrolled;
    if agents.is_empty() {
        return Err("no agent could be enrolled".into());
    }

    // Load: per N, heartbeat and healthz rounds alternate on the same connections.
    for &n in &o.conns {
        let n_agents = n.min(agents.len());
        let opened = load::open(&target, &agents[..n_agents], 64).await?;
        let key = format!("load.{n}");
        out.put(&format!("{key}.asked"), n);
        out.put(&format!("{key}.opened"), opened.sims.len());
        out.put(&format!("{key}.open_errors"), opened.errors);
        out.put(
            &format!("{key}.open_secs"),
            format!("{:.2}", opened.elapsed.as_secs_f64()),
        );
        if let Some(first) = &opened.first_error {
            out.put(&format!("{key}.open_first_error"), first.replace('\n', " "));
        }
        let mut sims = opened.sims;
        let mut stats: Vec<KindStats> = [load::Kind::Heartbeat, load::Kind::Healthz]
            .into_iter()
            .map(|kind| KindStats {
                kind,
                rps: Vec::new(),
                latencies_us: Vec::new(),
                errors: 0,
                first_error: None,
            })
            .collect();
        for r in 0..o.rounds {
            for s in &mut stats {
                let (kept, round) = load::round(sims, s.kind, o.warmup, o.window).await;
                sims = kept;
                let rps = round.ok as f64 / round.window.as_secs_f64();
                eprintln!(
                    "stella-loadgen: N={n} round {} {}: {rps:.0}/s, {} errors, {} connections left",
                    r + 1,
                    s.kind.name(),
                    round.errors,
                    sims.len()
                );
                s.rps.push(rps);
                s.latencies_us.extend(round.latencies_us);
                s.errors += round.errors;
                if s.first_error.is_none() {
                    s.first_error = round.first_error;
                }
            }
        }
        let mut medians = Vec::new();
        for KindStats {
            kind,
            mut rps,
            latencies_us: mut lat,
            errors,
            first_error: first,
        } in stats
        {
            lat.sort_unstable();
            let k = format!("{key}.{}", kind.name());
            let all: Vec<String> = rps.iter().map(|r| format!("{r:.0}")).collect();
            out.put(&format!("{k}.rps_rounds"), all.join(","));
            let m = median(&mut rps);
            medians.push(m);
            out.put(&format!("{k}.rps"), format!("{m:.0}"));
            out.put(&format!("{k}.requests"), lat.len());
            out.put(&format!("{k}.p50_us"), quantile(&lat, 0.5));
            out.put(&format!("{k}.p99_us"), quantile(&lat, 0.99));
            out.put(&format!("{k}.errors"), errors);
            if let Some(first) = first {
                out.put(&format!("{k}.first_error"), first.replace('\n', " "));
            }
        }
        if medians[1] > 0.0 {
            out.put(
                &format!("{key}.ratio"),
                format!("{:.3}", medians[0] / medians[1]),
            );
        }
        out.put(&format!("{key}.connections_left"), sims.len());
        drop(sims);
        // Let the server notice the closed connections before the next N.
        smol::Timer::after(Duration::from_millis(500)).await;
    }

    // Fill the store to --fill agents, in timed chunks with CSRs made between.
    if o.fill > agents.len() {
        let started = Instant::now();
        let mut total = e.ok as usize;
        let mut busy = Duration::ZERO;
        let mut enrolled_here = 0u64;
        let mut chunk_rates = Vec::new();
        let mut errors = 0u64;
        let mut deadline_hit = false;
        while total < o.fill {
            if started.elapsed() >= o.fill_deadline {
                deadline_hit = true;
                break;
            }
            let chunk = (o.fill - total).min(5000);
            let pending = enroll::prepare(&o.token, total, chunk, o.threads)?;
            let f = enroll::run(&target, pending, o.concurrency, false).await?;
            total += f.ok as usize;
            enrolled_here += f.ok;
            errors += f.errors;
            busy += f.elapsed;
            chunk_rates.push(format!("{:.0}", f.ok as f64 / f.elapsed.as_secs_f64()));
            eprintln!(
                "stella-loadgen: store has {total} agents ({:.0}/s in this chunk)",
                f.ok as f64 / f.elapsed.as_secs_f64()
            );
            if f.ok == 0 {
                return Err(format!(
                    "enrollment stopped working: {}",
                    f.first_error.unwrap_or_default()
                ));
            }
        }
        out.put("fill.target", o.fill);
        out.put("fill.total", total);
        out.put("fill.errors", errors);
        out.put("fill.secs", format!("{:.1}", busy.as_secs_f64()));
        out.put(
            "fill.wall_secs",
            format!("{:.1}", started.elapsed().as_secs_f64()),
        );
        out.put(
            "fill.rate",
            format!("{:.1}", enrolled_here as f64 / busy.as_secs_f64()),
        );
        out.put("fill.chunk_rates", chunk_rates.join(","));
        out.put("fill.deadline_hit", deadline_hit);
    }
    Ok(())
}

/// Enrolls `--enroll` agents, says so in `--ready`, waits for `--go`, then
/// has them all reconnect at once (see `storm`).
async fn storm(o: &Options, out: &mut Results) -> Result<(), String> {
    let (Some(ready), Some(go)) = (&o.ready, &o.go) else {
        return Err("storm needs --ready FILE and --go FILE".into());
    };
    if o.token.is_empty() {
        return Err("storm needs --token".into());
    }
    let target = Arc::new(Target::new(&o.server, &o.ca)?);
    let pending = enroll::prepare(&o.token, 0, o.enroll, o.threads)?;
    let e = enroll::run(&target, pending, o.concurrency, true).await?;
    out.put("storm.enrolled", e.ok);
    if e.ok as usize != o.enroll {
        return Err(format!(
            "only {} of {} agents enrolled: {}",
            e.ok,
            o.enroll,
            e.first_error.unwrap_or_default()
        ));
    }
    std::fs::write(ready, b"enrolled\n")
        .map_err(|e| format!("cannot write {}: {e}", ready.display()))?;
    let waited = Instant::now();
    while !go.exists() {
        if waited.elapsed() > Duration::from_secs(600) {
            return Err(format!("{} never appeared", go.display()));
        }
        smol::Timer::after(Duration::from_millis(10)).await;
    }
    let seed = unix_ns() as u64;
    let s = storm::run(&target, &e.enrolled, o.interval, o.timeout, seed).await?;
    let secs = s.all_acked.as_secs_f64();
    let at = |q: f64| {
        let i = ((q * s.ack_secs.len() as f64).ceil() as usize).clamp(1, s.ack_secs.len().max(1));
        s.ack_secs.get(i - 1).copied().unwrap_or(f64::NAN)
    };
    out.put("storm.interval", stella_proto::format_duration(o.interval));
    out.put("storm.agents", s.agents);
    out.put("storm.acked", s.acked);
    out.put("storm.all_acked_secs", format!("{secs:.2}"));
    out.put("storm.p50_secs", format!("{:.2}", at(0.5)));
    out.put("storm.p90_secs", format!("{:.2}", at(0.9)));
    out.put("storm.p99_secs", format!("{:.2}", at(0.99)));
    out.put("storm.attempts", s.attempts);
    out.put("storm.handshakes", s.handshakes);
    out.put(
        "storm.handshakes_per_s",
        format!("{:.0}", s.handshakes as f64 / secs.max(0.001)),
    );
    out.put("storm.peak_handshakes_per_s", s.peak_handshakes_per_s);
    out.put("storm.closed", s.closed);
    out.put("storm.timed_out", s.timed_out);
    out.put("storm.other_errors", s.other_errors);
    out.put("storm.max_retries", s.max_failures);
    if let Some(first) = &s.first_error {
        out.put("storm.first_error", first.replace('\n', " "));
    }
    // The server's side of it, on a connection of our own.
    if let Ok(tls) = target.connect(target.config(None)?).await {
        let mut conn = http::Conn::new(tls);
        let mut req = Vec::new();
        http::request(&mut req, "GET", "/metrics", None, None);
        if let Ok((200, body)) = conn.exchange(&req).await {
            let text = String::from_utf8_lossy(body);
            for (name, key) in [
                ("stella_handshakes_shed_total", "storm.server_shed"),
                ("stella_tls_handshakes_total", "storm.server_handshakes"),
                (
                    "stella_tls_handshake_failures_total",
                    "storm.server_handshake_failures",
                ),
                (
                    "stella_connections_refused_total",
                    "storm.server_connections_refused",
                ),
            ] {
                if let Some(v) = text
                    .lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                {
                    out.put(key, v.trim());
                }
            }
        }
    }
    if s.acked != s.agents {
        return Err(format!(
            "{} of {} agents acknowledged within {:?}",
            s.acked, s.agents, o.timeout
        ));
    }
    Ok(())
}

/// Polls `/healthz` with fresh connections until it answers 200.
async fn healthz(o: &Options, out: &mut Results) -> Result<(), String> {
    let target = Target::new(&o.server, &o.ca)?;
    let config = target.config(None)?;
    let mut req = Vec::new();
    http::request(&mut req, "GET", "/healthz", None, None);
    let end = Instant::now() + o.timeout;
    let mut tries = 0u64;
    loop {
        tries += 1;
        if let Ok(tls) = target.connect(config.clone()).await {
            let mut conn = http::Conn::new(tls);
            if let Ok((200, _)) = conn.exchange(&req).await {
                let ns = unix_ns().saturating_sub(o.since_unix_ns);
                out.put("healthz.after_ms", format!("{:.1}", ns as f64 / 1e6));
                out.put("healthz.tries", tries);
                return Ok(());
            }
        }
        if Instant::now() >= end {
            return Err(format!(
                "/healthz did not answer 200 within {:?}",
                o.timeout
            ));
        }
        smol::Timer::after(Duration::from_millis(5)).await;
    }
}

/// One GET (e.g. the admin agent list), reading the whole body.
async fn get(o: &Options, out: &mut Results) -> Result<(), String> {
    let target = Target::new(&o.server, &o.ca)?;
    let bearer = match &o.bearer_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| format!("cannot read {}: {e}", f.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let tls = target
        .connect(target.config(None)?)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut conn = http::Conn::new(tls);
    let t0 = Instant::now();
    // The agent list comes in pages of 1,000 (`?limit=&after=`): follow them
    // as the CLI does.
    const PAGE: usize = 1000;
    let paged = o.path.ends_with("/v1/admin/agents");
    let (mut bytes, mut after) = (0usize, String::new());
    let status = loop {
        let path = if paged {
            format!("{}?limit={PAGE}&after={after}", o.path)
        } else {
            o.path.clone()
        };
        let mut req = Vec::new();
        http::request(&mut req, "GET", &path, bearer.as_deref(), None);
        let (s, body) = conn
            .exchange(&req)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        bytes += body.len();
        if !paged || s != 200 {
            break s;
        }
        let text =
            std::str::from_utf8(body).map_err(|_| "the agent list is not UTF-8".to_owned())?;
        let page: Vec<stella_proto::api::AgentView> =
            miniserde::json::from_str(text).map_err(|_| "the agent list is not JSON".to_owned())?;
        match page.last() {
            Some(last) if page.len() == PAGE => after.clone_from(&last.id),
            _ => break s,
        }
    };
    out.put("get.status", status);
    out.put("get.bytes", bytes);
    out.put(
        "get.ms",
        format!("{:.1}", t0.elapsed().as_secs_f64() * 1000.0),
    );
    if status != 200 {
        return Err(format!("GET {} answered {status}", o.path));
    }
    Ok(())
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("stella-loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let file = match &o.out {
        Some(path) => match std::fs::File::options()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("stella-loadgen: cannot open {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let mut out = Results { file };
    for i in 1..o.threads {
        let spawned = std::thread::Builder::new()
            .name(format!("loadgen-{i}"))
            .spawn(|| smol::block_on(EX.run(smol::future::pending::<()>())));
        if let Err(e) = spawned {
            eprintln!("stella-loadgen: cannot start a thread: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = smol::block_on(EX.run(async {
        match o.command.as_str() {
            "fleet" => fleet(&o, &mut out).await,
            "healthz" => healthz(&o, &mut out).await,
            "get" => get(&o, &mut out).await,
            "storm" => storm(&o, &mut out).await,
            other => Err(format!(
                "unknown command {other:?} (fleet, storm, healthz, get)"
            )),
        }
    }));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stella-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
