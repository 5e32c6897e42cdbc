//! The simulator of the Fraud Detection Handbook (Le Borgne et al., ch. 3),
//! with two more fraud scenarios that fraud teams see in practice.
//!
//! Customers and terminals sit on a 100×100 grid (one unit is one
//! kilometre, placed around 48°N 2°E); a customer uses the terminals within
//! distance 5 of home. Fraud scenarios:
//! 1. any amount over 220;
//! 2. each day two terminals are compromised: all their transactions in the
//!    next 28 days are fraud;
//! 3. each day three customers are compromised: over the next 14 days a
//!    third of their transactions have their amount multiplied by 5;
//! 4. card testing (ours): each day one card gets a burst of tiny online
//!    payments at one web merchant within minutes, then a cash-out purchase;
//! 5. account takeover (ours): each day one card pays, within two hours of
//!    a genuine payment, at terminals at least 40 km from its home.
//! 6. category and hour (ours; off by default): genuine traffic follows each
//!    merchant category's hours of the day (restaurants at lunch and dinner,
//!    hotels in the evening and into the night, commuting at rush hours),
//!    and a fifth of the customers live six hours later than the rest. Each
//!    day three cards are compromised: over the next week the fraudster
//!    buys electronics and miscellaneous goods (MCC 5732, 5999) at the
//!    card's own nearby terminals, between midnight and five in the
//!    morning, for amounts like the card's own, at the card's usual pace.
//!    Nothing but the category, the hour and the card's own habits in both
//!    tells these frauds apart.

use crate::ingest::time::format_utc;
use crate::ingest::{Channel, EventTime, Transaction};
use crate::rng::Rng;
use std::io::{self, Write};

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub customers: usize,
    pub terminals: usize,
    pub days: u32,
    /// Seconds since the epoch of the first day's midnight (UTC).
    pub start: i64,
    pub seed: u64,
    pub radius: f64,
    /// Which of the scenarios 1..=6 to inject.
    pub scenarios: Vec<u8>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            customers: 5000,
            terminals: 10_000,
            days: 183,
            start: 1_522_540_800, // 2018-04-01
            seed: 0,
            radius: 5.0,
            scenarios: vec![1, 2, 3, 4, 5],
        }
    }
}

#[derive(Debug, Clone)]
pub struct Customer {
    pub x: f64,
    pub y: f64,
    pub mean_amount: f64,
    pub std_amount: f64,
    pub mean_tx_per_day: f64,
    pub terminals: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
pub struct Terminal {
    pub x: f64,
    pub y: f64,
    pub channel: u8, // 0 pos, 1 ecom, 2 atm
    pub mcc: u16,
}

/// One simulated transaction; `scenario` 0 is genuine.
#[derive(Debug, Clone, Copy)]
pub struct SimTx {
    /// Seconds since the simulation start.
    pub ts: i64,
    pub customer: u32,
    pub terminal: u32,
    pub amount: f64,
    pub scenario: u8,
}

const CHANNELS: [&str; 3] = ["pos", "ecom", "atm"];
const MCCS: [u16; 8] = [5411, 5812, 5541, 5999, 5311, 4111, 5732, 7011];
const DAY: i64 = 86_400;

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub struct Simulation {
    pub cfg: SimConfig,
    pub customers: Vec<Customer>,
    pub terminals: Vec<Terminal>,
    /// Sorted by time; the index is the transaction id.
    pub transactions: Vec<SimTx>,
}

impl Simulation {
    pub fn run(cfg: SimConfig) -> Simulation {
        let mut rng = Rng::derive(cfg.seed, 1, 0);
        let customers_xy: Vec<[f64; 5]> = (0..cfg.customers)
            .map(|_| {
                let x = rng.uniform(0.0, 100.0);
                let y = rng.uniform(0.0, 100.0);
                let mean = rng.uniform(5.0, 100.0);
                let per_day = rng.uniform(0.0, 4.0);
                [x, y, mean, mean / 2.0, per_day]
            })
            .collect();
        let mut rng = Rng::derive(cfg.seed, 2, 0);
        let terminals: Vec<Terminal> = (0..cfg.terminals)
            .map(|_| {
                let x = rng.uniform(0.0, 100.0);
                let y = rng.uniform(0.0, 100.0);
                let u = rng.f64();
                let channel = if u < 0.8 {
                    0
                } else if u < 0.95 {
                    1
                } else {
                    2
                };
                let mcc = if channel == 2 {
                    6011
                } else {
                    MCCS[rng.below(MCCS.len())]
                };
                Terminal { x, y, channel, mcc }
            })
            .collect();
        let customers: Vec<Customer> = customers_xy
            .into_iter()
            .map(|[x, y, mean, sd, per_day]| Customer {
                x,
                y,
                mean_amount: mean,
                std_amount: sd,
                mean_tx_per_day: per_day,
                terminals: terminals
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| ((t.x - x).powi(2) + (t.y - y).powi(2)).sqrt() < cfg.radius)
                    .map(|(i, _)| i as u32)
                    .collect(),
            })
            .collect();

        let mut txs = Vec::with_capacity(cfg.customers * cfg.days as usize * 2);
        for (c, cust) in customers.iter().enumerate() {
            let mut rng = Rng::derive(cfg.seed, 3, c as u64);
            for day in 0..cfg.days as i64 {
                let n = rng.poisson(cust.mean_tx_per_day);
                for _ in 0..n {
                    let time = rng.normal(43_200.0, 20_000.0) as i64;
                    if time <= 0 || time >= DAY {
                        continue;
                    }
                    let mut amount = rng.normal(cust.mean_amount, cust.std_amount);
                    if amount < 0.0 {
                        amount = rng.uniform(0.0, 2.0 * cust.mean_amount);
                    }
                    if cust.terminals.is_empty() {
                        continue;
                    }
                    let terminal = cust.terminals[rng.below(cust.terminals.len())];
                    txs.push(SimTx {
                        ts: day * DAY + time,
                        customer: c as u32,
                        terminal,
                        amount: round2(amount),
                        scenario: 0,
                    });
                }
            }
        }
        let mut sim = Simulation {
            cfg,
            customers,
            terminals,
            transactions: txs,
        };
        let s = sim.cfg.scenarios.clone();
        if s.contains(&6) {
            sim.hours_by_category();
        }
        sim.sort();
        if s.contains(&1) {
            sim.scenario_amount();
        }
        if s.contains(&2) {
            sim.scenario_terminals();
        }
        if s.contains(&3) {
            sim.scenario_customers();
        }
        if s.contains(&4) {
            sim.scenario_card_testing();
        }
        if s.contains(&5) {
            sim.scenario_takeover();
        }
        if s.contains(&6) {
            sim.scenario_category_hour();
        }
        sim.sort();
        sim
    }

    fn sort(&mut self) {
        self.transactions
            .sort_by_key(|t| (t.ts, t.customer, t.terminal, (t.amount * 100.0) as i64));
    }

    fn scenario_amount(&mut self) {
        for t in &mut self.transactions {
            if t.amount > 220.0 {
                t.scenario = 1;
            }
        }
    }

    fn by_key(&self, key: impl Fn(&SimTx) -> usize, n: usize) -> Vec<Vec<usize>> {
        let mut v = vec![Vec::new(); n];
        for (i, t) in self.transactions.iter().enumerate() {
            v[key(t)].push(i);
        }
        v
    }

    fn scenario_terminals(&mut self) {
        let by_terminal = self.by_key(|t| t.terminal as usize, self.terminals.len());
        for day in 0..self.cfg.days as i64 {
            let mut rng = Rng::derive(self.cfg.seed, 4, day as u64);
            for term in rng.sample(self.terminals.len(), 2) {
                for &i in &by_terminal[term] {
                    let d = self.transactions[i].ts.div_euclid(DAY);
                    if d >= day && d < day + 28 {
                        self.transactions[i].scenario = 2;
                    }
                }
            }
        }
    }

    fn scenario_customers(&mut self) {
        let by_customer = self.by_key(|t| t.customer as usize, self.customers.len());
        for day in 0..self.cfg.days as i64 {
            let mut rng = Rng::derive(self.cfg.seed, 5, day as u64);
            let chosen = rng.sample(self.customers.len(), 3);
            let window: Vec<usize> = chosen
                .iter()
                .flat_map(|&c| by_customer[c].iter().copied())
                .filter(|&i| {
                    let d = self.transactions[i].ts.div_euclid(DAY);
                    d >= day && d < day + 14
                })
                .collect();
            for k in rng.sample(window.len(), window.len() / 3) {
                let t = &mut self.transactions[window[k]];
                t.amount = round2(t.amount * 5.0);
                t.scenario = 3;
            }
        }
    }

    fn scenario_card_testing(&mut self) {
        let web: Vec<u32> = (0..self.terminals.len() as u32)
            .filter(|&i| self.terminals[i as usize].channel == 1)
            .collect();
        if web.is_empty() {
            return;
        }
        for day in 0..self.cfg.days as i64 {
            let mut rng = Rng::derive(self.cfg.seed, 6, day as u64);
            let customer = rng.below(self.customers.len()) as u32;
            let merchant = web[rng.below(web.len())];
            let mut ts = day * DAY + rng.uniform(0.0, (DAY - 7200) as f64) as i64;
            for _ in 0..5 + rng.below(8) {
                ts += 10 + rng.below(80) as i64;
                let amount = round2(rng.uniform(0.5, 3.0));
                self.transactions.push(SimTx {
                    ts,
                    customer,
                    terminal: merchant,
                    amount,
                    scenario: 4,
                });
            }
            let cash_out = web[rng.below(web.len())];
            ts += 300 + rng.below(1800) as i64;
            let mean = self.customers[customer as usize].mean_amount;
            let amount = round2(rng.uniform(1.5, 4.0) * mean);
            self.transactions.push(SimTx {
                ts,
                customer,
                terminal: cash_out,
                amount,
                scenario: 4,
            });
        }
    }

    fn scenario_takeover(&mut self) {
        let by_customer = self.by_key(|t| t.customer as usize, self.customers.len());
        let horizon = self.cfg.days as i64 * DAY;
        for day in 0..self.cfg.days as i64 {
            let mut rng = Rng::derive(self.cfg.seed, 7, day as u64);
            let c = rng.below(self.customers.len());
            let Some(&anchor) = by_customer[c]
                .iter()
                .find(|&&i| self.transactions[i].ts.div_euclid(DAY) == day)
            else {
                continue;
            };
            let cust = &self.customers[c];
            let far: Vec<u32> = (0..self.terminals.len() as u32)
                .filter(|&i| {
                    let t = &self.terminals[i as usize];
                    ((t.x - cust.x).powi(2) + (t.y - cust.y).powi(2)).sqrt() >= 40.0
                })
                .collect();
            if far.is_empty() {
                continue;
            }
            let mut ts = self.transactions[anchor].ts;
            let (mean, sd) = (cust.mean_amount, cust.std_amount);
            for _ in 0..1 + rng.below(3) {
                ts += 600 + rng.below(6600) as i64;
                if ts >= horizon {
                    break;
                }
                let amount = round2(rng.normal(mean, sd).abs() * rng.uniform(1.0, 3.0));
                let terminal = far[rng.below(far.len())];
                self.transactions.push(SimTx {
                    ts,
                    customer: c as u32,
                    terminal,
                    amount,
                    scenario: 5,
                });
            }
        }
    }

    /// Scenario 6's genuine side: each genuine transaction's time of day is
    /// drawn again from its merchant category's hours; night owls' hours are
    /// six hours later. The day and everything else stay.
    fn hours_by_category(&mut self) {
        let mut owls = Rng::derive(self.cfg.seed, 8, 0);
        let owl: Vec<bool> = (0..self.customers.len())
            .map(|_| owls.f64() < 0.2)
            .collect();
        for (i, t) in self.transactions.iter_mut().enumerate() {
            let mut rng = Rng::derive(self.cfg.seed, 9, i as u64);
            let mcc = self.terminals[t.terminal as usize].mcc;
            let h = category_hour(mcc, &mut rng) + if owl[t.customer as usize] { 6.0 } else { 0.0 };
            let secs = (h.rem_euclid(24.0) * 3600.0) as i64;
            t.ts = t.ts.div_euclid(DAY) * DAY + secs.clamp(1, DAY - 1);
        }
    }

    /// Scenario 6's frauds: see the module's documentation.
    fn scenario_category_hour(&mut self) {
        const RISKY: [u16; 2] = [5732, 5999];
        let horizon = self.cfg.days as i64 * DAY;
        for day in 0..self.cfg.days as i64 {
            let mut rng = Rng::derive(self.cfg.seed, 10, day as u64);
            for c in rng.sample(self.customers.len(), 3) {
                let cust = &self.customers[c];
                let risky: Vec<u32> = cust
                    .terminals
                    .iter()
                    .copied()
                    .filter(|&i| RISKY.contains(&self.terminals[i as usize].mcc))
                    .collect();
                if risky.is_empty() {
                    continue;
                }
                let (mean, sd) = (cust.mean_amount, cust.std_amount);
                let frauds = rng.poisson(cust.mean_tx_per_day.max(0.5) * 2.0).max(1);
                for _ in 0..frauds {
                    let ts =
                        (day + rng.below(7) as i64) * DAY + rng.uniform(60.0, 5.0 * 3600.0) as i64;
                    if ts >= horizon {
                        continue;
                    }
                    let mut amount = rng.normal(mean, sd);
                    if amount < 0.0 {
                        amount = rng.uniform(0.0, 2.0 * mean);
                    }
                    self.transactions.push(SimTx {
                        ts,
                        customer: c as u32,
                        terminal: risky[rng.below(risky.len())],
                        amount: round2(amount),
                        scenario: 6,
                    });
                }
            }
        }
    }

    /// Fills `tx` with transaction `i`, as the CSV file would give it.
    pub fn fill(&self, i: usize, tx: &mut Transaction) {
        let t = &self.transactions[i];
        let term = &self.terminals[t.terminal as usize];
        tx.transaction_id.clear();
        tx.transaction_id
            .push_str(itoa_buf::Buf::default().fmt(i as u64));
        tx.time = EventTime {
            utc: self.cfg.start + t.ts,
            offset: 0,
        };
        tx.card_id.clear();
        tx.card_id
            .push_str(itoa_buf::Buf::default().fmt(t.customer as u64));
        tx.merchant_id.clear();
        tx.merchant_id.push('T');
        tx.merchant_id
            .push_str(itoa_buf::Buf::default().fmt(t.terminal as u64));
        tx.amount = t.amount;
        tx.currency.clear();
        tx.currency.push_str("EUR");
        tx.country.clear();
        tx.country.push_str("FR");
        tx.mcc = Some(term.mcc);
        tx.channel = Some([Channel::Pos, Channel::Ecom, Channel::Atm][term.channel as usize]);
        // Rounded as in the CSV, so a file and the in-memory stream score alike.
        tx.lat = Some(((48.0 + term.y * 0.009) * 10_000.0).round() / 10_000.0);
        tx.lon = Some(((2.0 + term.x * 0.0135) * 10_000.0).round() / 10_000.0);
        tx.is_fraud = Some(t.scenario > 0);
    }

    /// Writes the transactions as CSV in the engine's schema, with an extra
    /// `fraud_scenario` column (ignored by readers) for analysis.
    pub fn write_csv(&self, out: &mut dyn Write) -> io::Result<()> {
        out.write_all(
            b"transaction_id,timestamp,card_id,merchant_id,amount,currency,mcc,country,channel,lat,lon,is_fraud,fraud_scenario\n",
        )?;
        let mut line = String::with_capacity(160);
        let mut num = itoa_buf::Buf::default();
        for (id, t) in self.transactions.iter().enumerate() {
            let term = &self.terminals[t.terminal as usize];
            line.clear();
            line.push_str(num.fmt(id as u64));
            line.push(',');
            format_utc(self.cfg.start + t.ts, &mut line);
            line.push(',');
            line.push_str(num.fmt(t.customer as u64));
            line.push(',');
            line.push('T');
            line.push_str(num.fmt(t.terminal as u64));
            line.push(',');
            push_cents(&mut line, t.amount);
            line.push_str(",EUR,");
            line.push_str(num.fmt(term.mcc as u64));
            line.push_str(",FR,");
            line.push_str(CHANNELS[term.channel as usize]);
            line.push(',');
            push_fixed4(&mut line, 48.0 + term.y * 0.009);
            line.push(',');
            push_fixed4(&mut line, 2.0 + term.x * 0.0135);
            line.push_str(if t.scenario > 0 { ",1," } else { ",0," });
            line.push((b'0' + t.scenario) as char);
            line.push('\n');
            out.write_all(line.as_bytes())?;
        }
        Ok(())
    }
}

/// An hour of the day (UTC, fractional, may fall outside 0..24 and wraps)
/// at which genuine customers pay in category `mcc`.
fn category_hour(mcc: u16, rng: &mut Rng) -> f64 {
    let pick = rng.f64();
    match mcc {
        // Restaurants: lunch and dinner.
        5812 if pick < 0.45 => rng.normal(12.75, 1.0),
        5812 => rng.normal(20.0, 1.5),
        // Commuting: two rush hours.
        4111 if pick < 0.5 => rng.normal(8.0, 1.0),
        4111 => rng.normal(18.0, 1.0),
        // Hotels: evening check-ins, some after midnight.
        7011 => rng.normal(21.0, 2.5),
        // Fuel and cash: all day, and a little at night.
        5541 | 6011 if pick < 0.05 => rng.uniform(0.0, 6.0),
        5541 | 6011 => rng.uniform(6.0, 23.0),
        // Electronics: shop hours, with a few genuine night orders.
        5732 if pick < 0.02 => rng.uniform(0.0, 5.0),
        5732 => rng.normal(15.0, 2.5),
        // Groceries, department stores and the rest: shop hours.
        _ => rng.normal(14.5, 3.0),
    }
}

fn push_cents(s: &mut String, x: f64) {
    let c = (x * 100.0).round() as u64;
    let mut b = itoa_buf::Buf::default();
    s.push_str(b.fmt(c / 100));
    s.push('.');
    let r = c % 100;
    s.push((b'0' + (r / 10) as u8) as char);
    s.push((b'0' + (r % 10) as u8) as char);
}

fn push_fixed4(s: &mut String, x: f64) {
    let c = (x * 10_000.0).round() as u64;
    let mut b = itoa_buf::Buf::default();
    s.push_str(b.fmt(c / 10_000));
    s.push('.');
    let r = c % 10_000;
    for d in [1000, 100, 10, 1] {
        s.push((b'0' + (r / d % 10) as u8) as char);
    }
}

mod itoa_buf {
    /// Integer formatting without `fmt` machinery, for the CSV writer.
    #[derive(Default)]
    pub struct Buf([u8; 20]);

    impl Buf {
        pub fn fmt(&mut self, mut v: u64) -> &str {
            let mut i = 20;
            loop {
                i -= 1;
                self.0[i] = b'0' + (v % 10) as u8;
                v /= 10;
                if v == 0 {
                    break;
                }
            }
            std::str::from_utf8(&self.0[i..]).expect("digits are ASCII")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(seed: u64) -> Simulation {
        Simulation::run(SimConfig {
            customers: 200,
            terminals: 400,
            days: 40,
            seed,
            ..SimConfig::default()
        })
    }

    #[test]
    fn deterministic_for_a_seed() {
        let (a, b, c) = (small(3), small(3), small(4));
        let key = |s: &Simulation| {
            s.transactions
                .iter()
                .map(|t| (t.ts, t.customer, t.terminal, t.scenario))
                .collect::<Vec<_>>()
        };
        assert_eq!(key(&a), key(&b));
        assert_ne!(key(&a), key(&c));
    }

    /// Scenario 6 leaves the default data alone, puts genuine traffic on its
    /// category's hours, and its frauds at night in the risky categories,
    /// at amounts like the card's own.
    #[test]
    fn category_and_hour_scenario() {
        let with = |scenarios: Vec<u8>| {
            Simulation::run(SimConfig {
                customers: 300,
                terminals: 600,
                days: 30,
                seed: 5,
                scenarios,
                ..SimConfig::default()
            })
        };
        let base = with(vec![1, 2, 3, 4, 5]);
        assert!(base.transactions.iter().all(|t| t.scenario != 6));
        let s = with(vec![1, 2, 3, 4, 5, 6]);
        let hour = |t: &SimTx| t.ts.rem_euclid(DAY) / 3600;
        let mcc = |t: &SimTx| s.terminals[t.terminal as usize].mcc;
        let frauds: Vec<&SimTx> = s.transactions.iter().filter(|t| t.scenario == 6).collect();
        assert!(frauds.len() > 50, "{}", frauds.len());
        assert!(
            frauds
                .iter()
                .all(|t| hour(t) < 5 && [5732, 5999].contains(&mcc(t)))
        );
        let genuine: Vec<&SimTx> = s.transactions.iter().filter(|t| t.scenario == 0).collect();
        let share = |f: &dyn Fn(&&SimTx) -> bool| {
            genuine.iter().filter(|t| f(t)).count() as f64 / genuine.len() as f64
        };
        // Night is rare for genuine traffic, but not empty: hour alone is no proof.
        let night = share(&|t| hour(t) < 5);
        assert!(night > 0.02 && night < 0.2, "{night}");
        // Restaurants peak at lunch and dinner, not mid-afternoon.
        let at = |h: i64| share(&|t| mcc(t) == 5812 && hour(t) == h);
        assert!(
            at(12) > 2.0 * at(16) && at(20) > 2.0 * at(16),
            "{} {} {}",
            at(12),
            at(16),
            at(20)
        );
        // Frauds cost what the card usually spends: amount alone is no proof.
        let mean = |v: &[&SimTx]| v.iter().map(|t| t.amount).sum::<f64>() / v.len() as f64;
        let ratio = mean(&frauds) / mean(&genuine);
        assert!(ratio > 0.7 && ratio < 1.4, "{ratio}");
    }

    #[test]
    fn scenarios_follow_the_handbook() {
        let s = small(1);
        let txs = &s.transactions;
        assert!(txs.windows(2).all(|w| w[0].ts <= w[1].ts));
        for t in txs {
            if t.amount > 220.0 && t.scenario == 0 {
                panic!("amount over 220 not fraud: {t:?}");
            }
            if t.scenario == 0 || t.scenario == 2 {
                let tod = t.ts.rem_euclid(DAY);
                assert!(tod > 0 && tod < DAY);
            }
        }
        for sc in 1..=5u8 {
            assert!(
                txs.iter().any(|t| t.scenario == sc),
                "no fraud of scenario {sc}"
            );
        }
        let rate = txs.iter().filter(|t| t.scenario > 0).count() as f64 / txs.len() as f64;
        assert!(rate > 0.002 && rate < 0.35, "fraud rate {rate}");
        let mut out = Vec::new();
        s.write_csv(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), txs.len() + 1);
    }
}
