//! The declared logs of a features file's entities besides the card, as
//! the service's entity stage keeps them for the keys it owns. A card's
//! partition sees only its cards' events, while an entity (a merchant, a
//! device) has events on every partition: its owner gets each event's
//! stored fields ([`Program::entity_row`]), computes the event's values
//! from the entity's log before it and folds it in, as one engine of a
//! file pass does ([`super::Engine`]), and sends the values back.

use super::FeatureConfig;
use super::card::{DAY, Reader};
use super::declared::{DeclaredLog, Program};
use super::store::KeyedStore;
use std::collections::HashSet;
use std::sync::Arc;

/// Event time between two sweeps of idle entities, as in the engine.
const SWEEP_EVERY: i64 = 7 * DAY;

pub struct EntityLogs {
    program: Arc<Program>,
    cfg: FeatureConfig,
    /// Per entity besides the card (the first at 0), its logs by key.
    stores: Vec<KeyedStore<DeclaredLog>>,
    /// The newest event time folded in.
    watermark: i64,
    next_sweep: i64,
    /// Logs changed or dropped since the last [`EntityLogs::take_changed`].
    changed: HashSet<(usize, u64)>,
    pub expired: u64,
    pub overflows: u64,
    values: Vec<f64>,
}

/// A changelog key: an entity (1 for the first besides the card) and its key.
pub fn log_key(entity: usize, key: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(10);
    k.push(b'e');
    k.push(entity as u8);
    k.extend_from_slice(&key.to_le_bytes());
    k
}

/// The entity and key of a changelog key.
pub fn parse_log_key(bytes: &[u8]) -> Option<(usize, u64)> {
    match bytes {
        [b'e', entity, rest @ ..] if rest.len() == 8 => {
            Some((*entity as usize, u64::from_le_bytes(rest.try_into().ok()?)))
        }
        _ => None,
    }
}

impl EntityLogs {
    pub fn new(cfg: FeatureConfig, program: Arc<Program>) -> EntityLogs {
        EntityLogs {
            stores: (0..program.entities())
                .map(|_| KeyedStore::default())
                .collect(),
            program,
            cfg,
            watermark: i64::MIN,
            next_sweep: i64::MIN,
            changed: HashSet::new(),
            expired: 0,
            overflows: 0,
            values: Vec::new(),
        }
    }

    pub fn program(&self) -> &Arc<Program> {
        &self.program
    }

    /// Logs held, over every entity.
    pub fn len(&self) -> usize {
        self.stores.iter().map(KeyedStore::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn watermark(&self) -> i64 {
        self.watermark
    }

    /// The values of the `entity`-th entity's aggregations (1 for the
    /// first besides the card) for an event at `t` with stored fields
    /// `row`, from `key`'s log before it; then the event folded in.
    pub fn observe_and_fold(&mut self, entity: usize, key: u64, t: i64, row: &[f64]) -> &[f64] {
        let delay = self.cfg.label_delay_secs;
        let Some(store) = entity.checked_sub(1).and_then(|k| self.stores.get_mut(k)) else {
            self.values.clear();
            return &self.values;
        };
        self.watermark = self.watermark.max(t);
        let settled = self.watermark - self.cfg.allowed_lateness_secs;
        let log = store.get_or_default(key);
        self.program
            .entity_values(entity, Some(&*log), (t, delay), row, &mut self.values);
        if self.program.fold_row(log, t, row, settled, delay) {
            self.overflows += 1;
        }
        self.changed.insert((entity, key));
        if self.watermark >= self.next_sweep {
            self.next_sweep = self.watermark + SWEEP_EVERY;
            self.sweep();
        }
        &self.values
    }

    /// Drops the logs no window of an event still admitted reaches.
    fn sweep(&mut self) {
        let span = self.program.span(self.cfg.label_delay_secs);
        let useless = self.watermark - self.cfg.allowed_lateness_secs - span;
        for (k, store) in self.stores.iter_mut().enumerate() {
            let changed = &mut self.changed;
            self.expired += store.retain(|key, log| {
                let keep = log.newest().is_some_and(|t| t > useless);
                if !keep {
                    changed.insert((k + 1, key));
                }
                keep
            }) as u64;
        }
    }

    /// A log read back from the changelog (`value` as
    /// [`EntityLogs::encode`] wrote it); false if it does not decode.
    pub fn restore(&mut self, entity: usize, key: u64, value: &[u8]) -> bool {
        let mut r = Reader(value);
        let Some(log) = DeclaredLog::decode(&mut r) else {
            return false;
        };
        let Some(store) = entity.checked_sub(1).and_then(|k| self.stores.get_mut(k)) else {
            return false;
        };
        if let Some(t) = log.newest() {
            self.watermark = self.watermark.max(t);
        }
        *store.get_or_default(key) = log;
        true
    }

    /// The event-time clock, as a marker records it.
    pub fn clock(&self) -> (i64, i64) {
        (self.watermark, self.next_sweep)
    }

    pub fn set_clock(&mut self, (watermark, next_sweep): (i64, i64)) {
        self.watermark = watermark;
        self.next_sweep = next_sweep;
    }

    /// A log's changelog value, or `None` for a tombstone.
    pub fn encode(&self, entity: usize, key: u64) -> Option<Vec<u8>> {
        let log = self.stores.get(entity.checked_sub(1)?)?.get(key)?;
        let mut out = Vec::with_capacity(8 + 4 * log.len());
        log.encode(&mut out);
        Some(out)
    }

    /// The logs changed or dropped since the last call.
    pub fn take_changed(&mut self) -> Vec<(usize, u64)> {
        self.changed.drain().collect()
    }

    /// Every log held, for a snapshot.
    pub fn all(&self) -> Vec<(usize, u64)> {
        self.stores
            .iter()
            .enumerate()
            .flat_map(|(k, s)| s.iter().map(move |(key, _)| (k + 1, key)))
            .collect()
    }
}
