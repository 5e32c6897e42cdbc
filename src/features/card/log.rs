//! A card's events of the last 30 days, bit-packed at about four bytes an
//! event, with exact running sums over the month and the week.
//!
//! The stream holds each event's amount and a "large" bit, then the time
//! to the next event: the first event's time is the head's, and each
//! cursor carries the time of the event it points at, so that deciding
//! whether an event has left a window costs no decoding. Times are
//! exp-Golomb codes of order 14 (15 bits under 4.5 hours, 2 more per
//! doubling); amounts are cents (exp-Golomb of order 12) when the cents
//! give back the very same `f32`, as amounts in minor units do, else the
//! `f32`'s 32 bits. A window in time order is its running sums less the
//! one or two events that have just left it; a late event's view reads the
//! whole log. Sums are fixed-point integers, so a window's sum does not
//! depend on the order in which events came and went: a card restored from
//! its changelog computes what the running card did, bit for bit.

use super::{DAY, LOG_SPAN, MAX_LOGGED, PaneSum};
use crate::features::AMOUNT_CEILING;

const TS_ORDER: u32 = 14;
const CENTS_ORDER: u32 = 12;
/// Amounts of 2^32 cents and more are kept as `f32` bits, so that no
/// cents code is longer than a time delta's.
const CENTS_LIMIT: f64 = 4_294_967_296.0;
/// Leading zeros of the longest code written: 18 for a delta of 2^32
/// seconds, 20 for 2^32 cents. More can only be corrupt input.
const MAX_ZEROS: u32 = 20;
/// The buffer grows by this many bytes.
const GROWTH: usize = 16;
/// Bytes of evicted events at the buffer's front are cut when an append
/// needs their room, or once they reach this (a card that stopped paying
/// gives its expired month back).
const COMPACT_AT: u32 = 64 * 8;
/// Fixed-point scales of the running sums. Amounts are kept to 2^-32
/// (exact above 2^-9, within 2^-32 below); the sum of 2,048 amounts of
/// 10^15 stays under 2^93, inside 96 bits. Squares are kept to 2^-24 and
/// capped at 2^80 (amounts over 10^12), so that 2,048 of them stay under
/// 2^115, inside 128.
const SUM_SCALE: f64 = (1u64 << 32) as f64;
const SQUARE_SCALE: f64 = (1u64 << 24) as f64;
const SQUARE_CAP: f64 = 1.208_925_819_614_629_2e24; // 2^80

/// One logged event.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Event {
    pub ts: u32,
    pub amount: f32,
    pub large: bool,
}

/// An event in the stream: the bit where its amount starts, and its time.
/// Past the last event: the end, and the last event's time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Cursor {
    bit: u32,
    ts: u32,
}

/// A signed fixed-point sum in `N` 32-bit words: `i128` would align the
/// card's state to 16 bytes, and the sums of amounts need only 96 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Wide<const N: usize>([u32; N]);

impl<const N: usize> Default for Wide<N> {
    fn default() -> Self {
        Wide([0; N])
    }
}

impl<const N: usize> Wide<N> {
    #[inline]
    fn get(self) -> i128 {
        let v = self
            .0
            .iter()
            .enumerate()
            .fold(0u128, |v, (i, &w)| v | (w as u128) << (32 * i));
        let unused = 128 - 32 * N as u32;
        ((v << unused) as i128) >> unused
    }

    #[inline]
    fn add(&mut self, d: i128) {
        let v = self.get().wrapping_add(d) as u128;
        for (i, w) in self.0.iter_mut().enumerate() {
            *w = (v >> (32 * i)) as u32;
        }
    }
}

/// `x`, a non-negative whole number below 2^127, as an integer: the
/// fast conversion where it fits 63 bits, as a card's amounts do.
#[inline]
fn whole(x: f64) -> i128 {
    if x < 9.2e18 {
        x as i64 as i128
    } else {
        whole_wide(x)
    }
}

// Out of line, or the compiler merges both arms into the slow conversion.
#[cold]
#[inline(never)]
fn whole_wide(x: f64) -> i128 {
    x as i128
}

/// `v` to the nearest `f64`, by the fast conversion where it fits 64 bits.
#[inline]
fn to_f64(v: i128) -> f64 {
    match i64::try_from(v) {
        Ok(v) => v as f64,
        Err(_) => to_f64_wide(v),
    }
}

#[cold]
#[inline(never)]
fn to_f64_wide(v: i128) -> f64 {
    v as f64
}

/// An amount's terms in the fixed-point sums (truncated: the same for the
/// same amount, whatever else is summed).
#[inline]
fn terms(amount: f32) -> (i128, i128) {
    let a = amount as f64;
    (
        whole(a * SUM_SCALE),
        whole((a * a).min(SQUARE_CAP) * SQUARE_SCALE),
    )
}

/// Count, large count and fixed-point sums of a run of events.
#[derive(Debug, Clone, Copy, Default)]
struct Sums {
    count: u32,
    large: u32,
    sum: i128,
    sumsq: i128,
}

impl Sums {
    #[inline]
    fn add(&mut self, ev: Event) {
        let (s, q) = terms(ev.amount);
        self.count += 1;
        self.large += u32::from(ev.large);
        self.sum = self.sum.wrapping_add(s);
        self.sumsq = self.sumsq.wrapping_add(q);
    }

    #[inline]
    fn remove(&mut self, ev: Event) {
        let (s, q) = terms(ev.amount);
        self.count -= 1;
        self.large -= u32::from(ev.large);
        self.sum = self.sum.wrapping_sub(s);
        self.sumsq = self.sumsq.wrapping_sub(q);
    }

    fn pane(self) -> PaneSum {
        PaneSum {
            count: self.count,
            sum: to_f64(self.sum) / SUM_SCALE,
            sumsq: to_f64(self.sumsq) / SQUARE_SCALE,
            large: self.large,
        }
    }
}

/// 64 bits from `bit` on, most significant first; zeros past the end.
#[inline(always)]
fn peek(bytes: &[u8], bit: u32) -> u64 {
    let at = (bit / 8) as usize;
    let word = match bytes.get(at..at + 8) {
        Some(b) => u64::from_be_bytes(b.try_into().expect("8 bytes")),
        // The newest events sit in the buffer's last bytes: read its last
        // word and shift, rather than copy byte by byte.
        None if bytes.len() >= 8 && at < bytes.len() => {
            let last = &bytes[bytes.len() - 8..];
            u64::from_be_bytes(last.try_into().expect("8 bytes")) << (8 * (at + 8 - bytes.len()))
        }
        None => {
            let mut w = [0u8; 8];
            let rest = bytes.get(at..).unwrap_or(&[]);
            w[..rest.len()].copy_from_slice(rest);
            u64::from_be_bytes(w)
        }
    };
    word << (bit % 8)
}

/// The exp-Golomb code of order `k` at the top of `word`: its value and
/// length; `None` for a code no writer makes.
#[inline]
fn exp_golomb(word: u64, k: u32) -> Option<(u64, u32)> {
    let zeros = word.leading_zeros();
    if zeros > MAX_ZEROS {
        return None;
    }
    let n = zeros + k + 1;
    let x = (word << zeros) >> (64 - n);
    Some((x - (1 << k), zeros + n))
}

/// ORs the `n` low bits of `value` in at `bit` (the bits there are zero).
#[inline]
fn put(bytes: &mut [u8], bit: u32, value: u64, n: u32) {
    if n == 0 {
        return;
    }
    let (at, off) = ((bit / 8) as usize, bit % 8);
    debug_assert!(n + off <= 64 && (n == 64 || value >> n == 0));
    let w = value << (64 - n - off);
    if let Some(chunk) = bytes.get_mut(at..at + 8) {
        let old = u64::from_be_bytes((&*chunk).try_into().expect("8 bytes"));
        chunk.copy_from_slice(&(old | w).to_be_bytes());
    } else {
        let b = w.to_be_bytes();
        for (dst, src) in bytes[at..]
            .iter_mut()
            .zip(&b[..(off + n).div_ceil(8) as usize])
        {
            *dst |= src;
        }
    }
}

/// The event at `at` of a stream the log wrote, and the cursor at the
/// next one (at `end` after the last): the windows' inner loop. Both
/// fields usually come out of one 64-bit read.
#[inline(always)]
fn step(bytes: &[u8], end: u32, at: Cursor) -> (Event, Cursor) {
    let w = peek(bytes, at.bit);
    // At least 57 bits of `w` are the stream's: the amount's longest form
    // (55) always fits.
    let valid = 64 - at.bit % 8;
    let (large, amount, m) = amount_at(w);
    let ev = Event {
        ts: at.ts,
        amount,
        large,
    };
    let after = at.bit + m;
    if after >= end {
        return (
            ev,
            Cursor {
                bit: end,
                ts: at.ts,
            },
        );
    }
    let mut d = w << m;
    let mut zeros = d.leading_zeros().min(MAX_ZEROS);
    if m + 2 * zeros + TS_ORDER + 1 > valid {
        // The delta runs past the bits read (its zeros may be the read's
        // end, never too few): read again from it.
        d = peek(bytes, after);
        zeros = d.leading_zeros().min(MAX_ZEROS);
    }
    let n = zeros + TS_ORDER + 1;
    let delta = ((d << zeros) >> (64 - n)).wrapping_sub(1 << TS_ORDER);
    let next = Cursor {
        bit: after + zeros + n,
        ts: at.ts.wrapping_add(delta as u32),
    };
    (ev, next)
}

/// Whether the state can hold `amount`: what `state_amount` gives, the
/// bound the sums' widths are chosen for.
pub(crate) fn holdable(amount: f32) -> bool {
    (0.0..=AMOUNT_CEILING).contains(&(amount as f64))
}

/// [`step`] for bytes from outside: `None` for a code no writer makes, an
/// amount no event has, or a time past `u32`.
fn checked_step(bytes: &[u8], end: u32, at: Cursor) -> Option<(Event, Cursor)> {
    let w = peek(bytes, at.bit);
    let m = if (w >> 62) & 1 == 1 {
        2 + exp_golomb(w << 2, CENTS_ORDER)?.1
    } else if holdable(f32::from_bits((w << 2 >> 32) as u32)) {
        34
    } else {
        return None;
    };
    let after = at.bit + m;
    if after > end {
        return None;
    }
    if after < end {
        let (delta, n) = exp_golomb(peek(bytes, after), TS_ORDER)?;
        at.ts.checked_add(u32::try_from(delta).ok()?)?;
        if after + n >= end {
            return None; // a time with no event after it
        }
    }
    Some(step(bytes, end, at))
}

/// The large flag, amount and length in bits (flags included) of the
/// amount at the top of `w`. A code that runs past the bits read comes out
/// too long, never too short: the bits past them are zeros.
#[inline(always)]
fn amount_at(w: u64) -> (bool, f32, u32) {
    let large = w >> 63 == 1;
    if (w >> 62) & 1 == 1 {
        let c = w << 2;
        let zeros = c.leading_zeros().min(MAX_ZEROS);
        let n = zeros + CENTS_ORDER + 1;
        let cents = ((c << zeros) >> (64 - n)).wrapping_sub(1 << CENTS_ORDER);
        (large, from_cents(cents), 2 + zeros + n)
    } else {
        (large, f32::from_bits((w << 2 >> 32) as u32), 34)
    }
}

/// The cents that give back exactly `amount`, if any below the limit.
fn cents(amount: f32) -> Option<u64> {
    let c = (amount as f64 * 100.0).round();
    ((0.0..CENTS_LIMIT).contains(&c) && from_cents(c as u64) == amount).then_some(c as u64)
}

/// The amount of `cents`: a multiplication, cheaper than the division in
/// the inner loop, and exact where it counts, since [`cents`] keeps only
/// the cents this gives back as the very amount.
#[inline(always)]
fn from_cents(cents: u64) -> f32 {
    (cents as f64 * 0.01) as f32
}

/// The amount's code, flags included: its bits as a value, and their
/// number.
fn amount_code(ev: Event) -> (u64, u32) {
    let large = u64::from(ev.large) << 1;
    match cents(ev.amount) {
        Some(c) => {
            let x = c + (1 << CENTS_ORDER);
            // The code is x after as many zeros as x has bits past the order.
            let n = 2 * (64 - x.leading_zeros()) - CENTS_ORDER - 1;
            (((large | 1) << n) | x, 2 + n)
        }
        None => ((large << 32) | ev.amount.to_bits() as u64, 34),
    }
}

/// The time delta's code: its bits as a value, and their number.
fn delta_code(delta: u64) -> (u64, u32) {
    let x = delta + (1 << TS_ORDER);
    (x, 2 * (64 - x.leading_zeros()) - TS_ORDER - 1)
}

/// The log: events in time order (ties in arrival order), the 7-day
/// cursor at the first event after the newest's time minus 7 days, and the
/// tail: the card's recent events, whose merchant and place the card keeps
/// beside the log. Running sums over all events and over those from the
/// 7-day cursor on. 96 bytes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Log {
    bytes: Box<[u8]>,
    head: Cursor,
    week: Cursor,
    tail: Cursor,
    /// The bit after the last event; the buffer is zero from there on.
    end: u32,
    /// The newest event's time (the base of the next delta).
    last_ts: u32,
    len: u16,
    /// Events before the 7-day cursor.
    week_index: u16,
    /// Large events in the log (12 bits), large events from the 7-day
    /// cursor on (12 bits), and the tail's length (8 bits), in one word.
    counts: u32,
    sum: Wide<3>,
    week_sum: Wide<3>,
    sumsq: Wide<4>,
}

const LARGE: u32 = 1;
const WEEK_LARGE: u32 = 1 << 12;
const TAIL: u32 = 1 << 24;

/// What [`Log::shorten_tail`] took off.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Shortened {
    pub cut: usize,
    /// The time of the newest event taken off.
    pub last_ts: u32,
    /// Whether the bound on the tail's length took events not yet expired.
    pub forced: bool,
}

impl Log {
    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn tail_len(&self) -> usize {
        (self.counts / TAIL) as usize
    }

    fn large(&self) -> u32 {
        self.counts & 0xfff
    }

    fn week_large(&self) -> u32 {
        (self.counts / WEEK_LARGE) & 0xfff
    }

    fn tail_start(&self) -> usize {
        self.len() - self.tail_len()
    }

    /// The newest event's time, if any.
    pub fn last_ts(&self) -> Option<u32> {
        (self.len > 0).then_some(self.last_ts)
    }

    fn all(&self) -> Sums {
        Sums {
            count: self.len as u32,
            large: self.large(),
            sum: self.sum.get(),
            sumsq: self.sumsq.get(),
        }
    }

    /// The events from the 7-day cursor on (without squares: no feature
    /// reads the 7-day spread).
    fn week(&self) -> Sums {
        Sums {
            count: (self.len - self.week_index) as u32,
            large: self.week_large(),
            sum: self.week_sum.get(),
            sumsq: 0,
        }
    }

    #[inline(always)]
    fn step(&self, at: Cursor) -> (Event, Cursor) {
        step(&self.bytes, self.end, at)
    }

    /// The events from `at`, `count` of them at most.
    fn events(&self, at: Cursor, count: usize) -> impl Iterator<Item = Event> + '_ {
        let mut at = at;
        (0..count).map(move |_| {
            let (ev, next) = self.step(at);
            at = next;
            ev
        })
    }

    /// Every event, oldest first.
    pub fn to_vec(&self) -> Vec<Event> {
        self.events(self.head, self.len()).collect()
    }

    /// The time of the tail's `j`-th event.
    pub fn tail_ts(&self, j: usize) -> Option<u32> {
        (j < self.tail_len()).then(|| self.events(self.tail, j + 1).last().map(|e| e.ts))?
    }

    /// Adds an event; where it landed in the tail, or `None` when it came
    /// before the tail (a late event older than the card's recent ones).
    pub fn insert(&mut self, ev: Event) -> Option<usize> {
        if self.len == 0 || ev.ts >= self.last_ts {
            self.push(ev);
            self.counts += TAIL;
            return Some(self.tail_len() - 1);
        }
        let mut events = self.to_vec();
        let pos = events.partition_point(|e| e.ts <= ev.ts);
        events.insert(pos, ev);
        let in_tail = pos >= self.tail_start();
        let tail_len = self.tail_len() + usize::from(in_tail);
        *self = Log::from_events(&events, tail_len);
        in_tail.then(|| pos - (events.len() - tail_len))
    }

    /// Appends an event no older than the newest. The tail's length is the
    /// caller's.
    fn push(&mut self, ev: Event) {
        let code = amount_code(ev);
        if self.len == 0 {
            // Empty: start the stream over at this event.
            self.bytes.fill(0);
            *self = Log {
                bytes: std::mem::take(&mut self.bytes),
                ..Log::default()
            };
            self.reserve(code.1);
            put(&mut self.bytes, 0, code.0, code.1);
            self.head = Cursor { bit: 0, ts: ev.ts };
            (self.week, self.tail) = (self.head, self.head);
        } else {
            let delta = delta_code((ev.ts - self.last_ts) as u64);
            self.reserve(delta.1 + code.1);
            // One write for both codes when they fit a word, as they do but
            // for raw amounts after long gaps.
            if self.end % 8 + delta.1 + code.1 <= 64 {
                let both = (delta.0 << code.1) | code.0;
                put(&mut self.bytes, self.end, both, delta.1 + code.1);
            } else {
                put(&mut self.bytes, self.end, delta.0, delta.1);
                put(&mut self.bytes, self.end + delta.1, code.0, code.1);
            }
            let at = Cursor {
                bit: self.end + delta.1,
                ts: ev.ts,
            };
            // Cursors past the last event now point at this one.
            if self.week_index == self.len {
                self.week = at;
            }
            if self.tail_len() == 0 {
                self.tail = at;
            }
            self.end = at.bit;
        }
        self.end += code.1;
        self.last_ts = ev.ts;
        self.len += 1;
        let (s, q) = terms(ev.amount);
        self.sum.add(s);
        self.week_sum.add(s);
        self.sumsq.add(q);
        self.counts += u32::from(ev.large) * (LARGE + WEEK_LARGE);
        self.advance_week();
    }

    /// Room for `bits` more: the evicted events' bytes at the front if
    /// they are enough (in steady state, a `memmove` every few events and
    /// no allocation), else [`GROWTH`] bytes more: a month of a card's
    /// events is most of its state, and doubling would leave a third of it
    /// empty on average.
    fn reserve(&mut self, bits: u32) {
        let mut need = (self.end + bits).div_ceil(8) as usize;
        if need > self.bytes.len() && (need - self.bytes.len()) * 8 <= self.head.bit as usize {
            self.compact();
            need = (self.end + bits).div_ceil(8) as usize;
        }
        if need > self.bytes.len() {
            let mut v = std::mem::take(&mut self.bytes).into_vec();
            let grown = need.next_multiple_of(GROWTH);
            v.reserve_exact(grown - v.len());
            v.resize(grown, 0);
            self.bytes = v.into_boxed_slice();
        }
    }

    fn advance_week(&mut self) {
        let from = self.last_ts as i64 - 7 * DAY;
        while self.week_index < self.len && self.week.ts as i64 <= from {
            let (ev, next) = self.step(self.week);
            self.week_sum.add(-terms(ev.amount).0);
            self.counts -= u32::from(ev.large) * WEEK_LARGE;
            self.week = next;
            self.week_index += 1;
        }
    }

    /// Drops the oldest events at or before `bound`, and any beyond
    /// [`MAX_LOGGED`], but never the tail's. Whether the bound on the
    /// log's length dropped events still inside the window.
    pub fn expire(&mut self, bound: i64) -> bool {
        let mut overflow = false;
        while self.len() > self.tail_len() {
            let over = self.len() > MAX_LOGGED;
            let inside = self.head.ts as i64 > bound;
            if inside && !over {
                break;
            }
            overflow |= inside;
            let (ev, next) = self.step(self.head);
            let (s, q) = terms(ev.amount);
            self.sum.add(-s);
            self.sumsq.add(-q);
            self.counts -= u32::from(ev.large) * LARGE;
            self.len -= 1;
            self.head = next;
            if self.week_index == 0 {
                // Only a log whose week reaches past the lateness's edge
                // (a lateness over 23 days) expires events of the week.
                self.week_sum.add(-s);
                self.counts -= u32::from(ev.large) * WEEK_LARGE;
                self.week = next;
            } else {
                self.week_index -= 1;
            }
        }
        if self.head.bit >= COMPACT_AT {
            self.compact();
        }
        overflow
    }

    /// Cuts the evicted bytes off the front, and gives back room a card
    /// that slowed down no longer needs.
    fn compact(&mut self) {
        let cut = (self.head.bit / 8) as usize;
        let used = self.end.div_ceil(8) as usize;
        self.bytes.copy_within(cut..used, 0);
        self.bytes[used - cut..used].fill(0);
        let bits = cut as u32 * 8;
        for c in [&mut self.head, &mut self.week, &mut self.tail] {
            c.bit -= bits;
        }
        self.end -= bits;
        let keep = (used - cut + GROWTH).next_multiple_of(GROWTH);
        if self.bytes.len() >= keep + 2 * GROWTH {
            let mut v = std::mem::take(&mut self.bytes).into_vec();
            v.truncate(keep);
            self.bytes = v.into_boxed_slice();
        }
    }

    /// Takes events off the tail's front: those before `horizon`, and any
    /// beyond `max`.
    pub fn shorten_tail(&mut self, horizon: i64, max: usize) -> Shortened {
        let mut out = Shortened::default();
        while self.tail_len() > 0 {
            let expired = (self.tail.ts as i64) < horizon;
            if !expired && self.tail_len() <= max {
                break;
            }
            out.forced |= !expired;
            out.cut += 1;
            out.last_ts = self.tail.ts;
            self.tail = self.step(self.tail).1;
            self.counts -= TAIL;
        }
        out
    }

    /// The 7- and 30-day windows ending at `t`, `(t − 7 d, t]` and
    /// `(t − 30 d, t]`, over the events at or before `t`; and each tail
    /// event at or before `t`, in order, to `tail` with its index in the
    /// tail, time and amount. The 7-day window's `sumsq` is not kept: 0.
    #[inline]
    pub fn windows(&self, t: i64, mut tail: impl FnMut(usize, u32, f32)) -> (PaneSum, PaneSum) {
        let (len, tail_start) = (self.len(), self.tail_start());
        let week_from = t - 7 * DAY;
        let month_from = t - LOG_SPAN;
        if t < self.last_ts as i64 {
            // A late event: the whole log, summed afresh.
            let (mut week, mut month) = (Sums::default(), Sums::default());
            for (index, ev) in self.events(self.head, len).enumerate() {
                let ts = ev.ts as i64;
                if ts > t {
                    break;
                }
                if index >= tail_start {
                    tail(index - tail_start, ev.ts, ev.amount);
                }
                if ts > week_from {
                    week.add(ev);
                }
                if ts > month_from {
                    month.add(ev);
                }
            }
            week.sumsq = 0;
            return (week.pane(), month.pane());
        }
        // In time order: the running sums, less the events that have left
        // each window since the last event (none or one, mostly).
        let mut week = self.week();
        let (mut at, mut index) = (self.week, self.week_index as usize);
        while index < len && at.ts as i64 <= week_from {
            let (ev, next) = self.step(at);
            week.remove(ev);
            (at, index) = (next, index + 1);
        }
        week.sumsq = 0;
        let mut month = self.all();
        let (mut at, mut index) = (self.head, 0);
        while index < len && at.ts as i64 <= month_from {
            let (ev, next) = self.step(at);
            month.remove(ev);
            (at, index) = (next, index + 1);
        }
        let mut at = self.tail;
        for j in 0..self.tail_len() {
            let (ev, next) = self.step(at);
            tail(j, ev.ts, ev.amount);
            at = next;
        }
        (week.pane(), month.pane())
    }

    /// The stream's bytes, from the head's on.
    pub fn stream(&self) -> &[u8] {
        let to = (self.end.div_ceil(8) as usize).min(self.bytes.len());
        &self.bytes[((self.head.bit / 8) as usize).min(to)..to]
    }

    /// Starts loading what an event reads and moves: the tail to the end
    /// (the view), and the head's and the week's events (expiry). Not the
    /// month between them.
    pub fn prefetch(&self) {
        let line = |bit: u32| self.bytes.as_ptr().wrapping_add((bit / 8) as usize);
        let to = self.end.div_ceil(8);
        let tail = self.tail.bit.min(self.end);
        super::super::store::prefetch(line(tail), (to - tail / 8) as usize);
        super::super::store::prefetch(line(self.head.bit), 1);
        super::super::store::prefetch(line(self.week.bit), 1);
    }

    /// A log of these events, in time order, the last `tail_len` of them
    /// its tail.
    pub fn from_events(events: &[Event], tail_len: usize) -> Log {
        let mut log = Log::default();
        for &ev in events {
            log.push(ev);
        }
        let tail_len = tail_len.min(events.len()).min(u8::MAX as usize);
        let mut at = log.head;
        for _ in 0..events.len() - tail_len {
            at = log.step(at).1;
        }
        log.tail = at;
        log.counts += tail_len as u32 * TAIL;
        log
    }

    /// The log as bytes: its length, tail length and times, then the
    /// stream from the head's byte on.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let from = (self.head.bit / 8) as usize;
        let to = self.end.div_ceil(8) as usize;
        out.extend_from_slice(&self.len.to_le_bytes());
        out.push(self.tail_len() as u8);
        out.extend_from_slice(&self.head.ts.to_le_bytes());
        out.extend_from_slice(&self.last_ts.to_le_bytes());
        out.push((self.head.bit % 8) as u8);
        out.extend_from_slice(&(self.end - from as u32 * 8).to_le_bytes());
        out.extend_from_slice(&self.bytes[from..to]);
    }

    /// What [`Log::encode`] wrote, checked event by event; `None` for
    /// anything else. The stream is taken as it is: one pass checks it and
    /// finds the sums and cursors, so that a restore does not re-encode.
    pub fn decode(r: &mut super::Reader) -> Option<Log> {
        let len = r.u16()? as usize;
        let tail_len = r.u8()? as usize;
        let head_ts = r.u32()?;
        let last_ts = r.u32()?;
        let first_bit = r.u8()? as u32;
        let end = r.u32()?;
        let stream = r.bytes(end.div_ceil(8) as usize)?;
        if len > MAX_LOGGED || tail_len > len || first_bit >= 8 || end < first_bit {
            return None;
        }
        if len == 0 {
            return (end == first_bit).then(Log::default);
        }
        let mut bytes = vec![0; stream.len().next_multiple_of(GROWTH)];
        bytes[..stream.len()].copy_from_slice(stream);
        if end % 8 != 0 {
            // Appends OR their bits in: what follows the end must be zero.
            bytes[(end / 8) as usize] &= !(0xff >> (end % 8));
        }
        let head = Cursor {
            bit: first_bit,
            ts: head_ts,
        };
        let mut log = Log {
            bytes: bytes.into_boxed_slice(),
            head,
            week: head,
            tail: head,
            end,
            last_ts,
            len: len as u16,
            week_index: len as u16,
            counts: tail_len as u32 * TAIL,
            ..Log::default()
        };
        let week_from = last_ts as i64 - 7 * DAY;
        let mut at = head;
        for i in 0..len {
            if i == len - tail_len {
                log.tail = at;
            }
            let in_week = at.ts as i64 > week_from;
            if in_week && log.week_index as usize == len {
                (log.week, log.week_index) = (at, i as u16);
            }
            let (ev, next) = checked_step(&log.bytes, end, at)?;
            let (s, q) = terms(ev.amount);
            log.sum.add(s);
            log.sumsq.add(q);
            log.counts += u32::from(ev.large) * LARGE;
            if in_week {
                log.week_sum.add(s);
                log.counts += u32::from(ev.large) * WEEK_LARGE;
            }
            at = next;
        }
        if log.week_index as usize == len {
            log.week = at;
        }
        if tail_len == 0 {
            log.tail = at;
        }
        (at.bit == end && at.ts == last_ts).then_some(log)
    }

    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random_events(rng: &mut Rng, n: usize, gap: f64) -> Vec<Event> {
        let mut ts = 1_600_000_000u32;
        (0..n)
            .map(|i| {
                ts += (rng.f64() * gap) as u32;
                let amount = match i % 5 {
                    0 => rng.uniform(0.0, 1e7) as f32, // arbitrary floats
                    1 => (rng.below(1_000_000) as f64 / 100.0) as f32,
                    2 => 0.0,
                    _ => (rng.below(30_000) as f64 / 100.0) as f32,
                };
                Event {
                    ts,
                    amount,
                    large: rng.below(4) == 0,
                }
            })
            .collect()
    }

    /// Every event comes back as it went in, whatever its gap and amount,
    /// through the stream and through the changelog's bytes.
    #[test]
    fn events_come_back_bit_for_bit() {
        let mut rng = Rng::new(7);
        for gap in [0.0, 60.0, 86_400.0, 4e9 / 300.0] {
            let events = random_events(&mut rng, 300, gap);
            let mut extreme = events.clone();
            extreme.push(Event {
                ts: u32::MAX,
                amount: AMOUNT_CEILING as f32,
                large: true,
            });
            for events in [events, extreme] {
                let log = Log::from_events(&events, 3);
                assert_eq!(log.to_vec(), events, "gap {gap}");
                let mut bytes = Vec::new();
                log.encode(&mut bytes);
                let back = Log::decode(&mut super::super::Reader(&bytes)).expect("decodes");
                assert_eq!(back.to_vec(), events);
                // Read in one pass, the sums and cursors are what appending gave.
                assert_eq!(
                    (back.sum, back.week_sum, back.sumsq, back.counts),
                    (log.sum, log.week_sum, log.sumsq, log.counts)
                );
                assert_eq!(
                    (back.week, back.week_index, back.tail),
                    (log.week, log.week_index, log.tail)
                );
                assert_eq!(back.tail_len(), 3);
                assert_eq!(back.tail_ts(2), events.last().map(|e| e.ts));
            }
        }
    }

    /// Amounts in cents take about two bytes, times about two: a month of
    /// 60 events fits in well under 300 bytes.
    #[test]
    fn a_month_of_payments_in_cents_is_small() {
        let mut rng = Rng::new(3);
        let mut ts = 1_600_000_000u32;
        let events: Vec<Event> = (0..60)
            .map(|_| {
                ts += (-(rng.f64().max(1e-12)).ln() * 43_200.0) as u32;
                Event {
                    ts,
                    amount: ((100 + rng.below(19_900)) as f64 / 100.0) as f32,
                    large: false,
                }
            })
            .collect();
        let log = Log::from_events(&events, 2);
        assert!(log.heap_bytes() <= 300, "{} bytes", log.heap_bytes());
    }

    /// Anything the encoder cannot have written is refused, not misread.
    #[test]
    fn corrupt_bytes_are_refused() {
        let events = random_events(&mut Rng::new(1), 40, 3600.0);
        let mut bytes = Vec::new();
        Log::from_events(&events, 2).encode(&mut bytes);
        for cut in [1, 5, bytes.len() / 2] {
            assert!(Log::decode(&mut super::super::Reader(&bytes[..bytes.len() - cut])).is_none());
        }
        let mut zeros = bytes.clone();
        let n = zeros.len();
        zeros[16..n].fill(0);
        assert!(Log::decode(&mut super::super::Reader(&zeros)).is_none());
    }

    /// The running sums after any sequence of pushes and expiries equal
    /// the sums of the events left, to the bit.
    #[test]
    fn running_sums_equal_a_fresh_sum() {
        let mut rng = Rng::new(11);
        let events = random_events(&mut rng, 2000, 5000.0);
        let mut log = Log::default();
        for (i, &ev) in events.iter().enumerate() {
            log.insert(ev);
            log.shorten_tail(ev.ts as i64 - DAY, 8);
            log.expire(ev.ts as i64 - 20 * DAY);
            if i % 97 == 0 {
                let fresh = Log::from_events(&log.to_vec(), log.tail_len());
                assert_eq!(log.week_sum, fresh.week_sum, "event {i}");
                let t = ev.ts as i64;
                let (a, b) = (log.windows(t, |_, _, _| ()), fresh.windows(t, |_, _, _| ()));
                assert_eq!(format!("{a:?}"), format!("{b:?}"), "event {i}");
                assert_eq!(log.all().sum, fresh.all().sum);
            }
        }
    }
}
