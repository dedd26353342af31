//! Child processes: finding the binaries, spawning one with its own log file, and ending it
//! with SIGTERM (the `kill` command, so no `unsafe` and no libc) or SIGKILL
//! ([`tokio::process::Child::start_kill`]). A child is killed when its handle is dropped, so a
//! panicking test leaves no process behind.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::{Error, Result};

/// The two binaries under test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    pub api: PathBuf,
    pub reaper: PathBuf,
}

/// The command that builds what the harness runs.
pub const BUILD_HINT: &str = "cargo build -p tracker-api -p tracker-reaper";

impl Binaries {
    /// `tracker-api` and `tracker-reaper` next to the running executable (`target/<profile>/`,
    /// also from a test binary in `target/<profile>/deps/`), or in `TRACKER_E2E_BIN_DIR`.
    pub fn locate() -> Result<Self> {
        let dir = match std::env::var_os("TRACKER_E2E_BIN_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let exe = std::env::current_exe()
                    .map_err(|e| Error::io("find the running executable", e))?;
                profile_dir(&exe)
                    .ok_or_else(|| Error::Setup(format!("no directory above {}", exe.display())))?
            }
        };
        let find = |name: &str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                let release = if dir.ends_with("release") {
                    " --release"
                } else {
                    ""
                };
                Err(Error::Setup(format!(
                    "{} not found; build the binaries first: {BUILD_HINT}{release} \
                     (or set TRACKER_E2E_BIN_DIR)",
                    path.display()
                )))
            }
        };
        Ok(Self {
            api: find("tracker-api")?,
            reaper: find("tracker-reaper")?,
        })
    }
}

/// `target/<profile>` for an executable in it or in its `deps/`.
fn profile_dir(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}

/// A running child with its combined stdout and stderr in a log file.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    log: PathBuf,
    pid: u32,
    child: Child,
    exited: Option<ExitStatus>,
}

impl ChildProcess {
    /// Spawns `program` with exactly `env` (nothing leaks in from the caller's environment but
    /// `PATH`), its output appended to `log`.
    pub fn spawn(name: &str, program: &Path, env: &[(String, String)], log: &Path) -> Result<Self> {
        Self::start(name, program, &[], env, log)
    }

    /// Spawns `program` with `args` and no environment but `PATH`, its output appended to
    /// `log` (a helper server such as `redis-server`).
    pub fn spawn_with_args(name: &str, program: &Path, args: &[&str], log: &Path) -> Result<Self> {
        Self::start(name, program, args, &[], log)
    }

    fn start(
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(String, String)],
        log: &Path,
    ) -> Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| Error::io(format!("open {}", log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| Error::io(format!("open {}", log.display()), e))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("spawn {name} ({})", program.display()), e))?;
        let pid = child
            .id()
            .ok_or_else(|| Error::Setup(format!("{name} has no pid right after spawn")))?;
        Ok(Self {
            name: name.to_owned(),
            log: log.to_owned(),
            pid,
            child,
            exited: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status if the child has ended, without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// An [`Error::Exited`] for this child, if it has ended.
    pub fn check_running(&mut self, during: &str) -> Result<()> {
        match self.exited() {
            None => Ok(()),
            Some(status) => Err(Error::Exited {
                process: self.name.clone(),
                status: status.to_string(),
                during: during.to_owned(),
                log: self.log.clone(),
            }),
        }
    }

    /// SIGKILL, then reap it (bounded).
    pub async fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exited() {
            return Ok(status);
        }
        // An error here means the process is already gone; waiting tells.
        let _ = self.child.start_kill();
        self.wait(Duration::from_secs(10)).await
    }

    /// SIGTERM, then wait up to `grace` for a clean exit, then SIGKILL.
    /// Answers the exit status and whether the child stopped within the grace period.
    pub async fn terminate(&mut self, grace: Duration) -> Result<(ExitStatus, bool)> {
        if let Some(status) = self.exited() {
            return Ok((status, true));
        }
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if matches!(sent, Ok(s) if s.success()) {
            if let Ok(status) = self.wait(grace).await {
                return Ok((status, true));
            }
        }
        Ok((self.kill().await?, false))
    }

    /// Waits up to `timeout` for the child to end.
    pub async fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.exited {
            return Ok(status);
        }
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.exited = Some(status);
                Ok(status)
            }
            Ok(Err(e)) => Err(Error::io(format!("wait for {}", self.name), e)),
            Err(_) => Err(Error::Timeout {
                what: format!("{} to exit", self.name),
                waited: timeout,
            }),
        }
    }

    /// The last `lines` lines of the log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

/// The last `lines` lines of a file (empty if it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A loopback port that was free a moment ago (bind port 0, read it, close).
/// A child that loses the race fails to bind and exits; the harness then retries.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| Error::io("bind a free loopback port", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::io("read a free port", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_dir_is_above_deps() {
        assert_eq!(
            profile_dir(Path::new("/w/target/debug/deps/e2e-123")),
            Some(PathBuf::from("/w/target/debug"))
        );
        assert_eq!(
            profile_dir(Path::new("/w/target/release/tracker-e2e")),
            Some(PathBuf::from("/w/target/release"))
        );
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = std::env::temp_dir().join(format!("e2e-tail-{}", uuid::Uuid::new_v4()));
        std::fs::write(&dir, "a\nb\nc\n").unwrap();
        assert_eq!(tail(&dir, 2), "b\nc");
        assert_eq!(tail(&dir, 10), "a\nb\nc");
        std::fs::remove_file(&dir).unwrap();
    }
}
