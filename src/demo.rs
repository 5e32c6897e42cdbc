//! `peregrine demo`: the whole engine on simulated data with the built-in
//! model and rules, no set-up needed.

use clap::Args;
use hdrhistogram::Histogram;
use peregrine::alerts::{Alert, now_rfc3339};
use peregrine::features::{Engine, N_FEATURES};
use peregrine::ingest::Transaction;
use peregrine::model::scorer::{Decision, Scorer};
use peregrine::sim::{SimConfig, Simulation};
use std::io::Write;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct DemoArgs {
    #[command(flatten)]
    size: crate::SimSize,
    /// A seed other than the built-in model's training data (seed 0).
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

pub fn builtin_scorer() -> anyhow::Result<Scorer> {
    peregrine::model::builtin::scorer()
}

pub fn run(a: DemoArgs, _progress: bool) -> anyhow::Result<()> {
    let scorer = builtin_scorer()?;
    let m = &scorer.model;
    eprintln!(
        "Peregrine demo: built-in model {} ({}, {} features), {} rules",
        m.model_version,
        m.algo.as_str(),
        N_FEATURES,
        scorer.rules.rules.len()
    );
    let started = Instant::now();
    let sim = Simulation::run(SimConfig {
        customers: a.size.customers,
        terminals: a.size.terminals,
        days: a.size.days,
        seed: a.seed,
        ..SimConfig::default()
    });
    let n = sim.transactions.len();
    eprintln!(
        "simulated {n} card transactions over {} days with injected fraud (seed {}) in {:.1}s",
        a.size.days,
        a.seed,
        started.elapsed().as_secs_f64()
    );

    let mut engine = Engine::new(m.feature_config);
    let mut latency = Histogram::<u64>::new_with_bounds(1, 10_000_000, 2)?;
    let mut tx = Transaction::default();
    let (mut alerts, mut review, mut block) = (0u64, 0u64, 0u64);
    let mut caught = [0u64; 6];
    let mut frauds = [0u64; 6];
    let mut true_alerts = 0u64;
    let mut examples: Vec<String> = Vec::new();
    let produced_at = now_rfc3339();
    let began = Instant::now();
    let mut last_line = Instant::now();
    for i in 0..n {
        sim.fill(i, &mut tx);
        let t0 = Instant::now();
        let features = engine.process(&tx).unwrap_or_else(|_| engine.peek(&tx));
        let s = scorer.score(&features, false);
        let _ = latency.record(t0.elapsed().as_nanos().max(1) as u64);
        if tx.is_fraud == Some(true) {
            engine.schedule_label(&tx.merchant_id, tx.time.utc);
        }
        let scenario = sim.transactions[i].scenario as usize;
        frauds[scenario] += 1;
        if s.decision != Decision::Allow {
            alerts += 1;
            caught[scenario] += 1;
            true_alerts += u64::from(scenario > 0);
            if s.decision == Decision::Block {
                block += 1
            } else {
                review += 1
            }
            let wanted = [1usize, 2, 3, 4, 5].iter().position(|&k| k == scenario);
            if let Some(k) = wanted
                && examples.len() == k
                && i > n / 2
            {
                examples.push(serde_json::to_string_pretty(&Alert::new(
                    &tx,
                    &s,
                    &m.model_version,
                    produced_at.clone(),
                ))?);
            }
        }
        if last_line.elapsed() > Duration::from_millis(250) || i + 1 == n {
            last_line = Instant::now();
            let secs = began.elapsed().as_secs_f64();
            eprint!(
                "\rscored {:>9} | {:>9.0} tx/s | alerts {:>6} (review {:>5}, block {:>5}) | per event p50 {:>5.2} µs p99 {:>5.2} µs ",
                i + 1,
                (i + 1) as f64 / secs,
                alerts,
                review,
                block,
                latency.value_at_quantile(0.5) as f64 / 1000.0,
                latency.value_at_quantile(0.99) as f64 / 1000.0
            );
        }
    }
    eprintln!();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\nAlert precision: {:.1}% of {} alerts were fraud",
        100.0 * true_alerts as f64 / alerts.max(1) as f64,
        alerts
    )?;
    let names = [
        "",
        "amount over 220",
        "compromised terminal",
        "compromised card (×5 amounts)",
        "card testing",
        "account takeover",
    ];
    writeln!(
        out,
        "Frauds alerted, by scenario (terminal frauds in their first week are unknowable: labels arrive after 7 days):"
    )?;
    for k in 1..=5 {
        if frauds[k] > 0 {
            writeln!(
                out,
                "  {:<32} {:>5} of {:>5} ({:.0}%)",
                names[k],
                caught[k],
                frauds[k],
                100.0 * caught[k] as f64 / frauds[k] as f64
            )?;
        }
    }
    writeln!(
        out,
        "  {:<32} {:>5} of {:>7} genuine transactions alerted",
        "false alarms", caught[0], frauds[0]
    )?;
    if let Some(e) = examples.first() {
        writeln!(out, "\nAn alert, with its reasons:\n{e}")?;
    }
    writeln!(
        out,
        "\nNext: `peregrine simulate --out data.csv.gz`, then `peregrine train --data data.csv.gz --train-from 2018-05-01 \
         --train-to 2018-08-01 --algo gbt --out model.json`, `peregrine eval ...` and `peregrine replay ...` (see README)."
    )?;
    Ok(())
}
