//! The terminal progress bar (indicatif) for the CLI's long commands, shown only when stderr
//! is a terminal so scripts and logs stay clean.

use std::io::IsTerminal;

use diskferry_imaging::progress::Progress;

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
    fn files(&self, done: u64, total: u64) {
        let phase = self.bar.message();
        let phase = phase.split(" (").next().unwrap_or_default().to_string();
        self.bar
            .set_message(format!("{phase} ({done}/{total} files)"));
    }
}
