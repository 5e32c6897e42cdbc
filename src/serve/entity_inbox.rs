//! A card task's inbox of entity values: reads its partition of the
//! entity-features topic (by assignment, outside the groups, as a restore
//! reads a changelog) and holds each event's values, by input offset,
//! until the task scores the event.

use super::events::EntityColumns;
use super::partition::TaskContext;
use crate::features::declared::{EntityValues, MAX_ENTITIES};
use crate::telemetry::log;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One event's values as they came: per entity, and the first
/// entity-features offset that carried one of them.
struct Arrived {
    values: EntityValues,
    first_offset: i64,
}

#[derive(Default)]
struct Held {
    by_input_offset: HashMap<i64, Arrived>,
    /// The next entity-features offset to read.
    next: Option<i64>,
}

pub struct EntityInbox {
    held: Arc<Mutex<Held>>,
    arrived: Arc<tokio::sync::Notify>,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// The entities (bit `k` for the `k`-th besides the card) an event expects
/// values of.
pub fn mask_of(keys: &[Option<u64>; MAX_ENTITIES]) -> u8 {
    keys.iter()
        .enumerate()
        .filter(|(_, k)| k.is_some())
        .fold(0, |m, (k, _)| m | 1 << k)
}

impl EntityInbox {
    /// Starts reading partition `p` from `from` (the beginning if none).
    pub fn start(ctx: &TaskContext, p: i32, from: Option<i64>) -> anyhow::Result<EntityInbox> {
        let reader = super::kafka::reader(&ctx.state.settings, &ctx.topics.cards_group)?;
        let topic = ctx.topics.entity_features.clone();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, p, from.map_or(Offset::Beginning, Offset::Offset))?;
        reader.assign(&tpl)?;
        let held = Arc::new(Mutex::new(Held {
            next: from,
            ..Held::default()
        }));
        let arrived = Arc::new(tokio::sync::Notify::new());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (held, arrived, stop) = (held.clone(), arrived.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("entity-inbox-{p}"))
                .spawn(move || read(&reader, &held, &arrived, &stop))?
        };
        Ok(EntityInbox {
            held,
            arrived,
            stop,
            reader: Some(thread),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether every entity of `mask` has sent the event's values.
    pub fn has(&self, input_offset: i64, mask: u8) -> bool {
        self.lock()
            .by_input_offset
            .get(&input_offset)
            .is_some_and(|a| mask_of_values(&a.values) & mask == mask)
    }

    /// The event's values, taken out; `None` for an entity that sent none.
    pub fn take(&self, input_offset: i64) -> EntityValues {
        self.lock()
            .by_input_offset
            .remove(&input_offset)
            .map(|a| a.values)
            .unwrap_or_default()
    }

    /// Drops what came for events up to `input_offset`, scored already
    /// (values sent again after a restart, or after their wait ran out).
    pub fn forget_through(&self, input_offset: i64) {
        self.lock().by_input_offset.retain(|&o, _| o > input_offset);
    }

    /// Where to read again from for the events after `input_offset`: the
    /// first offset that carried a value of one of them, else the next.
    pub fn resume_for(&self, input_offset: i64) -> Option<i64> {
        let held = self.lock();
        held.by_input_offset
            .iter()
            .filter(|(o, _)| **o > input_offset)
            .map(|(_, a)| a.first_offset)
            .min()
            .or(held.next)
    }

    /// Resolves when values arrive (or arrived since the last call).
    pub async fn arrived(&self) {
        self.arrived.notified().await
    }
}

fn mask_of_values(v: &EntityValues) -> u8 {
    v.0.iter()
        .enumerate()
        .filter(|(_, x)| x.is_some())
        .fold(0, |m, (k, _)| m | 1 << k)
}

fn read(
    reader: &BaseConsumer,
    held: &Mutex<Held>,
    arrived: &tokio::sync::Notify,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Acquire) {
        let Some(result) = reader.poll(Duration::from_millis(100)) else {
            continue;
        };
        let msg = match result {
            Ok(m) => m,
            Err(rdkafka::error::KafkaError::PartitionEOF(_)) => continue,
            Err(e) => {
                log("WARN", format_args!("entity features: {e}"));
                continue;
            }
        };
        let Some(c) = msg.payload().and_then(EntityColumns::decode) else {
            log(
                "WARN",
                format_args!(
                    "entity features {}/{} offset {}: not entity values; skipped",
                    msg.topic(),
                    msg.partition(),
                    msg.offset()
                ),
            );
            continue;
        };
        let mut h = held.lock().unwrap_or_else(|e| e.into_inner());
        h.next = Some(msg.offset() + 1);
        let Some(k) = (c.entity as usize)
            .checked_sub(1)
            .filter(|&k| k < MAX_ENTITIES)
        else {
            continue;
        };
        let a = h
            .by_input_offset
            .entry(c.offset)
            .or_insert_with(|| Arrived {
                values: EntityValues::default(),
                first_offset: msg.offset(),
            });
        a.values.0[k] = Some(c.values);
        drop(h);
        arrived.notify_one();
    }
}

impl Drop for EntityInbox {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}
