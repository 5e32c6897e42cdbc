//! The alert sink: reads the alert topic in its own consumer group and
//! writes every alert into the alert store. A batch is written in one
//! statement, upserted on `alert_id`, and its offsets are committed only
//! after the write: a sink killed at any point re-reads at most its last
//! batch, and re-writing it changes nothing. Messages that are not alerts
//! are kept in the store's `alert_rejects` with the reason.

use super::kafka;
use crate::alerts::store::{AlertRecord, AlertStore, Rejected, Sourced, storable};
use crate::config::Settings;
use crate::metrics::SinkMetrics;
use crate::telemetry::log;
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Messages written per statement at most.
const BATCH: usize = 2000;
/// How long a batch waits to fill once its first message is in.
const LINGER: Duration = Duration::from_millis(100);

/// Runs until `stop` turns true.
pub async fn run(
    settings: &Settings,
    store: Arc<AlertStore>,
    metrics: &SinkMetrics,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let consumer: StreamConsumer =
        kafka::group_config(settings, &settings.sink_group_id).create()?;
    consumer.subscribe(&[&settings.alert_topic])?;
    log(
        "INFO",
        format_args!(
            "alert sink: {} into the alert store, group {}",
            settings.alert_topic, settings.sink_group_id
        ),
    );
    let topic = settings.alert_topic.as_str();
    // The offset after the last message written, per partition: committed
    // after every batch for the partitions still assigned, so that a quiet
    // partition whose commit failed is committed with the next batch.
    let mut written: BTreeMap<i32, i64> = BTreeMap::new();
    loop {
        let mut batch: Vec<OwnedMessage> = Vec::new();
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            m = consumer.recv() => match m {
                Ok(m) => batch.push(m.detach()),
                Err(KafkaError::PartitionEOF(_)) => continue,
                Err(e) => {
                    log("WARN", format_args!("alert sink: {e}"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        }
        let until = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(until, consumer.recv()).await {
                Ok(Ok(m)) => batch.push(m.detach()),
                Ok(Err(KafkaError::PartitionEOF(_))) => continue,
                Ok(Err(_)) | Err(_) => break,
            }
        }
        let (alerts, rejected) = sort_out(topic, &batch);
        let Some((stored, refused)) =
            write(&store, topic, alerts, rejected, metrics, &mut stop).await
        else {
            break;
        };
        let counted = &metrics.alerts;
        counted.with_label_values(&["stored"]).inc_by(stored as u64);
        counted
            .with_label_values(&["rejected"])
            .inc_by(refused as u64);
        for m in &batch {
            let next = written.entry(m.partition()).or_insert(0);
            *next = (*next).max(m.offset() + 1);
        }
        commit(&consumer, topic, &written, CommitMode::Async);
    }
    // What was written, committed for sure before the sink leaves; never
    // the consumer's position, which may be past a batch not written.
    commit(&consumer, topic, &written, CommitMode::Sync);
    Ok(())
}

/// Commits the written offsets of the partitions this sink is assigned. A
/// partition revoked is left to its new owner, whose committed offset it
/// must not move back; if the owner reads a batch again, rewriting it
/// changes nothing.
fn commit(consumer: &StreamConsumer, topic: &str, written: &BTreeMap<i32, i64>, mode: CommitMode) {
    let Ok(assigned) = consumer.assignment() else {
        return;
    };
    let mut tpl = TopicPartitionList::new();
    for (&p, &next) in written {
        if assigned.find_partition(topic, p).is_some() {
            let _ = tpl.add_partition_offset(topic, p, Offset::Offset(next));
        }
    }
    if tpl.count() > 0
        && let Err(e) = consumer.commit(&tpl, mode)
    {
        log("WARN", format_args!("alert sink: commit: {e}"));
    }
}

/// Alerts and the messages that are not, each with its partition and offset.
fn sort_out(
    topic: &str,
    batch: &[OwnedMessage],
) -> (Vec<Sourced<AlertRecord>>, Vec<Sourced<Rejected>>) {
    let (mut alerts, mut rejected) = (Vec::new(), Vec::new());
    for m in batch {
        let payload = m.payload().unwrap_or_default();
        let (partition, offset) = (m.partition(), m.offset());
        match AlertRecord::parse(payload) {
            Ok(item) => alerts.push(Sourced {
                partition,
                offset,
                item,
            }),
            Err(refusal) => {
                log(
                    "WARN",
                    format_args!(
                        "alert sink: {topic}/{partition}@{offset} refused: {}",
                        refusal.0
                    ),
                );
                rejected.push(Sourced {
                    partition,
                    offset,
                    item: Rejected {
                        reason: storable(&refusal.0),
                        payload: payload.to_vec(),
                    },
                });
            }
        }
    }
    // One statement may not upsert the same row twice: the newest wins.
    let mut seen = std::collections::HashSet::new();
    let mut alerts: Vec<_> = alerts
        .into_iter()
        .rev()
        .filter(|a| seen.insert(a.item.alert_id.clone()))
        .collect();
    alerts.reverse();
    (alerts, rejected)
}

/// An alert kept as refused, with the reason.
fn refused(a: &Sourced<AlertRecord>, reason: &str) -> Sourced<Rejected> {
    Sourced {
        partition: a.partition,
        offset: a.offset,
        item: Rejected {
            reason: storable(reason),
            payload: a.item.raw.clone(),
        },
    }
}

/// Writes the batch, retrying until it lands or the sink is stopped
/// (`None`), and returns how many alerts were stored and how many kept as
/// refused: nothing is committed for a batch not written. A batch the
/// store refuses for its data is written alert by alert, and the alerts it
/// refuses are kept as rejected with its reason, so that one bad alert
/// cannot hold the partition.
async fn write(
    store: &AlertStore,
    topic: &str,
    alerts: Vec<Sourced<AlertRecord>>,
    mut rejected: Vec<Sourced<Rejected>>,
    metrics: &SinkMetrics,
    stop: &mut watch::Receiver<bool>,
) -> Option<(usize, usize)> {
    let mut wait = Duration::from_millis(200);
    let mut alerts = alerts;
    let (mut stored, mut refused_total) = (0, 0);
    loop {
        let written = tokio::select! {
            _ = stop.changed() => return None,
            w = store.write(topic, &alerts, &rejected) => w,
        };
        match written {
            Ok(taken) => {
                stored += alerts.len() - taken.len();
                refused_total += rejected.len();
                // Alerts whose id another transaction holds: kept as refused,
                // written on the next round with nothing else.
                rejected = taken
                    .into_iter()
                    .map(|(i, other)| {
                        let a = &alerts[i];
                        let why = format!(
                            "alert_id {} already names transaction {other}, not {}",
                            a.item.alert_id, a.item.transaction_id
                        );
                        refused(a, &why)
                    })
                    .collect();
                if rejected.is_empty() {
                    return Some((stored, refused_total));
                }
                alerts = Vec::new();
                continue;
            }
            Err(e) if e.is_data_error() && !alerts.is_empty() => {
                log(
                    "WARN",
                    format_args!(
                        "alert sink: the store refused a batch: {e}; writing it alert by alert"
                    ),
                );
                let alerts_before = alerts.len();
                let mut kept = Vec::new();
                for a in alerts {
                    match store.write(topic, std::slice::from_ref(&a), &[]).await {
                        Err(e) if e.is_data_error() => {
                            rejected.push(refused(&a, &format!("refused by the alert store: {e}")))
                        }
                        _ => kept.push(a),
                    }
                }
                let refused = kept.len() < alerts_before;
                alerts = kept;
                if refused {
                    continue;
                }
                // Each alert alone was taken: the batch failed for another
                // reason, retried after the pause below.
                metrics.errors.inc();
            }
            Err(e) => {
                metrics.errors.inc();
                log(
                    "WARN",
                    format_args!("alert sink: cannot write to the alert store: {e}; retrying"),
                );
            }
        }
        tokio::select! {
            _ = stop.changed() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}
