//! Progress bars with throughput and ETA on a terminal; silent when stderr is not one.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

/// A byte-counting progress bar (hidden when stderr is not a terminal or when disabled).
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar labelled `label` over `total` bytes.
    pub fn new(label: &str, total: u64, enabled: bool) -> Self {
        let bar = if enabled && std::io::stderr().is_terminal() {
            ProgressBar::new(total)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{msg:>12} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(label.to_string());
        Progress { bar }
    }

    /// Adds `n` bytes done.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Sets the position and the total (for producers that report both).
    pub fn set(&self, done: u64, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(done);
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
