//! The `tracker-reaper` binary: one clear line on a bad setting, JSON logs on
//! demand, a clean exit on SIGTERM.

use std::process::{Command, Stdio};
use std::time::Duration;

use tracker_core::testing::{self, Backend};

use crate::helpers::eventually;

fn reaper() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tracker-reaper"));
    // Only what each test sets: nothing leaks in from the developer's shell.
    cmd.env_clear();
    cmd.env("PATH", std::env::var("PATH").unwrap_or_default());
    cmd
}

#[test]
fn a_bad_value_stops_the_process_with_one_line() {
    for (var, value) in [
        ("TRACKER_SWEEP_INTERVAL", "every now and then"),
        ("TRACKER_PLATFORM", "nomad"),
        ("TRACKER_REDIS_MODE", "sentinel"),
        ("TRACKER_DRY_RUN", "maybe"),
        ("TRACKER_KEY_PREFIX", "a{b}"),
    ] {
        let out = reaper()
            .env(
                "TRACKER_DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/test",
            )
            .env(var, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.trim_end().lines().count(), 1, "{var}: {stderr}");
        assert!(stderr.starts_with("tracker-reaper: "), "{stderr}");
    }
    let out = reaper().output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--database-url"), "{stderr}");
}

#[test]
fn a_missing_kubernetes_config_fails_the_start_in_one_log_line() {
    let (urls, _) = Backend::Standalone.urls();
    let out = reaper()
        .env(
            "TRACKER_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        )
        .env("TRACKER_REDIS_URL", &urls[0])
        .env("TRACKER_METRICS_LISTEN", "127.0.0.1:0")
        .env("TRACKER_LOG_FORMAT", "json")
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let failure: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("reaper failed"))
        .collect();
    assert_eq!(failure.len(), 1, "{stdout}");
    assert!(
        failure[0].contains("kubernetes client configuration"),
        "{stdout}"
    );
}

#[tokio::test]
async fn runs_with_json_logs_and_stops_on_sigterm() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (urls, _) = Backend::Standalone.urls();
    let child = reaper()
        .env(
            "TRACKER_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        )
        .env("TRACKER_REDIS_URL", &urls[0])
        .env("TRACKER_KEY_PREFIX", testing::random_prefix())
        .env("TRACKER_ELECTION", "redis")
        .env("TRACKER_PLATFORM", "none")
        .env("TRACKER_SKIP_MIGRATIONS", "true")
        .env("TRACKER_METRICS_LISTEN", format!("127.0.0.1:{port}"))
        .env("TRACKER_LEASE_DURATION", "3s")
        .env("TRACKER_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Generous: a debug build starting on a loaded CI machine.
    eventually(Duration::from_secs(30), "leader gauge at 1", || async {
        let r = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .ok()?;
        r.text()
            .await
            .ok()?
            .contains("tracker_reaper_is_leader 1")
            .then_some(())
    })
    .await;
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(!stdout.is_empty());
    for line in stdout.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v.get("level").is_some(), "{line}");
    }
    assert!(stdout.contains("released the lease"), "{stdout}");
}
