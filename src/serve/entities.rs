//! The task of one entity-events partition: the entity stage, which keeps
//! the declared logs of the entities besides the card (a merchant, a
//! device) for the keys of its partition.
//!
//! Card partitions send each event's row for each such entity, keyed by the
//! entity, and their progress to every partition. The stage computes an
//! event's values from the entity's log before it and folds the event in,
//! in event-time order across sources, as one engine of a file pass sees
//! them: it takes the oldest row at the head of any source's queue once no
//! other source can still send an older one (its queue holds rows, its
//! progress is past the row's time, it has read its partition to the end,
//! or it has been silent for half of `merchant_wait_ms`, so that the values
//! still reach the card tasks, which wait the whole of it). The values go to the
//! entity-features topic, to the partition number of the event's input
//! partition, whose card task scores the event with them.
//!
//! Every `checkpoint_interval_secs` the logs changed since the last go to
//! the entities changelog, with a marker of the entity-events offset to
//! resume from (before the oldest row still queued) and each source's last
//! row taken, so that rows read again are skipped.

use super::cards::LONG_WAIT;
use super::changelog::{self, Entry, Writer};
use super::events::{EntityColumns, EntityRow, MerchantEvent, Source};
use super::merchants::Progress;
use super::output::{Outgoing, Pending, send_all, settle};
use super::partition::{
    Control, Next, PartitionInput, Phase, PhaseGauge, Role, TaskContext, commit, restore_and_start,
};
use crate::features::entities::{EntityLogs, log_key, parse_log_key};
use crate::telemetry::log;
use rdkafka::Message;
use rdkafka::consumer::CommitMode;
use rdkafka::message::OwnedMessage;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What an entities changelog marker carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntityCheckpoint {
    /// The entity-events offset to read again from, less one: every row
    /// before it is in the logs or skipped by `taken`.
    pub resume_after: i64,
    /// Per source, the position ([`EntityRow::position`]) of its last row
    /// taken.
    pub taken: Vec<(Source, i64)>,
    pub clock: (i64, i64),
}

/// A row read and waiting for its turn.
struct Queued {
    events_offset: i64,
    key: u64,
    row: EntityRow,
}

struct SourceState {
    queue: VecDeque<Queued>,
    /// The position of the last row taken (folded in).
    taken: i64,
    /// The position of the last row queued.
    queued: i64,
    progress: Option<Progress>,
    heard_at: Instant,
}

/// Each source's rows in the order it sent them, and what it last said of
/// its progress: the rows come out oldest first across sources, once no
/// source can still send an older one.
struct RowQueues {
    sources: HashMap<Source, SourceState>,
    /// Input partitions: each a source whose rows may hold others back.
    inputs: i32,
    /// How long a silent source holds the others back.
    wait: Duration,
    started: Instant,
}

impl RowQueues {
    fn new(inputs: i32, wait: Duration) -> RowQueues {
        RowQueues {
            sources: HashMap::new(),
            inputs,
            wait,
            started: Instant::now(),
        }
    }

    fn source(&mut self, source: Source) -> &mut SourceState {
        self.sources.entry(source).or_insert_with(|| SourceState {
            queue: VecDeque::new(),
            taken: -1,
            queued: -1,
            progress: None,
            heard_at: Instant::now(),
        })
    }

    fn restore_taken(&mut self, source: Source, taken: i64) {
        let s = self.source(source);
        s.taken = taken;
        s.queued = taken;
    }

    fn progress(&mut self, source: Source, watermark: i64, idle: bool) {
        let s = self.source(source);
        let beats = s.progress.map_or(0, |p| p.beats) + 1;
        s.progress = Some(Progress {
            watermark,
            idle,
            beats,
        });
        s.heard_at = Instant::now();
    }

    /// Queues a row behind its source's; false if it was taken or queued
    /// already (sent again after a card task restarted).
    fn push(&mut self, q: Queued) -> bool {
        let s = self.source(q.row.source);
        s.heard_at = Instant::now();
        let position = q.row.position();
        if position <= s.queued.max(s.taken) {
            return false;
        }
        s.queued = position;
        s.queue.push_back(q);
        true
    }

    /// The oldest row at the head of a queue, if no other input can still
    /// send an older one: its queue holds rows, its progress is past the
    /// row's time, it has read its partition to the end, or it has been
    /// silent for `wait` (restoring, or unowned after a crash).
    fn pop(&mut self) -> Option<Queued> {
        let (source, t) = self.oldest_head()?;
        if self.held_by(source, t).is_some() {
            return None;
        }
        let s = self.sources.get_mut(&source)?;
        let q = s.queue.pop_front()?;
        s.taken = q.row.position();
        Some(q)
    }

    /// The source with the oldest row at the head of its queue, and the
    /// row's time.
    fn oldest_head(&self) -> Option<(Source, i64)> {
        self.sources
            .iter()
            .filter_map(|(s, st)| st.queue.front().map(|q| (*s, q)))
            .min_by_key(|(s, q)| (q.row.time, *s, q.row.position()))
            .map(|(s, q)| (s, q.row.time))
    }

    /// The input that may still send a row older than `t`, which `source`
    /// has at the head of its queue, if any.
    fn held_by(&self, source: Source, t: i64) -> Option<Source> {
        (0..self.inputs).map(Source::Input).find(|&other| {
            other != source
                && match self.sources.get(&other) {
                    None => self.started.elapsed() < self.wait,
                    Some(st) => {
                        st.queue.is_empty()
                            && st.heard_at.elapsed() < self.wait
                            && st.progress.is_none_or(|p| !p.idle && p.watermark < t)
                    }
                }
        })
    }

    /// Why the oldest row queued waits, for the log: its source and time,
    /// and what the input holding it last said.
    fn wait_reason(&self) -> Option<String> {
        let (source, t) = self.oldest_head()?;
        let other = self.held_by(source, t)?;
        let said = self.sources.get(&other).map_or_else(
            || "nothing yet".to_string(),
            |st| {
                format!(
                    "{:?} {:.1}s ago",
                    st.progress,
                    st.heard_at.elapsed().as_secs_f64()
                )
            },
        );
        Some(format!(
            "the row of {source:?} at {t} waits for {other:?} (said {said})"
        ))
    }

    /// The entity-events offset of the oldest row still queued.
    fn oldest_offset(&self) -> Option<i64> {
        self.sources
            .values()
            .filter_map(|s| s.queue.front().map(|q| q.events_offset))
            .min()
    }

    /// Each source's last row taken.
    fn taken(&self) -> Vec<(Source, i64)> {
        let mut taken: Vec<(Source, i64)> =
            self.sources.iter().map(|(s, st)| (*s, st.taken)).collect();
        taken.sort();
        taken
    }
}

pub async fn run(ctx: Arc<TaskContext>, mut input: PartitionInput, mut control: Control) {
    let e = input.partition();
    let mut phase = PhaseGauge::new(ctx.state.clone(), Role::Entities);
    let what = format!("entity partition {e}");
    let drain = control.drain.clone();
    let started = restore_and_start(
        &mut input,
        &mut control,
        &mut phase,
        &what,
        || restore(&ctx, e, &drain),
        |s: &Stage| s.resume_after,
    );
    let Some(mut stage) = started.await else {
        return;
    };
    let s = &ctx.state.settings;
    let mut checkpoint_tick =
        tokio::time::interval(Duration::from_secs(s.checkpoint_interval_secs.max(1)));
    checkpoint_tick.tick().await;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            biased;
            _ = control.drained() => break,
            _ = checkpoint_tick.tick() => stage.checkpoint(&ctx).await,
            next = input.next() => {
                let mut next = Some(next);
                let mut n = 0;
                while let Some(Next::Message(msg)) = next.take() {
                    stage.take(&ctx, &msg);
                    n += 1;
                    if n < 4096 {
                        next = input.try_next().await;
                    }
                }
            }
            _ = tick.tick() => {}
        }
        stage.release(&ctx).await;
    }
    phase.set(Phase::Draining);
    stage.checkpoint(&ctx).await;
}

struct Stage {
    partition: i32,
    logs: EntityLogs,
    queues: RowQueues,
    /// The newest entity-events offset read.
    read: i64,
    /// Where a restore resumes, as of the last checkpoint.
    resume_after: i64,
    writer: Writer,
    snapshot_start: Option<i64>,
    /// Values sent and not yet acknowledged: settled before a checkpoint
    /// claims their rows, not after each round, which would hold the next
    /// rows back by a broker round trip.
    unsettled: Pending,
    /// Since when queued rows have waited with none released, for the log.
    held_since: Option<Instant>,
    wait_logged: Option<Instant>,
}

/// Values in flight past which a round waits for them: the bound on what
/// a stage holds between checkpoints.
const MAX_UNSETTLED: usize = 16_384;

async fn restore(
    ctx: &Arc<TaskContext>,
    e: i32,
    drain: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Stage> {
    let started = Instant::now();
    let c = ctx.clone();
    let drain = drain.clone();
    let stage = tokio::task::spawn_blocking(move || {
        let program = c
            .state
            .plan()
            .program
            .clone()
            .ok_or_else(|| anyhow::anyhow!("the features file has no entities"))?;
        let reader = crate::serve::kafka::reader(&c.state.settings, &c.topics.entities_group)?;
        let stopped = || *drain.borrow();
        let restored = changelog::restore::<EntityCheckpoint>(
            &reader,
            &c.topics.entities_changelog,
            e,
            &stopped,
        )?;
        let metrics = &c.state.metrics;
        metrics
            .records_read
            .with_label_values(&[&c.topics.entities_changelog])
            .inc_by(restored.records);
        metrics
            .restore_records
            .with_label_values(&["changelog"])
            .inc_by(restored.records);
        let mut logs = EntityLogs::new(c.state.feature_config(), program);
        let mut state_bytes = 0u64;
        for (key, value) in &restored.values {
            state_bytes += (key.len() + value.len()) as u64;
            let restored =
                parse_log_key(key).is_some_and(|(entity, k)| logs.restore(entity, k, value));
            if !restored {
                log(
                    "WARN",
                    format_args!(
                        "entity partition {e}: a changelog record that does not decode; skipped"
                    ),
                );
            }
        }
        let mut stage = Stage {
            partition: e,
            logs,
            // Half the card tasks' wait: a silent input holding the rows
            // back for all of it would release their values just as the
            // other inputs' events stop waiting for them.
            queues: RowQueues::new(
                c.layout.input_partitions,
                Duration::from_millis(c.state.settings.merchant_wait_ms / 2),
            ),
            read: -1,
            resume_after: -1,
            writer: Writer::new(c.producer.clone(), &c.topics.entities_changelog, e),
            snapshot_start: None,
            unsettled: Vec::new(),
            held_since: None,
            wait_logged: None,
        };
        stage
            .writer
            .resume(state_bytes, restored.bytes.saturating_sub(state_bytes));
        if let Some(marker) = restored.marker {
            let s = marker.state;
            stage.resume_after = s.resume_after;
            stage.read = s.resume_after;
            stage.logs.set_clock(s.clock);
            for (source, taken) in s.taken {
                stage.queues.restore_taken(source, taken);
            }
        }
        anyhow::Ok(stage)
    })
    .await??;
    log(
        "INFO",
        format_args!(
            "entity partition {e}: restored {} entity logs in {:.2}s; resuming after offset {}",
            stage.logs.len(),
            started.elapsed().as_secs_f64(),
            stage.resume_after
        ),
    );
    Ok(stage)
}

impl Stage {
    /// Takes one record: a source's progress, or a row.
    fn take(&mut self, ctx: &TaskContext, msg: &OwnedMessage) {
        self.read = msg.offset();
        let payload = msg.payload().unwrap_or_default();
        if let Some(MerchantEvent::Progress {
            source,
            watermark,
            idle,
        }) = MerchantEvent::decode(payload)
        {
            self.queues.progress(source, watermark, idle);
            return;
        }
        let key = msg.key().and_then(parse_log_key);
        let (Some(row), Some((entity, key))) = (EntityRow::decode(payload), key) else {
            log(
                "WARN",
                format_args!(
                    "entity events {}/{} offset {}: not an entity event; skipped",
                    msg.topic(),
                    msg.partition(),
                    msg.offset()
                ),
            );
            return;
        };
        if entity != row.entity as usize {
            return;
        }
        let queued = self.queues.push(Queued {
            events_offset: msg.offset(),
            key,
            row,
        });
        if !queued {
            ctx.state
                .metrics
                .entity_rows
                .with_label_values(&["duplicate"])
                .inc();
        }
    }

    /// Folds in every row whose turn has come, and sends their values.
    async fn release(&mut self, ctx: &TaskContext) {
        let mut out = Vec::new();
        let m = &ctx.state.metrics;
        let overflows = self.logs.overflows;
        while let Some(q) = self.queues.pop() {
            let Source::Input(p) = q.row.source else {
                continue;
            };
            let values =
                self.logs
                    .observe_and_fold(q.row.entity as usize, q.key, q.row.time, &q.row.row);
            let columns = EntityColumns {
                offset: q.row.offset,
                entity: q.row.entity,
                values: values.to_vec(),
            };
            out.push(Outgoing {
                partition: Some(p),
                ..Outgoing::new(
                    &ctx.topics.entity_features,
                    &q.row.offset.to_le_bytes(),
                    columns.encode(),
                )
            });
        }
        m.card_window_overflows
            .inc_by(self.logs.overflows - overflows);
        self.log_long_wait(!out.is_empty());
        if out.is_empty() {
            return;
        }
        m.entity_rows
            .with_label_values(&["folded"])
            .inc_by(out.len() as u64);
        self.unsettled
            .extend(send_all(&ctx.state, &ctx.producer, out).await);
        if self.unsettled.len() >= MAX_UNSETTLED {
            self.settle(ctx).await;
        }
    }

    /// Logs a row held back this long, and again as often: the input that
    /// holds it is restoring, behind, or gone.
    fn log_long_wait(&mut self, released: bool) {
        if released || self.queues.oldest_offset().is_none() {
            self.held_since = None;
            return;
        }
        let since = *self.held_since.get_or_insert_with(Instant::now);
        let due = since.elapsed() >= LONG_WAIT
            && self.wait_logged.is_none_or(|t| t.elapsed() >= LONG_WAIT);
        if let (true, Some(reason)) = (due, self.queues.wait_reason()) {
            self.wait_logged = Some(Instant::now());
            log(
                "WARN",
                format_args!(
                    "entity partition {}: rows held for {:.0}s: {reason}",
                    self.partition,
                    since.elapsed().as_secs_f64()
                ),
            );
        }
    }

    async fn settle(&mut self, ctx: &TaskContext) {
        let pending = std::mem::take(&mut self.unsettled);
        settle(&ctx.state, &ctx.producer, pending, &|| false).await;
    }

    /// Writes the logs changed since the last checkpoint (all of them when
    /// a snapshot is due) with a marker, then commits where to resume.
    async fn checkpoint(&mut self, ctx: &TaskContext) {
        self.settle(ctx).await;
        let changed = self.logs.take_changed();
        let entry = |logs: &EntityLogs, (entity, key): (usize, u64)| Entry {
            key: log_key(entity, key),
            value: logs.encode(entity, key),
        };
        let mut entries: Vec<Entry> = changed.iter().map(|&k| entry(&self.logs, k)).collect();
        let bytes: u64 = entries
            .iter()
            .map(|e| (e.key.len() + e.value.as_ref().map_or(0, Vec::len)) as u64)
            .sum();
        let snapshot = self.writer.wants_snapshot(bytes);
        if snapshot {
            entries = self
                .logs
                .all()
                .into_iter()
                .map(|k| entry(&self.logs, k))
                .collect();
        }
        let resume_after = self.queues.oldest_offset().map_or(self.read, |o| o - 1);
        let marker = EntityCheckpoint {
            resume_after,
            taken: self.queues.taken(),
            clock: self.logs.clock(),
        };
        match self
            .writer
            .write(&entries, snapshot, &marker, async { true })
            .await
        {
            Ok(w) => {
                let kind = if snapshot { "snapshot" } else { "delta" };
                ctx.state
                    .metrics
                    .checkpoints
                    .with_label_values(&["entities", kind])
                    .inc();
                self.resume_after = resume_after;
                if let Some(s) = w.snapshot_start {
                    self.snapshot_start = Some(s);
                }
                let mut offsets = vec![(
                    ctx.topics.entity_events.as_str(),
                    self.partition,
                    resume_after + 1,
                )];
                if let Some(s) = self.snapshot_start {
                    offsets.push((ctx.topics.entities_changelog.as_str(), self.partition, s));
                }
                if resume_after >= 0 {
                    commit(&ctx.consumer, &offsets, CommitMode::Async);
                }
            }
            Err(e) => {
                // These logs are written with the next checkpoint, a snapshot.
                self.writer.force_snapshot();
                log(
                    "WARN",
                    format_args!(
                        "entity partition {}: checkpoint failed: {e:#}",
                        self.partition
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(source: i32, offset: i64, time: i64) -> Queued {
        Queued {
            events_offset: offset,
            key: 7,
            row: EntityRow {
                source: Source::Input(source),
                offset,
                time,
                entity: 1,
                row: vec![],
            },
        }
    }

    fn drain(q: &mut RowQueues) -> Vec<(i32, i64)> {
        std::iter::from_fn(|| q.pop())
            .map(|q| match q.row.source {
                Source::Input(p) => (p, q.row.time),
                Source::Labels(_) => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn rows_come_out_in_event_time_once_no_source_can_send_older() {
        let mut q = RowQueues::new(2, Duration::from_secs(3600));
        assert!(q.push(row(0, 1, 100)));
        assert!(q.push(row(0, 2, 300)));
        assert!(drain(&mut q).is_empty(), "input 1 not heard from yet");
        q.progress(Source::Input(1), 50, false);
        assert!(drain(&mut q).is_empty(), "input 1 may still send 60");
        assert!(q.push(row(1, 1, 200)));
        // Input 1's row at 200 is queued: input 0's 100 can go, then 200;
        // 300 waits for input 1 to pass it.
        assert_eq!(drain(&mut q), [(0, 100), (1, 200)]);
        q.progress(Source::Input(1), 400, false);
        assert_eq!(drain(&mut q), [(0, 300)]);
        // Sent again after a restart: skipped, taken or queued.
        assert!(!q.push(row(0, 2, 300)));
        assert!(q.push(row(0, 3, 350)));
        assert!(!q.push(row(0, 3, 350)));
        assert_eq!(q.oldest_offset(), Some(3));
        // Within a source, its order, even for a late row.
        assert!(q.push(row(0, 4, 320)));
        q.progress(Source::Input(1), 400, true);
        assert_eq!(drain(&mut q), [(0, 350), (0, 320)]);
        assert_eq!(
            q.taken(),
            [(Source::Input(0), 32 + 1), (Source::Input(1), 8 + 1)]
        );
    }

    #[test]
    fn a_silent_source_holds_the_others_only_so_long() {
        let mut q = RowQueues::new(3, Duration::ZERO);
        assert!(q.push(row(0, 1, 100)));
        q.progress(Source::Input(1), 50, false);
        assert_eq!(drain(&mut q), [(0, 100)], "inputs 1 and 2 silent too long");
        let mut q = RowQueues::new(2, Duration::from_secs(3600));
        q.restore_taken(Source::Input(0), 8 + 1);
        assert!(!q.push(row(0, 1, 100)), "taken before the restart");
        assert!(q.push(row(0, 2, 100)));
    }
}
