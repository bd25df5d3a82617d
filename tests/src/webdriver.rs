//! A small WebDriver client for the console's browser test: Debian's
//! `chromedriver` driving headless `chromium`, spoken to as plain JSON over
//! HTTP on loopback (the W3C WebDriver protocol), so the suite needs no
//! Selenium or Python. Only what the test uses: open a page, find elements
//! by CSS selector, click, type, read text, run a script, take screenshots.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use miniserde::json::{self, Value};
use stella_proto::api::json_string;

use crate::{DEADLINE, Proc, TempDir, on_path, poll, skip_or_fail};

/// The key under which WebDriver names an element.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Where the browser binary is: Debian's package installs it on PATH.
const BROWSERS: &[&str] = &["chromium", "chromium-browser"];

/// A headless Chromium session, ended (and its driver killed) on drop.
pub struct Browser {
    base: String,
    session: String,
    http: ureq::Agent,
    driver: Proc,
    _profile: TempDir,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("base", &self.base)
            .field("session", &self.session)
            .finish()
    }
}

/// A JSON string literal.
fn quoted(s: &str) -> String {
    let mut out = String::new();
    json_string(&mut out, s);
    out
}

fn get<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    match value {
        Value::Object(o) => o.get(key),
        _ => None,
    }
}

fn as_str(value: &Value) -> Option<&str> {
    match value {
        Value::String(s) => Some(s),
        _ => None,
    }
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session that accepts the
    /// test server's certificate; `None` (after `skip_or_fail`) when either
    /// is not installed.
    pub fn start(test: &str) -> Option<Self> {
        let Some(browser) = BROWSERS.iter().find(|b| on_path(b)) else {
            skip_or_fail(test, "chromium is not installed (apt-get install chromium)");
            return None;
        };
        if !on_path("chromedriver") {
            skip_or_fail(
                test,
                "chromedriver is not installed (apt-get install chromium-driver)",
            );
            return None;
        }
        let browser_path = std::env::var_os("PATH")
            .and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(browser))
                    .find(|f| f.is_file())
            })
            .expect("on PATH");
        let profile = TempDir::new("chromium");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut cmd = Command::new("chromedriver");
        cmd.arg(format!("--port={port}"));
        let driver = Proc::spawn(cmd, profile.join("chromedriver.log"));
        let base = format!("http://127.0.0.1:{port}");
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(90)))
            .build()
            .new_agent();
        let ready = poll(DEADLINE, || {
            let mut resp = http.get(format!("{base}/status")).call().ok()?;
            let text = resp.body_mut().read_to_string().ok()?;
            text.contains("\"ready\":true").then_some(())
        });
        assert!(
            ready.is_some(),
            "chromedriver did not get ready; log:\n{}",
            driver.log_text()
        );
        // A root VM without a container: no sandbox; /dev/shm may be small.
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--disable-gpu".to_owned(),
            "--no-first-run".to_owned(),
            "--window-size=1280,900".to_owned(),
            format!("--user-data-dir={}", profile.join("profile").display()),
        ];
        let args: Vec<String> = args.iter().map(|a| quoted(a)).collect();
        let caps = format!(
            r#"{{"capabilities":{{"alwaysMatch":{{"browserName":"chrome","acceptInsecureCerts":true,"goog:chromeOptions":{{"binary":{},"args":[{}]}}}}}}}}"#,
            quoted(&browser_path.display().to_string()),
            args.join(",")
        );
        let mut this = Self {
            base,
            session: String::new(),
            http,
            driver,
            _profile: profile,
        };
        let answer = this
            .call("POST", "/session", Some(caps))
            .unwrap_or_else(|e| {
                panic!(
                    "chromedriver could not start Chromium: {e}\nlog:\n{}",
                    this.driver.log_text()
                )
            });
        this.session = get(&answer, "sessionId")
            .and_then(as_str)
            .expect("a session id")
            .to_owned();
        Some(this)
    }

    /// One WebDriver command; its `value`, or the driver's error text.
    fn call(&self, method: &str, path: &str, body: Option<String>) -> Result<Value, String> {
        let url = if path == "/session" {
            format!("{}{path}", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let result = match method {
            "POST" => self
                .http
                .post(&url)
                .content_type("application/json")
                .send(body.unwrap_or_else(|| "{}".to_owned())),
            "DELETE" => self.http.delete(&url).call(),
            _ => self.http.get(&url).call(),
        };
        let mut resp = result.map_err(|e| format!("{method} {path}: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let value: Value =
            json::from_str(&text).map_err(|_| format!("{method} {path}: not JSON: {text}"))?;
        let value = get(&value, "value").cloned().unwrap_or(Value::Null);
        if status != 200 {
            let error = get(&value, "message").and_then(as_str).unwrap_or(&text);
            return Err(format!("{method} {path}: {status}: {error}"));
        }
        Ok(value)
    }

    fn must(&self, method: &str, path: &str, body: Option<String>) -> Value {
        self.call(method, path, body)
            .unwrap_or_else(|e| panic!("WebDriver: {e}"))
    }

    /// Opens `url`.
    pub fn goto(&self, url: &str) {
        self.must(
            "POST",
            "/url",
            Some(format!(r#"{{"url":{}}}"#, quoted(url))),
        );
    }

    /// The elements `css` selects now.
    pub fn find_all(&self, css: &str) -> Vec<String> {
        let body = format!(r#"{{"using":"css selector","value":{}}}"#, quoted(css));
        match self.call("POST", "/elements", Some(body)) {
            Ok(Value::Array(items)) => items
                .iter()
                .filter_map(|e| get(e, ELEMENT_KEY).and_then(as_str).map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether an element is shown.
    fn displayed(&self, element: &str) -> bool {
        matches!(
            self.call("GET", &format!("/element/{element}/displayed"), None),
            Ok(Value::Bool(true))
        )
    }

    /// Waits until `css` selects a shown element, and returns it.
    pub fn wait_for(&self, css: &str) -> String {
        poll(DEADLINE, || {
            self.find_all(css).into_iter().find(|e| self.displayed(e))
        })
        .unwrap_or_else(|| {
            panic!(
                "no shown element matches {css}; the page says:\n{}",
                self.text("body")
            )
        })
    }

    /// Waits until `check` holds, failing with `what` and the page's text.
    pub fn wait_until(&self, what: &str, mut check: impl FnMut(&Self) -> bool) {
        if poll(DEADLINE, || check(self).then_some(())).is_none() {
            panic!(
                "{what} never happened; the page says:\n{}",
                self.text("body")
            );
        }
    }

    /// Clicks the shown element `css` selects.
    pub fn click(&self, css: &str) {
        let element = self.wait_for(css);
        self.must("POST", &format!("/element/{element}/click"), None);
    }

    /// Replaces the text of the input `css` selects with `text`.
    pub fn type_into(&self, css: &str, text: &str) {
        let element = self.wait_for(css);
        self.must("POST", &format!("/element/{element}/clear"), None);
        self.must(
            "POST",
            &format!("/element/{element}/value"),
            Some(format!(r#"{{"text":{}}}"#, quoted(text))),
        );
    }

    /// The text of the first element `css` selects (empty when none).
    pub fn text(&self, css: &str) -> String {
        self.find_all(css)
            .first()
            .and_then(|e| {
                self.call("GET", &format!("/element/{e}/text"), None)
                    .ok()
                    .and_then(|v| as_str(&v).map(str::to_owned))
            })
            .unwrap_or_default()
    }

    /// The texts of every element `css` selects.
    pub fn texts(&self, css: &str) -> Vec<String> {
        self.find_all(css)
            .iter()
            .filter_map(|e| {
                self.call("GET", &format!("/element/{e}/text"), None)
                    .ok()
                    .and_then(|v| as_str(&v).map(str::to_owned))
            })
            .collect()
    }

    /// Runs `script` (a function body) in the page and returns its result.
    pub fn execute(&self, script: &str) -> Value {
        self.must(
            "POST",
            "/execute/sync",
            Some(format!(r#"{{"script":{},"args":[]}}"#, quoted(script))),
        )
    }

    /// Saves a PNG of the window at `path`.
    pub fn screenshot(&self, path: &Path) {
        use base64::Engine as _;
        let value = self.must("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(as_str(&value).expect("a base64 screenshot"))
            .expect("valid base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).expect("write the screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends Chromium; the driver itself is killed by its handle.
        if !self.session.is_empty() {
            let _ = self.call("DELETE", "", None);
        }
    }
}

/// Where screenshots go: `target/ui-screenshots/` of this workspace (or of
/// `CARGO_TARGET_DIR`).
pub fn screenshot_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("ui-screenshots")
}
