//! What every partition task shares: its lifecycle, the context it works
//! in, its input (the partition's own queue of the group consumer), the
//! control the group holds over it, and offset commits.
//!
//! A task's lifecycle is one state machine, as vector's Kafka source has:
//!
//! ```text
//! Assigned ──► Restoring ──► Running ──► Draining ──► Revoked
//!     └────────────┴────────────┴──────────► (stop: straight to Draining)
//! ```
//!
//! - **Assigned**: the group gave the partition; its queue is split off and
//!   paused, so nothing is fetched before the task knows where to start.
//! - **Restoring**: the task reads its state (a changelog) and where that
//!   state stands in its input, seeks there and resumes the partition.
//! - **Running**: it processes its input.
//! - **Draining**: on a revoke or at shutdown it takes no more input, lets
//!   what is in flight be acknowledged, checkpoints and commits.
//! - **Revoked**: it tells the group it is done and ends.

use super::assigned::AssignedReader;
use super::group::{GroupConsumer, GroupContext};
use super::kafka::{Layout, Topics};
use super::state::ServiceState;
use crate::telemetry::log;
use rdkafka::Message;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::sync::Arc;
use std::time::Duration;

/// A partition that gives nothing for this long is checked against the
/// broker's high watermark, for an end librdkafka did not report.
const QUIET: Duration = Duration::from_secs(1);
/// The same, before the first record after positioning (see
/// [`StartGuard::stalled`]).
const QUIET_AT_START: Duration = Duration::from_millis(250);
/// The same, once the end was reported: an end-of-partition is a moment's
/// view, and one taken for good while records lay ahead would leave the
/// partition waiting for ever.
const QUIET_AT_END: Duration = Duration::from_secs(5);
use tokio::sync::watch;

use super::changelog::{Quiet, StartGuard, Take, watermarks};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Assigned,
    Restoring,
    Running,
    Draining,
    Revoked,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Assigned,
        Phase::Restoring,
        Phase::Running,
        Phase::Draining,
        Phase::Revoked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Assigned => "assigned",
            Phase::Restoring => "restoring",
            Phase::Running => "running",
            Phase::Draining => "draining",
            Phase::Revoked => "revoked",
        }
    }
}

/// Which topic a task's partition is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// An input partition: card state, scoring, alerts.
    Cards,
    /// A merchant-events partition: merchant state.
    Merchants,
    /// A label partition: labels forwarded by merchant.
    Labels,
    /// An entity-events partition: the logs of the entities besides the
    /// card, when the features file has any.
    Entities,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Cards, Role::Merchants, Role::Labels, Role::Entities];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Cards => "cards",
            Role::Merchants => "merchants",
            Role::Labels => "labels",
            Role::Entities => "entities",
        }
    }
}

/// Runs a partition's restore until it succeeds, backing off between
/// failures (a broker down, a topic not there yet); `None` if the
/// partition is drained first. `what` names the partition in the log.
pub async fn restore_retrying<T, F, Fut>(control: &Control, what: &str, mut restore: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut backoff = std::time::Duration::from_millis(200);
    loop {
        match restore().await {
            Ok(r) => return Some(r),
            Err(e) if control.draining() => {
                log("INFO", format_args!("{what}: restore stopped: {e:#}"));
                return None;
            }
            Err(e) => log(
                "WARN",
                format_args!("{what}: restore failed: {e:#}; retrying in {backoff:?}"),
            ),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
    }
}

/// A stage task's start: waits for the assignment, restores (retrying),
/// then positions the input after the offset the restored state reflects
/// (`resume_after`; the beginning when negative). `None` when the task
/// must end instead (drained, or the input cannot be positioned).
pub async fn restore_and_start<T, F, Fut>(
    input: &mut PartitionInput,
    control: &mut Control,
    phase: &mut PhaseGauge,
    what: &str,
    restore: F,
    resume_after: impl Fn(&T) -> i64,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    if !control.assigned().await {
        return None;
    }
    phase.set(Phase::Restoring);
    let state = restore_retrying(control, what, restore).await?;
    let start = match resume_after(&state) {
        o if o >= 0 => Offset::Offset(o + 1),
        _ => Offset::Beginning,
    };
    if let Err(e) = input.start_at(start).await {
        log("ERROR", format_args!("{what}: {e:#}"));
        return None;
    }
    phase.set(Phase::Running);
    Some(state)
}

/// What all tasks work with.
pub struct TaskContext {
    pub state: Arc<ServiceState>,
    pub consumer: Arc<GroupConsumer>,
    pub producer: FutureProducer,
    pub topics: Topics,
    pub layout: Layout,
    /// The reader of entity values, when the features file has entities
    /// besides the card.
    pub entity_values: Option<Arc<AssignedReader>>,
    /// The reader of card labels, when it has label-delayed card windows.
    pub card_labels: Option<Arc<AssignedReader>>,
}

/// The group's hold on a task: `assigned` turns true once the partition is
/// assigned and paused; `drain` asks it to finish.
pub struct Control {
    pub assigned: watch::Receiver<bool>,
    pub drain: watch::Receiver<bool>,
}

impl Control {
    /// Waits until the partition is assigned; false if asked to drain first.
    pub async fn assigned(&mut self) -> bool {
        let assigned = tokio::select! {
            r = self.assigned.wait_for(|a| *a) => r.is_ok(),
            _ = self.drain.wait_for(|d| *d) => false,
        };
        assigned && !*self.drain.borrow()
    }

    pub fn draining(&self) -> bool {
        *self.drain.borrow()
    }

    /// Resolves once a drain is asked for.
    pub async fn drained(&mut self) {
        let _ = self.drain.wait_for(|d| *d).await;
    }
}

/// Keeps the phase gauge of a task.
pub struct PhaseGauge {
    state: Arc<ServiceState>,
    role: Role,
    phase: Phase,
}

impl PhaseGauge {
    pub fn new(state: Arc<ServiceState>, role: Role) -> PhaseGauge {
        state
            .metrics
            .tasks
            .with_label_values(&[role.as_str(), Phase::Assigned.as_str()])
            .inc();
        PhaseGauge {
            state,
            role,
            phase: Phase::Assigned,
        }
    }

    pub fn set(&mut self, phase: Phase) {
        let m = &self.state.metrics;
        m.tasks
            .with_label_values(&[self.role.as_str(), self.phase.as_str()])
            .dec();
        if phase != Phase::Revoked {
            m.tasks
                .with_label_values(&[self.role.as_str(), phase.as_str()])
                .inc();
        }
        if self.role == Role::Cards {
            if self.phase == Phase::Restoring {
                m.restoring.dec();
            }
            if phase == Phase::Restoring {
                m.restoring.inc();
            }
        }
        self.phase = phase;
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }
}

impl Drop for PhaseGauge {
    fn drop(&mut self) {
        if self.phase != Phase::Revoked {
            self.set(Phase::Revoked);
        }
    }
}

/// What a partition's queue gave.
pub enum Next {
    Message(OwnedMessage),
    /// The partition is read to its end, for now.
    End,
}

/// A partition's own queue of the group consumer, positioned by its task.
pub struct PartitionInput {
    queue: StreamPartitionQueue<GroupContext>,
    consumer: Arc<GroupConsumer>,
    topic: String,
    partition: i32,
    guard: StartGuard,
    /// The end was reported and no record came since.
    ended: bool,
    /// When the queue last gave something, or the partition was positioned.
    heard_at: std::time::Instant,
    /// A query of the partition's low and high watermarks, under way.
    watermark_check: Option<tokio::task::JoinHandle<Option<(i64, i64)>>>,
    seeking_logged: bool,
    /// The next offset when a quiet check last found the partition below
    /// its high watermark after it started (see [`PartitionInput::next`]).
    quiet_below_high: Option<i64>,
    /// Since when quiet checks have found records on the broker that
    /// nothing read: a fetch that is stuck, not a partition that is idle.
    unread_since: Option<std::time::Instant>,
    read: prometheus::IntCounter,
    redelivered: prometheus::IntCounter,
}

impl PartitionInput {
    pub fn new(
        queue: StreamPartitionQueue<GroupContext>,
        ctx: &TaskContext,
        topic: &str,
        partition: i32,
    ) -> PartitionInput {
        PartitionInput {
            queue,
            consumer: ctx.consumer.clone(),
            topic: topic.to_string(),
            partition,
            guard: StartGuard::new(None, None),
            ended: false,
            heard_at: std::time::Instant::now(),
            watermark_check: None,
            seeking_logged: false,
            quiet_below_high: None,
            unread_since: None,
            read: ctx.state.metrics.records_read.with_label_values(&[topic]),
            redelivered: ctx.state.metrics.redelivered.clone(),
        }
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Positions the partition (paused since its assignment) and resumes it.
    pub async fn start_at(&mut self, from: Offset) -> anyhow::Result<()> {
        let (consumer, topic, p) = (self.consumer.clone(), self.topic.clone(), self.partition);
        let low = tokio::task::spawn_blocking(move || {
            consumer
                .fetch_watermarks(&topic, p, Duration::from_secs(10))
                .ok()
                .map(|(low, _)| low)
        })
        .await
        .ok()
        .flatten();
        let want = match from {
            Offset::Offset(o) => Some(o),
            _ => None,
        };
        self.guard = StartGuard::new(want, low);
        self.ended = false;
        self.seeking_logged = false;
        self.seek(from).await?;
        self.heard_at = std::time::Instant::now();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, self.partition);
        self.consumer.resume(&tpl)?;
        Ok(())
    }

    async fn seek(&self, to: Offset) -> anyhow::Result<()> {
        let (consumer, topic, p) = (self.consumer.clone(), self.topic.clone(), self.partition);
        // A seek waits for the fetcher to take it: off the async workers.
        tokio::task::spawn_blocking(move || {
            let mut last = None;
            // Right after an assignment the fetcher may not have started
            // the partition yet, and a seek is refused: try again shortly.
            for _ in 0..50 {
                match consumer.seek(&topic, p, to, Duration::from_secs(10)) {
                    Ok(()) => return Ok(()),
                    Err(e) => last = Some(e),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(anyhow::anyhow!(
                "cannot seek {topic}/{p} to {to:?}: {}",
                last.map(|e| e.to_string()).unwrap_or_default()
            ))
        })
        .await?
    }

    /// The next message, or the end of the partition. The end comes from
    /// librdkafka's end-of-partition event, or, when the partition is
    /// quiet for [`QUIET`], from the broker's high watermark: librdkafka
    /// gives no event for a partition positioned at its end that never
    /// fetches a record, and a partition that is never idle would hold up
    /// every merchant table frontier.
    pub async fn next(&mut self) -> Next {
        loop {
            // Deadlines and checks kept across calls: callers drop this
            // future often (at every tick of their loop).
            let received = if self.watermark_check.is_some() {
                Err(())
            } else {
                let quiet = if self.ended {
                    QUIET_AT_END
                } else if self.guard.started() {
                    QUIET
                } else {
                    QUIET_AT_START
                };
                let until = tokio::time::Instant::from_std(self.heard_at + quiet);
                tokio::time::timeout_at(until, self.queue.recv())
                    .await
                    .map_err(|_| ())
            };
            self.heard_at = std::time::Instant::now();
            let received = match received {
                Ok(r) => r,
                Err(()) => {
                    let (consumer, topic, p) =
                        (self.consumer.clone(), self.topic.clone(), self.partition);
                    let check = self.watermark_check.get_or_insert_with(|| {
                        tokio::task::spawn_blocking(move || {
                            watermarks(consumer.as_ref(), &topic, p, Duration::from_secs(5)).ok()
                        })
                    });
                    let watermarks = check.await.ok().flatten();
                    self.watermark_check = None;
                    let Some((low, high)) = watermarks else {
                        continue;
                    };
                    let quiet = self.guard.when_quiet(self.ended, low, high);
                    if matches!(quiet, Quiet::End | Quiet::Wait) {
                        self.unread_since = None;
                    } else {
                        self.unread_since
                            .get_or_insert_with(std::time::Instant::now);
                    }
                    match quiet {
                        Quiet::End => {
                            self.ended = true;
                            return Next::End;
                        }
                        Quiet::Wait => {}
                        Quiet::SeekBack(o) => {
                            self.ended = false;
                            self.log_seeking_back("nothing");
                            if let Err(e) = self.seek(Offset::Offset(o)).await {
                                log("WARN", format_args!("{e:#}"));
                            }
                        }
                        Quiet::Below(at) => {
                            self.ended = false;
                            self.reposition_if_stuck(at, low, high).await;
                        }
                        Quiet::Behind => self.ended = false,
                    }
                    continue;
                }
            };
            let taken = match received {
                Ok(m) => {
                    self.read.inc();
                    self.quiet_below_high = None;
                    self.unread_since = None;
                    match self.guard.take(m.offset()) {
                        Take::Yes => {
                            self.ended = false;
                            return Next::Message(m.detach());
                        }
                        Take::Skip => {
                            self.redelivered.inc();
                            None
                        }
                        Take::SeekTo(o) => {
                            self.log_seeking_back(&format!("offset {}", m.offset()));
                            Some(o)
                        }
                    }
                }
                Err(rdkafka::error::KafkaError::PartitionEOF(_)) => {
                    if self.guard.at_end() {
                        self.ended = true;
                        return Next::End;
                    }
                    None
                }
                Err(e) => {
                    log(
                        "WARN",
                        format_args!("{}/{}: {e}", self.topic, self.partition),
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    None
                }
            };
            if let Some(o) = taken
                && let Err(e) = self.seek(Offset::Offset(o)).await
            {
                log("WARN", format_args!("{e:#}"));
            }
        }
    }

    /// A started partition that stays quiet below its high watermark for
    /// two checks in a row, at the same offset, is positioned there again,
    /// with the start guard armed as after an assignment. Workaround for
    /// tansu 0.6 (see [`StartGuard`]): a fetch from inside a stored batch
    /// may be answered with nothing and librdkafka then waits for ever.
    /// Against Kafka a consumer below the high watermark keeps receiving,
    /// so this does not trigger; it is logged as a warning if it does.
    async fn reposition_if_stuck(&mut self, at: i64, low: i64, high: i64) {
        if self.quiet_below_high != Some(at) {
            self.quiet_below_high = Some(at);
            return;
        }
        self.quiet_below_high = None;
        log(
            "WARN",
            format_args!(
                "{}/{}: nothing read at offset {at}, below the high watermark {high}, for two checks; positioning there again",
                self.topic, self.partition
            ),
        );
        self.guard = StartGuard::new(Some(at), Some(low));
        self.seeking_logged = false;
        if let Err(e) = self.seek(Offset::Offset(at)).await {
            log("WARN", format_args!("{e:#}"));
        }
    }

    fn log_seeking_back(&mut self, read: &str) {
        if !self.seeking_logged {
            self.seeking_logged = true;
            log(
                "INFO",
                format_args!(
                    "{}/{}: read {read} first; seeking back for the batch that holds the start",
                    self.topic, self.partition
                ),
            );
        }
    }

    /// Since when records on the broker have waited with nothing read, as
    /// far as the quiet checks tell (within a few seconds).
    pub fn unread_since(&self) -> Option<std::time::Instant> {
        self.unread_since
    }

    /// [`PartitionInput::next`] if one is ready now.
    pub async fn try_next(&mut self) -> Option<Next> {
        tokio::time::timeout(Duration::ZERO, self.next()).await.ok()
    }
}

/// Commits the next offsets to read of some partitions for the group.
pub fn commit(consumer: &GroupConsumer, offsets: &[(&str, i32, i64)], mode: CommitMode) {
    let mut tpl = TopicPartitionList::new();
    for &(topic, p, next) in offsets {
        if tpl
            .add_partition_offset(topic, p, Offset::Offset(next))
            .is_err()
        {
            return;
        }
    }
    if tpl.count() == 0 {
        return;
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        log("WARN", format_args!("offset commit: {e}"));
    }
}

/// The group's committed offset of a partition, if any (blocking).
pub fn committed(consumer: &GroupConsumer, topic: &str, partition: i32) -> Option<i64> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let c = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .ok()?;
    match c.find_partition(topic, partition)?.offset() {
        Offset::Offset(o) if o >= 0 => Some(o),
        _ => None,
    }
}
