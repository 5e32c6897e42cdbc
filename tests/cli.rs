//! The `peregrine` binary on small generated files.

mod common;

use common::WorkDir;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_peregrine"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the binary runs")
}

fn ok(args: &[&str]) -> Output {
    let out = run(args);
    assert!(
        out.status.success(),
        "peregrine {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn fails(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        !out.status.success(),
        "peregrine {args:?} should have failed"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn workdir(name: &str) -> WorkDir {
    WorkDir::new("cli", name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn simulate(dir: &Path, file: &str, seed: &str) -> PathBuf {
    let data = dir.join(file);
    ok(&[
        "simulate",
        "--out",
        s(&data),
        "--customers",
        "400",
        "--terminals",
        "800",
        "--days",
        "60",
        "--start",
        "2018-04-01",
        "--seed",
        seed,
    ]);
    data
}

fn replay_to(data: &Path, model: &Path, rules: &Path, out: &Path) -> Output {
    ok(&[
        "replay",
        "--data",
        s(data),
        "--model",
        s(model),
        "--rules",
        s(rules),
        "--out",
        s(out),
    ])
}

/// A quick model on April's data.
fn train_april(data: &Path, algo: &str, model: &Path) {
    ok(&[
        "train",
        "--data",
        s(data),
        "--train-from",
        "2018-04-10",
        "--train-to",
        "2018-05-01",
        "--algo",
        algo,
        "--out",
        s(model),
    ]);
}

#[test]
fn simulate_train_eval_replay() {
    let dir = workdir("pipeline");
    let data = simulate(&dir, "sim.csv.gz", "3");
    let again = simulate(&dir, "again.csv.gz", "3");
    let (a, b) = (
        std::fs::read(&data).unwrap(),
        std::fs::read(&again).unwrap(),
    );
    assert_eq!(a, b, "the simulator is deterministic for a seed");
    assert_eq!(&a[..2], &[0x1f, 0x8b], "a .gz output is gzipped");

    let model = dir.join("model.json");
    ok(&[
        "train",
        "--data",
        s(&data),
        "--train-from",
        "2018-04-20",
        "--train-to",
        "2018-05-10",
        "--algo",
        "gbt",
        "--trees",
        "60",
        "--out",
        s(&model),
    ]);
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&model).unwrap()).unwrap();
    assert_eq!(meta["algo"], "gbt");
    assert_eq!(meta["training"]["from"], "2018-04-20");
    assert_eq!(
        meta["features"].as_array().unwrap().len(),
        peregrine::features::N_FEATURES
    );
    assert!(meta["training"]["rows"].as_u64().unwrap() > 1000);

    let out = ok(&[
        "eval",
        "--data",
        s(&data),
        "--model",
        s(&model),
        "--test-from",
        "2018-05-17",
        "--test-to",
        "2018-05-24",
        "--exclude-known-since",
        "2018-04-20",
    ]);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("eval prints one JSON object");
    for key in [
        "auc_roc",
        "average_precision",
        "card_precision_at_100",
        "transactions",
        "frauds",
    ] {
        assert!(report.get(key).is_some(), "missing {key} in {report}");
    }
    assert!(report["auc_roc"].as_f64().unwrap() > 0.7, "{report}");
    assert!(
        report["average_precision"].as_f64().unwrap() > 0.3,
        "{report}"
    );
    assert!(report["excluded_transactions"].as_u64().unwrap() > 0);

    let rules = dir.join("rules.txt");
    std::fs::write(
        &rules,
        "big high: amount > 220\nburst medium: card.count_1h > 4\n",
    )
    .unwrap();
    let alerts = dir.join("alerts.jsonl");
    let out = replay_to(&data, &model, &rules, &alerts);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("transactions/s"), "{stderr}");
    let text = std::fs::read_to_string(&alerts).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() > 50);
    let by_rule = lines
        .iter()
        .filter(|a| {
            a["reasons"]["rules"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["rule"] == "big")
        })
        .collect::<Vec<_>>();
    assert!(!by_rule.is_empty());
    for a in &by_rule {
        assert!(a["amount"].as_f64().unwrap() > 220.0);
        assert_eq!(a["decision"], "block");
    }
    for a in &lines {
        assert!(a["alert_id"].as_str().unwrap().starts_with("al-"));
        assert!(!a["reasons"]["top_features"].as_array().unwrap().is_empty());
        assert_eq!(a["model_version"], meta["model_version"]);
    }
    // Replaying again gives the same alerts, with the same ids.
    let again = dir.join("again.jsonl");
    replay_to(&data, &model, &rules, &again);
    let ids = |t: &str| {
        t.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["alert_id"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&text), ids(&std::fs::read_to_string(&again).unwrap()));
}

#[test]
fn bad_rows_name_field_and_line() {
    let dir = workdir("bad");
    let model = dir.join("m.json");
    let data = simulate(&dir, "ok.csv", "1");
    train_april(&data, "logistic", &model);

    let header = "transaction_id,timestamp,card_id,merchant_id,amount,is_fraud\n";
    let cases = [
        ("1,2018-04-01T00:00:00Z,c,m,abc,0\n", "line 2", "`amount`"),
        (
            "1,2018-04-01T00:00:00Z,c,m,5,0\n2,2018-04-31T00:00:00Z,c,m,5,0\n",
            "line 3",
            "`timestamp`",
        ),
        ("1,2018-04-01T00:00:00Z,,m,5,0\n", "line 2", "`card_id`"),
        ("1,2018-04-01T00:00:00Z,c,m,5,yes\n", "line 2", "`is_fraud`"),
    ];
    for (i, (rows, line, field)) in cases.iter().enumerate() {
        let f = dir.join(format!("bad{i}.csv"));
        std::fs::write(&f, format!("{header}{rows}")).unwrap();
        let err = fails(&[
            "replay",
            "--data",
            s(&f),
            "--model",
            s(&model),
            "--out",
            s(&dir.join("o.jsonl")),
        ]);
        assert!(err.contains(line) && err.contains(field), "case {i}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let f = dir.join("bad.jsonl");
    std::fs::write(&f, "{\"transaction_id\":\"1\",\"timestamp\":\"2018-04-01T00:00:00Z\",\"card_id\":\"c\",\"merchant_id\":\"m\",\"amount\":1}\n{\"transaction_id\":\"2\",\"timestamp\":\"2018-04-01T00:00:00Z\",\"card_id\":\"c\",\"amount\":1}\n").unwrap();
    let err = fails(&["replay", "--data", s(&f), "--model", s(&model)]);
    assert!(
        err.contains("line 2") && err.contains("`merchant_id`"),
        "{err}"
    );

    let f = dir.join("nolabel.csv");
    std::fs::write(
        &f,
        "transaction_id,timestamp,card_id,merchant_id,amount\n1,2018-04-01T00:00:00Z,c,m,5\n",
    )
    .unwrap();
    let err = fails(&[
        "train",
        "--data",
        s(&f),
        "--train-from",
        "2018-04-01",
        "--train-to",
        "2018-04-02",
        "--out",
        s(&dir.join("x.json")),
    ]);
    assert!(err.contains("is_fraud"), "{err}");
}

#[test]
fn clear_errors_for_bad_arguments_models_and_rules() {
    let dir = workdir("args");
    let data = simulate(&dir, "d.csv", "2");
    let err = fails(&[
        "train",
        "--data",
        s(&data),
        "--train-from",
        "01/04/2018",
        "--train-to",
        "2018-05-01",
        "--out",
        "x",
    ]);
    assert!(
        err.contains("--train-from") && err.contains("YYYY-MM-DD"),
        "{err}"
    );
    let err = fails(&[
        "eval",
        "--data",
        s(&data),
        "--model",
        s(&dir.join("missing.json")),
        "--test-from",
        "2018-05-01",
        "--test-to",
        "2018-05-02",
    ]);
    assert!(err.contains("missing.json"), "{err}");
    let bad_model = dir.join("bad.json");
    std::fs::write(
        &bad_model,
        "{\"format\": \"peregrine-model\", \"format_version\": 1, \"features\": [\"amount\"]}",
    )
    .unwrap();
    let err = fails(&[
        "eval",
        "--data",
        s(&data),
        "--model",
        s(&bad_model),
        "--test-from",
        "2018-05-01",
        "--test-to",
        "2018-05-02",
    ]);
    assert!(
        err.contains("differ from this engine") && err.contains("missing from the model"),
        "{err}"
    );

    let model = dir.join("m.json");
    train_april(&data, "iforest", &model);
    let rules = dir.join("rules.txt");
    std::fs::write(&rules, "fine low: amount > 1\nbroken high: amount >> 3\n").unwrap();
    let err = fails(&[
        "replay",
        "--data",
        s(&data),
        "--model",
        s(&model),
        "--rules",
        s(&rules),
    ]);
    assert!(err.contains("rule `broken` (line 2, column 22)"), "{err}");

    let help = String::from_utf8(ok(&["--help"]).stdout).unwrap();
    for cmd in ["simulate", "train", "eval", "replay", "demo"] {
        assert!(help.contains(cmd), "{help}");
    }
}

/// Out-of-range training parameters are refused naming the flag, before any
/// data is read; `--tune` records its search in the model and trains with
/// the parameters it chose.
#[test]
fn training_parameters_are_checked_and_tuned() {
    let dir = workdir("tune");
    let data = simulate(&dir, "d.csv", "4");
    let model = dir.join("m.json");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--data",
            s(&data),
            "--train-from",
            "2018-04-10",
            "--train-to",
            "2018-05-31",
            "--out",
            s(&model),
        ];
        args.extend_from_slice(extra);
        args.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let refuse = |extra: &[&str], flag: &str| {
        let args = train(extra);
        let err = fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(err.contains(flag), "{extra:?}: {err}");
        assert!(!model.exists(), "{extra:?} wrote a model");
    };
    refuse(&["--trees", "0"], "--trees");
    refuse(&["--learning-rate", "-0.1"], "--learning-rate");
    refuse(&["--learning-rate", "NaN"], "--learning-rate");
    refuse(&["--max-depth", "0"], "--max-depth");
    refuse(&["--lambda", "-1"], "--lambda");
    refuse(&["--min-child-weight", "inf"], "--min-child-weight");
    refuse(&["--algo", "forest", "--tune"], "--tune");

    let args = train(&["--tune", "--max-depth", "3"]);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&model).unwrap()).unwrap();
    let tune = &m["metrics"]["tune"];
    let trials = tune["trials"].as_array().unwrap();
    // Depth fixed at 3: two learning rates times twelve round counts.
    assert_eq!(trials.len(), 24, "{tune}");
    assert!(trials.iter().all(|t| t["max_depth"] == 3), "{tune}");
    let best = &tune["best"];
    let top = trials
        .iter()
        .map(|t| t["average_precision"].as_f64().unwrap())
        .fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(best["average_precision"].as_f64().unwrap(), top, "{tune}");
    let rounds = best["rounds"].as_u64().unwrap() as usize;
    assert_eq!(
        m["body"]["trees"].as_array().unwrap().len(),
        rounds,
        "{tune}"
    );
    assert!(tune["validation_frauds"].as_u64().unwrap() > 0, "{tune}");
}

#[test]
fn demo_runs_the_pipeline_on_the_mock_cluster() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let out = ok(&[
        "demo",
        "--customers",
        "200",
        "--terminals",
        "400",
        "--days",
        "20",
        "--rate",
        "20000",
        "--linger",
        "0",
        "--http-addr",
        &addr,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("model gbt-") && stdout.contains("mock cluster"),
        "{stdout}"
    );
    assert!(
        stdout.contains("tx/s") && stdout.contains("p99"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("http://{addr}/v1/score")),
        "{stdout}"
    );
    // Every transaction scored, the two malformed ones dead-lettered.
    let total = stdout
        .split("scored ")
        .filter_map(|s| {
            let mut w = s.split_whitespace();
            let scored: u64 = w.next()?.parse().ok()?;
            (w.next()? == "of").then_some(())?;
            let of: u64 = w.next()?.parse().ok()?;
            Some((scored, of))
        })
        .last()
        .expect("a live line");
    assert_eq!(total.0, total.1, "{stdout}");
    assert!(stdout.contains("dead-lettered 2"), "{stdout}");
    assert!(stdout.contains("compromised card"), "{stdout}");
    let start = stdout.find("{\n").expect("an example alert");
    let end = stdout[start..].find("\n}").expect("the alert closes") + start + 2;
    let alert: serde_json::Value = serde_json::from_str(&stdout[start..end]).unwrap();
    assert!(alert["alert_id"].as_str().unwrap().starts_with("al-"));
    assert!(
        alert["reasons"]["top_features"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    );
}

/// A librdkafka property it does not know stops `serve` at once, with
/// librdkafka's own message, instead of an instance that stays up unready.
#[test]
fn serve_with_an_unknown_kafka_option_exits_with_its_message() {
    let started = std::time::Instant::now();
    let err = fails(&[
        "serve",
        "--brokers",
        "127.0.0.1:9",
        "--http-addr",
        "127.0.0.1:0",
        "-X",
        "no.such.option=1",
    ]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.contains("No such configuration property"), "{err}");
    assert!(err.contains("no.such.option"), "{err}");
}

/// A features file picks the columns: `features` exports them, `train`
/// stores the file in the model, and `eval` and `replay` compute the same
/// columns from it; a model whose file was altered, and a file with a
/// mistake, are refused with the reason.
#[test]
fn features_files_declare_the_columns() {
    let dir = workdir("features-file");
    let data = dir.join("sim6.csv");
    ok(&[
        "simulate",
        "--out",
        s(&data),
        "--customers",
        "300",
        "--terminals",
        "600",
        "--days",
        "45",
        "--start",
        "2018-04-01",
        "--seed",
        "5",
        "--scenarios",
        "1,2,3,4,5,6",
    ]);
    let root = env!("CARGO_MANIFEST_DIR");
    let extended = format!("{root}/models/features-extended.toml");
    let export = dir.join("ext.csv");
    ok(&[
        "features",
        "--data",
        s(&data),
        "--from",
        "2018-05-01",
        "--to",
        "2018-05-10",
        "--out",
        s(&export),
        "--features",
        &extended,
    ]);
    let text = std::fs::read_to_string(&export).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    assert_eq!(header.len(), 1 + 30 + 14 + 1, "{header:?}");
    assert_eq!(header[1], "amount");
    assert!(header.contains(&"card.share_mcc_30d") && header.contains(&"card_mcc.count_30d"));
    // The card habits are computed, not left at a constant.
    let col = header
        .iter()
        .position(|h| *h == "card.share_mcc_30d")
        .unwrap();
    let values: std::collections::BTreeSet<&str> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(col).unwrap())
        .collect();
    assert!(values.len() > 20, "{} distinct shares", values.len());

    // Trained on three weeks, evaluated on the five days after.
    let train_and_eval = |model: &Path, trees: &str, features: &str| {
        ok(&[
            "train",
            "--data",
            s(&data),
            "--train-from",
            "2018-04-20",
            "--train-to",
            "2018-05-10",
            "--out",
            s(model),
            "--trees",
            trees,
            "--features",
            features,
        ]);
        let eval = ok(&[
            "eval",
            "--data",
            s(&data),
            "--model",
            s(model),
            "--test-from",
            "2018-05-10",
            "--test-to",
            "2018-05-15",
        ]);
        let report: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
        report["auc_roc"].as_f64().unwrap()
    };
    let model = dir.join("ext.json");
    let auc = train_and_eval(&model, "30", &extended);
    assert!(auc > 0.7, "AUC {auc}");
    let stored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&model).unwrap()).unwrap();
    assert_eq!(stored["features"].as_array().unwrap().len(), 44);
    assert!(
        stored["features_file"]
            .as_str()
            .unwrap()
            .contains("card_mcc.count_30d")
    );
    let alerts = dir.join("alerts.jsonl");
    ok(&[
        "replay",
        "--data",
        s(&data),
        "--model",
        s(&model),
        "--out",
        s(&alerts),
    ]);
    let first = std::fs::read_to_string(&alerts).unwrap();
    let reasons: Vec<serde_json::Value> = first
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!reasons.is_empty());
    assert!(
        reasons
            .iter()
            .all(|a| a["reasons"]["top_features"].as_array().is_some()),
        "every alert explains itself"
    );

    // Rules read the declared columns by name.
    let rules = dir.join("declared.rules");
    std::fs::write(
        &rules,
        "first_in_category medium: card_mcc.count_30d == 0 and card.count_30d >= 5\n",
    )
    .unwrap();
    let ruled = dir.join("ruled.jsonl");
    replay_to(&data, &model, &rules, &ruled);
    let hits = std::fs::read_to_string(&ruled)
        .unwrap()
        .lines()
        .filter(|l| l.contains("first_in_category"))
        .count();
    assert!(hits > 10, "{hits} alerts by the declared-column rule");
    // The built-in model has no such column: the rule is refused by name.
    let e = fails(&[
        "replay",
        "--data",
        s(&data),
        "--model",
        &format!("{root}/models/default.json"),
        "--rules",
        s(&rules),
        "--out",
        s(&ruled),
    ]);
    assert!(e.contains("unknown feature `card_mcc.count_30d`"), "{e}");

    // A stored file that no longer declares a column the model reads.
    let mut altered = stored.clone();
    let file = altered["features_file"].as_str().unwrap().replace(
        "name = \"tx.channel\"\nvalue = \"channel\"",
        "name = \"tx.colour\"\nvalue = \"channel\"",
    );
    altered["features_file"] = file.into();
    let bad = dir.join("altered.json");
    std::fs::write(&bad, altered.to_string()).unwrap();
    let e = fails(&[
        "eval",
        "--data",
        s(&data),
        "--model",
        s(&bad),
        "--test-from",
        "2018-05-10",
        "--test-to",
        "2018-05-15",
    ]);
    assert!(
        e.contains("trained on features that differ") && e.contains("tx.channel"),
        "{e}"
    );

    // A mistake in a file names the feature and the key.
    let broken = dir.join("broken.toml");
    std::fs::write(
        &broken,
        "format = 1\n[[feature]]\nname = \"card.weird\"\nentity = \"card_id\"\nagg = \"median\"\nof = \"amount\"\nwindow = \"1d\"\n",
    )
    .unwrap();
    let e = fails(&[
        "train",
        "--data",
        s(&data),
        "--train-from",
        "2018-04-20",
        "--train-to",
        "2018-05-10",
        "--out",
        s(&dir.join("x.json")),
        "--features",
        s(&broken),
    ]);
    assert!(e.contains("feature `card.weird`, `agg`: `median`"), "{e}");

    // A merchant's count over all its cards, computed from a file; and a
    // merchant's known frauds, which the service refuses: it brings labels
    // to the card's windows only.
    let merchant_file = dir.join("merchant.toml");
    std::fs::write(
        &merchant_file,
        "format = 1\n[[feature]]\nname = \"tx.amount_paid\"\nvalue = \"amount\"\n[[feature]]\nname = \"merchant.count_last_hour\"\nentity = \"merchant_id\"\nagg = \"count\"\nwindow = \"1h\"\n[[feature]]\nname = \"merchant.frauds_known_30d\"\nentity = \"merchant_id\"\nagg = \"sum\"\nof = \"is_fraud == 1\"\nwindow = \"30d\"\ndelay = \"label\"\n",
    )
    .unwrap();
    let merchant_model = dir.join("merchant.json");
    let auc = train_and_eval(&merchant_model, "10", s(&merchant_file));
    assert!(auc > 0.5, "AUC {auc}");
    let e = fails(&["serve", "--model", s(&merchant_model)]);
    assert!(
        e.contains("`merchant.frauds_known_30d` aggregates per `merchant_id` over fraud labels"),
        "{e}"
    );
}
