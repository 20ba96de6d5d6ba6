//! Progress on stderr for long work: a line rewritten in place, at most a few times a second,
//! silent under `--quiet`.

use std::io::Write;
use std::time::{Duration, Instant};

/// A progress line for `total` units of work.
#[derive(Debug)]
pub struct Progress {
    label: String,
    total: u64,
    done: u64,
    start: Instant,
    last_draw: Option<Instant>,
    quiet: bool,
}

impl Progress {
    /// Starts a progress line. Nothing is drawn for work that finishes within a second.
    pub fn new(label: impl Into<String>, total: u64, quiet: bool) -> Self {
        Progress {
            label: label.into(),
            total,
            done: 0,
            start: Instant::now(),
            last_draw: None,
            quiet,
        }
    }

    /// Records `n` more units done and redraws if due.
    pub fn advance(&mut self, n: u64) {
        self.done = (self.done + n).min(self.total);
        self.draw(false);
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    fn draw(&mut self, last: bool) {
        if self.quiet {
            return;
        }
        let now = Instant::now();
        let due = match self.last_draw {
            None => now.duration_since(self.start) >= Duration::from_secs(1),
            Some(t) => now.duration_since(t) >= Duration::from_millis(200),
        };
        if !(due || (last && self.last_draw.is_some())) {
            return;
        }
        self.last_draw = Some(now);
        let secs = now.duration_since(self.start).as_secs_f64();
        let frac = if self.total == 0 {
            1.0
        } else {
            self.done as f64 / self.total as f64
        };
        let eta = if frac > 0.0 { secs / frac - secs } else { 0.0 };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{}: {}/{} ({:.0}%) {:.1}s elapsed, ETA {:.1}s   ",
            self.label,
            self.done,
            self.total,
            frac * 100.0,
            secs,
            eta
        );
        if last {
            let _ = writeln!(err);
        }
        let _ = err.flush();
    }

    /// Ends the line (drawn only if the work took long enough to show progress).
    pub fn finish(mut self) {
        self.done = self.total;
        self.draw(true);
    }
}
