//! The alert store: every alert in PostgreSQL, with the analyst's decision
//! on it, for the review queue, the dashboard's tables and the decisions
//! route. The schema is the store's own: [`MIGRATIONS`] creates and
//! migrates it, once per version, whoever connects first.
//!
//! Writes are single statements, so each is atomic without a transaction
//! held across awaits, and the client can be shared by concurrent requests
//! (tokio-postgres pipelines them on one connection).

use crate::ingest::time::parse_timestamp;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

/// The schema's versions, applied in order, each once, in a transaction
/// with its row in `peregrine_migrations`. Never edit a released one: add
/// the next.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "alerts, decisions and rejected alert messages",
    r#"
CREATE TABLE alerts (
    alert_id        text PRIMARY KEY,
    transaction_id  text NOT NULL,
    card_id         text NOT NULL,
    merchant_id     text NOT NULL,
    amount          double precision NOT NULL,
    event_time      timestamptz NOT NULL,
    score           double precision NOT NULL,
    anomaly         double precision,
    -- The model's decision: review or block.
    decision        text NOT NULL,
    model_version   text NOT NULL,
    -- The alert's reasons as produced: top_features, rules, anomalous.
    reasons         jsonb NOT NULL,
    -- The names of the rules that fired, for filtering (`rules ? 'name'`).
    rules           jsonb NOT NULL,
    -- The three strongest features, as "name +0.84, ...", for tables.
    top_reasons     text NOT NULL,
    produced_at     timestamptz NOT NULL,
    stored_at       timestamptz NOT NULL DEFAULT now(),
    kafka_partition integer NOT NULL,
    kafka_offset    bigint NOT NULL,
    -- The analyst's decision, the latest one; alert_decisions keeps all.
    outcome         text CHECK (outcome IN ('fraud', 'legit')),
    analyst         text,
    note            text,
    decided_at      timestamptz,
    -- The outcomes whose label is claimed (being or been published): each
    -- is published once, so a fraud is never counted twice.
    labels_claimed  text[] NOT NULL DEFAULT '{}',
    -- When the last label was published.
    label_published_at timestamptz
);
CREATE INDEX alerts_by_time ON alerts (event_time DESC);
CREATE INDEX alerts_by_card ON alerts (card_id, event_time DESC);
CREATE INDEX alerts_by_decision ON alerts (decision, event_time DESC);
CREATE INDEX alerts_by_outcome ON alerts (outcome, decided_at DESC);
CREATE INDEX alerts_by_rule ON alerts USING gin (rules);

CREATE TABLE alert_decisions (
    id          bigserial PRIMARY KEY,
    alert_id    text NOT NULL REFERENCES alerts (alert_id),
    outcome     text NOT NULL CHECK (outcome IN ('fraud', 'legit')),
    analyst     text NOT NULL,
    note        text,
    decided_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alert_decisions_by_alert ON alert_decisions (alert_id, decided_at);

-- Messages of the alert topic that are not alerts: kept with the reason,
-- never lost silently.
CREATE TABLE alert_rejects (
    kafka_topic     text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset    bigint NOT NULL,
    reason          text NOT NULL,
    payload         bytea NOT NULL,
    rejected_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kafka_topic, kafka_partition, kafka_offset)
);
"#,
)];

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest any statement may run; a batch of the sink takes
/// milliseconds.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The advisory lock the migrations run under, so that instances starting
/// together apply each version once.
const MIGRATION_LOCK: i64 = 0x7065_7265_6772_696e; // "peregrin"

/// The server's own message and SQLSTATE, where the client's says only
/// "db error".
fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

impl StoreError {
    /// The store refused the data itself (SQLSTATE classes 22 and 23: a
    /// value out of range, a constraint): writing it again cannot succeed.
    pub fn is_data_error(&self) -> bool {
        match self {
            StoreError::Db(e) => e
                .code()
                .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23")),
            StoreError::NewerSchema { .. } => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("PostgreSQL: {}", db_message(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error(
        "the alert store's schema is at version {found}, newer than this build's {known}: \
         run a newer Peregrine"
    )]
    NewerSchema { found: i32, known: i32 },
}

/// Why an alert message was refused, naming what was wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal(pub String);

/// An alert as the alert topic carries it (`crate::alerts::Alert`).
#[derive(Debug, Clone, Deserialize)]
pub struct AlertRecord {
    pub alert_id: String,
    pub transaction_id: String,
    pub card_id: String,
    pub merchant_id: String,
    pub amount: f64,
    pub event_time: String,
    pub score: f64,
    #[serde(default)]
    pub anomaly: Option<f64>,
    pub decision: String,
    pub model_version: String,
    pub reasons: Value,
    pub produced_at: String,
    /// The message as it came, kept in case the store refuses it.
    #[serde(skip)]
    pub raw: Vec<u8>,
}

impl AlertRecord {
    /// Reads an alert message; the refusal names the field that is wrong.
    pub fn parse(bytes: &[u8]) -> Result<AlertRecord, Refusal> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| Refusal(format!("not an alert: not JSON: {e}")))?;
        // PostgreSQL's text and jsonb hold no NUL.
        if has_nul(&v) {
            return Err(Refusal("not an alert: a string holds NUL (\\u0000)".into()));
        }
        let Some(obj) = v.as_object() else {
            return Err(Refusal("not an alert: expected a JSON object".into()));
        };
        // Each field checked by name, so that the refusal says which.
        let strings = [
            "alert_id",
            "transaction_id",
            "card_id",
            "merchant_id",
            "event_time",
            "decision",
            "model_version",
            "produced_at",
        ];
        for field in strings {
            if !obj.get(field).is_some_and(Value::is_string) {
                return Err(Refusal(format!("{field}: expected a string")));
            }
        }
        for field in ["amount", "score"] {
            if !obj.get(field).is_some_and(Value::is_number) {
                return Err(Refusal(format!("{field}: expected a number")));
            }
        }
        if !obj
            .get("anomaly")
            .is_none_or(|a| a.is_number() || a.is_null())
        {
            return Err(Refusal("anomaly: expected a number".into()));
        }
        let mut a: AlertRecord =
            serde_json::from_value(v).map_err(|e| Refusal(format!("not an alert: {e}")))?;
        a.raw = bytes.to_vec();
        for (field, v) in [
            ("alert_id", &a.alert_id),
            ("transaction_id", &a.transaction_id),
            ("card_id", &a.card_id),
            ("merchant_id", &a.merchant_id),
        ] {
            if v.is_empty() || v.len() > 256 {
                return Err(Refusal(format!("{field}: expected 1 to 256 bytes")));
            }
        }
        for (field, t) in [
            ("event_time", &a.event_time),
            ("produced_at", &a.produced_at),
        ] {
            if parse_timestamp(t.as_bytes()).is_none() {
                return Err(Refusal(format!("{field}: expected an RFC 3339 timestamp")));
            }
        }
        if !a.amount.is_finite() || !a.score.is_finite() {
            return Err(Refusal("amount and score must be finite numbers".into()));
        }
        if !matches!(a.decision.as_str(), "allow" | "review" | "block") {
            return Err(Refusal(format!(
                "decision: expected allow, review or block, got {:?}",
                a.decision
            )));
        }
        if !a.reasons.is_object() {
            return Err(Refusal("reasons: expected an object".into()));
        }
        Ok(a)
    }

    /// The names of the rules that fired.
    fn rule_names(&self) -> Value {
        let names = self.reasons["rules"]
            .as_array()
            .map(|rules| {
                rules
                    .iter()
                    .filter_map(|r| r["rule"].as_str())
                    .map(|r| Value::String(r.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        Value::Array(names)
    }

    /// The three strongest features, "name +0.84, name -0.12".
    fn top_reasons(&self) -> String {
        let Some(features) = self.reasons["top_features"].as_array() else {
            return String::new();
        };
        features
            .iter()
            .take(3)
            .filter_map(|f| {
                let c = f["contribution"].as_f64()?;
                Some(format!("{} {c:+.2}", f["feature"].as_str()?))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Whether any string (or key) in the value holds NUL.
fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// A refusal's reason as the store can hold it: no NUL.
pub fn storable(reason: &str) -> String {
    reason.replace('\0', "\\0")
}

/// A message of the alert topic, where it came from.
pub struct Sourced<T> {
    pub partition: i32,
    pub offset: i64,
    pub item: T,
}

/// A message refused, with its bytes.
pub struct Rejected {
    pub reason: String,
    pub payload: Vec<u8>,
}

/// An analyst's decision on an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Fraud,
    Legit,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Fraud => "fraud",
            Outcome::Legit => "legit",
        }
    }
}

/// What a recorded decision needs for its label.
#[derive(Debug, Clone)]
pub struct Decided {
    pub transaction_id: String,
    pub card_id: String,
    pub merchant_id: String,
    /// The transaction's time (UTC seconds).
    pub event_time: i64,
    /// Whether this outcome's label was claimed before (by an earlier
    /// decision): then it is not published again.
    pub claimed_before: bool,
}

/// `GET /v1/alerts`'s filters, checked.
#[derive(Debug, Default, Clone)]
pub struct AlertQuery {
    pub card_id: Option<String>,
    /// The model's decision: review, block or allow.
    pub decision: Option<String>,
    /// The analyst's: fraud, legit or undecided.
    pub outcome: Option<String>,
    /// Alerts at or after this event time (UTC seconds).
    pub since: Option<i64>,
    pub limit: i64,
}

/// The schema's version: the newest migration applied, 0 for none.
async fn schema_version(c: &Client) -> Result<i32, StoreError> {
    let row = c
        .query_one(
            "SELECT coalesce(max(version), 0) FROM peregrine_migrations",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// The store: a connection string and the current connection, made again
/// when the last one broke.
pub struct AlertStore {
    url: String,
    client: Mutex<Option<Arc<Client>>>,
}

impl AlertStore {
    /// Connects and brings the schema to this build's version.
    pub async fn open(url: &str) -> Result<AlertStore, StoreError> {
        let store = AlertStore {
            url: url.to_string(),
            client: Mutex::new(None),
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn client(&self) -> Result<Arc<Client>, StoreError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let mut config: tokio_postgres::Config = self.url.parse()?;
        // A database gone (a failover, a dropped path) is noticed in seconds,
        // not after TCP's hours: the connection then breaks and is made again.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config
            .keepalives_idle(Duration::from_secs(30))
            .tcp_user_timeout(Duration::from_secs(30));
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                crate::telemetry::log("WARN", format_args!("alert store connection: {e}"));
            }
        });
        // Times leave the store in UTC, as every other time here; no
        // statement may hold the sink or a request for long.
        client
            .batch_execute(&format!(
                "SET TIME ZONE 'UTC'; SET statement_timeout = {}",
                STATEMENT_TIMEOUT.as_millis()
            ))
            .await?;
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok(client)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let c = self.client().await?;
        // The lock first: two instances creating the table at once collide.
        c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        let result = self.apply_migrations(&c).await;
        c.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await?;
        result
    }

    async fn apply_migrations(&self, c: &Client) -> Result<(), StoreError> {
        c.batch_execute(
            "CREATE TABLE IF NOT EXISTS peregrine_migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
        let known = MIGRATIONS.last().map_or(0, |m| m.0);
        let found = schema_version(c).await?;
        if found > known {
            return Err(StoreError::NewerSchema { found, known });
        }
        for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
            crate::telemetry::log(
                "INFO",
                format_args!("alert store: migrating to version {version} ({name})"),
            );
            let name = name.replace('\'', "''");
            let applied = c
                .batch_execute(&format!(
                    "BEGIN;\n{sql}\nINSERT INTO peregrine_migrations (version, name) \
                     VALUES ({version}, '{name}');\nCOMMIT;"
                ))
                .await;
            if let Err(e) = applied {
                // The failed batch left its transaction open and aborted.
                let _ = c.batch_execute("ROLLBACK").await;
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Writes a batch of alerts (upserted on `alert_id`: an alert stored
    /// again keeps its analyst's decision) and of refused messages, in one
    /// statement, so both land or neither does. Returns the alerts not
    /// stored because their id already names another transaction (a
    /// collision of the 64-bit id), each with that transaction, for the
    /// caller to keep as refused.
    pub async fn write(
        &self,
        topic: &str,
        alerts: &[Sourced<AlertRecord>],
        rejected: &[Sourced<Rejected>],
    ) -> Result<Vec<(usize, String)>, StoreError> {
        let c = self.client().await?;
        let col = |f: &dyn Fn(&Sourced<AlertRecord>) -> String| -> Vec<String> {
            alerts.iter().map(f).collect()
        };
        let ids = col(&|a| a.item.alert_id.clone());
        let txs = col(&|a| a.item.transaction_id.clone());
        let cards = col(&|a| a.item.card_id.clone());
        let merchants = col(&|a| a.item.merchant_id.clone());
        let times = col(&|a| a.item.event_time.clone());
        let decisions = col(&|a| a.item.decision.clone());
        let versions = col(&|a| a.item.model_version.clone());
        let reasons = col(&|a| a.item.reasons.to_string());
        let rules = col(&|a| a.item.rule_names().to_string());
        let tops = col(&|a| a.item.top_reasons());
        let produced = col(&|a| a.item.produced_at.clone());
        let amounts: Vec<f64> = alerts.iter().map(|a| a.item.amount).collect();
        let scores: Vec<f64> = alerts.iter().map(|a| a.item.score).collect();
        let anomalies: Vec<Option<f64>> = alerts.iter().map(|a| a.item.anomaly).collect();
        let partitions: Vec<i32> = alerts.iter().map(|a| a.partition).collect();
        let offsets: Vec<i64> = alerts.iter().map(|a| a.offset).collect();
        let r_partitions: Vec<i32> = rejected.iter().map(|r| r.partition).collect();
        let r_offsets: Vec<i64> = rejected.iter().map(|r| r.offset).collect();
        let r_reasons: Vec<&str> = rejected.iter().map(|r| r.item.reason.as_str()).collect();
        let r_payloads: Vec<&[u8]> = rejected.iter().map(|r| r.item.payload.as_slice()).collect();
        c.execute(
                "WITH refused AS (
                     INSERT INTO alert_rejects (kafka_topic, kafka_partition, kafka_offset, reason, payload)
                     SELECT $17, * FROM unnest($18::integer[], $19::bigint[], $20::text[], $21::bytea[])
                     ON CONFLICT DO NOTHING)
                 INSERT INTO alerts (alert_id, transaction_id, card_id, merchant_id, amount,
                     event_time, score, anomaly, decision, model_version, reasons, rules,
                     top_reasons, produced_at, kafka_partition, kafka_offset)
                 SELECT id, tx, card, merchant, amount, time::timestamptz, score, anomaly,
                     decision, version, reasons::jsonb, rules::jsonb, top, produced::timestamptz,
                     part, off
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[],
                     $6::text[], $7::float8[], $8::float8[], $9::text[], $10::text[],
                     $11::text[], $12::text[], $13::text[], $14::text[], $15::integer[],
                     $16::bigint[])
                     AS a(id, tx, card, merchant, amount, time, score, anomaly, decision,
                          version, reasons, rules, top, produced, part, off)
                 -- A replayed older alert does not overwrite a newer one; an id
                 -- shared by another transaction (a hash collision) is not taken.
                 ON CONFLICT (alert_id) DO UPDATE SET
                     score = excluded.score, anomaly = excluded.anomaly,
                     decision = excluded.decision, model_version = excluded.model_version,
                     reasons = excluded.reasons, rules = excluded.rules,
                     top_reasons = excluded.top_reasons, produced_at = excluded.produced_at,
                     kafka_partition = excluded.kafka_partition,
                     kafka_offset = excluded.kafka_offset
                 WHERE alerts.transaction_id = excluded.transaction_id
                   AND alerts.produced_at <= excluded.produced_at",
                &[
                    &ids, &txs, &cards, &merchants, &amounts, &times, &scores, &anomalies,
                    &decisions, &versions, &reasons, &rules, &tops, &produced, &partitions,
                    &offsets, &topic, &r_partitions, &r_offsets, &r_reasons, &r_payloads,
                ],
            )
            .await?;
        if alerts.is_empty() {
            return Ok(Vec::new());
        }
        let taken = c
            .query(
                "SELECT b.i, a.transaction_id
                 FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS b(id, tx, i)
                 JOIN alerts a ON a.alert_id = b.id
                 WHERE a.transaction_id <> b.tx",
                &[&ids, &txs],
            )
            .await?;
        Ok(taken
            .iter()
            .map(|r| (r.get::<_, i64>(0) as usize - 1, r.get(1)))
            .collect())
    }

    /// Alerts newest first, as JSON objects.
    pub async fn find(&self, q: &AlertQuery) -> Result<Value, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_one(
                "SELECT coalesce(json_agg(a ORDER BY a.event_time DESC, a.alert_id), '[]'::json)
                 FROM (SELECT alert_id, transaction_id, card_id, merchant_id, amount,
                              event_time, score, anomaly, decision, model_version, reasons,
                              rules, produced_at, stored_at, outcome, analyst, note,
                              decided_at, label_published_at
                       FROM alerts
                       WHERE ($1::text IS NULL OR card_id = $1)
                         AND ($2::text IS NULL OR decision = $2)
                         AND ($3::text IS NULL OR coalesce(outcome, 'undecided') = $3)
                         AND ($4::bigint IS NULL OR event_time >= to_timestamp($4::bigint))
                       ORDER BY event_time DESC, alert_id
                       LIMIT $5) a",
                &[&q.card_id, &q.decision, &q.outcome, &q.since, &q.limit],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Records a decision: the alert's latest, and one more row of its
    /// history, in one statement. `None` when there is no such alert.
    pub async fn decide(
        &self,
        alert_id: &str,
        outcome: &Outcome,
        analyst: &str,
        note: Option<&str>,
    ) -> Result<Option<Decided>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "WITH before AS (
                     SELECT alert_id, labels_claimed FROM alerts WHERE alert_id = $1 FOR UPDATE),
                 decided AS (
                     UPDATE alerts a SET outcome = $2, analyst = $3, note = $4, decided_at = now(),
                         labels_claimed = CASE WHEN $2 = ANY(b.labels_claimed)
                             THEN b.labels_claimed ELSE b.labels_claimed || $2::text END
                     FROM before b
                     WHERE a.alert_id = b.alert_id
                     RETURNING a.alert_id, a.transaction_id, a.card_id, a.merchant_id,
                               extract(epoch FROM a.event_time)::bigint AS event_time,
                               $2 = ANY(b.labels_claimed) AS claimed_before),
                 history AS (
                     INSERT INTO alert_decisions (alert_id, outcome, analyst, note)
                     SELECT alert_id, $2, $3, $4 FROM decided)
                 SELECT transaction_id, card_id, merchant_id, event_time, claimed_before
                 FROM decided",
                &[&alert_id, &outcome.as_str(), &analyst, &note],
            )
            .await?;
        Ok(row.map(|r| Decided {
            transaction_id: r.get(0),
            card_id: r.get(1),
            merchant_id: r.get(2),
            event_time: r.get(3),
            claimed_before: r.get(4),
        }))
    }

    /// Marks the label as published.
    pub async fn label_published(&self, alert_id: &str) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "UPDATE alerts SET label_published_at = now() WHERE alert_id = $1",
            &[&alert_id],
        )
        .await?;
        Ok(())
    }

    /// Gives a claim back after its label could not be published, so that
    /// the decision posted again publishes it.
    pub async fn release_claim(&self, alert_id: &str, outcome: &Outcome) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "UPDATE alerts SET labels_claimed = array_remove(labels_claimed, $2::text) \
             WHERE alert_id = $1",
            &[&alert_id, &outcome.as_str()],
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALERT: &str = r#"{"alert_id":"al-1","transaction_id":"t1","card_id":"c1","merchant_id":"m1","amount":12.5,"event_time":"2018-04-01T10:00:00Z","score":0.93,"decision":"block","model_version":"v1","reasons":{"top_features":[{"feature":"card.count_1h","value":4.0,"contribution":1.234},{"feature":"merchant.risk_7d","value":0.2,"contribution":-0.5}],"rules":[{"rule":"velocity_burst","severity":"block"}]},"produced_at":"2026-12-04T10:00:00Z"}"#;

    #[test]
    fn alerts_are_read_with_their_rules_and_top_reasons() {
        let a = AlertRecord::parse(ALERT.as_bytes()).unwrap();
        assert_eq!(a.rule_names(), serde_json::json!(["velocity_burst"]));
        assert_eq!(
            a.top_reasons(),
            "card.count_1h +1.23, merchant.risk_7d -0.50"
        );
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let refused = |text: &str| AlertRecord::parse(text.as_bytes()).unwrap_err().0;
        assert!(refused("not json").starts_with("not an alert: not JSON"));
        assert!(refused("[1]").contains("expected a JSON object"));
        assert!(refused(&ALERT.replace("c1", "c\\u0000")).contains("NUL"));
        // An escaped backslash before `u0000` is not NUL.
        assert!(AlertRecord::parse(ALERT.replace("c1", "c\\\\u0000").as_bytes()).is_ok());
        let with = |k: &str, v: &str| {
            let mut o: serde_json::Map<String, Value> = serde_json::from_str(ALERT).unwrap();
            o.insert(k.into(), serde_json::from_str(v).unwrap());
            Value::Object(o).to_string()
        };
        assert!(refused(&with("alert_id", "7")).starts_with("alert_id:"));
        assert!(refused(&with("alert_id", "\"\"")).starts_with("alert_id:"));
        assert!(refused(&with("score", "\"high\"")).starts_with("score:"));
        assert!(refused(&with("event_time", "\"yesterday\"")).starts_with("event_time:"));
        assert!(refused(&with("decision", "\"maybe\"")).starts_with("decision:"));
        assert!(refused(&with("reasons", "[]")).starts_with("reasons:"));
        assert!(refused(&with("anomaly", "\"x\"")).starts_with("anomaly:"));
    }
}
