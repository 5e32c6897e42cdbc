//! The task of one merchant-events partition: the merchant stage. It
//! aggregates its merchants' transactions and frauds exactly, in the order
//! they arrive, skips events sent twice (each source's events carry their
//! source offset, which only grows), and after each round of events writes
//! the merchants that changed to the merchants changelog, with a marker
//! that records the merchant-events offset applied and every source's
//! progress. That changelog is both this task's restore point and what
//! every instance's merchant table reads.

use super::{Day, Key, Progress, Recent, StageCheckpoint, day_of, day_of_hour};
use crate::features::FeatureConfig;
use crate::features::merchant::MerchantState;
use crate::features::store::key_hash_bytes;
use crate::serve::changelog::{self, Entry, Writer};
use crate::serve::events::{MerchantEvent, Source};
use crate::serve::output::record_clock;
use crate::serve::partition::{
    Control, Next, PartitionInput, Phase, PhaseGauge, Role, TaskContext, commit, restore_and_start,
};
use crate::telemetry::log;
use rdkafka::Message;
use rdkafka::consumer::CommitMode;
use rdkafka::message::OwnedMessage;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

const HOUR: i64 = 3600;
const DAY: i64 = 86_400;
/// Least time between two writes to the changelog: each is a group and a
/// marker, read by every instance.
const FLUSH_EVERY: Duration = Duration::from_millis(5);
/// Most time between writes while only heartbeats came: the merchant table
/// needs them to tell a running partition from one that is not.
const BEATS_EVERY: Duration = Duration::from_secs(1);

pub async fn run(ctx: Arc<TaskContext>, mut input: PartitionInput, mut control: Control) {
    let m = input.partition();
    let mut phase = PhaseGauge::new(ctx.state.clone(), Role::Merchants);
    let what = format!("merchant partition {m}");
    let drain = control.drain.clone();
    let started = restore_and_start(
        &mut input,
        &mut control,
        &mut phase,
        &what,
        || restore(&ctx, m, &drain),
        |s: &Stage| s.events_offset,
    );
    let Some(mut stage) = started.await else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut flushed_at = Instant::now();
    let mut committed_at = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = control.drained() => break,
            next = input.next() => {
                let mut next = Some(next);
                let mut n = 0;
                while let Some(Next::Message(msg)) = next.take() {
                    stage.apply(&ctx, &msg);
                    n += 1;
                    if n < 4096 {
                        next = input.try_next().await;
                    }
                }
            }
            _ = tick.tick() => {}
        }
        let since = flushed_at.elapsed();
        if (stage.changed && since >= FLUSH_EVERY) || (stage.beaten && since >= BEATS_EVERY) {
            stage.flush(&ctx).await;
            flushed_at = Instant::now();
        }
        if committed_at.elapsed() >= Duration::from_secs(1) {
            committed_at = Instant::now();
            stage.commit(&ctx, CommitMode::Async);
        }
    }
    phase.set(Phase::Draining);
    if stage.changed {
        stage.flush(&ctx).await;
    }
    stage.commit(&ctx, CommitMode::Sync);
}

struct StageMerchant {
    panes: MerchantState,
    /// Transaction times of the merchant's two newest days.
    times: Vec<(i64, Recent)>,
}

impl StageMerchant {
    fn add_time(&mut self, t: i64) {
        let day = day_of(t);
        let newest = self.times.iter().map(|(d, _)| *d).max().unwrap_or(day);
        if day < newest - 1 {
            return;
        }
        match self.times.iter_mut().find(|(d, _)| *d == day) {
            Some((_, r)) => r.add(t),
            None => {
                let mut r = Recent::default();
                r.add(t);
                self.times.push((day, r));
                let newest = newest.max(day);
                self.times.retain(|(d, _)| *d >= newest - 1);
            }
        }
    }

    fn day(&self, day: i64) -> Day {
        Day {
            hours: self.panes.hours(day * 24, day * 24 + 24),
            times: self
                .times
                .iter()
                .find(|(d, _)| *d == day)
                .map(|(_, r)| r.clone()),
        }
    }
}

struct Stage {
    partition: i32,
    cfg: FeatureConfig,
    merchants: HashMap<u64, StageMerchant>,
    applied: HashMap<Source, i64>,
    progress: HashMap<Source, Progress>,
    watermark: i64,
    events_offset: i64,
    next_sweep: i64,
    dirty_days: HashSet<(u64, i64)>,
    /// Something to write: state or progress.
    changed: bool,
    /// Only heartbeats to write: progress records that changed nothing.
    beaten: bool,
    writer: Writer,
    snapshot_start: Option<i64>,
}

async fn restore(
    ctx: &Arc<TaskContext>,
    m: i32,
    drain: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Stage> {
    let started = Instant::now();
    let c = ctx.clone();
    let drain = drain.clone();
    let stage = tokio::task::spawn_blocking(move || {
        let reader = crate::serve::kafka::reader(&c.state.settings, &c.topics.merchants_group)?;
        let stopped = || *drain.borrow();
        let restored = changelog::restore::<StageCheckpoint>(
            &reader,
            &c.topics.merchants_changelog,
            m,
            &stopped,
        )?;
        let metrics = &c.state.metrics;
        metrics
            .records_read
            .with_label_values(&[&c.topics.merchants_changelog])
            .inc_by(restored.records);
        metrics
            .restore_records
            .with_label_values(&["changelog"])
            .inc_by(restored.records);
        let mut stage = Stage {
            partition: m,
            cfg: c.state.feature_config(),
            merchants: HashMap::new(),
            applied: HashMap::new(),
            progress: HashMap::new(),
            watermark: i64::MIN,
            events_offset: -1,
            next_sweep: i64::MIN,
            dirty_days: HashSet::new(),
            changed: false,
            beaten: false,
            writer: Writer::new(c.producer.clone(), &c.topics.merchants_changelog, m),
            snapshot_start: None,
        };
        let mut state_bytes = 0u64;
        for (key, value) in &restored.values {
            state_bytes += (key.len() + value.len()) as u64;
            let Some(key) = Key::decode(key) else {
                continue;
            };
            if let Some(d) = Day::decode(key.day, value) {
                let e = stage.merchant(key.merchant);
                for h in d.hours {
                    e.panes.set_hour(h);
                }
                if let Some(t) = d.times {
                    e.times.push((key.day, t));
                }
            }
        }
        // The times of each merchant's two newest days, as a live stage keeps them.
        for m in stage.merchants.values_mut() {
            if let Some(newest) = m.times.iter().map(|(d, _)| *d).max() {
                m.times.retain(|(d, _)| *d >= newest - 1);
            }
        }
        stage
            .writer
            .resume(state_bytes, restored.bytes.saturating_sub(state_bytes));
        if let Some(marker) = restored.marker {
            let s = marker.state;
            stage.events_offset = s.events_offset;
            stage.watermark = s.watermark;
            stage.applied = s.applied.into_iter().collect();
            stage.progress = s.progress.into_iter().collect();
        }
        anyhow::Ok(stage)
    })
    .await??;
    log(
        "INFO",
        format_args!(
            "merchant partition {m}: restored {} merchants in {:.2}s; resuming after offset {}",
            stage.merchants.len(),
            started.elapsed().as_secs_f64(),
            stage.events_offset
        ),
    );
    Ok(stage)
}

impl Stage {
    fn merchant(&mut self, key: u64) -> &mut StageMerchant {
        self.merchants.entry(key).or_insert_with(|| StageMerchant {
            panes: MerchantState::default(),
            times: Vec::new(),
        })
    }

    /// The oldest hour the label-delayed windows can still read, as the
    /// engine of a file pass keeps it.
    fn oldest_hour(&self) -> i64 {
        if self.watermark == i64::MIN {
            return i64::MIN;
        }
        let c = &self.cfg;
        (self.watermark - c.allowed_lateness_secs - c.label_delay_secs - 30 * DAY).div_euclid(HOUR)
            - 1
    }

    /// False for an event at or below the source's last offset applied.
    fn first_time(&mut self, source: Source, offset: i64) -> bool {
        let last = self.applied.entry(source).or_insert(-1);
        if offset <= *last {
            return false;
        }
        *last = offset;
        true
    }

    fn apply(&mut self, ctx: &TaskContext, msg: &OwnedMessage) {
        self.events_offset = msg.offset();
        let metrics = &ctx.state.metrics;
        let Some(event) = msg.payload().and_then(MerchantEvent::decode) else {
            log(
                "WARN",
                format_args!(
                    "merchant events {}/{} offset {}: not a merchant event; skipped",
                    msg.topic(),
                    msg.partition(),
                    msg.offset()
                ),
            );
            return;
        };
        let key = key_hash_bytes(msg.key().unwrap_or_default());
        // The partition tasks refuse such events already; a stage that
        // took one would move its watermark past every merchant's windows.
        if let MerchantEvent::Transaction { time, .. } | MerchantEvent::Fraud { time, .. } = event {
            let skew = i64::try_from(ctx.state.settings.max_clock_skew_secs).unwrap_or(i64::MAX);
            if time > record_clock(msg).saturating_add(skew) {
                metrics.merchant_future_events.inc();
                return;
            }
        }
        if !matches!(event, MerchantEvent::Progress { .. }) {
            self.changed = true;
        }
        match event {
            MerchantEvent::Transaction {
                source,
                offset,
                time,
            } => {
                if !self.first_time(source, offset) {
                    metrics.merchant_duplicates.inc();
                    return;
                }
                if time.div_euclid(HOUR) < self.oldest_hour() {
                    return;
                }
                self.watermark = self.watermark.max(time);
                let m = self.merchant(key);
                m.panes.add_transaction(time);
                m.add_time(time);
                self.dirty_days.insert((key, day_of(time)));
                self.sweep_if_due();
            }
            MerchantEvent::Fraud {
                source,
                offset,
                time,
            } => {
                if !self.first_time(source, offset) {
                    metrics.merchant_duplicates.inc();
                    return;
                }
                let oldest = self.oldest_hour();
                let applied = self.merchant(key).panes.add_fraud(time, oldest);
                let outcome = if applied { "applied" } else { "too_old" };
                metrics.labels.with_label_values(&[outcome]).inc();
                if applied {
                    self.dirty_days.insert((key, day_of(time)));
                }
            }
            MerchantEvent::Progress {
                source,
                watermark,
                idle,
            } => {
                let before = self.progress.get(&source).copied();
                let beats = before.map_or(0, |p| p.beats) + 1;
                if before.is_none_or(|p| p.watermark != watermark || p.idle != idle) {
                    self.changed = true;
                } else {
                    self.beaten = true;
                }
                self.progress.insert(
                    source,
                    Progress {
                        watermark,
                        idle,
                        beats,
                    },
                );
            }
        }
    }

    /// Once an hour of event time: drops the days past the retention (each
    /// as a tombstone), and merchants left with none.
    fn sweep_if_due(&mut self) {
        if self.watermark < self.next_sweep {
            return;
        }
        self.next_sweep = self.watermark + HOUR;
        let oldest_day = self.oldest_hour().div_euclid(24);
        let mut gone = Vec::new();
        for (&key, m) in self.merchants.iter_mut() {
            let mut old_days: Vec<i64> = m
                .panes
                .pane_hours()
                .map(day_of_hour)
                .take_while(|&d| d < oldest_day)
                .collect();
            old_days.dedup();
            if !old_days.is_empty() {
                m.panes.expire(oldest_day * 24);
                for d in old_days {
                    self.dirty_days.insert((key, d));
                }
            }
            if m.panes.is_empty() {
                gone.push(key);
            }
        }
        for key in gone {
            self.merchants.remove(&key);
        }
    }

    /// A day's record, or its tombstone once it has no hour left.
    fn day_entry(&self, key: u64, day: i64) -> Entry {
        let d = self.merchants.get(&key).map(|m| m.day(day));
        Entry {
            key: Key { merchant: key, day }.encode(),
            value: d.filter(|d| !d.hours.is_empty()).map(|d| d.encode()),
        }
    }

    /// Writes what changed since the last flush (everything, when a
    /// snapshot is due), with a marker of where this state stands.
    async fn flush(&mut self, ctx: &TaskContext) {
        let mut entries: Vec<Entry> = self
            .dirty_days
            .iter()
            .map(|&(k, d)| self.day_entry(k, d))
            .collect();
        let bytes: u64 = entries
            .iter()
            .map(|e| (e.key.len() + e.value.as_ref().map_or(0, Vec::len)) as u64)
            .sum();
        let snapshot = self.writer.wants_snapshot(bytes);
        if snapshot {
            entries.clear();
            for (&key, m) in &self.merchants {
                let mut days: Vec<i64> = m.panes.pane_hours().map(day_of_hour).collect();
                days.dedup();
                entries.extend(days.into_iter().map(|d| self.day_entry(key, d)));
            }
        }
        let mut applied: Vec<(Source, i64)> = self.applied.iter().map(|(s, o)| (*s, *o)).collect();
        applied.sort();
        let mut progress: Vec<(Source, Progress)> =
            self.progress.iter().map(|(s, p)| (*s, *p)).collect();
        progress.sort_by_key(|(s, _)| *s);
        let marker = StageCheckpoint {
            events_offset: self.events_offset,
            watermark: self.watermark,
            applied,
            progress,
        };
        match self
            .writer
            .write(&entries, snapshot, &marker, async { true })
            .await
        {
            Ok(w) => {
                self.dirty_days.clear();
                self.changed = false;
                self.beaten = false;
                let kind = if snapshot { "snapshot" } else { "delta" };
                ctx.state
                    .metrics
                    .checkpoints
                    .with_label_values(&["merchants", kind])
                    .inc();
                if let Some(s) = w.snapshot_start {
                    self.snapshot_start = Some(s);
                    commit(
                        &ctx.consumer,
                        &[(&ctx.topics.merchants_changelog, self.partition, s)],
                        CommitMode::Async,
                    );
                }
            }
            Err(e) => {
                // The changes stay marked, and are written with the next flush.
                log(
                    "WARN",
                    format_args!("merchant partition {}: flush failed: {e:#}", self.partition),
                );
            }
        }
    }

    fn commit(&self, ctx: &TaskContext, mode: CommitMode) {
        let mut offsets = Vec::new();
        if self.events_offset >= 0 {
            offsets.push((
                ctx.topics.merchant_events.as_str(),
                self.partition,
                self.events_offset + 1,
            ));
        }
        if let Some(s) = self.snapshot_start {
            offsets.push((ctx.topics.merchants_changelog.as_str(), self.partition, s));
        }
        commit(&ctx.consumer, &offsets, mode);
    }
}
