//! The per-event path: parse a CSV row, update the windows and compute the
//! features, score with the built-in model. Run: `cargo bench --bench engine`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use peregrine::features::{Engine, FeatureConfig};
use peregrine::ingest::{Transaction, TransactionReader};
use peregrine::model::Model;
use peregrine::model::rules::parse_rules;
use peregrine::model::scorer::Scorer;
use peregrine::sim::{SimConfig, Simulation};
use std::hint::black_box;

fn simulated() -> (Vec<u8>, Vec<Transaction>) {
    let sim = Simulation::run(SimConfig {
        customers: 5000,
        terminals: 10_000,
        days: 60,
        seed: 3,
        ..SimConfig::default()
    });
    let mut csv = Vec::new();
    sim.write_csv(&mut csv).expect("in memory");
    let mut txs = Vec::with_capacity(sim.transactions.len());
    let mut tx = Transaction::default();
    for i in 0..sim.transactions.len() {
        sim.fill(i, &mut tx);
        txs.push(tx.clone());
    }
    (csv, txs)
}

fn scorer() -> Scorer {
    let model = Model::from_json(include_str!("../models/default.json"), "default")
        .expect("built-in model");
    let rules = parse_rules(include_str!("../models/default.rules")).expect("built-in rules");
    Scorer::new(model, rules)
}

fn per_event(c: &mut Criterion) {
    let (csv, txs) = simulated();
    let scorer = scorer();
    let n = txs.len() as u64;
    let mut g = c.benchmark_group("per_event");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n));

    g.bench_function(BenchmarkId::new("parse_csv", n), |b| {
        b.iter(|| {
            let mut r = TransactionReader::from_reader(Box::new(std::io::Cursor::new(csv.clone())))
                .unwrap();
            let mut tx = Transaction::default();
            let mut k = 0u64;
            while r.next_into(&mut tx).unwrap() {
                k += tx.amount as u64;
            }
            black_box(k)
        })
    });
    g.bench_function(BenchmarkId::new("features", n), |b| {
        b.iter(|| {
            let mut e = Engine::new(FeatureConfig::default());
            let mut acc = 0f32;
            for tx in &txs {
                acc += e.process(tx).map(|f| f.0[3]).unwrap_or(0.0);
            }
            black_box(acc)
        })
    });
    let features: Vec<_> = {
        let mut e = Engine::new(FeatureConfig::default());
        txs.iter().map(|tx| e.process(tx).unwrap()).collect()
    };
    g.bench_function(BenchmarkId::new("score_default_model", n), |b| {
        b.iter(|| {
            let mut alerts = 0u32;
            for f in &features {
                alerts += u32::from(
                    scorer.score(f, false).decision != peregrine::model::scorer::Decision::Allow,
                );
            }
            black_box(alerts)
        })
    });
    // Replay's path: only alerts are kept, so a walk that cannot reach the
    // review threshold stops early.
    g.bench_function(BenchmarkId::new("alerts_default_model", n), |b| {
        b.iter(|| {
            let alerts = features.iter().filter_map(|f| scorer.alert(f)).count();
            black_box(alerts)
        })
    });
    g.finish();
}

criterion_group!(benches, per_event);
criterion_main!(benches);
