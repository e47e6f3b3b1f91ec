//! Logging, progress bars and run summaries, honouring `--quiet` and `--log-format`.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing_subscriber::EnvFilter;

use crate::cli::{GlobalArgs, LogFormat};

/// How the run talks to the user.
pub struct Output {
    quiet: bool,
    format: LogFormat,
}

impl Output {
    pub fn new(global: &GlobalArgs) -> Self {
        Output {
            quiet: global.quiet,
            format: global.log_format,
        }
    }

    pub fn init_logging(&self) {
        let default = if self.quiet { "error" } else { "info" };
        let filter = EnvFilter::try_from_env("IMGLISH_LOG").unwrap_or_else(|_| EnvFilter::new(default));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        let _ = match self.format {
            LogFormat::Json => builder.json().flatten_event(true).try_init(),
            LogFormat::Text => builder.with_target(false).without_time().try_init(),
        };
    }

    /// A progress bar on stderr for `len` items (hidden when quiet, in JSON mode or when stderr is not a
    /// terminal).
    pub fn progress(&self, len: u64, what: &str) -> ProgressBar {
        let visible = !self.quiet && self.format == LogFormat::Text && std::io::stderr().is_terminal();
        let target = if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(len), target);
        bar.set_style(
            ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }

    /// A counter for work of unknown length (same visibility rules as [`Output::progress`]).
    pub fn spinner(&self, what: &str) -> ProgressBar {
        let bar = self.progress(0, what);
        bar.set_length(0);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg}: {pos} ({per_sec})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar
    }

    /// Prints a run summary: `text` lines in text mode, `json` as one line in JSON mode; nothing when quiet.
    pub fn summary(&self, text: &str, json: &serde_json::Value) {
        if self.quiet {
            return;
        }
        let mut stdout = std::io::stdout().lock();
        let _ = match self.format {
            LogFormat::Text => writeln!(stdout, "{text}"),
            LogFormat::Json => writeln!(stdout, "{json}"),
        };
    }

    /// Reports a failure as one line on stderr (a JSON object in JSON mode).
    pub fn error(&self, err: &anyhow::Error) {
        let msg = format!("{err:#}");
        match self.format {
            LogFormat::Text => eprintln!("error: {msg}"),
            LogFormat::Json => eprintln!("{}", serde_json::json!({"level": "ERROR", "error": msg})),
        }
    }
}
