//! `peregrine demo`: the whole pipeline with no set-up. A simulated live
//! stream with injected fraud goes into Kafka (an in-process mock cluster,
//! or a real broker with `--brokers`); the service consumes, scores and
//! alerts, with its HTTP API up; alerts are read back and checked against
//! the simulator's ground truth.

use clap::Args;
use peregrine::config::Settings;
use peregrine::features::N_FEATURES;
use peregrine::ingest::Transaction;
use peregrine::ingest::decode::DeadReason;
use peregrine::ingest::label::Label;
use peregrine::serve::{self, ServiceState};
use peregrine::sim::{SimConfig, Simulation};
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct DemoArgs {
    /// A Kafka broker to use instead of the in-process mock cluster; the
    /// demo creates topics of its own there.
    #[arg(long)]
    brokers: Option<String>,
    /// Address of the HTTP API while the demo runs.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_addr: String,
    #[arg(long, default_value_t = 1000)]
    customers: usize,
    #[arg(long, default_value_t = 2000)]
    terminals: usize,
    #[arg(long, default_value_t = 30)]
    days: u32,
    /// Transactions per second sent to Kafka.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// A seed other than the built-in model's training data (seed 0).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Seconds to keep serving after the stream ends, to try the API.
    #[arg(long, default_value_t = 3)]
    linger: u64,
}

const PARTITIONS: i32 = 6;
const SCENARIOS: [&str; 6] = [
    "",
    "amount over 220",
    "compromised terminal",
    "compromised card (x5 amounts)",
    "card testing",
    "account takeover",
];

struct Topics {
    input: String,
    alerts: String,
    labels: String,
    dlq: String,
}

pub fn run(a: DemoArgs, _progress: bool) -> anyhow::Result<()> {
    let tag = format!("demo-{}", std::process::id());
    let topics = Topics {
        input: format!("{tag}-transactions"),
        alerts: format!("{tag}-fraud-alerts"),
        labels: format!("{tag}-fraud-labels"),
        dlq: format!("{tag}-transactions-dlq"),
    };
    let names = [&topics.input, &topics.alerts, &topics.labels, &topics.dlq];
    // The mock cluster lives as long as this function.
    let mock;
    let brokers = match &a.brokers {
        Some(b) => {
            create_topics(b, &names)?;
            b.clone()
        }
        None => {
            mock = MockCluster::new(1)?;
            for t in names {
                mock.create_topic(t, PARTITIONS, 1)?;
            }
            // The mock cluster has no CreateTopics: the service's internal
            // topics are made here, as the service would make them.
            let internal = peregrine::serve::kafka::Topics::of(&Settings {
                group_id: format!("{tag}-group"),
                ..Settings::default()
            });
            for t in [
                &internal.cards_changelog,
                &internal.merchant_events,
                &internal.merchants_changelog,
            ] {
                mock.create_topic(t, PARTITIONS, 1)?;
            }
            mock.bootstrap_servers()
        }
    };

    let started = Instant::now();
    let sim = Simulation::run(SimConfig {
        customers: a.customers,
        terminals: a.terminals,
        days: a.days,
        seed: a.seed,
        ..SimConfig::default()
    });
    let n = sim.transactions.len();
    let settings = Settings {
        brokers: brokers.clone(),
        group_id: format!("{tag}-group"),
        input_topic: topics.input.clone(),
        alert_topic: topics.alerts.clone(),
        label_topic: topics.labels.clone(),
        dlq_topic: topics.dlq.clone(),
        http_addr: a.http_addr.clone(),
        log_interval_secs: 0,
        // The demo's month passes in seconds: a day of event time every
        // 0.4 s at the default rate. Live traffic's 60 s bound would make
        // every transaction wait out the merchant table's round trip. Live
        // traffic's bound is hundreds of times that round trip (tens of
        // milliseconds); here six hours (0.1 s) still made one batch in
        // fifteen wait (491 batches, 4.9 s in all). A day is 0.4 s.
        merchant_max_lag_secs: 24 * 3600,
        ..Settings::default()
    };
    settings.validate()?;
    let scorer = serve::load_scorer(&settings, None, None)?;
    let m = &scorer.model;
    println!(
        "Peregrine demo: model {} ({}, {} features), {} rules; Kafka: {}",
        m.model_version,
        m.algo.as_str(),
        N_FEATURES,
        scorer.rules.rules.len(),
        if a.brokers.is_some() {
            brokers.clone()
        } else {
            "in-process mock cluster".into()
        }
    );
    println!(
        "Simulated {n} card transactions over {} days with injected fraud (seed {}) in {:.1}s; \
         streaming them at {}/s, with 2 malformed messages.",
        a.days,
        a.seed,
        started.elapsed().as_secs_f64(),
        a.rate
    );
    println!("While it runs, try:");
    println!(
        "  curl -s -X POST http://{}/v1/score -H 'content-type: application/json' \\\n    -d '{{\"transaction_id\":\"t1\",\"timestamp\":\"2018-04-20T03:12:00Z\",\"card_id\":\"42\",\"merchant_id\":\"T7\",\"amount\":950.0}}'",
        a.http_addr
    );
    println!(
        "  curl -s http://{}/metrics | grep peregrine_alerts",
        a.http_addr
    );
    println!();

    peregrine::telemetry::QUIET.store(true, Ordering::Relaxed);
    let shared = ServiceState::new(settings, scorer);
    let sent = Arc::new(AtomicU64::new(0));
    let producing = Arc::new(AtomicBool::new(true));
    let stop = Arc::new(AtomicBool::new(false));

    let runtime = crate::service_cli::runtime()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = runtime.spawn(serve::run_with(shared.clone(), async move {
        let _ = stop_rx.await;
    }));

    // The stream starts once the service can score it, as live traffic
    // would find it: no start-up backlog.
    let waiting = Instant::now();
    while !shared.readiness().ready {
        if service.is_finished() || waiting.elapsed() > Duration::from_secs(120) {
            let why = shared.readiness().waiting_for.join(", ");
            let _ = stop_tx.send(());
            runtime.block_on(service)??;
            anyhow::bail!("the service did not become ready (waiting for {why})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let producer = {
        let (brokers, sent, producing, stop) = (
            brokers.clone(),
            sent.clone(),
            producing.clone(),
            stop.clone(),
        );
        let (input, labels) = (topics.input.clone(), topics.labels.clone());
        let rate = a.rate;
        std::thread::spawn(move || -> anyhow::Result<Simulation> {
            let result = produce(&sim, &brokers, &input, &labels, rate, &sent, &stop);
            producing.store(false, Ordering::Release);
            result.map(|()| sim)
        })
    };
    let alerts = AlertReader::start(&brokers, &topics.alerts, stop.clone())?;

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = interrupted.clone();
        runtime.spawn(async move {
            serve::termination().await;
            interrupted.store(true, Ordering::Release);
        });
    }
    // The live line, until the stream is sent and every message handled.
    let mut last = (0u64, Instant::now());
    let mut done_at: Option<Instant> = None;
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let mt = &shared.metrics;
        let scored = mt.scored.get();
        let dead: u64 = DeadReason::ALL
            .iter()
            .map(|r| mt.dead_letters.with_label_values(&[r.as_str()]).get())
            .sum();
        let (review, block) = (
            mt.alerts.with_label_values(&["review"]).get(),
            mt.alerts.with_label_values(&["block"]).get(),
        );
        if last.1.elapsed() >= Duration::from_secs(1) || done_at.is_some() {
            let rate = (scored - last.0) as f64 / last.1.elapsed().as_secs_f64();
            last = (scored, Instant::now());
            let l = shared.latency_summary();
            let (p50, p99) = (l.alert_p50_ms, l.alert_p99_ms);
            print!(
                "\rscored {scored:>7} of {n} | {rate:>7.0} tx/s | alerts {:>5} (review {review:>4}, block {block:>4}) | dead-lettered {dead} | event-to-alert p50 {p50:>6.1} ms p99 {p99:>6.1} ms   ",
                review + block
            );
            let _ = std::io::stdout().flush();
        }
        let all_in =
            !producing.load(Ordering::Acquire) && scored + dead >= sent.load(Ordering::Acquire);
        if interrupted.load(Ordering::Acquire) {
            println!("\ninterrupted");
            break;
        }
        match done_at {
            None if all_in => {
                done_at = Some(Instant::now());
                if a.linger > 0 {
                    println!(
                        "\nstream done; the API stays up for {}s more (http://{})",
                        a.linger, a.http_addr
                    );
                }
            }
            Some(t) if t.elapsed() >= Duration::from_secs(a.linger) => break,
            _ => {}
        }
        if service.is_finished() {
            break;
        }
    }
    println!();
    stop.store(true, Ordering::Release);
    let _ = stop_tx.send(());
    let served = runtime.block_on(service);
    let sim = producer
        .join()
        .map_err(|_| anyhow::anyhow!("the producer thread panicked"))??;
    let alerts = alerts.finish();
    served??;
    summary(&sim, &alerts, &shared)
}

fn create_topics(brokers: &str, names: &[&String]) -> anyhow::Result<()> {
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|n| NewTopic::new(n, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    let rt = crate::service_cli::runtime()?;
    let results = rt.block_on(admin.create_topics(&topics, &AdminOptions::new()))?;
    for r in results {
        if let Err((topic, e)) = r {
            anyhow::bail!("cannot create topic {topic}: {e}");
        }
    }
    Ok(())
}

/// Sends the simulation at `rate`, a label after each fraud, and two
/// malformed messages on the way.
fn produce(
    sim: &Simulation,
    brokers: &str,
    input: &str,
    labels: &str,
    rate: u64,
    sent: &AtomicU64,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    let n = sim.transactions.len();
    let mut tx = Transaction::default();
    let started = Instant::now();
    for i in 0..n {
        if stop.load(Ordering::Acquire) {
            break;
        }
        sim.fill(i, &mut tx);
        let fraud = tx.is_fraud == Some(true);
        tx.is_fraud = None;
        let payload = tx.to_json().to_string();
        crate::service_cli::send(&producer, input, &tx.card_id, payload.as_bytes())?;
        if fraud {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let label = Label {
                transaction_id: tx.transaction_id.clone(),
                card_id: tx.card_id.clone(),
                merchant_id: tx.merchant_id.clone(),
                is_fraud: true,
                reported_at: now,
                transaction_time: Some(tx.time.utc),
            };
            crate::service_cli::send(
                &producer,
                labels,
                &tx.card_id,
                label.to_json().to_string().as_bytes(),
            )?;
        }
        if i == n / 3 {
            crate::service_cli::send(&producer, input, "", b"{\"transaction_id\": oops")?;
            sent.fetch_add(1, Ordering::AcqRel);
        }
        if i == 2 * n / 3 {
            let missing = br#"{"transaction_id":"x1","timestamp":"2018-04-20T10:00:00Z","card_id":"1","merchant_id":"T1"}"#;
            crate::service_cli::send(&producer, input, "1", missing)?;
            sent.fetch_add(1, Ordering::AcqRel);
        }
        sent.fetch_add(1, Ordering::AcqRel);
        let due = Duration::from_secs_f64((i + 1) as f64 / rate.max(1) as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// Reads the alert topic in the background.
struct AlertReader {
    thread: std::thread::JoinHandle<HashMap<String, serde_json::Value>>,
}

impl AlertReader {
    fn start(brokers: &str, topic: &str, stop: Arc<AtomicBool>) -> anyhow::Result<AlertReader> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("{topic}-reader"))
            .set("enable.auto.commit", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let thread = std::thread::spawn(move || {
            let mut alerts = HashMap::new();
            let mut idle_since: Option<Instant> = None;
            loop {
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => {
                        idle_since = None;
                        if let Some(v) = m
                            .payload()
                            .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                        {
                            let id = v["transaction_id"].as_str().unwrap_or_default().to_string();
                            alerts.insert(id, v);
                        }
                    }
                    _ => {
                        // After the stop, read on until the topic is quiet.
                        if stop.load(Ordering::Acquire) {
                            let t = *idle_since.get_or_insert_with(Instant::now);
                            if t.elapsed() > Duration::from_secs(1) {
                                return alerts;
                            }
                        }
                    }
                }
            }
        });
        Ok(AlertReader { thread })
    }

    fn finish(self) -> HashMap<String, serde_json::Value> {
        self.thread.join().unwrap_or_default()
    }
}

fn summary(
    sim: &Simulation,
    alerts: &HashMap<String, serde_json::Value>,
    shared: &ServiceState,
) -> anyhow::Result<()> {
    let mut frauds = [0u64; 6];
    let mut caught = [0u64; 6];
    let mut example: Option<&serde_json::Value> = None;
    let mut tx = Transaction::default();
    for (i, t) in sim.transactions.iter().enumerate() {
        let k = t.scenario as usize;
        frauds[k] += 1;
        sim.fill(i, &mut tx);
        if let Some(a) = alerts.get(&tx.transaction_id) {
            caught[k] += 1;
            if k == 3 && example.is_none() {
                example = Some(a);
            }
        }
    }
    let mut out = std::io::stdout().lock();
    let total: u64 = caught.iter().sum();
    let true_alerts: u64 = caught[1..].iter().sum();
    let l = shared.latency_summary();
    writeln!(
        out,
        "{} alerts on the alert topic; {:.1}% of them fraud. Scoring per transaction: p50 {:.1} µs, p99 {:.1} µs.",
        alerts.len(),
        100.0 * true_alerts as f64 / total.max(1) as f64,
        l.scoring_p50_us,
        l.scoring_p99_us,
    )?;
    writeln!(
        out,
        "Frauds alerted, by scenario (terminal frauds in their first week are unknowable: labels arrive after 7 days):"
    )?;
    for k in 1..=5 {
        if frauds[k] > 0 {
            writeln!(
                out,
                "  {:<32} {:>5} of {:>5} ({:.0}%)",
                SCENARIOS[k],
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
    if let Some(e) = example {
        writeln!(
            out,
            "\nAn alert from the topic, with its reasons:\n{}",
            serde_json::to_string_pretty(e)?
        )?;
    }
    writeln!(
        out,
        "\nNext: run `peregrine serve` next to your Kafka (see README), or train your own model: \
         `peregrine simulate --out data.csv.gz`, then `peregrine train ...`, `peregrine eval ...`.\n\
         To review alerts one by one and feed decisions back as labels, add an alert store: \
         `scripts/pg-up` starts a PostgreSQL and prints its URL; then `peregrine serve --postgres URL` \
         (or `peregrine sink --alert-topic fraud-alerts --postgres URL` beside it) on a real broker \
         (README, \"The alert store and analyst decisions\")."
    )?;
    Ok(())
}
