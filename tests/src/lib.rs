//! Harness for the end-to-end tests: temp dirs, a real `stella-server` on a
//! free loopback port with its redb file, real `stella-agent` processes, an
//! HTTPS client that trusts the test CA, and polling with deadlines. Every
//! child process is killed by PID when its handle drops.
#![forbid(unsafe_code)]

pub mod haproxy;
pub mod postgres;
pub mod raw;
pub mod release;
pub mod webdriver;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use stella_proto::api::AgentView;

/// How long tests wait for a state before failing (2-core shared machine).
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Whether a missing prerequisite must fail the tests instead of skipping
/// them: `CI` is set (and not `false` or `0`), as `.ci/run` sets it. CI
/// installs every prerequisite, so there a skip would be a test that tests
/// nothing and passes.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The one way a test gives up on a missing prerequisite (a tool, free disk,
/// the release binaries): under [`ci`] it fails with `reason`; elsewhere it
/// says SKIPPED on stderr, past the harness's capture (which would hide it for
/// a passing test), and the caller returns or carries on with less.
#[track_caller]
pub fn skip_or_fail(test: &str, reason: &str) {
    if ci() {
        panic!(
            "{test}: {reason} (CI is set: a missing prerequisite fails the test instead of skipping it)"
        );
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {reason}");
}

/// Whether `program` is an executable file on `PATH`.
pub fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Where the binaries under test are: `STELLA_BIN_DIR` (set by `cargo xtask
/// test`), else the cargo target dir this test was built into.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STELLA_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/e2e-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Path of one binary under test; panics with a hint when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo xtask test`, which builds the binaries first",
        path.display()
    );
    path
}

/// A directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let base = std::env::var_os("CARGO_TARGET_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!(
            "stella-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("STELLA_KEEP_TEMP").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process killed (by PID) and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr going to `log`.
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let file = fs::File::create(&log).expect("create log file");
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log handle"))
            .stderr(file);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Self {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The exit code if the process has ended.
    pub fn try_exit_code(&mut self) -> Option<Option<i32>> {
        let child = self.child.as_mut()?;
        child.try_wait().ok().flatten().map(|s| s.code())
    }

    /// Waits (polling) for the process to end; returns its exit code.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<i32> {
        let code = poll(deadline, || self.try_exit_code());
        code.unwrap_or_else(|| {
            panic!(
                "process did not exit within {deadline:?}; log:\n{}",
                self.log_text()
            )
        })
    }

    /// Kills the process now (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Calls `f` every 50 ms until it returns `Some`, or the deadline passes.
pub fn poll<T>(deadline: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a command to completion, capturing its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Output as text (stdout, then stderr), for assertions and messages.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Server options for a test.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub heartbeat_interval: &'static str,
    pub heartbeat_misses: u32,
    pub cert_lifetime: &'static str,
    pub expired_grace: &'static str,
    pub update_probation: &'static str,
    /// `serve --max-handshakes` (the server's default when `None`).
    pub max_handshakes: Option<u32>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            heartbeat_interval: "1s",
            heartbeat_misses: 2,
            cert_lifetime: "30d",
            expired_grace: "30d",
            update_probation: "5m",
            max_handshakes: None,
        }
    }
}

/// A running `stella-server` with its own data dir.
#[derive(Debug)]
pub struct Server {
    pub dir: TempDir,
    pub data: PathBuf,
    pub url: String,
    pub pin: String,
    pub admin_token: String,
    pub proc: Proc,
    /// The PostgreSQL URL it runs on (`--store`); `None`: redb.
    pub store: Option<String>,
}

impl Server {
    pub fn start() -> Self {
        Self::start_with(ServerOptions::default())
    }

    pub fn start_with(opts: ServerOptions) -> Self {
        Self::start_on(None, opts)
    }

    /// Starts a server whose store is `store` (a PostgreSQL URL), or redb in
    /// its data dir.
    pub fn start_on(store: Option<&str>, opts: ServerOptions) -> Self {
        let dir = TempDir::new("server");
        let data = dir.join("data");
        let mut init = Command::new(bin("stella-server"));
        init.args(["init", "--data-dir"]).arg(&data).args([
            "--san",
            "localhost",
            "--san",
            "127.0.0.1",
        ]);
        if let Some(url) = store {
            init.args(["--store", url]);
        }
        let out = run(&mut init);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "init failed: {stdout}{stderr}");
        let pin = stdout
            .lines()
            .find_map(|l| l.strip_prefix("CA hash: "))
            .expect("init prints the CA hash")
            .trim()
            .to_owned();
        let admin_token = fs::read_to_string(data.join("admin.token"))
            .expect("admin.token")
            .trim()
            .to_owned();
        let (proc, url) = spawn_serve(&dir, &data, store, &opts, "127.0.0.1:0");
        Self {
            dir,
            data,
            url,
            pin,
            admin_token,
            proc,
            store: store.map(str::to_owned),
        }
    }

    /// Another node of this server's cluster: a server on the same
    /// PostgreSQL store with a copy of this one's data dir (its CA, server
    /// certificate and admin token; docs/operations.md, "Adding a node"),
    /// serving on a new free port.
    pub fn join(&self, opts: &ServerOptions) -> Self {
        let store = self
            .store
            .as_deref()
            .expect("a node joins a server on PostgreSQL");
        let dir = TempDir::new("server");
        let data = dir.join("data");
        let out = run(Command::new("cp").arg("-a").arg(&self.data).arg(&data));
        assert!(out.status.success(), "copy the data dir: {:?}", text(&out));
        let _ = fs::remove_dir_all(data.join("blobs"));
        let (proc, url) = spawn_serve(&dir, &data, Some(store), opts, "127.0.0.1:0");
        Self {
            dir,
            data,
            url,
            pin: self.pin.clone(),
            admin_token: self.admin_token.clone(),
            proc,
            store: Some(store.to_owned()),
        }
    }

    /// `/metrics` value `name` (a counter or gauge without labels).
    pub fn metric(&self, name: &str) -> u64 {
        let (status, body) = self.client().get("/metrics");
        assert_eq!(status, 200, "{body}");
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
    }

    /// Starts `serve` again (after `kill`) on a new free port.
    pub fn serve(&mut self, opts: &ServerOptions) {
        let (proc, url) = spawn_serve(
            &self.dir,
            &self.data,
            self.store.as_deref(),
            opts,
            "127.0.0.1:0",
        );
        self.proc = proc;
        self.url = url;
    }

    /// Starts `serve` again (after `kill`) on the port it had, so enrolled
    /// agents find it where they left it.
    pub fn serve_same_port(&mut self, opts: &ServerOptions) {
        let listen = self.url.trim_start_matches("https://").to_owned();
        let (proc, url) = spawn_serve(&self.dir, &self.data, self.store.as_deref(), opts, &listen);
        self.proc = proc;
        self.url = url;
    }

    /// Kills the server (SIGKILL), keeping its data dir.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Runs an admin command against this server (via its data dir).
    pub fn admin(&self, args: &[&str]) -> Output {
        run(Command::new(bin("stella-server"))
            .args(args)
            .arg("--data-dir")
            .arg(&self.data))
    }

    /// Runs an admin command that must succeed; returns stdout.
    pub fn admin_ok(&self, args: &[&str]) -> String {
        let out = self.admin(args);
        let (stdout, stderr) = text(&out);
        assert!(
            out.status.success(),
            "stella-server {args:?} failed: {stdout}{stderr}"
        );
        stdout
    }

    /// Creates a registration token.
    pub fn token(&self, extra: &[&str]) -> String {
        let mut args = vec!["token", "create"];
        args.extend_from_slice(extra);
        self.admin_ok(&args).trim().to_owned()
    }

    /// `agents list --json`.
    pub fn agents(&self) -> Vec<AgentView> {
        let out = self.admin_ok(&["agents", "list", "--json"]);
        miniserde::json::from_str(out.trim())
            .unwrap_or_else(|_| panic!("agents list --json is not valid: {out}"))
    }

    /// One agent from `agents show --json`.
    pub fn agent(&self, id: &str) -> AgentView {
        let out = self.admin_ok(&["agents", "show", id, "--json"]);
        miniserde::json::from_str(out.trim())
            .unwrap_or_else(|_| panic!("agents show --json is not valid: {out}"))
    }

    /// Polls until the agent satisfies `check`.
    pub fn wait_for_agent(
        &self,
        id: &str,
        what: &str,
        check: impl Fn(&AgentView) -> bool,
    ) -> AgentView {
        poll(DEADLINE, || Some(self.agent(id)).filter(|a| check(a))).unwrap_or_else(|| {
            panic!(
                "agent {id} never became {what}; last: {:?}\nserver log:\n{}",
                self.agent(id),
                self.proc.log_text()
            )
        })
    }

    /// An HTTPS client that trusts this server's CA.
    pub fn client(&self) -> Client {
        Client::new(
            &self.url,
            &fs::read(self.data.join("ca.pem")).expect("ca.pem"),
            None,
        )
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.data.join("ca.pem")
    }
}

/// Starts `serve` on a free loopback port and waits for `/healthz`.
fn spawn_serve(
    dir: &TempDir,
    data: &Path,
    store: Option<&str>,
    opts: &ServerOptions,
    listen: &str,
) -> (Proc, String) {
    let _ = fs::remove_file(data.join("server.url"));
    let mut cmd = Command::new(bin("stella-server"));
    if let Some(url) = store {
        cmd.env("STELLA_STORE", url);
    }
    cmd.args(["serve", "--data-dir"])
        .arg(data)
        .args(["--listen", listen])
        .args(["--heartbeat-interval", opts.heartbeat_interval])
        .args(["--heartbeat-misses", &opts.heartbeat_misses.to_string()])
        .args(["--cert-lifetime", opts.cert_lifetime])
        .args(["--expired-grace", opts.expired_grace])
        .args(["--update-probation", opts.update_probation]);
    if let Some(n) = opts.max_handshakes {
        cmd.args(["--max-handshakes", &n.to_string()]);
    }
    let n = fs::read_dir(dir.path()).map_or(0, |d| d.count());
    let proc = Proc::spawn(cmd, dir.join(&format!("server-{n}.log")));
    let url_file = data.join("server.url");
    let url = poll(DEADLINE, || {
        fs::read_to_string(&url_file)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    })
    .unwrap_or_else(|| panic!("server did not start; log:\n{}", proc.log_text()));
    let client = Client::new(&url, &fs::read(data.join("ca.pem")).expect("ca.pem"), None);
    let healthy = poll(DEADLINE, || (client.get("/healthz").0 == 200).then_some(()));
    assert!(
        healthy.is_some(),
        "server not healthy; log:\n{}",
        proc.log_text()
    );
    (proc, url)
}

/// A plain HTTPS client for direct API calls in tests.
#[derive(Debug)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    /// `client`: optional (certificate PEM, key PEM) for mTLS.
    pub fn new(base: &str, ca_pem: &[u8], client: Option<(&[u8], &[u8])>) -> Self {
        use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig, TlsProvider};
        let ca = Certificate::from_pem(ca_pem).expect("CA PEM");
        let client_cert = client.map(|(cert, key)| {
            ClientCert::new_with_certs(
                &[Certificate::from_pem(cert).expect("cert PEM")],
                PrivateKey::from_pem(key).expect("key PEM"),
            )
        });
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(RootCerts::new_with_certs(&[ca]))
            .client_cert(client_cert)
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(15)))
            .build()
            .new_agent();
        Self {
            base: base.to_owned(),
            agent,
        }
    }

    fn finish(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, String) {
        match result {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let body = resp.body_mut().read_to_string().unwrap_or_default();
                (status, body)
            }
            Err(e) => (0, e.to_string()),
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        Self::finish(self.agent.get(format!("{}{path}", self.base)).call())
    }

    /// GET with an `Authorization: Bearer` header.
    pub fn get_auth(&self, path: &str, token: &str) -> (u16, String) {
        Self::finish(
            self.agent
                .get(format!("{}{path}", self.base))
                .header("authorization", &format!("Bearer {token}"))
                .call(),
        )
    }

    /// POST a JSON body with an `Authorization: Bearer` header.
    pub fn post_auth(&self, path: &str, token: &str, body: &str) -> (u16, String) {
        Self::finish(
            self.agent
                .post(format!("{}{path}", self.base))
                .header("authorization", &format!("Bearer {token}"))
                .content_type("application/json")
                .send(body.as_bytes()),
        )
    }

    /// POST a body with the given content type.
    pub fn post(&self, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
        Self::finish(
            self.agent
                .post(format!("{}{path}", self.base))
                .content_type(content_type)
                .send(body),
        )
    }
}

/// An agent's state dir, with commands run against it, and the binary it
/// runs (shared by default; a private copy for tests that update it).
#[derive(Debug)]
pub struct AgentDir {
    pub dir: TempDir,
    pub state: PathBuf,
    pub binary: PathBuf,
}

impl Default for AgentDir {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentDir {
    pub fn new() -> Self {
        let dir = TempDir::new("agent");
        let state = dir.join("state");
        Self {
            dir,
            state,
            binary: bin("stella-agent"),
        }
    }

    /// An agent running its own copy of `from` at `<temp>/bin/stella-agent`,
    /// as an installed agent would (updates replace it).
    pub fn installed(from: &Path) -> Self {
        let mut agent = Self::new();
        let bin_dir = agent.dir.join("bin");
        fs::create_dir_all(&bin_dir).expect("bin dir");
        let binary = bin_dir.join("stella-agent");
        fs::copy(from, &binary).expect("copy the agent binary");
        agent.binary = binary;
        agent
    }

    /// A `stella-agent` command on this state dir.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args(args).arg("--state-dir").arg(&self.state);
        cmd
    }

    /// `bootstrap` with the server's CA hash, plus `extra` arguments.
    pub fn bootstrap(&self, server: &Server, token: &str, extra: &[&str]) -> Output {
        self.bootstrap_at(&server.url, &server.pin, token, extra)
    }

    /// `bootstrap` against `url` (the server, or a load balancer in front
    /// of it) pinning the CA hash `pin`.
    pub fn bootstrap_at(&self, url: &str, pin: &str, token: &str, extra: &[&str]) -> Output {
        let mut args = vec![
            "bootstrap",
            "--server",
            url,
            "--token",
            token,
            "--ca-hash",
            pin,
        ];
        args.extend_from_slice(extra);
        run(&mut self.command(&args))
    }

    /// `bootstrap` that must succeed; returns the agent id.
    pub fn enroll(&self, server: &Server, name: &str) -> String {
        self.enroll_at(server, &server.url, name)
    }

    /// `enroll` through `url` (a load balancer in front of `server`, whose
    /// token and CA hash it uses); the agent keeps `url` as its server.
    pub fn enroll_at(&self, server: &Server, url: &str, name: &str) -> String {
        let token = server.token(&["--ttl", "10m"]);
        let out = self.bootstrap_at(url, &server.pin, &token, &["--name", name]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "bootstrap failed: {stdout}{stderr}");
        let id = stdout.trim().to_owned();
        assert!(
            stella_proto::id::is_agent_id(&id),
            "bootstrap printed {id:?}"
        );
        id
    }

    /// Starts `stella-agent run`.
    pub fn run(&self) -> Proc {
        let n = std::fs::read_dir(self.dir.path()).map_or(0, |d| d.count());
        Proc::spawn(
            self.command(&["run"]),
            self.dir.join(&format!("agent-{n}.log")),
        )
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.state.join(name)
    }

    /// `stella-agent run` under a supervisor that starts it again whenever
    /// it exits (as systemd would, after an update's swap), logging to
    /// `supervised.log`.
    pub fn supervise(&self) -> Supervisor {
        let (binary, state) = (self.binary.clone(), self.state.clone());
        Supervisor::start(
            move || {
                let mut cmd = Command::new(&binary);
                cmd.arg("run").arg("--state-dir").arg(&state);
                cmd
            },
            &[],
            self.dir.join("supervised.log"),
        )
    }

    /// Waits until the agent's own state records an acknowledged heartbeat.
    /// The server counts a heartbeat before the agent has read the answer
    /// and saved it, so a test that looks at the agent's files (or stops it)
    /// waits for this, not for the server's view.
    pub fn wait_for_saved_heartbeat(&self) {
        let saved = poll(DEADLINE, || {
            let out = run(&mut self.command(&["status", "--json"]));
            let (stdout, _) = text(&out);
            let status = json(&stdout);
            json_str(&status, "last_heartbeat").map(drop)
        });
        assert!(
            saved.is_some(),
            "the agent in {} saved no acknowledged heartbeat",
            self.state.display()
        );
    }
}

/// Parses JSON that a command printed or a state file holds, failing with
/// the text when it is not JSON.
pub fn json(text: &str) -> miniserde::json::Value {
    miniserde::json::from_str(text.trim()).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

/// The value at `path` in `value`: object keys joined by `/`
/// (`update/version`), or `None` when a key is missing or not in an object.
pub fn json_at<'a>(
    value: &'a miniserde::json::Value,
    path: &str,
) -> Option<&'a miniserde::json::Value> {
    path.split('/').try_fold(value, |v, key| match v {
        miniserde::json::Value::Object(o) => o.get(key),
        _ => None,
    })
}

/// The string at `path` in `value` (see [`json_at`]); `None` when it is
/// missing or not a string.
pub fn json_str<'a>(value: &'a miniserde::json::Value, path: &str) -> Option<&'a str> {
    match json_at(value, path) {
        Some(miniserde::json::Value::String(s)) => Some(s),
        _ => None,
    }
}

/// The finding codes of a `doctor --json` report, in check order.
pub fn doctor_codes(report: &miniserde::json::Value) -> Vec<String> {
    match json_at(report, "checks") {
        Some(miniserde::json::Value::Array(checks)) => checks
            .iter()
            .filter_map(|c| json_str(c, "code").map(str::to_owned))
            .collect(),
        _ => panic!("doctor --json has no checks array: {report:?}"),
    }
}

/// Runs an external tool (openssl, curl) that the CI installs.
pub fn tool(program: &str, args: &[&str]) -> Output {
    run(Command::new(program).args(args))
}

/// Plays systemd's `Restart=always` for one agent: runs the command, and
/// restarts it when it exits (except with code 3, "revoked"), until dropped.
/// Restarts drop the environment variables named in `first_run_only`, so a
/// crash point fires once.
#[derive(Debug)]
pub struct Supervisor {
    stop: Arc<std::sync::atomic::AtomicBool>,
    child: Arc<std::sync::Mutex<Option<Child>>>,
    pub restarts: Arc<AtomicU32>,
    pub log: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Supervisor {
    pub fn start(
        make: impl Fn() -> Command + Send + 'static,
        first_run_only: &[&str],
        log: PathBuf,
    ) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let child: Arc<std::sync::Mutex<Option<Child>>> = Arc::default();
        let restarts = Arc::new(AtomicU32::new(0));
        let drop_env: Vec<String> = first_run_only.iter().map(|s| (*s).to_owned()).collect();
        let (stop2, child2, restarts2, log2) =
            (stop.clone(), child.clone(), restarts.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            let mut first = true;
            while !stop2.load(Ordering::SeqCst) {
                let mut cmd = make();
                if !first {
                    for name in &drop_env {
                        cmd.env_remove(name);
                    }
                }
                let file = fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log2)
                    .expect("log");
                cmd.stdin(Stdio::null())
                    .stdout(file.try_clone().expect("log"))
                    .stderr(file);
                let Ok(spawned) = cmd.spawn() else { return };
                *child2.lock().unwrap_or_else(|p| p.into_inner()) = Some(spawned);
                // Wait for the exit, polling so that a stop is noticed.
                let code = loop {
                    if stop2.load(Ordering::SeqCst) {
                        return;
                    }
                    let mut guard = child2.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(c) = guard.as_mut()
                        && let Ok(Some(status)) = c.try_wait()
                    {
                        break status.code();
                    }
                    drop(guard);
                    std::thread::sleep(Duration::from_millis(20));
                };
                if code == Some(3) {
                    return;
                }
                first = false;
                restarts2.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self {
            stop,
            child,
            restarts,
            log,
            thread: Some(thread),
        }
    }

    /// PID of the current process (0 between restarts).
    pub fn pid(&self) -> u32 {
        self.child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, Child::id)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(mut c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
