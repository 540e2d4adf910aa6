//! Commits: the cadence of offset commits, one in flight at a time.

use super::*;

pub(super) const COMMIT_RETRY: Duration = Duration::from_millis(200);

pub(super) struct InFlightCommit {
    pub(super) commits: Commits,
    pub(super) future: BoxFuture<'static, Result<(), BrokerError>>,
}

impl<T: ConsumerTransport> Engine<T> {
    // ---- commits -------------------------------------------------------------------------------------

    pub(super) fn note_settles(&mut self, n: usize, urgent: bool) {
        if !self.commits_enabled {
            return;
        }
        self.settles_since_commit = self.settles_since_commit.saturating_add(n);
        let urgent = urgent || self.rt.cfg.commit_sync_each;
        if !urgent && self.commit_due.is_some() {
            return; // an earlier settle already set a due time, and time only moves on
        }
        let due = if urgent {
            Instant::now()
        } else {
            Instant::now() + self.rt.cfg.commit_interval
        };
        self.commit_due = Some(self.commit_due.map_or(due, |d| d.min(due)));
    }

    pub(super) fn maybe_commit(&mut self) {
        if !self.commits_enabled || self.commit.is_some() {
            return;
        }
        let Some(due) = self.commit_due else { return };
        let now_due = due <= Instant::now() || self.settles_since_commit >= self.rt.cfg.commit_every;
        if !now_due {
            return;
        }
        self.commit_due = None;
        self.settles_since_commit = 0;
        let commits = self.tracker.take_commits();
        if commits.is_empty() {
            return;
        }
        let future = self.transport.commit(commits.clone());
        self.commit = Some(InFlightCommit { commits, future });
    }

    pub(super) fn on_commit_done(&mut self, r: Result<(), BrokerError>) {
        let Some(done) = self.commit.take() else { return };
        match r {
            Ok(()) => {
                self.rt.counters.committed(true);
                self.tracker.confirm(&done.commits);
                self.observe_commits(&done.commits);
            }
            Err(e) => {
                self.rt.counters.committed(false);
                tracing::warn!(subscriber = %self.rt.cfg.name, error = %e, "commit failed; retrying");
                self.tracker.commit_failed(&done.commits);
                let retry = Instant::now() + COMMIT_RETRY;
                self.commit_due = Some(self.commit_due.map_or(retry, |d| d.max(retry)));
            }
        }
    }

    pub(super) fn observe_commits(&self, commits: &Commits) {
        for (tp, offset) in commits {
            self.rt.observe(|| Event::Committed {
                subscriber: self.rt.cfg.name.clone(),
                tp: tp.clone(),
                offset: *offset,
            });
        }
    }
}
