//! Merchant state, partitioned by merchant.
//!
//! [`stage`]: the owner of a merchant-events partition aggregates its
//! merchants exactly, in per-merchant order, and writes what changed to the
//! merchants changelog. [`table`]: every instance materialises that whole
//! changelog (Kafka Streams' GlobalKTable), so a card task or the HTTP API
//! can read any merchant's features. This module owns the changelog's
//! record format.
//!
//! Records, keyed by merchant and day so that a record stays small however
//! busy the merchant, and compaction keeps each day's latest: the day's
//! hours, each with its transactions and known frauds, and for the two
//! newest days of the merchant their transaction times (at most
//! [`RECENT_CAP`] a day), for an exact 1-hour count. A day past the
//! retention gets a tombstone.

pub mod stage;
pub mod table;

use super::events::Source;
use crate::features::card::Reader;
use crate::features::merchant::HourCounts;
use serde::{Deserialize, Serialize};

const HOUR: i64 = 3600;
const DAY: i64 = 86_400;
/// Transaction times kept per merchant for the 1-hour count: a merchant
/// with more in the window gets its count from the hour panes.
pub const RECENT_CAP: usize = 64;

/// A changelog key: a merchant's day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub merchant: u64,
    pub day: i64,
}

impl Key {
    pub fn encode(self) -> Vec<u8> {
        let mut k = Vec::with_capacity(13);
        k.push(b'd');
        k.extend_from_slice(&self.merchant.to_le_bytes());
        k.extend_from_slice(&(self.day as i32).to_le_bytes());
        k
    }

    pub fn decode(bytes: &[u8]) -> Option<Key> {
        match bytes {
            [b'd', rest @ ..] if rest.len() == 12 => Some(Key {
                merchant: u64::from_le_bytes(rest[..8].try_into().ok()?),
                day: i32::from_le_bytes(rest[8..].try_into().ok()?) as i64,
            }),
            _ => None,
        }
    }
}

/// One merchant's day, as the changelog carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Day {
    pub hours: Vec<HourCounts>,
    /// The day's transaction times, when it is one of the merchant's two
    /// newest days; `None` for an older one.
    pub times: Option<Recent>,
}

impl Day {
    pub fn encode(&self) -> Vec<u8> {
        let n = self.times.as_ref().map_or(0, |t| 11 + 4 * t.times.len());
        let mut out = Vec::with_capacity(3 + 9 * self.hours.len() + n);
        out.push(2);
        out.push(self.hours.len() as u8);
        for h in &self.hours {
            out.push((h.hour % 24) as u8);
            out.extend_from_slice(&h.count.to_le_bytes());
            out.extend_from_slice(&h.frauds.to_le_bytes());
        }
        match &self.times {
            None => out.push(0),
            Some(t) => {
                out.push(1);
                out.extend_from_slice(&t.dropped_upto.to_le_bytes());
                out.extend_from_slice(&(t.times.len() as u16).to_le_bytes());
                for x in &t.times {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        out
    }

    pub fn decode(day: i64, bytes: &[u8]) -> Option<Day> {
        let mut r = Reader(bytes);
        if r.u8()? != 2 {
            return None;
        }
        let n = r.u8()? as usize;
        let mut hours = Vec::with_capacity(n);
        for _ in 0..n {
            let h = r.u8()? as i64;
            if h >= 24 {
                return None;
            }
            hours.push(HourCounts {
                hour: (day * 24 + h) as u32,
                count: r.u32()?,
                frauds: r.u32()?,
            });
        }
        let times = match r.u8()? {
            0 => None,
            1 => {
                let dropped_upto = r.i64()?;
                let n = r.u16()? as usize;
                let mut times = Vec::with_capacity(n);
                for _ in 0..n {
                    times.push(r.u32()?);
                }
                Some(Recent {
                    times,
                    dropped_upto,
                })
            }
            _ => return None,
        };
        r.0.is_empty().then_some(Day { hours, times })
    }
}

/// A merchant's transaction times of one day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recent {
    /// Sorted.
    pub times: Vec<u32>,
    /// The newest time no longer kept (for the cap), or
    /// `i64::MIN`: a 1-hour window that starts after it is complete.
    pub dropped_upto: i64,
}

impl Default for Recent {
    fn default() -> Self {
        Recent {
            times: Vec::new(),
            dropped_upto: i64::MIN,
        }
    }
}

impl Recent {
    /// Adds a time, then drops the oldest over the cap.
    pub fn add(&mut self, t: i64) {
        let pos = self.times.partition_point(|&x| (x as i64) <= t);
        self.times.insert(pos, t as u32);
        let cut = self.times.len().saturating_sub(RECENT_CAP);
        if cut > 0 {
            self.dropped_upto = self.dropped_upto.max(self.times[cut - 1] as i64);
            self.times.drain(..cut);
        }
    }

    /// The kept transactions in `[from, t)`, or `None` when some in that
    /// range may have been dropped.
    pub fn count(&self, from: i64, t: i64) -> Option<u32> {
        if self.dropped_upto >= from {
            return None;
        }
        Some(
            self.times
                .iter()
                .filter(|&&x| (x as i64) >= from && (x as i64) < t)
                .count() as u32,
        )
    }
}

/// How far a source has come, as the merchant stage last heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub watermark: i64,
    pub idle: bool,
    /// Progress records heard from the source: they come at least every
    /// second from a running partition, so a count that stands still
    /// means the partition is not running (restoring, or unowned).
    #[serde(default)]
    pub beats: u64,
}

/// What a merchant stage's marker carries.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StageCheckpoint {
    /// The last merchant-events offset applied (-1: none).
    pub events_offset: i64,
    /// The newest transaction time applied: drives expiry.
    pub watermark: i64,
    /// Per source, the last offset applied: a source's events arrive in
    /// offset order, so one at or below it was applied already (sent again
    /// by a partition's next owner).
    pub applied: Vec<(Source, i64)>,
    pub progress: Vec<(Source, Progress)>,
}

/// The first hour of the 1-hour count at `t`: the start of the hour before t's.
pub fn count_1h_from(t: i64) -> i64 {
    (t.div_euclid(HOUR) - 1) * HOUR
}

pub fn day_of_hour(hour: u32) -> i64 {
    (hour / 24) as i64
}

pub fn day_of(t: i64) -> i64 {
    t.div_euclid(DAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let k = Key {
            merchant: u64::MAX,
            day: 17_622,
        };
        assert_eq!(Key::decode(&k.encode()), Some(k));
        assert_eq!(Key::decode(b"~"), None);
        let day = 17_622;
        let hours = vec![
            HourCounts {
                hour: (day * 24 + 3) as u32,
                count: 5,
                frauds: 1,
            },
            HourCounts {
                hour: (day * 24 + 23) as u32,
                count: 70_000,
                frauds: 0,
            },
        ];
        let mut r = Recent::default();
        let t0 = 1_600_000_000;
        for i in 0..100 {
            r.add(t0 + i * 60);
        }
        assert_eq!(r.times.len(), RECENT_CAP);
        assert_eq!(r.dropped_upto, t0 + 35 * 60);
        for times in [None, Some(r.clone())] {
            let d = Day {
                hours: hours.clone(),
                times,
            };
            assert_eq!(Day::decode(day, &d.encode()), Some(d.clone()));
            let bytes = d.encode();
            assert_eq!(Day::decode(day, &bytes[..bytes.len() - 1]), None);
        }
        // Complete from after the dropped time, not before it.
        assert_eq!(r.count(t0 + 40 * 60, t0 + 50 * 60), Some(10));
        assert_eq!(r.count(t0, t0 + 50 * 60), None);
    }
}
