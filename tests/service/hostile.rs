//! Hostile input: poison messages interleaved with a simulated stream, then
//! again after a restart. None may change the state behind the stream's
//! alerts; each is dead-lettered or counted with its reason, and the
//! service stays ready.

use super::*;

/// One row of the simulated CSV, as far as the poisons need it.
struct Row {
    id: String,
    timestamp: String,
    card: String,
    merchant: String,
    amount: String,
}

fn row(data: &Path, index: usize) -> Row {
    let text = std::fs::read_to_string(data).unwrap();
    let line = text.lines().nth(index + 1).expect("row in the file");
    let cols: Vec<&str> = line.split(',').collect();
    Row {
        id: cols[0].into(),
        timestamp: cols[1].into(),
        card: cols[2].into(),
        merchant: cols[3].into(),
        amount: cols[4].into(),
    }
}

fn tx(id: &str, ts: &str, card: &str, merchant: &str, amount: &str, extra: &str) -> String {
    format!(
        r#"{{"transaction_id":"{id}","timestamp":"{ts}","card_id":"{card}","merchant_id":"{merchant}","amount":{amount}{extra}}}"#
    )
}

/// Sends one message with a key of its own choosing.
fn send_keyed(topic: &str, key: &str, payload: &str) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let p: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker())
        // The input topic allows 2 MB messages, more than the service takes.
        .set("message.max.bytes", "2000000")
        .create()
        .unwrap();
    p.send(BaseRecord::to(topic).key(key).payload(payload))
        .map_err(|(e, _)| e)
        .unwrap();
    p.flush(Duration::from_secs(10)).unwrap();
}

/// Size of the oversized poison: near the 1 MB most brokers allow.
const BIG: usize = 1_040_000;

/// The poisons of one round, sent in the middle of the stream. Those that
/// are scored (the 1970 one, a wrong channel, a wrong key) are on cards and
/// merchants of their own, or late, so that the stream's alerts must not
/// change; the rest are on a card and a merchant the stream uses, and the
/// duplicate is a second delivery of `before`, a transaction already read.
fn send_poisons(dir: &Path, n: &Names, round: u32, at: &Row, before: &Row) {
    let p = |what: &str| format!("poison-{what}-{round}");
    let lines = [
        tx(
            &p("future"),
            "9999-12-31T23:59:59Z",
            &at.card,
            &at.merchant,
            "12.5",
            "",
        ),
        tx(
            &p("ancient"),
            "1970-01-01T00:00:00Z",
            &at.card,
            &p("merchant-ancient"),
            "12.5",
            "",
        ),
        tx(
            &p("huge"),
            &at.timestamp,
            &at.card,
            &at.merchant,
            "1e39",
            "",
        ),
        tx(
            &p("channel"),
            &at.timestamp,
            &p("card-channel"),
            &p("merchant-channel"),
            "3.5",
            r#","channel":"carrier-pigeon""#,
        ),
    ];
    produce_raw(
        &dir.join(format!("poisons-{round}.jsonl")),
        &lines.join("\n"),
        &n.input,
    );
    send_keyed(
        &n.input,
        "not-the-card",
        &tx(
            &p("key"),
            &at.timestamp,
            &p("card-key"),
            &p("merchant-key"),
            "4.5",
            "",
        ),
    );
    send_keyed(
        &n.input,
        &before.card,
        &tx(
            &before.id,
            &before.timestamp,
            &before.card,
            &before.merchant,
            &before.amount,
            "",
        ),
    );
    let pad = format!(r#","pad":"{}""#, "x".repeat(BIG));
    let big = tx(
        &p("big"),
        &at.timestamp,
        &at.card,
        &at.merchant,
        "1.5",
        &pad,
    );
    send_keyed(&n.input, &at.card, &big[..BIG]);
}

/// Poisons scored rather than dead-lettered, per round.
const SCORED_POISONS: usize = 3;

fn scored_ids(n: &Names, want: usize) -> BTreeSet<String> {
    transaction_ids_of(&read_topic(&n.scores, want, Duration::from_secs(120)))
}

#[test]
fn poisons_change_no_alert_and_each_is_accounted_for() {
    let dir = workdir("hostile");
    let data = simulate(&dir, 300, 20, 17);
    let want = expected_alerts(&dir, &data);
    let ids = transaction_ids(&data);
    let split = ids.len() / 2;
    let at = row(&data, split);
    let before = row(&data, split - 2);
    let n = names("hostile");
    topics(&n, 6);
    let half = |first: bool| {
        let (skip, limit) = (split.to_string(), split.to_string());
        let args: Vec<&str> = if first {
            vec!["--limit", &limit]
        } else {
            vec!["--skip", &skip]
        };
        produce(&data, &n, &args);
    };

    half(true);
    send_poisons(&dir, &n, 1, &at, &before);
    let first = Service::start(&n, "first", &[], &[]);
    let scored = scored_ids(&n, split + SCORED_POISONS);
    assert!(scored.len() >= split + SCORED_POISONS, "first half scored");
    assert_eq!(first.get("/readyz").0, 200, "ready after the poisons");
    for (series, want) in [
        (
            r#"peregrine_dead_letters_total{reason="future_timestamp"}"#,
            1.0,
        ),
        (
            r#"peregrine_dead_letters_total{reason="amount_over_limit"}"#,
            1.0,
        ),
        (r#"peregrine_dead_letters_total{reason="oversize"}"#, 1.0),
        (r#"peregrine_fields_ignored_total{field="channel"}"#, 1.0),
        ("peregrine_key_mismatch_total", 1.0),
        ("peregrine_duplicates_total", 1.0),
    ] {
        assert_eq!(first.series(series), want, "{series}");
    }
    assert!(first.metric("peregrine_transactions_late_total") >= 1.0);
    assert_eq!(first.terminate(Duration::from_secs(30)).code(), Some(0));

    let second = Service::start(&n, "second", &[], &[]);
    second.wait_ready(Duration::from_secs(60));
    send_poisons(&dir, &n, 2, &at, &before);
    half(false);
    let scored = scored_ids(&n, ids.len() + 2 * SCORED_POISONS);
    let missing: Vec<_> = ids.difference(&scored).take(5).collect();
    assert!(missing.is_empty(), "never scored: {missing:?}");
    assert_eq!(second.get("/readyz").0, 200, "ready after the poisons");
    assert_eq!(
        second.series(r#"peregrine_dead_letters_total{reason="future_timestamp"}"#),
        1.0
    );
    assert_eq!(second.metric("peregrine_key_mismatch_total"), 1.0);
    assert_eq!(second.metric("peregrine_duplicates_total"), 1.0);
    assert_eq!(
        second.series(r#"peregrine_dead_letters_total{reason="oversize"}"#),
        1.0
    );

    let msgs = read_topic(&n.alerts, want.len(), Duration::from_secs(30));
    let clean: Vec<Value> = msgs
        .into_iter()
        .filter(|m| {
            !m["payload"]["transaction_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("poison-"))
        })
        .collect();
    let (got, _) = alerts_by_id(&clean);
    assert_same_alerts(&got, &want);

    let dead = read_topic_until(&n.dlq, Duration::from_secs(30), |m| m.len() >= 6);
    let mut reasons: Vec<&str> = dead
        .iter()
        .map(|d| d["headers"]["peregrine-reason"].as_str().unwrap())
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "amount_over_limit",
            "amount_over_limit",
            "future_timestamp",
            "future_timestamp",
            "oversize",
            "oversize"
        ]
    );
    for d in &dead {
        let err = d["headers"]["peregrine-error"].as_str().unwrap();
        if d["headers"]["peregrine-reason"] == "oversize" {
            // Cut to fit the dead-letter topic, with the size it had.
            assert_eq!(d["headers"]["peregrine-original-size"], BIG.to_string());
            assert_eq!(d["payload"].as_str().unwrap().len(), 512 * 1024);
            continue;
        }
        assert!(
            err.contains("max_clock_skew_secs") || err.contains("max_amount"),
            "{err}"
        );
    }
    assert_eq!(second.terminate(Duration::from_secs(30)).code(), Some(0));
}
