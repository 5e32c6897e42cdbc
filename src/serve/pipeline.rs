//! Kafka in, alerts out. One consumer in the group reads the input topic and
//! hands each message to the task of its partition; each task owns its
//! partition's card state, scores in batches, and stores a batch's offset
//! only once every alert and dead letter of the batch is acknowledged by the
//! broker. That is at-least-once: after a crash the uncommitted tail is read
//! again and yields the same alert ids.

use super::{CardEngine, Shared, log};
use crate::alerts::{Alert, now_rfc3339};
use crate::config::Settings;
use crate::ingest::Transaction;
use crate::model::scorer::{Decision, Scorer};
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Messages scored together before their acknowledgements are awaited.
const BATCH: usize = 2048;
/// Batches of a partition sent but not yet acknowledged.
const IN_FLIGHT: usize = 16;
/// Messages queued for one partition's task.
const QUEUE: usize = 4096;

/// The settings every client shares: brokers, then the pass-through options.
pub fn client_config(s: &Settings) -> ClientConfig {
    client_config_with(s, &[])
}

/// [`client_config`] over defaults that the pass-through options may change.
pub fn client_config_with(s: &Settings, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    c.set("bootstrap.servers", &s.brokers);
    for (k, v) in &s.librdkafka {
        c.set(k, v);
    }
    c
}

pub fn producer(s: &Settings) -> anyhow::Result<FutureProducer> {
    let mut c = client_config(s);
    c.set("linger.ms", "5");
    // Not overridable: at-least-once rests on them. No message timeout, so
    // a broker outage delays alerts instead of losing them.
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "0");
    Ok(c.create()?)
}

/// Why a message was dead-lettered: the bounded label of the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    Empty,
    Oversize,
    NotJson,
    InvalidField,
}

impl DeadReason {
    pub const ALL: [DeadReason; 4] = [
        DeadReason::Empty,
        DeadReason::Oversize,
        DeadReason::NotJson,
        DeadReason::InvalidField,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Empty => "empty",
            DeadReason::Oversize => "oversize",
            DeadReason::NotJson => "not_json",
            DeadReason::InvalidField => "invalid_field",
        }
    }
}

/// A transaction from a message's payload, or why it is not one.
pub fn decode(
    payload: Option<&[u8]>,
    max_bytes: usize,
) -> Result<Transaction, (DeadReason, String)> {
    let bytes = match payload {
        None | Some([]) => return Err((DeadReason::Empty, "the message has no payload".into())),
        Some(b) => b,
    };
    if bytes.len() > max_bytes {
        return Err((
            DeadReason::Oversize,
            format!("{} bytes is over the limit of {max_bytes}", bytes.len()),
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| (DeadReason::NotJson, format!("not JSON: {e}")))?;
    Transaction::from_json(&value).map_err(|e| (DeadReason::InvalidField, e.to_string()))
}

/// A message to produce, owned, so it can be sent again after a failure.
struct Outgoing {
    topic: String,
    key: Vec<u8>,
    payload: Vec<u8>,
    headers: Vec<(&'static str, String)>,
    /// The input record's timestamp, for the event-to-alert latency.
    alert_of: Option<i64>,
}

/// Rebalances, as the consumer's callback reports them to the dispatcher.
enum Assignment {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

struct GroupContext {
    shared: Arc<Shared>,
    topic: String,
    events: std::sync::mpsc::Sender<Assignment>,
    done: Done,
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            log("WARN", format_args!("librdkafka {fac}: {msg}"));
        }
    }

    fn stats(&self, stats: Statistics) {
        let Some(topic) = stats.topics.get(&self.topic) else {
            return;
        };
        for (p, part) in &topic.partitions {
            // -1 is librdkafka's internal unassigned partition; a lag of -1 is unknown.
            if *p >= 0 && part.consumer_lag >= 0 {
                self.shared
                    .metrics
                    .consumer_lag
                    .with_label_values(&[&p.to_string()])
                    .set(part.consumer_lag);
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    /// Commits what is finished of the partitions about to go, while they
    /// are still ours; the rest is read again by their next owner.
    fn pre_rebalance(&self, c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        let mut commit = TopicPartitionList::new();
        for e in tpl.elements_for_topic(&self.topic) {
            if let Some(offset) = done.remove(&e.partition()) {
                let _ = commit.add_partition_offset(
                    &self.topic,
                    e.partition(),
                    Offset::Offset(offset + 1),
                );
            }
        }
        if commit.count() > 0
            && let Err(e) = c.commit(&commit, CommitMode::Sync)
        {
            log("WARN", format_args!("commit before rebalance: {e}"));
        }
    }

    fn post_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let partitions = |tpl: &TopicPartitionList| -> Vec<i32> {
            tpl.elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect()
        };
        let event = match rebalance {
            Rebalance::Assign(tpl) => Assignment::Assigned(partitions(tpl)),
            Rebalance::Revoke(tpl) => Assignment::Revoked(partitions(tpl)),
            Rebalance::Error(e) => {
                log("WARN", format_args!("rebalance failed: {e}"));
                return;
            }
        };
        let _ = self.events.send(event);
    }
}

type GroupConsumer = StreamConsumer<GroupContext>;
/// The last offset of each partition whose batch is scored and delivered.
type Done = Arc<std::sync::Mutex<HashMap<i32, i64>>>;

struct Worker {
    queue: mpsc::Sender<OwnedMessage>,
    task: JoinHandle<()>,
}

/// The pipeline: the merchant table reader, the group consumer and one task
/// per assigned partition, until `stop` turns true.
pub async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let s = &shared.settings;
    let producer = producer(s)?;
    let tables = tokio::spawn(super::tables::run(shared.clone(), stop.clone()));

    let (events_tx, events) = std::sync::mpsc::channel();
    let done: Done = Arc::default();
    let context = GroupContext {
        shared: shared.clone(),
        topic: s.input_topic.clone(),
        events: events_tx,
        done: done.clone(),
    };
    // Without new data a fetch waits this long on the broker: it bounds the
    // latency a quiet partition adds. Overridable with -X.
    let mut c = client_config_with(s, &[("fetch.wait.max.ms", "10")]);
    c.set("group.id", &s.group_id)
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000")
        // Offsets are committed only as the partition tasks finish them
        // (`done`): librdkafka's own commits, on close in particular, would
        // commit the fetch position, past events not yet scored.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let consumer: Arc<GroupConsumer> = Arc::new(c.create_with_context(context)?);
    consumer.subscribe(&[&s.input_topic])?;
    log(
        "INFO",
        format_args!(
            "consuming {} as group {} from {}",
            s.input_topic, s.group_id, s.brokers
        ),
    );

    let mut workers: HashMap<i32, Worker> = HashMap::new();
    let mut commit_tick = tokio::time::interval(Duration::from_secs(1));
    let mut finished: Vec<JoinHandle<()>> = Vec::new();
    loop {
        while let Ok(event) = events.try_recv() {
            match event {
                Assignment::Assigned(ps) => {
                    log("INFO", format_args!("assigned partitions {ps:?}"));
                    shared.metrics.partitions.add(ps.len() as i64);
                }
                Assignment::Revoked(ps) => {
                    log("INFO", format_args!("revoked partitions {ps:?}"));
                    shared.metrics.partitions.sub(ps.len() as i64);
                    for p in ps {
                        done.lock().unwrap_or_else(|e| e.into_inner()).remove(&p);
                        shared.metrics.consumer_lag.reset();
                        shared
                            .partitions
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&p);
                        if let Some(w) = workers.remove(&p) {
                            // Dropping the queue lets the task finish what it holds.
                            finished.push(w.task);
                        }
                    }
                }
            }
        }
        let msg = tokio::select! {
            _ = stop.changed() => break,
            _ = commit_tick.tick() => {
                commit(&consumer, &s.input_topic, &done, CommitMode::Async);
                continue;
            }
            m = consumer.recv() => m,
        };
        let msg = match msg {
            Ok(m) => m.detach(),
            Err(e) => {
                log("WARN", format_args!("consumer: {e}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        shared.metrics.consumed.inc();
        let p = msg.partition();
        let worker = workers.entry(p).or_insert_with(|| {
            let engine: CardEngine = Arc::new(std::sync::Mutex::new(shared.new_engine()));
            shared
                .partitions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(p, engine.clone());
            let (queue, rx) = mpsc::channel(QUEUE);
            let task = tokio::spawn(partition_task(
                Partition {
                    shared: shared.clone(),
                    consumer: consumer.clone(),
                    producer: producer.clone(),
                    partition: p,
                    engine,
                    done: done.clone(),
                    stop: stop.clone(),
                },
                rx,
            ));
            Worker { queue, task }
        });
        if worker.queue.send(msg).await.is_err() {
            log("ERROR", format_args!("the task of partition {p} stopped"));
            workers.remove(&p);
        }
    }

    // Stop fetching; let every task finish its queue, then commit.
    finished.extend(workers.into_values().map(|w| w.task));
    for task in finished {
        let _ = task.await;
    }
    let _ = tokio::task::spawn_blocking({
        let producer = producer.clone();
        move || rdkafka::producer::Producer::flush(&producer, Duration::from_secs(30))
    })
    .await;
    commit(&consumer, &s.input_topic, &done, CommitMode::Sync);
    let _ = tables.await;
    let (alert_p50, alert_p99, score_p50, score_p99) = {
        let l = shared.latency.lock().unwrap_or_else(|e| e.into_inner());
        (
            l.event_to_alert_us.value_at_quantile(0.5) as f64 / 1000.0,
            l.event_to_alert_us.value_at_quantile(0.99) as f64 / 1000.0,
            l.scoring_ns.value_at_quantile(0.5) as f64 / 1000.0,
            l.scoring_ns.value_at_quantile(0.99) as f64 / 1000.0,
        )
    };
    log(
        "INFO",
        format_args!(
            "Kafka pipeline stopped after scoring {} transactions; event-to-alert p50 {alert_p50:.1} ms p99 {alert_p99:.1} ms; scoring p50 {score_p50:.2} µs p99 {score_p99:.2} µs",
            shared.metrics.scored.get()
        ),
    );
    Ok(())
}

fn take(shared: &Shared, batch: &mut Vec<OwnedMessage>, taken: &mut i64, m: OwnedMessage) {
    if m.offset() <= *taken {
        shared.metrics.redelivered.inc();
        return;
    }
    *taken = m.offset();
    batch.push(m);
}

/// Commits the offsets after the last finished batch of each partition.
fn commit(consumer: &GroupConsumer, topic: &str, done: &Done, mode: CommitMode) {
    let done = done.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if done.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (p, offset) in &done {
        if tpl
            .add_partition_offset(topic, *p, Offset::Offset(offset + 1))
            .is_err()
        {
            return;
        }
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        log("WARN", format_args!("offset commit: {e}"));
    }
}

/// What the task of one partition works with.
struct Partition {
    shared: Arc<Shared>,
    consumer: Arc<GroupConsumer>,
    producer: FutureProducer,
    partition: i32,
    engine: CardEngine,
    done: Done,
    stop: watch::Receiver<bool>,
}

async fn partition_task(p: Partition, mut rx: mpsc::Receiver<OwnedMessage>) {
    let Partition {
        shared,
        consumer,
        producer,
        partition,
        engine,
        done,
        stop,
    } = p;
    let Some(first) = rx.recv().await else {
        return;
    };
    // Merchant features read the table, so scoring waits until it holds
    // what the topics held at start.
    while !shared.tables_ready.load(Ordering::Acquire) {
        if *stop.borrow() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Where this group left off. A broker may answer a fetch from inside a
    // producer's batch with the next batch (tansu 0.6 does), so the first
    // message can be past the committed offset: the gap is read with the
    // history, and scored.
    let committed = committed_offset(&consumer, &shared.settings.input_topic, partition).await;
    let gap_from = committed.filter(|&c| c < first.offset());
    if let Some(c) = gap_from {
        log(
            "WARN",
            format_args!(
                "partition {partition}: the broker resumed at offset {} instead of the committed {c}; reading the gap",
                first.offset()
            ),
        );
    }
    let t = first.timestamp().to_millis();
    let mut gap = Vec::new();
    if shared.settings.rebuild_on_assign || gap_from.is_some() {
        match rebuild(
            &shared,
            partition,
            first.offset(),
            gap_from,
            t,
            &engine,
            &stop,
        )
        .await
        {
            Ok((n, missed)) => {
                log(
                    "INFO",
                    format_args!(
                        "partition {partition}: card state rebuilt from {n} transactions before offset {}",
                        first.offset()
                    ),
                );
                shared.metrics.consumed.inc_by(missed.len() as u64);
                gap = missed;
            }
            Err(e) => log(
                "ERROR",
                format_args!("partition {partition}: rebuild failed: {e:#}"),
            ),
        }
    }
    gap.push(first);
    let mut batch = gap;
    // Offsets only grow within a partition: one already taken is a
    // redelivery (tansu 0.6 sends a partition's last batch again after a
    // fetch resumed inside a batch) and must not reach the card state twice.
    let mut taken = batch.last().map_or(-1, |m| m.offset());
    let (to_acker, batches) = mpsc::channel(IN_FLIGHT);
    let acker = tokio::spawn(acker(
        shared.clone(),
        producer.clone(),
        partition,
        engine.clone(),
        done,
        stop.clone(),
        batches,
    ));
    loop {
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => take(&shared, &mut batch, &mut taken, m),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            let decoded: Vec<_> = batch
                .iter()
                .map(|m| decode(m.payload(), shared.settings.max_message_bytes))
                .collect();
            let newest = decoded
                .iter()
                .filter_map(|d| d.as_ref().ok().map(|tx| tx.time.utc))
                .max();
            if let (Some(t), Some(last)) = (newest, batch.last()) {
                wait_for_table(&shared, partition, last.offset(), t).await;
            }
            let scorer = shared.scorer();
            let out = score_batch(&shared, &scorer, &engine, &batch, decoded);
            let pending = send_all(&producer, out).await;
            let last = batch.last().map_or(0, |m| m.offset());
            if to_acker.send((last, pending)).await.is_err() {
                // The acker stopped: delivery gave up at shutdown.
                break;
            }
        }
        batch.clear();
        match rx.recv().await {
            Some(m) => take(&shared, &mut batch, &mut taken, m),
            None => break,
        }
    }
    drop(to_acker);
    let stored = acker.await.ok().flatten();
    log(
        "INFO",
        format_args!("partition {partition}: stopped; last offset done {stored:?}"),
    );
}

/// The longest a batch waits for the merchant table to read up to its
/// event time; a partition that stalls must not stall the others for long.
const TABLE_WAIT: Duration = Duration::from_secs(5);

/// Waits until the merchant table holds this partition's transactions
/// through `offset` and every other partition's before `t`, so merchant
/// features do not depend on which reader ran ahead.
async fn wait_for_table(shared: &Shared, partition: i32, offset: i64, t: i64) {
    let clock = &shared.table_clock;
    if clock.holds(partition, offset, t) {
        return;
    }
    let deadline = Instant::now() + TABLE_WAIT;
    loop {
        let moved = clock.moved.notified();
        if clock.holds(partition, offset, t) {
            return;
        }
        if Instant::now() >= deadline {
            shared.metrics.table_wait_timeouts.inc();
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(20), moved).await;
    }
}

/// Scores a batch under the locks, and returns what to produce.
fn score_batch(
    shared: &Shared,
    scorer: &Scorer,
    engine: &CardEngine,
    batch: &[OwnedMessage],
    decoded: Vec<Result<Transaction, (DeadReason, String)>>,
) -> Vec<Outgoing> {
    let s = &shared.settings;
    let m = &shared.metrics;
    let produced_at = now_rfc3339();
    let mut out = Vec::new();
    let mut engine = engine.lock().unwrap_or_else(|e| e.into_inner());
    let merchants = shared.merchants.read().unwrap_or_else(|e| e.into_inner());
    let mut latency = shared.latency.lock().unwrap_or_else(|e| e.into_inner());
    for (msg, decoded) in batch.iter().zip(decoded) {
        let tx = match decoded {
            Ok(tx) => tx,
            Err((reason, detail)) => {
                m.dead_letters.with_label_values(&[reason.as_str()]).inc();
                out.push(Outgoing {
                    topic: s.dlq_topic.clone(),
                    key: msg.key().unwrap_or_default().to_vec(),
                    payload: msg.payload().unwrap_or_default().to_vec(),
                    headers: vec![
                        ("peregrine-reason", reason.as_str().to_string()),
                        ("peregrine-error", detail),
                        ("peregrine-source-topic", msg.topic().to_string()),
                        ("peregrine-source-partition", msg.partition().to_string()),
                        ("peregrine-source-offset", msg.offset().to_string()),
                    ],
                    alert_of: None,
                });
                continue;
            }
        };
        let started = Instant::now();
        let (features, late) = merchants.features(&mut engine, &tx, true);
        if late.is_some() {
            m.late.inc();
        }
        let score = scorer.score(&features, false);
        let took = started.elapsed();
        m.scoring_seconds.observe(took.as_secs_f64());
        let _ = latency.scoring_ns.record(took.as_nanos().max(1) as u64);
        m.score.observe(score.score);
        m.scored.inc();
        let version = scorer.model.model_version.as_str();
        if score.decision != Decision::Allow {
            m.alerts.with_label_values(&[score.decision.as_str()]).inc();
            for hit in &score.reasons.rules {
                m.rule_alerts.with_label_values(&[&hit.rule]).inc();
            }
            let alert = Alert::new(&tx, &score, version, produced_at.clone());
            out.push(Outgoing {
                topic: s.alert_topic.clone(),
                key: tx.card_id.as_bytes().to_vec(),
                payload: serde_json::to_vec(&alert).unwrap_or_default(),
                headers: Vec::new(),
                alert_of: msg.timestamp().to_millis(),
            });
        }
        if !s.score_topic.is_empty() {
            let record = serde_json::json!({
                "transaction_id": tx.transaction_id,
                "card_id": tx.card_id,
                "merchant_id": tx.merchant_id,
                "score": score.score,
                "decision": score.decision,
                "model_version": version,
                "partition": msg.partition(),
                "offset": msg.offset(),
            });
            out.push(Outgoing {
                topic: s.score_topic.clone(),
                key: tx.card_id.as_bytes().to_vec(),
                payload: record.to_string().into_bytes(),
                headers: Vec::new(),
                alert_of: None,
            });
        }
    }
    out
}

fn send(
    producer: &FutureProducer,
    o: &Outgoing,
) -> Result<DeliveryFuture, rdkafka::error::KafkaError> {
    let mut headers = OwnedHeaders::new();
    for (k, v) in &o.headers {
        headers = headers.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    let record = FutureRecord::to(&o.topic)
        .key(&o.key)
        .payload(&o.payload)
        .headers(headers);
    producer.send_result(record).map_err(|(e, _)| e)
}

type Pending = Vec<(Outgoing, DeliveryFuture)>;

/// Hands every message to the producer; waits only while its queue is full.
async fn send_all(producer: &FutureProducer, out: Vec<Outgoing>) -> Pending {
    let mut pending = Vec::with_capacity(out.len());
    for o in out {
        loop {
            match send(producer, &o) {
                Ok(f) => {
                    pending.push((o, f));
                    break;
                }
                // The local queue is full: let deliveries drain it.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    pending
}

/// Waits for the broker to acknowledge every message, sending again what
/// failed. False if stopped before all were acknowledged.
async fn settle(
    shared: &Shared,
    producer: &FutureProducer,
    mut pending: Pending,
    stop: &watch::Receiver<bool>,
) -> bool {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut failed = Vec::new();
        for (o, f) in pending {
            match f.await {
                Ok(Ok(_)) => {
                    if let Some(ts) = o.alert_of {
                        record_alert_latency(shared, ts);
                    }
                }
                Ok(Err((e, _))) => {
                    log("WARN", format_args!("delivery to {} failed: {e}", o.topic));
                    failed.push(o);
                }
                Err(_) => failed.push(o),
            }
        }
        if failed.is_empty() {
            return true;
        }
        shared.metrics.delivery_retries.inc_by(failed.len() as u64);
        if *stop.borrow() {
            return false;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
        pending = send_all(producer, failed).await;
    }
}

fn record_alert_latency(shared: &Shared, record_ts: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    if now >= record_ts {
        let ms = now - record_ts;
        shared
            .metrics
            .event_to_alert_seconds
            .observe(ms as f64 / 1000.0);
        let mut l = shared.latency.lock().unwrap_or_else(|e| e.into_inner());
        let _ = l.event_to_alert_us.record((ms * 1000).max(1) as u64);
    }
}

/// Settles a partition's batches in order and marks each one's last offset
/// done once all its messages are acknowledged, while the partition task
/// goes on scoring: a batch does not wait for the previous one's round trip.
async fn acker(
    shared: Arc<Shared>,
    producer: FutureProducer,
    partition: i32,
    engine: CardEngine,
    done: Done,
    stop: watch::Receiver<bool>,
    mut batches: mpsc::Receiver<(i64, Pending)>,
) -> Option<i64> {
    let mut stored = None;
    while let Some((last, pending)) = batches.recv().await {
        if !settle(&shared, &producer, pending, &stop).await {
            break;
        }
        // A revoked partition's progress is no longer ours to commit.
        let ours = shared
            .partitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&partition)
            .is_some_and(|e| Arc::ptr_eq(e, &engine));
        if ours {
            done.lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(partition, last);
        }
        stored = Some(last);
    }
    stored
}

/// The group's committed offset of a partition, if any.
async fn committed_offset(
    consumer: &Arc<GroupConsumer>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let consumer = consumer.clone();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&topic, partition);
        let c = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .ok()?;
        match c.find_partition(&topic, partition)?.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
    })
    .await
    .ok()
    .flatten()
}

/// Reads a partition's history before `upto`, from one feature horizon
/// before the first record to score, located on record timestamps with
/// `offsets_for_times` (with the producer's clock near event time, that
/// covers every window). Records before `score_from` rebuild the card state
/// (when rebuilding is on); records from it on are returned, to be scored.
async fn rebuild(
    shared: &Arc<Shared>,
    partition: i32,
    upto: i64,
    score_from: Option<i64>,
    first_ts: Option<i64>,
    engine: &CardEngine,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<(u64, Vec<OwnedMessage>)> {
    let shared = shared.clone();
    let engine = engine.clone();
    let stop = stop.clone();
    tokio::task::spawn_blocking(move || {
        let s = &shared.settings;
        let cfg = shared.feature_config();
        let consumer: BaseConsumer = client_config(s)
            .set("group.id", format!("{}-rebuild", s.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()?;
        if upto == 0 {
            return Ok((0, Vec::new()));
        }
        let horizon_ms = (32 * 86_400 + cfg.allowed_lateness_secs) * 1000;
        let start = match first_ts {
            Some(ts) => {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(
                    &s.input_topic,
                    partition,
                    Offset::Offset(ts - horizon_ms),
                )?;
                let found = consumer.offsets_for_times(tpl, Duration::from_secs(10))?;
                match found
                    .find_partition(&s.input_topic, partition)
                    .map(|e| e.offset())
                {
                    Some(Offset::Offset(o)) => o,
                    // No record that old or newer: nothing before `upto` to read.
                    _ => upto,
                }
            }
            None => 0,
        };
        let score_from = score_from.unwrap_or(upto);
        let fold = shared.settings.rebuild_on_assign;
        let start = if fold { start } else { score_from }.min(score_from);
        if start >= upto {
            return Ok((0, Vec::new()));
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&s.input_topic, partition, Offset::Offset(start))?;
        consumer.assign(&tpl)?;
        let merchants_unused = shared.new_engine();
        let mut n = 0u64;
        let mut missed = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if *stop.borrow() || Instant::now() > deadline {
                anyhow::bail!("stopped after {n} transactions, before offset {upto}");
            }
            let Some(r) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let msg = match r {
                Ok(m) => m,
                Err(rdkafka::error::KafkaError::PartitionEOF(_)) => break,
                Err(e) => {
                    log(
                        "WARN",
                        format_args!("rebuild of partition {partition}: {e}"),
                    );
                    continue;
                }
            };
            if msg.offset() >= upto {
                break;
            }
            if msg.offset() >= score_from {
                missed.push(msg.detach());
            } else if let Ok(tx) = decode(msg.payload(), s.max_message_bytes) {
                let mut e = engine.lock().unwrap_or_else(|e| e.into_inner());
                // Late events are left out here exactly as they were live.
                let _ = e.process_card(&tx, &merchants_unused);
                n += 1;
            }
            if msg.offset() + 1 >= upto {
                break;
            }
        }
        shared.metrics.rebuilt.inc_by(n);
        Ok((n, missed))
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_names_what_is_wrong() {
        let ok = br#"{"transaction_id":"t1","timestamp":"2018-04-01T00:00:31Z","card_id":"c","merchant_id":"m","amount":5}"#;
        assert!(decode(Some(ok), 1024).is_ok());
        assert_eq!(decode(None, 1024).unwrap_err().0, DeadReason::Empty);
        assert_eq!(decode(Some(ok), 10).unwrap_err().0, DeadReason::Oversize);
        assert_eq!(
            decode(Some(b"{oops"), 1024).unwrap_err().0,
            DeadReason::NotJson
        );
        let (reason, detail) = decode(
            Some(br#"{"transaction_id":"t1","timestamp":"2018-04-01T00:00:31Z","card_id":"c","merchant_id":"m","amount":"x"}"#),
            1024,
        )
        .unwrap_err();
        assert_eq!(reason, DeadReason::InvalidField);
        assert!(detail.contains("amount"), "{detail}");
    }
}
