//! A Kafka message's payload to a transaction, or the reason it is not one
//! (the dead-letter reasons, a bounded label of the metric).

use super::Transaction;
use super::transaction::FieldError;

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    Empty,
    Oversize,
    NotJson,
    InvalidField,
    FutureTimestamp,
    AmountOverLimit,
}

impl DeadReason {
    pub const ALL: [DeadReason; 6] = [
        DeadReason::Empty,
        DeadReason::Oversize,
        DeadReason::NotJson,
        DeadReason::InvalidField,
        DeadReason::FutureTimestamp,
        DeadReason::AmountOverLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Empty => "empty",
            DeadReason::Oversize => "oversize",
            DeadReason::NotJson => "not_json",
            DeadReason::InvalidField => "invalid_field",
            DeadReason::FutureTimestamp => "future_timestamp",
            DeadReason::AmountOverLimit => "amount_over_limit",
        }
    }
}

/// What live input (Kafka, HTTP) must keep to beyond the schema. Files
/// given to `replay`, `train` and `eval` are history and are not held to
/// the clock.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_amount: f64,
    /// Seconds an event's time may be ahead of the wall clock.
    pub max_clock_skew_secs: i64,
}

impl Limits {
    pub fn of(s: &crate::config::Settings) -> Limits {
        Limits {
            max_bytes: s.max_message_bytes,
            max_amount: s.max_amount,
            max_clock_skew_secs: i64::try_from(s.max_clock_skew_secs).unwrap_or(i64::MAX),
        }
    }

    /// Refuses a time later than the clock (`now`, UTC seconds) allows.
    pub fn check_time(&self, field: &str, t: i64, now: i64) -> Result<(), (DeadReason, String)> {
        if t > now.saturating_add(self.max_clock_skew_secs) {
            let mut shown = String::with_capacity(20);
            super::time::format_utc(t, &mut shown);
            return Err((
                DeadReason::FutureTimestamp,
                format!(
                    "field `{field}`: {shown} is more than max_clock_skew_secs = {} s ahead of the clock",
                    self.max_clock_skew_secs
                ),
            ));
        }
        Ok(())
    }

    /// Refuses a transaction from the future or over the amount limit.
    pub fn check(&self, tx: &Transaction, now: i64) -> Result<(), (DeadReason, String)> {
        self.check_time("timestamp", tx.time.utc, now)?;
        self.check_amount(tx)
    }

    /// Refuses an amount over the limit.
    pub fn check_amount(&self, tx: &Transaction) -> Result<(), (DeadReason, String)> {
        if tx.amount > self.max_amount {
            return Err((
                DeadReason::AmountOverLimit,
                format!(
                    "field `amount`: {} is over max_amount = {}",
                    tx.amount, self.max_amount
                ),
            ));
        }
        Ok(())
    }
}

/// The wall clock in UTC seconds, for [`Limits::check`].
pub fn now_utc() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A transaction from a message's payload, or why it is not one. Optional
/// fields that are wrong are left out and pushed on `ignored`.
pub fn decode(
    payload: Option<&[u8]>,
    limits: &Limits,
    now: i64,
    ignored: &mut Vec<FieldError>,
) -> Result<Transaction, (DeadReason, String)> {
    let bytes = match payload {
        None | Some([]) => return Err((DeadReason::Empty, "the message has no payload".into())),
        Some(b) => b,
    };
    if bytes.len() > limits.max_bytes {
        return Err((
            DeadReason::Oversize,
            format!(
                "{} bytes is over the limit of {}",
                bytes.len(),
                limits.max_bytes
            ),
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| (DeadReason::NotJson, format!("not JSON: {e}")))?;
    let tx = Transaction::from_json_lenient(&value, ignored)
        .map_err(|e| (DeadReason::InvalidField, e.to_string()))?;
    limits.check(&tx, now)?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2018-04-01T00:10:00Z, the clock of these tests.
    const NOW: i64 = 1_522_541_400;

    fn limits(max_bytes: usize) -> Limits {
        Limits {
            max_bytes,
            max_amount: 1e9,
            max_clock_skew_secs: 600,
        }
    }

    fn decode(
        payload: Option<&[u8]>,
        max_bytes: usize,
    ) -> Result<Transaction, (DeadReason, String)> {
        super::decode(payload, &limits(max_bytes), NOW, &mut Vec::new())
    }

    #[test]
    fn decode_names_what_is_wrong() {
        let ok = br#"{"transaction_id":"t1","timestamp":"2018-04-01T00:00:31Z","card_id":"c","merchant_id":"m","amount":5}"#;
        assert!(decode(Some(ok), 1024).is_ok());
        assert_eq!(decode(None, 1024).unwrap_err().0, DeadReason::Empty);
        assert_eq!(decode(Some(ok), 10).unwrap_err().0, DeadReason::Oversize);
        assert_eq!(
            decode(Some(b"{oops"), 1024).unwrap_err().0,
            DeadReason::NotJson
        );
        let (reason, detail) = decode(
            Some(br#"{"transaction_id":"t1","timestamp":"2018-04-01T00:00:31Z","card_id":"c","merchant_id":"m","amount":"x"}"#),
            1024,
        )
        .unwrap_err();
        assert_eq!(reason, DeadReason::InvalidField);
        assert!(detail.contains("amount"), "{detail}");
    }

    #[test]
    fn the_clock_and_the_amount_limit_refuse_with_a_reason() {
        let at = |ts: &str, amount: &str| {
            format!(
                r#"{{"transaction_id":"t1","timestamp":"{ts}","card_id":"c","merchant_id":"m","amount":{amount}}}"#
            )
        };
        // Within the skew: accepted; past it: refused, naming the setting.
        assert!(decode(Some(at("2018-04-01T00:19:59Z", "5").as_bytes()), 1024).is_ok());
        let (reason, detail) =
            decode(Some(at("2018-04-01T00:20:01Z", "5").as_bytes()), 1024).unwrap_err();
        assert_eq!(reason, DeadReason::FutureTimestamp);
        assert!(detail.contains("max_clock_skew_secs"), "{detail}");
        let (reason, _) =
            decode(Some(at("9999-12-31T23:59:59Z", "5").as_bytes()), 1024).unwrap_err();
        assert_eq!(reason, DeadReason::FutureTimestamp);
        // The distant past is history, not refused here (it is late).
        assert!(decode(Some(at("1970-01-01T00:00:00Z", "5").as_bytes()), 1024).is_ok());
        assert!(
            decode(
                Some(at("2018-04-01T00:00:00Z", "1000000000").as_bytes()),
                1024
            )
            .is_ok()
        );
        let (reason, detail) =
            decode(Some(at("2018-04-01T00:00:00Z", "1e39").as_bytes()), 1024).unwrap_err();
        assert_eq!(reason, DeadReason::AmountOverLimit);
        assert!(detail.contains("max_amount"), "{detail}");
    }

    #[test]
    fn a_wrong_optional_field_is_left_out_and_named() {
        let raw = br#"{"transaction_id":"t1","timestamp":"2018-04-01T00:00:31Z","card_id":"c","merchant_id":"m","amount":5,"channel":"carrier-pigeon","country":"FRA","lat":91,"lon":10,"mcc":"5411","currency":"EUR"}"#;
        let mut ignored = Vec::new();
        let tx = super::decode(Some(raw), &limits(1024), NOW, &mut ignored).unwrap();
        let fields: Vec<&str> = ignored.iter().map(|e| e.field).collect();
        assert_eq!(fields, ["country", "channel", "lat"]);
        assert_eq!((tx.channel, tx.country.as_str(), tx.lat), (None, "", None));
        assert_eq!(
            (tx.lon, tx.mcc, tx.currency.as_str()),
            (Some(10.0), Some(5411), "EUR")
        );
        // A wrong required field is still an error.
        let raw = br#"{"transaction_id":"t1","timestamp":"2018-04-01T00:00:31Z","card_id":"","merchant_id":"m","amount":5}"#;
        assert_eq!(
            decode(Some(raw), 1024).unwrap_err().0,
            DeadReason::InvalidField
        );
        // Files and HTTP stay strict.
        let v: serde_json::Value = serde_json::from_slice(br#"{"transaction_id":"t1","timestamp":"2018-04-01T00:00:31Z","card_id":"c","merchant_id":"m","amount":5,"channel":"x"}"#).unwrap();
        assert_eq!(Transaction::from_json(&v).unwrap_err().field, "channel");
    }
}
