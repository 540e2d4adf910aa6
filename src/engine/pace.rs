//! `AckFirst`'s pace: how many records of a partition are committed ahead of its handler.
//!
//! Invariant (SPEC 3.4): a partition's records committed but not yet handed to its handler are at most two
//! runs, and a run is what the handler gets through in half a commit interval at the pace it was last
//! measured at (between [`MIN_RUN`] and the cap the engine gives). So a crash loses about one commit
//! interval's worth of the handler's work (plus the calls in flight), whatever the handler's speed: with a
//! 1 ms handler and the default 100 ms interval, about 100 messages, not the 16,384 a fixed run allowed.
//!
//! The pace is measured while the partition is *busy* (a call in flight or a record dispatchable): time
//! spent waiting for a commit to be confirmed, or for records to arrive, is left out. A measure over wall
//! time would count a run's commit round trip as slowness, shrink the next run, and lengthen the wait
//! again (on a broker with a slow commit, that spirals down to the smallest run). Left out, the run is the
//! handler's own pace times the window, and a fast handler reaches the cap within the first window.

use std::time::Duration;

use tokio::time::Instant;

/// The smallest run: a pipeline that just started, or a handler that takes seconds.
pub(super) const MIN_RUN: usize = 16;

/// How often the pace is measured again (wall time).
const WINDOW: Duration = Duration::from_millis(10);

/// One partition's handler pace under `AckFirst`, and the run size it gives.
#[derive(Debug)]
pub(super) struct Pace {
    run: usize,
    /// Start of the current measuring window.
    since: Instant,
    /// Records dispatched in this window.
    dispatched: usize,
    /// Time in this window the partition had nothing to dispatch and nothing in flight.
    idle: Duration,
    /// Since when it is idle, if it is.
    idle_since: Option<Instant>,
}

impl Pace {
    pub(super) fn new(now: Instant) -> Self {
        Pace {
            run: MIN_RUN,
            since: now,
            dispatched: 0,
            idle: Duration::ZERO,
            idle_since: None,
        }
    }

    /// `n` records were dispatched at `now`: the partition is busy.
    pub(super) fn dispatched(&mut self, n: usize, now: Instant) {
        self.busy(now);
        self.dispatched += n;
    }

    /// The partition has work again (a call in flight or a record dispatchable) at `now`.
    pub(super) fn busy(&mut self, now: Instant) {
        if let Some(since) = self.idle_since.take() {
            self.idle += now.saturating_duration_since(since.max(self.since));
        }
    }

    /// The partition has nothing in flight and nothing it may dispatch at `now`.
    pub(super) fn idle(&mut self, now: Instant) {
        self.idle_since.get_or_insert(now);
    }

    /// The run as last measured, between 1 and `cap`.
    pub(super) fn current(&self, cap: usize) -> usize {
        self.run.min(cap).max(1)
    }

    /// The run to commit ahead now: `window` (half the commit interval) of the handler's measured pace,
    /// between [`MIN_RUN`] and `cap`.
    pub(super) fn run(&mut self, now: Instant, window: Duration, cap: usize) -> usize {
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed >= WINDOW {
            let idle_now = self
                .idle_since
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s.max(self.since)));
            let busy = elapsed.saturating_sub(self.idle + idle_now);
            // A window with no busy time and no dispatch says nothing about the handler: the run stays.
            // Dispatches in no measurable busy time are a handler faster than the instants the engine
            // stamps its rounds with: as fast as it gets, so the cap.
            if self.dispatched > 0 {
                self.run = if busy.is_zero() {
                    cap.max(MIN_RUN)
                } else {
                    let per_window = self.dispatched as f64 * window.as_secs_f64() / busy.as_secs_f64();
                    (per_window.ceil() as usize).max(MIN_RUN)
                };
            }
            self.since = now;
            self.dispatched = 0;
            self.idle = Duration::ZERO;
            if self.idle_since.is_some() {
                self.idle_since = Some(now);
            }
        }
        self.current(cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HALF_INTERVAL: Duration = Duration::from_millis(50);

    /// A partition whose handler takes `per` a record, fed without end, whose commits take `rtt`: runs
    /// `rounds` runs and returns the run sizes.
    fn simulate(per: Duration, rtt: Duration, cap: usize, rounds: usize) -> Vec<usize> {
        let mut now = Instant::now();
        let mut pace = Pace::new(now);
        let mut runs = Vec::new();
        for _ in 0..rounds {
            let run = pace.run(now, HALF_INTERVAL, cap);
            runs.push(run);
            // Waits for the run's commit, then handles it.
            pace.idle(now);
            now += rtt;
            pace.dispatched(run, now);
            now += per * run as u32;
        }
        runs
    }

    #[test]
    fn a_slow_handler_gets_runs_of_half_an_interval_of_its_work() {
        let runs = simulate(Duration::from_millis(1), Duration::from_millis(3), 8192, 40);
        let last = *runs.last().unwrap();
        // 1 ms a record, 50 ms a run: 50 (measured over busy time only, so the commit wait does not count).
        assert!((45..=55).contains(&last), "runs {runs:?}");
    }

    #[test]
    fn a_fast_handler_reaches_the_cap_within_a_few_windows() {
        let runs = simulate(Duration::from_micros(1), Duration::from_millis(2), 8192, 10);
        let at = runs.iter().position(|r| *r == 8192).expect("reaches the cap");
        assert!(at <= 5, "runs {runs:?}");
    }

    #[test]
    fn a_slow_commit_does_not_shrink_the_run() {
        // A commit round trip far longer than a run's handling: the pace is the handler's own.
        let runs = simulate(Duration::from_micros(100), Duration::from_millis(80), 8192, 30);
        let last = *runs.last().unwrap();
        assert!((450..=550).contains(&last), "runs {runs:?}");
    }

    #[test]
    fn work_done_between_two_reads_of_the_clock_still_grows_the_run() {
        // The engine stamps a round's dispatches with the round's start: a fast handler's whole run can
        // fall between two stamps, so its busy time measures zero. The run must still grow (it stayed at
        // the smallest run once, and AckFirst on Kafka ran at 5% of its speed).
        let mut now = Instant::now();
        let mut pace = Pace::new(now);
        let mut runs = Vec::new();
        for _ in 0..20 {
            let run = pace.run(now, HALF_INTERVAL, 8192);
            runs.push(run);
            pace.dispatched(run, now);
            pace.idle(now);
            now += Duration::from_millis(2); // the commit's round trip
        }
        assert_eq!(*runs.last().unwrap(), 8192, "runs {runs:?}");
    }

    #[test]
    fn idle_time_between_records_is_left_out() {
        let t0 = Instant::now();
        let mut pace = Pace::new(t0);
        // 10 records in 1 ms of work, then 99 ms with nothing to do.
        pace.dispatched(10, t0);
        pace.idle(t0 + Duration::from_millis(1));
        let run = pace.run(t0 + Duration::from_millis(100), HALF_INTERVAL, 8192);
        assert_eq!(run, 500, "10 records a millisecond, for 50 ms");
    }

    proptest! {
        /// Whatever the handler's speed and the commit's round trip, a run never exceeds the cap or goes
        /// below 1, and once settled it is half a commit interval of the handler's own work (two runs
        /// ahead: at most a commit interval's worth), within rounding.
        #[test]
        fn the_run_follows_the_handler(per_us in 1u64..20_000, rtt_ms in 0u64..200, cap in 1usize..20_000) {
            let per = Duration::from_micros(per_us);
            let runs = simulate(per, Duration::from_millis(rtt_ms), cap, 60);
            for r in &runs {
                prop_assert!(*r >= 1 && *r <= cap);
            }
            let last = *runs.last().unwrap();
            let ideal = (HALF_INTERVAL.as_secs_f64() / per.as_secs_f64()).ceil() as usize;
            let expected = ideal.max(MIN_RUN).min(cap);
            prop_assert!(last.abs_diff(expected) <= expected / 10 + 1, "runs {:?}, expected {}", runs, expected);
        }
    }
}
