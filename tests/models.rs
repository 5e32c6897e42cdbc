//! Every model type survives a save and load unchanged, scores the same,
//! and a model whose features differ from the engine's is refused.

mod common;

use common::WorkDir;
use peregrine::backtest::{TrainRequest, train};
use peregrine::features::file::Plan;
use peregrine::features::{FeatureConfig, Features, N_FEATURES};
use peregrine::model::rules::RuleSet;
use peregrine::model::scorer::{Decision, Scorer};
use peregrine::model::{Algo, Model, ModelError, TrainParams};
use peregrine::rng::Rng;
use peregrine::sim::{SimConfig, Simulation};
use std::path::{Path, PathBuf};

fn small_data(dir: &Path) -> PathBuf {
    let sim = Simulation::run(SimConfig {
        customers: 300,
        terminals: 600,
        days: 50,
        seed: 11,
        ..SimConfig::default()
    });
    let path = dir.join("small.csv");
    let mut out = std::fs::File::create(&path).unwrap();
    sim.write_csv(&mut out).unwrap();
    path
}

fn quick_params() -> TrainParams {
    let mut p = TrainParams::default();
    p.gbt.rounds = 40;
    p.forest.trees = 20;
    p.iforest.trees = 30;
    p
}

fn train_small(data: &Path, algo: Algo) -> Model {
    train(&TrainRequest {
        data,
        from: peregrine::ingest::time::parse_date("2018-04-20").unwrap(),
        to: peregrine::ingest::time::parse_date("2018-05-15").unwrap(),
        algo,
        features: FeatureConfig::default(),
        plan: Plan::default_plan(),
        params: quick_params(),
        tune: None,
        progress: false,
    })
    .unwrap()
}

fn random_rows(n: usize) -> Vec<Features> {
    let mut rng = Rng::new(9);
    (0..n)
        .map(|_| {
            let mut f = Features::default();
            for v in &mut f.0[..N_FEATURES] {
                *v = (rng.f64() * 10f64.powf(rng.uniform(-1.0, 3.0))) as f32;
            }
            f
        })
        .collect()
}

#[test]
fn every_model_type_round_trips() {
    let dir = tempdir("roundtrip");
    let data = small_data(&dir);
    for algo in [Algo::Logistic, Algo::Forest, Algo::Gbt, Algo::Iforest] {
        let model = train_small(&data, algo);
        let path = dir.join(format!("{}.json", algo.as_str()));
        model.save(&path).unwrap();
        let loaded = Model::load(&path).unwrap();
        assert!(loaded == model, "{algo:?} changed in the round trip");
        let (a, b) = (
            Scorer::new(model, RuleSet::default()),
            Scorer::new(loaded, RuleSet::default()),
        );
        let rows = random_rows(500);
        let scores: Vec<f64> = rows.iter().map(|r| a.raw_score(r)).collect();
        for (r, s) in rows.iter().zip(&scores) {
            assert_eq!(b.raw_score(r), *s);
            assert_eq!(a.score(r, true), b.score(r, true));
        }
        let distinct = {
            let mut v = scores.clone();
            v.sort_by(f64::total_cmp);
            v.dedup();
            v.len()
        };
        assert!(distinct > 5, "{algo:?} gives a constant score");
        assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)));
    }
}

#[test]
fn explanations_add_up_and_decisions_follow_thresholds() {
    let dir = tempdir("explain");
    let data = small_data(&dir);
    let model = train_small(&data, Algo::Logistic);
    let mut scorer = Scorer::new(model, RuleSet::default());
    scorer.thresholds.review = 0.0;
    scorer.thresholds.block = 2.0;
    let row = &random_rows(1)[0];
    let s = scorer.score(row, false);
    assert_eq!(s.decision, Decision::Review);
    assert!(!s.reasons.top_features.is_empty() && s.reasons.top_features.len() <= 5);
    let mags: Vec<f64> = s
        .reasons
        .top_features
        .iter()
        .map(|c| c.contribution.abs())
        .collect();
    assert!(
        mags.windows(2).all(|w| w[0] >= w[1]),
        "sorted by magnitude: {mags:?}"
    );
    scorer.thresholds.review = 2.0;
    scorer.thresholds.anomaly_review = None;
    let s = scorer.score(row, false);
    assert_eq!(s.decision, Decision::Allow);
    assert!(
        s.reasons.top_features.is_empty(),
        "no explanation is computed for an allowed score"
    );
}

#[test]
fn feature_mismatch_is_a_clear_error() {
    let dir = tempdir("mismatch");
    let data = small_data(&dir);
    let model = train_small(&data, Algo::Gbt);
    let mut json: serde_json::Value = serde_json::to_value(&model).unwrap();
    json["features"][3] = "card.count_2d".into();
    let err = Model::from_json(&json.to_string(), "m.json").unwrap_err();
    assert!(matches!(err, ModelError::FeatureMismatch { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("card.count_2d") && msg.contains("card.count_1d"),
        "{msg}"
    );

    let mut json: serde_json::Value = serde_json::to_value(&model).unwrap();
    json["features"].as_array_mut().unwrap().swap(0, 1);
    let msg = Model::from_json(&json.to_string(), "m.json")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("different order"), "{msg}");

    let mut json: serde_json::Value = serde_json::to_value(&model).unwrap();
    json["body"]["trees"][0]["left"][0] = 0.into();
    let msg = Model::from_json(&json.to_string(), "m.json")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("not a valid model") && msg.contains("children"),
        "{msg}"
    );

    let msg = Model::from_json("{\"format\":\"other\"}", "m.json")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("format"), "{msg}");
}

fn tempdir(name: &str) -> WorkDir {
    WorkDir::new("test", name)
}
