//! `fake-kube`: runs the fake Kubernetes API server as its own process, for end-to-end tests.
//!
//! Prints `listening on http://ADDR` as its first stdout line (after writing the kubeconfig,
//! if asked), so a harness can read the address and start clients at once.

use std::{io::Write, net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::Parser;
use fake_kube::FakeKube;

/// A fake Kubernetes API server (Sessions and Leases only) for tests.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write a kubeconfig pointing at this server to PATH.
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let fake = FakeKube::start_on(args.listen).await?;
    if let Some(path) = &args.kubeconfig {
        fake.write_kubeconfig(path)?;
    }
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {}", fake.url()).context("write to stdout")?;
    stdout.flush().context("flush stdout")?;
    shutdown_signal().await?;
    fake.shutdown().await?;
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    tokio::select! {
        res = tokio::signal::ctrl_c() => res.context("wait for SIGINT"),
        _ = term.recv() => Ok(()),
    }
}
