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
use crate::telemetry::log;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a label partition last said of its progress.
#[derive(Debug, Clone, Copy)]
struct Heard {
    /// The newest report time its task had read.
    watermark: i64,
    idle: bool,
    at: Instant,
}

#[derive(Default)]
struct Inbox {
    /// Read and not yet taken, with their card-labels offsets.
    labels: Vec<(i64, CardLabel)>,
    sources: HashMap<i32, Heard>,
    /// Read to its end at least once since it was opened: records read
    /// since are live, so an idle label partition's word can be trusted
    /// (one read back from a checkpoint may be days old).
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
    pub fn frontier(&self, partitions: i32, wait: Duration, started: Instant) -> LabelFrontier {
        let inbox = self.lock();
        let mut f = LabelFrontier {
            time: i64::MAX,
            held_by: None,
            silent: 0,
        };
        for s in 0..partitions {
            let at = match inbox.sources.get(&s) {
                None if started.elapsed() < wait => i64::MIN,
                None => {
                    f.silent += 1;
                    continue;
                }
                Some(h) if h.at.elapsed() >= wait => {
                    f.silent += 1;
                    continue;
                }
                Some(h) if h.idle && inbox.caught_up => continue,
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
    held: Vec<HeldLabel>,
    /// The partition is paused: the task holds [`MAX_HELD`] labels.
    paused: bool,
    partitions: i32,
    wait: Duration,
    started: Instant,
    /// The engine's watermark at the last [`LabelSide::apply`].
    applied_at: i64,
    silent_logged: bool,
}

/// Labels a card task holds before it pauses its card-labels partition
/// (about 2.5 MB).
const MAX_HELD: usize = 1 << 16;

struct HeldLabel {
    offset: i64,
    label: CardLabel,
    /// Tried once the engine's watermark passed its time.
    crossed: bool,
}

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
            held: Vec::new(),
            paused: false,
            partitions,
            wait,
            started: Instant::now(),
            applied_at: i64::MIN,
            silent_logged: false,
        })
    }

    /// The label frontier: events up to its time may be scored once the
    /// labels come so far are applied ([`LabelSide::apply`], after this).
    pub fn frontier(&mut self, p: i32) -> LabelFrontier {
        let f = self
            .inbox
            .frontier(self.partitions, self.wait, self.started);
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

    /// Marks the rows of the labels come since the last call, and of those
    /// held whose transaction may be in the state now; drops a label once
    /// its transaction can no longer come (older than the lateness): the
    /// card is another partition's, or the transaction was never seen.
    /// Each label is tried at most three times. How many were applied.
    ///
    /// `waiting`: whether the task's next event waits for the frontier.
    pub fn apply(&mut self, engine: &mut Engine, lateness: i64, waiting: bool) -> usize {
        let came = self.inbox.take();
        let watermark = engine.clock().watermark;
        if came.is_empty() && watermark == self.applied_at {
            self.bound_reading(waiting);
            return 0;
        }
        self.applied_at = watermark;
        let mut applied = 0;
        for (offset, label) in came {
            if engine.label_card(label.card, label.time, true) {
                applied += 1;
            } else {
                self.held.push(HeldLabel {
                    offset,
                    label,
                    crossed: label.time <= watermark,
                });
            }
        }
        let settled = watermark.saturating_sub(lateness);
        self.held.retain_mut(|h| {
            let t = h.label.time;
            let due = (!h.crossed && t <= watermark) || t < settled;
            if !due {
                return true;
            }
            h.crossed = true;
            if engine.label_card(h.label.card, t, true) {
                applied += 1;
                return false;
            }
            t >= settled
        });
        self.bound_reading(waiting);
        applied
    }

    /// Held labels are those of transactions still to come, and of other
    /// partitions' cards within the lateness: in a catch-up the reader
    /// runs ahead by the whole backlog, so it pauses at a bound, but never
    /// while the next event waits for the frontier, which only records
    /// read further on can move.
    fn bound_reading(&mut self, waiting: bool) {
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
        let held = self.held.iter().map(|h| h.offset).min();
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
            inbox.sources.insert(
                s,
                Heard {
                    watermark,
                    idle,
                    at: Instant::now(),
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
        let f = inbox.frontier(2, hour, started);
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
        assert_eq!(inbox.frontier(2, hour, started).time, 450);
        assert_eq!(inbox.take(), [(11, label)]);
        assert!(inbox.take().is_empty());
        // Idle counts once the partition was read to its end: an idle word
        // read back from a checkpoint may be old.
        inbox.receive(13, &progress(1, 450, true));
        assert_eq!(inbox.frontier(2, hour, started).time, 450);
        inbox.at_end();
        let f = inbox.frontier(2, hour, started);
        assert_eq!((f.time, f.held_by), (500, Some(0)));
        assert_eq!(inbox.next(), Some(14));
        // A partition silent for longer than the wait is left out.
        let f = inbox.frontier(3, Duration::ZERO, started);
        assert_eq!((f.time, f.silent), (i64::MAX, 3));
        inbox.receive(14, b"junk");
        assert_eq!(inbox.next(), Some(15), "skipped, not read again");
    }
}
