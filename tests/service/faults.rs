//! Broker faults: the broker stops mid-stream and comes back. Nothing is
//! lost or scored twice into the state, and readiness says so meanwhile.

use super::*;

/// A tansu of this test's own, on persistent (sqlite) storage so that a
/// restart keeps the topics, the group offsets and the changelogs.
struct Broker {
    port: u16,
    db: PathBuf,
}

impl Broker {
    fn up(&self, topics: &[&str]) {
        let out = Command::new(format!("{ROOT}/scripts/kafka-up"))
            .args(["--port", &self.port.to_string(), "--partitions", "3"])
            .args(["--sqlite", self.db.to_str().unwrap()])
            .args(topics)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn down(&self) {
        let _ = Command::new(format!("{ROOT}/scripts/kafka-down"))
            .args(["--port", &self.port.to_string()])
            .output();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.down();
    }
}

/// The broker stops for 30 s in the middle of the stream and restarts:
/// `/readyz` is 503 while it is down, and afterwards every transaction is
/// scored and the alerts equal the clean run's.
#[test]
#[ignore = "tansu 0.6's sqlite engine panics (lite.rs:503, `more or less than one row`) when the \
            idempotent producer comes back with a bumped epoch, and then fails every produce; \
            run it against a Kafka that survives a restart"]
fn broker_stopped_for_30s_mid_stream() {
    let dir = workdir("broker-stop");
    let data = simulate(&dir, 300, 20, 31);
    let want = expected_alerts(&dir, &data);
    let ids = transaction_ids(&data);
    let split = (ids.len() / 2).to_string();
    let n = names("broker-stop");
    let broker = Broker {
        port: free_port(),
        db: dir.join("tansu.db"),
    };
    let topics = [n.input.as_str(), &n.alerts, &n.labels, &n.dlq, &n.scores];
    broker.up(&topics);
    let brokers = format!("127.0.0.1:{}", broker.port);
    let produce_half = |first: bool| {
        let flag = if first { "--limit" } else { "--skip" };
        produce_on(&brokers, &data, &n, &[flag, &split]);
    };
    produce_half(true);
    let svc = Service::start_on(&brokers, &n, "only", &[], &[]);
    let half = ids.len() / 2;
    svc.wait_for(Duration::from_secs(120), "the first half scored", |s| {
        s.metric("peregrine_transactions_scored_total") as usize >= half
            && s.get("/readyz").0 == 200
    });

    broker.down();
    let stopped = Instant::now();
    svc.wait_for(
        Duration::from_secs(25),
        "/readyz 503 with the broker down",
        |s| s.get("/readyz").0 == 503,
    );
    let (_, why) = svc.get("/readyz");
    eprintln!("with the broker down: {why}");
    std::thread::sleep(Duration::from_secs(30).saturating_sub(stopped.elapsed()));
    assert_eq!(svc.get("/readyz").0, 503, "still down, still not ready");

    broker.up(&topics);
    produce_half(false);
    svc.wait_for(Duration::from_secs(180), "every transaction scored", |s| {
        s.metric("peregrine_transactions_scored_total") as usize >= ids.len()
            && s.get("/readyz").0 == 200
    });
    let msgs = read_topic_until_on(&brokers, &n.alerts, Duration::from_secs(30), |m| {
        m.len() >= want.len()
    });
    let (got, _) = alerts_by_id(&msgs);
    assert_same_alerts(&got, &want);
    let scored = transaction_ids_of(&read_topic_until_on(
        &brokers,
        &n.scores,
        Duration::from_secs(30),
        |m| m.len() >= ids.len(),
    ));
    let missing: Vec<_> = ids.difference(&scored).take(5).collect();
    assert!(missing.is_empty(), "never scored: {missing:?}");
    assert_eq!(svc.terminate(Duration::from_secs(30)).code(), Some(0));
}

/// The broker goes away mid-stream: within seconds `/readyz` is 503 and
/// says why, and the process stays up to resume when it returns.
#[test]
fn readiness_reports_a_broker_outage() {
    let dir = workdir("broker-gone");
    let data = simulate(&dir, 100, 10, 32);
    let total = transaction_ids(&data).len();
    let n = names("broker-gone");
    let broker = Broker {
        port: free_port(),
        db: dir.join("tansu.db"),
    };
    broker.up(&[&n.input, &n.alerts, &n.labels, &n.dlq, &n.scores]);
    let brokers = format!("127.0.0.1:{}", broker.port);
    produce_on(&brokers, &data, &n, &[]);
    let svc = Service::start_on(&brokers, &n, "only", &[], &[]);
    svc.wait_for(Duration::from_secs(90), "ready and scoring", |s| {
        s.get("/readyz").0 == 200
            && s.metric("peregrine_transactions_scored_total") as usize >= total
    });
    broker.down();
    svc.wait_for(
        Duration::from_secs(25),
        "/readyz 503 naming the broker",
        |s| {
            let (status, body) = s.get("/readyz");
            status == 503 && body.contains("no Kafka broker reachable")
        },
    );
    assert_eq!(svc.get("/healthz").0, 200, "alive, waiting for the broker");
    // It cannot commit, so the drain runs out (non-zero), but it exits
    // within the deadline instead of hanging in a close.
    let status = svc.terminate(Duration::from_secs(30));
    assert!(status.code().is_some(), "exited by itself: {status:?}");
}
