//! `peregrine serve`: the engine as a long-running service. Kafka in
//! ([`pipeline`]), alerts out, the merchant table fed from every partition
//! ([`tables`]), and the HTTP API ([`crate::http`]) over the same state.

pub mod pipeline;
pub mod tables;

use crate::config::Settings;
use crate::features::{Engine, FeatureConfig, Features};
use crate::ingest::Transaction;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::model::rules::{RuleSet, parse_rules};
use crate::model::scorer::{Score, Scorer};
use anyhow::Context;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Set by a caller that shows its own progress (the demo): INFO lines are dropped.
pub static QUIET: AtomicBool = AtomicBool::new(false);

/// Prints one log line: UTC time, level, message.
pub fn log(level: &str, msg: impl std::fmt::Display) {
    if level == "INFO" && QUIET.load(Ordering::Relaxed) {
        return;
    }
    eprintln!("{} {level:<5} {msg}", crate::alerts::now_rfc3339());
}

/// A card engine shared by its partition's worker and the HTTP API.
pub type CardEngine = Arc<Mutex<Engine>>;

/// Everything the Kafka pipeline and the HTTP API share.
pub struct Shared {
    pub settings: Settings,
    pub metrics: Metrics,
    live: RwLock<Arc<Scorer>>,
    feature_config: FeatureConfig,
    /// Merchant state from every partition of the input topic, and labels.
    pub merchants: RwLock<tables::MerchantTable>,
    /// Card state of each assigned partition.
    pub partitions: Mutex<BTreeMap<i32, CardEngine>>,
    /// Cards seen only through `POST /v1/score?update=true`.
    pub http_cards: CardEngine,
    /// The merchant table has read what the input and label topics held at start.
    pub tables_ready: AtomicBool,
    pub table_clock: tables::TableClock,
    /// Exact in-process quantiles for logs, the demo and benchmarks.
    pub latency: Mutex<Latencies>,
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

/// Readiness and the reasons it is not.
pub struct Readiness {
    pub ready: bool,
    pub waiting_for: Vec<&'static str>,
}

impl Shared {
    pub fn new(settings: Settings, scorer: Scorer) -> Arc<Shared> {
        let feature_config = scorer.model.feature_config;
        let metrics = Metrics::new();
        metrics.set_model(&scorer.model.model_version, scorer.model.algo.as_str());
        let kafka = settings.kafka_enabled;
        Arc::new(Shared {
            settings,
            metrics,
            live: RwLock::new(Arc::new(scorer)),
            feature_config,
            merchants: RwLock::new(tables::MerchantTable::new(feature_config)),
            partitions: Mutex::new(BTreeMap::new()),
            http_cards: Arc::new(Mutex::new(Engine::new(feature_config))),
            tables_ready: AtomicBool::new(!kafka),
            table_clock: tables::TableClock::default(),
            latency: Mutex::new(Latencies::default()),
        })
    }

    /// The live scorer. A batch keeps the one it started with, so a reload
    /// never changes the model in the middle of a batch or drops an event.
    pub fn scorer(&self) -> Arc<Scorer> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn feature_config(&self) -> FeatureConfig {
        self.feature_config
    }

    pub fn new_engine(&self) -> Engine {
        Engine::new(self.feature_config)
    }

    pub fn readiness(&self) -> Readiness {
        let mut waiting_for = Vec::new();
        if self.settings.kafka_enabled {
            if !self.tables_ready.load(Ordering::Acquire) {
                waiting_for.push("merchant table catching up");
            }
            if self.metrics.partitions.get() == 0 {
                waiting_for.push("partition assignment");
            }
        }
        let ready = waiting_for.is_empty();
        self.metrics.ready.set(i64::from(ready));
        Readiness { ready, waiting_for }
    }

    /// The engine that holds this card: its partition's, if this instance
    /// has it, else the one of cards seen only by the HTTP API.
    pub fn card_engine(&self, card_id: &str) -> CardEngine {
        let parts = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        for engine in parts.values() {
            if engine
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .has_card(card_id)
            {
                return engine.clone();
            }
        }
        self.http_cards.clone()
    }

    /// Scores one transaction for the HTTP API, reading the card's state or,
    /// with `update`, folding the transaction into it.
    pub fn score(&self, tx: &Transaction, update: bool) -> (Features, Score, Arc<Scorer>) {
        let started = Instant::now();
        let scorer = self.scorer();
        let engine = self.card_engine(&tx.card_id);
        let merchants = self.merchants.read().unwrap_or_else(|e| e.into_inner());
        let mut engine = engine.lock().unwrap_or_else(|e| e.into_inner());
        let (features, late) = merchants.features(&mut engine, tx, update);
        if late.is_some() {
            self.metrics.late.inc();
        }
        drop(merchants);
        drop(engine);
        let score = scorer.score(&features, true);
        self.metrics
            .scoring_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.score.observe(score.score);
        self.metrics.scored.inc();
        (features, score, scorer)
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
        let scorer = Arc::new(scorer);
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = scorer.clone();
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
        let parts = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        let cards: usize = parts
            .values()
            .map(|e| e.lock().unwrap_or_else(|e| e.into_inner()).cards())
            .sum();
        drop(parts);
        let http = self
            .http_cards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cards();
        self.metrics.cards.set((cards + http) as i64);
        let merchants = self
            .merchants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .engine
            .merchants();
        self.metrics.merchants.set(merchants as i64);
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
    if let Some(p) = rules_path {
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("cannot read rules file {}", p.display()))?;
        scorer.rules = parse_rules(&text).with_context(|| format!("rules file {}", p.display()))?;
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

/// Runs the service until `shutdown` resolves, then drains within the
/// deadline. Returns an error if the deadline passed before the drain ended.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    settings.validate()?;
    let scorer = load_scorer(&settings, None, None)?;
    run_shared(Shared::new(settings, scorer), shutdown).await
}

/// [`run`] with the shared state made by the caller, who can watch it.
pub async fn run_shared(
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let settings = &shared.settings;
    let scorer = shared.scorer();
    log("INFO", format_args!("settings: {settings:?}"));
    log(
        "INFO",
        format_args!(
            "model {} ({}), {} rules, review at {}, block at {}",
            scorer.model.model_version,
            scorer.model.algo.as_str(),
            scorer.rules.rules.len(),
            scorer.thresholds.review,
            scorer.thresholds.block
        ),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let listener = tokio::net::TcpListener::bind(&shared.settings.http_addr)
        .await
        .with_context(|| format!("cannot listen on {}", shared.settings.http_addr))?;
    log(
        "INFO",
        format_args!("HTTP API on http://{}", listener.local_addr()?),
    );
    let http = tokio::spawn(crate::http::serve(
        shared.clone(),
        listener,
        stop_rx.clone(),
    ));
    let kafka = shared
        .settings
        .kafka_enabled
        .then(|| tokio::spawn(pipeline::run(shared.clone(), stop_rx.clone())));
    let status = tokio::spawn(status_lines(shared.clone(), stop_rx.clone()));
    shutdown.await;
    log("INFO", "shutting down: draining in-flight events");
    let _ = stop_tx.send(true);
    let deadline = Duration::from_secs(shared.settings.shutdown_timeout_secs);
    let drained = tokio::time::timeout(deadline, async {
        if let Some(k) = kafka {
            match k.await {
                Ok(Err(e)) => log("ERROR", format_args!("Kafka pipeline: {e:#}")),
                Err(e) => log("ERROR", format_args!("Kafka pipeline panicked: {e}")),
                Ok(Ok(())) => {}
            }
        }
        let _ = http.await;
        let _ = status.await;
    })
    .await;
    match drained {
        Ok(()) => {
            log("INFO", "stopped cleanly");
            Ok(())
        }
        Err(_) => anyhow::bail!(
            "the drain took longer than shutdown_timeout_secs = {}; \
             uncommitted transactions will be read again on restart",
            shared.settings.shutdown_timeout_secs
        ),
    }
}

/// Resolves on SIGTERM or ctrl-c.
pub async fn termination() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler can be installed");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn status_lines(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let secs = shared.settings.log_interval_secs;
    let mut last = (0u64, Instant::now());
    loop {
        let wait = Duration::from_secs(if secs == 0 { 5 } else { secs });
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        shared.refresh_gauges();
        let r = shared.readiness();
        if secs == 0 {
            continue;
        }
        let m = &shared.metrics;
        let scored = m.scored.get();
        let rate = (scored - last.0) as f64 / last.1.elapsed().as_secs_f64().max(1e-9);
        last = (scored, Instant::now());
        let alerts: u64 = ["review", "block"]
            .iter()
            .map(|d| m.alerts.with_label_values(&[d]).get())
            .sum();
        log(
            "INFO",
            format_args!(
                "scored {scored} ({rate:.0}/s), alerts {alerts}, dead-lettered {}, partitions {}, ready {}{}",
                pipeline::DeadReason::ALL
                    .iter()
                    .map(|r| m.dead_letters.with_label_values(&[r.as_str()]).get())
                    .sum::<u64>(),
                m.partitions.get(),
                r.ready,
                if r.ready {
                    String::new()
                } else {
                    format!(" (waiting for {})", r.waiting_for.join(", "))
                }
            ),
        );
    }
}
