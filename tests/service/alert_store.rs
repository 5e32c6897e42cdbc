//! The alert store on a real PostgreSQL (`scripts/pg-up`): the sink that
//! fills it from the alert topic, across a kill -9; the analysts' routes;
//! a decision becoming a label and a merchant feature; and every SQL query
//! of the dashboard run against what they wrote.

use super::*;
use tokio_postgres::{NoTls, SimpleQueryMessage};

const ANALYST_TOKEN: &str = "analyst-token-for-tests-0001";

/// The test PostgreSQL server: `POSTGRES_TEST_URL` if set (a
/// connection string to its `postgres` database), else a cluster that
/// `scripts/pg-up` starts on a fixed loopback port.
fn server() -> &'static str {
    static SERVER: OnceLock<String> = OnceLock::new();
    SERVER.get_or_init(|| shared_server("POSTGRES_TEST_URL", "pg-up", 15432, str::to_string))
}

/// A new database of the test's own; its connection string.
fn database(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "t_{test}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    sql(server(), &format!("CREATE DATABASE {name}"));
    let (base, _) = server().rsplit_once('/').expect("a connection string");
    format!("{base}/{name}")
}

/// Runs statements; the rows of the last, as text (NULL as `None`).
fn sql(url: &str, query: &str) -> Vec<Vec<Option<String>>> {
    try_sql(url, query).unwrap_or_else(|e| panic!("{e} in:\n{query}"))
}

fn try_sql(url: &str, query: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
        tokio::spawn(conn);
        let messages = client
            .simple_query(query)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let mut rows = Vec::new();
        for m in messages {
            match m {
                SimpleQueryMessage::Row(r) => {
                    rows.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                SimpleQueryMessage::CommandComplete(_) => {}
                _ => {}
            }
        }
        Ok(rows)
    })
}

fn count(url: &str, query: &str) -> usize {
    sql(url, query)[0][0].as_deref().unwrap().parse().unwrap()
}

/// [`count`], 0 while the sink has not made the schema yet.
fn stored(url: &str, query: &str) -> usize {
    try_sql(url, query).map_or(0, |rows| rows[0][0].as_deref().unwrap().parse().unwrap())
}

/// A running `peregrine sink`, with its metrics address; killed when dropped.
struct Sink(Child, String);

impl Sink {
    fn start(n: &Names, db: &str, name: &str) -> Sink {
        let log = workdir("logs").join(format!("{}-sink-{name}.log", n.group));
        let http = format!("127.0.0.1:{}", free_port());
        let child = Command::new(BIN)
            .args(["sink", "--brokers", broker(), "--alert-topic", &n.alerts])
            .args(["--postgres", db, "--group-id", &format!("{}-sink", n.group)])
            .args(["--http-addr", &http])
            // A killed sink leaves the group after 6 s, not Kafka's 45 s default.
            .args([
                "-X",
                "session.timeout.ms=6000",
                "-X",
                "heartbeat.interval.ms=500",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        Sink(child, http)
    }

    /// A series of its `/metrics`, as exposed; 0 when absent.
    fn series(&self, series: &str) -> f64 {
        series_at(&self.1, series)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The alerts on the topic by id, and the messages that are not alerts.
fn alerts_on_topic(msgs: &[Value]) -> (BTreeMap<String, Value>, Vec<&Value>) {
    let (alerts, other): (Vec<&Value>, Vec<&Value>) = msgs
        .iter()
        .partition(|m| m["payload"]["alert_id"].is_string());
    let by_id = alerts
        .iter()
        .map(|m| {
            let a = &m["payload"];
            (a["alert_id"].as_str().unwrap().to_string(), a.clone())
        })
        .collect();
    (by_id, other)
}

fn wait_until(limit: Duration, what: &str, cond: impl Fn() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Acceptance 1: the table holds exactly the alerts on the alert topic,
/// each once, after the sink is killed with SIGKILL mid-stream and
/// restarted; a message that is not an alert is kept with its reason.
#[test]
fn the_sink_stores_each_alert_once_across_a_kill() {
    let dir = workdir("sink");
    let data = simulate(&dir, 300, 30, 21);
    let total = transaction_ids(&data).len();
    let n = names("sink");
    topics(&n, 3);
    let db = database("sink");
    let svc = Service::start(&n, "scorer", &[], &[]);
    let sink = Sink::start(&n, &db, "first");
    // Paced, so that the sink is killed while alerts still arrive.
    let producer = produce_in_background(&data, &n, &["--rate", "2500"]);
    wait_until(Duration::from_secs(90), "the first alerts stored", || {
        stored(&db, "SELECT count(*) FROM alerts") >= 20
    });
    drop(sink); // SIGKILL
    let at_kill = count(&db, "SELECT count(*) FROM alerts");
    producer.join().unwrap();
    // Not an alert; and an alert whose time PostgreSQL refuses (year 0),
    // which must not hold the partition.
    let poison = format!(
        "{{\"alert_id\": 7}}\n{}\n",
        r#"{"alert_id":"al-year-zero","transaction_id":"t","card_id":"c","merchant_id":"m","amount":1,"event_time":"0000-01-01T00:00:00Z","score":0.9,"decision":"block","model_version":"v","reasons":{},"produced_at":"2026-01-01T00:00:00Z"}"#
    );
    produce_raw(&dir.join("poison.txt"), &poison, &n.alerts);
    svc.wait_for(Duration::from_secs(120), "every transaction scored", |s| {
        s.metric("peregrine_transactions_scored_total") as usize >= total
    });
    let produced = svc.metric("peregrine_alerts_total") as usize;
    let msgs = read_topic_until(&n.alerts, Duration::from_secs(60), |m| {
        m.len() > produced + 1
    });
    let (mut want, other) = alerts_on_topic(&msgs);
    assert_eq!(other.len(), 1, "the one message that is not an alert");
    assert!(want.remove("al-year-zero").is_some());
    assert!(
        at_kill > 0 && at_kill < want.len(),
        "killed mid-stream: {at_kill} of {} stored",
        want.len()
    );

    let sink = Sink::start(&n, &db, "second");
    wait_until(Duration::from_secs(90), "every alert stored", || {
        count(&db, "SELECT count(*) FROM alerts") >= want.len()
            && count(&db, "SELECT count(*) FROM alert_rejects") >= 2
    });
    // A little longer: nothing more may arrive.
    std::thread::sleep(Duration::from_secs(2));
    let rows = sql(
        &db,
        "SELECT alert_id, card_id, merchant_id, decision, score, transaction_id, \
         to_char(event_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
         FROM alerts",
    );
    let stored: BTreeSet<&str> = rows.iter().map(|r| r[0].as_deref().unwrap()).collect();
    assert_eq!(rows.len(), want.len(), "each alert once");
    assert_eq!(
        stored,
        want.keys().map(String::as_str).collect(),
        "exactly the alerts on the topic"
    );
    for r in &rows {
        let a = &want[r[0].as_deref().unwrap()];
        let text = |i: usize| r[i].as_deref().unwrap();
        assert_eq!(text(1), a["card_id"], "card_id of {a}");
        assert_eq!(text(2), a["merchant_id"], "merchant_id of {a}");
        assert_eq!(text(3), a["decision"], "decision of {a}");
        let score: f64 = text(4).parse().unwrap();
        assert!((score - a["score"].as_f64().unwrap()).abs() < 1e-12);
        assert_eq!(text(5), a["transaction_id"]);
        assert_eq!(text(6), a["event_time"]);
    }
    // The two went to partitions of their own choosing: told apart by
    // payload, not by offset.
    let rejected = sql(
        &db,
        "SELECT reason, convert_from(payload, 'UTF8') FROM alert_rejects",
    );
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    let (not_alert, year_zero): (Vec<_>, Vec<_>) = rejected
        .iter()
        .partition(|r| r[1].as_deref() == Some("{\"alert_id\": 7}"));
    assert_eq!(not_alert.len(), 1, "{rejected:?}");
    assert!(
        not_alert[0][0].as_deref().unwrap().contains("alert_id"),
        "the reason names the field: {:?}",
        not_alert[0]
    );
    assert!(
        year_zero[0][0].as_deref().unwrap().contains("out of range"),
        "the store's reason: {:?}",
        year_zero[0]
    );
    assert_eq!(
        sink.series("peregrine_sink_alerts_total{outcome=\"rejected\"}"),
        2.0,
        "the restarted sink counted both"
    );
    // An alert whose id another transaction's alert holds (a collision of
    // the 64-bit id) is refused visibly; the stored one stays.
    let (taken, first) = want.iter().next().unwrap();
    let mut collision = first.clone();
    collision["transaction_id"] = Value::from("another-transaction");
    collision["produced_at"] = Value::from("2099-01-01T00:00:00Z");
    produce_raw(
        &dir.join("collision.txt"),
        &format!("{collision}\n"),
        &n.alerts,
    );
    wait_until(Duration::from_secs(30), "the collision refused", || {
        count(&db, "SELECT count(*) FROM alert_rejects") == 3
    });
    let reason = sql(
        &db,
        "SELECT reason FROM alert_rejects ORDER BY rejected_at DESC LIMIT 1",
    );
    assert!(
        reason[0][0]
            .as_deref()
            .unwrap()
            .contains(&format!("{taken} already names transaction")),
        "{reason:?}"
    );
    let kept = sql(
        &db,
        &format!("SELECT transaction_id FROM alerts WHERE alert_id = '{taken}'"),
    );
    assert_eq!(kept[0][0].as_deref(), first["transaction_id"].as_str());
    let migrations = count(&db, "SELECT max(version) FROM peregrine_migrations");
    assert_eq!(migrations, 1, "the schema at its version");
}

/// The CSV's transactions: id → (is_fraud, time).
fn frauds(data: &Path) -> BTreeMap<String, bool> {
    let text = std::fs::read_to_string(data).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == "is_fraud").unwrap();
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_string(), f[col] == "1")
        })
        .collect()
}

fn probe_at(svc: &Service, merchant: &str, time: &str) -> f64 {
    let tx = format!(
        r#"{{"transaction_id":"probe","timestamp":"{time}","card_id":"probe-card","merchant_id":"{merchant}","amount":10}}"#
    );
    let (status, body) = svc.post("/v1/score", &tx);
    assert_eq!(status, 200, "{body}");
    body["features"]["merchant.risk_7d"].as_f64().unwrap()
}

fn shift(rfc3339: &str, secs: i64) -> String {
    let t = peregrine::ingest::time::parse_timestamp(rfc3339.as_bytes()).unwrap();
    let mut out = String::new();
    peregrine::ingest::time::format_utc(t.utc + secs, &mut out);
    out
}

/// Acceptance 2 and 3, with the sink inside `serve --postgres`: the
/// routes read the store; a decision is recorded, published once on the
/// label topic, and reaches the merchant's risk windows once the label
/// delay allows; then every SQL query of the dashboard returns rows.
#[test]
fn decisions_become_labels_and_the_dashboard_reads_the_store() {
    let dir = workdir("decide");
    let data = simulate(&dir, 200, 20, 3);
    let total = transaction_ids(&data).len();
    let is_fraud = frauds(&data);
    let n = names("decide");
    topics(&n, 3);
    let db = database("decide");
    let sink_group = format!("{}-sink", n.group);
    let svc = Service::start(
        &n,
        "desk",
        &["--postgres", &db],
        &[
            ("PEREGRINE_ANALYST_TOKEN", ANALYST_TOKEN),
            ("PEREGRINE_SINK_GROUP_ID", &sink_group),
        ],
    );
    produce(&data, &n, &[]);
    produce_raw(&dir.join("poison.txt"), "not JSON\n", &n.alerts);
    svc.wait_for(Duration::from_secs(120), "every transaction scored", |s| {
        s.metric("peregrine_transactions_scored_total") as usize >= total
    });
    let produced = svc.metric("peregrine_alerts_total") as usize;
    assert!(
        (50..1000).contains(&produced),
        "the stream has alerts, fewer than a page: {produced}"
    );
    let auth = format!("Bearer {ANALYST_TOKEN}");
    let get = |path: &str| -> (u16, Value) {
        let (status, text) = svc.request("GET", path, &[("Authorization", &auth)], b"");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    };
    let all = |query: &str| -> Vec<Value> {
        let (status, body) = get(&format!("/v1/alerts?limit=1000{query}"));
        assert_eq!(status, 200, "{body}");
        body["alerts"].as_array().unwrap().clone()
    };
    wait_until(Duration::from_secs(60), "every alert in the store", || {
        all("").len() >= produced
    });
    assert_eq!(svc.get("/v1/alerts").0, 401, "the alerts need a token");
    assert_eq!(get("/v1/alerts?decision=maybe").0, 400);
    assert_eq!(get("/v1/alerts?since=yesterday").0, 400);
    assert_eq!(get("/v1/alerts?limit=0").0, 400);

    // The earliest alert on a genuine transaction: no label names it yet.
    let alerts = all("");
    let a = alerts
        .iter()
        .filter(|a| !is_fraud[a["transaction_id"].as_str().unwrap()])
        .min_by_key(|a| a["event_time"].as_str().unwrap().to_string())
        .expect("an alert on a genuine transaction")
        .clone();
    let (id, card, merchant, tx) = (
        a["alert_id"].as_str().unwrap(),
        a["card_id"].as_str().unwrap(),
        a["merchant_id"].as_str().unwrap(),
        a["transaction_id"].as_str().unwrap(),
    );
    let at = &a["event_time"].as_str().unwrap()[..19];
    let at = format!("{at}Z");
    let of_card = all(&format!("&card_id={card}"));
    assert!(of_card.iter().all(|x| x["card_id"] == card));
    assert!(of_card.iter().any(|x| x["alert_id"] == id));
    let reviews = all("&decision=review");
    assert!(reviews.iter().all(|x| x["decision"] == "review"));
    let since = all(&format!("&since={at}"));
    let after = |x: &Value| x["event_time"].as_str().unwrap()[..19] >= at[..19];
    assert_eq!(since.len(), alerts.iter().filter(|x| after(x)).count());
    assert!(since.iter().all(after) && since.iter().any(|x| x["alert_id"] == id));
    assert_eq!(all("&decision=undecided").len(), alerts.len());

    // The merchant's 7-day risk, a week (the label delay) and a day after
    // the transaction, and two days after: still inside the delay.
    let week = shift(&at, 8 * 86_400);
    let early = shift(&at, 2 * 86_400);
    let (before, early_before) = (
        probe_at(&svc, merchant, &week),
        probe_at(&svc, merchant, &early),
    );

    let path = format!("/v1/alerts/{id}/decision");
    let decision = r#"{"outcome": "fraud", "analyst": "ana", "note": "customer confirmed"}"#;
    assert_eq!(svc.post(&path, decision).0, 401, "decisions need a token");
    let (status, body) = svc.post_as(Some(ANALYST_TOKEN), &path, decision);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["label"], "published");

    // In the store.
    let stored = all(&format!("&card_id={card}&decision=fraud"));
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0]["alert_id"], id);
    assert_eq!(stored[0]["analyst"], "ana");
    assert_eq!(stored[0]["note"], "customer confirmed");
    // On the label topic, dated at the transaction.
    let of_tx = |msgs: &[Value]| -> Vec<Value> {
        msgs.iter()
            .filter(|m| m["payload"]["transaction_id"] == tx)
            .map(|m| m["payload"].clone())
            .collect()
    };
    let labels = read_topic_until(&n.labels, Duration::from_secs(30), |m| !of_tx(m).is_empty());
    let label = of_tx(&labels);
    assert_eq!(label.len(), 1, "{label:?}");
    assert_eq!(label[0]["is_fraud"], 1);
    assert_eq!(label[0]["merchant_id"], merchant);
    assert_eq!(label[0]["timestamp"].as_str(), Some(at.as_str()));
    // In the merchant's risk once the label delay allows, not before.
    let deadline = Instant::now() + Duration::from_secs(60);
    while probe_at(&svc, merchant, &week) <= before {
        assert!(
            Instant::now() < deadline,
            "merchant {merchant}'s risk_7d never rose from {before}:\n{}",
            svc.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(probe_at(&svc, merchant, &early), early_before);

    // The same decision again is recorded, but its label is not sent twice.
    let (status, body) = svc.post_as(Some(ANALYST_TOKEN), &path, decision);
    assert_eq!((status, &body["label"]), (200, &Value::from("unchanged")));
    let history = count(
        &db,
        &format!("SELECT count(*) FROM alert_decisions WHERE alert_id = '{id}'"),
    );
    assert_eq!(history, 2, "every decision is kept");
    // A legit decision on another alert, for the precision panels.
    let other = alerts.iter().find(|x| x["alert_id"] != id).unwrap();
    let (status, _) = svc.post_as(
        Some(ANALYST_TOKEN),
        &format!(
            "/v1/alerts/{}/decision",
            other["alert_id"].as_str().unwrap()
        ),
        r#"{"outcome": "legit", "analyst": "bo"}"#,
    );
    assert_eq!(status, 200);
    let (status, body) = svc.post_as(
        Some(ANALYST_TOKEN),
        "/v1/alerts/al-0000000000000000/decision",
        decision,
    );
    assert_eq!(status, 404, "{body}");
    let (status, body) = svc.post_as(
        Some(ANALYST_TOKEN),
        &path,
        r#"{"outcome": "maybe", "analyst": "ana"}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        svc.series("peregrine_decisions_total{label=\"published\",outcome=\"fraud\"}"),
        1.0
    );
    // Legit, then fraud again: the legit label goes out, the fraud's not twice.
    for (outcome, label) in [("legit", "published"), ("fraud", "unchanged")] {
        let body = format!(r#"{{"outcome": "{outcome}", "analyst": "ana"}}"#);
        let (status, got) = svc.post_as(Some(ANALYST_TOKEN), &path, &body);
        assert_eq!(
            (status, got["label"].as_str()),
            (200, Some(label)),
            "{outcome}"
        );
    }
    // Four analysts deciding one alert at once: one label.
    let third = alerts
        .iter()
        .find(|x| x["alert_id"] != id && x["alert_id"] != other["alert_id"])
        .unwrap();
    let third_path = format!(
        "/v1/alerts/{}/decision",
        third["alert_id"].as_str().unwrap()
    );
    let answers: Vec<Value> = (0..4)
        .map(|i| {
            let (addr, path) = (svc.http.clone(), third_path.clone());
            std::thread::spawn(move || {
                let body = format!(r#"{{"outcome": "fraud", "analyst": "analyst-{i}"}}"#);
                let auth = format!("Bearer {ANALYST_TOKEN}");
                let (status, text) = http(
                    &addr,
                    "POST",
                    &path,
                    &[("Authorization", &auth)],
                    body.as_bytes(),
                );
                assert_eq!(status, 200, "{text}");
                serde_json::from_str::<Value>(&text).unwrap()["label"].clone()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert_eq!(
        answers.iter().filter(|l| *l == "published").count(),
        1,
        "{answers:?}"
    );
    let third_tx = third["transaction_id"].clone();
    let later = read_topic_until(&n.labels, Duration::from_secs(5), |_| false);
    let labels_of = |tx: &Value| -> Vec<i64> {
        later
            .iter()
            .filter(|m| m["payload"]["transaction_id"] == *tx)
            .filter(|m| m["payload"]["reported_at"].as_str().unwrap() > "2026")
            .map(|m| m["payload"]["is_fraud"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(
        labels_of(&Value::from(tx)),
        [1, 0],
        "fraud once, then legit"
    );
    assert_eq!(labels_of(&third_tx), [1], "one label for four decisions");

    wait_until(
        Duration::from_secs(30),
        "the rejected message stored",
        || count(&db, "SELECT count(*) FROM alert_rejects") == 1,
    );
    let checked = run_dashboard_queries(&db, card);
    assert!(checked >= 6, "the dashboard's SQL panels: {checked}");
    assert_eq!(svc.terminate(Duration::from_secs(30)).code(), Some(0));
}

/// Runs every SQL query of the dashboard (panels and variables on the
/// alert store) with Grafana's macros and the variables substituted; each
/// must return rows. Returns how many ran.
fn run_dashboard_queries(db: &str, card: &str) -> usize {
    let text = std::fs::read_to_string(format!("{ROOT}/dashboards/peregrine.json")).unwrap();
    let d: Value = serde_json::from_str(&text).unwrap();
    let on_store = |ds: &Value| ds["type"] == "grafana-postgresql-datasource";
    let quoted = |values: &[String]| {
        values
            .iter()
            .map(|v| format!("'{}'", v.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    vars.insert("card_id".into(), card.into());
    let mut checked = 0;
    for v in d["templating"]["list"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        if v["type"] == "custom" {
            let values: Vec<String> = v["query"]
                .as_str()
                .unwrap()
                .split(',')
                .map(|s| s.trim().to_string())
                .collect();
            vars.insert(name.into(), quoted(&values));
        } else if v["type"] == "query" && on_store(&v["datasource"]) {
            let q = v["query"]
                .as_str()
                .unwrap_or_else(|| v["query"]["rawSql"].as_str().unwrap());
            let rows = sql(db, &grafana_sql(q, &vars));
            assert!(!rows.is_empty(), "variable {name} has no values");
            let values: Vec<String> = rows.into_iter().filter_map(|r| r[0].clone()).collect();
            vars.insert(name.into(), quoted(&values));
            checked += 1;
        }
    }
    let mut panels: Vec<&Value> = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        panels.push(p);
        if let Some(inner) = p["panels"].as_array() {
            panels.extend(inner);
        }
    }
    for p in panels.into_iter().filter(|p| on_store(&p["datasource"])) {
        for t in p["targets"].as_array().unwrap() {
            let q = grafana_sql(t["rawSql"].as_str().unwrap(), &vars);
            let rows = sql(db, &q);
            assert!(
                !rows.is_empty(),
                "panel {:?} returned no rows:\n{q}",
                p["title"]
            );
            checked += 1;
        }
    }
    checked
}

/// Grafana's SQL macros over a range that holds every alert, and the
/// variables' values.
fn grafana_sql(q: &str, vars: &BTreeMap<String, String>) -> String {
    let (from, to) = ("'2000-01-01T00:00:00Z'", "'2100-01-01T00:00:00Z'");
    let mut q = q
        .replace("$__timeFrom()", &format!("{from}::timestamptz"))
        .replace("$__timeTo()", &format!("{to}::timestamptz"));
    while let Some(at) = q.find("$__timeFilter(") {
        let rest = &q[at + "$__timeFilter(".len()..];
        let close = rest.find(')').expect("a closed macro");
        let col = rest[..close].trim().to_string();
        q = format!(
            "{}{col} BETWEEN {from} AND {to}{}",
            &q[..at],
            &rest[close + 1..]
        );
    }
    assert!(!q.contains("$__"), "a macro this check does not know:\n{q}");
    // Longest names first, so that no name replaces the start of another.
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        // `sqlstring`: one value, quoted and escaped, as Grafana writes it.
        let sqlstring = format!("'{}'", vars[name].replace('\'', "''"));
        q = q
            .replace(&format!("${{{name}:sqlstring}}"), &sqlstring)
            .replace(&format!("${{{name}}}"), &vars[name])
            .replace(&format!("${name}"), &vars[name]);
    }
    assert!(
        !q.contains('$'),
        "a variable this check does not know:\n{q}"
    );
    q
}
