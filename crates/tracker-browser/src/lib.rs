//! `tracker-browser`: the operator page (`GET /ui`) tested in a real browser.
//!
//! The library only starts the browser: Debian's `chromedriver` on a port of
//! its choosing, driving Debian's `chromium` headless, through the
//! [`fantoccini`] WebDriver client. The tests (`tests/it`) spawn the API, a
//! reaper and the fake Kubernetes API server in-process and look at the page
//! the way an operator would (docs/ui.md).
//!
//! A missing browser fails loudly ([`Error::Missing`]) and says how to install
//! one (`scripts/services.sh`): a browser test that skips proves nothing.
//!
//! `TRACKER_CHROMEDRIVER` and `TRACKER_CHROMIUM` name other binaries than
//! `/usr/bin/chromedriver` and `/usr/bin/chromium`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use fantoccini::wd::Capabilities;
use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long chromedriver may take to say which port it listens on.
const DRIVER_START: Duration = Duration::from_secs(30);

/// Why there is no browser.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{what} not found at {path}: the browser tests need Debian's chromium and \
         chromium-driver; run scripts/services.sh (it installs them: \
         apt-get install -y chromium chromium-driver)"
    )]
    Missing { what: &'static str, path: PathBuf },
    #[error("start chromedriver")]
    Spawn(#[source] std::io::Error),
    #[error("chromedriver did not report its port within {0:?} (its output: {1})")]
    NoPort(Duration, String),
    #[error("open a chromium session through chromedriver")]
    Session(#[source] fantoccini::error::NewSessionError),
}

/// A headless Chromium under a chromedriver this process started; both end
/// when it is dropped (or, cleanly, on [`Browser::close`]).
#[derive(Debug)]
pub struct Browser {
    client: Client,
    driver: Driver,
}

impl Browser {
    /// Starts chromedriver and opens one headless window of `width` x `height`.
    pub async fn start(width: u32, height: u32) -> Result<Self, Error> {
        let chromium = binary("TRACKER_CHROMIUM", "/usr/bin/chromium", "chromium")?;
        let driver = Driver::start().await?;
        let mut caps = Capabilities::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new",
                    // Tests run as root in CI, where Chromium's sandbox cannot start.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--disable-extensions",
                    "--hide-scrollbars",
                    format!("--window-size={width},{height}"),
                ],
            }),
        );
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
            .map_err(Error::Session)?;
        Ok(Self { client, driver })
    }

    /// The WebDriver session.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Ends the WebDriver session (Chromium quits), then chromedriver.
    pub async fn close(self) {
        let Self { client, driver } = self;
        // A failed close still ends both when `driver` is dropped below.
        let _ = client.close().await;
        drop(driver);
    }
}

/// A chromedriver child in a process group of its own, so that dropping it
/// also ends the Chromium it started, even when a test panics mid-way.
#[derive(Debug)]
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    async fn start() -> Result<Self, Error> {
        let path = binary(
            "TRACKER_CHROMEDRIVER",
            "/usr/bin/chromedriver",
            "chromedriver",
        )?;
        let mut child = Command::new(&path)
            // Port 0: chromedriver picks a free one and prints it.
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(Error::Spawn)?;
        let Some(stdout) = child.stdout.take() else {
            return Err(Error::NoPort(DRIVER_START, "no stdout".into()));
        };
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = String::new();
        let found = tokio::time::timeout(DRIVER_START, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(port) = reported_port(&line) {
                    return Some(port);
                }
                seen.push_str(&line);
                seen.push('\n');
            }
            None
        })
        .await;
        let port = match found {
            Ok(Some(port)) => port,
            _ => return Err(Error::NoPort(DRIVER_START, seen)),
        };
        // Keep reading, so a chatty driver never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { child, port })
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The group is the driver and the browser it started, nothing else.
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", "--", &format!("-{pid}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.start_kill();
    }
}

/// The port in chromedriver's "... started successfully on port 43219." line.
fn reported_port(line: &str) -> Option<u16> {
    let rest = line.split("started successfully on port ").nth(1)?;
    rest.trim().trim_end_matches('.').parse().ok()
}

/// The binary `env` names, else `default`, which must exist.
fn binary(env: &str, default: &str, what: &'static str) -> Result<PathBuf, Error> {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    if is_file(&path) {
        Ok(path)
    } else {
        Err(Error::Missing { what, path })
    }
}

fn is_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_read_from_the_startup_line() {
        assert_eq!(
            reported_port("ChromeDriver was started successfully on port 34411."),
            Some(34411)
        );
        assert_eq!(reported_port("Only local connections are allowed."), None);
        assert_eq!(reported_port("started successfully on port x."), None);
    }

    #[test]
    fn a_missing_binary_says_how_to_install_it() {
        let err = binary(
            "TRACKER_BROWSER_TEST_UNSET_VARIABLE",
            "/nonexistent/chromedriver",
            "chromedriver",
        )
        .unwrap_err();
        assert!(err.to_string().contains("scripts/services.sh"), "{err}");
    }
}
