//! Alerts: what a scored transaction turns into when it needs attention.

pub mod store;

use crate::features::store::key_hash;
use crate::ingest::Transaction;
use crate::ingest::time::format_utc;
use crate::model::scorer::{Decision, Reasons, Score};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Alert<'a> {
    pub alert_id: String,
    pub transaction_id: &'a str,
    pub card_id: &'a str,
    pub merchant_id: &'a str,
    pub amount: f64,
    pub event_time: String,
    pub score: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<f64>,
    pub decision: Decision,
    pub model_version: &'a str,
    pub reasons: &'a Reasons,
    pub produced_at: String,
}

/// The alert id depends only on the transaction id, so scoring the same
/// transaction again (a replay, a restart) gives the same id and consumers
/// can drop the duplicate.
pub fn alert_id(transaction_id: &str) -> String {
    format!("al-{:016x}", key_hash(transaction_id))
}

pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut s = String::with_capacity(20);
    format_utc(now, &mut s);
    s
}

impl<'a> Alert<'a> {
    pub fn new(
        tx: &'a Transaction,
        score: &'a Score,
        model_version: &'a str,
        produced_at: String,
    ) -> Alert<'a> {
        let mut event_time = String::with_capacity(20);
        format_utc(tx.time.utc, &mut event_time);
        Alert {
            alert_id: alert_id(&tx.transaction_id),
            transaction_id: &tx.transaction_id,
            card_id: &tx.card_id,
            merchant_id: &tx.merchant_id,
            amount: tx.amount,
            event_time,
            score: score.score,
            anomaly: score.anomaly,
            decision: score.decision,
            model_version,
            reasons: &score.reasons,
            produced_at,
        }
    }
}
