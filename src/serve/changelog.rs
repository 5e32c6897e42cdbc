//! State changelogs on Kafka, as Kafka Streams keeps them: a compacted
//! topic per store, a partition per task, a record per changed key.
//!
//! A checkpoint is a *group* of records, then a *marker* that commits it
//! and carries what the state reflects (the input offset, the clock). Each
//! record names its group in a header, so a restore applies a group only
//! once it reads the group's marker: a group cut short by a crash, or
//! written by a task that lost its partition, is never applied.
//!
//! Compaction runs when the broker gets to it, so a restore cannot rely on
//! it: every so often a task writes a *snapshot* group, all its keys, and
//! commits the snapshot's first offset as the group's offset of the
//! changelog partition. A restore starts there and reads to the end, so
//! what it reads is bounded by one snapshot plus the deltas since, however
//! long the history. A snapshot's marker says so, and a restore then drops
//! what it had before applying it.

use crate::telemetry::log;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::time::Duration;

/// The key of markers. One key for all, so compaction keeps the newest.
pub const MARKER_KEY: &[u8] = b"~";
const GROUP_HEADER: &str = "peregrine-group";

/// A changed key: its new value, or `None` when it was dropped (a tombstone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

impl Entry {
    fn bytes(&self) -> u64 {
        (self.key.len() + self.value.as_ref().map_or(0, Vec::len)) as u64
    }
}

/// What a marker says besides the state's own fields.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Marker<S> {
    pub group: u64,
    /// The group holds every key: what came before it is replaced.
    pub snapshot: bool,
    pub state: S,
}

/// A group as committed by its marker.
pub struct Committed<S> {
    pub entries: Vec<Entry>,
    pub marker: Marker<S>,
    /// The marker's offset.
    pub offset: i64,
}

/// Collects each group's records until its marker.
pub struct Assembler<S> {
    pending: HashMap<u64, Vec<Entry>>,
    _state: std::marker::PhantomData<S>,
}

impl<S> Default for Assembler<S> {
    fn default() -> Self {
        Assembler {
            pending: HashMap::new(),
            _state: std::marker::PhantomData,
        }
    }
}

impl<S: DeserializeOwned> Assembler<S> {
    /// Takes one changelog record; returns a group when this is its marker.
    pub fn push(&mut self, msg: &BorrowedMessage<'_>) -> Option<Committed<S>> {
        let key = msg.key().unwrap_or_default();
        if key == MARKER_KEY {
            let marker: Marker<S> = match msg.payload().map(serde_json::from_slice) {
                Some(Ok(m)) => m,
                _ => {
                    log(
                        "WARN",
                        format_args!(
                            "changelog {}/{} offset {}: a marker that cannot be read; skipped",
                            msg.topic(),
                            msg.partition(),
                            msg.offset()
                        ),
                    );
                    return None;
                }
            };
            let entries = self.pending.remove(&marker.group).unwrap_or_default();
            return Some(Committed {
                entries,
                marker,
                offset: msg.offset(),
            });
        }
        let group = msg.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == GROUP_HEADER)
                .and_then(|h| h.value)
                .and_then(|v| <[u8; 8]>::try_from(v).ok())
                .map(u64::from_le_bytes)
        });
        if let Some(g) = group {
            self.pending.entry(g).or_default().push(Entry {
                key: key.to_vec(),
                value: msg.payload().map(<[u8]>::to_vec),
            });
        }
        None
    }
}

/// The state a restore read: every key's value after the last marker, and
/// that marker.
pub struct Restored<S> {
    pub values: HashMap<Vec<u8>, Vec<u8>>,
    pub marker: Option<Marker<S>>,
    pub records: u64,
    /// Bytes of keys and values read.
    pub bytes: u64,
}

/// Where a restore of a changelog partition starts: the offset committed
/// for it (the newest snapshot's start), else the beginning.
pub fn start_offset(reader: &BaseConsumer, topic: &str, partition: i32) -> anyhow::Result<Offset> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let c = reader.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(
        match c.find_partition(topic, partition).map(|e| e.offset()) {
            Some(Offset::Offset(o)) if o >= 0 => Offset::Offset(o),
            _ => Offset::Beginning,
        },
    )
}

/// Reads a changelog partition from its newest snapshot to its end and
/// returns the state of the last marker. Blocking; stops early with an
/// error when `stopped` turns true.
pub fn restore<S: DeserializeOwned>(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    stopped: &dyn Fn() -> bool,
) -> anyhow::Result<Restored<S>> {
    let from = start_offset(reader, topic, partition)?;
    let mut restored = Restored {
        values: HashMap::new(),
        marker: None,
        records: 0,
        bytes: 0,
    };
    let mut assembler = Assembler::<S>::default();
    read_to_end(reader, topic, partition, from, stopped, |msg| {
        restored.records += 1;
        restored.bytes +=
            (msg.key().map_or(0, <[u8]>::len) + msg.payload().map_or(0, <[u8]>::len)) as u64;
        if let Some(group) = assembler.push(msg) {
            if group.marker.snapshot {
                restored.values.clear();
            }
            for e in group.entries {
                match e.value {
                    Some(v) => restored.values.insert(e.key, v),
                    None => restored.values.remove(&e.key),
                };
            }
            restored.marker = Some(group.marker);
        }
    })?;
    Ok(restored)
}

/// Reads one partition from `from` until its end, handing each record to
/// `each` in offset order.
pub fn read_to_end(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: Offset,
    stopped: &dyn Fn() -> bool,
    mut each: impl FnMut(&BorrowedMessage<'_>),
) -> anyhow::Result<()> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, from)?;
    reader.assign(&tpl)?;
    let low = reader
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .ok()
        .map(|(low, _)| low);
    let mut position = StartGuard::new(
        match from {
            Offset::Offset(o) => Some(o),
            _ => None,
        },
        low,
    );
    loop {
        if stopped() {
            anyhow::bail!("stopped while reading {topic}/{partition}");
        }
        let Some(r) = reader.poll(Duration::from_millis(200)) else {
            if unstall(reader, topic, partition, &mut position)? {
                break;
            }
            continue;
        };
        let msg = match r {
            Ok(m) => m,
            Err(rdkafka::error::KafkaError::PartitionEOF(p)) if p == partition => {
                if position.at_end() {
                    break;
                }
                continue;
            }
            Err(e) => {
                log("WARN", format_args!("reading {topic}/{partition}: {e}"));
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        match position.take(msg.offset()) {
            Take::Yes => each(&msg),
            Take::Skip => {}
            Take::SeekTo(o) => {
                reader.seek(topic, partition, Offset::Offset(o), Duration::from_secs(10))?;
            }
        }
    }
    reader.unassign()?;
    Ok(())
}

/// What a quiet partition does ([`StartGuard::when_quiet`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Quiet {
    /// Read to its end, not reported yet: report it.
    End,
    /// At its end already reported, or still seeking back: nothing to do.
    Wait,
    /// Records lie ahead but none was read at or before the wanted offset
    /// yet: seek back here for it.
    SeekBack(i64),
    /// Records lie ahead of this next offset: the partition runs, and a
    /// fetch stuck there is repositioned.
    Below(i64),
    /// Records lie ahead, and no offset is known to watch.
    Behind,
}

/// What to do with a message read after positioning a partition.
#[derive(Debug, PartialEq, Eq)]
pub enum Take {
    Yes,
    /// Before the wanted offset, or delivered again: not for the caller.
    Skip,
    /// Seek here and read again.
    SeekTo(i64),
}

/// A partition's low and high watermarks. The high one is the larger of
/// the broker's answer to a ListOffsets request and the high watermark of
/// librdkafka's last fetch response for the partition. Workaround for
/// tansu 0.6 (kept with [`StartGuard`]'s): its ListOffsets(latest) answers
/// with the base offset of the batch stored last by the clock, which after
/// a burst of writes can lie thousands of records below the end, so that a
/// partition positioned further on was taken for one read to its end and
/// waited for ever; its fetch responses carry the true high watermark.
/// Against Kafka the two agree, and the second costs no request.
pub fn watermarks<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> rdkafka::error::KafkaResult<(i64, i64)> {
    let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
    Ok((low, high.max(fetched_high(consumer, topic, partition))))
}

/// The high watermark in librdkafka's last fetch response for the
/// partition (`rd_kafka_get_watermark_offsets`, which the crate does not
/// wrap), or -1 before one came.
fn fetched_high<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    partition: i32,
) -> i64 {
    let Ok(topic) = std::ffi::CString::new(topic) else {
        return -1;
    };
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client handle lives as long as `consumer`, which is
    // borrowed for the call; the topic is a NUL-terminated string and the
    // two out-parameters are live locals. The call only reads librdkafka's
    // cached state under its own locks.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    if err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        high
    } else {
        -1
    }
}

/// For a partition that gave nothing for a while: true when it is read to
/// the broker's high watermark (an end librdkafka may not report); else,
/// when the guard is still looking for its first record, seeks back for it
/// (see [`StartGuard::stalled`]).
pub fn unstall(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    guard: &mut StartGuard,
) -> anyhow::Result<bool> {
    let (low, high) = watermarks(reader, topic, partition, Duration::from_secs(10))?;
    match guard.when_quiet(false, low, high) {
        Quiet::End => return Ok(true),
        Quiet::SeekBack(o) => {
            reader.seek(topic, partition, Offset::Offset(o), Duration::from_secs(10))?
        }
        Quiet::Wait | Quiet::Below(_) | Quiet::Behind => {}
    }
    Ok(false)
}

/// The first step back for a stalled partition: each costs a quiet wait, so
/// it starts larger than the step for a record read past the start.
const STALL_STEP: i64 = 64;

/// Workarounds for three behaviours of tansu 0.6's in-memory storage, kept
/// here and nowhere else; against a Kafka broker they never trigger.
///
/// - A fetch from an offset inside a stored batch is answered with the
///   *next* batch, so the records from the offset to the batch's end would
///   be skipped. When the first record read is past the wanted offset, the
///   guard seeks further back (doubling the step) until it reads the batch
///   that holds it, then skips the records before it. A first record still
///   past the wanted offset after reading from the partition's first
///   offset, several times over, means the records are gone (retention,
///   compaction) and is taken as is.
/// - A fetch from an offset inside the partition's last batch is answered
///   with nothing, and librdkafka waits for ever below the high watermark.
///   When a partition positioned below its high watermark stays quiet,
///   the guard seeks back the same way ([`StartGuard::stalled`]).
/// - A partition's last batch may be delivered twice: offsets only grow,
///   so one already taken is skipped.
#[derive(Debug)]
pub struct StartGuard {
    want: Option<i64>,
    /// The partition's first offset when it was positioned: records from
    /// there on exist, so one read past the wanted offset is never taken
    /// for a gap until the guard has read from there.
    low: i64,
    back: i64,
    /// Seeks to `low` that still gave a record past the wanted offset.
    at_low: u32,
    last: i64,
    saw_first: bool,
}

/// Seeks to the partition's first offset that must give a record past the
/// wanted one before it is taken as is: answers to earlier seeks may still
/// be on their way.
const AT_LOW_TRIES: u32 = 8;

impl StartGuard {
    /// `want`: the offset the partition was positioned at, if it is one;
    /// `low`: the partition's first offset then, if known.
    pub fn new(want: Option<i64>, low: Option<i64>) -> StartGuard {
        let low = low.unwrap_or(0).max(0);
        StartGuard {
            // Below the partition's first offset, the records are gone.
            want: want.map(|w| w.max(low)),
            low,
            back: 0,
            at_low: 0,
            last: -1,
            saw_first: want.is_none(),
        }
    }

    /// The next place to seek back to, if any is left.
    fn step_back(&mut self, first_step: i64) -> Option<i64> {
        let want = self.want?;
        let room = want - self.low;
        if self.back < room {
            self.back = (self.back * 2).max(first_step).min(room);
            return Some(want - self.back);
        }
        if self.at_low < AT_LOW_TRIES {
            self.at_low += 1;
            return Some(self.low);
        }
        None
    }

    pub fn take(&mut self, offset: i64) -> Take {
        if let (false, Some(want)) = (self.saw_first, self.want) {
            if offset > want
                && let Some(o) = self.step_back(1)
            {
                return Take::SeekTo(o);
            }
            // At or before the wanted offset; or still past it after
            // reading from the partition's start: the records are gone.
            self.saw_first = true;
            if offset > want {
                log(
                    "WARN",
                    format_args!(
                        "wanted offset {want}, but the partition gives {offset} first even from \
                         offset {}: taking it from there",
                        self.low
                    ),
                );
            }
        }
        if offset <= self.last || self.want.is_some_and(|w| offset < w) {
            return Take::Skip;
        }
        self.last = offset;
        Take::Yes
    }

    /// Whether a record at or before the wanted offset was read.
    pub fn started(&self) -> bool {
        self.saw_first
    }

    /// Where to seek when the partition gave nothing although records lie
    /// ahead: further back, by a step that doubles from [`STALL_STEP`].
    /// `None` once a first record was read, or once there is nowhere left.
    pub fn stalled(&mut self) -> Option<i64> {
        if self.saw_first {
            return None;
        }
        self.step_back(STALL_STEP)
    }

    /// What a partition that gave nothing for a while does, given its
    /// watermarks (see [`watermarks`]) and whether its end was reported.
    pub fn when_quiet(&mut self, ended: bool, low: i64, high: i64) -> Quiet {
        if self.next_offset().unwrap_or(low) >= high {
            return if self.at_end() && !ended {
                Quiet::End
            } else {
                Quiet::Wait
            };
        }
        // Records lie ahead, whatever end was reported before.
        match self.stalled() {
            Some(o) => Quiet::SeekBack(o),
            None => self.next_offset().map_or(Quiet::Behind, Quiet::Below),
        }
    }

    /// Whether an end-of-partition means the wanted records were all read:
    /// not while the guard is still seeking back for the first one.
    pub fn at_end(&self) -> bool {
        self.saw_first || self.back == 0
    }

    /// The next offset to take, if known: after the last taken, or the
    /// one positioned at.
    pub fn next_offset(&self) -> Option<i64> {
        self.last().map(|l| l + 1).or(self.want)
    }

    /// The last offset taken, if any.
    pub fn last(&self) -> Option<i64> {
        (self.last >= 0).then_some(self.last)
    }
}

/// Writes one changelog partition's groups and markers, and decides when a
/// checkpoint should be a snapshot: when the deltas since the last one add
/// up to more than it, so a restore reads at most about twice the state.
pub struct Writer {
    producer: FutureProducer,
    topic: String,
    partition: i32,
    next_group: u64,
    /// Bytes of the newest snapshot (none yet: 0) and of the deltas since.
    snapshot_bytes: Option<u64>,
    since_snapshot: u64,
}

/// A checkpoint written.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    pub marker_offset: i64,
    /// For a snapshot, its first offset: the place to commit for restores.
    pub snapshot_start: Option<i64>,
}

impl Writer {
    pub fn new(producer: FutureProducer, topic: &str, partition: i32) -> Writer {
        // Group ids unique across writers of the partition, so that a
        // previous owner's unfinished group is never mistaken for ours.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Writer {
            producer,
            topic: topic.to_string(),
            partition,
            next_group: crate::features::store::key_hash(&format!(
                "{seed}-{}-{partition}",
                std::process::id()
            )),
            snapshot_bytes: None,
            since_snapshot: 0,
        }
    }

    /// Whether a checkpoint of `delta_bytes` should rather be a snapshot.
    pub fn wants_snapshot(&self, delta_bytes: u64) -> bool {
        match self.snapshot_bytes {
            None => true,
            Some(s) => self.since_snapshot + delta_bytes > s.max(1 << 20),
        }
    }

    /// Carries on after a restore that found a state of `state_bytes` read
    /// with `deltas_bytes` of deltas on top.
    pub fn resume(&mut self, state_bytes: u64, deltas_bytes: u64) {
        if state_bytes > 0 {
            self.snapshot_bytes = Some(state_bytes);
            self.since_snapshot = deltas_bytes;
        }
    }

    /// The next checkpoint must be a snapshot (after a failed one, whose
    /// changes are no longer tracked).
    pub fn force_snapshot(&mut self) {
        self.snapshot_bytes = None;
    }

    /// Writes a group, waits for the broker to have all of it, then for
    /// `ready` (what the state reflects is final), then writes the marker.
    pub async fn write<S: Serialize>(
        &mut self,
        entries: &[Entry],
        snapshot: bool,
        state: &S,
        ready: impl std::future::Future<Output = bool>,
    ) -> anyhow::Result<Written> {
        let group = self.next_group;
        self.next_group = self.next_group.wrapping_add(1);
        let header = group.to_le_bytes();
        let mut deliveries = Vec::with_capacity(entries.len());
        let mut bytes = 0;
        for e in entries {
            bytes += e.bytes();
            let headers = OwnedHeaders::new().insert(Header {
                key: GROUP_HEADER,
                value: Some(&header[..]),
            });
            let mut record = FutureRecord::to(&self.topic)
                .partition(self.partition)
                .key(&e.key[..])
                .headers(headers);
            if let Some(v) = &e.value {
                record = record.payload(&v[..]);
            }
            deliveries.push(send(&self.producer, record).await?);
        }
        let mut first: Option<i64> = None;
        for d in deliveries {
            match d.await {
                Ok(Ok(delivery)) => {
                    first = Some(first.map_or(delivery.offset, |f| f.min(delivery.offset)));
                }
                Ok(Err((e, _))) => anyhow::bail!("changelog {}: {e}", self.topic),
                Err(_) => anyhow::bail!("changelog {}: the producer went away", self.topic),
            }
        }
        if !ready.await {
            anyhow::bail!("stopped before the checkpoint could be committed");
        }
        let marker = serde_json::to_vec(&Marker {
            group,
            snapshot,
            state,
        })?;
        let record = FutureRecord::to(&self.topic)
            .partition(self.partition)
            .key(MARKER_KEY)
            .payload(&marker[..]);
        let marker_offset = match send(&self.producer, record).await?.await {
            Ok(Ok(d)) => d.offset,
            Ok(Err((e, _))) => anyhow::bail!("changelog {}: {e}", self.topic),
            Err(_) => anyhow::bail!("changelog {}: the producer went away", self.topic),
        };
        if snapshot {
            self.snapshot_bytes = Some(bytes);
            self.since_snapshot = 0;
        } else {
            self.since_snapshot += bytes;
        }
        Ok(Written {
            marker_offset,
            snapshot_start: snapshot.then(|| first.unwrap_or(marker_offset)),
        })
    }
}

/// Hands a record to the producer, waiting only while its queue is full.
pub async fn send<'a>(
    producer: &FutureProducer,
    mut record: FutureRecord<'a, [u8], [u8]>,
) -> anyhow::Result<rdkafka::producer::DeliveryFuture> {
    loop {
        match producer.send_result(record) {
            Ok(f) => return Ok(f),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                r,
            )) => {
                record = r;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((e, _)) => anyhow::bail!("cannot send a changelog record: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A quiet partition is judged by its watermarks each time, and an end
    /// reported while records lay ahead is taken back: a partition once
    /// taken for read to its end waited for ever when tansu's ListOffsets
    /// answered far below the end after a restart.
    #[test]
    fn a_quiet_partition_ends_only_at_its_high_watermark() {
        // Positioned at 5145, nothing read: an answer of 4684 said "end".
        let mut g = StartGuard::new(Some(5145), Some(0));
        assert_eq!(g.when_quiet(false, 0, 4684), Quiet::End);
        // Reported, and the high watermark is 8182: seek back for the
        // first record, and keep stepping back while nothing comes.
        assert_eq!(g.when_quiet(true, 0, 8182), Quiet::SeekBack(5081));
        assert_eq!(g.when_quiet(false, 0, 8182), Quiet::SeekBack(5017));
        assert_eq!(g.take(5000), Take::Skip);
        assert_eq!(g.take(5145), Take::Yes);
        // Started and below the end: watched for a stuck fetch.
        assert_eq!(g.when_quiet(false, 0, 8182), Quiet::Below(5146));
        // At the end: reported once, then nothing until records come.
        assert_eq!(g.when_quiet(false, 0, 5146), Quiet::End);
        assert_eq!(g.when_quiet(true, 0, 5146), Quiet::Wait);
        assert_eq!(g.when_quiet(true, 0, 5150), Quiet::Below(5146));
        // Positioned at the start of an empty partition.
        let mut g = StartGuard::new(None, Some(0));
        assert_eq!(g.when_quiet(false, 0, 0), Quiet::End);
    }

    #[test]
    fn guard_takes_from_the_wanted_offset() {
        // A broker that returns what was asked for.
        let mut g = StartGuard::new(Some(5), None);
        assert_eq!(g.take(5), Take::Yes);
        assert_eq!(g.take(6), Take::Yes);
        assert_eq!(g.take(6), Take::Skip, "a redelivery");
        assert_eq!(g.last(), Some(6));
        // A broker that skips to the next batch (which starts at 8): seek
        // back until the batch holding 5 (it starts at 3) comes.
        let mut g = StartGuard::new(Some(5), None);
        assert_eq!(g.take(8), Take::SeekTo(4));
        assert!(!g.at_end());
        assert_eq!(g.take(8), Take::SeekTo(3));
        assert_eq!(g.take(3), Take::Skip);
        assert_eq!(g.take(4), Take::Skip);
        assert_eq!(g.take(5), Take::Yes);
        assert!(g.at_end());
        // Past the wanted offset even after reading from the partition's
        // start, a few times over (answers to earlier seeks may still
        // come): the records are gone, take what comes.
        let mut g = StartGuard::new(Some(2), None);
        assert_eq!(g.take(9), Take::SeekTo(1));
        assert_eq!(g.take(9), Take::SeekTo(0));
        for _ in 0..AT_LOW_TRIES {
            assert_eq!(g.take(9), Take::SeekTo(0));
        }
        assert_eq!(g.take(9), Take::Yes);
        // Wanted below the partition's first offset: from there.
        let mut g = StartGuard::new(Some(2), Some(5));
        assert_eq!(g.take(5), Take::Yes);
        // From the beginning: everything.
        let mut g = StartGuard::new(None, None);
        assert_eq!(g.take(0), Take::Yes);
        assert!(g.at_end());
        assert_eq!(g.stalled(), None, "nothing wanted: nothing to seek for");
    }

    #[test]
    fn guard_seeks_back_from_a_stalled_start() {
        // Positioned at 1000 inside the last batch (it starts at 900): the
        // broker answers with nothing, so seek back by growing steps until
        // a record at or before 1000 comes.
        let mut g = StartGuard::new(Some(1000), None);
        assert!(!g.started());
        assert_eq!(g.stalled(), Some(1000 - STALL_STEP));
        assert_eq!(g.stalled(), Some(1000 - 2 * STALL_STEP));
        assert!(!g.at_end(), "an end now is not the end of what was wanted");
        assert_eq!(g.take(900), Take::Skip);
        assert!(g.started());
        assert_eq!(g.stalled(), None, "reading: not stalled");
        assert_eq!(g.take(1000), Take::Yes);
        assert_eq!(g.next_offset(), Some(1001));
        // Never further back than the start of the partition.
        let mut g = StartGuard::new(Some(10), Some(4));
        assert_eq!(g.stalled(), Some(4));
        assert_eq!(g.stalled(), Some(4), "again: an answer may be on its way");
        let tries = std::iter::from_fn(|| g.stalled()).count();
        assert_eq!(tries as u32, AT_LOW_TRIES - 1);
    }
}
