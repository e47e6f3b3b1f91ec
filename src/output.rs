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
            LogFormat::Text => builder
                .with_target(false)
                .without_time()
                .with_ansi(std::io::stderr().is_terminal())
                .try_init(),
        };
    }

    /// A progress bar on stderr for `len` items (0: unknown, shown as a count). On a terminal it is an indicatif
    /// bar with rate and ETA; when stderr is not a terminal (a Slurm log, a pipe) one progress line is written
    /// every `IMGLISH_PROGRESS_SECS` seconds (default 30) instead, as text or as a JSON object; nothing when
    /// quiet.
    pub fn progress(&self, len: u64, what: &str) -> ProgressBar {
        let terminal = std::io::stderr().is_terminal();
        let visible = !self.quiet && self.format == LogFormat::Text && terminal;
        let target = if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(len), target);
        bar.set_style(bar_style(len));
        bar.set_message(what.to_string());
        if visible {
            bar.enable_steady_tick(Duration::from_millis(200));
        } else if !self.quiet {
            spawn_progress_lines(&bar, self.format, progress_interval());
            // Each phase of this bar then also announces itself once as it starts (see BarProgress::phase).
            let _ = PHASE_LINES.set(self.format);
        }
        bar
    }

    /// A bar for one named phase of `total` items, announced as a phase is (see [`BarProgress`]).
    pub fn phase(&self, what: &str, total: u64) -> ProgressBar {
        let bar = self.progress(total, what);
        imglish_ingest::Progress::phase(&BarProgress(&bar), what, total);
        bar
    }

    /// A counter for work of unknown length (same rules as [`Output::progress`]).
    pub fn spinner(&self, what: &str) -> ProgressBar {
        self.progress(0, what)
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
        let msg = error_line(err);
        match self.format {
            LogFormat::Text => eprintln!("error: {msg}"),
            LogFormat::Json => eprintln!("{}", serde_json::json!({"level": "ERROR", "error": msg})),
        }
    }
}

/// The error and its causes joined with ": ", leaving out a cause whose text the line already holds (typed
/// errors such as `PATH: No such file or directory` print their source themselves).
pub fn error_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Set when progress goes to periodic lines (stderr not a terminal, not quiet): their format.
static PHASE_LINES: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// A progress bar as a stage's [`imglish_ingest::Progress`]: each phase names the bar and sets its total; when
/// progress goes to periodic lines, the phase's first record is written as it starts, so a log shows every phase
/// however short.
pub struct BarProgress<'a>(pub &'a ProgressBar);

impl imglish_ingest::Progress for BarProgress<'_> {
    fn inc(&self, n: u64) {
        self.0.inc(n);
    }

    fn phase(&self, name: &str, total: u64) {
        self.0.set_message(name.to_string());
        self.0.set_length(total);
        self.0.set_style(bar_style(total));
        self.0.set_position(0);
        self.0.reset_eta();
        self.0.reset_elapsed();
        if let Some(format) = PHASE_LINES.get() {
            eprintln!("{}", progress_line(self.0, *format));
        }
    }

    fn message(&self, text: &str) {
        self.0.set_message(text.to_string());
    }
}

/// A bar for a known total, a counter with a rate for an unknown one (`len == 0`).
pub fn bar_style(len: u64) -> ProgressStyle {
    if len > 0 {
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ")
    } else {
        ProgressStyle::with_template("{spinner} {msg}: {pos} ({per_sec}, {elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner())
    }
}

/// Sets a run's bar to steps `step..until` (its total and style), where a trainer says it starts or resumes.
pub fn start_steps(bar: &indicatif::ProgressBar, step: u64, until: u64) {
    bar.set_length(until);
    bar.set_style(bar_style(until));
    bar.set_position(step);
}

fn progress_interval() -> Duration {
    let secs = std::env::var("IMGLISH_PROGRESS_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(30.0);
    Duration::from_secs_f64(secs)
}

/// Writes one progress line per `every` until the bar is finished or dropped (stderr is not a terminal).
fn spawn_progress_lines(bar: &ProgressBar, format: LogFormat, every: Duration) {
    let weak = bar.downgrade();
    let spawned = std::thread::Builder::new()
        .name("progress-lines".into())
        .spawn(move || loop {
            let started = std::time::Instant::now();
            while started.elapsed() < every {
                std::thread::sleep(Duration::from_millis(100).min(every));
                match weak.upgrade() {
                    Some(b) if !b.is_finished() => {}
                    _ => return,
                }
            }
            let Some(bar) = weak.upgrade() else { return };
            if bar.is_finished() {
                return;
            }
            eprintln!("{}", progress_line(&bar, format));
        });
    if let Err(e) = spawned {
        tracing::warn!("no periodic progress lines: cannot start a thread ({e})");
    }
}

/// One progress record: `what: pos/len (rate/s, elapsed, eta)` (`what (elapsed)` while a phase without a total
/// has counted nothing) or its JSON object.
fn progress_line(bar: &ProgressBar, format: LogFormat) -> String {
    let (pos, len) = (bar.position(), bar.length().unwrap_or(0));
    let elapsed = bar.elapsed().as_secs_f64();
    let rate = pos as f64 / elapsed.max(1e-9);
    let eta = (len > pos && rate > 0.0).then(|| (len - pos) as f64 / rate);
    match format {
        LogFormat::Json => serde_json::json!({
            "level": "INFO", "progress": bar.message(), "pos": pos,
            "len": (len > 0).then_some(len), "per_sec": rate, "elapsed_s": elapsed, "eta_s": eta,
        })
        .to_string(),
        // A phase that counts nothing (yet): its name and time only, never a bare "0".
        LogFormat::Text if len == 0 && pos == 0 => {
            format!("progress: {} ({elapsed:.0}s elapsed)", bar.message())
        }
        LogFormat::Text => {
            let total = if len > 0 { format!("/{len}") } else { String::new() };
            let eta = eta.map(|s| format!(", eta {s:.0}s")).unwrap_or_default();
            format!(
                "progress: {}: {pos}{total} ({rate:.1}/s, {elapsed:.0}s elapsed{eta})",
                bar.message()
            )
        }
    }
}
