//! Generated hostile input for the three parsers that read what others
//! write: the Kafka message decoder, the CSV reader and the rules parser.
//! None may panic, and every refusal must name what was wrong.
//!
//! Cases per parser: `PEREGRINE_FUZZ_CASES` (default 2,000 for CI);
//! BENCHMARKS.md runs a million in all.

use peregrine::ingest::decode::{DeadReason, Limits, decode};
use peregrine::ingest::reader::{ReadError, TransactionReader};
use peregrine::ingest::transaction::Transaction;
use peregrine::model::rules::parse_rules;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const NOW: i64 = 1_700_000_000;
const FIELDS: [&str; 14] = [
    "transaction_id",
    "timestamp",
    "card_id",
    "merchant_id",
    "amount",
    "currency",
    "country",
    "mcc",
    "channel",
    "lat",
    "lon",
    "is_fraud",
    "attributes",
    // A column in CSV, an unknown field in JSON.
    "attributes.device_id",
];
const OPTIONAL: [&str; 8] = [
    "currency",
    "country",
    "mcc",
    "channel",
    "lat",
    "lon",
    "is_fraud",
    "attributes",
];

fn cases() -> u32 {
    std::env::var("PEREGRINE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

/// A JSON value of any shape, mostly the kind a field might hold.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{Value, json};
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|x| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)),
        prop_oneof![
            Just(1e39),
            Just(-0.0),
            Just(1.49e308),
            Just(f64::MAX),
            Just(1e-320)
        ]
        .prop_map(|x| json!(x)),
        "\\PC{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("9999-12-31T23:59:59Z"),
            Just("1970-01-01T00:00:00Z"),
            Just("2023-11-14T22:13:20+14:00"),
            Just("2023-02-30T00:00:00Z"),
            Just("2023-11-14 22:13:20"),
            Just("1700000000"),
            Just("ecom"),
            Just("pos"),
            Just("USA"),
            Just("US"),
        ]
        .prop_map(|s| Value::String(s.into())),
        prop::collection::vec(any::<u8>(), 0..3).prop_map(|v| json!(v)),
        Just(json!({"nested": {"deep": [1, 2]}})),
    ]
}

/// A transaction object with every field's value drawn from anywhere,
/// some fields left out and some unknown ones added.
fn transaction_object() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec((any::<bool>(), json_value()), FIELDS.len()),
        prop::option::of(("[a-z_]{1,8}", json_value())),
    )
        .prop_map(|(values, extra)| {
            let mut o = serde_json::Map::new();
            for (name, (keep, v)) in FIELDS.iter().zip(values) {
                if keep {
                    o.insert(name.to_string(), v);
                }
            }
            if let Some((k, v)) = extra {
                o.insert(k, v);
            }
            serde_json::to_vec(&o).unwrap()
        })
}

/// A valid transaction, then cut or with bytes changed.
fn damaged_transaction() -> impl Strategy<Value = Vec<u8>> {
    let valid = br#"{"transaction_id":"t1","timestamp":"2023-11-14T22:00:00Z","card_id":"c1","merchant_id":"m1","amount":12.5,"currency":"EUR","country":"FR","mcc":5411,"channel":"pos","lat":48.8,"lon":2.3}"#;
    (0..valid.len(), any::<u8>(), 0..valid.len(), any::<bool>()).prop_map(
        move |(at, byte, cut, change)| {
            let mut v = valid.to_vec();
            if change {
                v[at] = byte;
            } else {
                v.truncate(cut);
            }
            v
        },
    )
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        transaction_object(),
        transaction_object(),
        damaged_transaction(),
    ]
}

#[test]
fn the_message_decoder_names_every_refusal() {
    let limits = Limits {
        max_bytes: 64 * 1024,
        max_amount: 1e9,
        max_clock_skew_secs: 600,
    };
    runner()
        .run(&payload(), |bytes| {
            let mut ignored = Vec::new();
            match decode(Some(&bytes), &limits, NOW, &mut ignored) {
                Ok(tx) => {
                    prop_assert!(tx.amount.is_finite() && (0.0..=1e9).contains(&tx.amount));
                    prop_assert!(tx.time.utc <= NOW + 600);
                    prop_assert!(!tx.card_id.is_empty() && !tx.transaction_id.is_empty());
                    for e in &ignored {
                        prop_assert!(OPTIONAL.contains(&e.field), "{e:?}");
                        prop_assert!(!e.reason.is_empty());
                    }
                }
                Err((reason, detail)) => {
                    prop_assert!(!detail.trim().is_empty(), "{reason:?} without detail");
                    if reason == DeadReason::InvalidField {
                        // A payload that is JSON but not an object names the body.
                        prop_assert!(
                            FIELDS.iter().chain(&["(body)"]).any(|f| detail.contains(f)),
                            "names no field: {detail}"
                        );
                    }
                }
            }
            Ok(())
        })
        .unwrap();
}

/// A CSV cell: plain, quoted with commas, quotes and line breaks, or bytes.
fn cell() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-zA-Z0-9 .:+-]{0,12}".prop_map(String::into_bytes),
        "[a-z,\"\n\r ]{0,8}".prop_map(|s| format!("\"{s}\"").into_bytes()),
        prop_oneof![
            Just("2023-11-14T22:00:00Z"),
            Just("9999-12-31T23:59:59Z"),
            Just("1e39"),
            Just("NaN"),
            Just("-1"),
            Just("inf"),
            Just("\"unterminated"),
        ]
        .prop_map(|s| s.as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 0..6),
    ]
}

fn csv_file() -> impl Strategy<Value = Vec<u8>> {
    (
        Just(FIELDS.to_vec()).prop_shuffle(),
        0usize..=FIELDS.len(),
        prop::collection::vec(prop::collection::vec(cell(), 0..14), 0..6),
        any::<bool>(),
    )
        .prop_map(|(names, keep, rows, crlf)| {
            let end: &[u8] = if crlf { b"\r\n" } else { b"\n" };
            let mut out = names[..keep].join(",").into_bytes();
            for row in rows {
                out.extend_from_slice(end);
                out.extend_from_slice(&row.join(&b","[..]));
            }
            out
        })
}

#[test]
fn the_csv_reader_names_every_refusal() {
    runner()
        .run(&csv_file(), |bytes| {
            let rows = bytes.iter().filter(|&&b| b == b'\n').count() + 2;
            let mut reader =
                match TransactionReader::from_reader(Box::new(std::io::Cursor::new(bytes))) {
                    Ok(r) => r,
                    Err(e) => {
                        prop_assert!(named(&e), "{e}");
                        return Ok(());
                    }
                };
            let mut tx = Transaction::default();
            // A reader that never ends would hang the run: it may take at
            // most one step per line and a few more.
            for _ in 0..rows + 2 {
                match reader.next_into(&mut tx) {
                    Ok(false) => return Ok(()),
                    Ok(true) => {
                        prop_assert!(tx.amount.is_finite() && tx.amount >= 0.0);
                        prop_assert!(!tx.card_id.is_empty());
                    }
                    Err(e) => prop_assert!(named(&e), "{e}"),
                }
            }
            prop_assert!(false, "the reader did not end after {rows} lines");
            Ok(())
        })
        .unwrap();
}

/// An error that says where and what: a line, and a field or a reason.
fn named(e: &ReadError) -> bool {
    match e {
        ReadError::Row { line, source } => {
            // A JSON Lines row that is not an object names the body.
            let field = FIELDS.contains(&source.field) || source.field == "(body)";
            *line >= 1 && field && !source.reason.is_empty()
        }
        ReadError::Format { line, reason } => *line >= 1 && !reason.trim().is_empty(),
        ReadError::Io(e) => !e.to_string().is_empty(),
    }
}

/// Rules text from the grammar's own words and operators, shuffled, and
/// from anything at all.
fn rules_text() -> impl Strategy<Value = String> {
    let word = prop_oneof![
        Just("amount"),
        Just("card.count_1h"),
        Just("score"),
        Just("anomaly"),
        Just("no_such_feature"),
        Just("high"),
        Just("medium"),
        Just("low"),
        Just("severe"),
        Just(":"),
        Just("and"),
        Just("or"),
        Just("not"),
        Just("("),
        Just(")"),
        Just("<"),
        Just(">="),
        Just("=="),
        Just("!="),
        Just("+"),
        Just("-"),
        Just("*"),
        Just("/"),
        Just("1e999"),
        Just("0.5"),
        Just("-3"),
        Just("#"),
        Just("\n"),
        Just("big_amount"),
    ];
    prop_oneof![
        prop::collection::vec(word, 0..24).prop_map(|w| w.join(" ")),
        "\\PC{0,40}",
        "[a-z_]{1,6} (low|high): [a-z_.0-9<>=!()+*/ -]{0,30}",
    ]
}

#[test]
fn the_rules_parser_names_every_refusal() {
    runner()
        .run(&rules_text(), |text| {
            if let Err(e) = parse_rules(&text) {
                prop_assert!(e.line >= 1 && e.line <= text.lines().count().max(1), "{e}");
                prop_assert!(e.column >= 1, "{e}");
                prop_assert!(!e.message.trim().is_empty(), "{e}");
            }
            Ok(())
        })
        .unwrap();
}
