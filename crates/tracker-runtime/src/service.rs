//! What both binaries' `main` does, written once: parse the settings, start
//! logging, build (which checks the settings against each other), run until
//! SIGTERM or SIGINT, and turn every failure into one log line and an exit
//! code.
//!
//! Exit codes: 0 after a clean shutdown; 2 for settings that are wrong, said
//! in one line on stderr before any logging starts (as clap does for a bad
//! value); 1 for anything that fails later, logged once with its causes.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::{cancel_on_signal, init_telemetry, parse_settings, LogFormat};

/// A binary's application: built from its settings, then run until told to
/// stop.
pub trait Service: Sized {
    /// The binary's name, the prefix of its one-line setting errors.
    const NAME: &'static str;
    type Config: Parser;
    type BuildError: Error + 'static;
    type RunError: Error + 'static;

    fn log_format(cfg: &Self::Config) -> LogFormat;

    fn build(cfg: Self::Config) -> impl Future<Output = Result<Self, Self::BuildError>>;

    /// The message of a build error that means the settings do not fit
    /// together (exit code 2), or `None` for any other failure.
    fn settings_error(e: &Self::BuildError) -> Option<String>;

    /// Logs what an operator wants to know once it is built (addresses bound).
    fn announce(&self);

    fn run_until(
        self,
        shutdown: CancellationToken,
    ) -> impl Future<Output = Result<(), Self::RunError>>;
}

/// The whole of a binary's `main`.
pub async fn main<S: Service>() -> ExitCode {
    let cfg = match parse_settings::<S::Config>(S::NAME) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    init_telemetry(S::log_format(&cfg));
    let app = match S::build(cfg).await {
        Ok(app) => app,
        Err(e) => {
            if let Some(message) = S::settings_error(&e) {
                eprintln!("{}: {message}", S::NAME);
                return ExitCode::from(2);
            }
            tracing::error!(error = %Causes(&e), "{} failed to start", S::NAME);
            return ExitCode::FAILURE;
        }
    };
    app.announce();
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match app.run_until(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %Causes(&e), "{} failed", S::NAME);
            ExitCode::FAILURE
        }
    }
}

/// An error and its sources on one line, `outer: inner: root`, the way a log
/// search wants it.
#[derive(Debug)]
pub struct Causes<'a>(pub &'a dyn Error);

impl fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as &(dyn Error + 'static))
        }
    }

    #[test]
    fn causes_print_the_whole_chain_on_one_line() {
        let e = Layer(
            "connect to redis",
            Some(Box::new(Layer(
                "timed out",
                Some(Box::new(Layer("os error 110", None))),
            ))),
        );
        assert_eq!(
            Causes(&e).to_string(),
            "connect to redis: timed out: os error 110"
        );
        assert_eq!(Causes(&Layer("alone", None)).to_string(), "alone");
    }
}
