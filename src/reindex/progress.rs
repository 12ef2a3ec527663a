//! Progress of a reindex: a bar on stderr when it is a terminal; otherwise (a pipe, a
//! log file, a container's log) a log line every [`PROGRESS_EVERY`], with the count
//! done, the total and the rate, since a redrawn bar would only fill the log with
//! control codes.

use std::fmt;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressState, ProgressStyle};

/// How often progress is logged when stderr is not a terminal.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// The bar on a terminal, periodic log lines elsewhere.
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    done: u64,
    /// Of `done`, what earlier runs copied (not part of this run's rate).
    resumed: u64,
    started: Instant,
    logged: Instant,
}

impl Progress {
    /// `done`: messages already copied by an earlier run that this one resumes.
    pub fn new(total: u64, done: u64, terminal: bool) -> Self {
        let bar = terminal.then(|| {
            ProgressBar::new(total).with_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:40}] {pos}/{len} messages ({rate}, eta {eta})",
                )
                .map(|style| {
                    style.with_key("rate", |state: &ProgressState, w: &mut dyn fmt::Write| {
                        let _ = w.write_str(&format_rate(state.per_sec()));
                    })
                })
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            )
        });
        match &bar {
            Some(bar) => bar.set_position(done),
            None => tracing::info!(
                messages_total = total,
                messages_done = done,
                "reindex: {} messages to index, {} done before",
                group_thousands(total),
                group_thousands(done)
            ),
        }
        let now = Instant::now();
        Self {
            bar,
            total,
            done,
            resumed: done,
            started: now,
            logged: now,
        }
    }

    pub fn advance(&mut self, n: u64) {
        self.done += n;
        match &self.bar {
            Some(bar) => bar.set_position(self.done),
            None if self.logged.elapsed() >= PROGRESS_EVERY => {
                self.logged = Instant::now();
                let rate = per_second(self.done - self.resumed, self.started.elapsed());
                tracing::info!(
                    messages_done = self.done,
                    messages_total = self.total,
                    "reindex: {}/{} messages ({}), {}",
                    group_thousands(self.done),
                    group_thousands(self.total),
                    percent(self.done, self.total),
                    format_rate(rate),
                );
            }
            None => {}
        }
    }

    pub fn finish(self, backend: &str) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
        let elapsed = self.started.elapsed();
        tracing::info!(
            messages = self.done,
            backend,
            "reindex complete: {} messages in {:.1} s, {}",
            group_thousands(self.done),
            elapsed.as_secs_f64(),
            format_rate(per_second(self.done - self.resumed, elapsed)),
        );
    }
}

fn per_second(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

/// `done` as a share of `total`, one decimal (`42.0%`); the total is counted at the
/// start, so messages created meanwhile can take it past 100%.
fn percent(done: u64, total: u64) -> String {
    if total == 0 {
        return "100%".into();
    }
    format!("{:.1}%", done as f64 * 100.0 / total as f64)
}

/// A rate for people: at most four significant digits, thousands grouped
/// (`12,340/s`, `987/s`, `46/s`), one decimal below 10 (`2.5/s`).
fn format_rate(per_sec: f64) -> String {
    if !per_sec.is_finite() || per_sec <= 0.0 {
        return "0/s".into();
    }
    if per_sec < 9.95 {
        return format!("{per_sec:.1}/s");
    }
    let digits = (per_sec.round() as u64).to_string().len() as u32;
    let unit = 10u64.pow(digits.saturating_sub(4));
    // From the exact rate, not the rounded integer: no double rounding (12,344.9 is 12,340).
    let rounded = (per_sec / unit as f64).round() as u64 * unit;
    format!("{}/s", group_thousands(rounded))
}

/// `1234567` as `1,234,567`.
fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_rounded_for_people() {
        assert_eq!(format_rate(12_345.6), "12,350/s");
        assert_eq!(format_rate(12_344.9), "12,340/s");
        assert_eq!(format_rate(1_234_567.0), "1,235,000/s");
        assert_eq!(format_rate(9_999.4), "9,999/s");
        assert_eq!(format_rate(99_996.0), "100,000/s");
        assert_eq!(format_rate(987.4), "987/s");
        assert_eq!(format_rate(45.6), "46/s");
        assert_eq!(format_rate(10.0), "10/s");
        assert_eq!(format_rate(9.96), "10/s");
        assert_eq!(format_rate(2.54), "2.5/s");
        assert_eq!(format_rate(0.04), "0.0/s");
        assert_eq!(format_rate(0.0), "0/s");
        assert_eq!(format_rate(f64::NAN), "0/s");
        assert_eq!(format_rate(f64::INFINITY), "0/s");
    }

    #[test]
    fn counts_are_grouped_and_shares_shown() {
        assert_eq!(group_thousands(0), "0");
        assert_eq!(group_thousands(999), "999");
        assert_eq!(group_thousands(1_000), "1,000");
        assert_eq!(group_thousands(1_234_567), "1,234,567");
        assert_eq!(percent(1, 3), "33.3%");
        assert_eq!(percent(0, 0), "100%");
        assert_eq!(per_second(100, Duration::ZERO), 0.0);
        assert_eq!(per_second(100, Duration::from_secs(4)), 25.0);
    }
}
