//! Files through the engine: training, evaluation and replay all stream a
//! file in time order through the same [`Engine`], so a model is trained on
//! exactly the features it is served with.

use crate::alerts::{Alert, now_rfc3339};
use crate::evaluate::{self, Scored};
use crate::features::file::Plan;
use crate::features::store::key_hash;
use crate::features::{Engine, EngineStats, FeatureConfig, Features, Keys, Observed};
use crate::ingest::time::format_date;
use crate::ingest::{Transaction, TransactionReader};
use crate::model::scorer::{Decision, Scorer};
use crate::model::trees::GbtParams;
use crate::model::tune::{Grid, TuneReport, tune};
use crate::model::{Algo, FORMAT, FORMAT_VERSION, Model, TrainParams, Training};
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct StreamSummary {
    pub rows: u64,
    /// Rows behind the watermark by more than the allowed lateness: scored on
    /// the state as it was, but not folded into it.
    pub late: u64,
    pub seconds: f64,
    pub engine: EngineStats,
}

/// Events handed between threads at once: large, so that the threads wake
/// each other rarely.
const BATCH: usize = 4096;

fn progress(enabled: bool) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {elapsed} {human_pos} transactions ({per_sec}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar
}

/// A run of transactions with their features, passed between threads whole
/// so that their buffers are reused rather than reallocated.
pub struct Batch {
    pub txs: Vec<Transaction>,
    /// Hashed on the parsing thread, off the features thread's path.
    pub keys: Vec<Keys>,
    /// What the state said about each transaction; the features follow
    /// from it by [`Batch::derive`], on whichever thread takes the batch.
    pub observed: Vec<Observed>,
    /// Whether the cards' stage folded each transaction into the state (not
    /// too late, not a repeat): only those count for their merchant.
    pub admitted: Vec<bool>,
    pub features: Vec<Features>,
    pub len: usize,
}

impl Batch {
    pub fn new() -> Batch {
        Batch {
            txs: vec![Transaction::default(); BATCH],
            keys: vec![Keys::default(); BATCH],
            observed: vec![Observed::default(); BATCH],
            admitted: vec![false; BATCH],
            features: vec![Features::default(); BATCH],
            len: 0,
        }
    }

    /// Fills in the features from what was observed.
    pub fn derive(&mut self) {
        let n = self.len;
        for ((f, o), tx) in self.features[..n]
            .iter_mut()
            .zip(&self.observed)
            .zip(&self.txs)
        {
            o.derive(tx, f);
        }
    }

    /// The transactions and their features, once derived.
    pub fn iter(&self) -> impl Iterator<Item = (&Transaction, &Features)> {
        self.txs[..self.len].iter().zip(&self.features[..self.len])
    }
}

impl Default for Batch {
    fn default() -> Self {
        Batch::new()
    }
}

/// Streams `path` through fresh engines (a card's half and a merchant's
/// half of the state) a batch at a time; `sink` takes
/// each batch, with its features not yet derived ([`Batch::derive`]), and
/// hands back one to fill next (the same, or a recycled one).
/// Fraud labels in the file become known one label delay after their transaction.
pub fn stream_batches(
    path: &Path,
    cfg: FeatureConfig,
    plan: &Plan,
    show_progress: bool,
    mut sink: impl FnMut(Batch) -> anyhow::Result<Batch>,
) -> anyhow::Result<StreamSummary> {
    let started = Instant::now();
    let mut reader =
        TransactionReader::open(path).with_context(|| format!("reading {}", path.display()))?;
    let bar = progress(show_progress);
    let mut rows = 0u64;
    // Three stages, a batch or two apart: parsing and the cards' state on
    // threads of their own, the merchants' state and `sink` on this one
    // (so `sink` need not be `Send`). The state is split
    // because it is the longest stage, and a card's and a merchant's halves
    // of an event need nothing from each other but whether the card's half
    // admitted it. Each half keeps event time in its own engine, from the
    // same events in the same order, so the two agree.
    let (parsed_tx, parsed) = mpsc::sync_channel::<Result<Batch, crate::ingest::ReadError>>(2);
    let (carded_tx, carded) = mpsc::sync_channel::<Result<Batch, crate::ingest::ReadError>>(2);
    let (empty_tx, empty) = mpsc::channel::<Batch>();
    let (card_stats, late, merchant_stats) = std::thread::scope(|scope| {
        let parsing = scope.spawn(move || {
            loop {
                let mut batch = empty.try_recv().unwrap_or_default();
                let mut n = 0;
                while n < BATCH {
                    match reader.next_into(&mut batch.txs[n]) {
                        Ok(true) => {
                            batch.keys[n] = Keys::of(&batch.txs[n]);
                            n += 1;
                        }
                        Ok(false) => break,
                        Err(e) => {
                            let _ = parsed_tx.send(Err(e));
                            return;
                        }
                    }
                }
                batch.len = n;
                if parsed_tx.send(Ok(batch)).is_err() || n < BATCH {
                    return;
                }
            }
        });
        let cards = scope.spawn(move || {
            let mut engine = Engine::with_plan(cfg, plan);
            let mut late = 0u64;
            for parsed in parsed {
                let mut batch = match parsed {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = carded_tx.send(Err(e));
                        break;
                    }
                };
                let n = batch.len;
                let keys = &batch.keys[..n];
                let events = (batch.txs.iter())
                    .zip(&mut batch.observed)
                    .zip(&mut batch.admitted)
                    .zip(keys)
                    .zip(&mut batch.features);
                for (i, ((((tx, out), admitted), k), f)) in events.enumerate() {
                    engine.prefetch_ahead(keys, i);
                    (*out, *admitted) = match engine.observe_card_keyed(tx, *k, f) {
                        Ok(o) => (o, true),
                        Err(_) => {
                            late += 1;
                            (engine.peek_observed(tx, *k, f), false)
                        }
                    };
                }
                if carded_tx.send(Ok(batch)).is_err() {
                    break;
                }
            }
            (engine.stats(), late)
        });
        let mut engine = Engine::new(cfg);
        let merchants = (|| -> anyhow::Result<()> {
            for carded in carded {
                let mut batch = carded.with_context(|| format!("reading {}", path.display()))?;
                let n = batch.len;
                let keys = &batch.keys[..n];
                let events = (batch.txs.iter())
                    .zip(&mut batch.observed)
                    .zip(&batch.admitted)
                    .zip(keys);
                for (i, (((tx, out), &admitted), k)) in events.enumerate() {
                    engine.prefetch_ahead(keys, i);
                    out.set_merchant(engine.observe_merchant(tx.time.utc, k.merchant, admitted));
                    if tx.is_fraud == Some(true) {
                        engine.schedule_label(&tx.merchant_id, tx.time.utc);
                    }
                }
                rows += n as u64;
                bar.set_position(rows);
                if n > 0 {
                    let back = sink(batch)?;
                    // The reader may be done; a lost recycle is only a lost buffer.
                    let _ = empty_tx.send(back);
                }
            }
            Ok(())
        })();
        // On an error here the channel to the cards' stage is gone, so it
        // stops, and the parsing with it: both are joined either way.
        let (card_stats, late) = cards.join().map_err(|p| panicked("the cards' stage", p))?;
        parsing.join().map_err(|p| panicked("parsing", p))?;
        merchants?;
        anyhow::Ok((card_stats, late, engine.stats()))
    })?;
    bar.finish_and_clear();
    Ok(StreamSummary {
        rows,
        late,
        seconds: started.elapsed().as_secs_f64(),
        // Each engine counted only its half.
        engine: card_stats.merge(merchant_stats),
    })
}

/// A stage's panic as an error, with its message when it has one.
fn panicked(stage: &str, payload: Box<dyn std::any::Any + Send>) -> anyhow::Error {
    let message = payload
        .downcast_ref::<&str>()
        .map(|m| m.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    anyhow::anyhow!("{stage} panicked: {message}")
}

/// Streams `path`, calling `each` with every transaction and its features.
pub fn stream(
    path: &Path,
    cfg: FeatureConfig,
    plan: &Plan,
    show_progress: bool,
    mut each: impl FnMut(&Transaction, &Features) -> anyhow::Result<()>,
) -> anyhow::Result<StreamSummary> {
    stream_batches(path, cfg, plan, show_progress, |mut batch| {
        batch.derive();
        for (tx, f) in batch.iter() {
            each(tx, f)?;
        }
        Ok(batch)
    })
}

fn label_of(tx: &Transaction) -> anyhow::Result<u8> {
    tx.is_fraud.map(u8::from).ok_or_else(|| {
        anyhow::anyhow!(
            "transaction {} has no `is_fraud` label; training and evaluation need labelled data",
            tx.transaction_id
        )
    })
}

pub struct TrainRequest<'a> {
    pub data: &'a Path,
    pub from: i64,
    pub to: i64,
    pub algo: Algo,
    pub features: FeatureConfig,
    /// The features file's columns.
    pub plan: &'a Plan,
    pub params: TrainParams,
    /// Search the gradient-boosted trees' parameters first (`--tune`).
    pub tune: Option<Grid>,
    pub progress: bool,
}

/// Collects the features of the training window and fits a model.
pub fn train(req: &TrainRequest) -> anyhow::Result<Model> {
    let started = Instant::now();
    let mut x: Vec<f32> = Vec::new();
    let mut y: Vec<u8> = Vec::new();
    let mut times: Vec<i64> = Vec::new();
    let slots = &req.plan.slots;
    stream(req.data, req.features, req.plan, req.progress, |tx, f| {
        let t = tx.time.utc;
        if t >= req.from && t < req.to {
            y.push(label_of(tx)?);
            x.extend(slots.iter().map(|&s| f.0[s]));
            times.push(t);
        }
        Ok(())
    })?;
    if y.is_empty() {
        anyhow::bail!(
            "no transactions between {} and {} in {}",
            format_date(req.from),
            format_date(req.to),
            req.data.display()
        );
    }
    let mut params = req.params;
    let tuning = match &req.tune {
        Some(grid) => {
            let (chosen, report) = tune_split(req, &x, &y, &times, grid)?;
            params.gbt = chosen;
            Some(report)
        }
        None => None,
    };
    let (body, anomaly) = Model::fit(req.algo, req.plan, &x, &y, &params)?;
    let frauds = y.iter().filter(|&&v| v == 1).count();
    let mut model = Model {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        model_version: String::new(),
        algo: req.algo,
        created_at: now_rfc3339(),
        features: req.plan.names.clone(),
        features_file: Model::file_of(req.plan),
        feature_config: req.features,
        training: Training {
            data: req
                .data
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            from: format_date(req.from),
            to: format_date(req.to),
            rows: y.len(),
            frauds,
            seconds: 0.0,
            imported_from: None,
        },
        metrics: serde_json::Map::new(),
        thresholds: Model::default_thresholds(req.algo),
        body,
        anomaly,
    };
    let scorer = Scorer::new(model.clone(), Default::default());
    let scores: Vec<f64> = x
        .chunks_exact(slots.len())
        .map(|r| {
            let mut f = Features::default();
            for (v, &s) in r.iter().zip(slots) {
                f.0[s] = *v;
            }
            scorer.raw_score(&f)
        })
        .collect();
    model.metrics.insert(
        "train".into(),
        serde_json::json!({
            "auc_roc": evaluate::auc_roc(&scores, &y),
            "average_precision": evaluate::average_precision(&scores, &y),
        }),
    );
    if let Some(report) = tuning {
        model
            .metrics
            .insert("tune".into(), serde_json::to_value(report)?);
    }
    model.training.seconds = (started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
    let digest = key_hash(&serde_json::to_string(&model.body)?);
    model.model_version = format!(
        "{}-{}-{:08x}",
        req.algo.as_str(),
        model.training.to,
        digest >> 32
    );
    Ok(model)
}

/// Splits the training window in time: the last quarter (at least a day)
/// validates, and the fitting period ends a label delay before it, so that
/// no label the model learns from would be unknown on the first validation
/// day. Then searches `grid` (see [`tune`]).
fn tune_split(
    req: &TrainRequest,
    x: &[f32],
    y: &[u8],
    times: &[i64],
    grid: &Grid,
) -> anyhow::Result<(GbtParams, TuneReport)> {
    let validate_from = (req.to - ((req.to - req.from) / 4).max(DAY)).div_euclid(DAY) * DAY;
    let fit_to = validate_from - req.features.label_delay_secs;
    let (mut xf, mut yf, mut xv, mut yv) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((&t, &label), row) in times.iter().zip(y).zip(x.chunks_exact(req.plan.width())) {
        if t < fit_to {
            xf.extend_from_slice(row);
            yf.push(label);
        } else if t >= validate_from {
            xv.extend_from_slice(row);
            yv.push(label);
        }
    }
    let frauds = |v: &[u8]| v.iter().filter(|&&l| l == 1).count();
    if frauds(&yf) == 0 || frauds(&yv) == 0 {
        anyhow::bail!(
            "--tune: the training window {}..{} is too short to tune on: it validates on {}..{} \
             and fits on what ends a label delay earlier ({} frauds fitted, {} validated); \
             give a window of at least four label delays",
            format_date(req.from),
            format_date(req.to),
            format_date(validate_from),
            format_date(req.to),
            frauds(&yf),
            frauds(&yv)
        );
    }
    Ok(tune(
        (&xf, &yf),
        (&xv, &yv),
        req.plan.width(),
        &req.params.gbt,
        grid,
    ))
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub auc_roc: f64,
    pub average_precision: f64,
    pub card_precision_at_100: f64,
    pub transactions: usize,
    pub frauds: usize,
    pub excluded_transactions: usize,
    pub model_version: String,
    pub test_from: String,
    pub test_to: String,
}

pub struct EvalRequest<'a> {
    pub data: &'a Path,
    /// Where to write one CSV line per test transaction, if anywhere.
    pub predictions: Option<&'a Path>,
    pub from: i64,
    pub to: i64,
    pub exclude_known_since: Option<i64>,
    pub progress: bool,
}

const DAY: i64 = 86_400;

/// Scores the test window. With `exclude_known_since` D, on each test day X
/// the cards with a fraud at or after D whose label was known before X
/// began (fraud time + label delay < start of X) are left out.
pub fn evaluate(scorer: &Scorer, req: &EvalRequest) -> anyhow::Result<EvalReport> {
    let delay = scorer.model.feature_config.label_delay_secs;
    let mut rows: Vec<Scored> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    let mut first_fraud: HashMap<u64, i64> = HashMap::new();
    stream(
        req.data,
        scorer.model.feature_config,
        scorer.plan(),
        req.progress,
        |tx, f| {
            let t = tx.time.utc;
            let card = key_hash(&tx.card_id);
            if let Some(since) = req.exclude_known_since
                && t >= since
                && tx.is_fraud == Some(true)
            {
                first_fraud
                    .entry(card)
                    .and_modify(|e| *e = (*e).min(t))
                    .or_insert(t);
            }
            if t >= req.from && t < req.to {
                rows.push(Scored {
                    day: t.div_euclid(DAY),
                    card,
                    score: scorer.raw_score(f),
                    fraud: label_of(tx)? == 1,
                });
                if req.predictions.is_some() {
                    ids.push(tx.transaction_id.clone());
                }
            }
            Ok(())
        },
    )?;
    let known = |r: &Scored| {
        first_fraud
            .get(&r.card)
            .is_some_and(|&ft| ft + delay < r.day * DAY)
    };
    if let Some(path) = req.predictions {
        let mut w = std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        );
        writeln!(w, "transaction_id,day,card_key,score,is_fraud,excluded")?;
        for (r, id) in rows.iter().zip(&ids) {
            writeln!(
                w,
                "{id},{},{:016x},{},{},{}",
                format_date(r.day * DAY),
                r.card,
                r.score,
                u8::from(r.fraud),
                u8::from(known(r))
            )?;
        }
        w.flush()?;
    }
    let before = rows.len();
    rows.retain(|r| !known(r));
    let scores: Vec<f64> = rows.iter().map(|r| r.score).collect();
    let labels: Vec<u8> = rows.iter().map(|r| u8::from(r.fraud)).collect();
    Ok(EvalReport {
        auc_roc: evaluate::auc_roc(&scores, &labels),
        average_precision: evaluate::average_precision(&scores, &labels),
        card_precision_at_100: evaluate::card_precision_at_k(&rows, 100),
        transactions: rows.len(),
        frauds: labels.iter().filter(|&&l| l == 1).count(),
        excluded_transactions: before - rows.len(),
        model_version: scorer.model.model_version.clone(),
        test_from: format_date(req.from),
        test_to: format_date(req.to),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplaySummary {
    pub transactions: u64,
    pub alerts: u64,
    pub review: u64,
    pub block: u64,
    pub rule_alerts: u64,
    pub late: u64,
    pub seconds: f64,
    pub transactions_per_second: f64,
}

/// Scores every transaction and writes an alert line for each one that is
/// not allowed. Features are computed on this thread while another scores
/// the previous batch and writes its alerts.
pub fn replay(
    scorer: &Scorer,
    data: &Path,
    out: &mut (dyn Write + Send),
    show_progress: bool,
) -> anyhow::Result<ReplaySummary> {
    let produced_at = now_rfc3339();
    let version = scorer.model.model_version.as_str();
    let (to_scorer, from_engine) = mpsc::sync_channel::<Batch>(4);
    let (to_engine, recycled) = mpsc::channel::<Batch>();
    std::thread::scope(|scope| {
        let worker = scope.spawn(move || -> anyhow::Result<[u64; 4]> {
            let (mut alerts, mut review, mut block, mut rule_alerts) = (0u64, 0u64, 0u64, 0u64);
            let mut line = Vec::with_capacity(1024);
            for mut batch in from_engine {
                batch.derive();
                for (tx, f) in batch.iter() {
                    let Some(s) = scorer.alert(f) else {
                        continue;
                    };
                    alerts += 1;
                    match s.decision {
                        Decision::Block => block += 1,
                        _ => review += 1,
                    }
                    if !s.reasons.rules.is_empty() {
                        rule_alerts += 1;
                    }
                    line.clear();
                    serde_json::to_writer(
                        &mut line,
                        &Alert::new(tx, &s, version, produced_at.clone()),
                    )?;
                    line.push(b'\n');
                    out.write_all(&line)?;
                }
                // The engine may have finished; a lost recycle is only a lost buffer.
                let _ = to_engine.send(batch);
            }
            out.flush()?;
            Ok([alerts, review, block, rule_alerts])
        });
        let plan = scorer.plan();
        let streamed = stream_batches(
            data,
            scorer.model.feature_config,
            plan,
            show_progress,
            |batch| {
                to_scorer
                    .send(batch)
                    .map_err(|_| anyhow::anyhow!("the scoring thread stopped"))?;
                Ok(recycled.try_recv().unwrap_or_default())
            },
        );
        drop(to_scorer);
        let counts = worker
            .join()
            .map_err(|_| anyhow::anyhow!("the scoring thread panicked"))?;
        let summary = streamed?;
        let [alerts, review, block, rule_alerts] = counts?;
        Ok(ReplaySummary {
            transactions: summary.rows,
            alerts,
            review,
            block,
            rule_alerts,
            late: summary.late,
            seconds: summary.seconds,
            transactions_per_second: summary.rows as f64 / summary.seconds.max(1e-9),
        })
    })
}
