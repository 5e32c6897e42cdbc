//! The task of one label partition: reads fraud labels and sends each to
//! the merchant-events topic, keyed by merchant, so that it reaches the
//! merchant's owner, and, for label-delayed card windows, to every
//! card-labels partition, with its progress; genuine labels are counted, and invalid ones and those
//! dated past the clock's skew are dead-lettered with the reason. It holds no
//! state: it resumes from the group's committed offset, and a label sent
//! again after a restart is recognised by its offset and skipped.

use super::events::{CardLabel, MerchantEvent, Source};
use super::output::{Outgoing, dead_letter, record_clock, send_all, settle};
use super::partition::{
    Control, Next, PartitionInput, Phase, PhaseGauge, Role, TaskContext, commit, committed,
};
use crate::features::store::key_hash;
use crate::ingest::decode::{DeadReason, Limits};
use crate::ingest::label::Label;
use crate::telemetry::log;
use rdkafka::Message;
use rdkafka::consumer::CommitMode;
use rdkafka::topic_partition_list::Offset;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub async fn run(ctx: Arc<TaskContext>, mut input: PartitionInput, mut control: Control) {
    let p = input.partition();
    let mut phase = PhaseGauge::new(ctx.state.clone(), Role::Labels);
    if !control.assigned().await {
        return;
    }
    phase.set(Phase::Restoring);
    let from = {
        let (consumer, topic) = (ctx.consumer.clone(), ctx.topics.labels.clone());
        tokio::task::spawn_blocking(move || committed(&consumer, &topic, p))
            .await
            .ok()
            .flatten()
    };
    let start = from.map_or(Offset::Beginning, Offset::Offset);
    if let Err(e) = input.start_at(start).await {
        log("ERROR", format_args!("label partition {p}: {e:#}"));
        return;
    }
    phase.set(Phase::Running);
    let mut forwarder = Forwarder {
        ctx: ctx.clone(),
        partition: p,
        limits: Limits::of(&ctx.state.settings),
        newest: i64::MIN,
        sent: None,
        sent_at: Instant::now(),
        idle: false,
        done: from.map_or(-1, |f| f - 1),
        committed_at: Instant::now(),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        let mut batch = Vec::new();
        let mut idle = forwarder.idle;
        tokio::select! {
            biased;
            _ = control.drained() => break,
            next = input.next() => {
                let mut next = Some(next);
                while let Some(n) = next.take() {
                    match n {
                        Next::Message(m) => {
                            idle = false;
                            batch.push(m);
                        }
                        Next::End => idle = true,
                    }
                    if batch.len() < 4096 {
                        next = input.try_next().await;
                    }
                }
            }
            _ = tick.tick() => {}
        }
        forwarder.forward(batch, idle).await;
    }
    phase.set(Phase::Draining);
    forwarder.commit(CommitMode::Sync);
}

/// Whether a label source tells the merchant stage it has caught up, after
/// a round that read to its end (`at_end`) or not. A round whose labels
/// were all refused (`inert`: no event forwarded, no watermark moved) leaves
/// a source that had caught up caught up: reported busy at its old
/// watermark (at first: none), it would hold every card task until its end
/// of partition had gone round the merchant stage, in live traffic too.
fn reported_idle(was_idle: bool, at_end: bool, inert: bool) -> bool {
    at_end || (inert && was_idle)
}

struct Forwarder {
    ctx: Arc<TaskContext>,
    partition: i32,
    limits: Limits,
    /// The newest report time read: this source's watermark.
    newest: i64,
    sent: Option<(i64, bool)>,
    sent_at: Instant,
    /// Read to the end of the partition, for now.
    idle: bool,
    /// The last offset whose label is delivered.
    done: i64,
    committed_at: Instant,
}

impl Forwarder {
    async fn forward(&mut self, batch: Vec<rdkafka::message::OwnedMessage>, idle: bool) {
        let (was_idle, newest_before) = (self.idle, self.newest);
        let ctx = &self.ctx;
        let m = &ctx.state.metrics;
        let delay = ctx.state.feature_config().label_delay_secs;
        let to_cards = ctx.state.reads_card_labels();
        let mut out = Vec::new();
        let mut events = 0;
        let last = batch.last().map(|msg| msg.offset());
        for msg in &batch {
            let checked = Label::parse(msg.payload().unwrap_or_default())
                .map_err(|e| ("invalid", DeadReason::InvalidField, e.to_string()))
                .and_then(|l| {
                    let now = record_clock(msg);
                    let times = [
                        ("reported_at", Some(l.reported_at)),
                        ("timestamp", l.transaction_time),
                    ];
                    for (field, t) in times {
                        if let Some(t) = t {
                            self.limits
                                .check_time(field, t, now)
                                .map_err(|(r, detail)| ("future_timestamp", r, detail))?;
                        }
                    }
                    Ok(l)
                });
            let label = match checked {
                Ok(l) => l,
                Err((outcome, reason, detail)) => {
                    m.labels.with_label_values(&[outcome]).inc();
                    m.dead_letters.with_label_values(&[reason.as_str()]).inc();
                    out.push(dead_letter(&ctx.topics.dlq, msg, reason.as_str(), detail));
                    continue;
                }
            };
            self.newest = self.newest.max(label.reported_at);
            if !label.is_fraud {
                m.labels.with_label_values(&["genuine"]).inc();
                continue;
            }
            events += 1;
            if to_cards {
                self.to_cards(&label, msg.offset(), &mut out);
            }
            let event = MerchantEvent::Fraud {
                source: Source::Labels(self.partition),
                offset: msg.offset(),
                time: label.counted_at(delay),
            };
            out.push(Outgoing::new(
                &ctx.topics.merchant_events,
                label.merchant_id.as_bytes(),
                event.encode(),
            ));
        }
        let idle = reported_idle(was_idle, idle, self.newest == newest_before && events == 0);
        self.idle = idle;
        let now = (self.newest, idle);
        if self.sent != Some(now) || self.sent_at.elapsed() >= super::cards::HEARTBEAT {
            self.sent_at = Instant::now();
            let event = MerchantEvent::Progress {
                source: Source::Labels(self.partition),
                watermark: self.newest,
                idle,
            }
            .encode();
            out.extend(Outgoing::to_every_partition(
                &ctx.topics.merchant_events,
                ctx.layout.merchant_partitions,
                &event,
            ));
            if to_cards {
                out.extend(Outgoing::to_every_partition(
                    &ctx.topics.card_labels,
                    ctx.layout.input_partitions,
                    &event,
                ));
            }
            self.sent = Some(now);
        }
        if out.is_empty() && last.is_none() {
            return;
        }
        let pending = send_all(&ctx.state, &ctx.producer, out).await;
        if settle(&ctx.state, &ctx.producer, pending, &|| false).await
            && let Some(last) = last
        {
            self.done = last;
        }
        if self.committed_at.elapsed() >= Duration::from_secs(1) {
            self.commit(CommitMode::Async);
        }
    }

    /// Sends a fraud label to every card-labels partition, for the card
    /// tasks' label-delayed windows: a label without its card or its
    /// transaction's time cannot find its row, and is counted instead.
    fn to_cards(&self, label: &Label, offset: i64, out: &mut Vec<Outgoing>) {
        let ctx = &self.ctx;
        let Some(time) = label.transaction_time.filter(|_| !label.card_id.is_empty()) else {
            let why = if label.card_id.is_empty() {
                "without_card"
            } else {
                "without_time"
            };
            ctx.state.metrics.labels.with_label_values(&[why]).inc();
            return;
        };
        let record = CardLabel {
            source: Source::Labels(self.partition),
            offset,
            card: key_hash(&label.card_id),
            time,
        }
        .encode();
        // Every partition: the card's input partition is the input
        // producer's choice, which the service does not assume.
        out.extend(Outgoing::to_every_partition(
            &ctx.topics.card_labels,
            ctx.layout.input_partitions,
            &record,
        ));
    }

    fn commit(&mut self, mode: CommitMode) {
        self.committed_at = Instant::now();
        if self.done >= 0 {
            commit(
                &self.ctx.consumer,
                &[(&self.ctx.topics.labels, self.partition, self.done + 1)],
                mode,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::reported_idle;

    #[test]
    fn refused_labels_leave_a_caught_up_source_caught_up() {
        assert!(reported_idle(true, false, true), "refused labels only");
        assert!(!reported_idle(true, false, false), "a label forwarded");
        assert!(!reported_idle(false, false, true), "not caught up before");
        assert!(reported_idle(false, true, false), "read to its end");
    }
}
