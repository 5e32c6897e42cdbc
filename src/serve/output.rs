//! What the partition tasks produce, and waiting for the broker to have it.
//! A task's input offset is done only once everything it caused (alerts,
//! dead letters, scores, merchant events) is acknowledged.

use super::state::ServiceState;
use crate::telemetry::log;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use std::time::Duration;

/// A message to produce, owned, so it can be sent again after a failure.
pub struct Outgoing {
    pub topic: String,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
    /// A partition of its own choosing; else the key's.
    pub partition: Option<i32>,
    /// The input record's timestamp, for the event-to-alert latency.
    pub alert_of: Option<i64>,
}

impl Outgoing {
    pub fn new(topic: &str, key: &[u8], payload: Vec<u8>) -> Outgoing {
        Outgoing {
            topic: topic.to_string(),
            key: key.to_vec(),
            payload,
            headers: Vec::new(),
            partition: None,
            alert_of: None,
        }
    }

    /// The same record to each of a topic's `partitions`, unkeyed: a
    /// broadcast, such as a source's progress.
    pub fn to_every_partition<'a>(
        topic: &'a str,
        partitions: i32,
        payload: &'a [u8],
    ) -> impl Iterator<Item = Outgoing> + 'a {
        (0..partitions).map(move |p| Outgoing {
            partition: Some(p),
            ..Outgoing::new(topic, b"", payload.to_vec())
        })
    }
}

/// The most of an unusable message's payload a dead letter carries: under
/// the default message size limits of librdkafka and of the brokers (about
/// 1 MB), so that a message the input topic allowed can still be
/// dead-lettered. Its coordinates in the headers lead to the whole.
pub const DEAD_LETTER_MAX_PAYLOAD: usize = 512 * 1024;

/// A message that cannot be used, for the dead-letter topic: as it came
/// (its payload cut at [`DEAD_LETTER_MAX_PAYLOAD`]), with why and where
/// from in its headers.
pub fn dead_letter(
    dlq: &str,
    msg: &impl rdkafka::Message,
    reason: &str,
    detail: String,
) -> Outgoing {
    let mut o = Outgoing {
        headers: vec![
            ("peregrine-reason", reason.to_string()),
            ("peregrine-error", detail),
            ("peregrine-source-topic", msg.topic().to_string()),
            ("peregrine-source-partition", msg.partition().to_string()),
            ("peregrine-source-offset", msg.offset().to_string()),
        ],
        ..Outgoing::new(
            dlq,
            msg.key().unwrap_or_default(),
            msg.payload().unwrap_or_default().to_vec(),
        )
    };
    o.cut_payload(DEAD_LETTER_MAX_PAYLOAD);
    o
}

impl Outgoing {
    fn is_dead_letter(&self) -> bool {
        self.headers.iter().any(|(k, _)| *k == "peregrine-reason")
    }

    /// Cuts the payload to `limit` bytes, saying so in a header with the
    /// original size. False if there was nothing left to cut.
    fn cut_payload(&mut self, limit: usize) -> bool {
        if self.payload.len() <= limit {
            return false;
        }
        if !self
            .headers
            .iter()
            .any(|(k, _)| *k == "peregrine-original-size")
        {
            self.headers
                .push(("peregrine-original-size", self.payload.len().to_string()));
        }
        self.payload.truncate(limit);
        true
    }

    /// A dead letter the producer or the broker finds too large goes again
    /// with half its payload; anything else too large cannot be cut.
    fn shrink(&mut self) -> bool {
        self.is_dead_letter() && self.cut_payload(self.payload.len() / 2)
    }
}

fn is_too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
    )
}

/// Counts and logs a produce error that no retry of the same message can
/// mend, at most once a second per message so a stuck one stays visible
/// without flooding the log.
fn report_produce_error(state: &ServiceState, o: &Outgoing, e: &KafkaError) {
    let code = e
        .rdkafka_error_code()
        .map_or_else(|| "unknown".to_string(), |c| format!("{c:?}"));
    state
        .metrics
        .produce_errors
        .with_label_values(&[&code])
        .inc();
    state
        .health()
        .produce_failed(format!("producing to {}: {e}", o.topic));
    log(
        "ERROR",
        format_args!(
            "cannot produce to {}: {e}; retrying every second (the partition waits)",
            o.topic
        ),
    );
}

fn send(
    producer: &FutureProducer,
    o: &Outgoing,
) -> Result<DeliveryFuture, rdkafka::error::KafkaError> {
    let mut headers = OwnedHeaders::new();
    for (k, v) in &o.headers {
        headers = headers.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    let mut record = FutureRecord::to(&o.topic)
        .key(&o.key)
        .payload(&o.payload)
        .headers(headers);
    if let Some(p) = o.partition {
        record = record.partition(p);
    }
    producer.send_result(record).map_err(|(e, _)| e)
}

pub type Pending = Vec<(Outgoing, DeliveryFuture)>;

/// Hands every message to the producer, in order. A full local queue is
/// waited out; a dead letter too large is cut; any other error is counted,
/// logged and retried each second, so that nothing is lost silently and a
/// partition that cannot produce is seen to wait.
pub async fn send_all(
    state: &ServiceState,
    producer: &FutureProducer,
    out: Vec<Outgoing>,
) -> Pending {
    let mut pending = Vec::with_capacity(out.len());
    for mut o in out {
        loop {
            match send(producer, &o) {
                Ok(f) => {
                    pending.push((o, f));
                    break;
                }
                Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Err(e) if is_too_large(&e) && o.shrink() => {}
                Err(e) => {
                    report_produce_error(state, &o, &e);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
    pending
}

/// Waits for the broker to acknowledge every message, sending again what
/// failed. False if `stopped` before all were acknowledged.
pub async fn settle(
    state: &ServiceState,
    producer: &FutureProducer,
    mut pending: Pending,
    stopped: &(dyn Fn() -> bool + Sync),
) -> bool {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut failed = Vec::new();
        for (o, f) in pending {
            match f.await {
                Ok(Ok(_)) => {
                    state.health().produced();
                    if let Some(ts) = o.alert_of {
                        record_alert_latency(state, ts);
                    }
                }
                Ok(Err((e, _))) => {
                    let mut o = o;
                    if !(is_too_large(&e) && o.shrink()) {
                        log("WARN", format_args!("delivery to {} failed: {e}", o.topic));
                        state
                            .health()
                            .produce_failed(format!("delivery to {}: {e}", o.topic));
                    }
                    failed.push(o);
                }
                Err(_) => failed.push(o),
            }
        }
        if failed.is_empty() {
            return true;
        }
        state.metrics.delivery_retries.inc_by(failed.len() as u64);
        if stopped() {
            return false;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
        pending = send_all(state, producer, failed).await;
    }
}

fn record_alert_latency(state: &ServiceState, record_ts: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    if now >= record_ts {
        state.record_alert_latency(now - record_ts);
    }
}

/// The clock a record's time is judged against (UTC seconds): when it was
/// written to Kafka, or now if that is earlier or unknown. A record read
/// again on a restore is judged as it was the first time, and a producer's
/// clock set in the future counts for nothing.
pub fn record_clock(msg: &impl rdkafka::Message) -> i64 {
    let now = crate::ingest::decode::now_utc();
    msg.timestamp()
        .to_millis()
        .map_or(now, |ms| now.min(ms.div_euclid(1000)))
}
