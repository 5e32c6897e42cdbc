//! The card tasks' inboxes of fraud labels, for label-delayed card windows,
//! read by the instance's [`AssignedReader`] of the card-labels topic. The
//! label tasks send each fraud label, and their progress, to every
//! card-labels partition; a task's inbox keeps the labels until the task
//! takes them, and what each label partition last said of its progress.
//!
//! A progress record comes after the labels its label task read before it,
//! so the progress read says which labels have come: a card task scores an
//! event at `t` once every label partition's progress has passed `t` (or
//! the partition is caught up and idle), and every label reported by then
//! has marked its row. A label partition not heard from holds the tasks
//! back for at most `merchant_wait_ms`, as the merchant table's sources do.

use super::assigned::{AssignedReader, Lease, Receiver};
use super::events::{CardLabel, MerchantEvent, Source};
use crate::features::Engine;
use crate::features::store::key_hash;
use crate::telemetry::log;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a label partition last said of its progress.
#[derive(Debug, Clone, Copy)]
struct Heard {
    /// The newest report time its task had read.
    watermark: i64,
    idle: bool,
    at: Instant,
    /// Read after the partition was first read to its end: said live, not
    /// read back from before a checkpoint (an idle word from then may be
    /// days old, from before the label tasks stopped).
    live: bool,
}

#[derive(Default)]
struct Inbox {
    /// Read and not yet taken, with their card-labels offsets.
    labels: Vec<(i64, CardLabel)>,
    sources: HashMap<i32, Heard>,
    /// Read to its end at least once since it was opened: records read
    /// since are live.
    caught_up: bool,
    /// The next card-labels offset to read.
    next: Option<i64>,
}

pub struct LabelInbox {
    inbox: Mutex<Inbox>,
    arrived: tokio::sync::Notify,
}

/// Where the label frontier stands, and which label partition holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelFrontier {
    /// Every label reported up to this time has come (`i64::MAX`: every
    /// label partition is caught up).
    pub time: i64,
    pub held_by: Option<i32>,
    /// Label partitions left out, silent for longer than the wait.
    pub silent: usize,
}

impl LabelInbox {
    /// An inbox whose partition is read from `from`.
    pub fn new(from: Option<i64>) -> LabelInbox {
        LabelInbox {
            inbox: Mutex::new(Inbox {
                next: from,
                ..Inbox::default()
            }),
            arrived: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The labels read since the last call, with their offsets.
    pub fn take(&self) -> Vec<(i64, CardLabel)> {
        std::mem::take(&mut self.lock().labels)
    }

    /// The next offset to read: where a restore resumes when the task
    /// holds no label.
    pub fn next(&self) -> Option<i64> {
        self.lock().next
    }

    /// The label frontier over `partitions` label partitions; one not
    /// heard from since `started`, or silent, holds it for `wait` at most.
    /// While the partition is `paused` nothing is heard, so each label
    /// partition stands at its last word, without the idle or silent ones
    /// left out.
    pub fn frontier(
        &self,
        partitions: i32,
        wait: Duration,
        started: Instant,
        paused: bool,
    ) -> LabelFrontier {
        let inbox = self.lock();
        let mut f = LabelFrontier {
            time: i64::MAX,
            held_by: None,
            silent: 0,
        };
        for s in 0..partitions {
            let at = match inbox.sources.get(&s) {
                None if paused || started.elapsed() < wait => i64::MIN,
                Some(h) if paused => h.watermark,
                None => {
                    f.silent += 1;
                    continue;
                }
                Some(h) if h.at.elapsed() >= wait => {
                    f.silent += 1;
                    continue;
                }
                Some(h) if h.idle && h.live => continue,
                Some(h) => h.watermark,
            };
            if at < f.time {
                f.time = at;
                f.held_by = Some(s);
            }
        }
        f
    }

    /// Resolves when a record arrives (or arrived since the last call).
    pub async fn arrived(&self) {
        self.arrived.notified().await
    }

    /// Where to read again from for the labels not yet taken, else the
    /// next offset.
    fn resume(&self) -> Option<i64> {
        let inbox = self.lock();
        inbox.labels.first().map(|(o, _)| *o).or(inbox.next)
    }
}

/// A card task's side of the labels: its inbox, and the labels whose
/// transaction is not in its state (yet).
pub struct LabelSide {
    inbox: Arc<LabelInbox>,
    lease: Lease,
    /// Labels whose row was not found, by (transaction time, card, offset):
    /// a transaction still to come takes its label as it is folded in
    /// ([`LabelSide::folded`]); the rest go once older than the lateness.
    held: BTreeSet<(i64, u64, i64)>,
    /// The partition is paused: the task holds [`MAX_HELD`] labels.
    paused: bool,
    partitions: i32,
    wait: Duration,
    started: Instant,
    silent_logged: bool,
}

/// Labels a card task holds before it pauses its card-labels partition
/// (a few MB).
const MAX_HELD: usize = 1 << 16;

impl LabelSide {
    /// Opens partition `p` of the card labels from `from`, for `partitions`
    /// label partitions, each of which holds the task back for `wait` at
    /// most while it is not heard from.
    pub fn start(
        reader: &Arc<AssignedReader>,
        p: i32,
        from: Option<i64>,
        partitions: i32,
        wait: Duration,
    ) -> anyhow::Result<LabelSide> {
        let inbox = Arc::new(LabelInbox::new(from));
        let lease = reader.open(p, from, inbox.clone())?;
        Ok(LabelSide {
            inbox,
            lease,
            held: BTreeSet::new(),
            paused: false,
            partitions,
            wait,
            started: Instant::now(),
            silent_logged: false,
        })
    }

    /// The label frontier: events up to its time may be scored once the
    /// labels come so far are applied ([`LabelSide::apply`], after this).
    pub fn frontier(&mut self, p: i32) -> LabelFrontier {
        let f = self
            .inbox
            .frontier(self.partitions, self.wait, self.started, self.paused);
        if f.silent > 0 && !self.silent_logged {
            log(
                "WARN",
                format_args!(
                    "input partition {p}: {} label partitions not heard from for {:?}; scoring \
                     without waiting for their labels until they are",
                    f.silent, self.wait
                ),
            );
        }
        self.silent_logged = f.silent > 0;
        f
    }

    /// Marks the rows of the labels come since the last call, holds those
    /// whose row is not there (a transaction still to come, or another
    /// partition's card), and drops the held ones older than the lateness,
    /// whose transaction can no longer come. How many were applied.
    pub fn apply(&mut self, engine: &mut Engine, lateness: i64) -> usize {
        let mut applied = 0;
        for (offset, label) in self.inbox.take() {
            if engine.label_card(label.card, label.time, true) {
                applied += 1;
            } else {
                self.held.insert((label.time, label.card, offset));
            }
        }
        let settled = engine.clock().watermark.saturating_sub(lateness);
        if self.held.first().is_some_and(|&(t, _, _)| t < settled) {
            self.held = self.held.split_off(&(settled, 0, i64::MIN));
        }
        applied
    }

    /// A transaction of card `card_id` at `t` was folded in: the labels
    /// held for it mark its row now, before the next event can read it.
    pub fn folded(&mut self, engine: &mut Engine, card_id: &str, t: i64) {
        if self.held.is_empty() {
            return;
        }
        let card = key_hash(card_id);
        let for_it: Vec<(i64, u64, i64)> = self
            .held
            .range((t, card, i64::MIN)..=(t, card, i64::MAX))
            .copied()
            .collect();
        if !for_it.is_empty() && engine.label_card(card, t, true) {
            for h in for_it {
                self.held.remove(&h);
            }
        }
    }

    /// Held labels are those of transactions still to come, and of other
    /// partitions' cards within the lateness: in a catch-up the reader
    /// runs ahead by the whole backlog, so it pauses at a bound, but never
    /// while the next event waits for the frontier, which only records
    /// read further on can move. Not under the engine's lock: it talks to
    /// the reader.
    pub fn bound_reading(&mut self, waiting: bool) {
        let pause = !waiting
            && if self.paused {
                self.held.len() > MAX_HELD / 2
            } else {
                self.held.len() >= MAX_HELD
            };
        if pause != self.paused {
            self.paused = pause;
            self.lease.pause(pause);
        }
    }

    /// Where a restore reads the labels again from: the first label held
    /// or not yet taken, else the next offset.
    pub fn resume(&self) -> Option<i64> {
        let held = self.held.iter().map(|&(_, _, o)| o).min();
        match (held, self.inbox.resume()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Resolves when a label or a label partition's progress arrives.
    pub async fn arrived(&self) {
        self.inbox.arrived().await
    }
}

impl Receiver for LabelInbox {
    fn receive(&self, offset: i64, payload: &[u8]) {
        let mut inbox = self.lock();
        inbox.next = Some(offset + 1);
        if let Some(MerchantEvent::Progress {
            source: Source::Labels(s),
            watermark,
            idle,
        }) = MerchantEvent::decode(payload)
        {
            let live = inbox.caught_up;
            inbox.sources.insert(
                s,
                Heard {
                    watermark,
                    idle,
                    at: Instant::now(),
                    live,
                },
            );
        } else if let Some(label) = CardLabel::decode(payload) {
            inbox.labels.push((offset, label));
        } else {
            log(
                "WARN",
                format_args!("card labels offset {offset}: not a card label; skipped"),
            );
            return;
        }
        drop(inbox);
        self.arrived.notify_one();
    }

    fn at_end(&self) {
        let mut inbox = self.lock();
        if !inbox.caught_up {
            inbox.caught_up = true;
            drop(inbox);
            self.arrived.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(s: i32, watermark: i64, idle: bool) -> Vec<u8> {
        MerchantEvent::Progress {
            source: Source::Labels(s),
            watermark,
            idle,
        }
        .encode()
    }

    #[test]
    fn the_frontier_is_the_slowest_label_partition() {
        let inbox = LabelInbox::new(Some(10));
        let started = Instant::now();
        let hour = Duration::from_secs(3600);
        let f = inbox.frontier(2, hour, started, false);
        assert_eq!((f.time, f.held_by), (i64::MIN, Some(0)), "none heard yet");
        inbox.receive(10, &progress(0, 500, false));
        let label = CardLabel {
            source: Source::Labels(1),
            offset: 3,
            card: 9,
            time: 400,
        };
        inbox.receive(11, &label.encode());
        inbox.receive(12, &progress(1, 450, false));
        assert_eq!(inbox.frontier(2, hour, started, false).time, 450);
        assert_eq!(inbox.take(), [(11, label)]);
        assert!(inbox.take().is_empty());
        // Idle counts only when said after the partition was read to its
        // end: an idle word read back from before a checkpoint may be from
        // before the label tasks stopped.
        inbox.receive(13, &progress(1, 450, true));
        assert_eq!(inbox.frontier(2, hour, started, false).time, 450);
        inbox.at_end();
        assert_eq!(inbox.frontier(2, hour, started, false).time, 450);
        inbox.receive(14, &progress(1, 450, true));
        let f = inbox.frontier(2, hour, started, false);
        assert_eq!((f.time, f.held_by), (500, Some(0)));
        assert_eq!(inbox.next(), Some(15));
        // A partition silent for longer than the wait is left out, unless
        // the task paused the reading: then each stands at its last word.
        let f = inbox.frontier(3, Duration::ZERO, started, false);
        assert_eq!((f.time, f.silent), (i64::MAX, 3));
        let f = inbox.frontier(3, Duration::ZERO, started, true);
        assert_eq!((f.time, f.held_by, f.silent), (i64::MIN, Some(2), 0));
        let f = inbox.frontier(2, Duration::ZERO, started, true);
        assert_eq!((f.time, f.held_by), (450, Some(1)));
        inbox.receive(15, b"junk");
        assert_eq!(inbox.next(), Some(16), "skipped, not read again");
    }
}
