//! The one place that builds Kafka clients and prepares the topics: the
//! settings every client shares, the producer, the readers outside the
//! group, the admin client, and the internal topics named from the group id.

use crate::config::Settings;
use crate::telemetry::log;
use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;
use std::time::Duration;

/// The topics the service reads and writes. The internal ones are named
/// from the group id, so two deployments with different groups never share
/// state.
#[derive(Debug, Clone)]
pub struct Topics {
    pub input: String,
    pub labels: String,
    pub alerts: String,
    pub dlq: String,
    /// Empty when off.
    pub scores: String,
    /// Card state, one partition per input partition (compacted).
    pub cards_changelog: String,
    /// Each transaction's merchant event and each fraud label, keyed by
    /// merchant: the repartition topic of the merchant stage.
    pub merchant_events: String,
    /// Merchant state, one partition per merchant-events partition
    /// (compacted); every instance materialises all of it.
    pub merchants_changelog: String,
    /// Each event's rows for the entities besides the card a features file
    /// aggregates over, keyed by entity, with every card partition's
    /// progress: the repartition topic of the entity stage (created only
    /// for such a file), with as many partitions as the merchant events.
    pub entity_events: String,
    /// The entity stage's logs, one partition per entity-events partition
    /// (compacted); read only by the partition's owner.
    pub entities_changelog: String,
    /// The entity stage's values of each event, back to the partition
    /// number of the event's input partition.
    pub entity_features: String,
    /// Each fraud label with its card, and every label partition's
    /// progress, sent to every partition (created only for a features file
    /// with label-delayed card windows), as many as the input: each card
    /// task reads its own, and marks the rows of its cards.
    pub card_labels: String,
    /// The consumer groups. Each role has its own, so that each topic's
    /// partitions are spread evenly over the instances: the sticky
    /// assignor balances a member's partitions over all its topics
    /// together, which could leave one instance every input partition.
    pub cards_group: String,
    pub merchants_group: String,
    pub labels_group: String,
    pub entities_group: String,
}

impl Topics {
    pub fn of(s: &Settings) -> Topics {
        let g = &s.group_id;
        Topics {
            input: s.input_topic.clone(),
            labels: s.label_topic.clone(),
            alerts: s.alert_topic.clone(),
            dlq: s.dlq_topic.clone(),
            scores: s.score_topic.clone(),
            cards_changelog: format!("{g}-cards-changelog"),
            merchant_events: format!("{g}-merchant-events"),
            merchants_changelog: format!("{g}-merchants-changelog"),
            entity_events: format!("{g}-entity-events"),
            entities_changelog: format!("{g}-entities-changelog"),
            entity_features: format!("{g}-entity-features"),
            card_labels: format!("{g}-card-labels"),
            cards_group: g.clone(),
            merchants_group: format!("{g}-merchants"),
            labels_group: format!("{g}-labels"),
            entities_group: format!("{g}-entities"),
        }
    }
}

/// The stages a features file needs besides those that always run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stages {
    /// Aggregations over entities besides the card: the entity stage.
    pub entities: bool,
    /// Label-delayed card windows: the labels sent to the card tasks.
    pub card_labels: bool,
}

/// Partition counts, read once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub input_partitions: i32,
    pub label_partitions: i32,
    pub merchant_partitions: i32,
}

/// The settings every client shares: brokers, then the pass-through options.
fn client_config(s: &Settings, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    c.set("bootstrap.servers", &s.brokers);
    for (k, v) in &s.librdkafka {
        c.set(k, v);
    }
    c
}

/// The producer of alerts, dead letters, merchant events and changelogs.
/// A short linger: every hop of the merchant path waits for it. No message
/// timeout, so a broker outage delays output instead of losing it, and a
/// partition's records land in the order sent.
pub fn producer(s: &Settings) -> anyhow::Result<FutureProducer> {
    idempotent_producer(s, "2", "0")
}

/// The producer of analyst decisions' labels. Unlike [`producer`] its
/// messages time out: an analyst waits for the answer, and a decision whose
/// label failed is recorded and can be posted again.
pub fn label_producer(s: &Settings) -> anyhow::Result<FutureProducer> {
    idempotent_producer(s, "0", "10000")
}

fn idempotent_producer(
    s: &Settings,
    linger_ms: &str,
    message_timeout_ms: &str,
) -> anyhow::Result<FutureProducer> {
    let mut c = client_config(s, &[("linger.ms", linger_ms)]);
    // Not overridable: at-least-once and the changelogs' order rest on them.
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", message_timeout_ms);
    Ok(c.create()?)
}

/// Builds a producer and a consumer from the settings once, so that a
/// property librdkafka does not know, or a value it refuses, stops the
/// start with librdkafka's own message instead of a retry loop.
pub fn check_config(s: &Settings) -> anyhow::Result<()> {
    let _: FutureProducer = producer(s).context("the Kafka producer's settings are not valid")?;
    let _: BaseConsumer = group_config(s, &s.group_id)
        .create()
        .context("the Kafka consumer's settings are not valid")?;
    Ok(())
}

/// The group consumer's configuration. Offsets are committed only by the
/// partition tasks, for what they finished: librdkafka's own commits (on
/// close in particular) would commit the fetch position, past events not
/// yet scored.
pub fn group_config(s: &Settings, group_id: &str) -> ClientConfig {
    // Without new data a fetch waits this long on the broker: it bounds the
    // latency a quiet partition adds. Overridable with -X.
    let mut c = client_config(s, &[("fetch.wait.max.ms", "5")]);
    c.set("group.id", group_id)
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000")
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    c
}

/// A consumer outside the groups that reads assigned partitions (restores,
/// the merchant table). It carries a group id only to read that group's
/// committed offsets; it never joins or commits.
pub fn reader(s: &Settings, group_id: &str) -> anyhow::Result<BaseConsumer> {
    Ok(client_config(s, &[("fetch.wait.max.ms", "5")])
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create()?)
}

fn admin(s: &Settings) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    Ok(client_config(s, &[]).create()?)
}

/// A topic's partition count, or an error naming it when it has none.
fn partitions(reader: &BaseConsumer, topic: &str) -> anyhow::Result<i32> {
    let md = reader.fetch_metadata(Some(topic), Duration::from_secs(5))?;
    let t = md
        .topics()
        .first()
        .ok_or_else(|| anyhow::anyhow!("topic {topic} is not in the metadata"))?;
    if let Some(e) = t.error() {
        anyhow::bail!("topic {topic}: {e:?}");
    }
    if t.partitions().is_empty() {
        anyhow::bail!("topic {topic} has no partitions (does it exist?)");
    }
    Ok(t.partitions().len() as i32)
}

/// How long a card partition's input must be kept at the least: the
/// checkpoint interval, then a margin for the time a partition may go
/// unowned (a deploy, a crash) before its next checkpoint.
pub fn min_input_retention(s: &Settings) -> Duration {
    Duration::from_secs(2 * s.checkpoint_interval_secs + 3600)
}

/// Reads the input and label topics' partition counts, creates the
/// internal topics that are missing and checks those present, and reports
/// an input retention too short for a safe restore. Retries while the
/// broker is down or a topic is missing, until `stop`.
pub async fn prepare(
    s: &Settings,
    topics: &Topics,
    stages: Stages,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<Layout>> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = {
            let (s, topics) = (s.clone(), topics.clone());
            tokio::task::spawn_blocking(move || layout(&s, &topics)).await?
        };
        match attempt {
            Ok(layout) => {
                ensure_internal(s, topics, layout, stages).await?;
                // Reported, not waited for: a broker that does not answer
                // DescribeConfigs must not hold up the start.
                let (s, topics) = (s.clone(), topics.clone());
                tokio::spawn(async move { check_retention(&s, &topics).await });
                return Ok(Some(layout));
            }
            Err(e) => log(
                "WARN",
                format_args!("cannot read the topics yet: {e:#}; retrying in {backoff:?}"),
            ),
        }
        let mut stop = stop.clone();
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ok(None),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

fn layout(s: &Settings, topics: &Topics) -> anyhow::Result<Layout> {
    let reader = reader(s, &topics.cards_group)?;
    let input_partitions = partitions(&reader, &topics.input)?;
    let label_partitions = partitions(&reader, &topics.labels)?;
    let merchant_partitions = match s.merchant_partitions {
        0 => input_partitions,
        n => n as i32,
    };
    Ok(Layout {
        input_partitions,
        label_partitions,
        merchant_partitions,
    })
}

/// Creates the internal topics that do not exist, then checks every one's
/// partition count: state partitioned one way cannot be read another way.
async fn ensure_internal(
    s: &Settings,
    topics: &Topics,
    layout: Layout,
    stages: Stages,
) -> anyhow::Result<()> {
    let mut wanted = vec![
        (
            topics.cards_changelog.clone(),
            layout.input_partitions,
            true,
        ),
        (
            topics.merchant_events.clone(),
            layout.merchant_partitions,
            false,
        ),
        (
            topics.merchants_changelog.clone(),
            layout.merchant_partitions,
            true,
        ),
    ];
    if stages.card_labels {
        wanted.push((topics.card_labels.clone(), layout.input_partitions, false));
    }
    if stages.entities {
        wanted.extend([
            (
                topics.entity_events.clone(),
                layout.merchant_partitions,
                false,
            ),
            (
                topics.entities_changelog.clone(),
                layout.merchant_partitions,
                true,
            ),
            (
                topics.entity_features.clone(),
                layout.input_partitions,
                false,
            ),
        ]);
    }
    let missing: Vec<(String, i32, bool)> = {
        let (s, group, wanted) = (s.clone(), topics.cards_group.clone(), wanted.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let reader = reader(&s, &group)?;
            Ok(wanted
                .into_iter()
                .filter(|(name, _, _)| partitions(&reader, name).is_err())
                .collect())
        })
        .await??
    };
    if !missing.is_empty() {
        let admin = admin(s)?;
        let new: Vec<NewTopic> = missing
            .iter()
            .map(|(name, n, compacted)| {
                let policy = if *compacted { "compact" } else { "delete" };
                NewTopic::new(name, *n, TopicReplication::Fixed(-1)).set("cleanup.policy", policy)
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for r in admin.create_topics(&new, &opts).await? {
            match r {
                Ok(name) => log("INFO", format_args!("created internal topic {name}")),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, e)) => anyhow::bail!("cannot create internal topic {name}: {e}"),
            }
        }
    }
    let (s, group) = (s.clone(), topics.cards_group.clone());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let reader = reader(&s, &group)?;
        for (name, want, _) in wanted {
            // A topic just created may take a moment to appear in the metadata.
            let mut found = partitions(&reader, &name);
            for _ in 0..50 {
                if found.is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
                found = partitions(&reader, &name);
            }
            let n = found?;
            if n != want {
                anyhow::bail!(
                    "internal topic {name} has {n} partitions, but this layout needs {want}: \
                     its state is partitioned for another layout. Delete the group's internal \
                     topics (their state is rebuilt from the input) or use a new group_id"
                );
            }
        }
        Ok(())
    })
    .await?
}

/// Logs whether the input topic keeps records long enough for a restore:
/// a card partition replays its input from its last checkpoint.
async fn check_retention(s: &Settings, topics: &Topics) {
    let need = min_input_retention(s);
    let result = async {
        let admin = admin(s)?;
        let spec = ResourceSpecifier::Topic(&topics.input);
        let res = admin
            .describe_configs(
                [&spec],
                &AdminOptions::new().request_timeout(Some(Duration::from_secs(5))),
            )
            .await?;
        let value = res
            .first()
            .and_then(|r| r.as_ref().ok())
            .and_then(|r| r.get("retention.ms"))
            .and_then(|e| e.value.clone());
        anyhow::Ok(value)
    }
    .await;
    match result {
        Ok(Some(v)) => match v.parse::<i64>() {
            Ok(ms) if ms >= 0 && (ms as u128) < need.as_millis() => log(
                "ERROR",
                format_args!(
                    "input topic {} keeps records {ms} ms (retention.ms), less than the {} s a \
                     restore needs (2 × checkpoint_interval_secs + 1 h): a partition unowned for \
                     longer than that loses the transactions since its last checkpoint",
                    topics.input,
                    need.as_secs()
                ),
            ),
            Ok(ms) => log(
                "INFO",
                format_args!(
                    "input topic {} retention.ms {ms}: enough for a restore (needs {} s)",
                    topics.input,
                    need.as_secs()
                ),
            ),
            Err(_) => log(
                "WARN",
                format_args!(
                    "input topic {}: retention.ms {v:?} is not a number",
                    topics.input
                ),
            ),
        },
        Ok(None) => log(
            "INFO",
            format_args!(
                "input topic {}: retention.ms is not set on the topic, so the broker's default \
                 applies (Kafka's is 7 days); a restore needs {} s",
                topics.input,
                need.as_secs()
            ),
        ),
        Err(e) => log(
            "WARN",
            format_args!(
                "cannot read the input topic's retention ({e:#}); a restore needs {} s",
                need.as_secs()
            ),
        ),
    }
}
