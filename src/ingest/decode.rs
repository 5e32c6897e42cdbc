//! A Kafka message's payload to a transaction, or the reason it is not one
//! (the dead-letter reasons, a bounded label of the metric).

use super::Transaction;

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    Empty,
    Oversize,
    NotJson,
    InvalidField,
}

impl DeadReason {
    pub const ALL: [DeadReason; 4] = [
        DeadReason::Empty,
        DeadReason::Oversize,
        DeadReason::NotJson,
        DeadReason::InvalidField,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Empty => "empty",
            DeadReason::Oversize => "oversize",
            DeadReason::NotJson => "not_json",
            DeadReason::InvalidField => "invalid_field",
        }
    }
}

/// A transaction from a message's payload, or why it is not one.
pub fn decode(
    payload: Option<&[u8]>,
    max_bytes: usize,
) -> Result<Transaction, (DeadReason, String)> {
    let bytes = match payload {
        None | Some([]) => return Err((DeadReason::Empty, "the message has no payload".into())),
        Some(b) => b,
    };
    if bytes.len() > max_bytes {
        return Err((
            DeadReason::Oversize,
            format!("{} bytes is over the limit of {max_bytes}", bytes.len()),
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| (DeadReason::NotJson, format!("not JSON: {e}")))?;
    Transaction::from_json(&value).map_err(|e| (DeadReason::InvalidField, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
