//! Progress on stderr: a bar with ETA on a terminal; elsewhere (a log file, CI) a plain line at
//! most every 30 s (count, ETA, rate, the latest loss) and one when the work ends, as cargo and
//! pip do. Work shorter than 30 s prints nothing, so a failure is still one line.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Seconds between plain progress lines.
const EVERY: Duration = Duration::from_secs(30);

/// Progress of `what`, counted in items.
pub struct Progress {
    bar: Option<ProgressBar>,
    plain: Mutex<Plain>,
}

struct Plain {
    what: String,
    total: Option<u64>,
    pos: u64,
    msg: String,
    started: Instant,
    last: Instant,
    /// Whether a line was printed (a short job prints none: its output, or its one-line error,
    /// is all there is on stderr).
    printed: bool,
}

impl Progress {
    fn new(total: Option<u64>, what: &str, bar: impl FnOnce() -> ProgressBar) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let now = Instant::now();
        Progress {
            bar: terminal.then(bar),
            plain: Mutex::new(Plain {
                what: what.to_owned(),
                total,
                pos: 0,
                msg: String::new(),
                started: now,
                last: now,
                printed: false,
            }),
        }
    }

    /// Sets the count done.
    pub fn set_position(&self, pos: u64) {
        if let Some(bar) = &self.bar {
            return bar.set_position(pos);
        }
        let Ok(mut p) = self.plain.lock() else { return };
        p.pos = pos;
        if p.last.elapsed() >= EVERY {
            p.last = Instant::now();
            p.printed = true;
            eprintln!("{}", p.line());
        }
    }

    /// Adds to the count done.
    pub fn inc(&self, n: u64) {
        let pos = match &self.bar {
            Some(bar) => return bar.inc(n),
            None => self.plain.lock().map_or(0, |p| p.pos) + n,
        };
        self.set_position(pos);
    }

    /// Sets the note shown beside the count (a loss, a reward).
    pub fn set_message(&self, msg: String) {
        match &self.bar {
            Some(bar) => bar.set_message(msg),
            None => {
                if let Ok(mut p) = self.plain.lock() {
                    p.msg = msg;
                }
            }
        }
    }

    /// Ends the display: the bar is cleared; a plain log gets a last line.
    pub fn finish_and_clear(&self) {
        match &self.bar {
            Some(bar) => bar.finish_and_clear(),
            None => {
                if let Some(p) = self.plain.lock().ok().filter(|p| p.printed) {
                    eprintln!(
                        "{}: done, {} in {:.0} s",
                        p.what,
                        p.pos,
                        p.started.elapsed().as_secs_f64()
                    );
                }
            }
        }
    }
}

impl Plain {
    fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64();
        let rate = self.pos as f64 / secs.max(1e-9);
        let mut line = format!("{}: {}", self.what, self.pos);
        if let Some(total) = self.total {
            line.push_str(&format!("/{total}"));
            if rate > 0.0 && total > self.pos {
                line.push_str(&format!(", ETA {:.0} s", (total - self.pos) as f64 / rate));
            }
        }
        line.push_str(&format!(" ({rate:.2}/s, {secs:.0} s)"));
        if !self.msg.is_empty() {
            line.push_str(&format!(" {}", self.msg));
        }
        line
    }
}

/// A bar counting `total` items of `what`.
pub fn bar(total: u64, what: &str) -> Progress {
    Progress::new(Some(total), what, || {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, ETA {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(what.to_owned());
        bar
    })
}

/// A counter for work of unknown length (records of a file being read).
pub fn counter(what: &str) -> Progress {
    Progress::new(None, what, || {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{msg:>10} [{elapsed_precise}] {pos} ({per_sec})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(what.to_owned());
        bar
    })
}
