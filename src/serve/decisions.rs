//! The analysts' desk: the alert store, and the label producer that turns
//! a decision into a message on the label topic, so that the merchant risk
//! windows learn from it as from any other label.

use super::kafka;
use crate::alerts::store::{AlertQuery, AlertStore, Decided, Outcome, StoreError};
use crate::config::Settings;
use crate::ingest::decode::now_utc;
use crate::ingest::label::Label;
use crate::metrics::Metrics;
use crate::telemetry::log;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

pub struct AlertDesk {
    store: Arc<AlertStore>,
    /// The label producer and topic; none without Kafka.
    labels: Option<(FutureProducer, String)>,
}

/// What became of a decision's label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelResult {
    Published,
    /// This outcome's label was published before: not sent twice, so a
    /// decision posted again does not count its fraud twice.
    Unchanged,
    /// The service runs without Kafka.
    Disabled,
}

impl LabelResult {
    pub fn as_str(self) -> &'static str {
        match self {
            LabelResult::Published => "published",
            LabelResult::Unchanged => "unchanged",
            LabelResult::Disabled => "disabled",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecisionError {
    #[error("no alert {0} in the alert store")]
    NotFound(String),
    #[error("the alert store is unavailable: {0}")]
    Store(#[from] StoreError),
    #[error(
        "the decision is recorded, but its label could not be published to {topic} ({why}); \
         post the decision again to publish it"
    )]
    Label { topic: String, why: String },
}

impl AlertDesk {
    /// Opens the store (migrating its schema) and, with Kafka, the label producer.
    pub async fn open(settings: &Settings, url: &str) -> anyhow::Result<AlertDesk> {
        let store = AlertStore::open(url).await?;
        let labels = if settings.kafka_enabled {
            Some((
                kafka::label_producer(settings)?,
                settings.label_topic.clone(),
            ))
        } else {
            None
        };
        Ok(AlertDesk {
            store: Arc::new(store),
            labels,
        })
    }

    pub fn store(&self) -> Arc<AlertStore> {
        self.store.clone()
    }

    pub async fn alerts(&self, q: &AlertQuery) -> Result<Value, StoreError> {
        self.store.find(q).await
    }

    /// Records the decision and claims its label in one statement, then
    /// publishes the label unless this outcome's was claimed before: two
    /// posts at once, or fraud → legit → fraud, publish a fraud once. The
    /// label's time is the transaction's, so the merchant windows count it
    /// where the fraud happened; it is reported now. The publication runs
    /// in a task of its own, so a client that hangs up does not cut it short.
    pub async fn decide(
        &self,
        alert_id: &str,
        outcome: Outcome,
        analyst: &str,
        note: Option<&str>,
        metrics: &Metrics,
    ) -> Result<LabelResult, DecisionError> {
        let decided = self
            .store
            .decide(alert_id, &outcome, analyst, note)
            .await?
            .ok_or_else(|| DecisionError::NotFound(alert_id.to_string()))?;
        let result = match (&self.labels, decided.claimed_before) {
            (None, _) => Ok(LabelResult::Disabled),
            (Some(_), true) => Ok(LabelResult::Unchanged),
            (Some((producer, topic)), false) => {
                let (producer, topic) = (producer.clone(), topic.clone());
                let (store, id) = (self.store.clone(), alert_id.to_string());
                let o = outcome;
                tokio::spawn(
                    async move { publish(&store, &producer, &topic, &id, &o, &decided).await },
                )
                .await
                .unwrap_or_else(|e| {
                    Err(DecisionError::Label {
                        topic: String::new(),
                        why: format!("the publishing task failed: {e}"),
                    })
                })
            }
        };
        let label = match &result {
            Ok(r) => r.as_str(),
            Err(_) => "failed",
        };
        metrics
            .decisions
            .with_label_values(&[outcome.as_str(), label])
            .inc();
        result
    }
}

/// Publishes a claimed label, and marks it published; gives the claim back
/// if it could not be sent, so that posting the decision again sends it.
async fn publish(
    store: &AlertStore,
    producer: &FutureProducer,
    topic: &str,
    alert_id: &str,
    outcome: &Outcome,
    decided: &Decided,
) -> Result<LabelResult, DecisionError> {
    let label = Label {
        transaction_id: decided.transaction_id.clone(),
        card_id: decided.card_id.clone(),
        merchant_id: decided.merchant_id.clone(),
        is_fraud: *outcome == Outcome::Fraud,
        reported_at: now_utc().max(decided.event_time),
        transaction_time: Some(decided.event_time),
    };
    let payload = label.to_json().to_string();
    // Keyed by card, as the label topic's other producers key it.
    let record = FutureRecord::to(topic)
        .key(decided.card_id.as_str())
        .payload(payload.as_str());
    if let Err((e, _)) = producer.send(record, Duration::from_secs(10)).await {
        log(
            "WARN",
            format_args!("decision on {alert_id}: its label was not published to {topic}: {e}"),
        );
        if let Err(e) = store.release_claim(alert_id, outcome).await {
            log(
                "ERROR",
                format_args!("decision on {alert_id}: the label's claim stays: {e}"),
            );
        }
        return Err(DecisionError::Label {
            topic: topic.to_string(),
            why: "the label topic did not take it in time".into(),
        });
    }
    if let Err(e) = store.label_published(alert_id).await {
        // Published: only the time of it is missing.
        log(
            "WARN",
            format_args!("decision on {alert_id}: label published, not marked: {e}"),
        );
    }
    Ok(LabelResult::Published)
}
