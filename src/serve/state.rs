//! The service's state, behind methods: the live scorer, the card engines
//! of the partitions this instance runs, the cards seen only through the
//! HTTP API, the merchant table, readiness and latency records.
//!
//! # Lock order
//!
//! No method here, and no caller through these methods, holds two of the
//! locks below at once: each is taken, used and released before the next.
//! A scoring request reads its merchant views from the table (its read
//! lock), releases it, then locks the card engine. A partition task does
//! the same per batch. That is the whole order, and it is why the HTTP API
//! and the partition tasks cannot deadlock: a cycle needs a thread holding
//! one lock while it waits for another.
//!
//! - `scorer`: swapped whole on reload; readers clone the `Arc`.
//! - `cards` (the registry): held only to clone or change the map.
//! - each partition's engine: held for a batch or one HTTP request.
//! - `http_cards`: held for one HTTP request.
//! - inside [`Health`]: each held only to copy a value.
//! - the merchant table's lock (inside [`MerchantTable`]).
//! - `latency`: held to record or read quantiles.

use super::decisions::AlertDesk;
use super::health::{Health, Progress};
use super::http_cards::{HttpCards, Outcome};
use super::merchants::table::MerchantTable;
use super::partition::Role;
use crate::config::Settings;
use crate::features::file::Plan;
use crate::features::store::key_hash;
use crate::features::{Engine, FeatureConfig, Features, Refused};
use crate::ingest::Transaction;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::model::rules::{RuleSet, parse_rules_for};
use crate::model::scorer::{Score, Scorer};
use crate::telemetry::log;
use anyhow::Context;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// A partition's card engine, shared by its task and the HTTP API.
pub type CardEngine = Arc<Mutex<Engine>>;

pub struct ServiceState {
    pub settings: Settings,
    pub metrics: Metrics,
    feature_config: FeatureConfig,
    /// The features file every engine here computes (a reload keeps it).
    plan: Plan,
    scorer: RwLock<Arc<Scorer>>,
    /// Card state of each running input partition.
    cards: Mutex<BTreeMap<i32, CardEngine>>,
    /// Cards seen only through `POST /v1/score?update=true`.
    http_cards: Mutex<HttpCards>,
    health: Health,
    merchants: MerchantTable,
    /// The roles whose group accepted this instance, one bit each.
    joined: AtomicU8,
    /// A fatal error of the Kafka pipeline, for readiness.
    failed: Mutex<Option<String>>,
    latency: Mutex<Latencies>,
    /// HTTP scoring requests run at most this many at a time.
    http_scoring: tokio::sync::Semaphore,
    /// HTTP scoring requests in progress (waiting or running), at most.
    http_admission: tokio::sync::Semaphore,
    /// The alert store and decisions, once opened (with `postgres` set).
    desk: std::sync::OnceLock<Arc<AlertDesk>>,
}

pub struct Latencies {
    /// Microseconds from an input record's timestamp to its alert's acknowledgement.
    pub event_to_alert_us: hdrhistogram::Histogram<u64>,
    /// Nanoseconds to compute one transaction's features and score.
    pub scoring_ns: hdrhistogram::Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        let h = |max| {
            hdrhistogram::Histogram::new_with_bounds(1, max, 2).expect("valid histogram bounds")
        };
        Latencies {
            event_to_alert_us: h(3_600_000_000),
            scoring_ns: h(60_000_000_000),
        }
    }
}

/// Exact quantiles, in milliseconds and microseconds.
#[derive(Debug, Clone, Copy)]
pub struct LatencySummary {
    pub alert_p50_ms: f64,
    pub alert_p99_ms: f64,
    pub scoring_p50_us: f64,
    pub scoring_p99_us: f64,
}

/// An HTTP scoring's result.
pub struct HttpScore {
    pub features: Features,
    pub score: Score,
    pub scorer: Arc<Scorer>,
    /// The transaction was folded into the card's state.
    pub updated: bool,
    /// Why an update asked for was not made.
    pub update_refused: Option<String>,
}

/// Readiness and the reasons it is not.
pub struct Readiness {
    pub ready: bool,
    pub waiting_for: Vec<String>,
}

impl ServiceState {
    pub fn new(settings: Settings, scorer: Scorer) -> Arc<ServiceState> {
        let feature_config = scorer.model.feature_config;
        let metrics = Metrics::new();
        metrics.set_model(&scorer.model.model_version, scorer.model.algo.as_str());
        let merchants = MerchantTable::new(feature_config.label_delay_secs);
        if !settings.kafka_enabled {
            merchants.set_caught_up();
        }
        let http_max_concurrency = settings.http_max_concurrency;
        let plan = scorer.plan().clone();
        let http_cards = HttpCards::new(
            feature_config,
            &plan,
            settings.http_max_cards,
            Duration::from_secs(settings.http_card_idle_secs),
        );
        Arc::new(ServiceState {
            settings,
            metrics,
            feature_config,
            plan,
            scorer: RwLock::new(Arc::new(scorer)),
            cards: Mutex::new(BTreeMap::new()),
            http_cards: Mutex::new(http_cards),
            health: Health::new(),
            merchants,
            joined: AtomicU8::new(0),
            failed: Mutex::new(None),
            latency: Mutex::new(Latencies::default()),
            // Half the cores (at least one), so that HTTP scoring leaves
            // room for the Kafka partitions on any machine.
            http_scoring: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            ),
            http_admission: tokio::sync::Semaphore::new(http_max_concurrency),
            desk: std::sync::OnceLock::new(),
        })
    }

    /// The alert store and decisions: none until opened, or without `postgres`.
    pub fn desk(&self) -> Option<&Arc<AlertDesk>> {
        self.desk.get()
    }

    pub fn set_desk(&self, desk: Arc<AlertDesk>) {
        let _ = self.desk.set(desk);
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    pub fn http_scoring_slots(&self) -> &tokio::sync::Semaphore {
        &self.http_scoring
    }

    pub fn http_admission(&self) -> &tokio::sync::Semaphore {
        &self.http_admission
    }

    /// The live scorer. A batch keeps the one it started with, so a reload
    /// never changes the model in the middle of a batch or drops an event.
    pub fn scorer(&self) -> Arc<Scorer> {
        self.scorer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The features file every engine here computes.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Whether the features file aggregates over entities besides the
    /// card, so that the entity stage runs.
    pub fn has_entities(&self) -> bool {
        self.plan
            .program
            .as_deref()
            .is_some_and(|p| p.has_entities())
    }

    /// Whether the features file has label-delayed card windows, so that
    /// the label tasks send the labels to the card tasks.
    pub fn reads_card_labels(&self) -> bool {
        self.plan
            .program
            .as_deref()
            .is_some_and(|p| p.reads_labels())
    }

    /// The stages the features file needs besides those that always run.
    pub fn stages(&self) -> super::kafka::Stages {
        super::kafka::Stages {
            entities: self.has_entities(),
            card_labels: self.reads_card_labels(),
        }
    }

    pub fn feature_config(&self) -> FeatureConfig {
        self.feature_config
    }

    pub fn merchants(&self) -> &MerchantTable {
        &self.merchants
    }

    /// A new card engine that records its changes for a changelog.
    pub fn new_card_engine(&self) -> Engine {
        let mut e = Engine::with_plan_per_card(self.feature_config, &self.plan);
        e.track_changes();
        e
    }

    /// Makes a partition's cards visible to the HTTP API.
    pub fn add_partition(&self, partition: i32, engine: CardEngine, progress: Arc<Progress>) {
        self.lock_cards().insert(partition, engine);
        self.health.add_partition(partition, progress);
    }

    /// The partition's cards are no longer this instance's.
    pub fn remove_partition(&self, partition: i32) {
        self.lock_cards().remove(&partition);
        self.health.remove_partition(partition);
    }

    fn lock_cards(&self) -> std::sync::MutexGuard<'_, BTreeMap<i32, CardEngine>> {
        self.cards.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn partition_engines(&self) -> Vec<CardEngine> {
        self.lock_cards().values().cloned().collect()
    }

    /// A role's group accepted this instance (an assignment, maybe empty, arrived).
    pub fn set_joined(&self, role: Role) {
        self.joined.fetch_or(1 << role as u8, Ordering::AcqRel);
    }

    /// A fatal pipeline error: the instance is not ready and says why.
    pub fn set_failed(&self, why: String) {
        *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    /// Why the pipeline failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn readiness(&self) -> Readiness {
        let mut waiting_for = Vec::new();
        if self.settings.kafka_enabled {
            if let Some(why) = self
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                waiting_for.push(format!("the Kafka pipeline failed: {why}"));
            }
            if !self.merchants.is_caught_up() {
                waiting_for.push("merchant table catching up".into());
            } else if !self.merchants.all_heard() {
                waiting_for.push("merchant table: a source not heard from yet".into());
            }
            let joined = self.joined.load(Ordering::Acquire);
            for role in Role::ALL {
                if role == Role::Entities && !self.has_entities() {
                    continue;
                }
                if joined & (1 << role as u8) == 0 {
                    waiting_for.push(format!("partition assignment ({})", role.as_str()));
                }
            }
            let restoring = self.metrics.restoring.get();
            if restoring > 0 {
                waiting_for.push(format!("{restoring} partitions restoring"));
            }
            if self.health.brokers_down() {
                waiting_for.push("no Kafka broker reachable".into());
            }
            if let Some(e) = self.health.produce_error() {
                waiting_for.push(format!("the producer cannot deliver: {e}"));
            }
            let limit = Duration::from_secs(self.settings.partition_stall_secs);
            let stalled = self.health.stalled(limit);
            self.metrics.partitions_stalled.set(stalled.len() as i64);
            for (p, d) in stalled {
                waiting_for.push(format!(
                    "input partition {p}: records waiting and none finished for {}s",
                    d.as_secs()
                ));
            }
        }
        let ready = waiting_for.is_empty();
        self.metrics.ready.set(i64::from(ready));
        Readiness { ready, waiting_for }
    }

    /// Scores one transaction for the HTTP API, reading the card's state
    /// or, with `update`, folding the transaction into it. A card a Kafka
    /// partition of this instance holds is only read: its state changes
    /// from its partition alone, or a replay of the input would not give
    /// the same state. Any other card is folded into the bounded HTTP store.
    pub fn score(&self, tx: &Transaction, update: bool) -> HttpScore {
        let started = Instant::now();
        let scorer = self.scorer();
        // The merchant's view first, its lock released before a card's is taken.
        let merchant = self.merchants.view(key_hash(&tx.merchant_id), tx.time.utc);
        let owner = self.partition_engines().into_iter().find(|e| {
            e.lock()
                .unwrap_or_else(|e| e.into_inner())
                .has_card(&tx.card_id)
        });
        let (features, update_refused) = match owner {
            Some(e) => (
                e.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .peek_card(tx, merchant, None),
                update
                    .then(|| "the card is held by a Kafka partition of this instance".to_string()),
            ),
            None => {
                let outcome = self
                    .http_cards
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .score(tx, merchant, update);
                match outcome {
                    Outcome::Folded(f) | Outcome::Read(f) => (f, None),
                    Outcome::Refused(e, f) => {
                        match e {
                            Refused::TooLate(_) => self.metrics.late.inc(),
                            Refused::Duplicate => self.metrics.duplicates.inc(),
                        }
                        (f, Some(e.to_string()))
                    }
                }
            }
        };
        let score = scorer.score(&features, true);
        if !score.score.is_finite() {
            self.metrics.scores_not_finite.inc();
        }
        self.metrics
            .scoring_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.score.observe(score.score);
        self.metrics.scored.inc();
        HttpScore {
            features,
            score,
            scorer,
            updated: update && update_refused.is_none(),
            update_refused,
        }
    }

    pub fn record_scoring(&self, took: std::time::Duration) {
        let mut l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let _ = l.scoring_ns.record(took.as_nanos().max(1) as u64);
    }

    pub fn record_scorings(&self, took: &[u64]) {
        let mut l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        for &ns in took {
            let _ = l.scoring_ns.record(ns.max(1));
        }
    }

    pub fn record_alert_latency(&self, ms: i64) {
        self.metrics
            .event_to_alert_seconds
            .observe(ms as f64 / 1000.0);
        let mut l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let _ = l.event_to_alert_us.record((ms * 1000).max(1) as u64);
    }

    pub fn latency_summary(&self) -> LatencySummary {
        let l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        LatencySummary {
            alert_p50_ms: l.event_to_alert_us.value_at_quantile(0.5) as f64 / 1000.0,
            alert_p99_ms: l.event_to_alert_us.value_at_quantile(0.99) as f64 / 1000.0,
            scoring_p50_us: l.scoring_ns.value_at_quantile(0.5) as f64 / 1000.0,
            scoring_p99_us: l.scoring_ns.value_at_quantile(0.99) as f64 / 1000.0,
        }
    }

    /// Loads and swaps in a new model and rules; on any error the old ones stay live.
    pub fn reload(
        &self,
        model: Option<&Path>,
        rules: Option<&Path>,
    ) -> anyhow::Result<Arc<Scorer>> {
        let result = self.try_reload(model, rules);
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics.reloads.with_label_values(&[outcome]).inc();
        result
    }

    fn try_reload(
        &self,
        model: Option<&Path>,
        rules: Option<&Path>,
    ) -> anyhow::Result<Arc<Scorer>> {
        let scorer = load_scorer(&self.settings, model, rules)?;
        if scorer.model.feature_config != self.feature_config {
            anyhow::bail!(
                "the model's feature configuration ({:?}) differs from the live one ({:?}); \
                 state built under one cannot serve the other, so restart to change it",
                scorer.model.feature_config,
                self.feature_config
            );
        }
        if scorer.plan().source != self.plan.source {
            anyhow::bail!(
                "the model's features file differs from the live one; the cards' declared \
                 state follows the file, so restart to change it"
            );
        }
        let scorer = Arc::new(scorer);
        *self.scorer.write().unwrap_or_else(|e| e.into_inner()) = scorer.clone();
        self.metrics
            .set_model(&scorer.model.model_version, scorer.model.algo.as_str());
        log(
            "INFO",
            format_args!(
                "model {} and {} rules are live",
                scorer.model.model_version,
                scorer.rules.rules.len()
            ),
        );
        Ok(scorer)
    }

    /// Card and merchant counts for the gauges.
    pub fn refresh_gauges(&self) {
        let cards: usize = self
            .partition_engines()
            .iter()
            .map(|e| e.lock().unwrap_or_else(|e| e.into_inner()).cards())
            .sum();
        let http = self
            .http_cards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        self.metrics.cards.set((cards + http) as i64);
        self.metrics
            .merchants
            .set(self.merchants.merchants() as i64);
    }
}

/// The model and rules of the settings, or those given, with the settings'
/// thresholds applied. No model file means the built-in one, and so do
/// no rules file and no model file: a custom model starts with no rules.
pub fn load_scorer(
    settings: &Settings,
    model: Option<&Path>,
    rules: Option<&Path>,
) -> anyhow::Result<Scorer> {
    let model_path = model.or(settings.model.as_deref());
    let rules_path = rules.or(settings.rules.as_deref());
    let mut scorer = match model_path {
        None => crate::model::builtin::scorer()?,
        Some(p) => Scorer::new(Model::load(p)?, RuleSet::default()),
    };
    let program = scorer.plan().program.as_deref();
    if let Some((feature, why)) = program.and_then(|p| p.unservable()) {
        // Labels arrive on a topic of their own, partitioned by report, not
        // by card: a stage would have to bring them to the declared logs.
        anyhow::bail!(
            "the model's feature `{feature}` {why}; the service cannot compute it, so it refuses \
             the model: train, eval, replay, backtest and features compute it from a file"
        );
    }
    if let Some(p) = rules_path {
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("cannot read rules file {}", p.display()))?;
        scorer.rules = parse_rules_for(&text, scorer.plan())
            .with_context(|| format!("rules file {}", p.display()))?;
        scorer = Scorer::new(scorer.model, scorer.rules);
    }
    if let Some(t) = settings.review_threshold {
        scorer.thresholds.review = t;
    }
    if let Some(t) = settings.block_threshold {
        scorer.thresholds.block = t;
    }
    if scorer.thresholds.review > scorer.thresholds.block {
        anyhow::bail!(
            "review threshold {} is above block threshold {}",
            scorer.thresholds.review,
            scorer.thresholds.block
        );
    }
    Ok(scorer)
}
