//! The card tasks' inboxes of entity values, read by the instance's
//! [`AssignedReader`] of the entity-features topic: each task's inbox holds
//! each event's values, by input offset, until it scores the event.

use super::assigned::Receiver;
use super::events::EntityColumns;
use crate::features::declared::{EntityValues, MAX_ENTITIES};
use crate::telemetry::log;
use std::collections::HashMap;
use std::sync::Mutex;

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

/// A card task's inbox: each event's values, by input offset, until the
/// task scores the event.
pub struct EntityInbox {
    held: Mutex<Held>,
    arrived: tokio::sync::Notify,
}

impl EntityInbox {
    /// An inbox whose partition is read from `from`.
    pub fn new(from: Option<i64>) -> EntityInbox {
        EntityInbox {
            held: Mutex::new(Held {
                by_input_offset: HashMap::new(),
                next: from,
            }),
            arrived: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether every entity of `mask` has sent the event's values.
    pub fn has(&self, input_offset: i64, mask: u8) -> bool {
        self.came(input_offset) & mask == mask
    }

    /// The entities whose values came for the event at `input_offset`.
    pub fn came(&self, input_offset: i64) -> u8 {
        self.lock()
            .by_input_offset
            .get(&input_offset)
            .map_or(0, |a| a.values.came())
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

impl Receiver for EntityInbox {
    fn receive(&self, offset: i64, payload: &[u8]) {
        let mut h = self.lock();
        h.next = Some(offset + 1);
        let Some(c) = EntityColumns::decode(payload) else {
            log(
                "WARN",
                format_args!("entity features offset {offset}: not entity values; skipped"),
            );
            return;
        };
        let Some(k) = (c.entity as usize)
            .checked_sub(1)
            .filter(|&k| k < MAX_ENTITIES)
        else {
            return;
        };
        let a = h
            .by_input_offset
            .entry(c.offset)
            .or_insert_with(|| Arrived {
                values: EntityValues::default(),
                first_offset: offset,
            });
        a.values.0[k] = Some(c.values);
        drop(h);
        self.arrived.notify_one();
    }
}
