//! Import progress: a callback trait and a terminal renderer (bytes, rate, time left).

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Told how far an import is. Called from the importing thread, at most once per chunk.
pub trait ImportProgress: Send + Sync {
    fn update(&self, done_bytes: u64, total_bytes: u64);
    fn finish(&self, _done_bytes: u64, _total_bytes: u64) {}
}

/// Ignores progress.
pub struct NoProgress;

impl ImportProgress for NoProgress {
    fn update(&self, _done_bytes: u64, _total_bytes: u64) {}
}

/// Draws one self-overwriting line on stderr (a plain line every 10 s when stderr is not a
/// terminal): `<label> 1.50 GiB / 10.00 GiB  15.0%  312.40 MiB/s  0:00:27 left`.
pub struct TerminalProgress {
    started: Instant,
    terminal: bool,
    interval: Duration,
    last_drawn: Mutex<Option<Instant>>,
    label: String,
}

impl TerminalProgress {
    pub fn new(label: impl Into<String>) -> Self {
        let terminal = std::io::stderr().is_terminal();
        TerminalProgress {
            started: Instant::now(),
            terminal,
            // Redraw a terminal line often; write a log line only every ten seconds.
            interval: Duration::from_millis(if terminal { 200 } else { 10_000 }),
            last_drawn: Mutex::new(None),
            label: label.into(),
        }
    }

    fn draw(&self, line: &str, end: &str) {
        let mut stderr = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(stderr, "\r\x1b[2K{} {line}{end}", self.label);
        } else {
            // A log file or pipe: whole lines, no control sequences.
            let _ = writeln!(stderr, "{} {line}", self.label);
        }
        let _ = stderr.flush();
    }
}

impl ImportProgress for TerminalProgress {
    fn update(&self, done_bytes: u64, total_bytes: u64) {
        let now = Instant::now();
        let mut last = self
            .last_drawn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if last.is_some_and(|last| now.duration_since(last) < self.interval) {
            return;
        }
        *last = Some(now);
        let elapsed_seconds = now.duration_since(self.started).as_secs_f64();
        self.draw(&progress_line(done_bytes, total_bytes, elapsed_seconds), "");
    }

    fn finish(&self, done_bytes: u64, total_bytes: u64) {
        let elapsed_seconds = self.started.elapsed().as_secs_f64();
        self.draw(
            &progress_line(done_bytes, total_bytes, elapsed_seconds),
            "\n",
        );
    }
}

/// `1536` -> `1.50 KiB`.
pub fn format_bytes(bytes: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

fn format_duration(seconds: f64) -> String {
    let total = seconds.round() as u64;
    format!("{}:{:02}:{:02}", total / 3600, total / 60 % 60, total % 60)
}

/// The progress line for `done_bytes` of `total_bytes` after `elapsed_seconds` (pure).
pub fn progress_line(done_bytes: u64, total_bytes: u64, elapsed_seconds: f64) -> String {
    let percent = if total_bytes == 0 {
        100.0
    } else {
        done_bytes as f64 * 100.0 / total_bytes as f64
    };
    let rate = if elapsed_seconds > 0.0 {
        done_bytes as f64 / elapsed_seconds
    } else {
        0.0
    };
    let left = if done_bytes >= total_bytes {
        "done".to_string()
    } else if rate > 0.0 {
        format!(
            "{} left",
            format_duration((total_bytes - done_bytes) as f64 / rate)
        )
    } else {
        "--:--:-- left".to_string()
    };
    format!(
        "{} / {}  {percent:.1}%  {}/s  {left}",
        format_bytes(done_bytes as f64),
        format_bytes(total_bytes as f64),
        format_bytes(rate)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_bytes_rate_and_time_left() {
        let line = progress_line(512 << 20, 2048 << 20, 2.0);
        assert_eq!(
            line,
            "512.00 MiB / 2.00 GiB  25.0%  256.00 MiB/s  0:00:06 left"
        );
        assert!(progress_line(10, 10, 1.0).ends_with("done"));
        assert!(progress_line(0, 10, 0.0).ends_with("--:--:-- left"));
        assert_eq!(format_bytes(100.0), "100 B");
    }
}
