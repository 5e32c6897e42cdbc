//! The transaction schema shared by files, Kafka and HTTP.

use super::time::{EventTime, parse_timestamp};
use serde_json::Value;
use std::fmt;

/// Payment channel of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Pos,
    Ecom,
    Atm,
}

impl Channel {
    pub fn parse(s: &[u8]) -> Option<Channel> {
        match s {
            b"pos" | b"POS" => Some(Channel::Pos),
            b"ecom" | b"ECOM" => Some(Channel::Ecom),
            b"atm" | b"ATM" => Some(Channel::Atm),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Pos => "pos",
            Channel::Ecom => "ecom",
            Channel::Atm => "atm",
        }
    }
}

/// One card transaction. String fields are reused between rows by the file
/// readers, so the per-event path does not allocate; empty `currency` and
/// `country` mean absent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transaction {
    pub transaction_id: String,
    pub time: EventTime,
    pub card_id: String,
    pub merchant_id: String,
    pub amount: f64,
    pub currency: String,
    pub mcc: Option<u16>,
    pub country: String,
    pub channel: Option<Channel>,
    pub lat: Option<f64>,
    pub lon: Option<f64>,
    /// The label: present only in training and evaluation files.
    pub is_fraud: Option<bool>,
    /// Fields beyond the schema (a device, an IP, an account's age) that a
    /// features file may read as `attributes.NAME`.
    pub attributes: Attributes,
}

/// A value under `attributes`.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Text(String),
    Number(f64),
}

/// A transaction's free-form fields: at most [`Attributes::MAX_KEYS`], each
/// a string of at most [`Attributes::MAX_TEXT`] bytes or a finite number.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attributes(Vec<(String, AttrValue)>);

impl Attributes {
    pub const MAX_KEYS: usize = 32;
    pub const MAX_TEXT: usize = 256;

    pub fn get(&self, name: &str) -> Option<&AttrValue> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    fn invalid(name: &str, reason: impl fmt::Display) -> FieldError {
        FieldError::new("attributes", format!("`{name}`: {reason}"))
    }

    /// Sets `name`, replacing an earlier value; an empty value leaves it absent.
    pub fn set(&mut self, name: &str, value: AttrValue) -> Result<(), FieldError> {
        match &value {
            AttrValue::Text(t) if t.len() > Self::MAX_TEXT => {
                return Err(Self::invalid(
                    name,
                    format!("longer than {} bytes", Self::MAX_TEXT),
                ));
            }
            AttrValue::Number(v) if !v.is_finite() => {
                return Err(Self::invalid(name, "not a finite number"));
            }
            _ => {}
        }
        if let Some(slot) = self.0.iter_mut().find(|(k, _)| k == name) {
            slot.1 = value;
        } else if self.0.len() < Self::MAX_KEYS {
            self.0.push((name.to_string(), value));
        } else {
            return Err(Self::invalid(
                name,
                format!("more than {} attributes", Self::MAX_KEYS),
            ));
        }
        Ok(())
    }

    /// A CSV cell: a number when it reads as one, else text; empty is absent.
    pub fn set_raw(&mut self, name: &str, raw: &[u8]) -> Result<(), FieldError> {
        if raw.is_empty() {
            return Ok(());
        }
        let value = match parse_number(raw) {
            Some(v) => AttrValue::Number(v),
            None => AttrValue::Text(
                std::str::from_utf8(raw)
                    .map_err(|_| Self::invalid(name, "not UTF-8"))?
                    .to_string(),
            ),
        };
        self.set(name, value)
    }

    fn from_json(v: &Value) -> Result<Attributes, FieldError> {
        let Some(obj) = v.as_object() else {
            return Err(FieldError::new(
                "attributes",
                "expected an object of strings and numbers",
            ));
        };
        // Counted with the nulls, as the published schema's maxProperties does.
        if obj.len() > Self::MAX_KEYS {
            return Err(FieldError::new(
                "attributes",
                format!("more than {} attributes", Self::MAX_KEYS),
            ));
        }
        let mut out = Attributes::default();
        for (k, v) in obj {
            match v {
                Value::Null => {}
                Value::String(s) => out.set(k, AttrValue::Text(s.clone()))?,
                Value::Number(n) => {
                    out.set(k, AttrValue::Number(n.as_f64().unwrap_or(f64::NAN)))?
                }
                _ => return Err(Self::invalid(k, "expected a string or a number")),
            }
        }
        Ok(out)
    }

    fn to_json(&self) -> Value {
        self.0
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    AttrValue::Text(t) => Value::from(t.clone()),
                    AttrValue::Number(n) => Value::from(*n),
                };
                (k.clone(), v)
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

/// What is wrong with one field of one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> FieldError {
        FieldError {
            field,
            reason: reason.into(),
        }
    }

    fn missing(field: &'static str) -> FieldError {
        FieldError::new(field, "required field is missing")
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field `{}`: {}", self.field, self.reason)
    }
}

impl std::error::Error for FieldError {}

fn shown(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    if s.len() > 40 {
        format!("{:?}…", &s[..s.floor_char_boundary(40)])
    } else {
        format!("{s:?}")
    }
}

/// Setters that validate one raw field each; used by the CSV reader and
/// the JSON decoder alike so both give the same errors.
impl Transaction {
    pub fn set_id(&mut self, raw: &[u8]) -> Result<(), FieldError> {
        set_required_str(&mut self.transaction_id, "transaction_id", raw)
    }

    pub fn set_card(&mut self, raw: &[u8]) -> Result<(), FieldError> {
        set_required_str(&mut self.card_id, "card_id", raw)
    }

    pub fn set_merchant(&mut self, raw: &[u8]) -> Result<(), FieldError> {
        set_required_str(&mut self.merchant_id, "merchant_id", raw)
    }

    pub fn set_timestamp(&mut self, raw: &[u8]) -> Result<(), FieldError> {
        if raw.is_empty() {
            return Err(FieldError::missing("timestamp"));
        }
        self.time = parse_timestamp(raw).ok_or_else(|| {
            FieldError::new(
                "timestamp",
                format!("expected an RFC 3339 timestamp, got {}", shown(raw)),
            )
        })?;
        Ok(())
    }

    pub fn set_amount(&mut self, raw: &[u8]) -> Result<(), FieldError> {
        if raw.is_empty() {
            return Err(FieldError::missing("amount"));
        }
        self.set_amount_value(parse_number(raw), raw)
    }

    fn set_amount_value(&mut self, v: Option<f64>, raw: &[u8]) -> Result<(), FieldError> {
        match v {
            Some(a) if a.is_finite() && a >= 0.0 => {
                self.amount = a;
                Ok(())
            }
            _ => Err(FieldError::new(
                "amount",
                format!("expected a number ≥ 0, got {}", shown(raw)),
            )),
        }
    }

    pub fn set_currency(&mut self, raw: &[u8]) -> Result<(), FieldError> {
        set_code(&mut self.currency, "currency", raw, 3, "an ISO 4217 code")
    }

    pub fn set_country(&mut self, raw: &[u8]) -> Result<(), FieldError> {
        set_code(
            &mut self.country,
            "country",
            raw,
            2,
            "an ISO 3166-1 alpha-2 code",
        )
    }

    pub fn set_mcc(&mut self, raw: &[u8]) -> Result<(), FieldError> {
        self.mcc = if raw.is_empty() {
            None
        } else {
            // Digits only: u16's parser would also take a sign and any
            // number of leading zeros.
            let digits = (1..=4).contains(&raw.len()) && raw.iter().all(u8::is_ascii_digit);
            match std::str::from_utf8(raw)
                .ok()
                .filter(|_| digits)
                .and_then(|s| s.parse::<u16>().ok())
            {
                Some(v) => Some(v),
                _ => {
                    return Err(FieldError::new(
                        "mcc",
                        format!(
                            "expected a 4-digit merchant category code, got {}",
                            shown(raw)
                        ),
                    ));
                }
            }
        };
        Ok(())
    }

    pub fn set_channel(&mut self, raw: &[u8]) -> Result<(), FieldError> {
        self.channel = if raw.is_empty() {
            None
        } else {
            Some(Channel::parse(raw).ok_or_else(|| {
                FieldError::new(
                    "channel",
                    format!("expected pos, ecom or atm, got {}", shown(raw)),
                )
            })?)
        };
        Ok(())
    }

    pub fn set_lat(&mut self, raw: &[u8]) -> Result<(), FieldError> {
        self.lat = parse_coordinate("lat", raw, 90.0)?;
        Ok(())
    }

    pub fn set_lon(&mut self, raw: &[u8]) -> Result<(), FieldError> {
        self.lon = parse_coordinate("lon", raw, 180.0)?;
        Ok(())
    }

    pub fn set_label(&mut self, raw: &[u8]) -> Result<(), FieldError> {
        self.is_fraud = match raw {
            b"" => None,
            b"0" | b"false" | b"0.0" => Some(false),
            b"1" | b"true" | b"1.0" => Some(true),
            _ => {
                return Err(FieldError::new(
                    "is_fraud",
                    format!("expected 0 or 1, got {}", shown(raw)),
                ));
            }
        };
        Ok(())
    }

    /// Clears the optional fields before a row fills them.
    pub fn reset_optional(&mut self) {
        self.currency.clear();
        self.country.clear();
        self.mcc = None;
        self.channel = None;
        self.lat = None;
        self.lon = None;
        self.is_fraud = None;
        self.attributes.clear();
    }

    /// Decodes a JSON object (HTTP, JSON Lines): any field that is wrong is
    /// an error. Unknown fields are ignored; `null` counts as absent.
    pub fn from_json(v: &Value) -> Result<Transaction, FieldError> {
        Transaction::from_json_with(v, &mut Err)
    }

    /// Decodes a JSON object from a stream (Kafka): a wrong required field is
    /// an error, a wrong optional one is left out and pushed on `ignored`,
    /// so that schema drift upstream in an optional field does not switch
    /// the checks off for every transaction that carries it.
    pub fn from_json_lenient(
        v: &Value,
        ignored: &mut Vec<FieldError>,
    ) -> Result<Transaction, FieldError> {
        Transaction::from_json_with(v, &mut |e| {
            ignored.push(e);
            Ok(())
        })
    }

    /// `optional_error` decides what a wrong optional field does: an error,
    /// or (when it returns `Ok`) the field is left absent.
    fn from_json_with(
        v: &Value,
        optional_error: &mut dyn FnMut(FieldError) -> Result<(), FieldError>,
    ) -> Result<Transaction, FieldError> {
        let obj = v
            .as_object()
            .ok_or_else(|| FieldError::new("(body)", "expected a JSON object"))?;
        let mut tx = Transaction::default();
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        match get("transaction_id") {
            Some(Value::String(s)) => tx.set_id(s.as_bytes())?,
            Some(Value::Number(n)) if n.is_u64() || n.is_i64() => tx.transaction_id = n.to_string(),
            Some(_) => {
                return Err(FieldError::new(
                    "transaction_id",
                    "expected a string or an integer",
                ));
            }
            None => return Err(FieldError::missing("transaction_id")),
        }
        tx.set_timestamp(
            json_str(get("timestamp"), "timestamp")?
                .unwrap_or_default()
                .as_bytes(),
        )?;
        tx.set_card(json_id(get("card_id"), "card_id")?.as_bytes())?;
        tx.set_merchant(json_id(get("merchant_id"), "merchant_id")?.as_bytes())?;
        match get("amount") {
            Some(Value::Number(n)) => tx.set_amount_value(n.as_f64(), n.to_string().as_bytes())?,
            Some(Value::String(s)) => tx.set_amount(s.as_bytes())?,
            Some(other) => tx.set_amount_value(None, other.to_string().as_bytes())?,
            None => return Err(FieldError::missing("amount")),
        }
        // Each optional field is set whole or not at all.
        let mut optional = |tx: &mut Transaction,
                            set: &dyn Fn(&mut Transaction) -> Result<(), FieldError>,
                            clear: &dyn Fn(&mut Transaction)| {
            set(tx).or_else(|e| {
                clear(tx);
                optional_error(e)
            })
        };
        optional(
            &mut tx,
            &|tx| match json_str(get("currency"), "currency")? {
                Some(s) => tx.set_currency(s.as_bytes()),
                None => Ok(()),
            },
            &|tx| tx.currency.clear(),
        )?;
        optional(
            &mut tx,
            &|tx| match json_str(get("country"), "country")? {
                Some(s) => tx.set_country(s.as_bytes()),
                None => Ok(()),
            },
            &|tx| tx.country.clear(),
        )?;
        optional(
            &mut tx,
            &|tx| match json_str(get("channel"), "channel")? {
                Some(s) => tx.set_channel(s.as_bytes()),
                None => Ok(()),
            },
            &|tx| tx.channel = None,
        )?;
        optional(
            &mut tx,
            &|tx| match get("mcc") {
                None => Ok(()),
                Some(Value::String(s)) => tx.set_mcc(s.as_bytes()),
                Some(other) => tx.set_mcc(other.to_string().as_bytes()),
            },
            &|tx| tx.mcc = None,
        )?;
        optional(
            &mut tx,
            &|tx| {
                tx.lat = json_coordinate(get("lat"), "lat", 90.0)?;
                Ok(())
            },
            &|tx| tx.lat = None,
        )?;
        optional(
            &mut tx,
            &|tx| {
                tx.lon = json_coordinate(get("lon"), "lon", 180.0)?;
                Ok(())
            },
            &|tx| tx.lon = None,
        )?;
        optional(
            &mut tx,
            &|tx| match get("is_fraud") {
                None => Ok(()),
                Some(Value::Bool(b)) => {
                    tx.is_fraud = Some(*b);
                    Ok(())
                }
                Some(Value::String(s)) => tx.set_label(s.as_bytes()),
                Some(other) => tx.set_label(other.to_string().as_bytes()),
            },
            &|tx| tx.is_fraud = None,
        )?;
        optional(
            &mut tx,
            &|tx| {
                if let Some(v) = get("attributes") {
                    tx.attributes = Attributes::from_json(v)?;
                }
                Ok(())
            },
            &|tx| tx.attributes.clear(),
        )?;
        Ok(tx)
    }

    /// The JSON form, as accepted by [`Transaction::from_json`].
    pub fn to_json(&self) -> Value {
        let mut ts = String::with_capacity(20);
        super::time::format_utc(self.time.utc, &mut ts);
        let mut m = serde_json::Map::new();
        m.insert("transaction_id".into(), self.transaction_id.clone().into());
        m.insert("timestamp".into(), ts.into());
        m.insert("card_id".into(), self.card_id.clone().into());
        m.insert("merchant_id".into(), self.merchant_id.clone().into());
        m.insert("amount".into(), self.amount.into());
        if !self.currency.is_empty() {
            m.insert("currency".into(), self.currency.clone().into());
        }
        if let Some(mcc) = self.mcc {
            m.insert("mcc".into(), format!("{mcc:04}").into());
        }
        if !self.country.is_empty() {
            m.insert("country".into(), self.country.clone().into());
        }
        if let Some(c) = self.channel {
            m.insert("channel".into(), c.as_str().into());
        }
        if let (Some(lat), Some(lon)) = (self.lat, self.lon) {
            m.insert("lat".into(), lat.into());
            m.insert("lon".into(), lon.into());
        }
        if let Some(f) = self.is_fraud {
            m.insert("is_fraud".into(), u8::from(f).into());
        }
        if !self.attributes.is_empty() {
            m.insert("attributes".into(), self.attributes.to_json());
        }
        Value::Object(m)
    }
}

/// Parses a plain decimal (`-12.34`) exactly and fast: the digits as an
/// integer divided by a power of ten, both exact, so the one rounding is the
/// division's, as `str::parse` would round. Anything else goes to `str::parse`.
pub fn parse_number(raw: &[u8]) -> Option<f64> {
    const POW10: [f64; 16] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
    ];
    let (neg, digits) = match raw.first() {
        Some(b'-') => (true, &raw[1..]),
        _ => (false, raw),
    };
    let mut mantissa = 0u64;
    let mut n = 0usize;
    let mut frac: Option<usize> = None;
    for &c in digits {
        match c {
            b'0'..=b'9' => {
                mantissa = mantissa * 10 + (c - b'0') as u64;
                n += 1;
                if let Some(f) = frac.as_mut() {
                    *f += 1;
                }
            }
            b'.' if frac.is_none() => frac = Some(0),
            _ => return std::str::from_utf8(raw).ok()?.trim().parse().ok(),
        }
    }
    if n == 0 || n > 15 {
        return std::str::from_utf8(raw).ok()?.trim().parse().ok();
    }
    let v = mantissa as f64 / POW10[frac.unwrap_or(0)];
    Some(if neg { -v } else { v })
}

fn set_required_str(dst: &mut String, field: &'static str, raw: &[u8]) -> Result<(), FieldError> {
    let s = if raw.is_ascii() {
        // SAFETY: ASCII is valid UTF-8; checking that is cheaper than the
        // general check, and tokens are ASCII almost always.
        unsafe { std::str::from_utf8_unchecked(raw) }
    } else {
        std::str::from_utf8(raw).map_err(|_| FieldError::new(field, "not valid UTF-8"))?
    };
    // ASCII spaces only, as the API's schema says (`[^\t\n\f\r ]`): what
    // counts as a Unicode space differs between languages, and a client
    // must be able to tell from the schema which ids are blank.
    let s = s.trim_ascii();
    if s.is_empty() {
        return Err(FieldError::missing(field));
    }
    dst.clear();
    dst.push_str(s);
    Ok(())
}

fn set_code(
    dst: &mut String,
    field: &'static str,
    raw: &[u8],
    len: usize,
    what: &str,
) -> Result<(), FieldError> {
    dst.clear();
    if raw.is_empty() {
        return Ok(());
    }
    if raw.len() != len || !raw.iter().all(|c| c.is_ascii_alphabetic()) {
        return Err(FieldError::new(
            field,
            format!("expected {what}, got {}", shown(raw)),
        ));
    }
    dst.extend(raw.iter().map(|c| c.to_ascii_uppercase() as char));
    Ok(())
}

fn parse_coordinate(
    field: &'static str,
    raw: &[u8],
    bound: f64,
) -> Result<Option<f64>, FieldError> {
    if raw.is_empty() {
        return Ok(None);
    }
    check_coordinate(field, parse_number(raw), bound, raw)
}

fn check_coordinate(
    field: &'static str,
    v: Option<f64>,
    bound: f64,
    raw: &[u8],
) -> Result<Option<f64>, FieldError> {
    match v {
        Some(x) if x.is_finite() && x.abs() <= bound => Ok(Some(x)),
        _ => Err(FieldError::new(
            field,
            format!(
                "expected a number in [-{bound}, {bound}], got {}",
                shown(raw)
            ),
        )),
    }
}

fn json_str<'a>(v: Option<&'a Value>, field: &'static str) -> Result<Option<&'a str>, FieldError> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(FieldError::new(field, "expected a string")),
    }
}

/// Card and merchant tokens: strings, though integer ids are accepted as-is.
fn json_id(v: Option<&Value>, field: &'static str) -> Result<String, FieldError> {
    match v {
        None => Err(FieldError::missing(field)),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => Ok(n.to_string()),
        Some(_) => Err(FieldError::new(field, "expected a string")),
    }
}

fn json_coordinate(
    v: Option<&Value>,
    field: &'static str,
    bound: f64,
) -> Result<Option<f64>, FieldError> {
    match v {
        None => Ok(None),
        Some(Value::Number(n)) => {
            check_coordinate(field, n.as_f64(), bound, n.to_string().as_bytes())
        }
        Some(Value::String(s)) => parse_coordinate(field, s.as_bytes(), bound),
        Some(other) => check_coordinate(field, None, bound, other.to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trip() {
        let v = json!({"transaction_id": 7, "timestamp": "2018-04-01T10:00:00Z", "card_id": "c1",
            "merchant_id": "m1", "amount": 12.5, "channel": "ecom", "lat": 45.0, "lon": 5.0,
            "mcc": "5411", "currency": "eur", "extra": [1, 2], "is_fraud": 1});
        let tx = Transaction::from_json(&v).unwrap();
        assert_eq!(tx.transaction_id, "7");
        assert_eq!(tx.currency, "EUR");
        assert_eq!(tx.mcc, Some(5411));
        assert_eq!(tx.channel, Some(Channel::Ecom));
        assert_eq!(tx.is_fraud, Some(true));
        assert_eq!(Transaction::from_json(&tx.to_json()).unwrap(), tx);
    }

    #[test]
    fn attributes_round_trip_and_name_what_is_wrong() {
        let v = json!({"transaction_id": "t", "timestamp": "2018-04-01T10:00:00Z", "card_id": "c1",
            "merchant_id": "m1", "amount": 1,
            "attributes": {"device_id": "d-17", "account_age_days": 12, "ip": null}});
        let tx = Transaction::from_json(&v).unwrap();
        assert_eq!(
            tx.attributes.get("device_id"),
            Some(&AttrValue::Text("d-17".into()))
        );
        assert_eq!(
            tx.attributes.get("account_age_days"),
            Some(&AttrValue::Number(12.0))
        );
        assert_eq!(tx.attributes.get("ip"), None, "null is absent");
        assert_eq!(Transaction::from_json(&tx.to_json()).unwrap(), tx);

        let with = |attributes: Value| {
            let mut v = v.clone();
            v["attributes"] = attributes;
            v
        };
        let e = Transaction::from_json(&with(json!({"device_id": [1]}))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "field `attributes`: `device_id`: expected a string or a number"
        );
        let e = Transaction::from_json(&with(json!("d-17"))).unwrap_err();
        assert_eq!(e.field, "attributes");
        let long = "x".repeat(Attributes::MAX_TEXT + 1);
        let e = Transaction::from_json(&with(json!({ "note": long }))).unwrap_err();
        assert!(e.reason.contains("`note`: longer than 256 bytes"), "{e}");
        let many: serde_json::Map<String, Value> = (0..=Attributes::MAX_KEYS)
            .map(|i| (format!("k{i}"), json!(i)))
            .collect();
        let e = Transaction::from_json(&with(Value::Object(many))).unwrap_err();
        assert!(e.reason.contains("more than 32 attributes"), "{e}");
        let nulls: serde_json::Map<String, Value> = (0..=Attributes::MAX_KEYS)
            .map(|i| (format!("k{i}"), Value::Null))
            .collect();
        let e = Transaction::from_json(&with(Value::Object(nulls))).unwrap_err();
        assert!(e.reason.contains("more than 32 attributes"), "{e}");
        // From a stream, a bad object is left out and reported, the rest scored.
        let mut ignored = Vec::new();
        let tx = Transaction::from_json_lenient(&with(json!({"device_id": true})), &mut ignored)
            .unwrap();
        assert!(tx.attributes.is_empty());
        assert_eq!(ignored.len(), 1);
        assert_eq!(ignored[0].field, "attributes");
    }

    #[test]
    fn fast_numbers_parse_exactly_as_std() {
        for text in [
            "0",
            "57.16",
            "-0.5",
            "123456789.123456",
            "48.2920",
            "0.1",
            "9999999999.99",
            " 12.5",
            "1e3",
            "1.2.3",
            "",
            "-",
            ".",
        ] {
            let want: Option<f64> = text.trim().parse().ok();
            assert_eq!(parse_number(text.as_bytes()), want, "{text:?}");
        }
        let mut x = 1u64;
        for _ in 0..10_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let text = format!("{}.{:02}", (x >> 40) % 100_000, (x >> 20) % 100);
            assert_eq!(parse_number(text.as_bytes()), text.parse().ok(), "{text}");
        }
    }

    #[test]
    fn json_errors_name_the_field() {
        let base = json!({"transaction_id": "t", "timestamp": "2018-04-01T10:00:00Z",
            "card_id": "c", "merchant_id": "m", "amount": 1.0});
        assert!(Transaction::from_json(&base).is_ok());
        let cases = [
            ("amount", json!(-3.0)),
            ("amount", json!("lots")),
            ("timestamp", json!("01/04/2018")),
            ("card_id", json!(["x"])),
            ("lat", json!(123.0)),
            ("channel", json!("fax")),
            ("is_fraud", json!(2)),
        ];
        for (field, bad) in cases {
            let mut v = base.clone();
            v[field] = bad;
            let err = Transaction::from_json(&v).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
        for field in [
            "transaction_id",
            "timestamp",
            "card_id",
            "merchant_id",
            "amount",
        ] {
            let mut v = base.clone();
            v.as_object_mut().unwrap().remove(field);
            let err = Transaction::from_json(&v).unwrap_err();
            assert_eq!(err.field, field);
            assert!(err.to_string().contains("missing"), "{err}");
        }
    }
}
