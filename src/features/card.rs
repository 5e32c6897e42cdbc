//! Per-card window state: the card's events of the last 30 days, as time
//! and amount, for the 7- and 30-day windows, exact to the second; and its
//! recent raw events, with merchant and place, for the 1-hour and 1-day
//! windows.

use super::declared::DeclaredLog;
use super::geo::haversine_km;

pub const DAY: i64 = 86_400;
/// Amount at least this many times the card's 30-day mean counts as large.
pub const LARGE_RATIO: f64 = 2.5;
/// History a card needs before one of its amounts can count as large.
pub const LARGE_MIN_HISTORY: u32 = 3;
/// The longest window over the logged events.
const LOG_SPAN: i64 = 30 * DAY;
/// Events a card's log holds at most (16 kB): a card past it, more than 68
/// payments a day for 30 days, loses its oldest first, and its 7- and
/// 30-day windows undercount (counted as `window_overflows`).
pub const MAX_LOGGED: usize = 2048;

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

/// An event of the card's last 30 days: its time, and its amount (at most
/// `AMOUNT_CEILING`, so never negative) with the sign bit set when the
/// amount counted as large for the card. Eight bytes: a card with 60
/// payments a month holds 480 bytes of them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Logged {
    ts: u32,
    signed_amount: f32,
}

impl Logged {
    fn new(ts: u32, amount: f32, large: bool) -> Logged {
        let a = amount.abs();
        Logged {
            ts,
            signed_amount: if large { -a } else { a },
        }
    }

    fn amount(self) -> f32 {
        self.signed_amount.abs()
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
    /// allowed lateness, oldest first; at most [`MAX_LOGGED`]. Its last is
    /// the newest event applied: eviction takes only the oldest.
    log: Vec<Logged>,
    /// Raw events within the last day plus the allowed lateness, oldest first.
    recent: Vec<Recent>,
    /// The newest event evicted from `recent`, for "time since previous"
    /// and speed; `ts` 0 when none.
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

    /// Sums a run of logged events, four at a time without a branch: the
    /// windows' one loop over a card's month.
    fn of(events: &[Logged]) -> PaneSum {
        let (mut sum, mut sumsq, mut large) = ([0f64; 4], [0f64; 4], 0u32);
        let chunks = events.chunks_exact(4);
        let rest = chunks.remainder();
        for c in chunks {
            for k in 0..4 {
                let a = c[k].amount() as f64;
                sum[k] += a;
                sumsq[k] += a * a;
                large += c[k].signed_amount.to_bits() >> 31;
            }
        }
        for (k, e) in rest.iter().enumerate() {
            let a = e.amount() as f64;
            sum[k] += a;
            sumsq[k] += a * a;
            large += e.signed_amount.to_bits() >> 31;
        }
        PaneSum {
            count: events.len() as u32,
            sum: (sum[0] + sum[1]) + (sum[2] + sum[3]),
            sumsq: (sumsq[0] + sumsq[1]) + (sumsq[2] + sumsq[3]),
            large,
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
    /// 7 and 30 days: times in `(t − 7 d, t]` and `(t − 30 d, t]`.
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
            .last()
            .map_or(0, |e| (e.ts as i64).div_euclid(DAY) as u32)
    }

    pub fn prefetch_history(&self) {
        super::store::prefetch(
            self.recent.as_ptr(),
            self.recent.len() * std::mem::size_of::<Recent>(),
        );
        // The windows read the whole log: a card's month is a few lines.
        super::store::prefetch(
            self.log.as_ptr(),
            self.log.len() * std::mem::size_of::<Logged>(),
        );
    }

    /// Whether a transaction with this id hash is among the recent events:
    /// those of the exact windows' span, the only span in which an event
    /// is not too late to change the state anyway.
    pub fn has_seen(&self, id: u32, ts: u32) -> bool {
        id != 0 && self.recent.iter().any(|r| r.id == id && r.ts == ts)
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
        // Both windows end at t (the whole log but for a late event); the
        // 30-day one starts after t − 30 d, and the 7-day one within it.
        // The edges are found by short walks, not binary searches: the log
        // ends at or just after t, only a few expired events precede the
        // 30-day window, and a week is the last quarter of the month.
        let log = &self.log[..];
        let mut end = log.len();
        while end > 0 && log[end - 1].ts as i64 > t {
            end -= 1;
        }
        let mut from_7 = end;
        while from_7 > 0 && log[from_7 - 1].ts as i64 > t - 7 * DAY {
            from_7 -= 1;
        }
        let mut from_30 = 0;
        while from_30 < from_7 && log[from_30].ts as i64 <= t - LOG_SPAN {
            from_30 += 1;
        }
        v.prev_7d = PaneSum::of(&log[from_7..end]);
        let early = PaneSum::of(&log[from_30..from_7]);
        v.prev_30d = PaneSum {
            count: early.count + v.prev_7d.count,
            sum: early.sum + v.prev_7d.sum,
            sumsq: early.sumsq + v.prev_7d.sumsq,
            large: early.large + v.prev_7d.large,
        };

        let mut merchants = [0u32; 64];
        let mut distinct = 0usize;
        let mut prev: Option<&Recent> = None;
        for r in &self.recent {
            let ts = r.ts as i64;
            if ts > t {
                break;
            }
            prev = Some(r);
            if ts > t - DAY {
                v.count_1d += 1;
                v.sum_1d += r.amount as f64;
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
        }
        v.distinct_merchants_1d = distinct as u32 + 1;
        let prev = prev
            .map(|r| (r.ts, r.lat, r.lon))
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
    /// `max_recent` bounds the raw events kept.
    pub fn apply(&mut self, ev: Recent, large: bool, settled: i64, max_recent: usize) -> Applied {
        let mut applied = Applied::default();

        let logged = Logged::new(ev.ts, ev.amount, large);
        // Grown by an eighth, not doubled: a month of a card's events is
        // most of its state, and doubling would leave a third of it empty
        // on average. A realloc every eighth of the log is cheap beside it.
        if self.log.len() == self.log.capacity() {
            self.log.reserve_exact(self.log.len() / 8 + 4);
        }
        if self.log.last().is_none_or(|e| e.ts <= ev.ts) {
            self.log.push(logged);
        } else {
            let pos = self.log.partition_point(|e| e.ts <= ev.ts);
            self.log.insert(pos, logged);
        }
        // Expired events go a few at a time (the windows skip them), so
        // that the log is not shifted for every event.
        let expired = if self.log[0].ts as i64 <= settled - LOG_SPAN {
            self.log
                .partition_point(|e| (e.ts as i64) <= settled - LOG_SPAN)
        } else {
            0
        };
        let overflow = self.log.len().saturating_sub(MAX_LOGGED);
        if expired >= 4 || overflow > 0 || (expired > 0 && self.log.len() == self.log.capacity()) {
            self.log.drain(..expired.max(overflow));
            applied.window_overflow = overflow > expired;
            // A card that slowed down gives back what its busier month took.
            if self.log.capacity() >= 2 * self.log.len() + 8 {
                self.log.shrink_to(self.log.len() + self.log.len() / 4 + 2);
            }
        }

        if self.recent.last().is_none_or(|r| r.ts <= ev.ts) {
            self.recent.push(ev);
        } else {
            let pos = self.recent.partition_point(|r| r.ts <= ev.ts);
            self.recent.insert(pos, ev);
        }
        let horizon = settled - DAY;
        let expired = self.recent.partition_point(|r| (r.ts as i64) < horizon);
        let overflow = self.recent.len().saturating_sub(max_recent);
        let cut = expired.max(overflow);
        if cut > 0 {
            // A late event may be evicted at once: keep the newest ever evicted.
            let newest = self.recent[cut - 1];
            if self.before.ts <= newest.ts {
                self.before = Prev {
                    ts: newest.ts,
                    lat: newest.lat,
                    lon: newest.lon,
                };
            }
            self.recent.drain(..cut);
        }
        // Most cards hold one or two recent events: keep the buffer that small.
        if self.recent.capacity() >= 2 * self.recent.len() + 2 {
            self.recent.shrink_to(self.recent.len() + 1);
        }
        applied.recent_overflow = overflow > expired;
        applied
    }
}

/// Version of [`CardState::encode`]'s layout, its first byte. Versions 1
/// and 2 held whole-day panes instead of the log; they are still read (see
/// [`CardState::decode`]), so a rolling deploy restores what the previous
/// release wrote.
const ENCODING: u8 = 3;
/// The daily panes of versions 1 and 2.
const OLD_PANES: usize = 32;

impl CardState {
    /// The state as bytes, for the service's changelog: little-endian
    /// fields in declaration order, each list after its length.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(19 + 8 * self.log.len() + 24 * self.recent.len());
        out.push(ENCODING);
        out.extend_from_slice(&(self.log.len() as u16).to_le_bytes());
        for e in &self.log {
            out.extend_from_slice(&e.ts.to_le_bytes());
            out.extend_from_slice(&e.signed_amount.to_le_bytes());
        }
        out.extend_from_slice(&self.before.ts.to_le_bytes());
        out.extend_from_slice(&self.before.lat.to_le_bytes());
        out.extend_from_slice(&self.before.lon.to_le_bytes());
        out.extend_from_slice(&(self.recent.len() as u16).to_le_bytes());
        for r in &self.recent {
            out.extend_from_slice(&r.ts.to_le_bytes());
            out.extend_from_slice(&r.amount.to_le_bytes());
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
        let mut panes = None;
        match version {
            ENCODING => {
                let n = r.u16()? as usize;
                c.log.reserve_exact(n);
                for _ in 0..n {
                    let e = Logged {
                        ts: r.u32()?,
                        signed_amount: r.f32()?,
                    };
                    if c.log.last().is_some_and(|last| last.ts > e.ts) {
                        return None; // the windows' walks need time order
                    }
                    c.log.push(e);
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
        c.before = Prev {
            ts: r.u32()?,
            lat: r.f32()?,
            lon: r.f32()?,
        };
        let n = r.u16()? as usize;
        c.recent.reserve_exact(n);
        for _ in 0..n {
            c.recent.push(Recent {
                ts: r.u32()?,
                amount: r.f32()?,
                merchant: r.u32()?,
                lat: r.f32()?,
                lon: r.f32()?,
                id: if version == 1 { 0 } else { r.u32()? },
            });
        }
        if version == ENCODING && r.u8() == Some(1) {
            c.declared = Some(Box::new(DeclaredLog::decode(&mut r)?));
        }
        if !r.0.is_empty() {
            return None;
        }
        if let Some((newest_day, tally, sums)) = panes {
            c.log = log_from_panes(newest_day, &tally, &sums, &c.recent);
        }
        Some(c)
    }
}

/// The events versions 1 and 2 stand for: per day, its recent events as
/// they were and the rest at the day's first second with the mean amount
/// of what the recent events leave of the day's sum.
fn log_from_panes(
    newest_day: u32,
    tally: &[u16; OLD_PANES],
    sums: &[f32; OLD_PANES],
    recent: &[Recent],
) -> Vec<Logged> {
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
            ((sums[i] as f64 - known_sum) / rest as f64).max(0.0) as f32
        } else {
            0.0
        };
        let start = (day as i64 * DAY) as u32;
        for _ in 0..rest {
            log.push(Logged::new(start, mean, large > 0));
            large = large.saturating_sub(1);
        }
        for r in known {
            log.push(Logged::new(r.ts, r.amount, large > 0));
            large = large.saturating_sub(1);
        }
    }
    let over = log.len().saturating_sub(MAX_LOGGED);
    log.drain(..over);
    log
}

/// Little-endian fields off the front of a byte slice.
pub(crate) struct Reader<'a>(pub &'a [u8]);

impl Reader<'_> {
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
}

#[cfg(test)]
mod tests {
    #[test]
    fn state_size() {
        println!(
            "CardState {} bytes",
            std::mem::size_of::<super::CardState>()
        );
        assert!(std::mem::size_of::<super::CardState>() <= 72);
        assert_eq!(std::mem::size_of::<super::Logged>(), 8);
        assert_eq!(std::mem::size_of::<super::Recent>(), 24);
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
        assert_eq!(bytes, again);
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
