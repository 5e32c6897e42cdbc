//! The task of one input partition: its cards' state, scoring, alerts.
//!
//! On assignment it restores the partition's card state from the cards
//! changelog (the newest snapshot and the deltas since), then reads its
//! input from the offset after that checkpoint: records the group already
//! committed (their alerts were delivered) only rebuild the state; from
//! the committed offset on, records are scored.
//!
//! Each transaction's merchant event goes to the merchant-events topic as
//! soon as the record is read, ahead of scoring, with the partition's
//! progress after it. A transaction is scored once the merchant table is
//! complete up to `merchant_max_lag_secs` before its event time (waiting at
//! most `merchant_wait_ms`): in live traffic it always is, so nothing waits.
//!
//! Every `checkpoint_interval_secs`, and when the partition is revoked or
//! the service stops, the cards changed since the last checkpoint go to the
//! changelog, then a marker with the offset they reflect, once everything up
//! to that offset is acknowledged.

use super::assigned::Lease;
use super::changelog::{self, Entry, Writer};
use super::entity_inbox::EntityInbox;
use super::events::{EntityRow, MerchantEvent, Source};
use super::health::Progress;
use super::label_inbox::LabelSide;
use super::merchants::table::Frontier;
use super::output::record_clock;
use super::output::{Outgoing, Pending, dead_letter, send_all, settle};
use super::partition::{
    Control, Next, PartitionInput, Phase, PhaseGauge, Role, TaskContext, commit, committed,
    restore_retrying,
};
use super::state::CardEngine;
use crate::alerts::{Alert, now_rfc3339};
use crate::features::card::CardState;
use crate::features::declared::{Program, Scratch, entity_mask};
use crate::features::entities::log_key;
use crate::features::merchant::MerchantView;
use crate::features::store::key_hash;
use crate::features::{Engine, EngineClock, Keys, Refused};
use crate::ingest::Transaction;
use crate::ingest::decode::{DeadReason, Limits, decode};
use crate::model::scorer::Decision;
use crate::telemetry::log;
use rdkafka::Message;
use rdkafka::consumer::CommitMode;
use rdkafka::message::OwnedMessage;
use rdkafka::topic_partition_list::Offset;
use serde::{Deserialize, Serialize};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Transactions scored together: their alerts are sent and acknowledged
/// as one.
const BATCH: usize = 2048;
/// Transactions scored in one run on an async worker. A backlog's batches
/// are scored back to back with every await ready at once; between slices
/// the task yields, so that the probes and HTTP requests sharing the
/// workers wait for a slice (a few milliseconds), not for a backlog (16 s
/// was seen before).
const SLICE: usize = 256;
/// Records read and forwarded but not yet scored.
const MAX_PENDING: usize = 8192;
/// Batches sent but not yet acknowledged.
const IN_FLIGHT: usize = 16;
/// Least time between two progress records of a partition.
const PROGRESS_EVERY: Duration = Duration::from_millis(10);
/// Most time between two progress records of a running partition: the
/// merchant table tells a partition that runs from one that does not by them.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A wait for the merchant table this long is logged, and again as often.
pub const LONG_WAIT: Duration = Duration::from_secs(10);
/// How far ahead of the oldest record not yet scored, in event time, a
/// partition sends merchant events. In live traffic records are scored as
/// they come and this never binds; when a backlog is read, it keeps the
/// merchant table from running so far ahead of the transactions scored
/// that a merchant's kept times no longer reach back to them.
const FORWARD_LEAD: i64 = 6 * 3600;

/// What a card checkpoint's marker carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CardCheckpoint {
    /// The last input offset the state reflects.
    pub input_offset: i64,
    pub clock: EngineClock,
    /// Where the entity values of the events after `input_offset` start in
    /// the partition's entity-features topic, when the features file has
    /// entities besides the card.
    #[serde(default)]
    pub entity_features: Option<i64>,
    /// Where the card labels not yet in the state start in the partition's
    /// card-labels topic, when the features file has label-delayed card
    /// windows.
    #[serde(default)]
    pub card_labels: Option<i64>,
}

/// A record read, its merchant event sent, waiting to be scored.
struct Fetched {
    msg: OwnedMessage,
    tx: Result<Transaction, (DeadReason, String)>,
    /// Before the committed offset: already scored and alerted by the
    /// partition's previous owner; only folded into the state.
    rebuild_only: bool,
    /// Its transaction is already in the card's state or earlier in
    /// `pending`: a second delivery, which changes nothing.
    duplicate: bool,
    /// Its (card, transaction id) hashes while it holds them in
    /// `CardTask::in_flight`, to release once it is folded in.
    in_flight: Option<(u64, u64)>,
    merchant_event: Option<(Outgoing, rdkafka::producer::DeliveryFuture)>,
    /// The entities besides the card whose values it waits for (bit `k`
    /// for the `k`-th), since when.
    entities: (u8, Option<Instant>),
}

pub async fn run(ctx: Arc<TaskContext>, mut input: PartitionInput, mut control: Control) {
    let p = input.partition();
    let mut phase = PhaseGauge::new(ctx.state.clone(), Role::Cards);
    if !control.assigned().await {
        return;
    }
    phase.set(Phase::Restoring);
    let what = format!("input partition {p}");
    let Some(restored) = restore_retrying(&control, &what, || restore(&ctx, p, &control)).await
    else {
        return;
    };
    let start = match restored.checkpoint_offset {
        Some(i) => Offset::Offset(i + 1),
        None => Offset::Beginning,
    };
    if let Err(e) = input.start_at(start).await {
        log("ERROR", format_args!("input partition {p}: {e:#}"));
        return;
    }
    let entity_side = match EntitySide::start(&ctx, p, restored.entity_features) {
        Ok(side) => side,
        Err(e) => {
            log(
                "ERROR",
                format_args!("input partition {p}: entity features: {e:#}"),
            );
            return;
        }
    };
    let label_side = match &ctx.card_labels {
        None => None,
        Some(reader) => match LabelSide::start(
            reader,
            p,
            restored.card_labels,
            ctx.layout.label_partitions,
            Duration::from_millis(ctx.state.settings.merchant_wait_ms),
        ) {
            Ok(side) => Some(side),
            Err(e) => {
                log(
                    "ERROR",
                    format_args!("input partition {p}: card labels: {e:#}"),
                );
                return;
            }
        },
    };
    let mut task = CardTask::new(ctx.clone(), p, restored, entity_side, label_side);
    task.run(&mut input, &mut control, &mut phase).await;
    phase.set(Phase::Draining);
    task.drain().await;
    ctx.state.remove_partition(p);
    log(
        "INFO",
        format_args!(
            "input partition {p}: drained; done through offset {:?}",
            task.done()
        ),
    );
}

/// A partition's restored state and where it stands.
struct Restored {
    engine: Engine,
    writer: Writer,
    /// The last input offset the restored state reflects.
    checkpoint_offset: Option<i64>,
    /// The group's committed offset: records before it are only folded in.
    committed: Option<i64>,
    entity_features: Option<i64>,
    card_labels: Option<i64>,
}

async fn restore(ctx: &Arc<TaskContext>, p: i32, control: &Control) -> anyhow::Result<Restored> {
    let started = Instant::now();
    let c = ctx.clone();
    let drain = control.drain.clone();
    let (engine, writer, marker, records) = tokio::task::spawn_blocking(move || {
        let mut engine = c.state.new_card_engine();
        let mut writer = Writer::new(c.producer.clone(), &c.topics.cards_changelog, p);
        if !c.state.settings.rebuild_on_assign {
            return anyhow::Ok((engine, writer, None, 0));
        }
        let reader = super::kafka::reader(&c.state.settings, &c.topics.cards_group)?;
        let stopped = || *drain.borrow();
        let restored =
            changelog::restore::<CardCheckpoint>(&reader, &c.topics.cards_changelog, p, &stopped)?;
        let mut state_bytes = 0u64;
        let mut unreadable = 0u64;
        for (key, value) in &restored.values {
            let (Ok(key), Some(card)) = (<[u8; 8]>::try_from(&key[..]), CardState::decode(value))
            else {
                unreadable += 1;
                continue;
            };
            state_bytes += value.len() as u64 + 8;
            engine.insert_card(u64::from_le_bytes(key), card);
        }
        if unreadable > 0 {
            // A layout this build cannot read (a newer release's, after a
            // downgrade) loses those cards' history: say so.
            log(
                "WARN",
                format_args!(
                    "input partition {p}: {unreadable} card records in {} this build cannot decode; those cards start empty",
                    c.topics.cards_changelog
                ),
            );
        }
        if let Some(m) = &restored.marker {
            engine.set_clock(m.state.clock);
        }
        // Nothing restored counts as changed: only what changes from here.
        let _ = engine.take_changes();
        writer.resume(state_bytes, restored.bytes.saturating_sub(state_bytes));
        let metric = &c.state.metrics.records_read;
        metric
            .with_label_values(&[&c.topics.cards_changelog])
            .inc_by(restored.records);
        Ok((engine, writer, restored.marker, restored.records))
    })
    .await??;
    let consumer = ctx.consumer.clone();
    let topic = ctx.topics.input.clone();
    let committed = tokio::task::spawn_blocking(move || committed(&consumer, &topic, p)).await?;
    ctx.state
        .metrics
        .restore_records
        .with_label_values(&["changelog"])
        .inc_by(records);
    let checkpoint_offset = marker.as_ref().map(|m| m.state.input_offset);
    let entity_features = marker.as_ref().and_then(|m| m.state.entity_features);
    let card_labels = marker.as_ref().and_then(|m| m.state.card_labels);
    log(
        "INFO",
        format_args!(
            "input partition {p}: restored {} cards from {records} changelog records in {:.2}s; \
             checkpoint at input offset {checkpoint_offset:?}, committed {committed:?}",
            engine.cards(),
            started.elapsed().as_secs_f64()
        ),
    );
    Ok(Restored {
        engine,
        writer,
        checkpoint_offset,
        committed,
        entity_features,
        card_labels,
    })
}

struct CardTask {
    ctx: Arc<TaskContext>,
    partition: i32,
    limits: Limits,
    engine: CardEngine,
    pending: VecDeque<Fetched>,
    /// (card, transaction id) hashes of the records in `pending` that are
    /// not duplicates, so a second delivery is known before the first is
    /// folded in.
    in_flight: HashSet<(u64, u64)>,
    /// The first records of `pending` whose merchant events are sent (or
    /// that have none to send).
    forwarded: usize,
    rebuild_until: i64,
    /// The last offset folded into the state.
    folded: i64,
    /// Newest event time forwarded, and whether the partition is read to its end.
    forwarded_max: i64,
    idle: bool,
    sent_progress: Option<(i64, bool)>,
    progress_at: Instant,
    /// Since when the head of `pending` has waited for the merchant table.
    blocked_since: Option<Instant>,
    /// When a long wait was last logged.
    wait_logged: Option<Instant>,
    frontier: Frontier,
    /// Sources the frontier leaves out as stuck, last time.
    stuck: usize,
    to_acker: Option<mpsc::Sender<(i64, Pending)>>,
    acker: Option<tokio::task::JoinHandle<()>>,
    done: watch::Receiver<i64>,
    /// Locked by the checkpoint being written, if any.
    writer: Arc<tokio::sync::Mutex<Writer>>,
    checkpoint: Option<tokio::task::JoinHandle<()>>,
    checkpointed: i64,
    snapshot_start: Arc<Mutex<Option<i64>>>,
    stopping: Arc<AtomicBool>,
    /// Offsets read and finished, for readiness.
    progress: Arc<Progress>,
    /// When the features file has entities besides the card: their rows
    /// out, their values in.
    entity_side: Option<EntitySide>,
    /// When it has label-delayed card windows: the fraud labels in.
    label_side: Option<LabelSide>,
}

/// A card task's side of the entity stage.
struct EntitySide {
    program: Arc<Program>,
    scratch: Scratch,
    inbox: Arc<EntityInbox>,
    _lease: Lease,
    /// How long an event waits for its entities' values.
    wait: Duration,
    wait_logged: Option<Instant>,
}

impl EntitySide {
    fn start(ctx: &TaskContext, p: i32, from: Option<i64>) -> anyhow::Result<Option<EntitySide>> {
        let (Some(program), Some(reader)) = (&ctx.state.plan().program, &ctx.entity_values) else {
            return Ok(None);
        };
        let inbox = Arc::new(EntityInbox::new(from));
        Ok(Some(EntitySide {
            program: program.clone(),
            scratch: Scratch::default(),
            _lease: reader.open(p, from, inbox.clone())?,
            inbox,
            wait: Duration::from_millis(ctx.state.settings.merchant_wait_ms),
            wait_logged: None,
        }))
    }

    /// Whether a record may be scored: its entities' values came, or it
    /// waited long enough.
    fn ready(&self, f: &Fetched) -> bool {
        let (mask, since) = f.entities;
        mask == 0
            || since.is_some_and(|t| t.elapsed() >= self.wait)
            || self.inbox.has(f.msg.offset(), mask)
    }
}

impl CardTask {
    fn new(
        ctx: Arc<TaskContext>,
        partition: i32,
        restored: Restored,
        entity_side: Option<EntitySide>,
        label_side: Option<LabelSide>,
    ) -> CardTask {
        let engine: CardEngine = Arc::new(Mutex::new(restored.engine));
        let folded = restored.checkpoint_offset.unwrap_or(-1);
        let (done_tx, done) = watch::channel(folded);
        let (to_acker, batches) = mpsc::channel(IN_FLIGHT);
        let stopping = Arc::new(AtomicBool::new(false));
        let progress = ctx.state.health().progress(folded);
        let acker = tokio::spawn(acker(
            ctx.clone(),
            partition,
            batches,
            (done_tx, progress.clone()),
            stopping.clone(),
        ));
        CardTask {
            partition,
            engine,
            pending: VecDeque::new(),
            in_flight: HashSet::new(),
            forwarded: 0,
            rebuild_until: restored.committed.unwrap_or(0),
            folded,
            forwarded_max: i64::MIN,
            idle: false,
            sent_progress: None,
            progress_at: Instant::now(),
            blocked_since: None,
            wait_logged: None,
            limits: Limits::of(&ctx.state.settings),
            frontier: Frontier::new(
                Some(Source::Input(partition)),
                Duration::from_millis(ctx.state.settings.merchant_wait_ms),
            ),
            stuck: 0,
            to_acker: Some(to_acker),
            acker: Some(acker),
            done,
            writer: Arc::new(tokio::sync::Mutex::new(restored.writer)),
            checkpoint: None,
            checkpointed: folded,
            snapshot_start: Arc::new(Mutex::new(None)),
            stopping,
            progress,
            entity_side,
            label_side,
            ctx,
        }
    }

    fn done(&self) -> i64 {
        *self.done.borrow()
    }

    async fn run(
        &mut self,
        input: &mut PartitionInput,
        control: &mut Control,
        phase: &mut PhaseGauge,
    ) {
        let s = &self.ctx.state.settings;
        let mut checkpoint_tick =
            tokio::time::interval(Duration::from_secs(s.checkpoint_interval_secs.max(1)));
        checkpoint_tick.tick().await;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let max_lag = s.merchant_max_lag_secs;
        loop {
            let blocked = self.head_blocked(max_lag);
            let version = blocked.map_or(0, |(_, v)| v);
            tokio::select! {
                biased;
                _ = control.drained() => return,
                _ = checkpoint_tick.tick() => self.checkpoint(false),
                next = input.next(), if self.pending.len() < MAX_PENDING => {
                    self.take(next);
                    while self.pending.len() < MAX_PENDING {
                        match input.try_next().await {
                            Some(next) => self.take(next),
                            None => break,
                        }
                    }
                    self.forward().await;
                }
                _ = self.ctx.state.merchants().changed_since(version, Duration::from_millis(100)), if blocked.is_some() => {}
                _ = async { self.entity_side.as_ref().expect("checked").inbox.arrived().await }, if self.entity_side.is_some() => {}
                _ = async { self.label_side.as_ref().expect("checked").arrived().await }, if self.label_side.is_some() => {}
                _ = tick.tick() => {}
            }
            self.score(max_lag).await;
            self.forward().await;
            self.publish_progress(false).await;
            self.progress.unread(input.unread_since());
            if phase.phase() == Phase::Restoring
                && (self.folded + 1 >= self.rebuild_until || self.idle)
                && self.pending.front().is_none_or(|f| !f.rebuild_only)
            {
                phase.set(Phase::Running);
                self.ctx.state.add_partition(
                    self.partition,
                    self.engine.clone(),
                    self.progress.clone(),
                );
                log(
                    "INFO",
                    format_args!(
                        "input partition {}: running from offset {}",
                        self.partition,
                        self.folded + 1
                    ),
                );
            }
        }
    }

    /// Takes one record (or the partition's end) from the input.
    fn take(&mut self, next: Next) {
        match next {
            Next::End => self.idle = true,
            Next::Message(msg) => {
                self.idle = false;
                self.progress.read(msg.offset());
                let m = &self.ctx.state.metrics;
                let mut ignored = Vec::new();
                let tx = decode(
                    msg.payload(),
                    &self.limits,
                    record_clock(&msg),
                    &mut ignored,
                );
                if let Ok(tx) = &tx {
                    for e in &ignored {
                        m.fields_ignored.with_label_values(&[e.field]).inc();
                    }
                    // Partitioned by something else, a card's history is
                    // split: say so, but score it with what this partition holds.
                    if msg.key().is_some_and(|k| k != tx.card_id.as_bytes()) {
                        m.key_mismatch.inc();
                    }
                }
                let (duplicate, in_flight) = match &tx {
                    Ok(tx) => self.admit_id(tx),
                    Err(_) => (false, None),
                };
                let rebuild_only = msg.offset() < self.rebuild_until;
                if rebuild_only {
                    self.ctx
                        .state
                        .metrics
                        .restore_records
                        .with_label_values(&["input"])
                        .inc();
                } else {
                    self.ctx.state.metrics.consumed.inc();
                }
                self.pending.push_back(Fetched {
                    msg,
                    tx,
                    rebuild_only,
                    duplicate,
                    in_flight,
                    merchant_event: None,
                    entities: (0, None),
                });
            }
        }
    }

    /// Whether a transaction just read repeats one in the card's state or
    /// one still pending; if not, its id is held in `in_flight` from now,
    /// under the key returned.
    fn admit_id(&mut self, tx: &Transaction) -> (bool, Option<(u64, u64)>) {
        let keys = Keys::of(tx);
        if keys.transaction == 0 {
            return (false, None);
        }
        let id = (keys.card, keys.transaction);
        if !self.in_flight.insert(id) {
            return (true, None);
        }
        let seen = self
            .engine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_duplicate(keys, tx.time.utc);
        if seen {
            self.in_flight.remove(&id);
            return (true, None);
        }
        (false, Some(id))
    }

    /// Sends the merchant events of the records read, in offset order, up
    /// to [`FORWARD_LEAD`] ahead of the oldest not yet scored.
    async fn forward(&mut self) {
        let topic = &self.ctx.topics.merchant_events;
        let scorable = |f: &Fetched| !f.rebuild_only && !f.duplicate && f.tx.is_ok();
        let limit = self
            .pending
            .iter()
            .find(|f| scorable(f))
            .and_then(|f| f.tx.as_ref().ok())
            .map_or(i64::MAX, |tx| tx.time.utc.saturating_add(FORWARD_LEAD));
        let mut out = Vec::new();
        let mut at = Vec::new();
        let mut rows = Vec::new();
        let mut entities = Vec::new();
        while let Some(f) = self.pending.get(self.forwarded) {
            if let (true, Ok(tx)) = (scorable(f), &f.tx) {
                if tx.time.utc > limit {
                    break;
                }
                let event = MerchantEvent::Transaction {
                    source: Source::Input(self.partition),
                    offset: f.msg.offset(),
                    time: tx.time.utc,
                };
                out.push(Outgoing::new(
                    topic,
                    tx.merchant_id.as_bytes(),
                    event.encode(),
                ));
                if let Some(side) = &mut self.entity_side {
                    let keys = side.program.entity_keys(tx).0;
                    let mask = entity_mask(&keys);
                    if mask != 0 {
                        let row = side.program.entity_row(tx, &mut side.scratch);
                        for (k, key) in keys.iter().enumerate() {
                            let Some(key) = key else { continue };
                            let entity = EntityRow {
                                source: Source::Input(self.partition),
                                offset: f.msg.offset(),
                                time: tx.time.utc,
                                entity: k as u8 + 1,
                                row: row.clone(),
                            };
                            rows.push(Outgoing::new(
                                &self.ctx.topics.entity_events,
                                &log_key(k + 1, *key),
                                entity.encode(),
                            ));
                        }
                        entities.push((self.forwarded, mask));
                    }
                }
                at.push(self.forwarded);
                self.forwarded_max = self.forwarded_max.max(tx.time.utc);
            }
            self.forwarded += 1;
        }
        if out.is_empty() {
            return;
        }
        let now = Instant::now();
        for (i, mask) in entities {
            self.pending[i].entities = (mask, Some(now));
        }
        // Not awaited: a row lost with this instance is sent again by the
        // partition's next owner, and an event whose values do not come
        // waits for them only so long.
        drop(send_all(&self.ctx.state, &self.ctx.producer, rows).await);
        let sent = send_all(&self.ctx.state, &self.ctx.producer, out).await;
        for (i, s) in at.into_iter().zip(sent) {
            self.pending[i].merchant_event = Some(s);
        }
    }

    /// Tells every merchant partition how far this partition has come.
    async fn publish_progress(&mut self, force: bool) {
        let idle = self.idle && self.forwarded == self.pending.len();
        let now = (self.forwarded_max, idle);
        let changed = self.sent_progress != Some(now);
        let flip = self.sent_progress.is_none_or(|(_, i)| i != idle);
        let since = self.progress_at.elapsed();
        let due = (changed && (force || flip || since >= PROGRESS_EVERY)) || since >= HEARTBEAT;
        if !due {
            return;
        }
        let event = MerchantEvent::Progress {
            source: Source::Input(self.partition),
            watermark: self.forwarded_max,
            idle,
        }
        .encode();
        let mut topics = vec![&self.ctx.topics.merchant_events];
        if self.entity_side.is_some() {
            topics.push(&self.ctx.topics.entity_events);
        }
        let out = topics
            .into_iter()
            .flat_map(|topic| {
                Outgoing::to_every_partition(topic, self.ctx.layout.merchant_partitions, &event)
            })
            .collect();
        // Not awaited: a lost progress record is superseded by the next.
        drop(send_all(&self.ctx.state, &self.ctx.producer, out).await);
        self.sent_progress = Some(now);
        self.progress_at = Instant::now();
    }

    /// The event time the merchant table must reach before the head of the
    /// pending records can be scored, if it has not yet.
    fn head_blocked(&mut self, max_lag: i64) -> Option<(i64, u64)> {
        let need = match self.pending.front() {
            Some(Fetched {
                tx: Ok(tx),
                rebuild_only: false,
                duplicate: false,
                ..
            }) => tx.time.utc.saturating_sub(max_lag),
            _ => {
                self.blocked_since = None;
                return None;
            }
        };
        let version = self.ctx.state.merchants().version();
        let frontier = self.frontier();
        if frontier >= need {
            self.blocked_since = None;
            return None;
        }
        let since = *self.blocked_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= LONG_WAIT && self.wait_logged.is_none_or(|t| t.elapsed() >= LONG_WAIT)
        {
            self.wait_logged = Some(Instant::now());
            log(
                "WARN",
                format_args!(
                    "input partition {}: waiting {:.0}s for the merchant table to reach {need} \
                     (at {frontier}, held by {:?})",
                    self.partition,
                    since.elapsed().as_secs_f64(),
                    self.frontier.held_by()
                ),
            );
        }
        Some((need, version))
    }

    fn frontier(&mut self) -> i64 {
        let (frontier, stuck) = self.frontier.get(self.ctx.state.merchants());
        if stuck > self.stuck {
            self.ctx.state.metrics.table_wait_timeouts.inc();
            log(
                "WARN",
                format_args!(
                    "input partition {}: {stuck} merchant table sources have not moved for \
                     merchant_wait_ms; left out of the wait until they move",
                    self.partition
                ),
            );
        }
        self.stuck = stuck;
        frontier
    }

    /// Logs a head record that has waited this long for its entities'
    /// values, and again as often: the entity stage is restoring, held back
    /// by another input partition, or gone.
    fn log_entity_wait(&mut self) {
        let Some(side) = &mut self.entity_side else {
            return;
        };
        let Some(f) = self.pending.front().filter(|_| self.forwarded > 0) else {
            return;
        };
        let (mask, Some(since)) = f.entities else {
            return;
        };
        let came = side.inbox.came(f.msg.offset());
        if came & mask == mask
            || since.elapsed() < LONG_WAIT
            || side.wait_logged.is_some_and(|t| t.elapsed() < LONG_WAIT)
        {
            return;
        }
        side.wait_logged = Some(Instant::now());
        log(
            "WARN",
            format_args!(
                "input partition {}: offset {} waiting {:.0}s for its entities' values \
                 (entities {mask:#b}, came {came:#b})",
                self.partition,
                f.msg.offset(),
                since.elapsed().as_secs_f64()
            ),
        );
    }

    /// The time up to which every label reported has marked its row, once
    /// the labels come so far are applied: events up to it may be scored.
    /// The frontier is read first, so that every label before the progress
    /// it counts is among those applied.
    fn label_frontier(&mut self) -> i64 {
        let Some(side) = &mut self.label_side else {
            return i64::MAX;
        };
        let at = side.frontier(self.partition).time;
        let lateness = self.ctx.state.feature_config().allowed_lateness_secs;
        side.apply(
            &mut self.engine.lock().unwrap_or_else(|e| e.into_inner()),
            lateness,
        );
        let next = self
            .pending
            .iter()
            .find(|f| !f.rebuild_only && !f.duplicate);
        let waiting = next.is_some_and(|f| f.tx.as_ref().is_ok_and(|tx| tx.time.utc > at));
        side.bound_reading(waiting);
        at
    }

    /// Scores the pending records whose merchant features are complete, a
    /// batch at a time.
    async fn score(&mut self, max_lag: i64) {
        loop {
            let frontier = self.frontier();
            let labels_at = self.label_frontier();
            let mut n = 0;
            for f in self.pending.iter().take(self.forwarded) {
                if n == BATCH {
                    break;
                }
                let ready = f.rebuild_only
                    || f.duplicate
                    || f.tx.as_ref().map_or(true, |tx| {
                        tx.time.utc.saturating_sub(max_lag) <= frontier
                            && tx.time.utc <= labels_at
                            && self.entity_side.as_ref().is_none_or(|e| e.ready(f))
                    });
                if !ready {
                    break;
                }
                n += 1;
            }
            if n == 0 {
                self.log_entity_wait();
                return;
            }
            if let Some(since) = self.blocked_since.take() {
                self.ctx
                    .state
                    .metrics
                    .merchant_wait_seconds
                    .observe(since.elapsed().as_secs_f64());
            }
            let batch: Vec<Fetched> = self.pending.drain(..n).collect();
            self.forwarded -= n;
            self.score_batch(batch).await;
            tokio::task::yield_now().await;
        }
    }

    async fn score_batch(&mut self, batch: Vec<Fetched>) {
        let state = &self.ctx.state;
        let topics = &self.ctx.topics;
        let m = &state.metrics;
        let scorer = state.scorer();
        let views = state.merchants().views(
            &batch
                .iter()
                .map(|f| match (&f.tx, f.rebuild_only || f.duplicate) {
                    (Ok(tx), false) => (key_hash(&tx.merchant_id), tx.time.utc),
                    _ => (0, 0),
                })
                .collect::<Vec<_>>(),
        );
        let produced_at = now_rfc3339();
        let labelled = self.label_side.is_some();
        let mut out = Vec::new();
        let mut pending: Pending = Vec::new();
        let mut took = Vec::with_capacity(batch.len());
        let last = batch.last().map_or(self.folded, |f| f.msg.offset());
        let mut items = batch.into_iter().zip(views).peekable();
        loop {
            {
                let mut engine = self.engine.lock().unwrap_or_else(|e| e.into_inner());
                let overflows_before = engine.stats().window_overflows;
                for (f, view) in items.by_ref().take(SLICE) {
                    if let Some(sent) = f.merchant_event {
                        pending.push(sent);
                    }
                    let msg = &f.msg;
                    let tx = match f.tx {
                        // A transaction counts as genuine in the label-delayed
                        // windows until a fraud label marks it, as in the
                        // merchant stage's risk: labels report frauds.
                        Ok(mut tx) if labelled => {
                            tx.is_fraud.get_or_insert(false);
                            tx
                        }
                        Ok(tx) => tx,
                        Err(_) if f.rebuild_only => continue,
                        Err((reason, detail)) => {
                            m.dead_letters.with_label_values(&[reason.as_str()]).inc();
                            out.push(dead_letter(&topics.dlq, msg, reason.as_str(), detail));
                            continue;
                        }
                    };
                    if let Some(id) = f.in_flight {
                        self.in_flight.remove(&id);
                    }
                    if f.rebuild_only {
                        // The merchant view does not reach the card's state.
                        let _ = engine.process_card(&tx, MerchantView::default(), None);
                        if let Some(side) = self.label_side.as_mut() {
                            side.folded(&mut engine, &tx.card_id, tx.time.utc);
                        }
                        continue;
                    }
                    if f.duplicate {
                        // Its first delivery was scored and alerted (with the
                        // same alert id); counting it again would inflate the card.
                        m.duplicates.inc();
                        continue;
                    }
                    let started = Instant::now();
                    let entity_values = self.entity_side.as_ref().map(|side| {
                        let values = side.inbox.take(msg.offset());
                        let (mask, _) = f.entities;
                        if values.came() & mask != mask {
                            m.entity_wait_timeouts.inc();
                        }
                        values
                    });
                    let entity_values = entity_values.as_ref();
                    let features = match engine.process_card(&tx, view, entity_values) {
                        Ok(f) => {
                            if let Some(side) = self.label_side.as_mut() {
                                side.folded(&mut engine, &tx.card_id, tx.time.utc);
                            }
                            f
                        }
                        Err(Refused::Duplicate) => {
                            m.duplicates.inc();
                            continue;
                        }
                        Err(Refused::TooLate(_)) => {
                            m.late.inc();
                            engine.peek_card(&tx, view, entity_values)
                        }
                    };
                    let score = scorer.score(&features, false);
                    if !score.score.is_finite() {
                        m.scores_not_finite.inc();
                    }
                    let spent = started.elapsed();
                    m.scoring_seconds.observe(spent.as_secs_f64());
                    took.push(spent.as_nanos() as u64);
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
                            alert_of: msg.timestamp().to_millis(),
                            ..Outgoing::new(
                                &topics.alerts,
                                tx.card_id.as_bytes(),
                                serde_json::to_vec(&alert).unwrap_or_default(),
                            )
                        });
                    }
                    if !topics.scores.is_empty() {
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
                        out.push(Outgoing::new(
                            &topics.scores,
                            tx.card_id.as_bytes(),
                            record.to_string().into_bytes(),
                        ));
                    }
                }
                m.card_window_overflows
                    .inc_by(engine.stats().window_overflows - overflows_before);
            }
            if items.peek().is_none() {
                break;
            }
            tokio::task::yield_now().await;
        }
        state.record_scorings(&took);
        self.folded = last;
        if let Some(side) = &self.entity_side {
            side.inbox.forget_through(last);
        }
        pending.extend(send_all(&self.ctx.state, &self.ctx.producer, out).await);
        if let Some(to_acker) = &self.to_acker
            && to_acker.send((last, pending)).await.is_err()
        {
            log(
                "ERROR",
                format_args!("input partition {}: the acker stopped", self.partition),
            );
        }
    }

    /// Starts a checkpoint of what changed since the last, unless one is
    /// still being written.
    fn checkpoint(&mut self, snapshot: bool) {
        let Ok(mut writer) = self.writer.clone().try_lock_owned() else {
            return;
        };
        let at = self.folded;
        let (entries, snapshot, clock) = {
            let mut engine = self.engine.lock().unwrap_or_else(|e| e.into_inner());
            let changes = engine.take_changes();
            if at == self.checkpointed && changes.changed.is_empty() && changes.removed.is_empty() {
                return;
            }
            let per_card = 400u64;
            let snapshot = snapshot
                || writer.wants_snapshot(
                    per_card * (changes.changed.len() + changes.removed.len()) as u64,
                );
            let mut entries = Vec::new();
            let mut value = Vec::new();
            let mut put = |key: u64, card: &CardState| {
                value.clear();
                card.encode(&mut value);
                entries.push(Entry {
                    key: key.to_le_bytes().to_vec(),
                    value: Some(value.clone()),
                });
            };
            if snapshot {
                for (key, card) in engine.all_cards() {
                    put(key, card);
                }
            } else {
                for key in &changes.changed {
                    if let Some(card) = engine.card(*key) {
                        put(*key, card);
                    }
                }
                for key in changes.removed {
                    entries.push(Entry {
                        key: key.to_le_bytes().to_vec(),
                        value: None,
                    });
                }
            }
            (entries, snapshot, engine.clock())
        };
        self.checkpointed = at;
        let entity_features = self
            .entity_side
            .as_ref()
            .and_then(|side| side.inbox.resume_for(at));
        let card_labels = self.label_side.as_ref().and_then(LabelSide::resume);
        let mut done = self.done.clone();
        let ctx = self.ctx.clone();
        let snapshot_start = self.snapshot_start.clone();
        let p = self.partition;
        self.checkpoint = Some(tokio::spawn(async move {
            let ready = async move { done.wait_for(|d| *d >= at).await.is_ok() };
            let marker = CardCheckpoint {
                input_offset: at,
                clock,
                entity_features,
                card_labels,
            };
            let result = writer.write(&entries, snapshot, &marker, ready).await;
            match &result {
                Ok(w) => {
                    let kind = if snapshot { "snapshot" } else { "delta" };
                    ctx.state
                        .metrics
                        .checkpoints
                        .with_label_values(&["cards", kind])
                        .inc();
                    if let Some(s) = w.snapshot_start {
                        *snapshot_start.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
                        // Restores start at the newest snapshot from now on.
                        commit(
                            &ctx.consumer,
                            &[(&ctx.topics.cards_changelog, p, s)],
                            CommitMode::Async,
                        );
                    }
                }
                Err(e) => {
                    writer.force_snapshot();
                    log(
                        "WARN",
                        format_args!(
                            "input partition {p}: checkpoint at offset {at} failed: {e:#}"
                        ),
                    );
                }
            }
        }));
    }

    /// Takes no more input; lets what is in flight be acknowledged; writes
    /// a last checkpoint; commits.
    async fn drain(&mut self) {
        drop(self.to_acker.take());
        if let Some(a) = self.acker.take() {
            let _ = a.await;
        }
        if let Some(h) = self.checkpoint.take() {
            let _ = h.await;
        }
        if self.done() >= self.folded {
            self.checkpoint(false);
            if let Some(h) = self.checkpoint.take() {
                let _ = h.await;
            }
        }
        self.stopping.store(true, Ordering::Release);
        self.commit(CommitMode::Sync);
    }

    fn commit(&self, mode: CommitMode) {
        let mut offsets = vec![(
            self.ctx.topics.input.as_str(),
            self.partition,
            self.done() + 1,
        )];
        if let Some(s) = *self
            .snapshot_start
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            offsets.push((self.ctx.topics.cards_changelog.as_str(), self.partition, s));
        }
        if self.done() >= 0 {
            commit(&self.ctx.consumer, &offsets, mode);
        }
    }
}

/// Settles a partition's batches in order and marks each one's last offset
/// done once all its messages are acknowledged, while the task goes on
/// scoring; commits the done offset every second.
async fn acker(
    ctx: Arc<TaskContext>,
    partition: i32,
    mut batches: mpsc::Receiver<(i64, Pending)>,
    (done, progress): (watch::Sender<i64>, Arc<Progress>),
    stopping: Arc<AtomicBool>,
) {
    let stopped = || stopping.load(Ordering::Acquire);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut committed = *done.borrow();
    loop {
        tokio::select! {
            batch = batches.recv() => {
                let Some((last, pending)) = batch else { break };
                if !settle(&ctx.state, &ctx.producer, pending, &stopped).await {
                    break;
                }
                done.send_replace(last);
                progress.done(last);
            }
            _ = tick.tick() => {
                let d = *done.borrow();
                if d > committed {
                    committed = d;
                    commit(
                        &ctx.consumer,
                        &[(&ctx.topics.input, partition, d + 1)],
                        CommitMode::Async,
                    );
                }
            }
        }
    }
}
