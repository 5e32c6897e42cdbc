//! The group consumers: one per role and instance (the input topic, the
//! merchant-events topic, the label topic, each in a group of its own),
//! with the `cooperative-sticky` assignor, so that a rebalance moves only
//! the partitions that change owner and the others keep their state and
//! keep running.
//!
//! Each assigned partition gets a queue of its own and a task that reads
//! it ([`super::partition`]): a slow partition, or one restoring its
//! state, holds up no other. librdkafka's fetcher stops prefetching a
//! partition whose queue is full, so a task that falls behind pauses only
//! its own partition. A thread of its own polls the consumer's main queue,
//! where rebalances arrive, every 100 ms whatever the tasks do, so the
//! instance never nears `max.poll.interval.ms`.
//!
//! On a revoke the callback asks the partitions' tasks to drain and waits
//! for them (under a deadline) before librdkafka gives the partitions up,
//! as vector's Kafka source does: what they finished is checkpointed and
//! committed while the partitions are still this instance's.

use super::partition::{Control, PartitionInput, Role, TaskContext};
use super::state::ServiceState;
use super::{cards, entities, labels, merchants};
use crate::telemetry::log;
use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::TopicPartitionList;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub type GroupConsumer = StreamConsumer<GroupContext>;

/// A running task, as the group holds it.
struct TaskHandle {
    assigned: watch::Sender<bool>,
    drain: watch::Sender<bool>,
    /// Closed when the task ends: waited on in the rebalance callback,
    /// which runs inside the main queue's poll and so cannot await.
    done: std::sync::mpsc::Receiver<()>,
    join: tokio::task::JoinHandle<()>,
}

pub struct GroupContext {
    state: Arc<ServiceState>,
    role: Role,
    topic: String,
    runtime: tokio::runtime::Handle,
    /// Set once the consumer exists; weak, as the consumer holds this context.
    tasks_context: OnceLock<Weak<TaskContext>>,
    tasks: Mutex<HashMap<(Role, i32), TaskHandle>>,
    /// How long a revoke waits for its tasks to drain.
    drain_deadline: Duration,
}

impl GroupContext {
    pub fn new(
        state: Arc<ServiceState>,
        role: Role,
        topic: &str,
        runtime: tokio::runtime::Handle,
    ) -> GroupContext {
        let drain_deadline = Duration::from_secs(state.settings.shutdown_timeout_secs.max(1));
        GroupContext {
            state,
            role,
            topic: topic.to_string(),
            runtime,
            tasks_context: OnceLock::new(),
            tasks: Mutex::new(HashMap::new()),
            drain_deadline,
        }
    }

    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, HashMap<(Role, i32), TaskHandle>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn partitions(&self, tpl: &TopicPartitionList) -> Vec<(Role, String, i32)> {
        tpl.elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| (self.role, e.topic().to_string(), e.partition()))
            .collect()
    }

    /// Splits each new partition's queue off and starts its task, before
    /// librdkafka assigns it, so that no message reaches the main queue.
    fn start_tasks(&self, tpl: &TopicPartitionList) {
        let Some(ctx) = self.tasks_context.get().and_then(Weak::upgrade) else {
            return;
        };
        let mut tasks = self.lock_tasks();
        for (role, topic, p) in self.partitions(tpl) {
            let Some(queue) = ctx.consumer.split_partition_queue(&topic, p) else {
                log(
                    "ERROR",
                    format_args!("cannot split the queue of {topic}/{p}"),
                );
                continue;
            };
            let input = PartitionInput::new(queue, &ctx, &topic, p);
            let (assigned_tx, assigned) = watch::channel(false);
            let (drain_tx, drain) = watch::channel(false);
            let control = Control { assigned, drain };
            let ctx = ctx.clone();
            let (done_tx, done) = std::sync::mpsc::channel();
            let join = self.runtime.spawn(async move {
                match role {
                    Role::Cards => cards::run(ctx, input, control).await,
                    Role::Merchants => merchants::stage::run(ctx, input, control).await,
                    Role::Labels => labels::run(ctx, input, control).await,
                    Role::Entities => entities::run(ctx, input, control).await,
                }
                drop(done_tx);
            });
            let old = tasks.insert(
                (role, p),
                TaskHandle {
                    assigned: assigned_tx,
                    drain: drain_tx,
                    done,
                    join,
                },
            );
            if let Some(old) = old {
                // Not drained by a revoke (a lost assignment): stop it now.
                old.join.abort();
            }
        }
    }

    /// Asks the tasks of these partitions (all when `None`) to drain and
    /// waits for them, up to the drain deadline. Blocking.
    pub fn drain(&self, which: Option<&TopicPartitionList>) {
        let handles: Vec<((Role, i32), TaskHandle)> = {
            let mut tasks = self.lock_tasks();
            let keys: Vec<(Role, i32)> = match which {
                None => tasks.keys().copied().collect(),
                Some(tpl) => self
                    .partitions(tpl)
                    .into_iter()
                    .map(|(r, _, p)| (r, p))
                    .collect(),
            };
            keys.into_iter()
                .filter_map(|k| tasks.remove(&k).map(|h| (k, h)))
                .collect()
        };
        if handles.is_empty() {
            return;
        }
        for (_, h) in &handles {
            let _ = h.drain.send(true);
        }
        let deadline = Instant::now() + self.drain_deadline;
        for ((role, p), h) in handles {
            let left = deadline.saturating_duration_since(Instant::now());
            let timed_out = matches!(
                h.done.recv_timeout(left),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            );
            if timed_out {
                h.join.abort();
                log(
                    "WARN",
                    format_args!(
                        "{} partition {p} did not drain within {:?}; what it did not \
                         commit is read again by the next owner",
                        role.as_str(),
                        self.drain_deadline
                    ),
                );
            }
        }
    }
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            log("WARN", format_args!("librdkafka {fac}: {msg}"));
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode;
        match error.rdkafka_error_code() {
            // The end of a partition comes as an error event too; it is not one.
            Some(RDKafkaErrorCode::PartitionEOF) => return,
            // Until the next statistics say a broker is up again.
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                self.state.health().set_brokers_reachable(false)
            }
            _ => {}
        }
        log("WARN", format_args!("librdkafka: {error}: {reason}"));
    }

    fn stats(&self, stats: Statistics) {
        // librdkafka's internal pseudo-broker is never up; any other that
        // is means the cluster answers.
        let up = stats
            .brokers
            .values()
            .any(|b| b.source != "internal" && b.state == "UP");
        self.state.health().set_brokers_reachable(up);
        if let Some(cgrp) = &stats.cgrp
            && cgrp.join_state == "steady"
        {
            self.state.set_joined(self.role);
        }
        if self.role != Role::Cards {
            return;
        }
        let Some(topic) = stats.topics.get(&self.topic) else {
            return;
        };
        for (p, part) in &topic.partitions {
            // -1 is librdkafka's internal unassigned partition; a lag of -1 is unknown.
            if *p >= 0 && part.consumer_lag >= 0 {
                self.state
                    .metrics
                    .consumer_lag
                    .with_label_values(&[&p.to_string()])
                    .set(part.consumer_lag);
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => self.start_tasks(tpl),
            Rebalance::Revoke(tpl) => {
                let ps: Vec<String> = self
                    .partitions(tpl)
                    .iter()
                    .map(|(r, _, p)| format!("{}/{p}", r.as_str()))
                    .collect();
                log("INFO", format_args!("revoking {}", ps.join(", ")));
                self.drain(Some(tpl));
                let inputs = self
                    .partitions(tpl)
                    .iter()
                    .filter(|(r, _, _)| *r == Role::Cards)
                    .count();
                self.state.metrics.partitions.sub(inputs as i64);
                self.state.metrics.consumer_lag.reset();
            }
            Rebalance::Error(_) => {}
        }
    }

    fn post_rebalance(&self, c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // Nothing is fetched until each task has positioned its partition.
                if let Err(e) = c.pause(tpl) {
                    log("WARN", format_args!("cannot pause new partitions: {e}"));
                }
                let parts = self.partitions(tpl);
                let tasks = self.lock_tasks();
                for (role, _, p) in &parts {
                    if let Some(h) = tasks.get(&(*role, *p)) {
                        let _ = h.assigned.send(true);
                    }
                }
                drop(tasks);
                let ps: Vec<String> = parts
                    .iter()
                    .map(|(r, _, p)| format!("{}/{p}", r.as_str()))
                    .collect();
                log("INFO", format_args!("assigned {}", ps.join(", ")));
                let inputs = parts.iter().filter(|(r, _, _)| *r == Role::Cards).count();
                self.state.metrics.partitions.add(inputs as i64);
                self.state.set_joined(self.role);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => log("WARN", format_args!("rebalance failed: {e}")),
        }
    }
}

/// Joins the group and runs its partitions' tasks until `stop`; then
/// drains them all and leaves the group. Blocking: the thread it runs on
/// polls the consumer's main queue, where rebalances are handled.
pub fn run(ctx: Arc<TaskContext>, stop: watch::Receiver<bool>, runtime: tokio::runtime::Handle) {
    let consumer = ctx.consumer.clone();
    let group = consumer.context();
    let _ = group.tasks_context.set(Arc::downgrade(&ctx));
    if let Err(e) = consumer.subscribe(&[&group.topic]) {
        ctx.state
            .set_failed(format!("cannot subscribe to {}: {e}", group.topic));
        log(
            "ERROR",
            format_args!("cannot subscribe to {}: {e}", group.topic),
        );
        return;
    }
    log(
        "INFO",
        format_args!(
            "{} consumer subscribed to {}",
            group.role.as_str(),
            group.topic
        ),
    );
    runtime.block_on(async {
        let mut stop = stop.clone();
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                m = tokio::time::timeout(Duration::from_millis(100), consumer.recv()) => {
                    match m {
                        Ok(Ok(m)) => {
                            use rdkafka::Message;
                            log("WARN", format_args!(
                                "a message of {}/{} reached the main queue; it is read again by the partition's task",
                                m.topic(), m.partition()));
                        }
                        Ok(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {}
                        Ok(Err(e)) => log("WARN", format_args!("consumer: {e}")),
                        Err(_) => {}
                    }
                }
            }
        }
    });
    log(
        "INFO",
        format_args!("draining every {} partition", group.role.as_str()),
    );
    group.drain(None);
    consumer.unsubscribe();
    // Serve the revoke and the leave before the consumer goes.
    let until = Instant::now() + Duration::from_millis(500);
    runtime.block_on(async {
        while Instant::now() < until {
            let _ = tokio::time::timeout(Duration::from_millis(100), consumer.recv()).await;
        }
    });
    drop(ctx);
}
