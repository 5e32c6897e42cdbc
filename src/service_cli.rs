//! The service's commands: `serve`, and the Kafka tools `produce` and
//! `consume` that load a file into a topic and read a topic back.

use anyhow::{Context, bail};
use clap::Args;
use peregrine::config::{ENV_CONFIG, Settings};
use peregrine::ingest::label::Label;
use peregrine::ingest::{Transaction, TransactionReader};
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Args, Default)]
pub struct ServeArgs {
    /// Settings file (TOML). Also PEREGRINE_CONFIG. Environment variables
    /// PEREGRINE_<KEY> override the file; these flags override both.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Kafka bootstrap servers, host:port[,host:port…].
    #[arg(long)]
    pub brokers: Option<String>,
    /// Consumer group of the instances.
    #[arg(long)]
    pub group_id: Option<String>,
    /// Transactions, keyed by card_id.
    #[arg(long)]
    pub input_topic: Option<String>,
    /// Where alerts go, keyed by card_id.
    #[arg(long)]
    pub alert_topic: Option<String>,
    /// Fraud labels: {transaction_id, card_id, merchant_id, is_fraud, reported_at}.
    #[arg(long)]
    pub label_topic: Option<String>,
    /// Dead letters: the original bytes, with the reason in headers.
    #[arg(long)]
    pub dlq_topic: Option<String>,
    /// Every scored transaction's score and decision (off unless set).
    #[arg(long)]
    pub score_topic: Option<String>,
    /// Address of the HTTP API.
    #[arg(long)]
    pub http_addr: Option<String>,
    /// Model file (default: the built-in model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Rules file (default: the built-in rules with the built-in model).
    #[arg(long)]
    pub rules: Option<PathBuf>,
    #[arg(long)]
    pub review_threshold: Option<f64>,
    #[arg(long)]
    pub block_threshold: Option<f64>,
    /// Seconds allowed to drain and commit after SIGTERM.
    #[arg(long)]
    pub shutdown_timeout: Option<u64>,
    /// Serve the HTTP API alone, without Kafka.
    #[arg(long)]
    pub no_kafka: bool,
    /// The alert store, a PostgreSQL connection string: also runs the alert
    /// sink and the /v1/alerts routes. Also PEREGRINE_POSTGRES, which keeps
    /// a password out of the process list.
    #[arg(long)]
    pub postgres: Option<String>,
    /// A librdkafka property, KEY=VALUE, repeatable (e.g. -X security.protocol=SASL_SSL).
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    pub librdkafka: Vec<String>,
}

fn key_value(raw: &str) -> anyhow::Result<(String, String)> {
    match raw.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => bail!("-X {raw:?}: expected KEY=VALUE"),
    }
}

impl ServeArgs {
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let file = self
            .config
            .clone()
            .or_else(|| std::env::var_os(ENV_CONFIG).map(PathBuf::from));
        let mut s = Settings::load(file.as_deref(), std::env::vars())?;
        let set = |dst: &mut String, v: &Option<String>| {
            if let Some(v) = v {
                *dst = v.clone();
            }
        };
        set(&mut s.brokers, &self.brokers);
        set(&mut s.group_id, &self.group_id);
        set(&mut s.input_topic, &self.input_topic);
        set(&mut s.alert_topic, &self.alert_topic);
        set(&mut s.label_topic, &self.label_topic);
        set(&mut s.dlq_topic, &self.dlq_topic);
        set(&mut s.score_topic, &self.score_topic);
        set(&mut s.http_addr, &self.http_addr);
        if self.model.is_some() {
            s.model = self.model.clone();
        }
        if self.rules.is_some() {
            s.rules = self.rules.clone();
        }
        if self.review_threshold.is_some() {
            s.review_threshold = self.review_threshold;
        }
        if self.block_threshold.is_some() {
            s.block_threshold = self.block_threshold;
        }
        if let Some(t) = self.shutdown_timeout {
            s.shutdown_timeout_secs = t;
        }
        if self.no_kafka {
            s.kafka_enabled = false;
        }
        if self.postgres.is_some() {
            s.postgres = self.postgres.clone();
        }
        for raw in &self.librdkafka {
            let (k, v) = key_value(raw)?;
            s.librdkafka.insert(k, v);
        }
        s.validate()?;
        Ok(s)
    }
}

#[derive(Args)]
pub struct SinkArgs {
    /// Settings file (TOML), as for `serve`. Also PEREGRINE_CONFIG.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers, host:port[,host:port…].
    #[arg(long)]
    brokers: Option<String>,
    /// The alert topic to store.
    #[arg(long)]
    alert_topic: Option<String>,
    /// The alert store, a PostgreSQL connection string. Also PEREGRINE_POSTGRES.
    #[arg(long)]
    postgres: Option<String>,
    /// Consumer group of the sinks (default peregrine-alert-sink).
    #[arg(long)]
    group_id: Option<String>,
    /// Serve GET /metrics (Prometheus) and GET /healthz on this address.
    #[arg(long)]
    http_addr: Option<String>,
    /// A librdkafka property, KEY=VALUE, repeatable.
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    librdkafka: Vec<String>,
}

/// `peregrine sink`: the alert topic into the alert store until SIGTERM.
pub fn sink(a: SinkArgs) -> anyhow::Result<()> {
    let serve = ServeArgs {
        config: a.config,
        brokers: a.brokers,
        alert_topic: a.alert_topic,
        postgres: a.postgres,
        librdkafka: a.librdkafka,
        ..ServeArgs::default()
    };
    let mut settings = serve.settings()?;
    if let Some(g) = a.group_id {
        settings.sink_group_id = g;
    }
    settings.validate()?;
    let Some(url) = settings.postgres.clone() else {
        bail!("no alert store: give --postgres URL or set PEREGRINE_POSTGRES");
    };
    runtime()?.block_on(async {
        let store = peregrine::alerts::store::AlertStore::open(&url)
            .await
            .context("cannot open the alert store")?;
        // The sink's own metrics only, not the scoring service's.
        let registry = prometheus::Registry::new();
        let metrics = peregrine::metrics::SinkMetrics::register(&registry);
        if let Some(addr) = &a.http_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            let r = registry.clone();
            let app = axum::Router::new()
                .route(
                    "/metrics",
                    axum::routing::get(move || std::future::ready(peregrine::metrics::render(&r))),
                )
                .route(
                    "/healthz",
                    axum::routing::get(|| std::future::ready("alive")),
                );
            tokio::spawn(async move { axum::serve(listener, app).await });
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            peregrine::serve::termination().await;
            let _ = stop_tx.send(true);
        });
        peregrine::serve::sink::run(&settings, std::sync::Arc::new(store), &metrics, stop_rx).await
    })
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

pub fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let settings = a.settings()?;
    let runtime = runtime()?;
    let result = runtime.block_on(peregrine::serve::run(
        settings,
        peregrine::serve::termination(),
    ));
    // A thread still inside librdkafka (a consumer's close waiting for a
    // broker that is gone) must not hold the exit past the drain deadline,
    // which has passed by now: dropping the runtime would wait for it.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

#[derive(Args)]
pub struct ProduceArgs {
    /// Transactions (CSV or JSON Lines, optionally .gz), sent in file order as JSON keyed by card_id.
    #[arg(long, required_unless_present = "raw")]
    data: Option<PathBuf>,
    /// Send each line of this file as it is, valid or not (re-driving dead
    /// letters, testing); the key is its card_id when it has one.
    #[arg(long, conflicts_with = "data")]
    raw: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long, default_value = "transactions")]
    topic: String,
    /// Also send a label message for each fraud of the file to this topic.
    #[arg(long)]
    label_topic: Option<String>,
    /// Days after the transaction its label reports (`reported_at`). With
    /// `--live` a label is reported when it is sent: a report days ahead
    /// of the clock would be refused as a future timestamp.
    #[arg(long, default_value_t = 7)]
    label_delay_days: i64,
    /// Transactions per second; 0 sends as fast as the broker takes them.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Live traffic: each transaction's timestamp becomes the time it is
    /// sent, so event time runs with the wall clock (the file's order and
    /// `--rate` give the pacing), as a processor's live stream does.
    #[arg(long)]
    live: bool,
    /// Skip this many transactions of the file first.
    #[arg(long, default_value_t = 0)]
    skip: u64,
    /// Send at most this many.
    #[arg(long)]
    limit: Option<u64>,
    /// A librdkafka property, KEY=VALUE, repeatable.
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    librdkafka: Vec<String>,
}

fn client(brokers: &str, raw: &[String]) -> anyhow::Result<ClientConfig> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for r in raw {
        let (k, v) = key_value(r)?;
        c.set(k, v);
    }
    Ok(c)
}

pub fn produce(a: ProduceArgs) -> anyhow::Result<()> {
    let producer: ThreadedProducer<DefaultProducerContext> = client(&a.brokers, &a.librdkafka)?
        .set("enable.idempotence", "true")
        .set("linger.ms", "10")
        .set("message.timeout.ms", "60000")
        .create()?;
    if let Some(raw) = &a.raw {
        return produce_raw(&producer, &a.topic, raw);
    }
    let data = a.data.as_deref().unwrap_or(std::path::Path::new("-"));
    let mut reader =
        TransactionReader::open(data).with_context(|| format!("cannot read {}", data.display()))?;
    let mut tx = Transaction::default();
    if a.live {
        // Connected before the first timestamp is taken: live records
        // otherwise wait in the queue for the connection, and that start-up
        // (about half a second) lands in the latencies measured downstream.
        producer
            .client()
            .fetch_metadata(Some(&a.topic), Duration::from_secs(10))
            .with_context(|| format!("cannot read the metadata of {}", a.topic))?;
    }
    let started = Instant::now();
    let (mut n, mut labels, mut seen) = (0u64, 0u64, 0u64);
    let limit = a.limit.unwrap_or(u64::MAX);
    while n < limit && reader.next_into(&mut tx)? {
        seen += 1;
        if seen <= a.skip {
            continue;
        }
        if a.live {
            tx.time = peregrine::ingest::EventTime {
                utc: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64),
                offset: 0,
            };
        }
        let fraud = tx.is_fraud == Some(true);
        tx.is_fraud = None;
        let payload = tx.to_json().to_string();
        send(&producer, &a.topic, &tx.card_id, payload.as_bytes())?;
        n += 1;
        if let (Some(topic), true) = (&a.label_topic, fraud) {
            let label = Label {
                transaction_id: tx.transaction_id.clone(),
                card_id: tx.card_id.clone(),
                merchant_id: tx.merchant_id.clone(),
                is_fraud: true,
                reported_at: if a.live {
                    tx.time.utc
                } else {
                    tx.time.utc + a.label_delay_days * 86_400
                },
                transaction_time: Some(tx.time.utc),
            };
            send(
                &producer,
                topic,
                &tx.card_id,
                label.to_json().to_string().as_bytes(),
            )?;
            labels += 1;
        }
        if a.rate > 0 {
            let due = Duration::from_secs_f64(n as f64 / a.rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    producer.flush(Duration::from_secs(60))?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "sent {n} transactions and {labels} labels to {} in {secs:.1}s ({:.0}/s)",
        a.topic,
        n as f64 / secs.max(1e-9)
    );
    Ok(())
}

fn produce_raw(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let text = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut n = 0;
    for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let key = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|v| match v.get("card_id")? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .unwrap_or_default();
        send(producer, topic, &key, line)?;
        n += 1;
    }
    producer.flush(Duration::from_secs(60))?;
    eprintln!("sent {n} raw messages to {topic}");
    Ok(())
}

pub(crate) fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: &str,
    payload: &[u8],
) -> anyhow::Result<()> {
    let mut record = BaseRecord::to(topic).key(key).payload(payload);
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                r,
            )) => {
                record = r;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((e, _)) => bail!("cannot send to {topic}: {e}"),
        }
    }
}

#[derive(Args)]
pub struct ConsumeArgs {
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// The topic to read, every partition from the start; nothing is committed.
    #[arg(long)]
    topic: String,
    /// Stop when nothing arrived for this many milliseconds.
    #[arg(long, default_value_t = 5000)]
    idle_ms: u64,
    /// Stop after this many messages.
    #[arg(long)]
    max: Option<u64>,
    /// Consume and drop: print only the count and the rate.
    #[arg(long)]
    count_only: bool,
    /// Read from the end, drop what is read, and print how long messages
    /// took from their timestamps to this consumer (p50, p99 and max, in
    /// ms): a broker's own share of an end-to-end latency. Meant for an
    /// empty topic that a live producer then fills.
    #[arg(long, conflicts_with = "count_only")]
    latency: bool,
    /// Print this consumer group's committed offsets and lag per partition instead.
    #[arg(long)]
    group_offsets: Option<String>,
    /// A librdkafka property, KEY=VALUE, repeatable.
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    librdkafka: Vec<String>,
}

/// Prints each message as a JSON line: partition, offset, key, headers and
/// the payload (as JSON when it is JSON).
pub fn consume(a: ConsumeArgs) -> anyhow::Result<()> {
    let consumer: BaseConsumer = client(&a.brokers, &a.librdkafka)?
        .set(
            "group.id",
            format!("peregrine-consume-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .create()?;
    let md = consumer
        .fetch_metadata(Some(&a.topic), Duration::from_secs(10))
        .with_context(|| format!("cannot read the metadata of {}", a.topic))?;
    let partitions: Vec<i32> = md
        .topics()
        .first()
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        bail!("topic {} has no partitions (does it exist?)", a.topic);
    }
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        // The end as it is now: `Offset::End` would be resolved at the first
        // fetch, after records sent meanwhile.
        let start = if a.latency {
            let (_, high) = consumer.fetch_watermarks(&a.topic, *p, Duration::from_secs(10))?;
            Offset::Offset(high)
        } else {
            Offset::Beginning
        };
        tpl.add_partition_offset(&a.topic, *p, start)?;
    }
    if let Some(group) = &a.group_offsets {
        let c: BaseConsumer = client(&a.brokers, &a.librdkafka)?
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()?;
        let committed = c.committed_offsets(tpl, Duration::from_secs(10))?;
        for e in committed.elements() {
            let (_, high) = c.fetch_watermarks(&a.topic, e.partition(), Duration::from_secs(10))?;
            let offset = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            let line = serde_json::json!({
                "partition": e.partition(),
                "committed": offset,
                "high_watermark": high,
                "lag": offset.map_or(high, |o| high - o),
            });
            println!("{line}");
        }
        return Ok(());
    }
    consumer.assign(&tpl)?;
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let max = a.max.unwrap_or(u64::MAX);
    let idle = Duration::from_millis(a.idle_ms);
    let mut n = 0u64;
    let mut lag = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000, 2)?;
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    while n < max && last.elapsed() < idle {
        let Some(r) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = r?;
        last = Instant::now();
        first.get_or_insert(last);
        n += 1;
        if a.latency {
            if let Some(ms) = m.timestamp().to_millis() {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                // A clock step back reads as 0, not as a refused value.
                lag.saturating_record((now - ms).max(0) as u64);
            }
            continue;
        }
        if a.count_only {
            continue;
        }
        let mut headers = serde_json::Map::new();
        if let Some(h) = m.headers() {
            for hd in h.iter() {
                let v = hd.value.map(|v| String::from_utf8_lossy(v).into_owned());
                headers.insert(hd.key.to_string(), v.into());
            }
        }
        let payload = m.payload().unwrap_or_default();
        let payload = serde_json::from_slice::<serde_json::Value>(payload)
            .unwrap_or_else(|_| String::from_utf8_lossy(payload).into_owned().into());
        let line = serde_json::json!({
            "partition": m.partition(),
            "offset": m.offset(),
            "key": m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            "headers": headers,
            "payload": payload,
        });
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    let secs = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    let mut summary = serde_json::json!({
        "topic": a.topic,
        "messages": n,
        "seconds": secs,
        "per_second": if secs > 0.0 { n as f64 / secs } else { 0.0 },
    });
    if a.latency {
        summary["timestamp_to_read_ms"] = serde_json::json!({
            "p50": lag.value_at_quantile(0.5),
            "p99": lag.value_at_quantile(0.99),
            "max": lag.max(),
        });
    }
    if a.count_only || a.latency {
        writeln!(out, "{summary}")?;
    } else {
        eprintln!("{summary}");
    }
    Ok(())
}
