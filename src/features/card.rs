//! Per-card window state: daily panes for the 7- and 30-day windows, and
//! the card's recent raw events for the exact 1-hour and 1-day windows.

use super::geo::haversine_km;

pub const DAY: i64 = 86_400;
/// Daily panes kept: the 30-day window reaches back into a 31st day.
pub const PANES: usize = 32;
/// Amount at least this many times the card's 30-day mean counts as large.
pub const LARGE_RATIO: f64 = 2.5;
/// History a card needs before one of its amounts can count as large.
pub const LARGE_MIN_HISTORY: u32 = 3;

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

#[derive(Debug, Clone, Copy, Default)]
struct Prev {
    ts: u32,
    lat: f32,
    lon: f32,
}

const COUNT_BITS: u16 = 0x0fff;
const LARGE_ONE: u16 = 0x1000;

#[derive(Debug, Clone)]
pub struct CardState {
    newest_day: u32,
    /// Per day: the count in the low 12 bits, large amounts in the high 4
    /// (each saturating), so a pane costs 10 bytes with its two sums.
    tally: [u16; PANES],
    sums: [f32; PANES],
    sumsq: [f32; PANES],
    /// Raw events within the last day plus the allowed lateness, oldest first.
    recent: Vec<Recent>,
    /// The newest event evicted from `recent`, for "time since previous"
    /// and speed; `ts` 0 when none.
    before: Prev,
}

impl Default for CardState {
    fn default() -> Self {
        CardState {
            newest_day: 0,
            tally: [0; PANES],
            sums: [0.0; PANES],
            sumsq: [0.0; PANES],
            recent: Vec::new(),
            before: Prev::default(),
        }
    }
}

/// Aggregates over a range of daily panes.
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
    /// Previous panes (excluding the event itself) for 7 and 30 days.
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
        let Some(dt) = self.secs_since_prev else {
            return 0.0;
        };
        // Beyond 30 days a card may have expired, so no speed either way.
        if dt > 30 * DAY || lat.is_nan() || self.prev_lat.is_nan() {
            return 0.0;
        }
        let km = haversine_km(
            self.prev_lat as f64,
            self.prev_lon as f64,
            lat as f64,
            lon as f64,
        );
        // A minute's floor keeps two swipes in the same second finite.
        km / (dt.max(60) as f64 / 3600.0)
    }
}

impl CardState {
    pub fn newest_day(&self) -> u32 {
        self.newest_day
    }

    pub fn prefetch_history(&self) {
        super::store::prefetch(
            self.recent.as_ptr(),
            self.recent.len() * std::mem::size_of::<Recent>(),
        );
    }

    /// Whether a transaction with this id hash is among the recent events:
    /// those of the exact windows' span, the only span in which an event
    /// is not too late to change the state anyway.
    pub fn has_seen(&self, id: u32, ts: u32) -> bool {
        id != 0 && self.recent.iter().any(|r| r.id == id && r.ts == ts)
    }

    /// Sums over the panes of days `[from_30, to]`, and of `[from_7, to]` on the way.
    fn panes(&self, from_30: i64, from_7: i64, to_day: i64) -> (PaneSum, PaneSum) {
        let newest = self.newest_day as i64;
        let hi = to_day.min(newest);
        let lo = from_30.max(newest - PANES as i64 + 1);
        // The days before the 7-day window, then the window, which counts
        // in both sums.
        let early = self.pane_sum(lo, hi.min(from_7 - 1));
        let s7 = self.pane_sum(lo.max(from_7), hi);
        let s30 = PaneSum {
            count: early.count + s7.count,
            sum: early.sum + s7.sum,
            sumsq: early.sumsq + s7.sumsq,
            large: early.large + s7.large,
        };
        (s30, s7)
    }

    /// Sums over the panes of days `[from, to]`, all within the kept panes.
    fn pane_sum(&self, from: i64, to: i64) -> PaneSum {
        let mut s = PaneSum::default();
        for d in from..to + 1 {
            let i = d as usize % PANES;
            let tally = self.tally[i];
            s.count += (tally & COUNT_BITS) as u32;
            s.large += (tally >> 12) as u32;
            s.sum += self.sums[i] as f64;
            s.sumsq += self.sumsq[i] as f64;
        }
        s
    }

    /// The card's contribution to the features of an event at `t`, before
    /// the event is applied. Late events see only what came at or before them
    /// in the exact windows, and whole days in the pane windows.
    pub fn view(&self, t: i64, merchant: u32) -> CardView {
        let mut v = CardView {
            prev_lat: f32::NAN,
            prev_lon: f32::NAN,
            ..CardView::default()
        };
        let day = t.div_euclid(DAY);
        (v.prev_30d, v.prev_7d) = self.panes(
            (t - 30 * DAY).div_euclid(DAY),
            (t - 7 * DAY).div_euclid(DAY),
            day,
        );

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

    /// Adds an event. `horizon` is the oldest timestamp the exact windows can
    /// still be asked about; `max_recent` bounds the raw events kept.
    /// Returns true when the bound forced an early eviction.
    pub fn apply(&mut self, ev: Recent, large: bool, horizon: i64, max_recent: usize) -> bool {
        let day = (ev.ts as i64).div_euclid(DAY) as u32;
        if day > self.newest_day {
            let gap = (day - self.newest_day) as usize;
            for k in 1..=gap.min(PANES) {
                let i = (self.newest_day as usize + k) % PANES;
                self.tally[i] = 0;
                self.sums[i] = 0.0;
                self.sumsq[i] = 0.0;
            }
            self.newest_day = day;
        }
        if self.newest_day - day < PANES as u32 {
            let i = day as usize % PANES;
            let a = ev.amount;
            let t = self.tally[i];
            let count = if t & COUNT_BITS < COUNT_BITS { 1 } else { 0 };
            let large = if large && t >> 12 < 15 { LARGE_ONE } else { 0 };
            self.tally[i] = t + count + large;
            self.sums[i] += a;
            self.sumsq[i] += a * a;
        }

        if self.recent.last().is_none_or(|r| r.ts <= ev.ts) {
            self.recent.push(ev);
        } else {
            let pos = self.recent.partition_point(|r| r.ts <= ev.ts);
            self.recent.insert(pos, ev);
        }
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
        overflow > expired
    }
}

/// Version of [`CardState::encode`]'s layout, its first byte. Version 1,
/// without the recent events' ids, is still read: a rolling deploy
/// restores what the previous release wrote.
const ENCODING: u8 = 2;

impl CardState {
    /// The state as bytes, for the service's changelog: little-endian
    /// fields in declaration order, the recent events last.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(340 + 24 * self.recent.len());
        out.push(ENCODING);
        out.extend_from_slice(&self.newest_day.to_le_bytes());
        for t in self.tally {
            out.extend_from_slice(&t.to_le_bytes());
        }
        for v in self.sums.iter().chain(&self.sumsq) {
            out.extend_from_slice(&v.to_le_bytes());
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
    }

    /// The state [`CardState::encode`] wrote, or `None` for bytes it cannot
    /// have written (another version, or cut short).
    pub fn decode(bytes: &[u8]) -> Option<CardState> {
        let mut r = Reader(bytes);
        let version = r.u8()?;
        if version != ENCODING && version != 1 {
            return None;
        }
        let mut c = CardState {
            newest_day: r.u32()?,
            ..CardState::default()
        };
        for t in &mut c.tally {
            *t = r.u16()?;
        }
        for v in c.sums.iter_mut().chain(c.sumsq.iter_mut()) {
            *v = r.f32()?;
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
        r.0.is_empty().then_some(c)
    }
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
        assert!(std::mem::size_of::<super::CardState>() <= 368);
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
            c.apply(ev, i % 5 == 0, 1_600_000_000 + i as i64 * 3000 - 86_400, 64);
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

    /// What the previous release wrote (version 1, no ids) still restores,
    /// its events without ids.
    #[test]
    fn version_1_still_decodes() {
        use super::*;
        let mut c = CardState::default();
        let ev = Recent {
            ts: 1_600_000_000,
            amount: 12.0,
            merchant: 3,
            lat: 1.0,
            lon: 2.0,
            id: 0,
        };
        c.apply(ev, false, 1_599_000_000, 64);
        let mut v2 = Vec::new();
        c.encode(&mut v2);
        // Version 1 is version 2 without the trailing id of each event.
        let mut v1 = v2[..v2.len() - 4].to_vec();
        v1[0] = 1;
        let d = CardState::decode(&v1).expect("version 1 decodes");
        let mut again = Vec::new();
        d.encode(&mut again);
        assert_eq!(again, v2);
    }
}
