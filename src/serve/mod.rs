//! `peregrine serve`: the engine as a long-running service.
//!
//! Layers, each depending only on those below it:
//!
//! ```text
//! mod.rs          wiring: start, run until stopped, drain
//! http (crate)    the HTTP API, over the state
//! group           the group consumer and its rebalances
//! cards, merchants::stage, labels, sink
//!                 the partition tasks (their lifecycle in partition), and
//!                 the alert sink (alert topic → the alert store)
//! changelog, output, events, merchants (records)
//!                 changelogs, producing, wire formats
//! state, merchants::table, decisions
//!                 the state, behind methods, with one lock order; the
//!                 alert store and the decisions it turns into labels
//! kafka           Kafka clients and topics, from the settings alone
//! ```
//!
//! Kafka is the distributed state engine, as for Kafka Streams: card state
//! per input partition in a compacted changelog; merchant state built by
//! the owners of a merchant-keyed repartition topic and changelogged; that
//! changelog read by every instance as its merchant table.

pub mod assigned;
pub mod cards;
pub mod changelog;
pub mod decisions;
pub mod entities;
pub mod entity_inbox;
pub mod events;
pub mod group;
pub mod health;
pub mod http_cards;
pub mod kafka;
pub mod label_inbox;
pub mod labels;
pub mod merchants;
pub mod output;
pub mod partition;
pub mod sink;
pub mod state;

pub use state::{ServiceState, load_scorer};

use crate::config::Settings;
use crate::ingest::decode::DeadReason;
use crate::telemetry::log;
use anyhow::Context;
use events::Source;
use rdkafka::config::FromClientConfigAndContext;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Runs the service until `shutdown` resolves, then drains within the
/// deadline. Returns an error if the deadline passed before the drain ended.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    settings.validate()?;
    let scorer = load_scorer(&settings, None, None)?;
    run_with(ServiceState::new(settings, scorer), shutdown).await
}

/// [`run`] with the state made by the caller, who can watch it.
pub async fn run_with(
    state: Arc<ServiceState>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let settings = &state.settings;
    let scorer = state.scorer();
    log("INFO", format_args!("settings: {settings:?}"));
    log(
        "INFO",
        format_args!(
            "model {} ({}), {} rules, review at {}, block at {}",
            scorer.model.model_version,
            scorer.model.algo.as_str(),
            scorer.rules.rules.len(),
            scorer.thresholds.review,
            scorer.thresholds.block
        ),
    );
    if settings.kafka_enabled {
        kafka::check_config(settings)?;
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let listener = tokio::net::TcpListener::bind(&settings.http_addr)
        .await
        .with_context(|| format!("cannot listen on {}", settings.http_addr))?;
    log(
        "INFO",
        format_args!("HTTP API on http://{}", listener.local_addr()?),
    );
    let http = crate::http::HttpServer::start(state.clone(), listener, stop_rx.clone())
        .context("cannot start the HTTP server's runtime")?;
    let mut kafka = settings
        .kafka_enabled
        .then(|| tokio::spawn(pipeline(state.clone(), stop_rx.clone())));
    let status = tokio::spawn(status_lines(state.clone(), stop_rx.clone()));
    let desk = settings
        .postgres
        .is_some()
        .then(|| tokio::spawn(alert_desk(state.clone(), stop_rx.clone())));
    let failed = tokio::select! {
        _ = shutdown => None,
        why = failure(&state, &mut kafka) => Some(why),
    };
    match &failed {
        None => log("INFO", "shutting down: draining in-flight events"),
        Some(why) => log(
            "ERROR",
            format_args!("the Kafka pipeline failed: {why}; shutting down"),
        ),
    }
    let _ = stop_tx.send(true);
    let deadline = Duration::from_secs(settings.shutdown_timeout_secs);
    // The drain is bounded below, but a librdkafka call that blocks (a
    // synchronous commit or a close with the brokers gone) can hold the
    // threads that would notice: past the deadline and a margin, exit
    // regardless. Nothing is lost; uncommitted input is read again.
    let _ = std::thread::Builder::new()
        .name("shutdown-watchdog".into())
        .spawn(move || {
            std::thread::sleep(deadline + Duration::from_secs(5));
            log(
                "ERROR",
                "still stopping 5 s past shutdown_timeout_secs: exiting now; \
                 uncommitted transactions will be read again on restart",
            );
            std::process::exit(1);
        });
    let drained = tokio::time::timeout(deadline, async {
        if let Some(k) = kafka {
            match k.await {
                Ok(Err(e)) => log("ERROR", format_args!("Kafka pipeline: {e:#}")),
                Err(e) => log("ERROR", format_args!("Kafka pipeline panicked: {e}")),
                Ok(Ok(())) => {}
            }
        }
        http.stopped().await;
        let _ = status.await;
        if let Some(d) = desk {
            let _ = d.await;
        }
    })
    .await;
    if let Some(why) = failed {
        anyhow::bail!("the Kafka pipeline failed: {why}");
    }
    match drained {
        Ok(()) => {
            log("INFO", "stopped cleanly");
            Ok(())
        }
        Err(_) => anyhow::bail!(
            "the drain took longer than shutdown_timeout_secs = {}; \
             uncommitted transactions will be read again on restart",
            settings.shutdown_timeout_secs
        ),
    }
}

/// Opens the alert store, retrying while it is unreachable (scoring goes
/// on; the alert routes answer 503 meanwhile), then runs the alert sink.
async fn alert_desk(state: Arc<ServiceState>, mut stop: watch::Receiver<bool>) {
    let Some(url) = state.settings.postgres.clone() else {
        return;
    };
    let mut wait = Duration::from_secs(1);
    let desk = loop {
        match decisions::AlertDesk::open(&state.settings, &url).await {
            Ok(d) => break Arc::new(d),
            Err(e) => log(
                "WARN",
                format_args!("cannot open the alert store: {e:#}; retrying in {wait:?}"),
            ),
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(30));
    };
    state.set_desk(desk.clone());
    log("INFO", "alert store open");
    if state.settings.kafka_enabled
        && let Err(e) = sink::run(&state.settings, desk.store(), &state.metrics.sink, stop).await
    {
        // A sink that cannot run (its consumer refused) would leave the
        // store silently behind: the instance stops, saying why.
        state.set_failed(format!("the alert sink: {e:#}"));
    }
}

/// Resolves once the Kafka pipeline has failed (an error, a panic, or a
/// part of it reporting a fatal error), with why: the process then exits
/// non-zero instead of staying up unready until someone stops it.
async fn failure(
    state: &ServiceState,
    kafka: &mut Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
) -> String {
    loop {
        if let Some(why) = state.failure() {
            return why;
        }
        if let Some(k) = kafka.as_mut()
            && k.is_finished()
        {
            let result = k.await;
            *kafka = None;
            return match result {
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) => format!("it panicked: {e}"),
                Ok(Ok(())) => "it stopped by itself".into(),
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The Kafka side: topics, the merchant table, then the group.
async fn pipeline(state: Arc<ServiceState>, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let s = &state.settings;
    let topics = kafka::Topics::of(s);
    let Some(layout) = kafka::prepare(s, &topics, state.stages(), &stop).await? else {
        return Ok(());
    };
    log(
        "INFO",
        format_args!(
            "{} input partitions, {} label partitions, {} merchant partitions; internal topics \
             {}, {}, {}",
            layout.input_partitions,
            layout.label_partitions,
            layout.merchant_partitions,
            topics.cards_changelog,
            topics.merchant_events,
            topics.merchants_changelog
        ),
    );
    let sources: Vec<Source> = (0..layout.input_partitions)
        .map(Source::Input)
        .chain((0..layout.label_partitions).map(Source::Labels))
        .collect();
    state
        .merchants()
        .set_universe(sources, layout.merchant_partitions);
    let producer = kafka::producer(s)?;

    // The merchant table first: an instance joins the group only once it
    // can score.
    let table_stop = Arc::new(AtomicBool::new(false));
    let materialiser = {
        let (state, topics, table_stop) = (state.clone(), topics.clone(), table_stop.clone());
        std::thread::Builder::new()
            .name("merchant-table".into())
            .spawn(move || {
                let result =
                    kafka::reader(&state.settings, &topics.merchants_group).and_then(|reader| {
                        let read = state
                            .metrics
                            .records_read
                            .with_label_values(&[&topics.merchants_changelog]);
                        merchants::table::materialise(
                            state.merchants(),
                            &reader,
                            &topics.merchants_changelog,
                            layout.merchant_partitions,
                            &table_stop,
                            &read,
                        )
                    });
                if let Err(e) = result {
                    log("ERROR", format_args!("merchant table: {e:#}"));
                    state.set_failed(format!("merchant table: {e:#}"));
                }
            })?
    };
    let mut waiting = stop.clone();
    while !state.merchants().is_caught_up() {
        tokio::select! {
            _ = waiting.wait_for(|s| *s) => break,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    if !*stop.borrow() {
        let mut roles = vec![
            (
                partition::Role::Merchants,
                &topics.merchant_events,
                &topics.merchants_group,
            ),
            (
                partition::Role::Labels,
                &topics.labels,
                &topics.labels_group,
            ),
            (partition::Role::Cards, &topics.input, &topics.cards_group),
        ];
        if state.has_entities() {
            roles.push((
                partition::Role::Entities,
                &topics.entity_events,
                &topics.entities_group,
            ));
        }
        // One reader each per instance, of its card tasks' partitions.
        let reader = |wanted: bool, topic: &str| -> anyhow::Result<_> {
            wanted
                .then(|| assigned::AssignedReader::start(s, &topics.cards_group, topic))
                .transpose()
        };
        let entity_values = reader(state.has_entities(), &topics.entity_features)?;
        let card_labels = reader(state.reads_card_labels(), &topics.card_labels)?;
        let mut threads = Vec::new();
        for (role, topic, group_id) in roles {
            let handle = tokio::runtime::Handle::current();
            let context = group::GroupContext::new(state.clone(), role, topic, handle.clone());
            let consumer: Arc<group::GroupConsumer> =
                Arc::new(group::GroupConsumer::from_config_and_context(
                    &kafka::group_config(s, group_id),
                    context,
                )?);
            let ctx = Arc::new(partition::TaskContext {
                state: state.clone(),
                consumer,
                producer: producer.clone(),
                topics: topics.clone(),
                layout,
                entity_values: entity_values.clone(),
                card_labels: card_labels.clone(),
            });
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("group-{}", role.as_str()))
                    .spawn(move || group::run(ctx, stop, handle))?,
            );
        }
        for t in threads {
            tokio::task::spawn_blocking(move || t.join())
                .await?
                .map_err(|_| anyhow::anyhow!("a group thread panicked"))?;
        }
        for reader in [entity_values, card_labels].into_iter().flatten() {
            let _ = tokio::task::spawn_blocking(move || reader.stop()).await;
        }
    }
    let _ = tokio::task::spawn_blocking(move || {
        rdkafka::producer::Producer::flush(&producer, Duration::from_secs(30))
    })
    .await;
    table_stop.store(true, Ordering::Release);
    let _ = tokio::task::spawn_blocking(move || materialiser.join()).await;
    let l = state.latency_summary();
    log(
        "INFO",
        format_args!(
            "Kafka pipeline stopped after scoring {} transactions; event-to-alert p50 {:.1} ms p99 {:.1} ms; scoring p50 {:.2} µs p99 {:.2} µs",
            state.metrics.scored.get(),
            l.alert_p50_ms,
            l.alert_p99_ms,
            l.scoring_p50_us,
            l.scoring_p99_us
        ),
    );
    Ok(())
}

/// Resolves on SIGTERM or ctrl-c.
pub async fn termination() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler can be installed");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn status_lines(state: Arc<ServiceState>, mut stop: watch::Receiver<bool>) {
    let secs = state.settings.log_interval_secs;
    let mut last = (0u64, Instant::now());
    loop {
        let wait = Duration::from_secs(if secs == 0 { 5 } else { secs });
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        state.refresh_gauges();
        let r = state.readiness();
        if secs == 0 {
            continue;
        }
        let m = &state.metrics;
        let scored = m.scored.get();
        let rate = (scored - last.0) as f64 / last.1.elapsed().as_secs_f64().max(1e-9);
        last = (scored, Instant::now());
        let alerts: u64 = ["review", "block"]
            .iter()
            .map(|d| m.alerts.with_label_values(&[d]).get())
            .sum();
        log(
            "INFO",
            format_args!(
                "scored {scored} ({rate:.0}/s), alerts {alerts}, dead-lettered {}, partitions {}, ready {}{}",
                DeadReason::ALL
                    .iter()
                    .map(|r| m.dead_letters.with_label_values(&[r.as_str()]).get())
                    .sum::<u64>(),
                m.partitions.get(),
                r.ready,
                if r.ready {
                    String::new()
                } else {
                    format!(" (waiting for {})", r.waiting_for.join(", "))
                }
            ),
        );
    }
}
