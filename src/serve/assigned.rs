//! One instance's reader of a topic whose partitions its card tasks read by
//! assignment, outside the groups, as a restore reads a changelog: the
//! entity values and the card labels. A task opens its partition from where
//! its checkpoint says, and each record goes to the task's receiver, in
//! offset order, once. One client for the instance, however many
//! partitions it holds. Each partition is read through a [`StartGuard`],
//! as every other positioned read is: a restored task starts inside a
//! stored batch.

use super::changelog::{Quiet, StartGuard, Take, watermarks};
use crate::config::Settings;
use crate::telemetry::log;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a task does with its partition's records.
pub trait Receiver: Send + Sync + 'static {
    /// A record, in offset order, once.
    fn receive(&self, offset: i64, payload: &[u8]);
    /// The partition is read to its end, for now.
    fn at_end(&self) {}
}

/// A partition open for a task.
struct Open {
    receiver: Arc<dyn Receiver>,
    fetch: Mutex<Fetch>,
}

/// Where the partition was positioned, and what it last gave.
struct Fetch {
    guard: StartGuard,
    heard_at: Instant,
    /// The next offset when a quiet check last found the partition below
    /// its high watermark.
    quiet_below: Option<i64>,
    seeking_logged: bool,
    /// Paused by its task: quiet on purpose.
    paused: bool,
    /// Where the reader thread is to position it (after a resume).
    seek_to: Option<i64>,
}

type Partitions = Mutex<HashMap<i32, Arc<Open>>>;

pub struct AssignedReader {
    reader: Arc<BaseConsumer>,
    topic: String,
    open: Arc<Partitions>,
    /// A partition has a `seek_to` for the reader thread.
    seeks: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A task's hold on its partition: dropped, the partition is no longer read.
pub struct Lease {
    reader: Arc<AssignedReader>,
    partition: i32,
    open: Arc<Open>,
}

impl Lease {
    /// Stops fetching the partition, or starts again: a task that holds
    /// enough records it cannot use yet pauses it until it can.
    pub fn pause(&self, paused: bool) {
        let r = &self.reader;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&r.topic, self.partition);
        let mut f = lock(&self.open.fetch);
        f.paused = paused;
        f.heard_at = Instant::now();
        // Positioned again where it stopped, through the start guard, by
        // the reader thread (a seek blocks): a fetch that resumes inside a
        // stored batch is the start guard's case on tansu (see
        // [`StartGuard`]); against Kafka a no-op.
        let at = (!paused).then(|| f.guard.next_offset()).flatten();
        if let Some(at) = at {
            f.guard = StartGuard::new(Some(at), None);
            f.seeking_logged = false;
            f.seek_to = Some(at);
        }
        drop(f);
        // Pausing and resuming only queue an operation for librdkafka.
        let done = if paused {
            r.reader.pause(&tpl)
        } else {
            r.reader.resume(&tpl)
        };
        if let Err(e) = done {
            log("WARN", format_args!("{}/{}: {e}", r.topic, self.partition));
        }
        if at.is_some() {
            r.seeks.store(true, Ordering::Release);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.reader.close(self.partition, &self.open);
    }
}

/// A partition quiet this long has its watermarks checked: still looking
/// for its first record, or read to a fetch that gives nothing below the
/// high watermark (see [`StartGuard`]).
const QUIET: Duration = Duration::from_secs(1);
/// Added to [`QUIET`] for a partition read to its end.
const QUIET_AT_END: Duration = Duration::from_secs(4);

impl AssignedReader {
    pub fn start(settings: &Settings, group: &str, topic: &str) -> anyhow::Result<Arc<Self>> {
        let reader = Arc::new(super::kafka::reader(settings, group)?);
        let open: Arc<Partitions> = Arc::default();
        let seeks = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (reader, open, stop) = (reader.clone(), open.clone(), stop.clone());
            let seeks = seeks.clone();
            let topic = topic.to_string();
            std::thread::Builder::new()
                .name(format!("read-{topic}"))
                .spawn(move || read(&reader, &topic, &open, &seeks, &stop))?
        };
        Ok(Arc::new(AssignedReader {
            reader,
            topic: topic.to_string(),
            open,
            seeks,
            stop,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Starts reading partition `p` from `from` (the beginning if none)
    /// into `receiver`.
    pub fn open(
        self: &Arc<Self>,
        p: i32,
        from: Option<i64>,
        receiver: Arc<dyn Receiver>,
    ) -> anyhow::Result<Lease> {
        let open = Arc::new(Open {
            receiver,
            fetch: Mutex::new(Fetch {
                // The partition's first offset is not asked for here, on the
                // task's thread: a checkpoint's offset is hours old, not a
                // retention period, so `from` is not below it.
                guard: StartGuard::new(from, None),
                heard_at: Instant::now(),
                quiet_below: None,
                seeking_logged: false,
                paused: false,
                seek_to: None,
            }),
        });
        // In the map before the assignment, so that no record comes before
        // its receiver; a task of the partition whose lease is not dropped
        // yet (a quick reassignment) gives it up first.
        let replaced = lock(&self.open).insert(p, open.clone()).is_some();
        if replaced {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.topic, p);
            let _ = self.reader.incremental_unassign(&tpl);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            &self.topic,
            p,
            from.map_or(Offset::Beginning, Offset::Offset),
        )?;
        if let Err(e) = self.reader.incremental_assign(&tpl) {
            let mut partitions = lock(&self.open);
            if partitions.get(&p).is_some_and(|o| Arc::ptr_eq(o, &open)) {
                partitions.remove(&p);
            }
            return Err(e.into());
        }
        Ok(Lease {
            reader: self.clone(),
            partition: p,
            open,
        })
    }

    fn close(&self, p: i32, open: &Arc<Open>) {
        let mut partitions = lock(&self.open);
        // A task of the partition started since (a quick reassignment) keeps it.
        if partitions.get(&p).is_some_and(|o| Arc::ptr_eq(o, open)) {
            partitions.remove(&p);
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.topic, p);
            if let Err(e) = self.reader.incremental_unassign(&tpl) {
                log("WARN", format_args!("{}/{p}: {e}", self.topic));
            }
        }
    }

    /// Stops the reader.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let thread = lock(&self.thread).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read(
    reader: &BaseConsumer,
    topic: &str,
    partitions: &Partitions,
    seeks: &AtomicBool,
    stop: &AtomicBool,
) {
    let mut checked = Instant::now();
    while !stop.load(Ordering::Acquire) {
        if seeks.swap(false, Ordering::AcqRel) {
            let wanted: Vec<(i32, i64)> = lock(partitions)
                .iter()
                .filter_map(|(p, o)| lock(&o.fetch).seek_to.take().map(|at| (*p, at)))
                .collect();
            for (p, at) in wanted {
                seek(reader, topic, p, at);
            }
        }
        if checked.elapsed() >= QUIET {
            checked = Instant::now();
            check_quiet(reader, topic, partitions);
        }
        let Some(result) = reader.poll(Duration::from_millis(100)) else {
            continue;
        };
        let msg = match result {
            Ok(m) => m,
            Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                if let Some(open) = open_of(partitions, p)
                    && lock(&open.fetch).guard.at_end()
                {
                    open.receiver.at_end();
                }
                continue;
            }
            Err(e) => {
                log("WARN", format_args!("{topic}: {e}"));
                continue;
            }
        };
        let p = msg.partition();
        let Some(open) = open_of(partitions, p) else {
            continue;
        };
        let take = {
            let mut f = lock(&open.fetch);
            f.heard_at = Instant::now();
            f.quiet_below = None;
            f.guard.take(msg.offset())
        };
        match take {
            Take::Yes => open
                .receiver
                .receive(msg.offset(), msg.payload().unwrap_or_default()),
            Take::Skip => {}
            Take::SeekTo(o) => {
                log_seeking_back(&open, topic, p, &format!("offset {}", msg.offset()));
                seek(reader, topic, p, o);
            }
        }
    }
}

fn open_of(partitions: &Partitions, p: i32) -> Option<Arc<Open>> {
    lock(partitions).get(&p).cloned()
}

/// For each partition quiet for [`QUIET`]: at its high watermark, reports
/// its end; with records past it, seeks back for the batch that holds its
/// start, or, read past its start and quiet at the same offset for two
/// checks, positions it there again. Against Kafka a partition below its
/// high watermark keeps giving records, and neither happens.
fn check_quiet(reader: &BaseConsumer, topic: &str, partitions: &Partitions) {
    let open: Vec<(i32, Arc<Open>)> = lock(partitions)
        .iter()
        .map(|(p, o)| (*p, o.clone()))
        .collect();
    for (p, open) in open {
        {
            let f = lock(&open.fetch);
            if f.paused || f.heard_at.elapsed() < QUIET {
                continue;
            }
        }
        let Ok((low, high)) = watermarks(reader, topic, p, Duration::from_secs(5)) else {
            continue;
        };
        let mut f = lock(&open.fetch);
        let to = match f.guard.when_quiet(false, low, high) {
            Quiet::End => {
                // Read to its end: checked again less often.
                f.heard_at = Instant::now() + QUIET_AT_END;
                drop(f);
                open.receiver.at_end();
                continue;
            }
            Quiet::SeekBack(o) => {
                drop(f);
                log_seeking_back(&open, topic, p, "nothing");
                f = lock(&open.fetch);
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
            Quiet::Wait | Quiet::Behind => continue,
        };
        f.heard_at = Instant::now();
        drop(f);
        seek(reader, topic, p, to);
    }
}

fn log_seeking_back(open: &Open, topic: &str, p: i32, read: &str) {
    let mut f = lock(&open.fetch);
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
            format_args!("{topic}/{p}: cannot seek to {to}: {e}"),
        );
    }
}
