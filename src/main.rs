//! The `peregrine` command line.

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use peregrine::backtest::{self, EvalRequest, TrainRequest};
use peregrine::features::FeatureConfig;
use peregrine::features::file::Plan;
use peregrine::ingest::time::parse_date;
use peregrine::model::rules::{RuleSet, parse_rules_for};
use peregrine::model::scorer::Scorer;
use peregrine::model::tune::Grid;
use peregrine::model::{Algo, Model, TrainParams};
use peregrine::sim::{SimConfig, Simulation};
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

mod demo;
mod service_cli;

#[derive(Parser)]
#[command(
    name = "peregrine",
    version,
    about = "Real-time card-fraud and anomaly detection",
    long_about = "Real-time card-fraud and anomaly detection.\n\n\
        Streams card transactions in event time through exact per-card and per-merchant \
        windows, scores them with a trained model, rules and an anomaly score, and explains \
        every alert.\n\nTransaction files are CSV with a header, or JSON Lines; `.gz` is read transparently."
)]
struct Cli {
    /// No progress bar, even on a terminal.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate transactions with the Fraud Detection Handbook's simulator.
    Simulate(SimulateArgs),
    /// Train a model on a time window of a labelled file.
    Train(TrainArgs),
    /// Evaluate a model on a test window with the Handbook's protocol; prints JSON.
    Eval(EvalArgs),
    /// Backtest: score every transaction of a file and write the alerts.
    Replay(ReplayArgs),
    /// Export the engine's features of a time window as CSV, to explore or train elsewhere.
    Features(FeaturesArgs),
    /// Turn an XGBoost or LightGBM model, trained on `features`' export, into a Peregrine model.
    Import(ImportArgs),
    /// Run the service: Kafka in, alerts out, HTTP scoring API and metrics.
    Serve(service_cli::ServeArgs),
    /// Send a transactions file to a Kafka topic as JSON, keyed by card_id.
    Produce(service_cli::ProduceArgs),
    /// Store the alert topic's alerts in PostgreSQL (the alert store), idempotently.
    Sink(service_cli::SinkArgs),
    /// Read a Kafka topic from the start and print its messages as JSON lines.
    Consume(service_cli::ConsumeArgs),
    /// The whole pipeline on a simulated live stream, with the built-in model: no set-up needed.
    Demo(demo::DemoArgs),
}

#[derive(Args)]
struct SimulateArgs {
    /// Output file (CSV; gzipped when it ends in .gz).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    size: SimSize,
    /// First day, YYYY-MM-DD (UTC).
    #[arg(long, default_value = "2018-04-01")]
    start: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fraud scenarios to inject: 1 amount > 220, 2 compromised terminals,
    /// 3 compromised cards, 4 card testing, 5 account takeover, 6 category
    /// and hour (genuine hours by merchant category; night purchases of
    /// electronics on compromised cards; not in the default set).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5")]
    scenarios: Vec<u8>,
}

/// How much the simulator generates.
#[derive(Args)]
pub struct SimSize {
    #[arg(long, default_value_t = 5000)]
    pub customers: usize,
    #[arg(long, default_value_t = 10_000)]
    pub terminals: usize,
    #[arg(long, default_value_t = 183)]
    pub days: u32,
}

#[derive(Args)]
struct FeatureArgs {
    /// A features file (TOML) declaring the model's columns; default: the
    /// built-in one (models/features-default.toml).
    #[arg(long = "features", value_name = "FILE")]
    features_file: Option<PathBuf>,
    /// Days between a transaction and the moment its fraud label is known.
    #[arg(long, default_value_t = 7)]
    label_delay_days: i64,
    /// Seconds an event may lag the newest event time and still update state.
    #[arg(long, default_value_t = 3600)]
    allowed_lateness: i64,
}

#[derive(Args)]
struct TrainArgs {
    /// Labelled transactions (CSV or JSON Lines, optionally .gz), in time order.
    #[arg(long)]
    data: PathBuf,
    /// First day of the training window (inclusive), YYYY-MM-DD.
    #[arg(long)]
    train_from: String,
    /// End of the training window (exclusive), YYYY-MM-DD.
    #[arg(long)]
    train_to: String,
    #[arg(long, value_enum, default_value_t = Algo::Gbt)]
    algo: Algo,
    /// Where to write the model (JSON).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    features: FeatureArgs,
    /// Boosting rounds (gbt) or trees (forest, iforest).
    #[arg(long)]
    trees: Option<usize>,
    /// Maximum tree depth (gbt, forest).
    #[arg(long)]
    max_depth: Option<usize>,
    /// Shrinkage of each boosting round (gbt).
    #[arg(long, allow_negative_numbers = true)]
    learning_rate: Option<f64>,
    /// L2 penalty on leaf values (gbt) or on weights (logistic).
    #[arg(long, allow_negative_numbers = true)]
    lambda: Option<f64>,
    /// Least hessian (gbt) or bootstrap weight (forest) in a leaf.
    #[arg(long, allow_negative_numbers = true)]
    min_child_weight: Option<f64>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// gbt: choose rounds (25..300), depth (4, 6) and learning rate (0.05,
    /// 0.15) by validation AP on the window's last quarter, fitted on what
    /// ends a label delay before it; then train on the whole window. A flag
    /// among --trees, --max-depth, --learning-rate fixes its dimension.
    #[arg(long)]
    tune: bool,
}

#[derive(Args)]
struct EvalArgs {
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    model: PathBuf,
    /// First test day (inclusive), YYYY-MM-DD.
    #[arg(long)]
    test_from: String,
    /// End of the test period (exclusive), YYYY-MM-DD.
    #[arg(long)]
    test_to: String,
    /// Leave out, on each test day, the cards with a fraud at or after this
    /// date whose label was already known that day.
    #[arg(long)]
    exclude_known_since: Option<String>,
    /// Also write each test transaction's score to this CSV file.
    #[arg(long)]
    predictions: Option<PathBuf>,
}

#[derive(Args)]
struct FeaturesArgs {
    #[arg(long)]
    data: PathBuf,
    /// First day (inclusive), YYYY-MM-DD.
    #[arg(long)]
    from: String,
    /// End (exclusive), YYYY-MM-DD.
    #[arg(long)]
    to: String,
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    features: FeatureArgs,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["xgboost", "lightgbm"])))]
struct ImportArgs {
    /// An XGBoost model saved as JSON (`Booster.save_model("model.json")`),
    /// objective binary:logistic, trained on columns of `peregrine features`.
    #[arg(long)]
    xgboost: Option<PathBuf>,
    /// A LightGBM model saved as text (`Booster.save_model("model.txt")`),
    /// objective binary, trained on columns of `peregrine features`.
    #[arg(long)]
    lightgbm: Option<PathBuf>,
    /// Where to write the Peregrine model (JSON).
    #[arg(long)]
    out: PathBuf,
    /// The feature settings the exported features were computed with.
    #[command(flatten)]
    features: FeatureArgs,
}

#[derive(Args)]
struct ReplayArgs {
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    model: PathBuf,
    /// Alerts as JSON Lines; standard output when not given.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Rules file (see README: `name severity: condition` per line).
    #[arg(long)]
    rules: Option<PathBuf>,
    /// Score at or over which an alert asks for review (default: the model's).
    #[arg(long)]
    review_threshold: Option<f64>,
    /// Score at or over which an alert asks for a block (default: the model's).
    #[arg(long)]
    block_threshold: Option<f64>,
    /// Anomaly score at or over which a transaction is sent for review,
    /// whatever the model's score (default: anomaly only reported on alerts).
    #[arg(long)]
    anomaly_threshold: Option<f64>,
}

fn date(flag: &str, s: &str) -> anyhow::Result<i64> {
    parse_date(s).with_context(|| format!("--{flag}: expected a date as YYYY-MM-DD, got {s:?}"))
}

/// A rules file for `model`: its rules may read the model's declared columns.
pub fn load_rules(path: Option<&Path>, model: &Model) -> anyhow::Result<RuleSet> {
    let Some(path) = path else {
        return Ok(RuleSet::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read rules {}", path.display()))?;
    parse_rules_for(&text, &model.plan()?)
        .with_context(|| format!("in rules file {}", path.display()))
}

fn main() {
    let cli = Cli::parse();
    let progress = !cli.quiet && std::io::stderr().is_terminal();
    if let Err(e) = run(cli.command, progress) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(command: Command, progress: bool) -> anyhow::Result<()> {
    match command {
        Command::Simulate(a) => simulate(a),
        Command::Train(a) => train(a, progress),
        Command::Eval(a) => eval(a, progress),
        Command::Replay(a) => replay(a, progress),
        Command::Features(a) => export_features(a, progress),
        Command::Import(a) => import(a),
        Command::Serve(a) => service_cli::serve(a),
        Command::Produce(a) => service_cli::produce(a),
        Command::Consume(a) => service_cli::consume(a),
        Command::Sink(a) => service_cli::sink(a),
        Command::Demo(a) => demo::run(a, progress),
    }
}

pub fn write_simulation(sim: &Simulation, out: &Path) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let gz = out.extension().is_some_and(|e| e == "gz");
    let mut w: Box<dyn Write> = if gz {
        Box::new(flate2::write::GzEncoder::new(
            BufWriter::with_capacity(1 << 20, file),
            flate2::Compression::fast(),
        ))
    } else {
        Box::new(BufWriter::with_capacity(1 << 20, file))
    };
    sim.write_csv(&mut w)?;
    w.flush()?;
    drop(w);
    Ok(())
}

fn simulate(a: SimulateArgs) -> anyhow::Result<()> {
    if let Some(bad) = a.scenarios.iter().find(|s| !(1..=6).contains(*s)) {
        bail!("--scenarios: {bad} is not a scenario (1 to 6)");
    }
    if a.size.customers == 0 || a.size.terminals == 0 || a.size.days == 0 {
        bail!("--customers, --terminals and --days must be at least 1");
    }
    let started = Instant::now();
    let cfg = SimConfig {
        customers: a.size.customers,
        terminals: a.size.terminals,
        days: a.size.days,
        start: date("start", &a.start)?,
        seed: a.seed,
        scenarios: a.scenarios,
        ..SimConfig::default()
    };
    let sim = Simulation::run(cfg);
    write_simulation(&sim, &a.out)?;
    let frauds = sim.transactions.iter().filter(|t| t.scenario > 0).count();
    eprintln!(
        "wrote {} transactions ({} frauds, {:.2}%) to {} in {:.1}s",
        sim.transactions.len(),
        frauds,
        100.0 * frauds as f64 / sim.transactions.len().max(1) as f64,
        a.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn train(a: TrainArgs, progress: bool) -> anyhow::Result<()> {
    let (from, to) = (
        date("train-from", &a.train_from)?,
        date("train-to", &a.train_to)?,
    );
    if to <= from {
        bail!("--train-to must be after --train-from");
    }
    let features = feature_config(&a.features)?;
    let plan = plan(&a.features)?;
    let mut params = TrainParams::default();
    params.gbt.seed = a.seed;
    params.forest.seed = a.seed;
    params.iforest.seed = a.seed;
    if let Some(n) = a.trees {
        params.gbt.rounds = n;
        params.forest.trees = n;
        params.iforest.trees = n;
    }
    if let Some(v) = a.learning_rate {
        params.gbt.learning_rate = v;
    }
    if let Some(v) = a.lambda {
        params.gbt.tree.lambda = v;
        params.logistic.alpha = v;
    }
    if let Some(v) = a.min_child_weight {
        params.gbt.tree.min_child_weight = v;
        params.forest.tree.min_child_weight = v;
    }
    if let Some(d) = a.max_depth {
        params.gbt.tree.max_depth = d;
        params.forest.tree.max_depth = d;
    }
    params.validate()?;
    if a.tune && a.algo != Algo::Gbt {
        bail!("--tune searches the gradient-boosted trees' parameters: use it with --algo gbt");
    }
    let req = TrainRequest {
        data: &a.data,
        from,
        to,
        algo: a.algo,
        features,
        plan: &plan,
        params,
        tune: a
            .tune
            .then(|| Grid::new(a.max_depth, a.learning_rate, a.trees)),
        progress,
    };
    let model = backtest::train(&req)?;
    model.save(&a.out)?;
    eprintln!(
        "trained {} on {} transactions ({} frauds) in {:.1}s → {} [{}]",
        a.algo.as_str(),
        model.training.rows,
        model.training.frauds,
        model.training.seconds,
        a.out.display(),
        model.model_version
    );
    Ok(())
}

fn plan(a: &FeatureArgs) -> anyhow::Result<Plan> {
    let Some(path) = &a.features_file else {
        return Ok(Plan::default_plan().clone());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the features file {}", path.display()))?;
    Plan::compile(&text).with_context(|| format!("in {}", path.display()))
}

fn feature_config(a: &FeatureArgs) -> anyhow::Result<FeatureConfig> {
    if a.label_delay_days < 0 || a.allowed_lateness < 0 {
        bail!("--label-delay-days and --allowed-lateness must not be negative");
    }
    Ok(FeatureConfig {
        label_delay_secs: a.label_delay_days * 86_400,
        allowed_lateness_secs: a.allowed_lateness,
        ..FeatureConfig::default()
    })
}

fn export_features(a: FeaturesArgs, progress: bool) -> anyhow::Result<()> {
    let (from, to) = (date("from", &a.from)?, date("to", &a.to)?);
    let mut w = BufWriter::new(
        std::fs::File::create(&a.out)
            .with_context(|| format!("cannot create {}", a.out.display()))?,
    );
    let plan = plan(&a.features)?;
    writeln!(w, "transaction_id,{},is_fraud", plan.names.join(","))?;
    let mut rows = 0u64;
    let cfg = feature_config(&a.features)?;
    backtest::stream(&a.data, cfg, &plan, progress, |tx, f| {
        if tx.time.utc >= from && tx.time.utc < to {
            write!(w, "{}", tx.transaction_id)?;
            for &s in &plan.slots {
                write!(w, ",{}", f.0[s])?;
            }
            match tx.is_fraud {
                Some(l) => writeln!(w, ",{}", u8::from(l))?,
                None => writeln!(w, ",")?,
            }
            rows += 1;
        }
        Ok(())
    })?;
    w.flush()?;
    eprintln!(
        "wrote the features of {rows} transactions to {}",
        a.out.display()
    );
    Ok(())
}

fn eval(a: EvalArgs, progress: bool) -> anyhow::Result<()> {
    let model = Model::load(&a.model)?;
    let req = EvalRequest {
        data: &a.data,
        predictions: a.predictions.as_deref(),
        from: date("test-from", &a.test_from)?,
        to: date("test-to", &a.test_to)?,
        exclude_known_since: a
            .exclude_known_since
            .as_deref()
            .map(|s| date("exclude-known-since", s))
            .transpose()?,
        progress,
    };
    if req.to <= req.from {
        bail!("--test-to must be after --test-from");
    }
    let report = backtest::evaluate(&Scorer::new(model, RuleSet::default()), &req)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn import(a: ImportArgs) -> anyhow::Result<()> {
    use peregrine::model::import::{from_lightgbm, from_xgboost};
    let (library, path) = match (&a.xgboost, &a.lightgbm) {
        (Some(p), None) => ("xgboost", p),
        (None, Some(p)) => ("lightgbm", p),
        _ => bail!("give one of --xgboost and --lightgbm"),
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let plan = plan(&a.features)?;
    let body = match library {
        "xgboost" => from_xgboost(&text, &plan.names),
        _ => from_lightgbm(&text, &plan.names),
    }
    .with_context(|| format!("cannot import {}", path.display()))?;
    let file = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let (trees, nodes) = (
        body.trees.len(),
        body.trees.iter().map(|t| t.len()).sum::<usize>(),
    );
    let model = Model::imported(body, library, &file, &plan, feature_config(&a.features)?);
    model.save(&a.out)?;
    eprintln!(
        "imported {library} model {} ({trees} trees, {nodes} nodes) → {} [{}]",
        path.display(),
        a.out.display(),
        model.model_version
    );
    Ok(())
}

fn replay(a: ReplayArgs, progress: bool) -> anyhow::Result<()> {
    let model = Model::load(&a.model)?;
    let rules = load_rules(a.rules.as_deref(), &model)?;
    let mut scorer = Scorer::new(model, rules);
    if let Some(t) = a.review_threshold {
        scorer.thresholds.review = t;
    }
    if let Some(t) = a.block_threshold {
        scorer.thresholds.block = t;
    }
    if a.anomaly_threshold.is_some() {
        scorer.thresholds.anomaly_review = a.anomaly_threshold;
    }
    let mut out: Box<dyn Write + Send> = match &a.out {
        Some(p) => Box::new(BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout())),
    };
    let s = backtest::replay(&scorer, &a.data, &mut out, progress)?;
    eprintln!(
        "replayed {} transactions in {:.2}s: {:.0} transactions/s; {} alerts ({} review, {} block, {} by rules), {} late",
        s.transactions,
        s.seconds,
        s.transactions_per_second,
        s.alerts,
        s.review,
        s.block,
        s.rule_alerts,
        s.late
    );
    Ok(())
}
