//! Black-box tests of `peregrine serve` against a real Kafka-protocol broker
//! (tansu, started by `scripts/kafka-up`), each on topics of its own; the
//! service's state across restarts and rebalances in [`state`].

mod alert_store;
mod faults;
mod hostile;
mod state;

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_peregrine");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The broker all tests share: `KAFKA_TEST_BROKER` if set (host:port),
/// else a tansu that `scripts/kafka-up` starts on a fixed loopback port.
fn broker() -> &'static str {
    static BROKER: OnceLock<String> = OnceLock::new();
    BROKER.get_or_init(|| {
        shared_server("KAFKA_TEST_BROKER", "kafka-up", 19192, |_| {
            "127.0.0.1:19192".to_string()
        })
    })
}

/// A server all tests share: `var`'s value if set, else one that
/// `scripts/<script> --port <port>` starts on loopback, its address made
/// from what the script printed.
fn shared_server(
    var: &str,
    script: &str,
    port: u16,
    address: impl FnOnce(&str) -> String,
) -> String {
    if let Ok(v) = std::env::var(var) {
        return v;
    }
    let out = Command::new(format!("{ROOT}/scripts/{script}"))
        .args(["--port", &port.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("scripts/{script} runs: {e}"));
    assert!(
        out.status.success(),
        "scripts/{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    address(String::from_utf8_lossy(&out.stdout).trim())
}

fn tansu() -> String {
    let home = std::env::var("HOME").unwrap_or_default();
    let local = format!("{home}/.cargo/bin/tansu");
    if Path::new(&local).exists() {
        local
    } else {
        "tansu".into()
    }
}

fn create_topics(broker: &str, names: &[&str], partitions: u32) {
    for name in names {
        let out = Command::new(tansu())
            .args(["topic", "create", "--broker", &format!("tcp://{broker}")])
            .args(["--partitions", &partitions.to_string(), name])
            .output()
            .expect("tansu runs");
        assert!(
            out.status.success(),
            "creating topic {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Topic and group names unique to this run and test.
struct Names {
    input: String,
    alerts: String,
    labels: String,
    dlq: String,
    scores: String,
    group: String,
}

fn names(test: &str) -> Names {
    static N: AtomicU32 = AtomicU32::new(0);
    let p = format!(
        "{test}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    Names {
        input: format!("{p}-tx"),
        alerts: format!("{p}-alerts"),
        labels: format!("{p}-labels"),
        dlq: format!("{p}-dlq"),
        scores: format!("{p}-scores"),
        group: format!("{p}-group"),
    }
}

fn topics(n: &Names, partitions: u32) {
    create_topics(
        broker(),
        &[&n.input, &n.alerts, &n.labels, &n.dlq, &n.scores],
        partitions,
    );
}

fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("peregrine-svc-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn ok(args: &[&str]) -> std::process::Output {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "peregrine {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn simulate(dir: &Path, customers: u32, days: u32, seed: u32) -> PathBuf {
    let f = dir.join(format!("sim-{customers}-{days}-{seed}.csv"));
    ok(&[
        "simulate",
        "--out",
        f.to_str().unwrap(),
        "--customers",
        &customers.to_string(),
        "--terminals",
        &(customers * 2).to_string(),
        "--days",
        &days.to_string(),
        "--seed",
        &seed.to_string(),
    ]);
    f
}

/// The alerts a single ordered pass over the file gives: `peregrine replay`
/// with the built-in model and rules.
fn expected_alerts(dir: &Path, data: &Path) -> BTreeMap<String, Value> {
    let rules = format!("{ROOT}/models/default.rules");
    expected_alerts_of(
        dir,
        data,
        &format!("{ROOT}/models/default.json"),
        Some(&rules),
    )
}

/// [`expected_alerts`] with another model, and rules or none.
fn expected_alerts_of(
    dir: &Path,
    data: &Path,
    model: &str,
    rules: Option<&str>,
) -> BTreeMap<String, Value> {
    let out = dir.join("expected.jsonl");
    let mut args = vec![
        "replay",
        "--quiet",
        "--data",
        data.to_str().unwrap(),
        "--model",
        model,
    ];
    if let Some(r) = rules {
        args.extend(["--rules", r]);
    }
    args.extend(["--out", out.to_str().unwrap()]);
    ok(&args);
    std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["alert_id"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

fn transaction_ids(data: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(data)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().to_string())
        .collect()
}

fn produce(data: &Path, n: &Names, extra: &[&str]) {
    produce_on(broker(), data, n, extra);
}

/// [`produce`] to a broker of the test's own.
fn produce_on(brokers: &str, data: &Path, n: &Names, extra: &[&str]) {
    let mut args = vec![
        "produce",
        "--brokers",
        brokers,
        "--data",
        data.to_str().unwrap(),
        "--topic",
        &n.input,
        "--label-topic",
        &n.labels,
    ];
    args.extend_from_slice(extra);
    ok(&args);
}

/// [`produce`] in a thread of its own, with `extra` flags (a `--rate`),
/// so that the test acts while the stream is under way.
fn produce_in_background(data: &Path, n: &Names, extra: &[&str]) -> std::thread::JoinHandle<()> {
    let (data, input, labels) = (data.to_path_buf(), n.input.clone(), n.labels.clone());
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    std::thread::spawn(move || {
        let mut args = vec![
            "produce",
            "--brokers",
            broker(),
            "--data",
            data.to_str().unwrap(),
            "--topic",
            &input,
            "--label-topic",
            &labels,
        ];
        args.extend(extra.iter().map(String::as_str));
        ok(&args);
    })
}

/// Writes `text` to `file` and sends each of its lines as it is.
fn produce_raw(file: &Path, text: &str, topic: &str) {
    std::fs::write(file, text).unwrap();
    ok(&[
        "produce",
        "--brokers",
        broker(),
        "--raw",
        file.to_str().unwrap(),
        "--topic",
        topic,
    ]);
}

/// Every message of a topic, once it holds `want` distinct transactions
/// or the deadline passed.
fn read_topic(topic: &str, want: usize, deadline: Duration) -> Vec<Value> {
    read_topic_until(topic, deadline, |msgs| {
        let ids: BTreeSet<&str> = msgs
            .iter()
            .filter_map(|m| m["payload"]["transaction_id"].as_str())
            .collect();
        ids.len() >= want || (msgs.len() >= want && ids.is_empty())
    })
}

fn read_topic_until(
    topic: &str,
    deadline: Duration,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    read_topic_until_on(broker(), topic, deadline, done)
}

fn read_topic_until_on(
    brokers: &str,
    topic: &str,
    deadline: Duration,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let out = Command::new(BIN)
            .args(["consume", "--brokers", brokers, "--topic", topic])
            .args(["--idle-ms", "1500"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let msgs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if done(&msgs) || started.elapsed() > deadline {
            return msgs;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `peregrine serve`, killed when dropped.
struct Service {
    child: Child,
    http: String,
    log: PathBuf,
}

impl Service {
    fn start(n: &Names, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Service {
        Service::start_on(broker(), n, name, extra, env)
    }

    fn start_on(
        brokers: &str,
        n: &Names,
        name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Service {
        let http = format!("127.0.0.1:{}", free_port());
        let log = workdir("logs").join(format!("{}-{name}.log", n.group));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--brokers", brokers, "--group-id", &n.group])
            .args(["--input-topic", &n.input, "--alert-topic", &n.alerts])
            .args(["--label-topic", &n.labels, "--dlq-topic", &n.dlq])
            .args(["--score-topic", &n.scores, "--http-addr", &http])
            .args(extra)
            .env("PEREGRINE_LOG_INTERVAL_SECS", "1")
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let mut s = Service { child, http, log };
        let started = Instant::now();
        while s.get("/healthz").0 != 200 {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("peregrine serve exited with {status}:\n{}", s.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "HTTP API not up:\n{}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String) {
        http(&self.http, method, path, headers, body)
    }

    fn get(&self, path: &str) -> (u16, String) {
        self.request("GET", path, &[], b"")
    }

    fn post(&self, path: &str, body: &str) -> (u16, Value) {
        self.post_as(None, path, body)
    }

    /// A POST with the bearer token given, if any.
    fn post_as(&self, token: Option<&str>, path: &str, body: &str) -> (u16, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let (status, text) = self.request("POST", path, &headers, body.as_bytes());
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// The value of one series, named with its labels as exposed
    /// (`name{label="value"}`); 0 when absent.
    fn series(&self, series: &str) -> f64 {
        series_at(&self.http, series)
    }

    fn wait_ready(&self, limit: Duration) {
        self.wait_for(limit, "/readyz 200", |s| s.get("/readyz").0 == 200);
    }

    /// SIGKILL, and waits for the process to be gone.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The value of a metric without labels, or the sum of its series.
    fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn wait_for(&self, limit: Duration, what: &str, cond: impl Fn(&Service) -> bool) {
        let started = Instant::now();
        while !cond(self) {
            assert!(
                started.elapsed() < limit,
                "timed out waiting for {what}; service log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
    }

    /// SIGTERM, and the exit status within `limit`.
    fn terminate(mut self, limit: Duration) -> std::process::ExitStatus {
        self.signal("TERM");
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "no exit within {limit:?} of SIGTERM; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one series of the `/metrics` at `addr`, named with its
/// labels as exposed; 0 when absent.
fn series_at(addr: &str, series: &str) -> f64 {
    let (_, text) = http(addr, "GET", "/metrics", &[], b"");
    text.lines()
        .filter_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .parse::<f64>()
                .ok()
        })
        .sum()
}

/// A plain HTTP/1.1 request on loopback.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    if s.write_all(req.as_bytes())
        .and_then(|_| s.write_all(body))
        .is_err()
    {
        return (0, String::new());
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The transaction ids of a topic's messages.
fn transaction_ids_of(msgs: &[Value]) -> BTreeSet<String> {
    payloads(msgs)
        .iter()
        .map(|p| p["transaction_id"].as_str().unwrap().to_string())
        .collect()
}

fn payloads(msgs: &[Value]) -> Vec<&Value> {
    msgs.iter().map(|m| &m["payload"]).collect()
}

/// Alerts by id, checking that repeats of an id are the same alert.
fn alerts_by_id(msgs: &[Value]) -> (BTreeMap<String, Value>, usize) {
    let mut by_id: BTreeMap<String, Value> = BTreeMap::new();
    let mut repeats = 0;
    for a in payloads(msgs) {
        let id = a["alert_id"].as_str().expect("alert_id").to_string();
        if let Some(prev) = by_id.get(&id) {
            repeats += 1;
            for k in ["transaction_id", "score", "decision", "card_id"] {
                assert_eq!(prev[k], a[k], "repeat of {id} differs in {k}");
            }
        } else {
            by_id.insert(id, a.clone());
        }
    }
    (by_id, repeats)
}

fn assert_same_alerts(got: &BTreeMap<String, Value>, want: &BTreeMap<String, Value>) {
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !got.contains_key(*k))
        .take(5)
        .collect();
    let extra: Vec<_> = got
        .keys()
        .filter(|k| !want.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} alerts expected, {} arrived; missing {missing:?}, unexpected {extra:?}",
        want.len(),
        got.len()
    );
    for (id, w) in want {
        let g = &got[id];
        assert_eq!(g["decision"], w["decision"], "{id}");
        assert_eq!(g["transaction_id"], w["transaction_id"], "{id}");
        let (gs, ws) = (g["score"].as_f64().unwrap(), w["score"].as_f64().unwrap());
        assert!((gs - ws).abs() < 1e-9, "{id}: score {gs} vs {ws}");
        for k in [
            "model_version",
            "reasons",
            "event_time",
            "amount",
            "merchant_id",
        ] {
            assert_eq!(g[k], w[k], "{id}: {k}");
        }
    }
}

/// (a) A deterministic stream with known fraud: exactly the alerts of a
/// single ordered pass over the same file arrive, each once, with reasons.
#[test]
fn stream_gives_exactly_the_expected_alerts() {
    let dir = workdir("exact");
    let data = simulate(&dir, 300, 30, 11);
    let want = expected_alerts(&dir, &data);
    assert!(want.len() > 100, "the stream has fraud to find");
    let n = names("exact");
    topics(&n, 6);
    produce(&data, &n, &[]);
    let svc = Service::start(&n, "only", &[], &[]);
    let total = transaction_ids(&data).len();
    svc.wait_for(Duration::from_secs(60), "every transaction scored", |s| {
        s.metric("peregrine_transactions_scored_total") as usize >= total
    });
    let msgs = read_topic(&n.alerts, want.len(), Duration::from_secs(30));
    let (got, repeats) = alerts_by_id(&msgs);
    assert_eq!(repeats, 0, "a clean run sends each alert once");
    assert_same_alerts(&got, &want);
    let a = payloads(&msgs)[0];
    for field in [
        "alert_id",
        "transaction_id",
        "card_id",
        "merchant_id",
        "amount",
        "event_time",
        "score",
        "decision",
        "model_version",
        "reasons",
        "produced_at",
    ] {
        assert!(!a[field].is_null(), "alert field {field} missing: {a}");
    }
    assert_eq!(msgs[0]["key"], a["card_id"], "alerts are keyed by card");
    assert_eq!(svc.terminate(Duration::from_secs(30)).code(), Some(0));
}

/// (b) Poison messages go to the dead-letter topic with the original bytes
/// and a reason; every valid message around them is scored.
#[test]
fn poison_messages_are_dead_lettered_and_the_rest_scored() {
    let dir = workdir("poison");
    let n = names("poison");
    topics(&n, 3);
    let good = |i: u32| {
        format!(
            r#"{{"transaction_id":"g{i}","timestamp":"2018-04-01T10:{:02}:00Z","card_id":"c{}","merchant_id":"m{}","amount":{}.5}}"#,
            i % 60,
            i % 7,
            i % 5,
            10 + i
        )
    };
    let oversize = format!(
        r#"{{"transaction_id":"big","timestamp":"2018-04-01T10:00:00Z","card_id":"c1","merchant_id":"m1","amount":1,"note":"{}"}}"#,
        "x".repeat(3000)
    );
    let poison = [
        ("not_json", "this is not json".to_string()),
        (
            "invalid_field",
            r#"{"transaction_id":"p1","timestamp":"2018-04-01T10:00:00Z","card_id":"c1","merchant_id":"m1"}"#.to_string(),
        ),
        (
            "invalid_field",
            r#"{"transaction_id":"p2","timestamp":"yesterday","card_id":"c1","merchant_id":"m1","amount":3}"#.to_string(),
        ),
        (
            "invalid_field",
            r#"{"transaction_id":"p3","timestamp":"2018-04-01T10:00:00Z","card_id":"c1","merchant_id":"m1","amount":"lots"}"#.to_string(),
        ),
        ("oversize", oversize),
    ];
    let mut lines = Vec::new();
    let mut i = 0;
    for (_, p) in &poison {
        for _ in 0..4 {
            lines.push(good(i));
            i += 1;
        }
        lines.push(p.clone());
    }
    lines.push(good(i));
    let valid = i + 1;
    produce_raw(&dir.join("mixed.jsonl"), &lines.join("\n"), &n.input);
    let svc = Service::start(&n, "only", &[], &[("PEREGRINE_MAX_MESSAGE_BYTES", "2048")]);
    svc.wait_for(Duration::from_secs(60), "all valid scored", |s| {
        s.metric("peregrine_transactions_scored_total") as u32 >= valid
    });
    let dead = read_topic_until(&n.dlq, Duration::from_secs(30), |m| m.len() >= poison.len());
    assert_eq!(dead.len(), poison.len(), "{dead:?}");
    let mut reasons: Vec<&str> = dead
        .iter()
        .map(|d| d["headers"]["peregrine-reason"].as_str().unwrap())
        .collect();
    reasons.sort();
    let mut want: Vec<&str> = poison.iter().map(|(r, _)| *r).collect();
    want.sort();
    assert_eq!(reasons, want);
    for d in &dead {
        let err = d["headers"]["peregrine-error"].as_str().unwrap();
        assert!(!err.is_empty());
        assert!(d["headers"]["peregrine-source-offset"].is_string());
    }
    let errors: Vec<&str> = dead
        .iter()
        .map(|d| d["headers"]["peregrine-error"].as_str().unwrap())
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("`amount`") && e.contains("missing")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("`timestamp`")),
        "{errors:?}"
    );
    // The original bytes, unchanged.
    assert!(dead.iter().any(|d| d["payload"] == "this is not json"));
    let scores = read_topic(&n.scores, valid as usize, Duration::from_secs(30));
    let ids: BTreeSet<String> = transaction_ids_of(&scores);
    assert_eq!(ids, (0..valid).map(|i| format!("g{i}")).collect());
    assert_eq!(
        svc.metric("peregrine_dead_letters_total") as usize,
        poison.len()
    );
    assert_eq!(
        svc.metric("peregrine_transactions_consumed_total") as u32,
        valid + poison.len() as u32
    );
    assert_eq!(svc.terminate(Duration::from_secs(30)).code(), Some(0));
}

const TOKEN: &str = "test-admin-token-0123456789";

fn tx_json(id: &str, card: &str, amount: f64, ts: &str) -> String {
    format!(
        r#"{{"transaction_id":"{id}","timestamp":"{ts}","card_id":"{card}","merchant_id":"m1","amount":{amount},"channel":"ecom","lat":40.0,"lon":50.0}}"#
    )
}

/// (e) The HTTP API: score, batch, update, reload with and without the
/// token, bad bodies, readiness, metrics and the OpenAPI document.
#[test]
fn http_api() {
    let n = names("http");
    let dir = workdir("http");
    let svc = Service::start(
        &n,
        "http",
        &["--no-kafka"],
        &[
            ("PEREGRINE_ADMIN_TOKEN", TOKEN),
            ("PEREGRINE_MAX_BODY_BYTES", "65536"),
            ("PEREGRINE_MODELS_DIR", dir.to_str().unwrap()),
        ],
    );
    assert_eq!(
        svc.get("/readyz").0,
        200,
        "ready: model loaded, Kafka disabled"
    );

    let (status, body) = svc.post(
        "/v1/score",
        &tx_json("h1", "card-a", 42.0, "2018-04-01T10:00:00Z"),
    );
    assert_eq!(status, 200, "{body}");
    let score = body["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score));
    assert!(["allow", "review", "block"].contains(&body["decision"].as_str().unwrap()));
    assert_eq!(body["features"]["amount"], 42.0);
    assert!(body["reasons"]["top_features"].as_array().unwrap().len() == 5);
    assert!(body["model_version"].as_str().unwrap().starts_with("gbt-"));

    // Without update the card's state stays as it was.
    let count = |b: &Value| b["features"]["card.count_1d"].as_f64().unwrap();
    let (_, again) = svc.post(
        "/v1/score",
        &tx_json("h2", "card-a", 42.0, "2018-04-01T10:05:00Z"),
    );
    assert_eq!(count(&again), 1.0);
    // Updating state needs the admin token.
    let h3 = tx_json("h3", "card-a", 42.0, "2018-04-01T10:06:00Z");
    let (status, err) = svc.post("/v1/score?update=true", &h3);
    assert_eq!(status, 401, "{err}");
    let (status, _) = svc.post_as(
        Some("wrong-token-wrong-token"),
        "/v1/score?update=true",
        &h3,
    );
    assert_eq!(status, 401);
    assert_eq!(
        count(&svc.post("/v1/score", &h3).1),
        1.0,
        "a refused update changed nothing"
    );
    let (_, upd) = svc.post_as(Some(TOKEN), "/v1/score?update=true", &h3);
    assert_eq!(count(&upd), 1.0);
    assert_eq!(upd["updated"], true, "{upd}");
    // The same transaction again is a duplicate: scored, not folded in.
    let (_, again) = svc.post_as(Some(TOKEN), "/v1/score?update=true", &h3);
    assert_eq!(again["updated"], false, "{again}");
    let (_, after) = svc.post(
        "/v1/score",
        &tx_json("h4", "card-a", 42.0, "2018-04-01T10:07:00Z"),
    );
    assert_eq!(count(&after), 2.0, "the update was applied");
    let (status, bad_q) = svc.post(
        "/v1/score?update=maybe",
        &tx_json("h5", "card-a", 1.0, "2018-04-01T10:07:00Z"),
    );
    assert_eq!(status, 400, "{bad_q}");

    // Batch: in order, all checked before any is applied.
    let batch = format!(
        "[{},{}]",
        tx_json("b1", "card-b", 10.0, "2018-04-01T11:00:00Z"),
        tx_json("b2", "card-b", 900.0, "2018-04-01T11:01:00Z")
    );
    assert_eq!(svc.post("/v1/score/batch?update=true", &batch).0, 401);
    let (status, res) = svc.post_as(Some(TOKEN), "/v1/score/batch?update=true", &batch);
    assert_eq!(status, 200, "{res}");
    let results = res["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[1]["transaction_id"], "b2");
    assert_eq!(results[1]["features"]["card.count_1d"], 2.0);
    let bad_batch = format!(
        r#"{{"transactions":[{},{{"transaction_id":"x"}}]}}"#,
        tx_json("b3", "card-c", 10.0, "2018-04-01T11:00:00Z")
    );
    let (status, err) = svc.post_as(Some(TOKEN), "/v1/score/batch?update=true", &bad_batch);
    assert_eq!(status, 422);
    assert_eq!(err["index"], 1);
    assert_eq!(err["field"], "timestamp");
    let (_, c) = svc.post(
        "/v1/score",
        &tx_json("b4", "card-c", 10.0, "2018-04-01T11:02:00Z"),
    );
    assert_eq!(count(&c), 1.0, "a rejected batch applies nothing");

    // Bad bodies: named fields, 4xx, JSON errors.
    let (status, err) = svc.post("/v1/score", "{not json");
    assert_eq!(status, 400);
    assert!(err["error"].as_str().unwrap().contains("JSON"));
    let (status, err) = svc.post(
        "/v1/score",
        r#"{"transaction_id":"e1","timestamp":"2018-04-01T10:00:00Z","card_id":"c","merchant_id":"m"}"#,
    );
    assert_eq!(status, 422);
    assert_eq!(err["field"], "amount");
    let (status, err) = svc.post(
        "/v1/score",
        r#"{"transaction_id":"e2","timestamp":"2018-04-01T10:00:00Z","card_id":"c","merchant_id":"m","amount":-4}"#,
    );
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["field"], "amount");
    // Live input's limits: the amount is refused, as the served schema's
    // maximum says; a time ahead of the clock is scored but never folded in.
    let (status, err) = svc.post(
        "/v1/score",
        r#"{"transaction_id":"e4","timestamp":"2018-04-01T10:00:00Z","card_id":"c","merchant_id":"m","amount":1e39}"#,
    );
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["field"], "amount");
    assert!(
        err["error"].as_str().unwrap().contains("max_amount"),
        "{err}"
    );
    let (_, schema) = svc.get("/openapi.json");
    let schema: Value = serde_json::from_str(&schema).unwrap();
    assert_eq!(
        schema["components"]["schemas"]["Transaction"]["properties"]["amount"]["maximum"],
        1e9
    );
    let future = r#"{"transaction_id":"e3","timestamp":"9999-12-31T23:59:59Z","card_id":"card-f","merchant_id":"m","amount":4}"#;
    let (status, res) = svc.post_as(Some(TOKEN), "/v1/score?update=true", future);
    assert_eq!(status, 200, "{res}");
    assert_eq!(res["updated"], false, "{res}");
    assert!(
        res["update_refused"]
            .as_str()
            .unwrap()
            .contains("max_clock_skew_secs"),
        "{res}"
    );
    let (_, c) = svc.post(
        "/v1/score",
        &tx_json("f1", "card-f", 10.0, "2018-04-01T11:02:00Z"),
    );
    assert_eq!(count(&c), 1.0, "a time ahead of the clock changes no state");
    // Types as the schema gives them: the decoder shared with Kafka would
    // take a number in a string; the API does not.
    let (status, err) = svc.post(
        "/v1/score",
        r#"{"transaction_id":"e5","timestamp":"2018-04-01T10:00:00Z","card_id":"c","merchant_id":"m","amount":"4"}"#,
    );
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["field"], "amount");
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(70_000));
    let (status, err) = svc.post("/v1/score", &big);
    assert_eq!(status, 413, "{err}");
    assert!(err["error"].is_string());
    assert_eq!(svc.get("/nowhere").0, 404);

    // Model metadata and reloads.
    let (status, model) = svc.get("/v1/model");
    assert_eq!(status, 200);
    let model: Value = serde_json::from_str(&model).unwrap();
    let version = model["model_version"].as_str().unwrap().to_string();
    assert_eq!(model["features"].as_array().unwrap().len(), 30);
    let reload = |auth: Option<&str>, body: &str| -> (u16, Value) {
        let h = auth.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = h.iter().map(|v| ("Authorization", v.as_str())).collect();
        let (s, text) = svc.request("POST", "/v1/model/reload", &headers, body.as_bytes());
        (
            s,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    };
    assert_eq!(reload(None, "").0, 401);
    assert_eq!(reload(Some("wrong-token-wrong-token"), "").0, 401);
    // A broken model is rejected with its reason; the old one stays live.
    let broken = dir.join("broken.json");
    std::fs::write(&broken, r#"{"format":"peregrine-model"}"#).unwrap();
    let (status, err) = reload(
        Some(TOKEN),
        &format!(r#"{{"model":"{}"}}"#, broken.display()),
    );
    assert_eq!(status, 422, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("broken.json"),
        "{err}"
    );
    // A rules file's error says where, never what the file holds.
    let bad_rules = dir.join("bad.rules");
    std::fs::write(&bad_rules, "oops high: amount >\n").unwrap();
    let (status, err) = reload(Some(TOKEN), r#"{"rules":"bad.rules"}"#);
    assert_eq!(status, 422, "{err}");
    let said = err["error"].as_str().unwrap();
    assert!(said.contains("line 1") && !said.contains("oops"), "{err}");
    // Files load only from models_dir.
    for (body, expected, says) in [
        (r#"{"model":"../default.json"}"#, 400, ".."),
        (r#"{"rules":"/etc/passwd"}"#, 404, "no file"),
        (r#"{"model":"missing.json"}"#, 404, "no file"),
        (r#"{"model":""}"#, 404, "no file"),
        (r#"[null, null]"#, 400, "invalid reload request"),
    ] {
        let (status, err) = reload(Some(TOKEN), body);
        assert_eq!(status, expected, "{body}: {err}");
        assert!(
            err["error"].as_str().unwrap().contains(says),
            "{body}: {err}"
        );
        assert!(!err["error"].as_str().unwrap().contains("root:"), "{err}");
    }
    std::fs::copy(
        format!("{ROOT}/models/default.json"),
        dir.join("default.json"),
    )
    .unwrap();
    let (_, still) = svc.get("/v1/model");
    assert!(still.contains(&version));
    // A valid reload: another model file with a rule of our own.
    let rules = dir.join("one.rules");
    std::fs::write(&rules, "huge_amount high: amount > 5000\n").unwrap();
    let (status, ok_body) = reload(
        Some(TOKEN),
        &format!(
            r#"{{"model":"default.json","rules":"{}"}}"#,
            rules.display()
        ),
    );
    assert_eq!(status, 200, "{ok_body}");
    assert_eq!(ok_body["model"]["rules"].as_array().unwrap().len(), 1);
    let (_, huge) = svc.post(
        "/v1/score",
        &tx_json("r1", "card-z", 9000.0, "2018-04-01T10:00:00Z"),
    );
    assert_eq!(huge["decision"], "block");
    assert_eq!(huge["reasons"]["rules"][0]["rule"], "huge_amount");

    // Metrics and the OpenAPI document.
    let (status, metrics) = svc.get("/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("peregrine_http_requests_total{route=\"/v1/score\",status=\"200\"}"));
    assert!(metrics.contains("peregrine_model_reloads_total{result=\"error\"} 2"));
    assert!(metrics.contains("peregrine_model_reloads_total{result=\"ok\"} 1"));
    let (status, doc) = svc.get("/openapi.json");
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    for path in [
        "/v1/score",
        "/v1/score/batch",
        "/v1/model",
        "/v1/model/reload",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
    assert_eq!(svc.terminate(Duration::from_secs(30)).code(), Some(0));
}

/// Reloads are refused outright when no admin token is configured.
#[test]
fn reload_without_configured_token_is_forbidden() {
    let n = names("notoken");
    let svc = Service::start(&n, "notoken", &["--no-kafka"], &[]);
    let (status, body) = svc.request(
        "POST",
        "/v1/model/reload",
        &[("Authorization", "Bearer anything-at-all-123")],
        b"",
    );
    assert_eq!(status, 403, "{body}");
}

/// `promtool check metrics` accepts a scrape of a service that has scored,
/// alerted and dead-lettered.
#[test]
fn metrics_pass_promtool() {
    let dir = workdir("promtool");
    let data = simulate(&dir, 100, 10, 14);
    let n = names("promtool");
    topics(&n, 2);
    produce(&data, &n, &[]);
    produce_raw(&dir.join("bad.jsonl"), "not json\n", &n.input);
    let svc = Service::start(&n, "prom", &[], &[]);
    svc.wait_for(Duration::from_secs(60), "dead letter counted", |s| {
        s.metric("peregrine_dead_letters_total") >= 1.0
            && s.metric("peregrine_alerts_total") >= 1.0
            // librdkafka reports the lag in its statistics, every 5 seconds.
            && s.get("/metrics").1.contains("peregrine_consumer_lag{")
    });
    let (_, scrape) = svc.get("/metrics");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/test installs the prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for name in [
        "peregrine_transactions_consumed_total",
        "peregrine_transactions_scored_total",
        "peregrine_alerts_total",
        "peregrine_rule_hits_total",
        "peregrine_dead_letters_total",
        "peregrine_scoring_seconds_bucket",
        "peregrine_event_to_alert_seconds_bucket",
        "peregrine_consumer_lag",
        "peregrine_model_info",
        "peregrine_http_requests_total",
        "peregrine_score_bucket",
    ] {
        assert!(scrape.contains(name), "{name} exported");
    }
}

/// With no broker at start the service retries and reports not ready; once
/// a broker is up it becomes ready and scores.
#[test]
fn broker_down_at_start_then_up() {
    let dir = workdir("late-broker");
    let port = free_port();
    let brokers = format!("127.0.0.1:{port}");
    let n = names("late");
    let svc = Service::start_on(&brokers, &n, "late", &[], &[]);
    std::thread::sleep(Duration::from_secs(2));
    let (status, body) = svc.get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("waiting_for"));
    let up = Command::new(format!("{ROOT}/scripts/kafka-up"))
        .args(["--port", &port.to_string(), "--partitions", "2"])
        .args([&n.input, &n.alerts, &n.labels, &n.dlq, &n.scores])
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let data = simulate(&dir, 50, 5, 15);
    ok(&[
        "produce",
        "--brokers",
        &brokers,
        "--data",
        data.to_str().unwrap(),
        "--topic",
        &n.input,
    ]);
    let total = transaction_ids(&data).len() as f64;
    svc.wait_for(Duration::from_secs(90), "ready and scoring", |s| {
        s.get("/readyz").0 == 200 && s.metric("peregrine_transactions_scored_total") >= total
    });
    drop(svc);
    let _ = Command::new(format!("{ROOT}/scripts/kafka-down"))
        .args(["--port", &port.to_string()])
        .output();
}

/// `consume --latency` times each record from its timestamp to its
/// arrival: the broker's own share of an end-to-end latency, for the
/// benchmark. (It starts at the end of the topic; where tansu resumes a
/// fetch inside a stored batch is not Kafka's, so the test starts on an
/// empty topic.)
#[test]
fn consume_latency_times_each_record_sent() {
    let dir = workdir("hop");
    let data = simulate(&dir, 50, 10, 3);
    let n = names("hop");
    topics(&n, 3);
    let topic = n.input.clone();
    let consumer = std::thread::spawn(move || {
        Command::new(BIN)
            .args(["consume", "--brokers", broker(), "--topic", &topic])
            .args(["--latency", "--idle-ms", "4000"])
            .output()
    });
    std::thread::sleep(Duration::from_secs(2));
    produce(&data, &n, &["--live", "--rate", "300", "--limit", "300"]);
    let out = consumer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["messages"], 300, "{summary}");
    let ms = &summary["timestamp_to_read_ms"];
    let (p50, p99, max) = (
        ms["p50"].as_u64().unwrap(),
        ms["p99"].as_u64().unwrap(),
        ms["max"].as_u64().unwrap(),
    );
    assert!(p50 <= p99 && p99 <= max, "{summary}");
    // `produce` lingers up to 10 ms before a batch leaves: some record waited.
    assert!(max >= 1, "{summary}");
    // Sent at 300/s over a second: a record read a second or more after
    // its timestamp would mean the consumer timed the batch, not the record.
    assert!(p50 < 1_000, "{summary}");
}
