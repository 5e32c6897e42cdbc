//! The card tasks' inboxes of entity values: one reader per instance reads
//! the entity-features partitions of its card tasks (by assignment,
//! outside the groups, as a restore reads a changelog), and each task's
//! inbox holds each event's values, by input offset, until it scores the
//! event. Each partition is read through a [`StartGuard`], as every other
//! positioned read is: a restored task starts inside a stored batch.

use super::changelog::{Quiet, StartGuard, Take, watermarks};
use super::events::EntityColumns;
use super::kafka::Topics;
use crate::config::Settings;
use crate::features::declared::{EntityValues, MAX_ENTITIES};
use crate::telemetry::log;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One event's values as they came: per entity, and the first
/// entity-features offset that carried one of them.
struct Arrived {
    values: EntityValues,
    first_offset: i64,
}

#[derive(Default)]
struct Held {
    by_input_offset: HashMap<i64, Arrived>,
    /// The next entity-features offset to read.
    next: Option<i64>,
}

type Inboxes = Mutex<HashMap<i32, Arc<EntityInbox>>>;

/// One instance's reader of the entity-features topic: the partitions of
/// its card tasks are added and removed as the tasks start and stop, and
/// each record goes to its partition's inbox. One client for the instance,
/// however many partitions it holds.
pub struct EntityInboxes {
    reader: Arc<BaseConsumer>,
    topic: String,
    inboxes: Arc<Inboxes>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A card task's inbox: each event's values, by input offset, until the
/// task scores the event.
pub struct EntityInbox {
    held: Mutex<Held>,
    arrived: tokio::sync::Notify,
    /// The reader thread's own: where the partition was positioned, and
    /// what it last gave.
    fetch: Mutex<Fetch>,
}

struct Fetch {
    guard: StartGuard,
    heard_at: Instant,
    /// The next offset when a quiet check last found the partition below
    /// its high watermark.
    quiet_below: Option<i64>,
    seeking_logged: bool,
}

/// A partition quiet this long has its watermarks checked: still looking
/// for its first record, or read to a fetch that gives nothing below the
/// high watermark (see [`StartGuard`]).
const QUIET: Duration = Duration::from_secs(1);

/// A card task's hold on its inbox: dropped, the partition is no longer read.
pub struct InboxLease {
    pub inbox: Arc<EntityInbox>,
    inboxes: Arc<EntityInboxes>,
    partition: i32,
}

impl Drop for InboxLease {
    fn drop(&mut self) {
        self.inboxes.close(self.partition, &self.inbox);
    }
}

impl EntityInboxes {
    pub fn start(settings: &Settings, topics: &Topics) -> anyhow::Result<Arc<EntityInboxes>> {
        let reader = Arc::new(super::kafka::reader(settings, &topics.cards_group)?);
        let inboxes: Arc<Inboxes> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (reader, inboxes, stop) = (reader.clone(), inboxes.clone(), stop.clone());
            let topic = topics.entity_features.clone();
            std::thread::Builder::new()
                .name("entity-inboxes".into())
                .spawn(move || read(&reader, &topic, &inboxes, &stop))?
        };
        Ok(Arc::new(EntityInboxes {
            reader,
            topic: topics.entity_features.clone(),
            inboxes,
            stop,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Starts reading partition `p` from `from` (the beginning if none)
    /// into a new inbox.
    pub fn open(self: &Arc<Self>, p: i32, from: Option<i64>) -> anyhow::Result<InboxLease> {
        let inbox = Arc::new(EntityInbox {
            held: Mutex::default(),
            arrived: tokio::sync::Notify::new(),
            fetch: Mutex::new(Fetch {
                // The partition's first offset is not asked for here, on the
                // task's thread: values are read back only days, not a
                // retention period, so `from` is never below it.
                guard: StartGuard::new(from, None),
                heard_at: Instant::now(),
                quiet_below: None,
                seeking_logged: false,
            }),
        });
        inbox.lock().next = from;
        self.inboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p, inbox.clone());
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            &self.topic,
            p,
            from.map_or(Offset::Beginning, Offset::Offset),
        )?;
        self.reader.incremental_assign(&tpl)?;
        Ok(InboxLease {
            inbox,
            inboxes: self.clone(),
            partition: p,
        })
    }

    fn close(&self, p: i32, inbox: &Arc<EntityInbox>) {
        let mut inboxes = self.inboxes.lock().unwrap_or_else(|e| e.into_inner());
        // A task of the partition started since (a quick reassignment) keeps it.
        if inboxes.get(&p).is_some_and(|i| Arc::ptr_eq(i, inbox)) {
            inboxes.remove(&p);
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.topic, p);
            if let Err(e) = self.reader.incremental_unassign(&tpl) {
                log("WARN", format_args!("entity features {p}: {e}"));
            }
        }
    }

    /// Stops the reader.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl EntityInbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fetch_state(&self) -> std::sync::MutexGuard<'_, Fetch> {
        self.fetch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether every entity of `mask` has sent the event's values.
    pub fn has(&self, input_offset: i64, mask: u8) -> bool {
        self.lock()
            .by_input_offset
            .get(&input_offset)
            .is_some_and(|a| a.values.came() & mask == mask)
    }

    /// The entities whose values came for the event at `input_offset`.
    pub fn came(&self, input_offset: i64) -> u8 {
        self.lock()
            .by_input_offset
            .get(&input_offset)
            .map_or(0, |a| a.values.came())
    }

    /// The event's values, taken out; `None` for an entity that sent none.
    pub fn take(&self, input_offset: i64) -> EntityValues {
        self.lock()
            .by_input_offset
            .remove(&input_offset)
            .map(|a| a.values)
            .unwrap_or_default()
    }

    /// Drops what came for events up to `input_offset`, scored already
    /// (values sent again after a restart, or after their wait ran out).
    pub fn forget_through(&self, input_offset: i64) {
        self.lock().by_input_offset.retain(|&o, _| o > input_offset);
    }

    /// Where to read again from for the events after `input_offset`: the
    /// first offset that carried a value of one of them, else the next.
    pub fn resume_for(&self, input_offset: i64) -> Option<i64> {
        let held = self.lock();
        held.by_input_offset
            .iter()
            .filter(|(o, _)| **o > input_offset)
            .map(|(_, a)| a.first_offset)
            .min()
            .or(held.next)
    }

    fn receive(&self, features_offset: i64, c: EntityColumns) {
        let mut h = self.lock();
        h.next = Some(features_offset + 1);
        let Some(k) = (c.entity as usize)
            .checked_sub(1)
            .filter(|&k| k < MAX_ENTITIES)
        else {
            return;
        };
        let a = h
            .by_input_offset
            .entry(c.offset)
            .or_insert_with(|| Arrived {
                values: EntityValues::default(),
                first_offset: features_offset,
            });
        a.values.0[k] = Some(c.values);
        drop(h);
        self.arrived.notify_one();
    }

    /// Resolves when values arrive (or arrived since the last call).
    pub async fn arrived(&self) {
        self.arrived.notified().await
    }
}

fn read(reader: &BaseConsumer, topic: &str, inboxes: &Inboxes, stop: &AtomicBool) {
    let mut checked = Instant::now();
    while !stop.load(Ordering::Acquire) {
        if checked.elapsed() >= QUIET {
            checked = Instant::now();
            check_quiet(reader, topic, inboxes);
        }
        let Some(result) = reader.poll(Duration::from_millis(100)) else {
            continue;
        };
        let msg = match result {
            Ok(m) => m,
            Err(rdkafka::error::KafkaError::PartitionEOF(_)) => continue,
            Err(e) => {
                log("WARN", format_args!("entity features: {e}"));
                continue;
            }
        };
        let p = msg.partition();
        let Some(inbox) = inbox_of(inboxes, p) else {
            continue;
        };
        let take = {
            let mut f = inbox.fetch_state();
            f.heard_at = Instant::now();
            f.quiet_below = None;
            f.guard.take(msg.offset())
        };
        match take {
            Take::Yes => {}
            Take::Skip => continue,
            Take::SeekTo(o) => {
                log_seeking_back(&inbox, topic, p, &format!("offset {}", msg.offset()));
                seek(reader, topic, p, o);
                continue;
            }
        }
        let Some(c) = msg.payload().and_then(EntityColumns::decode) else {
            log(
                "WARN",
                format_args!(
                    "entity features {}/{} offset {}: not entity values; skipped",
                    msg.topic(),
                    msg.partition(),
                    msg.offset()
                ),
            );
            continue;
        };
        inbox.receive(msg.offset(), c);
    }
}

fn inbox_of(inboxes: &Inboxes, p: i32) -> Option<Arc<EntityInbox>> {
    inboxes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&p)
        .cloned()
}

/// For each partition quiet for [`QUIET`] with records on the broker past
/// it: seeks back for the batch that holds its start, or, read past its
/// start and quiet at the same offset for two checks, positions it there
/// again. Against Kafka a partition below its high watermark keeps giving
/// records, and neither happens.
fn check_quiet(reader: &BaseConsumer, topic: &str, inboxes: &Inboxes) {
    let open: Vec<(i32, Arc<EntityInbox>)> = inboxes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(p, i)| (*p, i.clone()))
        .collect();
    for (p, inbox) in open {
        if inbox.fetch_state().heard_at.elapsed() < QUIET {
            continue;
        }
        let Ok((low, high)) = watermarks(reader, topic, p, Duration::from_secs(5)) else {
            continue;
        };
        let mut f = inbox.fetch_state();
        let to = match f.guard.when_quiet(true, low, high) {
            Quiet::SeekBack(o) => {
                drop(f);
                log_seeking_back(&inbox, topic, p, "nothing");
                f = inbox.fetch_state();
                o
            }
            Quiet::Below(at) if f.quiet_below == Some(at) => {
                log(
                    "WARN",
                    format_args!(
                        "{topic}/{p}: nothing read at offset {at}, below the high watermark \
                         {high}, for two checks; positioning there again"
                    ),
                );
                f.quiet_below = None;
                f.guard = StartGuard::new(Some(at), Some(low));
                f.seeking_logged = false;
                at
            }
            Quiet::Below(at) => {
                f.quiet_below = Some(at);
                continue;
            }
            Quiet::End | Quiet::Wait | Quiet::Behind => continue,
        };
        f.heard_at = Instant::now();
        drop(f);
        seek(reader, topic, p, to);
    }
}

fn log_seeking_back(inbox: &EntityInbox, topic: &str, p: i32, read: &str) {
    let mut f = inbox.fetch_state();
    if !f.seeking_logged {
        f.seeking_logged = true;
        log(
            "INFO",
            format_args!(
                "{topic}/{p}: read {read} first; seeking back for the batch that holds the start"
            ),
        );
    }
}

fn seek(reader: &BaseConsumer, topic: &str, p: i32, to: i64) {
    // Right after an assignment the fetcher may not have started the
    // partition yet, and a seek is refused: try again shortly.
    let mut last = None;
    for _ in 0..20 {
        match reader.seek(topic, p, Offset::Offset(to), Duration::from_secs(5)) {
            Ok(()) => return,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(e) = last {
        log(
            "WARN",
            format_args!("entity features {topic}/{p}: cannot seek to {to}: {e}"),
        );
    }
}
