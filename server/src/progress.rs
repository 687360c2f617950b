//! Progress reporting for long jobs: a small trait the pipelines call, with a terminal bar
//! (indicatif, only when stderr is a terminal) and a silent implementation.

use std::io::IsTerminal;

/// Receives progress from a running job. Implementations must be cheap: `advance` is called
/// for every piece of data moved.
pub trait Progress: Send + Sync {
    /// Starts a phase of `total` bytes.
    fn start(&self, phase: &str, total: u64);
    fn advance(&self, bytes: u64);
    fn finish(&self);
}

/// Reports nothing.
#[derive(Debug, Default)]
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// A progress bar on stderr with bytes, rate and ETA.
#[derive(Debug)]
pub struct TerminalBar {
    bar: indicatif::ProgressBar,
}

impl TerminalBar {
    /// A bar when stderr is a terminal, otherwise `None` (scripts and logs stay clean).
    pub fn if_terminal() -> Option<TerminalBar> {
        std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            TerminalBar { bar }
        })
    }
}

impl Progress for TerminalBar {
    fn start(&self, phase: &str, total: u64) {
        self.bar.set_message(phase.to_string());
        self.bar.set_length(total);
        self.bar.set_position(0);
    }
    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
    }
    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
