//! Prometheus metrics, in a registry owned by the service. Every label has a
//! bounded set of values: decisions, rule names from the rules file,
//! dead-letter reasons, partitions, routes and status codes.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub consumed: IntCounter,
    pub scored: IntCounter,
    pub late: IntCounter,
    pub alerts: IntCounterVec,
    pub rule_alerts: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub labels: IntCounterVec,
    pub score: Histogram,
    pub scoring_seconds: Histogram,
    pub event_to_alert_seconds: Histogram,
    pub consumer_lag: IntGaugeVec,
    pub partitions: IntGauge,
    pub restore_records: IntCounterVec,
    pub records_read: IntCounterVec,
    pub checkpoints: IntCounterVec,
    pub restoring: IntGauge,
    pub tasks: IntGaugeVec,
    pub merchant_duplicates: IntCounter,
    pub entity_rows: IntCounterVec,
    pub entity_wait_timeouts: IntCounter,
    pub merchant_wait_seconds: Histogram,
    pub ready: IntGauge,
    pub model_info: IntGaugeVec,
    pub reloads: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub http_seconds: HistogramVec,
    pub cards: IntGauge,
    pub merchants: IntGauge,
    pub delivery_retries: IntCounter,
    pub table_wait_timeouts: IntCounter,
    pub redelivered: IntCounter,
    pub fields_ignored: IntCounterVec,
    pub key_mismatch: IntCounter,
    pub card_window_overflows: IntCounter,
    pub duplicates: IntCounter,
    pub partitions_stalled: IntGauge,
    pub http_shed: IntCounterVec,
    pub scores_not_finite: IntCounter,
    pub merchant_future_events: IntCounter,
    pub produce_errors: IntCounterVec,
    pub sink: SinkMetrics,
    pub decisions: IntCounterVec,
}

/// The alert sink's metrics: part of the service's, or alone in a
/// registry of their own for `peregrine sink`.
pub struct SinkMetrics {
    pub alerts: IntCounterVec,
    pub errors: IntCounter,
}

impl SinkMetrics {
    pub fn register(r: &Registry) -> SinkMetrics {
        let m = SinkMetrics {
            alerts: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "peregrine_sink_alerts_total",
                        "Alert-topic messages the alert sink wrote to the alert store: stored (upserted on alert_id) or rejected (kept in alert_rejects with the reason).",
                    ),
                    &["outcome"],
                )
                .expect("valid counter"),
            ),
            errors: register(
                r,
                IntCounter::new(
                    "peregrine_sink_errors_total",
                    "Alert-store writes that failed and were retried; offsets are committed only after a write succeeds.",
                )
                .expect("valid counter"),
            ),
        };
        for o in ["stored", "rejected"] {
            m.alerts.with_label_values(&[o]);
        }
        m
    }
}

/// The text exposition format of a registry.
pub fn render(r: &Registry) -> String {
    let mut buf = Vec::new();
    // Encoding into a Vec fails only on invalid metric families, which
    // registration already rejected.
    let _ = TextEncoder::new().encode(&r.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

/// The optional fields of a transaction: a wrong one is left out and counted.
pub const OPTIONAL_FIELDS: [&str; 7] = [
    "currency", "country", "channel", "mcc", "lat", "lon", "is_fraud",
];

fn register<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique and valid");
    c
}

/// Seconds, from 50 µs to 10 s.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
        1.0, 2.5, 5.0, 10.0,
    ]
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics::register_all();
        m.touch();
        m
    }

    fn register_all() -> Metrics {
        let r = Registry::new();
        let counter = |name: &str, help: &str| {
            register(&r, IntCounter::new(name, help).expect("valid counter"))
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter"),
            )
        };
        let gauge =
            |name: &str, help: &str| register(&r, IntGauge::new(name, help).expect("valid gauge"));
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            register(
                &r,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                    .expect("valid histogram"),
            )
        };
        Metrics {
            consumed: counter(
                "peregrine_transactions_consumed_total",
                "Messages read from the input topic, valid or not.",
            ),
            scored: counter(
                "peregrine_transactions_scored_total",
                "Transactions scored, from Kafka and from the HTTP API.",
            ),
            late: counter(
                "peregrine_transactions_late_total",
                "Transactions later than the allowed lateness: scored, not folded into the state.",
            ),
            alerts: counter_vec(
                "peregrine_alerts_total",
                "Alerts produced, by decision.",
                &["decision"],
            ),
            rule_alerts: counter_vec(
                "peregrine_rule_hits_total",
                "Rules that fired on an alert, by rule name.",
                &["rule"],
            ),
            dead_letters: counter_vec(
                "peregrine_dead_letters_total",
                "Messages sent to the dead-letter topic, by reason.",
                &["reason"],
            ),
            labels: counter_vec(
                "peregrine_labels_total",
                "Fraud labels read from the label topic, by outcome.",
                &["outcome"],
            ),
            score: histogram(
                "peregrine_score",
                "Model scores of scored transactions.",
                (1..=20).map(|i| i as f64 / 20.0).collect(),
            ),
            scoring_seconds: histogram(
                "peregrine_scoring_seconds",
                "Time to compute the features and the score of one transaction.",
                latency_buckets(),
            ),
            event_to_alert_seconds: histogram(
                "peregrine_event_to_alert_seconds",
                "From the input record's timestamp to the broker's acknowledgement of its alert.",
                latency_buckets(),
            ),
            consumer_lag: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "peregrine_consumer_lag",
                        "Messages behind the end of each assigned input partition.",
                    ),
                    &["partition"],
                )
                .expect("valid gauge"),
            ),
            partitions: gauge(
                "peregrine_partitions_assigned",
                "Input partitions assigned to this instance.",
            ),
            restore_records: counter_vec(
                "peregrine_restore_records_total",
                "Records read to restore state on assignment: changelog records, and input \
                 records after the checkpoint folded in without alerts.",
                &["source"],
            ),
            records_read: counter_vec(
                "peregrine_records_read_total",
                "Records read from Kafka, by topic: the input, the labels and every internal topic.",
                &["topic"],
            ),
            checkpoints: counter_vec(
                "peregrine_checkpoints_total",
                "State checkpoints written to a changelog, by store and kind (delta or snapshot).",
                &["store", "kind"],
            ),
            restoring: gauge(
                "peregrine_partitions_restoring",
                "Partitions of this instance restoring their state.",
            ),
            tasks: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "peregrine_partition_tasks",
                        "Partition tasks of this instance, by role and phase.",
                    ),
                    &["role", "phase"],
                )
                .expect("valid gauge"),
            ),
            merchant_duplicates: counter(
                "peregrine_merchant_events_duplicates_total",
                "Merchant events sent again (by a partition's next owner) and skipped.",
            ),
            entity_rows: counter_vec(
                "peregrine_entity_rows_total",
                "Events' rows for entities besides the card, at the entity stage: folded (their \
                 values sent back) or duplicate (sent again after a restart, skipped).",
                &["outcome"],
            ),
            entity_wait_timeouts: counter(
                "peregrine_entity_wait_timeouts_total",
                "Transactions scored without their entities' values, which did not come within \
                 merchant_wait_ms: those features read their `missing` value.",
            ),
            merchant_wait_seconds: histogram(
                "peregrine_merchant_wait_seconds",
                "Time a batch waited for the merchant table to reach its event time.",
                latency_buckets(),
            ),
            ready: gauge("peregrine_ready", "1 when the service is ready to score."),
            model_info: register(
                &r,
                IntGaugeVec::new(
                    Opts::new("peregrine_model_info", "The live model: 1 for its version."),
                    &["version", "algo"],
                )
                .expect("valid gauge"),
            ),
            reloads: counter_vec(
                "peregrine_model_reloads_total",
                "Model reloads, by result.",
                &["result"],
            ),
            http_requests: counter_vec(
                "peregrine_http_requests_total",
                "HTTP requests, by route and status code.",
                &["route", "status"],
            ),
            http_seconds: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "peregrine_http_request_seconds",
                        "HTTP request durations, by route.",
                    )
                    .buckets(latency_buckets()),
                    &["route"],
                )
                .expect("valid histogram"),
            ),
            cards: gauge("peregrine_cards", "Cards with state on this instance."),
            merchants: gauge(
                "peregrine_merchants",
                "Merchants in this instance's merchant table (a copy of all merchants).",
            ),
            delivery_retries: counter(
                "peregrine_delivery_retries_total",
                "Alert, score or dead-letter messages sent again after a failed delivery.",
            ),
            table_wait_timeouts: counter(
                "peregrine_merchant_table_wait_timeouts_total",
                "Batches scored after waiting merchant_wait_ms for the merchant table to reach their event time.",
            ),
            redelivered: counter(
                "peregrine_redelivered_total",
                "Messages read at an offset already taken, or before the one a partition was positioned at; skipped.",
            ),
            fields_ignored: counter_vec(
                "peregrine_fields_ignored_total",
                "Transactions scored without an optional field that was wrong, by field.",
                &["field"],
            ),
            http_shed: counter_vec(
                "peregrine_http_shed_total",
                "HTTP scoring requests refused with 503 under overload: over http_max_concurrency (concurrency) or waiting past http_timeout_ms (timeout).",
                &["reason"],
            ),
            partitions_stalled: gauge(
                "peregrine_partitions_stalled",
                "Running input partitions with records waiting (read and not finished, or on the broker and not read) and none finished for partition_stall_secs; each makes /readyz fail.",
            ),
            duplicates: counter(
                "peregrine_duplicates_total",
                "Transactions whose id was already in their card's state (a second delivery); not scored again and not folded in.",
            ),
            key_mismatch: counter(
                "peregrine_key_mismatch_total",
                "Input messages whose Kafka key is not their card_id: scored, but the card's history may be split across partitions.",
            ),
            card_window_overflows: counter(
                "peregrine_card_window_overflows_total",
                "Events a card's 30-day log dropped while still in its window (a card past 2,048 events in 30 days): its 7- and 30-day windows undercount.",
            ),
            scores_not_finite: counter(
                "peregrine_scores_not_finite_total",
                "Model scores that were not a finite number: decided review, never allow.",
            ),
            merchant_future_events: counter(
                "peregrine_merchant_future_events_total",
                "Merchant events dated beyond max_clock_skew_secs ahead of the clock; left out of the merchant state.",
            ),
            produce_errors: counter_vec(
                "peregrine_produce_errors_total",
                "Produce errors other than a full local queue, by librdkafka error code; the message is retried each second.",
                &["error"],
            ),
            sink: SinkMetrics::register(&r),
            decisions: counter_vec(
                "peregrine_decisions_total",
                "Analyst decisions recorded, by outcome and by what became of their label: published, unchanged (the same outcome's label was already published) or failed (recorded; post again to publish).",
                &["outcome", "label"],
            ),
            registry: r,
        }
    }

    /// Creates the series of every known label value at zero, so that a
    /// dashboard or alert over them has data before the first event.
    fn touch(&self) {
        for d in ["review", "block"] {
            self.alerts.with_label_values(&[d]);
        }
        for r in crate::ingest::decode::DeadReason::ALL {
            self.dead_letters.with_label_values(&[r.as_str()]);
        }
        for f in OPTIONAL_FIELDS {
            self.fields_ignored.with_label_values(&[f]);
        }
        for r in ["ok", "error"] {
            self.reloads.with_label_values(&[r]);
        }
        for r in ["concurrency", "timeout"] {
            self.http_shed.with_label_values(&[r]);
        }
        // The codes an operator acts on (see the runbook); others appear
        // when they happen.
        for e in [
            "MessageSizeTooLarge",
            "UnknownTopicOrPartition",
            "TopicAuthorizationFailed",
        ] {
            self.produce_errors.with_label_values(&[e]);
        }
        for o in [
            "applied",
            "too_old",
            "genuine",
            "invalid",
            "future_timestamp",
        ] {
            self.labels.with_label_values(&[o]);
        }
        for o in ["fraud", "legit"] {
            for l in ["published", "unchanged", "failed"] {
                self.decisions.with_label_values(&[o, l]);
            }
        }
        for s in ["changelog", "input"] {
            self.restore_records.with_label_values(&[s]);
        }
    }

    pub fn set_model(&self, version: &str, algo: &str) {
        self.model_info.reset();
        self.model_info.with_label_values(&[version, algo]).set(1);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
