//! The fraud label message: the one definition of its schema, written by
//! `peregrine produce` and the demo, read by the service's label topic.
//!
//! `{"transaction_id", "card_id", "merchant_id", "is_fraud", "reported_at",
//! "timestamp"}`: `timestamp`, the transaction's own time, is optional.

use super::time::{format_utc, parse_timestamp};
use super::transaction::FieldError;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct Label {
    pub transaction_id: String,
    /// Optional on the wire; empty when absent.
    pub card_id: String,
    pub merchant_id: String,
    pub is_fraud: bool,
    /// When the label became known (UTC seconds).
    pub reported_at: i64,
    /// The transaction's own time, when the message carries it.
    pub transaction_time: Option<i64>,
}

impl Label {
    /// The transaction time a fraud counts at: its own when given, else
    /// the label's report time minus the label delay the model assumes.
    pub fn counted_at(&self, label_delay_secs: i64) -> i64 {
        self.transaction_time
            .unwrap_or(self.reported_at - label_delay_secs)
    }

    pub fn to_json(&self) -> Value {
        let time = |t: i64| {
            let mut s = String::with_capacity(20);
            format_utc(t, &mut s);
            s
        };
        let mut m = serde_json::Map::new();
        m.insert("transaction_id".into(), self.transaction_id.clone().into());
        m.insert("card_id".into(), self.card_id.clone().into());
        m.insert("merchant_id".into(), self.merchant_id.clone().into());
        m.insert("is_fraud".into(), u8::from(self.is_fraud).into());
        m.insert("reported_at".into(), time(self.reported_at).into());
        if let Some(t) = self.transaction_time {
            m.insert("timestamp".into(), time(t).into());
        }
        Value::Object(m)
    }

    /// Reads a label message; the error names the field that is wrong.
    pub fn parse(bytes: &[u8]) -> Result<Label, FieldError> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| FieldError::new("(body)", format!("not JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| FieldError::new("(body)", "expected a JSON object"))?;
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let id = |field: &'static str, required: bool| match get(field) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::Number(n)) if n.is_u64() || n.is_i64() => Ok(n.to_string()),
            None if !required => Ok(String::new()),
            None => Err(FieldError::new(field, "required field is missing")),
            Some(_) => Err(FieldError::new(
                field,
                "expected a non-empty string or an integer",
            )),
        };
        let is_fraud = match get("is_fraud") {
            Some(Value::Bool(b)) => *b,
            Some(Value::Number(n)) if n.as_u64() == Some(1) => true,
            Some(Value::Number(n)) if n.as_u64() == Some(0) => false,
            Some(Value::String(s)) if s == "1" || s == "0" => s == "1",
            Some(other) => {
                return Err(FieldError::new(
                    "is_fraud",
                    format!("expected 0 or 1, got {other}"),
                ));
            }
            None => return Err(FieldError::new("is_fraud", "required field is missing")),
        };
        let time = |field: &'static str| -> Result<Option<i64>, FieldError> {
            match get(field) {
                None => Ok(None),
                Some(Value::String(s)) => parse_timestamp(s.as_bytes())
                    .map(|t| Some(t.utc))
                    .ok_or_else(|| FieldError::new(field, "expected an RFC 3339 timestamp")),
                Some(_) => Err(FieldError::new(field, "expected an RFC 3339 timestamp")),
            }
        };
        Ok(Label {
            transaction_id: id("transaction_id", true)?,
            card_id: id("card_id", false)?,
            merchant_id: id("merchant_id", true)?,
            is_fraud,
            reported_at: time("reported_at")?
                .ok_or_else(|| FieldError::new("reported_at", "required field is missing"))?,
            transaction_time: time("timestamp")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_read_or_rejected_with_the_field() {
        let at = |s: &str| parse_timestamp(s.as_bytes()).unwrap().utc;
        let fraud = br#"{"transaction_id":"t1","card_id":"c","merchant_id":"m7","is_fraud":1,"reported_at":"2018-04-10T00:00:00Z"}"#;
        let l = Label::parse(fraud).unwrap();
        assert_eq!(l.merchant_id, "m7");
        assert!(l.is_fraud);
        assert_eq!(l.counted_at(86_400), at("2018-04-09T00:00:00Z"));
        let exact = br#"{"transaction_id":"t1","merchant_id":"m7","is_fraud":true,"reported_at":"2018-04-10T00:00:00Z","timestamp":"2018-04-02T03:00:00Z"}"#;
        assert_eq!(
            Label::parse(exact).unwrap().counted_at(86_400),
            at("2018-04-02T03:00:00Z")
        );
        let genuine = br#"{"transaction_id":7,"card_id":"c","merchant_id":"m7","is_fraud":0,"reported_at":"2018-04-10T00:00:00Z"}"#;
        assert!(!Label::parse(genuine).unwrap().is_fraud);
        let bad = br#"{"transaction_id":"t1","card_id":"c","merchant_id":"m7","is_fraud":3,"reported_at":"2018-04-10T00:00:00Z"}"#;
        assert_eq!(Label::parse(bad).unwrap_err().field, "is_fraud");
        let no_merchant =
            br#"{"transaction_id":"t1","is_fraud":1,"reported_at":"2018-04-10T00:00:00Z"}"#;
        assert_eq!(Label::parse(no_merchant).unwrap_err().field, "merchant_id");
        // What to_json writes, parse reads back.
        assert_eq!(Label::parse(l.to_json().to_string().as_bytes()).unwrap(), l);
    }
}
