//! The merchant table. A merchant's transactions arrive on every partition
//! and at every instance, so each instance reads the whole input topic (and
//! the label topic) outside the group, into one table of merchant state that
//! all its partition tasks read. The label-delayed windows end a label delay
//! (7 days) before the transaction, far behind this reader; only the
//! merchant's 1-hour count can differ from a single ordered pass, by the
//! transactions the reader has not reached or has already read ahead.

use super::pipeline::client_config_with;
use super::{Shared, log};
use crate::features::store::key_hash;
use crate::features::{Engine, FeatureConfig, Features, TooLate};
use crate::ingest::Transaction;
use crate::ingest::time::parse_timestamp;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Deserialize;
use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;

/// Transaction times kept per merchant for the exact 1-hour count; a
/// merchant busier than this falls back to its hour panes.
const RECENT_CAP: usize = 1024;
const HOUR: i64 = 3600;
const DAY: i64 = 86_400;
const RESCORE_MARGIN: i64 = 7 * DAY;

/// Merchant state from every partition. Partitions are read at different
/// paces, and after a restart the table reads the whole retention before
/// scoring resumes, so the table is often ahead of the transaction scored.
/// The label-delayed windows do not care; for the 1-hour count the table
/// also keeps each merchant's latest transaction times, and counts exactly
/// the transactions before the one scored, as a single ordered pass would.
pub struct MerchantTable {
    pub engine: Engine,
    recent: HashMap<u64, VecDeque<u32>>,
    newest: i64,
    /// The oldest event time a partition task may still score: times
    /// before its hour and the one before are no longer needed.
    scoring_low: Option<i64>,
    adds: u64,
}

impl MerchantTable {
    pub fn new(cfg: FeatureConfig) -> MerchantTable {
        MerchantTable {
            engine: Engine::new(cfg),
            recent: HashMap::new(),
            newest: i64::MIN,
            scoring_low: None,
            adds: 0,
        }
    }

    pub fn add(&mut self, merchant_key: u64, t: i64) {
        if !self.engine.add_merchant_transaction(merchant_key, t) {
            return;
        }
        self.newest = self.newest.max(t);
        let horizon = self.horizon();
        let q = self.recent.entry(merchant_key).or_default();
        q.push_back(t as u32);
        while q.len() > RECENT_CAP || q.front().is_some_and(|&f| (f as i64) < horizon) {
            q.pop_front();
        }
        self.adds += 1;
        if self.adds.is_multiple_of(1 << 20) {
            self.recent
                .retain(|_, q| q.back().is_some_and(|&b| b as i64 >= horizon));
        }
    }

    /// Times older than this are dropped: outside the panes' retention, or
    /// before anything the partition tasks may still score.
    fn horizon(&self) -> i64 {
        let c = self.engine.config();
        // Saturating: before the first event `newest` is i64::MIN.
        let retention = self
            .newest
            .saturating_sub(c.allowed_lateness_secs + c.label_delay_secs + 31 * DAY);
        match self.scoring_low {
            // A partition that moves to another instance, or back, resumes
            // from its last commit, somewhat behind the low: a margin keeps
            // the times that a rescore of those transactions reads.
            Some(low) => {
                retention.max(low.saturating_sub(c.allowed_lateness_secs + RESCORE_MARGIN))
            }
            None => retention,
        }
    }

    /// The oldest watermark of the partition tasks, if any is assigned.
    pub fn set_scoring_low(&mut self, low: Option<i64>) {
        self.scoring_low = low;
    }

    /// The merchant's transactions before `t` in the hour panes of `t - 1h`
    /// and `t`, or `None` when the kept times may not cover them.
    fn previous_1h(&self, merchant_id: &str, t: i64) -> Option<u32> {
        let from = (t.div_euclid(HOUR) - 1) * HOUR;
        if from < self.horizon() {
            return None;
        }
        let Some(q) = self.recent.get(&key_hash(merchant_id)) else {
            return Some(0);
        };
        if q.len() >= RECENT_CAP && q.front().is_some_and(|&f| f as i64 >= from) {
            return None;
        }
        Some(
            q.iter()
                .filter(|&&ts| ts as i64 >= from && (ts as i64) < t)
                .count() as u32,
        )
    }

    /// The features of `tx`, from its card's `engine` and this table; with
    /// `update`, the transaction is folded into the card's state.
    pub fn features(
        &self,
        engine: &mut Engine,
        tx: &Transaction,
        update: bool,
    ) -> (Features, Option<TooLate>) {
        let (mut f, late) = if update {
            match engine.process_card(tx, &self.engine) {
                Ok(f) => (f, None),
                Err(e) => (engine.peek_card(tx, &self.engine), Some(e)),
            }
        } else {
            (engine.peek_card(tx, &self.engine), None)
        };
        if let Some(n) = self.previous_1h(&tx.merchant_id, tx.time.utc) {
            f.set_merchant_previous_1h(n);
        }
        (f, late)
    }
}

/// The fields of a transaction the merchant table needs.
#[derive(Deserialize)]
struct MerchantEvent<'a> {
    #[serde(borrow)]
    merchant_id: IdOrNumber<'a>,
    #[serde(borrow)]
    timestamp: &'a str,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum IdOrNumber<'a> {
    Str(&'a str),
    Num(u64),
}

impl IdOrNumber<'_> {
    fn to_key(&self) -> std::borrow::Cow<'_, str> {
        match self {
            IdOrNumber::Str(s) => (*s).into(),
            IdOrNumber::Num(n) => n.to_string().into(),
        }
    }
}

/// A message of the label topic.
#[derive(Deserialize)]
pub struct Label {
    pub transaction_id: serde_json::Value,
    #[serde(default)]
    pub card_id: serde_json::Value,
    pub merchant_id: serde_json::Value,
    pub is_fraud: serde_json::Value,
    pub reported_at: String,
    /// The transaction's own time: optional, and exact when given.
    #[serde(default)]
    pub timestamp: Option<String>,
}

/// What a label message means for the table: the merchant and the
/// transaction time its fraud counts at, or `None` for a genuine transaction.
pub fn read_label(bytes: &[u8], label_delay_secs: i64) -> Result<Option<(String, i64)>, String> {
    let l: Label = serde_json::from_slice(bytes).map_err(|e| format!("invalid label: {e}"))?;
    let fraud = match &l.is_fraud {
        serde_json::Value::Bool(b) => *b,
        serde_json::Value::Number(n) if n.as_u64() == Some(1) => true,
        serde_json::Value::Number(n) if n.as_u64() == Some(0) => false,
        serde_json::Value::String(s) if s == "1" || s == "0" => s == "1",
        other => return Err(format!("field `is_fraud`: expected 0 or 1, got {other}")),
    };
    let merchant = match &l.merchant_id {
        serde_json::Value::String(s) if !s.is_empty() => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => return Err("field `merchant_id`: expected a non-empty string".into()),
    };
    let reported = parse_timestamp(l.reported_at.as_bytes())
        .ok_or_else(|| "field `reported_at`: expected an RFC 3339 timestamp".to_string())?;
    // Without the transaction's time, assume the label took the configured delay.
    let tx_time = match &l.timestamp {
        Some(t) => {
            parse_timestamp(t.as_bytes())
                .ok_or_else(|| "field `timestamp`: expected an RFC 3339 timestamp".to_string())?
                .utc
        }
        None => reported.utc - label_delay_secs,
    };
    Ok(fraud.then_some((merchant, tx_time)))
}

/// How far the table has read each input partition, in event time.
#[derive(Default)]
pub struct TableClock {
    /// Partition → (newest event time read, at the end of the partition).
    parts: std::sync::Mutex<HashMap<i32, Read>>,
    input_caught_up: AtomicBool,
    labels_caught_up: AtomicBool,
    pub moved: tokio::sync::Notify,
}

/// A partition as the table has read it.
#[derive(Clone, Copy)]
struct Read {
    newest: i64,
    at_end: bool,
    /// The offset after the last message read.
    next: i64,
}

impl TableClock {
    /// Whether the table holds every transaction of `partition` through
    /// `offset`, and, as far as partitions in time order tell, every
    /// transaction of the others before `t` (a partition read to its end
    /// counts as done).
    pub fn holds(&self, partition: i32, offset: i64, t: i64) -> bool {
        let parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        if parts.is_empty() {
            return false;
        }
        parts.iter().all(|(&p, r)| {
            if p == partition {
                r.next > offset
            } else {
                r.at_end || r.newest >= t
            }
        })
    }

    fn read(&self, partition: i32, t: Option<i64>, next: i64) {
        let mut parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        let e = parts.entry(partition).or_insert(Read {
            newest: i64::MIN,
            at_end: false,
            next: 0,
        });
        if let Some(t) = t {
            e.newest = e.newest.max(t);
        }
        e.next = e.next.max(next);
        e.at_end = false;
    }

    fn at_end(&self, partition: i32) {
        self.parts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(partition)
            .or_insert(Read {
                newest: i64::MIN,
                at_end: false,
                next: 0,
            })
            .at_end = true;
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Feed {
    Transactions,
    Labels,
}

/// Reads the input and label topics from the start into the table until
/// `stop`. Sets `tables_ready` once both readers reached the end of every
/// partition once.
pub async fn run(shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let input = tokio::spawn(read_feed(shared.clone(), stop.clone(), Feed::Transactions));
    let labels = tokio::spawn(read_feed(shared.clone(), stop, Feed::Labels));
    let _ = input.await;
    let _ = labels.await;
}

/// Messages a reader takes before applying them under one lock.
const READ_BATCH: usize = 4096;

async fn read_feed(shared: Arc<Shared>, mut stop: watch::Receiver<bool>, feed: Feed) {
    let s = &shared.settings;
    let (topic, suffix) = match feed {
        Feed::Transactions => (s.input_topic.clone(), "merchants"),
        Feed::Labels => (s.label_topic.clone(), "labels"),
    };
    let consumer: BaseConsumer = match client_config_with(s, &[("fetch.wait.max.ms", "10")])
        .set("group.id", format!("{}-{suffix}", s.group_id))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "true")
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            log("ERROR", format_args!("{topic} reader: {e}"));
            return;
        }
    };
    let consumer = Arc::new(consumer);
    // The broker may be down at start: retry with backoff, not ready meanwhile.
    let mut backoff = Duration::from_millis(200);
    let partitions = loop {
        let c = consumer.clone();
        let t = topic.clone();
        let found = tokio::task::spawn_blocking(move || topic_partitions(&c, &t)).await;
        match found {
            Ok(Ok(p)) => break p,
            Ok(Err(e)) => log(
                "WARN",
                format_args!(
                    "cannot read the partitions of {topic} yet: {e}; retrying in {backoff:?}"
                ),
            ),
            Err(e) => log("ERROR", format_args!("{e}")),
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    };
    let mut tpl = TopicPartitionList::new();
    for (p, _) in &partitions {
        if let Err(e) = tpl.add_partition_offset(&topic, *p, Offset::Beginning) {
            log("ERROR", format_args!("{e}"));
        }
    }
    if let Err(e) = consumer.assign(&tpl) {
        log("ERROR", format_args!("{topic} reader assignment: {e}"));
        return;
    }
    // Polling on a thread of its own, a batch at a time: the reader sees
    // every message of the topic, as many as all partition tasks together.
    let _ =
        tokio::task::spawn_blocking(move || read_loop(&shared, &stop, feed, &consumer, partitions))
            .await;
}

fn read_loop(
    shared: &Shared,
    stop: &watch::Receiver<bool>,
    feed: Feed,
    consumer: &BaseConsumer,
    partitions: Vec<(i32, i64)>,
) {
    let clock = &shared.table_clock;
    if feed == Feed::Transactions {
        // Every partition holds the clock back until read, not only those
        // that have delivered something yet.
        for (p, high) in &partitions {
            if *high > 0 {
                clock.read(*p, None, 0);
            } else {
                clock.at_end(*p);
            }
        }
    }
    // Caught up: each partition read to its end once, or to the end it had
    // when this reader started, for a topic that keeps growing.
    let mut unread: HashMap<i32, i64> = partitions.into_iter().collect();
    unread.retain(|_, high| *high > 0);
    let caught_up = || {
        let flag = match feed {
            Feed::Transactions => &clock.input_caught_up,
            Feed::Labels => &clock.labels_caught_up,
        };
        flag.store(true, Ordering::Release);
        if clock.input_caught_up.load(Ordering::Acquire)
            && clock.labels_caught_up.load(Ordering::Acquire)
            && !shared.tables_ready.swap(true, Ordering::AcqRel)
        {
            log("INFO", "merchant table caught up");
        }
    };
    if unread.is_empty() {
        caught_up();
    }
    let delay = shared.feature_config().label_delay_secs;
    let mut events: Vec<(u64, i64)> = Vec::with_capacity(READ_BATCH);
    // Per partition: the newest event time read, or None for "at the end".
    // Per partition: the newest event time, the next offset, and whether
    // the batch ended at the partition's end.
    let mut progress: HashMap<i32, (i64, i64, bool)> = HashMap::new();
    let mut read = 0u64;
    while !*stop.borrow() {
        let mut wait = Duration::from_millis(100);
        let mut taken = 0;
        while taken < READ_BATCH {
            let Some(r) = consumer.poll(wait) else {
                break;
            };
            wait = Duration::ZERO;
            taken += 1;
            let msg = match r {
                Ok(m) => m,
                Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                    progress.entry(p).or_insert((i64::MIN, 0, true)).2 = true;
                    if unread.remove(&p).is_some() && unread.is_empty() {
                        caught_up();
                    }
                    continue;
                }
                Err(e) => {
                    log("WARN", format_args!("{feed:?} reader: {e}"));
                    std::thread::sleep(Duration::from_millis(200));
                    break;
                }
            };
            let bytes = msg.payload().unwrap_or_default();
            let p = msg.partition();
            match feed {
                Feed::Transactions => {
                    // Invalid transactions are dead-lettered by the partition tasks.
                    let event = serde_json::from_slice::<MerchantEvent>(bytes)
                        .ok()
                        .and_then(|ev| {
                            let t = parse_timestamp(ev.timestamp.as_bytes())?.utc;
                            Some((key_hash(&ev.merchant_id.to_key()), t))
                        });
                    let entry = progress.entry(p).or_insert((i64::MIN, 0, false));
                    if let Some((key, t)) = event {
                        events.push((key, t));
                        entry.0 = entry.0.max(t);
                    }
                    entry.1 = msg.offset() + 1;
                    entry.2 = false;
                }
                Feed::Labels => apply_label(shared, bytes, delay),
            }
            if unread.get(&p).is_some_and(|&high| msg.offset() + 1 >= high) {
                unread.remove(&p);
                if unread.is_empty() {
                    caught_up();
                }
            }
        }
        if feed != Feed::Transactions || taken == 0 {
            continue;
        }
        if !events.is_empty() {
            let mut table = shared.merchants.write().unwrap_or_else(|e| e.into_inner());
            for (key, t) in events.drain(..) {
                table.add(key, t);
            }
        }
        for (p, (t, next, at_end)) in progress.drain() {
            clock.read(p, (t != i64::MIN).then_some(t), next);
            if at_end {
                clock.at_end(p);
            }
        }
        clock.moved.notify_waiters();
        read += taken as u64;
        if read >= 4096 {
            read = 0;
            // Read before taking the table's lock: tasks lock their engine, then the table.
            let low = scoring_low(shared);
            shared
                .merchants
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .set_scoring_low(low);
        }
    }
}

fn scoring_low(shared: &Shared) -> Option<i64> {
    let parts = shared.partitions.lock().unwrap_or_else(|e| e.into_inner());
    parts
        .values()
        .map(|e| e.lock().unwrap_or_else(|e| e.into_inner()).watermark())
        .collect::<Option<Vec<i64>>>()
        .and_then(|w| w.into_iter().min())
}

fn apply_label(shared: &Shared, bytes: &[u8], delay: i64) {
    let m = &shared.metrics;
    match read_label(bytes, delay) {
        Ok(Some((merchant, t))) => {
            let mut table = shared.merchants.write().unwrap_or_else(|e| e.into_inner());
            let before = table.engine.stats().labels_applied;
            table.engine.add_label(&merchant, t);
            let outcome = if table.engine.stats().labels_applied > before {
                "applied"
            } else {
                "too_old"
            };
            m.labels.with_label_values(&[outcome]).inc();
        }
        Ok(None) => m.labels.with_label_values(&["genuine"]).inc(),
        Err(e) => {
            m.labels.with_label_values(&["invalid"]).inc();
            log("WARN", format_args!("label topic: {e}"));
        }
    }
}

/// The partitions of a topic with their high watermarks; an error if the
/// topic does not exist.
fn topic_partitions(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<(i32, i64)>> {
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
    let t = md
        .topics()
        .first()
        .ok_or_else(|| anyhow::anyhow!("topic {topic} not in the metadata"))?;
    if let Some(e) = t.error() {
        anyhow::bail!("topic {topic}: {e:?}");
    }
    if t.partitions().is_empty() {
        anyhow::bail!("topic {topic} has no partitions (does it exist?)");
    }
    t.partitions()
        .iter()
        .map(|p| {
            let (_, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(5))?;
            Ok((p.id(), high))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 1-hour count does not depend on how far the table has read.
    #[test]
    fn one_hour_count_ignores_what_was_read_ahead() {
        let cfg = FeatureConfig::default();
        let t0 = 1_600_000_000i64;
        let times: Vec<i64> = (0..40).map(|i| t0 + i * 300).collect();
        let tx = |i: usize| Transaction {
            transaction_id: i.to_string(),
            time: crate::ingest::EventTime {
                utc: times[i],
                offset: 0,
            },
            card_id: format!("c{i}"),
            merchant_id: "m".into(),
            amount: 10.0,
            ..Transaction::default()
        };
        // In order, as a file pass reads it.
        let mut ordered = MerchantTable::new(cfg);
        let mut expected = Vec::new();
        for (i, &t) in times.iter().enumerate() {
            let mut e = Engine::new(cfg);
            expected.push(ordered.features(&mut e, &tx(i), false).0);
            ordered.add(key_hash("m"), t);
        }
        // Everything read first, as after a catch-up.
        let mut ahead = MerchantTable::new(cfg);
        for &t in times.iter().rev() {
            ahead.add(key_hash("m"), t);
        }
        for (i, want) in expected.iter().enumerate() {
            let mut e = Engine::new(cfg);
            let got = ahead.features(&mut e, &tx(i), false).0;
            assert_eq!(
                got.get("merchant.count_1h"),
                want.get("merchant.count_1h"),
                "transaction {i}"
            );
        }
    }

    #[test]
    fn labels_are_read_or_rejected_with_the_field() {
        let fraud = br#"{"transaction_id":"t1","card_id":"c","merchant_id":"m7","is_fraud":1,"reported_at":"2018-04-10T00:00:00Z"}"#;
        let (m, t) = read_label(fraud, 86_400).unwrap().unwrap();
        assert_eq!(m, "m7");
        assert_eq!(t, parse_timestamp(b"2018-04-09T00:00:00Z").unwrap().utc);
        let exact = br#"{"transaction_id":"t1","card_id":"c","merchant_id":"m7","is_fraud":true,"reported_at":"2018-04-10T00:00:00Z","timestamp":"2018-04-02T03:00:00Z"}"#;
        assert_eq!(
            read_label(exact, 86_400).unwrap().unwrap().1,
            parse_timestamp(b"2018-04-02T03:00:00Z").unwrap().utc
        );
        let genuine = br#"{"transaction_id":"t1","card_id":"c","merchant_id":"m7","is_fraud":0,"reported_at":"2018-04-10T00:00:00Z"}"#;
        assert_eq!(read_label(genuine, 86_400).unwrap(), None);
        let bad = br#"{"transaction_id":"t1","card_id":"c","merchant_id":"m7","is_fraud":3,"reported_at":"2018-04-10T00:00:00Z"}"#;
        assert!(read_label(bad, 86_400).unwrap_err().contains("is_fraud"));
    }
}
