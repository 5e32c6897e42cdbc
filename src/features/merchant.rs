//! Per-merchant state: sparse hourly panes of transaction and known-fraud
//! counts. Sparse, because most terminals see a few transactions a day while
//! a large merchant fills every hour; either way the panes are bounded by
//! the retention (label delay + 30 days + lateness).
//!
//! Each pane holds running totals up to and including itself, so any window
//! is a difference of two totals found by binary search, instead of a scan
//! of up to 900 panes per event.

use std::collections::VecDeque;

pub const HOUR: i64 = 3600;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pane {
    pub hour: u32,
    /// Transactions and known frauds from the merchant's first pane through
    /// this one, modulo 2³²: windows are differences, and wrapping keeps a
    /// pane at 12 bytes, so the walk over a terminal's panes touches fewer lines.
    pub total_count: u32,
    pub total_frauds: u32,
}

#[derive(Debug, Clone, Default)]
pub struct MerchantState {
    panes: VecDeque<Pane>,
    /// Running totals of the panes already evicted.
    base_count: u32,
    base_frauds: u32,
}

/// Counts over the label-delayed windows.
#[derive(Debug, Clone, Copy, Default)]
pub struct DelayedWindow {
    pub count: u32,
    pub frauds: u32,
}

impl DelayedWindow {
    /// Known frauds ÷ transactions; 0 when there were none.
    pub fn risk(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.frauds.min(self.count) as f64 / self.count as f64
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct MerchantView {
    /// Previous transactions in the hour pane of `t - 1h` through that of `t`.
    pub count_1h: u32,
    /// Windows of 1, 7 and 30 days ending one label delay before `t`.
    pub delayed: [DelayedWindow; 3],
    /// Hour panes of the oldest and newest known fraud in the 30-day delayed window.
    pub first_fraud_hour: Option<i64>,
    pub last_fraud_hour: Option<i64>,
    /// Transactions of that window in panes after the newest known fraud.
    pub clean_since_fraud: u32,
}

pub const DELAYED_DAYS: [i64; 3] = [1, 7, 30];

impl MerchantState {
    pub fn is_empty(&self) -> bool {
        self.panes.is_empty()
    }

    /// Starts loading the newest panes, the ones an event's windows read.
    pub fn prefetch_history(&self) {
        let (a, b) = self.panes.as_slices();
        let keep = 48usize;
        let tail_b = b.len().min(keep);
        super::store::prefetch(
            b[b.len() - tail_b..].as_ptr(),
            tail_b * std::mem::size_of::<Pane>(),
        );
        let tail_a = a.len().min(keep - tail_b);
        super::store::prefetch(
            a[a.len() - tail_a..].as_ptr(),
            tail_a * std::mem::size_of::<Pane>(),
        );
    }

    /// (transactions, frauds) in the panes of hours below `h`.
    fn totals_before(&self, h: i64) -> (u32, u32) {
        let i = self.panes.partition_point(|p| (p.hour as i64) < h);
        match i.checked_sub(1) {
            Some(j) => (self.panes[j].total_count, self.panes[j].total_frauds),
            None => (self.base_count, self.base_frauds),
        }
    }

    /// [`Self::totals_before`] for hours in descending order. A terminal has
    /// a few dozen panes: one backward walk is cheaper than six bisections
    /// and their mispredicted branches. A busy merchant gets the bisections.
    fn totals_before_each<const N: usize>(&self, hours: [i64; N]) -> [(u32, u32); N] {
        if self.panes.len() > 96 {
            return hours.map(|h| self.totals_before(h));
        }
        let mut out = [(self.base_count, self.base_frauds); N];
        let mut k = 0;
        for p in self.panes.iter().rev() {
            while k < N && (p.hour as i64) < hours[k] {
                out[k] = (p.total_count, p.total_frauds);
                k += 1;
            }
            if k == N {
                break;
            }
        }
        out
    }

    /// Delayed windows cover whole hours `[hour(t − delay − w), hour(t − delay))`:
    /// every transaction in them happened before `t − delay`, so its label is
    /// already known when the window is read.
    pub fn view(&self, t: i64, delay: i64) -> MerchantView {
        let mut v = MerchantView::default();
        if self.panes.is_empty() {
            return v;
        }
        let h_now = t.div_euclid(HOUR);
        let h_1h = (t - HOUR).div_euclid(HOUR);
        let h_end = (t - delay).div_euclid(HOUR);
        let starts = DELAYED_DAYS.map(|days| (t - delay - days * 86_400).div_euclid(HOUR));
        let [now, hour_ago, end, s1, s7, s30] =
            self.totals_before_each([h_now + 1, h_1h, h_end, starts[0], starts[1], starts[2]]);
        v.count_1h = now.0.wrapping_sub(hour_ago.0);
        for (w, s) in v.delayed.iter_mut().zip([s1, s7, s30]) {
            w.count = end.0.wrapping_sub(s.0);
            w.frauds = end.1.wrapping_sub(s.1);
        }
        let (c_end, f_end) = end;
        let start30 = (starts[2], s30.0, s30.1);
        let (h_start, _, f_start) = start30;
        if f_end != f_start {
            // Totals only grow, so the first pane past a total is found by bisection.
            let first = self.panes.partition_point(|p| {
                (p.hour as i64) < h_start || p.total_frauds.wrapping_sub(f_start) == 0
            });
            let last = self.panes.partition_point(|p| {
                let h = p.hour as i64;
                h < h_start
                    || (h < h_end
                        && p.total_frauds.wrapping_sub(f_start) < f_end.wrapping_sub(f_start))
            });
            v.first_fraud_hour = Some(self.panes[first].hour as i64);
            v.last_fraud_hour = Some(self.panes[last].hour as i64);
            v.clean_since_fraud = c_end.wrapping_sub(self.panes[last].total_count);
        }
        v
    }

    /// Index of the pane of `hour`, inserted if missing.
    fn pane_index(&mut self, hour: u32) -> usize {
        // In time order the pane is the newest one, or a new one after it.
        let pos = match self.panes.back() {
            Some(p) if p.hour == hour => return self.panes.len() - 1,
            Some(p) if p.hour < hour => self.panes.len(),
            None => 0,
            _ => self.panes.partition_point(|p| p.hour < hour),
        };
        if self.panes.get(pos).is_none_or(|p| p.hour != hour) {
            let (total_count, total_frauds) = match pos.checked_sub(1) {
                Some(j) => (self.panes[j].total_count, self.panes[j].total_frauds),
                None => (self.base_count, self.base_frauds),
            };
            self.panes.insert(
                pos,
                Pane {
                    hour,
                    total_count,
                    total_frauds,
                },
            );
        }
        pos
    }

    pub fn add_transaction(&mut self, t: i64) {
        let i = self.pane_index(t.div_euclid(HOUR) as u32);
        // In time order this touches only the newest pane.
        for p in self.panes.range_mut(i..) {
            p.total_count = p.total_count.wrapping_add(1);
        }
    }

    /// Records a fraud label for a transaction made at `t`. Returns false if
    /// that hour is older than the retention and the label can no longer count.
    pub fn add_fraud(&mut self, t: i64, oldest_hour: i64) -> bool {
        let h = t.div_euclid(HOUR);
        if h < oldest_hour {
            return false;
        }
        let i = self.pane_index(h as u32);
        for p in self.panes.range_mut(i..) {
            p.total_frauds = p.total_frauds.wrapping_add(1);
        }
        true
    }

    pub fn expire(&mut self, oldest_hour: i64) {
        while let Some(p) = self.panes.front() {
            if p.hour as i64 >= oldest_hour {
                break;
            }
            self.base_count = p.total_count;
            self.base_frauds = p.total_frauds;
            self.panes.pop_front();
        }
    }
}

/// One hour's own counts, not running totals: what the service's
/// changelog carries for a merchant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HourCounts {
    pub hour: u32,
    pub count: u32,
    pub frauds: u32,
}

impl MerchantState {
    /// The own counts of every pane in hours `[from, to)`.
    pub fn hours(&self, from: i64, to: i64) -> Vec<HourCounts> {
        let lo = self.panes.partition_point(|p| (p.hour as i64) < from);
        let hi = self.panes.partition_point(|p| (p.hour as i64) < to);
        (lo..hi)
            .map(|i| {
                let (c0, f0) = self.totals_at(i);
                let p = self.panes[i];
                HourCounts {
                    hour: p.hour,
                    count: p.total_count.wrapping_sub(c0),
                    frauds: p.total_frauds.wrapping_sub(f0),
                }
            })
            .collect()
    }

    /// Running totals before pane `i`.
    fn totals_at(&self, i: usize) -> (u32, u32) {
        match i.checked_sub(1) {
            Some(j) => (self.panes[j].total_count, self.panes[j].total_frauds),
            None => (self.base_count, self.base_frauds),
        }
    }

    /// The distinct hours that have a pane, oldest first.
    pub fn pane_hours(&self) -> impl Iterator<Item = u32> + '_ {
        self.panes.iter().map(|p| p.hour)
    }

    /// Sets one hour's own counts, whatever they were: a pane set to zero
    /// is removed. Later panes' running totals move by the difference, so
    /// panes may be set in any order.
    pub fn set_hour(&mut self, h: HourCounts) {
        let i = self.panes.partition_point(|p| p.hour < h.hour);
        let exists = self.panes.get(i).is_some_and(|p| p.hour == h.hour);
        let (c0, f0) = self.totals_at(i);
        let (old_count, old_frauds) = if exists {
            let p = self.panes[i];
            (
                p.total_count.wrapping_sub(c0),
                p.total_frauds.wrapping_sub(f0),
            )
        } else {
            (0, 0)
        };
        let dc = h.count.wrapping_sub(old_count);
        let df = h.frauds.wrapping_sub(old_frauds);
        let after = if h.count == 0 && h.frauds == 0 {
            if exists {
                self.panes.remove(i);
            }
            i
        } else if exists {
            i
        } else {
            self.panes.insert(
                i,
                Pane {
                    hour: h.hour,
                    total_count: c0,
                    total_frauds: f0,
                },
            );
            i
        };
        for p in self.panes.range_mut(after..) {
            p.total_count = p.total_count.wrapping_add(dc);
            p.total_frauds = p.total_frauds.wrapping_add(df);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The backward walk and the bisections agree, on busy merchants too.
    #[test]
    fn walk_and_bisection_agree() {
        let mut rng = Rng::new(4);
        let mut m = MerchantState::default();
        let mut t = 1_600_000_000i64;
        for _ in 0..5000 {
            t += rng.below(4000) as i64;
            m.add_transaction(t);
            if rng.f64() < 0.05 {
                m.add_fraud(t - rng.below(200_000) as i64, 0);
            }
            let hours = [
                t / HOUR + 1,
                t / HOUR - 1,
                t / HOUR - 170,
                t / HOUR - 200,
                t / HOUR - 400,
                t / HOUR - 900,
            ];
            let walked = m.totals_before_each(hours);
            assert_eq!(
                walked,
                hours.map(|h| m.totals_before(h)),
                "{} panes",
                m.panes.len()
            );
        }
        assert!(m.panes.len() > 96);
    }

    /// A state rebuilt from its hours in any order, as the service's
    /// merchant table rebuilds it from the changelog, gives the same views.
    #[test]
    fn rebuilt_from_hours_in_any_order() {
        let mut rng = Rng::new(9);
        let mut m = MerchantState::default();
        let mut t = 1_600_000_000i64;
        for _ in 0..3000 {
            t += rng.below(3000) as i64;
            m.add_transaction(t);
            if rng.f64() < 0.05 {
                m.add_fraud(t - rng.below(900_000) as i64, 0);
            }
        }
        m.expire(t / HOUR - 500);
        let mut hours = m.hours(i64::MIN, i64::MAX);
        // Reverse order, with a detour through wrong values.
        hours.reverse();
        let mut r = MerchantState::default();
        for h in &hours {
            r.set_hour(HourCounts {
                count: h.count + 3,
                ..*h
            });
        }
        for h in &hours {
            r.set_hour(*h);
        }
        assert_eq!(r.hours(i64::MIN, i64::MAX).len(), hours.len());
        for k in 0..200 {
            let at = t - k * 1777;
            let (a, b) = (m.view(at, 7 * 86_400), r.view(at, 7 * 86_400));
            assert_eq!(format!("{a:?}"), format!("{b:?}"), "at {at}");
        }
        // Setting an hour to zero removes it.
        let first = hours.last().unwrap().hour;
        r.set_hour(HourCounts {
            hour: first,
            count: 0,
            frauds: 0,
        });
        assert_eq!(r.hours(i64::MIN, i64::MAX).len(), hours.len() - 1);
    }
}
