//! Per-merchant state: sparse hourly panes of transaction and known-fraud
//! counts. Sparse, because most terminals see a few transactions a day while
//! a large merchant fills every hour; either way the panes are bounded by
//! the retention (label delay + 30 days + lateness).

use std::collections::VecDeque;

pub const HOUR: i64 = 3600;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pane {
    pub hour: u32,
    pub count: u32,
    pub frauds: u32,
}

#[derive(Debug, Clone, Default)]
pub struct MerchantState {
    panes: VecDeque<Pane>,
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

    pub fn panes(&self) -> impl Iterator<Item = &Pane> {
        self.panes.iter()
    }

    /// Delayed windows cover whole hours `[hour(t − delay − w), hour(t − delay))`:
    /// every transaction in them happened before `t − delay`, so its label is
    /// already known when the window is read.
    pub fn view(&self, t: i64, delay: i64) -> MerchantView {
        let mut v = MerchantView::default();
        let h_now = t.div_euclid(HOUR);
        let h_1h = (t - HOUR).div_euclid(HOUR);
        let h_end = (t - delay).div_euclid(HOUR);
        let starts = DELAYED_DAYS.map(|d| (t - delay - d * 86_400).div_euclid(HOUR));
        for p in self.panes.iter().rev() {
            let h = p.hour as i64;
            if h > h_now {
                continue;
            }
            if h >= h_1h {
                v.count_1h += p.count;
            }
            if h < h_end {
                if h < starts[2] {
                    break;
                }
                for (w, &start) in v.delayed.iter_mut().zip(&starts) {
                    if h >= start {
                        w.count += p.count;
                        w.frauds += p.frauds;
                    }
                }
                if p.frauds > 0 {
                    v.last_fraud_hour.get_or_insert(h);
                    v.first_fraud_hour = Some(h);
                } else if v.last_fraud_hour.is_none() {
                    v.clean_since_fraud += p.count;
                }
            }
        }
        if v.last_fraud_hour.is_none() {
            v.clean_since_fraud = 0;
        }
        v
    }

    fn pane_mut(&mut self, hour: u32) -> &mut Pane {
        let pos = self.panes.partition_point(|p| p.hour < hour);
        if self.panes.get(pos).is_none_or(|p| p.hour != hour) {
            self.panes.insert(
                pos,
                Pane {
                    hour,
                    ..Pane::default()
                },
            );
        }
        &mut self.panes[pos]
    }

    pub fn add_transaction(&mut self, t: i64) {
        let p = self.pane_mut(t.div_euclid(HOUR) as u32);
        p.count = p.count.saturating_add(1);
    }

    /// Records a fraud label for a transaction made at `t`. Returns false if
    /// that hour is older than the retention and the label can no longer count.
    pub fn add_fraud(&mut self, t: i64, oldest_hour: i64) -> bool {
        let h = t.div_euclid(HOUR);
        if h < oldest_hour {
            return false;
        }
        let p = self.pane_mut(h as u32);
        p.frauds = p.frauds.saturating_add(1);
        true
    }

    pub fn expire(&mut self, oldest_hour: i64) {
        while self
            .panes
            .front()
            .is_some_and(|p| (p.hour as i64) < oldest_hour)
        {
            self.panes.pop_front();
        }
    }
}
