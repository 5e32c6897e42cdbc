//! Streaming features per card and per merchant, in event time.
//!
//! One implementation serves training, evaluation, replay and the service:
//! [`Engine::process`] computes an event's features from the state before it
//! and then folds the event in.

pub mod card;
pub mod declared;
pub mod entities;
pub mod expr;
pub mod file;
pub mod geo;
pub mod merchant;
pub mod store;

use crate::ingest::{Channel, Transaction};
use card::{Applied, CardState, CardView, DAY, LARGE_MIN_HISTORY, LARGE_RATIO, Recent};
use declared::{DeclaredLog, EntityKeys, EntityValues, MAX_ENTITIES, Program, Scratch};
use merchant::{HOUR, MerchantState, MerchantView};
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use store::{Found, KeyedStore, key_hash};

/// Feature names, in the order models see them.
pub const NAMES: [&str; N_FEATURES] = [
    "amount",
    "tx.weekend",
    "tx.night",
    "card.count_1d",
    "card.mean_amount_1d",
    "card.count_7d",
    "card.mean_amount_7d",
    "card.count_30d",
    "card.mean_amount_30d",
    "merchant.count_1d",
    "merchant.risk_1d",
    "merchant.count_7d",
    "merchant.risk_7d",
    "merchant.count_30d",
    "merchant.risk_30d",
    "card.amount_ratio_7d",
    "card.amount_ratio_30d",
    "card.amount_zscore_30d",
    "card.large_count_7d",
    "card.large_count_30d",
    "card.count_1h",
    "card.distinct_merchants_1d",
    "card.secs_since_prev",
    "card.geo_velocity_kmh",
    "merchant.count_1h",
    "tx.ecom",
    "tx.atm",
    "merchant.fraud_age_days",
    "merchant.last_fraud_age_days",
    "merchant.clean_since_fraud",
];
pub const N_FEATURES: usize = 30;
/// Columns a features file may declare besides the built-in ones.
pub const MAX_DECLARED: usize = 32;
/// Slots of [`Features`]: the built-in features, then the declared ones.
pub const MAX_SLOTS: usize = N_FEATURES + MAX_DECLARED;

/// Index of each feature in [`NAMES`].
pub mod idx {
    pub const AMOUNT: usize = 0;
    pub const WEEKEND: usize = 1;
    pub const NIGHT: usize = 2;
    pub const CARD_COUNT_1D: usize = 3;
    pub const CARD_MEAN_1D: usize = 4;
    pub const CARD_COUNT_7D: usize = 5;
    pub const CARD_MEAN_7D: usize = 6;
    pub const CARD_COUNT_30D: usize = 7;
    pub const CARD_MEAN_30D: usize = 8;
    pub const MERCHANT_DELAYED: usize = 9;
    pub const RATIO_7D: usize = 15;
    pub const RATIO_30D: usize = 16;
    pub const ZSCORE_30D: usize = 17;
    pub const LARGE_7D: usize = 18;
    pub const LARGE_30D: usize = 19;
    pub const CARD_COUNT_1H: usize = 20;
    pub const DISTINCT_MERCHANTS_1D: usize = 21;
    pub const SECS_SINCE_PREV: usize = 22;
    pub const VELOCITY: usize = 23;
    pub const MERCHANT_COUNT_1H: usize = 24;
    pub const ECOM: usize = 25;
    pub const ATM: usize = 26;
    pub const FRAUD_AGE: usize = 27;
    pub const LAST_FRAUD_AGE: usize = 28;
    pub const CLEAN_SINCE_FRAUD: usize = 29;
}

/// How often, in event time, idle keys are looked for: a sweep visits every
/// key, so weekly; a key then lives at most a week past its 31 idle days.
const SWEEP_EVERY: i64 = 7 * DAY;
/// How many events ahead [`Engine::prefetch_ahead`] asks for an event's
/// index entry, state and history.
const PREFETCH_AHEAD: [usize; 3] = [12, 6, 2];

/// Time since the previous transaction is capped here (and given for a first one).
pub const NO_PREVIOUS_SECS: i64 = 30 * DAY;

/// An event's features: the built-in ones in [`NAMES`] order, then the
/// columns a features file declares ([`file::Plan`] says which slot is
/// which column of a model).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Features(pub [f32; MAX_SLOTS]);

impl Default for Features {
    fn default() -> Self {
        Features([0.0; MAX_SLOTS])
    }
}

/// A map of each built-in feature's name to its value.
impl Serialize for Features {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(N_FEATURES))?;
        for (name, v) in NAMES.iter().zip(&self.0[..N_FEATURES]) {
            map.serialize_entry(name, &f64::from(*v))?;
        }
        map.end()
    }
}

impl Features {
    pub fn get(&self, name: &str) -> Option<f32> {
        NAMES.iter().position(|n| *n == name).map(|i| self.0[i])
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a map of names to numbers is JSON")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct FeatureConfig {
    /// Seconds between a transaction and the moment its fraud label is known.
    pub label_delay_secs: i64,
    /// How far behind the newest event time an event may arrive and still count.
    pub allowed_lateness_secs: i64,
    /// Raw events kept per card for the exact 1-hour and 1-day windows.
    pub max_recent: usize,
}

impl Default for FeatureConfig {
    fn default() -> Self {
        FeatureConfig {
            label_delay_secs: 7 * DAY,
            allowed_lateness_secs: HOUR,
            max_recent: 64,
        }
    }
}

/// Counters of what the engine had to do beyond the ordinary path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    pub events: u64,
    pub too_late: u64,
    pub duplicates: u64,
    pub recent_overflows: u64,
    /// Events a card's log had to drop while still in its 30-day window.
    pub window_overflows: u64,
    pub labels_applied: u64,
    pub labels_too_old: u64,
    pub cards_expired: u64,
    pub merchants_expired: u64,
    /// Logs of declared entities besides the card dropped when idle.
    pub entities_expired: u64,
}

impl EngineStats {
    /// The counts of two engines that shared the work, as one engine's.
    pub fn merge(self, other: EngineStats) -> EngineStats {
        EngineStats {
            events: self.events + other.events,
            too_late: self.too_late + other.too_late,
            duplicates: self.duplicates + other.duplicates,
            recent_overflows: self.recent_overflows + other.recent_overflows,
            window_overflows: self.window_overflows + other.window_overflows,
            labels_applied: self.labels_applied + other.labels_applied,
            labels_too_old: self.labels_too_old + other.labels_too_old,
            cards_expired: self.cards_expired + other.cards_expired,
            merchants_expired: self.merchants_expired + other.merchants_expired,
            entities_expired: self.entities_expired + other.entities_expired,
        }
    }
}

/// An event older than the watermark minus the allowed lateness.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error(
    "event time {event} is more than the allowed lateness behind the newest event time {watermark}"
)]
pub struct TooLate {
    pub event: i64,
    pub watermark: i64,
}

/// Why an event was left out of the state.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    TooLate(#[from] TooLate),
    /// Its transaction id is already in its card's state: a producer's
    /// retry or a replayed batch, which must not count twice.
    #[error("transaction already in its card's state: a duplicate delivery")]
    Duplicate,
}

pub struct Engine {
    cfg: FeatureConfig,
    cards: KeyedStore<CardState>,
    merchants: KeyedStore<MerchantState>,
    /// Fraud labels not yet known: (known at, merchant key, transaction time).
    pending: BinaryHeap<Reverse<(i64, u64, i64)>>,
    watermark: i64,
    next_sweep: i64,
    stats: EngineStats,
    /// Cards changed since the last checkpoint, when the service keeps a changelog.
    changes: Option<CardChanges>,
    /// The declared features of a features file, when it declares any.
    program: Option<Arc<Program>>,
    /// The declared logs of each entity besides the card the program
    /// aggregates over, by the entity's key.
    entities: Vec<KeyedStore<DeclaredLog>>,
    /// The entities besides the card are kept by their owners (the
    /// service's entity stage), not here: their values come with each
    /// event, and read `missing` where none came.
    entities_elsewhere: bool,
    scratch: Scratch,
}

/// The cards an engine changed and dropped since a checkpoint.
#[derive(Debug, Default)]
pub struct CardChanges {
    pub changed: std::collections::HashSet<u64>,
    pub removed: std::collections::HashSet<u64>,
}

/// An engine's event-time clock: its watermark and next sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct EngineClock {
    pub watermark: i64,
    pub next_sweep: i64,
}

impl Engine {
    pub fn new(cfg: FeatureConfig) -> Engine {
        Engine {
            cfg: FeatureConfig {
                max_recent: cfg.max_recent.clamp(1, 128),
                ..cfg
            },
            cards: KeyedStore::default(),
            merchants: KeyedStore::default(),
            pending: BinaryHeap::new(),
            watermark: i64::MIN,
            next_sweep: i64::MIN,
            stats: EngineStats::default(),
            changes: None,
            program: None,
            entities: Vec::new(),
            entities_elsewhere: false,
            scratch: Scratch::default(),
        }
    }

    /// An engine that also computes a features file's declared columns.
    pub fn with_plan(cfg: FeatureConfig, plan: &file::Plan) -> Engine {
        let entities = plan.program.as_ref().map_or(0, |p| p.entities());
        Engine {
            program: plan.program.clone(),
            entities: (0..entities).map(|_| KeyedStore::default()).collect(),
            ..Engine::new(cfg)
        }
    }

    /// [`Engine::with_plan`] for a card partition of the service: the
    /// entities besides the card are kept by their owners, and their
    /// values given with each event ([`Engine::process_card`]).
    pub fn with_plan_per_card(cfg: FeatureConfig, plan: &file::Plan) -> Engine {
        Engine {
            program: plan.program.clone(),
            entities_elsewhere: true,
            ..Engine::new(cfg)
        }
    }

    pub fn config(&self) -> &FeatureConfig {
        &self.cfg
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    pub fn cards(&self) -> usize {
        self.cards.len()
    }

    pub fn merchants(&self) -> usize {
        self.merchants.len()
    }

    /// The newest event time seen, if any.
    pub fn watermark(&self) -> Option<i64> {
        (self.watermark != i64::MIN).then_some(self.watermark)
    }

    fn check_late(&self, t: i64) -> Result<(), TooLate> {
        if self.watermark != i64::MIN && t < self.watermark - self.cfg.allowed_lateness_secs {
            return Err(TooLate {
                event: t,
                watermark: self.watermark,
            });
        }
        Ok(())
    }

    /// Lets a card's event in: refused if too late or already in its
    /// card's state, else event time moves on. Where the card's state is,
    /// for the fold, unless an idle sweep may have moved it.
    #[inline]
    fn admit_card(&mut self, t: i64, keys: Keys) -> Result<Option<Found>, Refused> {
        if let Err(e) = self.check_late(t) {
            self.stats.too_late += 1;
            return Err(e.into());
        }
        let found = self.cards.find(keys.card);
        if self.seen_at(found, keys, t) {
            self.stats.duplicates += 1;
            return Err(Refused::Duplicate);
        }
        let swept = self.advance(t);
        Ok(found.filter(|_| !swept))
    }

    /// Whether the event's transaction (its id at time `t`) is already in
    /// its card's state.
    pub fn is_duplicate(&self, keys: Keys, t: i64) -> bool {
        self.seen_at(self.cards.find(keys.card), keys, t)
    }

    /// [`Engine::is_duplicate`] with the card's state found.
    fn seen_at(&self, card: Option<Found>, keys: Keys, t: i64) -> bool {
        keys.transaction != 0
            && card.is_some_and(|c| self.cards.at(c).has_seen(keys.short_id(), t as u32))
    }

    /// Starts loading the state of the events after `keys[i]`, the one
    /// about to be computed; see [`store::prefetch`]. A lookup is three
    /// dependent loads (index entry, state, history), so each is asked for
    /// at its own distance ahead ([`PREFETCH_AHEAD`]): the entry early
    /// enough to have arrived when the state's address is read from it,
    /// and so on, with a steady few loads in flight. At `i` = 0 the first
    /// events' loads are asked for too.
    pub fn prefetch_ahead(&self, keys: &[Keys], i: usize) {
        let [key, state, history] = PREFETCH_AHEAD;
        if i == 0 {
            keys.iter().take(key).for_each(|&k| self.prefetch_keys(k));
            keys.iter().take(state).for_each(|&k| self.prefetch(k));
            keys.iter()
                .take(history)
                .for_each(|&k| self.prefetch_history(k));
        }
        if let Some(&k) = keys.get(i + key) {
            self.prefetch_keys(k);
        }
        if let Some(&k) = keys.get(i + state) {
            self.prefetch(k);
        }
        if let Some(&k) = keys.get(i + history) {
            self.prefetch_history(k);
        }
    }

    fn prefetch_keys(&self, keys: Keys) {
        // An engine of a split pipeline holds only one of the two.
        if !self.cards.is_empty() {
            self.cards.prefetch_key(keys.card);
        }
        if !self.merchants.is_empty() {
            self.merchants.prefetch_key(keys.merchant);
        }
    }

    fn prefetch(&self, keys: Keys) {
        if let Some(c) = self.card_of(keys) {
            store::prefetch(c, std::mem::size_of_val(c));
        }
        if let Some(m) = self.merchant_of(keys) {
            store::prefetch(m, std::mem::size_of_val(m));
        }
    }

    /// The card's state, without a lookup in an engine that holds no cards.
    fn card_of(&self, keys: Keys) -> Option<&CardState> {
        (!self.cards.is_empty())
            .then(|| self.cards.get(keys.card))
            .flatten()
    }

    /// The merchant's state, likewise.
    fn merchant_of(&self, keys: Keys) -> Option<&MerchantState> {
        (!self.merchants.is_empty())
            .then(|| self.merchants.get(keys.merchant))
            .flatten()
    }

    fn prefetch_history(&self, keys: Keys) {
        if let Some(c) = self.card_of(keys) {
            c.prefetch_history();
        }
        if let Some(m) = self.merchant_of(keys) {
            m.prefetch_history();
        }
    }

    /// Features of `tx` as if it were processed now, without changing state.
    pub fn peek(&self, tx: &Transaction) -> Features {
        let mut f = Features::default();
        self.peek_observed(tx, Keys::of(tx), &mut f)
            .derive(tx, &mut f);
        f
    }

    /// [`Engine::peek`] without deriving the built-in features: the
    /// declared ones go into `f`'s declared slots.
    pub fn peek_observed(&self, tx: &Transaction, keys: Keys, f: &mut Features) -> Observed {
        let card = self.cards.get(keys.card);
        let merchant = self.merchant_view(keys.merchant, tx.time.utc);
        self.peek_declared(card, tx, None, f);
        observe(card, merchant, tx, keys)
    }

    /// The declared columns of an event the state does not take.
    fn peek_declared(
        &self,
        card: Option<&CardState>,
        tx: &Transaction,
        owned_elsewhere: Option<&EntityValues>,
        f: &mut Features,
    ) {
        if let Some(p) = &self.program {
            let keys = p.entity_keys(tx);
            let logs = entity_logs(card.and_then(|c| c.declared()), &self.entities, &keys);
            let out = &mut f.0[N_FEATURES..];
            let delay = self.cfg.label_delay_secs;
            let scratch = &mut Scratch::default();
            let owned_elsewhere = self.owned_elsewhere(owned_elsewhere);
            p.observe(&logs, &keys, tx, delay, scratch, owned_elsewhere, out);
        }
    }

    fn merchant_view(&self, merchant_key: u64, t: i64) -> MerchantView {
        self.merchants
            .get(merchant_key)
            .map(|m| m.view(t, self.cfg.label_delay_secs))
            .unwrap_or_default()
    }

    /// Computes the features of `tx` and folds it into the state. An event
    /// too far behind the watermark, or already in its card's state, changes
    /// nothing and is returned as an error.
    pub fn process(&mut self, tx: &Transaction) -> Result<Features, Refused> {
        self.process_keyed(tx, Keys::of(tx))
    }

    /// [`Engine::process`] with the keys already hashed.
    pub fn process_keyed(&mut self, tx: &Transaction, keys: Keys) -> Result<Features, Refused> {
        let mut f = Features::default();
        self.observe_keyed(tx, keys, &mut f)?.derive(tx, &mut f);
        Ok(f)
    }

    /// [`Engine::process_keyed`] without deriving the built-in features:
    /// the state's part only, for a backtest that derives them on another
    /// thread. The declared features, which need the state, go into `f`.
    pub fn observe_keyed(
        &mut self,
        tx: &Transaction,
        keys: Keys,
        f: &mut Features,
    ) -> Result<Observed, Refused> {
        let found = self.admit_card(tx.time.utc, keys)?;
        let merchant = self.fold_merchant(tx.time.utc, keys.merchant);
        Ok(self.fold_card(tx, keys, found, merchant, None, f))
    }

    /// The card half of [`Engine::observe_keyed`], for a pipeline that runs
    /// the merchant half ([`Engine::observe_merchant`]) on another thread,
    /// in an engine of its own that sees the same events in the same order.
    /// The lateness and duplicate checks are the card's; the merchant's view
    /// is left empty for that half to fill in ([`Observed::set_merchant`]).
    pub fn observe_card_keyed(
        &mut self,
        tx: &Transaction,
        keys: Keys,
        f: &mut Features,
    ) -> Result<Observed, Refused> {
        let found = self.admit_card(tx.time.utc, keys)?;
        Ok(self.fold_card(tx, keys, found, MerchantView::default(), None, f))
    }

    /// The merchant half of [`Engine::observe_keyed`]: the merchant's view
    /// of an event at `t`. An event the card half admitted moves this
    /// engine's event time and is added to its merchant; a refused one
    /// only reads the merchant, as [`Engine::peek_observed`] does.
    pub fn observe_merchant(&mut self, t: i64, merchant_key: u64, admitted: bool) -> MerchantView {
        if !admitted {
            return self.merchant_view(merchant_key, t);
        }
        self.advance(t);
        self.fold_merchant(t, merchant_key)
    }

    /// The merchant's view of an admitted event, then the event added to it.
    fn fold_merchant(&mut self, t: i64, merchant_key: u64) -> MerchantView {
        let oldest_hour = self.oldest_merchant_hour();
        let merchant = self.merchants.get_or_default(merchant_key);
        let view = merchant.view(t, self.cfg.label_delay_secs);
        merchant.add_transaction(t);
        merchant.expire(oldest_hour);
        view
    }

    /// The card's view of an admitted event, with its merchant's view
    /// given, then the event folded into the card; declared columns into `f`.
    fn fold_card(
        &mut self,
        tx: &Transaction,
        keys: Keys,
        found: Option<Found>,
        merchant: MerchantView,
        owned_elsewhere: Option<&EntityValues>,
        f: &mut Features,
    ) -> Observed {
        let cfg = self.cfg;
        let owned_elsewhere = self.owned_elsewhere(owned_elsewhere);
        let card = self.cards.found_or_default(keys.card, found);
        let settled = self.watermark - cfg.allowed_lateness_secs;
        let declared = self.program.as_deref().map(|program| Declared {
            program,
            scratch: &mut self.scratch,
            entities: &mut self.entities,
            owned_elsewhere,
            out: f,
        });
        let (observed, applied) =
            observe_and_fold(card, merchant, tx, keys, settled, &cfg, declared);
        self.stats.recent_overflows += u64::from(applied.recent_overflow);
        self.stats.window_overflows += u64::from(applied.window_overflow);
        self.stats.events += 1;
        observed
    }

    /// A card's label that came after its event (at `t`) was folded in, as
    /// the service's labels come: the card's declared rows at `t` take it.
    /// Whether one did.
    pub fn label_card_event(&mut self, card_id: &str, t: i64, is_fraud: bool) -> bool {
        self.label_card(key_hash(card_id), t, is_fraud)
    }

    /// [`Engine::label_card_event`] for the card whose key hash is `key`.
    pub fn label_card(&mut self, key: u64, t: i64, is_fraud: bool) -> bool {
        let Some(p) = self.program.clone() else {
            return false;
        };
        let Some(found) = self.cards.find(key) else {
            return false;
        };
        let card = self.cards.found_or_default(key, Some(found));
        let labelled = p.label_rows(card.declared_mut(), t, is_fraud);
        if let (true, Some(c)) = (labelled, &mut self.changes) {
            c.changed.insert(key.max(1));
        }
        labelled
    }

    /// The values of the entities besides the card an event is computed
    /// with: those given, or, in an engine whose entities are kept
    /// elsewhere, none (each then reads its `missing`).
    fn owned_elsewhere<'a>(&self, given: Option<&'a EntityValues>) -> Option<&'a EntityValues> {
        static NONE: EntityValues = EntityValues([None, None, None, None]);
        given.or(self.entities_elsewhere.then_some(&NONE))
    }

    /// Whether this engine holds state for the card.
    pub fn has_card(&self, card_id: &str) -> bool {
        self.cards.get(key_hash(card_id)).is_some()
    }

    /// The service's path. A card's state lives in the engine of its Kafka
    /// partition, while its merchant's state is aggregated elsewhere (by
    /// merchant), so the merchant's view comes with the transaction. Only
    /// the card's state changes.
    /// The values of the entities besides the card come with it too, when
    /// the program has any and their owners computed them (`entities`).
    pub fn process_card(
        &mut self,
        tx: &Transaction,
        merchant: MerchantView,
        entities: Option<&EntityValues>,
    ) -> Result<Features, Refused> {
        let keys = Keys::of(tx);
        let found = self.admit_card(tx.time.utc, keys)?;
        let mut f = Features::default();
        let observed = self.fold_card(tx, keys, found, merchant, entities, &mut f);
        if let Some(c) = &mut self.changes {
            c.changed.insert(keys.card.max(1));
        }
        observed.derive(tx, &mut f);
        Ok(f)
    }

    /// [`Engine::peek`] with the merchant's view given, as in [`Engine::process_card`].
    pub fn peek_card(
        &self,
        tx: &Transaction,
        merchant: MerchantView,
        entities: Option<&EntityValues>,
    ) -> Features {
        let keys = Keys::of(tx);
        let card = self.cards.get(keys.card);
        let mut f = Features::default();
        self.peek_declared(card, tx, entities, &mut f);
        observe(card, merchant, tx, keys).derive(tx, &mut f);
        f
    }

    /// Starts recording which cards change, for a changelog of the state.
    pub fn track_changes(&mut self) {
        self.changes.get_or_insert_with(CardChanges::default);
    }

    /// The cards changed and dropped since the last call; tracking goes on.
    pub fn take_changes(&mut self) -> CardChanges {
        match &mut self.changes {
            Some(c) => std::mem::take(c),
            None => CardChanges::default(),
        }
    }

    /// A card's state by key hash.
    pub fn card(&self, key: u64) -> Option<&CardState> {
        self.cards.get(key)
    }

    /// Every card's state with its key hash.
    pub fn all_cards(&self) -> impl Iterator<Item = (u64, &CardState)> {
        self.cards.iter()
    }

    /// Drops these cards (keys as [`Engine::all_cards`] gives them) in one
    /// pass over the store.
    pub fn remove_cards(&mut self, keys: &std::collections::HashSet<u64>) {
        if !keys.is_empty() {
            self.cards.retain(|k, _| !keys.contains(&k));
        }
    }

    /// Puts a card's state back, as read from a changelog. A declared log
    /// written under another features file (or none now) is dropped: this
    /// engine's declared features start from the card's next event.
    pub fn insert_card(&mut self, key: u64, mut state: CardState) {
        state.keep_declared(self.program.as_deref().map(Program::layout));
        *self.cards.get_or_default(key) = state;
    }

    /// What besides the cards a checkpoint of this engine must hold.
    pub fn clock(&self) -> EngineClock {
        EngineClock {
            watermark: self.watermark,
            next_sweep: self.next_sweep,
        }
    }

    /// Restores what [`Engine::clock`] returned.
    pub fn set_clock(&mut self, clock: EngineClock) {
        self.watermark = clock.watermark;
        self.next_sweep = clock.next_sweep;
    }

    /// A fraud label from a file: it becomes known `label_delay` after the
    /// transaction and only then reaches the merchant's risk.
    pub fn schedule_label(&mut self, merchant_id: &str, tx_time: i64) {
        self.pending.push(Reverse((
            tx_time + self.cfg.label_delay_secs,
            key_hash(merchant_id),
            tx_time,
        )));
    }

    /// A fraud label known now (the service's label topic).
    fn apply_label(&mut self, merchant_key: u64, tx_time: i64) {
        let oldest = self.oldest_merchant_hour();
        let m = self.merchants.get_or_default(merchant_key);
        if m.add_fraud(tx_time, oldest) {
            self.stats.labels_applied += 1;
        } else {
            self.stats.labels_too_old += 1;
        }
    }

    fn oldest_merchant_hour(&self) -> i64 {
        if self.watermark == i64::MIN {
            return i64::MIN;
        }
        (self.watermark - self.cfg.allowed_lateness_secs - self.cfg.label_delay_secs - 30 * DAY)
            .div_euclid(HOUR)
            - 1
    }

    /// Moves event time forward: releases labels that are now known and,
    /// once a week of event time, drops idle keys (whether it did).
    fn advance(&mut self, t: i64) -> bool {
        if t > self.watermark {
            self.watermark = t;
        }
        while let Some(&Reverse((known_at, merchant, tx_time))) = self.pending.peek() {
            if known_at > self.watermark {
                break;
            }
            self.pending.pop();
            self.apply_label(merchant, tx_time);
        }
        let sweep = self.watermark >= self.next_sweep;
        if sweep {
            self.next_sweep = self.watermark + SWEEP_EVERY;
            self.sweep();
        }
        sweep
    }

    fn sweep(&mut self) {
        // A card is of use while a window reaches its newest event: 30
        // days, or a declared window that ends a label delay back.
        let declared = (self.program.as_deref())
            .filter(|p| p.card_logged())
            .map_or(0, |p| p.span(self.cfg.label_delay_secs));
        let reach = (30 * DAY).max(declared);
        let idle_day =
            (self.watermark - self.cfg.allowed_lateness_secs - reach).div_euclid(DAY) - 1;
        let changes = &mut self.changes;
        self.stats.cards_expired += self.cards.retain(|key, c| {
            let keep = c.newest_day() as i64 >= idle_day;
            if let (false, Some(ch)) = (keep, changes.as_mut()) {
                ch.changed.remove(&key);
                ch.removed.insert(key);
            }
            keep
        }) as u64;
        let oldest = self.oldest_merchant_hour();
        self.stats.merchants_expired += self.merchants.retain(|_, m| {
            m.expire(oldest);
            !m.is_empty()
        }) as u64;
        if let Some(p) = &self.program {
            // No window of an event still admitted reaches back this far.
            let span = p.span(self.cfg.label_delay_secs);
            let useless = self.watermark - self.cfg.allowed_lateness_secs - span;
            for store in &mut self.entities {
                self.stats.entities_expired +=
                    store.retain(|_, log| log.newest().is_some_and(|t| t > useless)) as u64;
            }
        }
    }
}

/// The hashed card and merchant ids of a transaction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Keys {
    pub card: u64,
    pub merchant: u64,
    /// The transaction id's hash; 0 for none.
    pub transaction: u64,
}

impl Keys {
    /// The 32 bits of the transaction's hash a card keeps; 0 for none.
    pub fn short_id(&self) -> u32 {
        if self.transaction == 0 {
            0
        } else {
            (self.transaction as u32).max(1)
        }
    }

    pub fn of(tx: &Transaction) -> Keys {
        Keys {
            card: key_hash(&tx.card_id),
            merchant: key_hash(&tx.merchant_id),
            transaction: if tx.transaction_id.is_empty() {
                0
            } else {
                key_hash(&tx.transaction_id).max(1)
            },
        }
    }
}

fn coord(lat: Option<f64>, lon: Option<f64>) -> (f32, f32) {
    match (lat, lon) {
        (Some(a), Some(b)) => (a as f32, b as f32),
        _ => (f32::NAN, f32::NAN),
    }
}

/// What a features file's program needs to compute an event's declared
/// columns and fold it into its entities.
struct Declared<'a> {
    program: &'a Program,
    scratch: &'a mut Scratch,
    entities: &'a mut [KeyedStore<DeclaredLog>],
    /// The values of the entities besides the card, when their owners
    /// computed them: then this engine neither reads nor keeps their logs.
    owned_elsewhere: Option<&'a EntityValues>,
    out: &'a mut Features,
}

/// The declared logs an event's aggregations read: its card's, then its
/// entities' besides the card (none where it has no key or the entity no log).
fn entity_logs<'a>(
    card: Option<&'a DeclaredLog>,
    entities: &'a [KeyedStore<DeclaredLog>],
    keys: &EntityKeys,
) -> [Option<&'a DeclaredLog>; 1 + MAX_ENTITIES] {
    let mut logs = [None; 1 + MAX_ENTITIES];
    logs[0] = card;
    for (log, (store, key)) in logs[1..].iter_mut().zip(entities.iter().zip(keys.0)) {
        *log = key.and_then(|k| store.get(k));
    }
    logs
}

/// What the card's state says about an event (with the declared columns
/// when a program is given), then the event folded into it and into its
/// declared entities.
fn observe_and_fold(
    card: &mut CardState,
    merchant: MerchantView,
    tx: &Transaction,
    keys: Keys,
    settled: i64,
    cfg: &FeatureConfig,
    declared: Option<Declared>,
) -> (Observed, Applied) {
    let observed = observe(Some(&*card), merchant, tx, keys);
    let mut applied = fold_card(card, tx, keys, observed.large, settled, cfg.max_recent);
    if let Some(Declared {
        program: p,
        scratch,
        entities,
        owned_elsewhere,
        out,
    }) = declared
    {
        let entity_keys = p.entity_keys(tx);
        let logs = entity_logs(card.declared(), entities, &entity_keys);
        let delay = cfg.label_delay_secs;
        p.observe(
            &logs,
            &entity_keys,
            tx,
            delay,
            scratch,
            owned_elsewhere,
            &mut out.0[N_FEATURES..],
        );
        let t = tx.time.utc;
        if p.card_logged() {
            let log = card.declared_mut();
            applied.window_overflow |= p.fold(log, t, scratch, settled, delay);
        }
        let entities = if owned_elsewhere.is_some() {
            &mut [][..]
        } else {
            entities
        };
        for (store, key) in entities.iter_mut().zip(entity_keys.0) {
            if let Some(k) = key {
                let log = store.get_or_default(k);
                applied.window_overflow |= p.fold(log, t, scratch, settled, delay);
            }
        }
    }
    (observed, applied)
}

/// Folds an event into its card's state.
fn fold_card(
    card: &mut CardState,
    tx: &Transaction,
    keys: Keys,
    large: bool,
    settled: i64,
    max_recent: usize,
) -> Applied {
    let (lat, lon) = coord(tx.lat, tx.lon);
    let ev = Recent {
        ts: tx.time.utc as u32,
        amount: state_amount(tx.amount),
        merchant: (keys.merchant >> 32) as u32,
        lat,
        lon,
        id: keys.short_id(),
    };
    card.apply(ev, large, settled, max_recent)
}

/// What the state says about an event before the event is folded in:
/// the features follow from it and the transaction alone ([`Observed::features`]),
/// so that a backtest can derive them on another thread than the one that
/// keeps the state.
#[derive(Debug, Clone, Copy, Default)]
pub struct Observed {
    card: CardView,
    merchant: MerchantView,
    /// The amount counts as large for the card.
    large: bool,
}

fn observe(
    card: Option<&CardState>,
    merchant: MerchantView,
    tx: &Transaction,
    keys: Keys,
) -> Observed {
    let t = tx.time.utc;
    let merchant_key = (keys.merchant >> 32) as u32;
    let card = card.map(|c| c.view(t, merchant_key)).unwrap_or_default();
    let history = card.prev_30d;
    let large = history.count >= LARGE_MIN_HISTORY && tx.amount >= LARGE_RATIO * history.mean();
    Observed {
        card,
        merchant,
        large,
    }
}

impl Observed {
    /// The merchant's view, from the merchant half of a split pipeline.
    pub fn set_merchant(&mut self, merchant: MerchantView) {
        self.merchant = merchant;
    }

    /// The built-in features of `tx` into `out`'s first slots, from what
    /// the state said about it: the one feature computation, for every
    /// path. The declared slots are left as they are: the engine fills
    /// them with the state.
    pub fn derive(&self, tx: &Transaction, out: &mut Features) {
        let (cv, mv, large) = (&self.card, &self.merchant, self.large);
        let t = tx.time.utc;
        let amount = tx.amount.min(AMOUNT_CEILING);
        let (lat, lon) = coord(tx.lat, tx.lon);

        let local = tx.time.local();
        let local_day = local.div_euclid(DAY);
        let weekday = (local_day + 3).rem_euclid(7); // 1970-01-01 was a Thursday; Monday = 0
        let hour = local.rem_euclid(DAY) / 3600;

        let mean_prev_30 = cv.prev_30d.mean();
        let mean_prev_7 = cv.prev_7d.mean();
        // The floor (a cent, as for the spread below) keeps a card whose mean is
        // a trace of an amount from a ratio past f32's range.
        let ratio = |mean: f64| {
            if mean > 0.0 {
                amount / mean.max(0.01)
            } else {
                1.0
            }
        };
        let zscore = if cv.prev_30d.count >= 2 {
            let n = cv.prev_30d.count as f64;
            let var = (cv.prev_30d.sumsq / n - mean_prev_30 * mean_prev_30).max(0.0);
            // A floor on the spread keeps a card with identical amounts from
            // turning a one-cent change into an extreme score.
            let sd = var.sqrt().max(0.1 * mean_prev_30).max(0.01);
            (amount - mean_prev_30) / sd
        } else {
            0.0
        };

        let f = &mut out.0;
        f[idx::AMOUNT] = amount as f32;
        f[idx::WEEKEND] = f32::from(weekday >= 5);
        f[idx::NIGHT] = f32::from(hour <= 6);
        let windows = [
            (cv.count_1d, cv.sum_1d),
            (cv.prev_7d.count, cv.prev_7d.sum),
            (cv.prev_30d.count, cv.prev_30d.sum),
        ];
        for (k, (count, sum)) in windows.into_iter().enumerate() {
            let n = count + 1;
            f[idx::CARD_COUNT_1D + 2 * k] = n as f32;
            f[idx::CARD_MEAN_1D + 2 * k] = ((sum + amount) / n as f64) as f32;
        }
        for (k, w) in mv.delayed.iter().enumerate() {
            f[idx::MERCHANT_DELAYED + 2 * k] = w.count as f32;
            f[idx::MERCHANT_DELAYED + 2 * k + 1] = w.risk() as f32;
        }
        f[idx::RATIO_7D] = ratio(mean_prev_7) as f32;
        f[idx::RATIO_30D] = ratio(mean_prev_30) as f32;
        f[idx::ZSCORE_30D] = zscore as f32;
        f[idx::LARGE_7D] = (cv.prev_7d.large + u32::from(large)) as f32;
        f[idx::LARGE_30D] = (cv.prev_30d.large + u32::from(large)) as f32;
        f[idx::CARD_COUNT_1H] = (cv.count_1h + 1) as f32;
        f[idx::DISTINCT_MERCHANTS_1D] = cv.distinct_merchants_1d as f32;
        f[idx::SECS_SINCE_PREV] =
            cv.secs_since_prev
                .map_or(NO_PREVIOUS_SECS, |s| s.min(NO_PREVIOUS_SECS)) as f32;
        f[idx::VELOCITY] = cv.velocity_kmh(lat, lon) as f32;
        f[idx::MERCHANT_COUNT_1H] = (mv.count_1h + 1) as f32;
        f[idx::ECOM] = f32::from(tx.channel == Some(Channel::Ecom));
        f[idx::ATM] = f32::from(tx.channel == Some(Channel::Atm));
        let age = |h: Option<i64>| h.map_or(0.0, |h| (t - h * HOUR) as f64 / DAY as f64) as f32;
        f[idx::FRAUD_AGE] = age(mv.first_fraud_hour);
        f[idx::LAST_FRAUD_AGE] = age(mv.last_fraud_hour);
        f[idx::CLEAN_SINCE_FRAUD] = mv.clean_since_fraud as f32;
    }
}

/// Amounts as the state holds them: at most [`AMOUNT_CEILING`], so that no
/// window's sum, nor the sum of its squares in `f32`, can overflow to
/// infinity and no feature to NaN, whatever a file holds. The service
/// refuses amounts over `max_amount` (10^9 by default) before they get here.
pub fn state_amount(amount: f64) -> f32 {
    amount.clamp(0.0, AMOUNT_CEILING) as f32
}

/// 10^15: its square times a day's 4 095 counted events stays far inside `f32`.
pub const AMOUNT_CEILING: f64 = 1e15;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::Transaction;

    /// An absurd amount from a file leaves every later feature finite.
    #[test]
    fn no_amount_makes_a_window_infinite() {
        let mut engine = Engine::new(FeatureConfig::default());
        let mut tx = Transaction {
            card_id: "c".into(),
            merchant_id: "m".into(),
            ..Transaction::default()
        };
        let amounts = [5.0, 1e39, f64::MAX, 7.0, 9.0];
        // On another card, traces of an amount then the most allowed.
        let traces = [1e-40, 1e-300, 1e-40, 1e9, 1e15];
        for (i, amount) in amounts.into_iter().chain(traces).enumerate() {
            if i == amounts.len() {
                tx.card_id = "d".into();
            }
            tx.transaction_id = i.to_string();
            tx.time.utc = 1_522_540_800 + 60 * i as i64;
            tx.amount = amount;
            let f = engine.process(&tx).unwrap();
            assert!(f.0.iter().all(|v| v.is_finite()), "{amount}: {:?}", f.0);
        }
    }
}
