//! The merchant table: every instance's copy of the merchants changelog
//! (Kafka Streams' GlobalKTable). Card tasks and the HTTP API read merchant
//! features from it; the materialiser applies the changelog's groups as
//! their markers arrive. It also keeps how far every source (each input and
//! label partition) had come when each group was written, so a card task
//! can tell whether the table is complete up to a given event time.

use super::{Day, Key, Progress, Recent, StageCheckpoint, count_1h_from};
use crate::features::merchant::{HourCounts, MerchantState, MerchantView};
use crate::serve::changelog::{Assembler, Committed, StartGuard, Take, start_offset, unstall};
use crate::serve::events::Source;
use crate::telemetry::log;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{OnceLock, RwLock};
use std::time::{Duration, Instant};

/// One merchant in the table.
struct TableMerchant {
    /// The merchant-events partition it belongs to.
    partition: i32,
    panes: MerchantState,
    /// Transaction times of the merchant's two newest days.
    times: Vec<(i64, Recent)>,
}

impl TableMerchant {
    /// The merchant's transactions in `[from, t)`, from the kept times;
    /// `None` when a day in the range has hours but not all its times.
    fn count(&self, from: i64, t: i64) -> Option<u32> {
        let mut n = 0;
        for day in from.div_euclid(DAY)..=(t - 1).div_euclid(DAY) {
            let (lo, hi) = (from.max(day * DAY), t.min((day + 1) * DAY));
            if lo >= hi {
                continue;
            }
            let hours = (lo.div_euclid(HOUR), (hi - 1).div_euclid(HOUR) + 1);
            if self.panes.hours(hours.0, hours.1).is_empty() {
                continue;
            }
            let (_, times) = self.times.iter().find(|(d, _)| *d == day)?;
            n += times.count(lo, hi)?;
        }
        Some(n)
    }
}

const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

#[derive(Default)]
struct Data {
    merchants: HashMap<u64, TableMerchant>,
    /// Per merchants-changelog partition, its sources' progress as of its
    /// newest group applied.
    progress: HashMap<i32, HashMap<Source, Progress>>,
}

/// Which sources and partitions the frontier is taken over.
struct Universe {
    sources: Vec<Source>,
    partitions: i32,
}

pub struct MerchantTable {
    /// Lock order: this lock is never held while another is taken, nor
    /// taken while another is held (see `serve::state`).
    data: RwLock<Data>,
    changed: tokio::sync::Notify,
    caught_up: AtomicBool,
    version: std::sync::atomic::AtomicU64,
    label_delay_secs: i64,
    universe: OnceLock<Universe>,
}

impl MerchantTable {
    pub fn new(label_delay_secs: i64) -> MerchantTable {
        MerchantTable {
            data: RwLock::new(Data::default()),
            changed: tokio::sync::Notify::new(),
            caught_up: AtomicBool::new(false),
            version: std::sync::atomic::AtomicU64::new(0),
            label_delay_secs,
            universe: OnceLock::new(),
        }
    }

    /// Sets the sources and partitions, once the topics' layout is known.
    pub fn set_universe(&self, sources: Vec<Source>, partitions: i32) {
        let _ = self.universe.set(Universe {
            sources,
            partitions,
        });
    }

    pub fn is_caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    /// Without Kafka there is nothing to catch up with.
    pub fn set_caught_up(&self) {
        self.caught_up.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Whether every (merchant partition, source) pair has been heard from
    /// at least once: until then the frontier stays at its least, and a
    /// card task could score nothing.
    pub fn all_heard(&self) -> bool {
        let Some(u) = self.universe.get() else {
            return false;
        };
        let data = self.read();
        (0..u.partitions).all(|m| {
            data.progress
                .get(&m)
                .is_some_and(|p| u.sources.iter().all(|s| p.contains_key(s)))
        })
    }

    pub fn merchants(&self) -> usize {
        self.read().merchants.len()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Data> {
        self.data.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The merchant's features at `t`: the label-delayed windows from its
    /// hour panes, the 1-hour count from its kept transaction times before
    /// `t` (from the panes when the times are incomplete).
    pub fn view(&self, merchant_key: u64, t: i64) -> MerchantView {
        self.views(&[(merchant_key, t)])[0]
    }

    /// [`MerchantTable::view`] of several, under one read of the table.
    pub fn views(&self, requests: &[(u64, i64)]) -> Vec<MerchantView> {
        let data = self.read();
        requests
            .iter()
            .map(|&(key, t)| {
                let Some(m) = data.merchants.get(&key) else {
                    return MerchantView::default();
                };
                let mut v = m.panes.view(t, self.label_delay_secs);
                if let Some(n) = m.count(count_1h_from(t), t) {
                    v.count_1h = n;
                }
                v
            })
            .collect()
    }

    /// The event time up to which every source's events are in the table,
    /// over every merchant partition: the least watermark of the sources
    /// not idle. `i64::MAX` when all are idle, `i64::MIN` while any is
    /// unheard of.
    pub fn frontier(&self) -> i64 {
        Frontier::new(None, Duration::MAX).get(self).0
    }

    /// Calls `each` with every (merchant partition, source) pair that
    /// holds the frontier: its watermark, `i64::MIN` when unheard of. `own`
    /// counts even when the table last heard it was idle: its owner knows
    /// better.
    fn each_pair(&self, own: Option<Source>, mut each: impl FnMut(Pair, Heard)) {
        let unheard = Heard {
            watermark: i64::MIN,
            beats: 0,
        };
        let Some(u) = self.universe.get() else {
            return each((-1, Source::Input(-1)), unheard);
        };
        let data = self.read();
        for m in 0..u.partitions {
            let progress = data.progress.get(&m);
            for s in &u.sources {
                match progress.and_then(|p| p.get(s)) {
                    None => each((m, *s), unheard),
                    Some(pr) if !pr.idle || own == Some(*s) => each(
                        (m, *s),
                        Heard {
                            watermark: pr.watermark,
                            beats: pr.beats,
                        },
                    ),
                    Some(_) => {}
                }
            }
        }
    }

    /// A count of the groups applied: it changes whenever the table does.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Waits until the table changes from `version`, at most `limit`.
    /// False if it did not.
    pub async fn changed_since(&self, version: u64, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            if self.version() != version {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.version() != version;
            }
        }
    }

    /// Applies one committed group of a changelog partition.
    pub fn apply(&self, partition: i32, group: Committed<StageCheckpoint>) {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        if group.marker.snapshot {
            data.merchants.retain(|_, m| m.partition != partition);
        }
        for e in group.entries {
            let Some(key) = Key::decode(&e.key) else {
                continue;
            };
            let day = match &e.value {
                Some(v) => match Day::decode(key.day, v) {
                    Some(d) => d,
                    None => continue,
                },
                None => Day {
                    hours: Vec::new(),
                    times: None,
                },
            };
            let m = data
                .merchants
                .entry(key.merchant)
                .or_insert_with(|| TableMerchant {
                    partition,
                    panes: MerchantState::default(),
                    times: Vec::new(),
                });
            set_day(&mut m.panes, key.day, &day.hours);
            m.times.retain(|(d, _)| *d != key.day);
            if let Some(t) = day.times {
                m.times.push((key.day, t));
                let newest = m.times.iter().map(|(d, _)| *d).max().unwrap_or(key.day);
                m.times.retain(|(d, _)| *d >= newest - 1);
            }
            if m.panes.is_empty() {
                data.merchants.remove(&key.merchant);
            }
        }
        data.progress
            .insert(partition, group.marker.state.progress.into_iter().collect());
        self.version.fetch_add(1, Ordering::AcqRel);
        drop(data);
        self.changed.notify_waiters();
    }
}

/// The merchant table's frontier as one card task sees it. A (merchant
/// partition, source) pair from which nothing was heard (no progress, no
/// heartbeat) for the longest wait while the table went on changing is
/// stuck (its partition restoring, or unowned after a crash) and is left
/// out until it is heard again: it holds the others up once, for that
/// wait, not for as long as it is stuck. A partition that is running,
/// however slowly, or waiting itself, is always waited for, and so is every
/// pair while the whole table stands still (a slow broker).
/// Groups the table must apply before a pair that stands still counts as stuck.
const STUCK_GROUPS: u64 = 20;

pub struct Frontier {
    own: Option<Source>,
    stuck_after: Duration,
    seen: HashMap<Pair, Seen>,
    /// The pair that held the frontier last time, and its watermark.
    held_by: Option<(Pair, i64)>,
}

/// A merchant partition and a source.
type Pair = (i32, Source);

/// What the table last said of a pair.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Heard {
    watermark: i64,
    beats: u64,
}

/// What a pair last said, and since when: the time and the table's version.
struct Seen {
    heard: Heard,
    since: Instant,
    since_version: u64,
}

impl Frontier {
    pub fn new(own: Option<Source>, stuck_after: Duration) -> Frontier {
        Frontier {
            own,
            stuck_after,
            seen: HashMap::new(),
            held_by: None,
        }
    }

    /// The (merchant partition, source) that held the frontier at the last
    /// [`Frontier::get`], with its watermark: what a blocked task waits for.
    pub fn held_by(&self) -> Option<((i32, Source), i64)> {
        self.held_by
    }

    /// The frontier, and how many pairs it leaves out as stuck.
    pub fn get(&mut self, table: &MerchantTable) -> (i64, usize) {
        let now = Instant::now();
        let version = table.version();
        let mut low = i64::MAX;
        let mut stuck = 0;
        let mut held_by = None;
        let (seen, limit) = (&mut self.seen, self.stuck_after);
        table.each_pair(self.own, |key, heard| {
            let s = seen.entry(key).or_insert(Seen {
                heard,
                since: now,
                since_version: version,
            });
            if s.heard != heard {
                *s = Seen {
                    heard,
                    since: now,
                    since_version: version,
                };
            }
            // The table moved on meanwhile: others did, this one did not.
            let others_moved = version >= s.since_version + STUCK_GROUPS;
            if now.duration_since(s.since) >= limit && others_moved {
                stuck += 1;
            } else if heard.watermark < low {
                low = heard.watermark;
                held_by = Some((key, heard.watermark));
            }
        });
        self.held_by = held_by;
        (low, stuck)
    }
}

/// Replaces a day's hours in a merchant's panes.
fn set_day(panes: &mut MerchantState, day: i64, hours: &[HourCounts]) {
    for old in panes.hours(day * 24, day * 24 + 24) {
        if !hours.iter().any(|h| h.hour == old.hour) {
            panes.set_hour(HourCounts {
                count: 0,
                frauds: 0,
                ..old
            });
        }
    }
    for h in hours {
        panes.set_hour(*h);
    }
}

/// Reads every partition of the merchants changelog into the table, from
/// each partition's newest snapshot, until `stop`. Marks the table caught
/// up once every partition was read to its end. Blocking: run it on a
/// thread of its own. `read` counts the records read.
pub fn materialise(
    table: &MerchantTable,
    reader: &BaseConsumer,
    topic: &str,
    partitions: i32,
    stop: &AtomicBool,
    read: &prometheus::IntCounter,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut tpl = TopicPartitionList::new();
    let mut guards = HashMap::new();
    for p in 0..partitions {
        let from = start_offset(reader, topic, p)?;
        tpl.add_partition_offset(topic, p, from)?;
        let low = reader
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .ok()
            .map(|(low, _)| low);
        let want = match from {
            Offset::Offset(o) => Some(o),
            _ => None,
        };
        guards.insert(p, StartGuard::new(want, low));
    }
    reader.assign(&tpl)?;
    let mut assemblers: HashMap<i32, Assembler<StageCheckpoint>> = HashMap::new();
    let mut unread: std::collections::HashSet<i32> = (0..partitions).collect();
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        let r = match reader.poll(Duration::from_millis(100)) {
            Some(r) => r,
            None if unread.is_empty() => continue,
            None => {
                // Quiet: the partitions not yet read to their end may be
                // there without librdkafka saying so, or stalled.
                let mut ended = Vec::new();
                for &p in &unread {
                    if let Some(guard) = guards.get_mut(&p)
                        && unstall(reader, topic, p, guard)?
                    {
                        ended.push(p);
                    }
                }
                match ended.first() {
                    Some(&p) => {
                        for q in &ended[1..] {
                            unread.remove(q);
                        }
                        Err(rdkafka::error::KafkaError::PartitionEOF(p))
                    }
                    None => continue,
                }
            }
        };
        let msg = match r {
            Ok(m) => m,
            Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                if guards.get(&p).is_some_and(StartGuard::at_end)
                    && unread.remove(&p)
                    && unread.is_empty()
                {
                    table.set_caught_up();
                    log(
                        "INFO",
                        format_args!(
                            "merchant table caught up: {} merchants from {n} records in {:.1}s",
                            table.merchants(),
                            started.elapsed().as_secs_f64()
                        ),
                    );
                }
                continue;
            }
            Err(e) => {
                log("WARN", format_args!("merchant table reader: {e}"));
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        read.inc();
        n += 1;
        let p = msg.partition();
        let guard = guards
            .entry(p)
            .or_insert_with(|| StartGuard::new(None, None));
        match guard.take(msg.offset()) {
            Take::Yes => {}
            Take::Skip => continue,
            Take::SeekTo(o) => {
                reader.seek(topic, p, Offset::Offset(o), Duration::from_secs(10))?;
                continue;
            }
        }
        if let Some(group) = assemblers.entry(p).or_default().push(&msg) {
            table.apply(p, group);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::changelog::{Entry, Marker};

    fn group(entries: Vec<Entry>, progress: Vec<(Source, Progress)>) -> Committed<StageCheckpoint> {
        Committed {
            entries,
            marker: Marker {
                group: 1,
                snapshot: false,
                state: StageCheckpoint {
                    progress,
                    ..StageCheckpoint::default()
                },
            },
            offset: 0,
        }
    }

    #[test]
    fn frontier_is_the_least_busy_watermark() {
        let t = MerchantTable::new(7 * 86_400);
        assert_eq!(t.frontier(), i64::MIN, "no layout yet");
        let (a, b, l) = (Source::Input(0), Source::Input(1), Source::Labels(0));
        t.set_universe(vec![a, b, l], 2);
        let p = |w, idle| Progress {
            watermark: w,
            idle,
            beats: 0,
        };
        t.apply(
            0,
            group(
                vec![],
                vec![(a, p(100, false)), (b, p(50, false)), (l, p(0, true))],
            ),
        );
        assert_eq!(t.frontier(), i64::MIN, "partition 1 unheard of");
        t.apply(
            1,
            group(
                vec![],
                vec![(a, p(90, false)), (b, p(70, false)), (l, p(0, true))],
            ),
        );
        assert_eq!(t.frontier(), 50);
        t.apply(
            0,
            group(
                vec![],
                vec![(a, p(100, false)), (b, p(0, true)), (l, p(0, true))],
            ),
        );
        assert_eq!(t.frontier(), 70);
        t.apply(
            1,
            group(
                vec![],
                vec![(a, p(0, true)), (b, p(0, true)), (l, p(0, true))],
            ),
        );
        assert_eq!(t.frontier(), 100);
        t.apply(
            0,
            group(
                vec![],
                vec![(a, p(100, true)), (b, p(0, true)), (l, p(0, true))],
            ),
        );
        t.apply(
            1,
            group(
                vec![],
                vec![(a, p(90, true)), (b, p(0, true)), (l, p(0, true))],
            ),
        );
        assert_eq!(t.frontier(), i64::MAX, "all idle");
        assert_eq!(
            Frontier::new(Some(a), Duration::MAX).get(&t).0,
            90,
            "a partition knows it is busy"
        );
        // A pair that does not move for the longest wait is left out until it moves.
        t.apply(
            0,
            group(
                vec![],
                vec![(a, p(100, false)), (b, p(40, false)), (l, p(0, true))],
            ),
        );
        let mut f = Frontier::new(None, Duration::from_millis(50));
        assert_eq!(f.get(&t), (40, 0));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(f.get(&t), (40, 0), "the whole table stood still: wait on");
        let busy = |w| {
            group(
                vec![],
                vec![(a, p(w, false)), (b, p(40, false)), (l, p(0, true))],
            )
        };
        for w in 101..101 + STUCK_GROUPS as i64 {
            t.apply(0, busy(w));
        }
        // `b` stood still while the table moved on (partition 1 is idle).
        assert_eq!(f.get(&t), (100 + STUCK_GROUPS as i64, 1));
        t.apply(
            0,
            group(
                vec![],
                vec![(a, p(100, false)), (b, p(45, false)), (l, p(0, true))],
            ),
        );
        assert_eq!(f.get(&t), (45, 0), "it moved: counted again");
    }

    #[test]
    fn days_and_times_make_the_views() {
        let t = MerchantTable::new(7 * 86_400);
        let day = 17_622i64;
        let at = |d: i64, h: i64, s: i64| (day + d) * 86_400 + h * 3600 + s;
        let hour = |d: i64, h: i64, count| HourCounts {
            hour: ((day + d) * 24 + h) as u32,
            count,
            frauds: 0,
        };
        let times = |ts: &[i64]| {
            let mut r = Recent::default();
            for &s in ts {
                r.add(s);
            }
            Some(r)
        };
        let entry = |d: i64, hours: Vec<HourCounts>, times: Option<Recent>| Entry {
            key: Key {
                merchant: 5,
                day: day + d,
            }
            .encode(),
            value: Some(Day { hours, times }.encode()),
        };
        t.apply(
            0,
            group(
                vec![
                    entry(
                        0,
                        vec![hour(0, 23, 2)],
                        times(&[at(0, 23, 10), at(0, 23, 50)]),
                    ),
                    entry(
                        1,
                        vec![hour(1, 0, 3)],
                        times(&[at(1, 0, 5), at(1, 0, 20), at(1, 0, 30)]),
                    ),
                ],
                vec![],
            ),
        );
        // Times before t only, over midnight, though the panes hold all five.
        assert_eq!(t.view(5, at(1, 0, 6)).count_1h, 3);
        assert_eq!(t.view(5, at(1, 0, 31)).count_1h, 5);
        assert_eq!(t.view(6, at(1, 0, 31)).count_1h, 0);
        // A day without its times: the count comes from the panes.
        t.apply(0, group(vec![entry(0, vec![hour(0, 23, 2)], None)], vec![]));
        assert_eq!(t.view(5, at(1, 0, 6)).count_1h, 5);
        // Tombstones for both days remove the merchant.
        let tomb = |d: i64| Entry {
            key: Key {
                merchant: 5,
                day: day + d,
            }
            .encode(),
            value: None,
        };
        t.apply(0, group(vec![tomb(0), tomb(1)], vec![]));
        assert_eq!(t.merchants(), 0);
    }
}
