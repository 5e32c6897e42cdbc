//! What readiness knows besides assignment and restores: whether the
//! brokers answer, whether the producer delivers, and whether each running
//! input partition finishes what it reads.
//!
//! Each signal is written where it is seen (a client's statistics, a
//! produce call, a partition task and its acker) and read by `/readyz`, so
//! every field is an atomic or a lock held only to copy a value.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Health {
    started: Instant,
    brokers_down: AtomicBool,
    /// Set while a produce error persists; the lock is taken only when it
    /// changes, so a healthy producer costs one atomic load per send.
    producing_failed: AtomicBool,
    produce_error: Mutex<Option<String>>,
    partitions: Mutex<BTreeMap<i32, Arc<Progress>>>,
}

impl Health {
    pub fn new() -> Health {
        Health {
            started: Instant::now(),
            brokers_down: AtomicBool::new(false),
            producing_failed: AtomicBool::new(false),
            produce_error: Mutex::new(None),
            partitions: Mutex::new(BTreeMap::new()),
        }
    }

    /// What a client's statistics or its error callback say of the brokers.
    pub fn set_brokers_reachable(&self, up: bool) {
        self.brokers_down.store(!up, Ordering::Release);
    }

    pub fn brokers_down(&self) -> bool {
        self.brokers_down.load(Ordering::Acquire)
    }

    /// A produce error other than a full queue: not ready until a send or
    /// a delivery succeeds.
    pub fn produce_failed(&self, why: String) {
        *self.produce_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        self.producing_failed.store(true, Ordering::Release);
    }

    pub fn produced(&self) {
        // Called for every delivery: a read, so that ackers on many cores
        // do not write the same cache line while all is well.
        if self.producing_failed.load(Ordering::Acquire)
            && self.producing_failed.swap(false, Ordering::AcqRel)
        {
            *self.produce_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    pub fn produce_error(&self) -> Option<String> {
        if !self.producing_failed.load(Ordering::Acquire) {
            return None;
        }
        self.produce_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A new record of a partition's progress, from `done` (the last
    /// offset finished before it runs).
    pub fn progress(&self, done: i64) -> Arc<Progress> {
        let now = self.millis();
        Arc::new(Progress {
            started: self.started,
            read: AtomicI64::new(done),
            done: AtomicI64::new(done),
            since_ms: AtomicU64::new(now),
            unread_since_ms: AtomicU64::new(0),
        })
    }

    pub fn add_partition(&self, partition: i32, progress: Arc<Progress>) {
        self.lock_partitions().insert(partition, progress);
    }

    pub fn remove_partition(&self, partition: i32) {
        self.lock_partitions().remove(&partition);
    }

    /// The running partitions that have held records unfinished for at
    /// least `limit`, with how long.
    pub fn stalled(&self, limit: Duration) -> Vec<(i32, Duration)> {
        self.lock_partitions()
            .iter()
            .filter_map(|(&p, progress)| {
                progress
                    .stalled_for()
                    .filter(|d| *d >= limit)
                    .map(|d| (p, d))
            })
            .collect()
    }

    fn lock_partitions(&self) -> std::sync::MutexGuard<'_, BTreeMap<i32, Arc<Progress>>> {
        self.partitions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn millis(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

/// How far one input partition has read and finished (scored, its output
/// acknowledged). Records read and none finished for long mean the
/// partition is stuck: on the producer, the merchant table or a bug.
#[derive(Debug)]
pub struct Progress {
    started: Instant,
    read: AtomicI64,
    done: AtomicI64,
    /// Since when records have waited: the last finish, or the moment the
    /// partition fell behind after it had caught up.
    since_ms: AtomicU64,
    /// Since when records on the broker have waited with nothing read,
    /// plus one (0: none): a fetch that is stuck holds no record read, so
    /// `read` and `done` alone would never tell.
    unread_since_ms: AtomicU64,
}

impl Progress {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A record at `offset` was read.
    pub fn read(&self, offset: i64) {
        let before = self.read.swap(offset, Ordering::AcqRel);
        if before <= self.done.load(Ordering::Acquire) {
            self.since_ms.store(self.now(), Ordering::Release);
        }
    }

    /// Everything through `offset` is finished.
    pub fn done(&self, offset: i64) {
        self.done.store(offset, Ordering::Release);
        self.since_ms.store(self.now(), Ordering::Release);
    }

    /// Records on the broker have waited unread since `since` (see
    /// [`crate::serve::partition::PartitionInput::unread_since`]), or none do.
    pub fn unread(&self, since: Option<Instant>) {
        let ms = since.map_or(0, |t| {
            t.saturating_duration_since(self.started).as_millis() as u64 + 1
        });
        self.unread_since_ms.store(ms, Ordering::Release);
    }

    /// How long records have waited with none finished, if any wait:
    /// records read and not finished, or records on the broker not read.
    pub fn stalled_for(&self) -> Option<Duration> {
        let now = self.now();
        let behind = self.read.load(Ordering::Acquire) > self.done.load(Ordering::Acquire);
        let finishing = behind.then(|| now.saturating_sub(self.since_ms.load(Ordering::Acquire)));
        let unread = match self.unread_since_ms.load(Ordering::Acquire) {
            0 => None,
            since => Some(now.saturating_sub(since - 1)),
        };
        finishing.max(unread).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A partition whose fetch is stuck reads nothing, so nothing is
    /// read and unfinished: the records waiting on the broker count.
    #[test]
    fn records_left_unread_on_the_broker_count_as_a_stall() {
        let h = Health::new();
        let p = h.progress(9);
        h.add_partition(2, p.clone());
        assert!(h.stalled(Duration::ZERO).is_empty());
        p.unread(Some(Instant::now()));
        assert_eq!(h.stalled(Duration::ZERO).len(), 1);
        assert!(
            h.stalled(Duration::from_secs(60)).is_empty(),
            "not for long yet"
        );
        p.unread(None);
        assert!(h.stalled(Duration::ZERO).is_empty(), "read again");
    }

    #[test]
    fn a_partition_is_stalled_only_while_records_wait() {
        let h = Health::new();
        let p = h.progress(9);
        h.add_partition(3, p.clone());
        assert!(p.stalled_for().is_none(), "nothing read yet");
        p.read(10);
        assert!(p.stalled_for().is_some());
        assert_eq!(h.stalled(Duration::ZERO).len(), 1);
        assert!(h.stalled(Duration::from_secs(3600)).is_empty());
        p.done(10);
        assert!(p.stalled_for().is_none());
        assert!(h.stalled(Duration::ZERO).is_empty());
        h.remove_partition(3);
        p.read(11);
        assert!(h.stalled(Duration::ZERO).is_empty(), "removed");
    }

    #[test]
    fn a_produce_error_lasts_until_a_success() {
        let h = Health::new();
        assert!(h.produce_error().is_none());
        h.produce_failed("MessageSizeTooLarge".into());
        assert_eq!(h.produce_error().as_deref(), Some("MessageSizeTooLarge"));
        h.produced();
        assert!(h.produce_error().is_none());
    }
}
