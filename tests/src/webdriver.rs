//! Driving real headless Chromium through chromedriver's W3C WebDriver endpoint, with the
//! tests' own HTTP client: start a session, navigate, find elements by CSS selector or link
//! text, click, type, read text and attributes, run a script, take screenshots. Downloads go to
//! a directory the session names.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use serde_json::{json, Value};

use crate::http::request;

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process with one browser session; both end when dropped.
pub struct Browser {
    driver: Child,
    addr: String,
    session: String,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium that saves downloads into `downloads`.
    pub fn start(downloads: &Path) -> Result<Browser> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start chromedriver (Debian package chromium-driver)")?;
        let addr = format!("127.0.0.1:{port}");
        let mut b = Browser {
            driver,
            addr,
            session: String::new(),
        };
        let start = Instant::now();
        while request(&b.addr, "GET", "/status", &[], b"").is_err() {
            if start.elapsed() > Duration::from_secs(20) {
                bail!("chromedriver did not start");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1200,900"],
                "prefs": {"download.default_directory": downloads.to_str().unwrap(),
                          "download.prompt_for_download": false}
            }
        }}});
        let v = b.call("POST", "/session", Some(caps))?;
        b.session = v["sessionId"]
            .as_str()
            .context("no session id")?
            .to_string();
        // Element lookups wait for pages a click is still loading.
        b.call("POST", "/timeouts", Some(json!({ "implicit": 10_000 })))?;
        Ok(b)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let target = if path.starts_with("/session/") || path == "/session" {
            path.to_string()
        } else {
            format!("/session/{}{path}", self.session)
        };
        let r = request(
            &self.addr,
            method,
            &target,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )?;
        let v: Value = serde_json::from_slice(&r.body)
            .with_context(|| format!("{method} {path}: {}", r.text()))?;
        if r.status != 200 {
            bail!("{method} {path}: {} {}", r.status, v["value"]);
        }
        Ok(v.get("value").cloned().unwrap_or(Value::Null))
    }

    pub fn goto(&self, url: &str) -> Result<()> {
        self.call("POST", "/url", Some(json!({ "url": url })))?;
        Ok(())
    }

    pub fn url(&self) -> Result<String> {
        Ok(self
            .call("GET", "/url", None)?
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    pub fn source(&self) -> Result<String> {
        Ok(self
            .call("GET", "/source", None)?
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    fn find_by(&self, using: &str, value: &str) -> Result<String> {
        let v = self.call(
            "POST",
            "/element",
            Some(json!({ "using": using, "value": value })),
        )?;
        Ok(v[ELEMENT]
            .as_str()
            .with_context(|| format!("no element {value:?}: {v}"))?
            .to_string())
    }

    /// The first element matching a CSS selector.
    pub fn find(&self, css: &str) -> Result<String> {
        self.find_by("css selector", css)
    }

    /// Clicks the link whose visible text is `text`.
    pub fn click_link(&self, text: &str) -> Result<()> {
        let e = self
            .find_by("link text", text)
            .with_context(|| format!("no link {text:?} on {}", self.url().unwrap_or_default()))?;
        self.click(&e)
    }

    pub fn click(&self, element: &str) -> Result<()> {
        self.call(
            "POST",
            &format!("/element/{element}/click"),
            Some(json!({})),
        )?;
        Ok(())
    }

    pub fn type_into(&self, element: &str, text: &str) -> Result<()> {
        self.call(
            "POST",
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        )?;
        Ok(())
    }

    pub fn text(&self, element: &str) -> Result<String> {
        Ok(self
            .call("GET", &format!("/element/{element}/text"), None)?
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    /// A DOM property (e.g. a `<progress>`'s `value`).
    pub fn property(&self, element: &str, name: &str) -> Result<Value> {
        self.call("GET", &format!("/element/{element}/property/{name}"), None)
    }

    /// Runs `script` (a function body: `return` gives the result) in the current document and
    /// returns its result. Reading several things in one script reads them from one document,
    /// which element references held across a reload cannot promise.
    pub fn execute(&self, script: &str) -> Result<Value> {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    /// Sends keys to the focused element (the page).
    pub fn keys(&self, text: &str) -> Result<()> {
        let active = self.call("GET", "/element/active", None)?;
        let id = active[ELEMENT]
            .as_str()
            .context("no active element")?
            .to_string();
        self.type_into(&id, text)
    }

    /// Saves a PNG of the viewport.
    pub fn screenshot(&self, file: &Path) -> Result<()> {
        let b64 = self.call("GET", "/screenshot", None)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().context("no screenshot")?)?;
        std::fs::write(file, png)?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = request(
                &self.addr,
                "DELETE",
                &format!("/session/{}", self.session),
                &[],
                b"",
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
