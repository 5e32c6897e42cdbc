//! Per-card window state: the card's events of the last 30 days, as time
//! and amount, bit-packed, for the 7- and 30-day windows, exact to the
//! second; and, for its recent events (the log's tail), their merchant and
//! place, for the 1-hour and 1-day windows.

mod log;

use super::AMOUNT_CEILING;
use super::declared::DeclaredLog;
use super::geo::haversine_km;
use log::{Event, Log, holdable};

pub const DAY: i64 = 86_400;
/// Amount at least this many times the card's 30-day mean counts as large.
pub const LARGE_RATIO: f64 = 2.5;
/// History a card needs before one of its amounts can count as large.
pub const LARGE_MIN_HISTORY: u32 = 3;
/// The longest window over the logged events.
const LOG_SPAN: i64 = 30 * DAY;
/// Events a card's log holds at most: a card past it, more than 68
/// payments a day for 30 days, loses its oldest first, and its 7- and
/// 30-day windows undercount (counted as `window_overflows`).
pub const MAX_LOGGED: usize = 2048;

/// An event as it is folded into a card.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recent {
    pub ts: u32,
    pub amount: f32,
    pub merchant: u32,
    pub lat: f32,
    pub lon: f32,
    /// 32 bits of the transaction id's hash, 0 when it has none: a second
    /// delivery of the same transaction is known by it and its time, so
    /// that a false match needs two ids of one card in the same second
    /// and the same 32 bits, while every card holds a day of these.
    pub id: u32,
}

/// What a card keeps of a recent event beside the log, which holds its
/// time and amount: 16 bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Detail {
    merchant: u32,
    lat: f32,
    lon: f32,
    id: u32,
}

impl Detail {
    fn of(r: &Recent) -> Detail {
        Detail {
            merchant: r.merchant,
            lat: r.lat,
            lon: r.lon,
            id: r.id,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Prev {
    ts: u32,
    lat: f32,
    lon: f32,
}

#[derive(Debug, Clone, Default)]
pub struct CardState {
    /// Events within the 30-day window of the newest event time minus the
    /// allowed lateness, oldest first; at most [`MAX_LOGGED`]. Its tail is
    /// the events within the last day plus the allowed lateness.
    log: Log,
    /// The tail's details, in the log's order: the first `log.tail_len()`
    /// entries; the rest is room to grow.
    recent: Box<[Detail]>,
    /// The newest event that left the tail, for "time since previous" and
    /// speed; `ts` 0 when none.
    before: Prev,
    /// The fields a features file's declared aggregations read, when it
    /// declares any.
    declared: Option<Box<DeclaredLog>>,
}

/// Aggregates over a window of the card's events.
#[derive(Debug, Clone, Copy, Default)]
pub struct PaneSum {
    pub count: u32,
    pub sum: f64,
    pub sumsq: f64,
    pub large: u32,
}

impl PaneSum {
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
}

/// Everything the card contributes to one event's features.
#[derive(Debug, Clone, Copy, Default)]
pub struct CardView {
    pub count_1h: u32,
    pub count_1d: u32,
    pub sum_1d: f64,
    pub distinct_merchants_1d: u32,
    /// The card's earlier events (excluding the event itself) in the last
    /// 7 and 30 days: times in `(t − 7 d, t]` and `(t − 30 d, t]`. The
    /// 7-day `sumsq` is not kept (0): no feature reads the 7-day spread.
    pub prev_7d: PaneSum,
    pub prev_30d: PaneSum,
    pub secs_since_prev: Option<i64>,
    /// Where the previous transaction was (NaN when unknown); read only
    /// when `secs_since_prev` is set.
    pub prev_lat: f32,
    pub prev_lon: f32,
}

impl CardView {
    /// Speed from the previous transaction to one at (lat, lon), in km/h;
    /// 0 when either place is unknown. Computed apart from the view since
    /// it needs no state: on another thread in a backtest.
    pub fn velocity_kmh(&self, lat: f32, lon: f32) -> f64 {
        match self.secs_since_prev {
            Some(dt) => speed_kmh((self.prev_lat, self.prev_lon), (lat, lon), dt),
            None => 0.0,
        }
    }
}

/// Speed in km/h from a place to another `secs` later; 0 when either place
/// is unknown (NaN) or the first is over 30 days old.
pub fn speed_kmh(from: (f32, f32), to: (f32, f32), secs: i64) -> f64 {
    // Beyond 30 days a card may have expired, so no speed either way.
    if secs > 30 * DAY || [from.0, from.1, to.0, to.1].iter().any(|v| v.is_nan()) {
        return 0.0;
    }
    let km = haversine_km(from.0 as f64, from.1 as f64, to.0 as f64, to.1 as f64);
    // A minute's floor keeps two swipes in the same second finite.
    km / (secs.max(60) as f64 / 3600.0)
}

/// What folding one event into a card's state had to give up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// The recent events' bound forced an early eviction.
    pub recent_overflow: bool,
    /// The log's bound dropped an event still inside the 30-day window.
    pub window_overflow: bool,
}

impl CardState {
    pub fn declared(&self) -> Option<&DeclaredLog> {
        self.declared.as_deref()
    }

    pub fn declared_mut(&mut self) -> &mut DeclaredLog {
        self.declared.get_or_insert_default()
    }

    /// Drops the declared log unless it was written under `layout`.
    pub fn keep_declared(&mut self, layout: Option<u32>) {
        if self.declared.as_ref().map(|d| d.layout()) != layout {
            self.declared = None;
        }
    }

    pub fn newest_day(&self) -> u32 {
        self.log
            .last_ts()
            .map_or(0, |ts| (ts as i64).div_euclid(DAY) as u32)
    }

    pub fn prefetch_history(&self) {
        super::store::prefetch(
            self.recent.as_ptr(),
            self.log.tail_len() * std::mem::size_of::<Detail>(),
        );
        self.log.prefetch();
    }

    /// Whether a transaction with this id hash is among the recent events:
    /// those of the exact windows' span, the only span in which an event
    /// is not too late to change the state anyway.
    pub fn has_seen(&self, id: u32, ts: u32) -> bool {
        id != 0
            && self.recent[..self.log.tail_len()]
                .iter()
                .enumerate()
                .any(|(j, r)| r.id == id && self.log.tail_ts(j) == Some(ts))
    }

    /// The card's contribution to the features of an event at `t`, before
    /// the event is applied. A late event sees only what came at or before
    /// it.
    pub fn view(&self, t: i64, merchant: u32) -> CardView {
        let mut v = CardView {
            prev_lat: f32::NAN,
            prev_lon: f32::NAN,
            ..CardView::default()
        };
        let mut merchants = [0u32; 64];
        let mut distinct = 0usize;
        let mut prev: Option<(u32, &Detail)> = None;
        let (week, month) = self.log.windows(t, |j, ts, amount| {
            let r = &self.recent[j];
            prev = Some((ts, r));
            let ts = ts as i64;
            if ts > t - DAY {
                v.count_1d += 1;
                v.sum_1d += amount as f64;
                if ts > t - 3600 {
                    v.count_1h += 1;
                }
                if r.merchant != merchant
                    && !merchants[..distinct].contains(&r.merchant)
                    && distinct < merchants.len()
                {
                    merchants[distinct] = r.merchant;
                    distinct += 1;
                }
            }
        });
        (v.prev_7d, v.prev_30d) = (week, month);
        v.distinct_merchants_1d = distinct as u32 + 1;
        let prev = prev
            .map(|(ts, r)| (ts, r.lat, r.lon))
            .or((self.before.ts != 0).then_some((
                self.before.ts,
                self.before.lat,
                self.before.lon,
            )));
        if let Some((p_ts, p_lat, p_lon)) = prev {
            v.secs_since_prev = Some(t - p_ts as i64);
            (v.prev_lat, v.prev_lon) = (p_lat, p_lon);
        }
        v
    }

    /// Adds an event. `settled` is the newest event time minus the allowed
    /// lateness: no later event can be asked about an earlier time, so the
    /// exact windows need nothing older than it minus their length.
    /// `max_recent` bounds the recent events kept.
    pub fn apply(&mut self, ev: Recent, large: bool, settled: i64, max_recent: usize) -> Applied {
        let mut applied = Applied::default();
        let detail = Detail::of(&ev);
        let logged = Event {
            ts: ev.ts,
            amount: ev.amount.abs(),
            large,
        };
        match self.log.insert(logged) {
            Some(j) => self.insert_recent(j, detail),
            // A late event older than every recent one: it would leave the
            // recent events at once.
            None => self.keep_before(Prev {
                ts: ev.ts,
                lat: ev.lat,
                lon: ev.lon,
            }),
        }
        let taken = self.log.shorten_tail(settled - DAY, max_recent);
        if taken.cut > 0 {
            let last = self.recent[taken.cut - 1];
            self.keep_before(Prev {
                ts: taken.last_ts,
                lat: last.lat,
                lon: last.lon,
            });
            let len = self.log.tail_len() + taken.cut;
            self.recent.copy_within(taken.cut..len, 0);
        }
        applied.recent_overflow = taken.forced;
        applied.window_overflow = self.log.expire(settled - LOG_SPAN);
        // Most cards hold two or three recent events: keep the buffer that
        // small, with one spare.
        let len = self.log.tail_len();
        if self.recent.len() >= len + 3 {
            self.resize_recent(len + 1);
        }
        applied
    }

    /// The newest event that left the recent ones.
    fn keep_before(&mut self, p: Prev) {
        if self.before.ts <= p.ts {
            self.before = p;
        }
    }

    /// Puts a recent event's details at `j`, the log's tail having grown
    /// by it.
    fn insert_recent(&mut self, j: usize, d: Detail) {
        let len = self.log.tail_len();
        if self.recent.len() < len {
            self.resize_recent(len + 1);
        }
        self.recent.copy_within(j..len - 1, j + 1);
        self.recent[j] = d;
    }

    fn resize_recent(&mut self, n: usize) {
        let mut v = std::mem::take(&mut self.recent).into_vec();
        v.reserve_exact(n.saturating_sub(v.len()));
        v.resize(n, Detail::default());
        self.recent = v.into_boxed_slice();
    }
}

/// Version of [`CardState::encode`]'s layout, its first byte. Version 3
/// held the log as 8-byte events and the recent events whole, versions 1
/// and 2 whole-day panes instead of the log; all are still read (see
/// [`CardState::decode`]), so a rolling deploy restores what the previous
/// releases wrote.
const ENCODING: u8 = 4;
/// The daily panes of versions 1 and 2.
const OLD_PANES: usize = 32;

impl CardState {
    /// The state as bytes, for the service's changelog: the log's packed
    /// stream, then little-endian fields in declaration order.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let tail = self.log.tail_len();
        out.reserve(32 + self.log.stream().len() + 16 * tail);
        out.push(ENCODING);
        self.log.encode(out);
        out.extend_from_slice(&self.before.ts.to_le_bytes());
        out.extend_from_slice(&self.before.lat.to_le_bytes());
        out.extend_from_slice(&self.before.lon.to_le_bytes());
        for r in &self.recent[..tail] {
            out.extend_from_slice(&r.merchant.to_le_bytes());
            out.extend_from_slice(&r.lat.to_le_bytes());
            out.extend_from_slice(&r.lon.to_le_bytes());
            out.extend_from_slice(&r.id.to_le_bytes());
        }
        // Written only for a features file's declared fields, so that a
        // card without them reads as the previous release wrote it.
        if let Some(d) = &self.declared {
            out.push(1);
            d.encode(out);
        }
    }

    /// The state [`CardState::encode`] wrote, or `None` for bytes it cannot
    /// have written (another version, or cut short).
    ///
    /// Versions 1 and 2 kept a count, sum and large count per UTC day, not
    /// the events: each day's events then come back at the first second of
    /// their day, each with the day's mean amount (the recent events as
    /// they were). Counts and sums stay whole; a window's edge and spread
    /// are approximate until those days leave the 30-day window.
    pub fn decode(bytes: &[u8]) -> Option<CardState> {
        let mut r = Reader(bytes);
        let version = r.u8()?;
        let mut c = CardState::default();
        if version == ENCODING {
            c.log = Log::decode(&mut r)?;
            c.before = Prev {
                ts: r.u32()?,
                lat: r.f32()?,
                lon: r.f32()?,
            };
            let details = (0..c.log.tail_len())
                .map(|_| {
                    Some(Detail {
                        merchant: r.u32()?,
                        lat: r.f32()?,
                        lon: r.f32()?,
                        id: r.u32()?,
                    })
                })
                .collect::<Option<Vec<_>>>()?;
            c.recent = details.into_boxed_slice();
        } else {
            let (events, before, recent) = decode_whole_events(&mut r, version)?;
            c.before = before;
            c.set_log(&events, &recent);
        }
        if matches!(version, 3 | ENCODING) && r.u8() == Some(1) {
            c.declared = Some(Box::new(DeclaredLog::decode(&mut r)?));
        }
        r.0.is_empty().then_some(c)
    }

    /// The log of `events`, with the recent events that are its last ones
    /// as its tail. An earlier recent event that is not (versions 1 and 2
    /// put a day's other events after it) counts as one that left.
    fn set_log(&mut self, events: &[Event], recent: &[Recent]) {
        let matching = recent
            .iter()
            .rev()
            .zip(events.iter().rev())
            .take_while(|(r, e)| r.ts == e.ts)
            .count();
        let (left, kept) = recent.split_at(recent.len() - matching);
        if let Some(r) = left.last() {
            self.keep_before(Prev {
                ts: r.ts,
                lat: r.lat,
                lon: r.lon,
            });
        }
        self.log = Log::from_events(events, kept.len());
        let kept = &kept[kept.len() - self.log.tail_len()..];
        self.recent = kept.iter().map(Detail::of).collect();
    }
}

/// Versions 1 to 3: the log's events (rebuilt from daily panes for 1 and
/// 2), the event before the recent ones, and the recent events whole.
fn decode_whole_events(r: &mut Reader, version: u8) -> Option<(Vec<Event>, Prev, Vec<Recent>)> {
    let mut events = Vec::new();
    let mut panes = None;
    match version {
        3 => {
            let n = r.u16()? as usize;
            if n > MAX_LOGGED {
                return None;
            }
            events.reserve_exact(n);
            for _ in 0..n {
                let (ts, signed) = (r.u32()?, r.f32()?);
                if events.last().is_some_and(|e: &Event| e.ts > ts) || !holdable(signed.abs()) {
                    return None; // the log is in time order, of amounts an event has
                }
                events.push(Event {
                    ts,
                    amount: signed.abs(),
                    large: signed.is_sign_negative(),
                });
            }
        }
        1 | 2 => {
            let newest_day = r.u32()?;
            let mut tally = [0u16; OLD_PANES];
            let mut sums = [0f32; OLD_PANES];
            for t in &mut tally {
                *t = r.u16()?;
            }
            for v in &mut sums {
                *v = r.f32()?;
            }
            for _ in 0..OLD_PANES {
                r.f32()?; // sums of squares: the log recomputes them
            }
            panes = Some((newest_day, tally, sums));
        }
        _ => return None,
    }
    let before = Prev {
        ts: r.u32()?,
        lat: r.f32()?,
        lon: r.f32()?,
    };
    let n = r.u16()? as usize;
    let mut recent = Vec::with_capacity(n.min(256));
    for _ in 0..n {
        recent.push(Recent {
            ts: r.u32()?,
            amount: r.f32()?,
            merchant: r.u32()?,
            lat: r.f32()?,
            lon: r.f32()?,
            id: if version == 1 { 0 } else { r.u32()? },
        });
    }
    if let Some((newest_day, tally, sums)) = panes {
        events = log_from_panes(newest_day, &tally, &sums, &recent);
        if events.windows(2).any(|w| w[0].ts > w[1].ts) {
            return None; // days past the end of time
        }
    }
    Some((events, before, recent))
}

/// The events versions 1 and 2 stand for: per day, its recent events as
/// they were and the rest at the day's first second with the mean amount
/// of what the recent events leave of the day's sum.
fn log_from_panes(
    newest_day: u32,
    tally: &[u16; OLD_PANES],
    sums: &[f32; OLD_PANES],
    recent: &[Recent],
) -> Vec<Event> {
    const COUNT_BITS: u16 = 0x0fff;
    let mut log = Vec::new();
    let first = newest_day.saturating_sub(OLD_PANES as u32 - 1);
    for day in first..=newest_day {
        let i = day as usize % OLD_PANES;
        let count = (tally[i] & COUNT_BITS) as usize;
        let mut large = (tally[i] >> 12) as usize;
        let known: Vec<&Recent> = recent
            .iter()
            .filter(|r| r.ts as i64 / DAY == day as i64)
            .take(count)
            .collect();
        let rest = count - known.len();
        let known_sum: f64 = known.iter().map(|r| r.amount as f64).sum();
        let mean = if rest > 0 {
            let mean = (sums[i] as f64 - known_sum) / rest as f64;
            // A corrupt sum must not give an amount no event has.
            if mean.is_nan() {
                0.0
            } else {
                mean.clamp(0.0, AMOUNT_CEILING) as f32
            }
        } else {
            0.0
        };
        let start = (day as i64 * DAY) as u32;
        let events = (0..rest)
            .map(|_| (start, mean))
            .chain(known.iter().map(|r| (r.ts, r.amount.abs())))
            .map(|(ts, a)| (ts, if holdable(a) { a } else { 0.0 }));
        for (ts, amount) in events {
            log.push(Event {
                ts,
                amount,
                large: large > 0,
            });
            large = large.saturating_sub(1);
        }
    }
    let over = log.len().saturating_sub(MAX_LOGGED);
    log.drain(..over);
    log
}

/// Little-endian fields off the front of a byte slice.
pub(crate) struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    pub fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    pub fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    pub fn i64(&mut self) -> Option<i64> {
        self.take().map(i64::from_le_bytes)
    }
    pub fn f32(&mut self) -> Option<f32> {
        self.take().map(f32::from_le_bytes)
    }
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn state_size() {
        println!(
            "CardState {} bytes",
            std::mem::size_of::<super::CardState>()
        );
        assert!(std::mem::size_of::<super::CardState>() <= 136);
        assert_eq!(std::mem::size_of::<super::Detail>(), 16);
    }

    /// A card's state survives the changelog's encoding bit for bit, and
    /// anything cut short or of another version is refused.
    #[test]
    fn encoding_round_trip() {
        use super::*;
        let mut c = CardState::default();
        for i in 0..40u32 {
            let ev = Recent {
                ts: 1_600_000_000 + i * 3000,
                amount: 10.5 + i as f32,
                merchant: i % 7,
                lat: if i % 3 == 0 {
                    f32::NAN
                } else {
                    40.0 + i as f32
                },
                lon: 50.0,
                id: 1000 + i,
            };
            c.apply(ev, i % 5 == 0, 1_600_000_000 + i as i64 * 3000, 64);
        }
        let mut bytes = Vec::new();
        c.encode(&mut bytes);
        let d = CardState::decode(&bytes).expect("decodes");
        let mut again = Vec::new();
        d.encode(&mut again);
        // The running card's stream may start mid-byte; the decoded one's
        // is re-encoded from the first event, and stays so.
        let mut third = Vec::new();
        CardState::decode(&again).unwrap().encode(&mut third);
        assert_eq!(again, third);
        let t = 1_600_000_000 + 40 * 3000;
        let (a, b) = (c.view(t, 3), d.view(t, 3));
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        assert!(CardState::decode(&bytes[..bytes.len() - 1]).is_none());
        let mut other = bytes.clone();
        other[0] = 9;
        assert!(CardState::decode(&other).is_none());
        let last = 1_600_000_000 + 39 * 3000;
        assert!(d.has_seen(1039, last) && !d.has_seen(1039, last - 1));
        assert!(!d.has_seen(0, last) && !d.has_seen(7, last));
    }

    /// What the previous release wrote (layout 3: the log as 8-byte
    /// events, the recent events whole) restores to the very state the
    /// running card has: the same windows, previous event and duplicates.
    #[test]
    fn version_3_restores_exactly() {
        use super::*;
        let t0 = 1_600_000_000u32;
        let mut c = CardState::default();
        let mut events = Vec::new();
        let mut recent = Vec::new();
        for i in 0..50u32 {
            let ev = Recent {
                ts: t0 + i * 20_000,
                amount: (i * 137 % 5000) as f32 / 100.0 + 1.0,
                merchant: i % 5,
                lat: 40.0 + i as f32,
                lon: 2.0,
                id: 500 + i,
            };
            let large = i % 7 == 0;
            let settled = ev.ts as i64 - 3600;
            c.apply(ev, large, settled, 64);
            events.push((ev.ts, if large { -ev.amount } else { ev.amount }));
            recent.push(ev);
            events.retain(|e| e.0 as i64 > settled - LOG_SPAN);
            recent.retain(|r| r.ts as i64 >= settled - DAY);
        }
        // The card as the previous release would have written it.
        let mut b = vec![3u8];
        b.extend_from_slice(&(events.len() as u16).to_le_bytes());
        for (ts, signed) in &events {
            b.extend_from_slice(&ts.to_le_bytes());
            b.extend_from_slice(&signed.to_le_bytes());
        }
        for v in [c.before.ts, c.before.lat.to_bits(), c.before.lon.to_bits()] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&(recent.len() as u16).to_le_bytes());
        for r in &recent {
            for v in [
                r.ts,
                r.amount.to_bits(),
                r.merchant,
                r.lat.to_bits(),
                r.lon.to_bits(),
                r.id,
            ] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        let d = CardState::decode(&b).expect("version 3 decodes");
        assert_eq!(d.log.to_vec(), c.log.to_vec());
        assert_eq!(d.log.tail_len(), c.log.tail_len());
        let last = t0 + 49 * 20_000;
        for t in [last as i64, last as i64 + 3 * DAY, last as i64 - 1000] {
            assert_eq!(
                format!("{:?}", d.view(t, 1)),
                format!("{:?}", c.view(t, 1)),
                "at {t}"
            );
        }
        assert!(d.has_seen(549, last) && !d.has_seen(549, last - 1));
    }

    /// A changelog record is input: any corruption of one is refused or
    /// read as some state, never a panic, and a state read from it can be
    /// viewed, folded into and written again.
    #[test]
    fn corrupt_records_never_panic() {
        use super::*;
        use crate::rng::Rng;
        let mut c = CardState::default();
        for i in 0..60u32 {
            let ev = Recent {
                ts: 1_600_000_000 + i * 40_000,
                amount: if i % 9 == 0 {
                    1.0 / 3.0
                } else {
                    (i * 311 % 20_000) as f32 / 100.0
                },
                merchant: i % 4,
                lat: 1.0,
                lon: 2.0,
                id: i + 1,
            };
            c.apply(ev, i % 6 == 0, ev.ts as i64 - 3600, 64);
        }
        let mut good = Vec::new();
        c.encode(&mut good);
        let mut rng = Rng::new(5);
        let mut read = 0;
        for round in 0..20_000 {
            let mut b = good.clone();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(b.len());
                b[at] ^= 1 << rng.below(8);
            }
            if round % 10 == 0 {
                b.truncate(rng.below(b.len()));
            }
            if let Some(mut d) = CardState::decode(&b) {
                read += 1;
                let t = 1_600_000_000 + 61 * 40_000;
                d.view(t, 1);
                d.view(t - 100_000, 1);
                let ev = Recent {
                    ts: t as u32,
                    amount: 5.0,
                    ..Recent::default()
                };
                d.apply(ev, false, t - 3600, 64);
                d.encode(&mut Vec::new());
            }
        }
        // Most flips land in amounts or places, which any value fills.
        assert!(read > 0, "no mutated record was read");
    }

    /// What earlier releases wrote (daily panes; version 1 without ids)
    /// still restores: counts and sums whole, recent events as they were.
    #[test]
    fn versions_1_and_2_still_decode() {
        use super::*;
        let day = 18_500u32;
        let at = |d: u32, s: u32| d * DAY as u32 + s;
        // Three days with events: 20 days ago (4 events, one large, 100 in
        // all), yesterday (2, 30 in all) and today (1 recent event of 12).
        let mut tally = [0u16; OLD_PANES];
        let mut sums = [0f32; OLD_PANES];
        for (d, count, large, sum) in [
            (day - 20, 4u16, 1u16, 100f32),
            (day - 1, 2, 0, 30.0),
            (day, 1, 0, 12.0),
        ] {
            tally[d as usize % OLD_PANES] = count | large << 12;
            sums[d as usize % OLD_PANES] = sum;
        }
        let recent = Recent {
            ts: at(day, 3600),
            amount: 12.0,
            merchant: 3,
            lat: 1.0,
            lon: 2.0,
            id: 77,
        };
        for version in [1u8, 2] {
            let mut b = vec![version];
            b.extend_from_slice(&day.to_le_bytes());
            tally
                .iter()
                .for_each(|t| b.extend_from_slice(&t.to_le_bytes()));
            sums.iter()
                .for_each(|v| b.extend_from_slice(&v.to_le_bytes()));
            sums.iter()
                .for_each(|v| b.extend_from_slice(&(v * v).to_le_bytes()));
            for v in [at(day - 1, 100), 0, 0] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.extend_from_slice(&1u16.to_le_bytes());
            for v in [
                recent.ts,
                12f32.to_bits(),
                3,
                1f32.to_bits(),
                2f32.to_bits(),
            ] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            if version == 2 {
                b.extend_from_slice(&77u32.to_le_bytes());
            }
            let c = CardState::decode(&b).expect("an old version decodes");
            let v = c.view(at(day, 7200) as i64, 3);
            assert_eq!(
                (v.prev_30d.count, v.prev_30d.large),
                (7, 1),
                "version {version}"
            );
            assert!(
                (v.prev_30d.sum - 142.0).abs() < 1e-3,
                "version {version}: {v:?}"
            );
            assert_eq!(v.prev_7d.count, 3, "version {version}");
            assert_eq!(c.newest_day(), day);
            assert_eq!(c.has_seen(77, recent.ts), version == 2);
            // Re-encoded, it is version 3 and stays what it is.
            let mut again = Vec::new();
            c.encode(&mut again);
            assert_eq!(again[0], ENCODING);
            let d = CardState::decode(&again).unwrap();
            assert_eq!(
                format!("{:?}", d.view(at(day, 7200) as i64, 3)),
                format!("{v:?}")
            );
        }
    }

    /// The 7- and 30-day windows end at the event and start just after its
    /// time minus the window, to the second; a card past the log's bound
    /// keeps its newest events and says so.
    #[test]
    fn windows_are_exact_to_the_second() {
        use super::*;
        let t0 = 1_600_000_000u32;
        let mut c = CardState::default();
        let ev = |ts: u32, amount: f32| Recent {
            ts,
            amount,
            ..Recent::default()
        };
        c.apply(ev(t0, 10.0), false, t0 as i64, 64);
        c.apply(ev(t0 + 1, 20.0), true, t0 as i64 + 1, 64);
        let at = |c: &CardState, t: i64| {
            let v = c.view(t, 0);
            (v.prev_7d.count, v.prev_30d.count, v.prev_30d.large)
        };
        let week = 7 * DAY;
        assert_eq!(at(&c, t0 as i64 + week - 1), (2, 2, 1));
        assert_eq!(at(&c, t0 as i64 + week), (1, 2, 1));
        assert_eq!(at(&c, t0 as i64 + week + 1), (0, 2, 1));
        assert_eq!(at(&c, t0 as i64 + LOG_SPAN), (0, 1, 1));
        assert_eq!(at(&c, t0 as i64 + LOG_SPAN + 1), (0, 0, 0));
        // A late event sees nothing after itself.
        assert_eq!(at(&c, t0 as i64), (1, 1, 0));
        let mut heavy = CardState::default();
        let mut overflows = 0;
        for i in 0..MAX_LOGGED as u32 + 10 {
            let a = heavy.apply(ev(t0 + i * 60, 1.0), false, (t0 + i * 60) as i64, 64);
            overflows += u32::from(a.window_overflow);
        }
        assert_eq!(overflows, 10);
        assert_eq!(heavy.log.len(), MAX_LOGGED);
    }
}
