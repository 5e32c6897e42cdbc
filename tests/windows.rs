//! The streaming windows against a brute-force reference that rescans the
//! whole history for every event, on random streams with out-of-order
//! events; and the proof that labels not yet known change no feature.

use peregrine::features::card::CardState;
use peregrine::features::declared::{EntityValues, Scratch};
use peregrine::features::entities::EntityLogs;
use peregrine::features::file::{DEFAULT_FILE, Plan};
use peregrine::features::geo::haversine_km;
use peregrine::features::merchant::MerchantView;
use peregrine::features::{
    Engine, FeatureConfig, Features, N_FEATURES, NAMES, NO_PREVIOUS_SECS, idx,
};
use peregrine::ingest::{AttrValue, Channel, EventTime, Transaction};
use peregrine::sim::{SimConfig, Simulation};
use proptest::prelude::*;

const DAY: i64 = 86_400;
const HOUR: i64 = 3600;
const T0: i64 = 1_522_540_800;

#[derive(Debug, Clone)]
struct Ev {
    ts: i64,
    card: u8,
    merchant: u8,
    amount: f64,
    fraud: bool,
    coords: Option<(f64, f64)>,
}

fn tx_of(e: &Ev, i: usize) -> Transaction {
    Transaction {
        transaction_id: i.to_string(),
        time: EventTime {
            utc: e.ts,
            offset: 0,
        },
        card_id: format!("card{}", e.card),
        merchant_id: format!("m{}", e.merchant),
        amount: e.amount,
        lat: e.coords.map(|c| c.0),
        lon: e.coords.map(|c| c.1),
        channel: Some(if e.merchant.is_multiple_of(3) {
            Channel::Ecom
        } else {
            Channel::Pos
        }),
        is_fraud: Some(e.fraud),
        ..Transaction::default()
    }
}

/// Runs the engine as the file commands do; `None` for a rejected late event.
fn run_engine(events: &[Ev], cfg: FeatureConfig) -> Vec<Option<Features>> {
    let mut engine = Engine::new(cfg);
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let tx = tx_of(e, i);
            let f = engine.process(&tx).ok();
            if f.is_some() && e.fraud {
                engine.schedule_label(&tx.merchant_id, e.ts);
            }
            f
        })
        .collect()
}

/// The definition, computed the slow way from every earlier admitted event.
fn reference(events: &[Ev], cfg: FeatureConfig) -> Vec<Option<[f64; N_FEATURES]>> {
    let mut out: Vec<Option<[f64; N_FEATURES]>> = Vec::new();
    let mut seen: Vec<(usize, bool)> = Vec::new(); // (index, large)
    let mut watermark = i64::MIN;
    let delay = cfg.label_delay_secs;
    for (i, e) in events.iter().enumerate() {
        let t = e.ts;
        if watermark != i64::MIN && t < watermark - cfg.allowed_lateness_secs {
            out.push(None);
            continue;
        }
        watermark = watermark.max(t);
        let day = t.div_euclid(DAY);
        let card: Vec<(&Ev, bool)> = seen
            .iter()
            .filter(|(j, _)| events[*j].card == e.card)
            .map(|&(j, l)| (&events[j], l))
            .collect();
        // Exact to the second: (t − w days, t], as pandas' rolling windows.
        let in_days = |c: &Ev, w: i64| c.ts > t - w * DAY && c.ts <= t;
        let agg = |w: i64| {
            let v: Vec<&(&Ev, bool)> = card.iter().filter(|(c, _)| in_days(c, w)).collect();
            let n = v.len() as f64;
            let s: f64 = v.iter().map(|(c, _)| c.amount).sum();
            let s2: f64 = v.iter().map(|(c, _)| c.amount * c.amount).sum();
            let large = v.iter().filter(|(_, l)| *l).count() as f64;
            (n, s, s2, large)
        };
        let exact: Vec<&Ev> = card
            .iter()
            .map(|(c, _)| *c)
            .filter(|c| c.ts > t - DAY && c.ts <= t)
            .collect();
        let mut f = [0f64; N_FEATURES];
        f[idx::AMOUNT] = e.amount;
        let weekday = (day + 3).rem_euclid(7);
        f[idx::WEEKEND] = (weekday >= 5) as u8 as f64;
        f[idx::NIGHT] = ((t.rem_euclid(DAY) / 3600) <= 6) as u8 as f64;
        f[idx::CARD_COUNT_1D] = exact.len() as f64 + 1.0;
        f[idx::CARD_MEAN_1D] =
            (exact.iter().map(|c| c.amount).sum::<f64>() + e.amount) / f[idx::CARD_COUNT_1D];
        let (n7, s7, _, l7) = agg(7);
        let (n30, s30, q30, l30) = agg(30);
        f[idx::CARD_COUNT_7D] = n7 + 1.0;
        f[idx::CARD_MEAN_7D] = (s7 + e.amount) / (n7 + 1.0);
        f[idx::CARD_COUNT_30D] = n30 + 1.0;
        f[idx::CARD_MEAN_30D] = (s30 + e.amount) / (n30 + 1.0);
        let merchant: Vec<&Ev> = seen
            .iter()
            .map(|&(j, _)| &events[j])
            .filter(|m| m.merchant == e.merchant)
            .collect();
        let end = (t - delay).div_euclid(HOUR);
        for (k, w) in [1i64, 7, 30].into_iter().enumerate() {
            let start = (t - delay - w * DAY).div_euclid(HOUR);
            let inw: Vec<&&Ev> = merchant
                .iter()
                .filter(|m| {
                    let h = m.ts.div_euclid(HOUR);
                    h >= start && h < end
                })
                .collect();
            let n = inw.len() as f64;
            let frauds = inw.iter().filter(|m| m.fraud).count() as f64;
            f[idx::MERCHANT_DELAYED + 2 * k] = n;
            f[idx::MERCHANT_DELAYED + 2 * k + 1] = if n > 0.0 { frauds / n } else { 0.0 };
        }
        let mean7 = if n7 > 0.0 { s7 / n7 } else { 0.0 };
        let mean30 = if n30 > 0.0 { s30 / n30 } else { 0.0 };
        f[idx::RATIO_7D] = if mean7 > 0.0 { e.amount / mean7 } else { 1.0 };
        f[idx::RATIO_30D] = if mean30 > 0.0 { e.amount / mean30 } else { 1.0 };
        f[idx::ZSCORE_30D] = if n30 >= 2.0 {
            let var = (q30 / n30 - mean30 * mean30).max(0.0);
            (e.amount - mean30) / var.sqrt().max(0.1 * mean30).max(0.01)
        } else {
            0.0
        };
        let large = n30 >= 3.0 && e.amount >= 2.5 * mean30;
        f[idx::LARGE_7D] = l7 + large as u8 as f64;
        f[idx::LARGE_30D] = l30 + large as u8 as f64;
        f[idx::CARD_COUNT_1H] = 1.0 + exact.iter().filter(|c| c.ts > t - HOUR).count() as f64;
        let mut ms: Vec<u8> = exact.iter().map(|c| c.merchant).collect();
        ms.push(e.merchant);
        ms.sort();
        ms.dedup();
        f[idx::DISTINCT_MERCHANTS_1D] = ms.len() as f64;
        // The previous event: the latest at or before t, the later-arrived on ties.
        let prev = card.iter().map(|(c, _)| *c).filter(|c| c.ts <= t).fold(
            None,
            |best: Option<&Ev>, c| match best {
                Some(b) if b.ts > c.ts => Some(b),
                _ => Some(c),
            },
        );
        f[idx::SECS_SINCE_PREV] =
            prev.map_or(NO_PREVIOUS_SECS, |p| (t - p.ts).min(NO_PREVIOUS_SECS)) as f64;
        f[idx::VELOCITY] = match (prev.filter(|p| t - p.ts <= 30 * DAY), e.coords) {
            (Some(p), Some((la, lo))) => match p.coords {
                Some((pla, plo)) => {
                    haversine_km(
                        pla as f32 as f64,
                        plo as f32 as f64,
                        la as f32 as f64,
                        lo as f32 as f64,
                    ) / ((t - p.ts).max(60) as f64 / 3600.0)
                }
                None => 0.0,
            },
            _ => 0.0,
        };
        let h_lo = (t - HOUR).div_euclid(HOUR);
        let h_hi = t.div_euclid(HOUR);
        f[idx::MERCHANT_COUNT_1H] = 1.0
            + merchant
                .iter()
                .filter(|m| (h_lo..=h_hi).contains(&m.ts.div_euclid(HOUR)))
                .count() as f64;
        let start30 = (t - delay - 30 * DAY).div_euclid(HOUR);
        let window30: Vec<&&Ev> = merchant
            .iter()
            .filter(|m| (start30..end).contains(&m.ts.div_euclid(HOUR)))
            .collect();
        let fraud_hours: Vec<i64> = window30
            .iter()
            .filter(|m| m.fraud)
            .map(|m| m.ts.div_euclid(HOUR))
            .collect();
        let age = |h: Option<&i64>| h.map_or(0.0, |h| (t - h * HOUR) as f64 / DAY as f64);
        f[idx::FRAUD_AGE] = age(fraud_hours.iter().min());
        f[idx::LAST_FRAUD_AGE] = age(fraud_hours.iter().max());
        f[idx::CLEAN_SINCE_FRAUD] = match fraud_hours.iter().max() {
            Some(&last) => window30
                .iter()
                .filter(|m| m.ts.div_euclid(HOUR) > last)
                .count() as f64,
            None => 0.0,
        };
        f[idx::ECOM] = (e.merchant.is_multiple_of(3)) as u8 as f64;
        f[idx::ATM] = 0.0;
        seen.push((i, large));
        out.push(Some(f));
    }
    out
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-3 + 1e-3 * b.abs()
}

fn check(events: &[Ev], cfg: FeatureConfig) -> Result<(), TestCaseError> {
    let got = run_engine(events, cfg);
    let want = reference(events, cfg);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        match (g, w) {
            (None, None) => {}
            (Some(g), Some(w)) => {
                for k in 0..N_FEATURES {
                    prop_assert!(
                        close(g.0[k] as f64, w[k]),
                        "event {i} {:?}: {} = {} but the reference says {}",
                        events[i],
                        NAMES[k],
                        g.0[k],
                        w[k]
                    );
                }
            }
            _ => prop_assert!(
                false,
                "event {i}: admitted {} vs reference {}",
                g.is_some(),
                w.is_some()
            ),
        }
    }
    Ok(())
}

/// Streams in event time with gaps from seconds to weeks (so every window
/// edge and the idle expiry are crossed), some events arriving late within
/// the allowed lateness and a few beyond it.
fn streams(lateness: i64) -> impl Strategy<Value = Vec<Ev>> {
    let step = prop_oneof![
        6 => 0i64..600,
        6 => 0i64..4 * HOUR,
        3 => 0i64..2 * DAY,
        1 => 5 * DAY..40 * DAY,
    ];
    let late = prop_oneof![8 => Just(0i64), 3 => 0..lateness + 1, 1 => lateness + 1..lateness * 3];
    let coords = prop::option::weighted(0.8, (45.0f64..46.0, 5.0f64..6.0));
    prop::collection::vec(
        (
            step,
            late,
            0u8..5,
            0u8..4,
            0.0f64..500.0,
            prop::bool::weighted(0.15),
            coords,
        ),
        1..300,
    )
    .prop_map(|raw| {
        let mut base = T0;
        raw.into_iter()
            .map(|(step, late, card, merchant, amount, fraud, coords)| {
                base += step;
                Ev {
                    ts: base - late,
                    card,
                    merchant,
                    amount: (amount * 100.0).round() / 100.0,
                    fraud,
                    coords,
                }
            })
            .collect()
    })
}

fn cfg(delay_days: i64, lateness: i64) -> FeatureConfig {
    FeatureConfig {
        label_delay_secs: delay_days * DAY,
        allowed_lateness_secs: lateness,
        max_recent: 128,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn windows_match_the_reference(events in streams(HOUR)) {
        check(&events, cfg(7, HOUR))?;
    }

    #[test]
    fn windows_match_with_short_delay_and_long_lateness(events in streams(6 * HOUR)) {
        check(&events, cfg(1, 6 * HOUR))?;
    }

    #[test]
    fn declared_features_equal_the_built_in_ones(events in streams(HOUR)) {
        check_interpreted(&events, cfg(7, HOUR))?;
    }

    #[test]
    fn declared_features_equal_the_built_in_ones_late(events in streams(6 * HOUR)) {
        check_interpreted(&events, cfg(1, 6 * HOUR))?;
    }

    #[test]
    fn entity_windows_match_the_reference(events in streams(HOUR)) {
        check_entities(&events, cfg(7, HOUR))?;
    }

    #[test]
    fn entity_windows_match_the_reference_late(events in streams(6 * HOUR)) {
        check_entities(&events, cfg(1, 6 * HOUR))?;
    }

    /// The service's split: each entity besides the card kept by its
    /// owner from the events' rows, the card by its partition with the
    /// owners' values, computes what one engine computes.
    #[test]
    fn entity_owners_equal_one_engine(events in streams(6 * HOUR)) {
        check_entity_owners(&events, cfg(1, 6 * HOUR))?;
    }

    /// A card's state restored from its changelog mid-stream, labels
    /// coming after their events, computes what one engine computes.
    #[test]
    fn labels_after_a_restore(events in streams(HOUR), cut in 0usize..300) {
        check_labels_restored(&events, cfg(1, HOUR), cut)?;
    }

    /// The service's labels come after their events, on a topic of their
    /// own: applied to the card's declared rows then, they give what the
    /// file's labels, read with their events, give.
    #[test]
    fn labels_after_their_events_equal_labels_with_them(events in streams(6 * HOUR)) {
        check_labels_after(&events, cfg(1, 6 * HOUR))?;
    }

    #[test]
    fn label_windows_match_the_reference(events in streams(HOUR)) {
        check_label_windows(&events, cfg(2, HOUR))?;
    }

    /// The declared windows over known labels: flipping every label not
    /// yet known at T changes none of them at or before T.
    #[test]
    fn declared_label_windows_leak_nothing(events in streams(HOUR), cut in 0usize..300, flip_seed in any::<u64>()) {
        let c = cfg(2, HOUR);
        let t_cut = events[cut % events.len()].ts;
        let flipped = flip_unknown_labels(&events, c.label_delay_secs, t_cut, flip_seed);
        let plan = Plan::compile(LABEL_FILE).unwrap();
        let run = |events: &[Ev]| {
            let mut engine = Engine::with_plan(c, &plan);
            events
                .iter()
                .enumerate()
                .map(|(i, e)| engine.process(&tx_of(e, i)).ok())
                .collect::<Vec<_>>()
        };
        let (a, b) = (run(&events), run(&flipped));
        for i in 0..events.len() {
            if events[i].ts <= t_cut {
                prop_assert_eq!(a[i], b[i], "event {} changed", i);
            }
        }
    }

    /// Flipping every label not yet known at T changes no feature of any
    /// event at or before T.
    #[test]
    fn unknown_labels_change_nothing(events in streams(HOUR), cut in 0usize..300, flip_seed in any::<u64>()) {
        let c = cfg(2, HOUR);
        let t_cut = events[cut % events.len()].ts;
        let flipped = flip_unknown_labels(&events, c.label_delay_secs, t_cut, flip_seed);
        let a = run_engine(&events, c);
        let b = run_engine(&flipped, c);
        for i in 0..events.len() {
            if events[i].ts <= t_cut {
                prop_assert_eq!(a[i], b[i], "event {} changed", i);
            }
        }
    }
}

/// Aggregations over entities besides the card: the merchant across all
/// its cards, and an attribute that holds the card's own id, which must
/// count as the card entity does.
const ENTITY_FILE: &str = r#"format = 1
[[feature]]
name = "m.count_1h"
entity = "merchant_id"
agg = "count"
window = "1h"
[[feature]]
name = "m.sum_1d"
entity = "merchant_id"
agg = "sum"
of = "amount"
window = "1d"
[[feature]]
name = "m_channel.max_large_7d"
entity = "merchant_id+channel"
agg = "max"
of = "amount"
where = "amount > 100"
window = "7d"
missing = -1
[[feature]]
name = "m.distinct_hours_30d"
entity = "merchant_id"
agg = "distinct"
of = "hour"
window = "30d"
[[feature]]
name = "m.since_last"
entity = "merchant_id"
agg = "time_since_last"
[[feature]]
name = "owner.mean_1d"
entity = "attributes.owner"
agg = "mean"
of = "amount"
window = "1d"
[[feature]]
name = "card.mean_1d_declared"
entity = "card_id"
agg = "mean"
of = "amount"
window = "1d"
"#;

/// The engine on [`ENTITY_FILE`] against the definitions, computed the
/// slow way from every earlier admitted event of the entity.
fn check_entities(events: &[Ev], cfg: FeatureConfig) -> Result<(), TestCaseError> {
    let plan = Plan::compile(ENTITY_FILE).unwrap();
    let mut engine = Engine::with_plan(cfg, &plan);
    // (time, merchant, ecom, amount as stored) of the admitted events.
    let mut admitted: Vec<(i64, u8, bool, f64)> = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let mut tx = tx_of(e, i);
        tx.attributes
            .set("owner", AttrValue::Text(tx.card_id.clone()))
            .unwrap();
        let Ok(f) = engine.process(&tx) else { continue };
        let got: Vec<f64> = plan.slots.iter().map(|&s| f.0[s] as f64).collect();
        let ecom = tx.channel == Some(Channel::Ecom);
        let t = e.ts;
        let within = |w: i64| {
            admitted
                .iter()
                .filter(move |a| a.1 == e.merchant && a.0 <= t && a.0 > t - w)
        };
        let stored = |a: f64| a as f32 as f64;
        let count = within(HOUR).count() as f64 + 1.0;
        let sum = within(DAY).map(|a| a.3).sum::<f64>() + e.amount;
        let large = within(7 * DAY)
            .filter(|a| a.2 == ecom && a.3 > 100.0)
            .map(|a| a.3)
            .chain((e.amount > 100.0).then_some(e.amount))
            .fold(-1.0f64, f64::max);
        let hours: std::collections::BTreeSet<i64> = within(30 * DAY)
            .map(|a| a.0.rem_euclid(DAY) / HOUR)
            .chain([t.rem_euclid(DAY) / HOUR])
            .collect();
        let since = within(30 * DAY).map(|a| t - a.0).min().unwrap_or(30 * DAY) as f64;
        let want = [
            count,
            sum,
            large,
            hours.len() as f64,
            since,
            // The card entity and the attribute holding the card agree.
            got[6],
        ];
        for (k, w) in want.iter().enumerate() {
            prop_assert!(
                close(got[k], *w),
                "event {i} ({e:?}): {} is {}, want {w}",
                plan.names[k],
                got[k]
            );
        }
        admitted.push((t, e.merchant, ecom, stored(e.amount)));
    }
    Ok(())
}

/// [`ENTITY_FILE`] computed as the service splits it
/// ([`EntityLogs`] per entity, [`Engine::with_plan_per_card`] per card)
/// against one engine, for every declared column.
fn check_entity_owners(events: &[Ev], cfg: FeatureConfig) -> Result<(), TestCaseError> {
    let plan = Plan::compile(ENTITY_FILE).unwrap();
    let program = plan.program.clone().unwrap();
    let mut engine = Engine::with_plan(cfg, &plan);
    let mut per_card = Engine::with_plan_per_card(cfg, &plan);
    let mut owners = EntityLogs::new(cfg, program.clone());
    let mut scratch = Scratch::default();
    for (i, e) in events.iter().enumerate() {
        let mut tx = tx_of(e, i);
        tx.attributes
            .set("owner", AttrValue::Text(tx.card_id.clone()))
            .unwrap();
        let Ok(want) = engine.process(&tx) else {
            continue;
        };
        let row = program.entity_row(&tx, &mut scratch);
        let mut values = EntityValues::default();
        for (k, key) in program.entity_keys(&tx).0.iter().enumerate() {
            if let Some(key) = key {
                values.0[k] = Some(owners.observe_and_fold(k + 1, *key, e.ts, &row).to_vec());
            }
        }
        let got = per_card
            .process_card(&tx, MerchantView::default(), Some(&values))
            .unwrap();
        same_columns(&plan, (i, e), &got, &want)?;
    }
    prop_assert!(!owners.is_empty());
    Ok(())
}

/// `events` with every label not yet known at `t_cut` drawn anew.
fn flip_unknown_labels(events: &[Ev], label_delay: i64, t_cut: i64, seed: u64) -> Vec<Ev> {
    let mut flipped = events.to_vec();
    let mut s = seed;
    for e in &mut flipped {
        if e.ts + label_delay > t_cut {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            e.fraud = (s >> 33) & 1 == 1;
        }
    }
    flipped
}

/// Windows over events whose labels are known, per card and per merchant.
const LABEL_FILE: &str = r#"format = 1
[[feature]]
name = "card.frauds_known_30d"
entity = "card_id"
agg = "sum"
of = "is_fraud == 1"
window = "30d"
delay = "label"
[[feature]]
name = "merchant.fraud_share_known_7d"
entity = "merchant_id"
agg = "mean"
of = "is_fraud == 1"
window = "7d"
delay = "label"
missing = -1
[[feature]]
name = "card.largest_fraud_known_30d"
entity = "card_id"
agg = "max"
of = "amount"
where = "is_fraud == 1"
window = "30d"
delay = "label"
missing = -1
"#;

/// The card's windows over known labels, of either kind.
const CARD_LABEL_FILE: &str = r#"format = 1
[[feature]]
name = "card.frauds_known_30d"
entity = "card_id"
agg = "sum"
of = "is_fraud == 1"
window = "30d"
delay = "label"
[[feature]]
name = "card.largest_fraud_known_30d"
entity = "card_id"
agg = "max"
of = "amount"
where = "is_fraud == 1"
window = "30d"
delay = "label"
missing = -1
[[feature]]
name = "card.genuine_known_7d"
entity = "card_id"
agg = "count"
where = "is_fraud == 0 && amount > 20"
window = "7d"
delay = "label"
[[feature]]
name = "card.events_1d"
entity = "card_id"
agg = "count"
window = "1d"
"#;

/// Every column of `plan` the same, bit for bit, in `got` as in `want`.
fn same_columns(
    plan: &Plan,
    (i, e): (usize, &Ev),
    got: &Features,
    want: &Features,
) -> Result<(), TestCaseError> {
    for (k, &s) in plan.slots.iter().enumerate() {
        prop_assert_eq!(
            got.0[s].to_bits(),
            want.0[s].to_bits(),
            "event {} ({:?}): {} is {}, want {}",
            i,
            e,
            &plan.names[k],
            got.0[s],
            want.0[s]
        );
    }
    Ok(())
}

/// `tx` in one engine with its label, and in a per-card engine without
/// it: both features, when both admit it (and an error when only one does).
fn without_labels(
    engine: &mut Engine,
    per_card: &mut Engine,
    tx: &Transaction,
    i: usize,
) -> Result<Option<(Features, Features)>, TestCaseError> {
    let want = engine.process(tx);
    let unlabelled = Transaction {
        is_fraud: None,
        ..tx.clone()
    };
    let got = per_card.process_card(&unlabelled, MerchantView::default(), None);
    prop_assert_eq!(
        want.is_ok(),
        got.is_ok(),
        "event {} admitted by one only",
        i
    );
    Ok(want.ok().zip(got.ok()))
}

/// [`CARD_LABEL_FILE`] in a per-card engine whose events come without
/// labels, each label applied half a label delay later, against one engine
/// that reads the file's labels with the events.
fn check_labels_after(events: &[Ev], cfg: FeatureConfig) -> Result<(), TestCaseError> {
    let plan = Plan::compile(CARD_LABEL_FILE).unwrap();
    let mut engine = Engine::with_plan(cfg, &plan);
    let mut per_card = Engine::with_plan_per_card(cfg, &plan);
    let mut labels: Vec<(i64, String, i64, bool)> = Vec::new();
    // A label finds its event by card and second: one event a second per card.
    let mut seen = std::collections::HashSet::new();
    let (mut delivered, mut applied) = (0, 0);
    for (i, e) in events.iter().enumerate() {
        if !seen.insert((e.card, e.ts)) {
            continue;
        }
        labels.sort_by_key(|l| std::cmp::Reverse(l.0));
        while labels.last().is_some_and(|l| l.0 <= e.ts) {
            let (_, card, t, fraud) = labels.pop().unwrap();
            delivered += 1;
            applied += u32::from(per_card.label_card_event(&card, t, fraud));
        }
        let tx = tx_of(e, i);
        let Some((want, got)) = without_labels(&mut engine, &mut per_card, &tx, i)? else {
            continue;
        };
        same_columns(&plan, (i, e), &got, &want)?;
        labels.push((
            e.ts + cfg.label_delay_secs / 2,
            tx.card_id.clone(),
            e.ts,
            e.fraud,
        ));
    }
    prop_assert_eq!(applied, delivered, "every label finds its event");
    Ok(())
}

/// [`check_labels_after`] with every card's state encoded and decoded (as
/// its changelog carries it) before the event at `cut`, each label applied
/// right after its event.
fn check_labels_restored(
    events: &[Ev],
    cfg: FeatureConfig,
    cut: usize,
) -> Result<(), TestCaseError> {
    let plan = Plan::compile(CARD_LABEL_FILE).unwrap();
    let mut engine = Engine::with_plan(cfg, &plan);
    let mut per_card = Engine::with_plan_per_card(cfg, &plan);
    let mut seen = std::collections::HashSet::new();
    for (i, e) in events.iter().enumerate() {
        if !seen.insert((e.card, e.ts)) {
            continue;
        }
        if i == cut % events.len() {
            let mut restored = Engine::with_plan_per_card(cfg, &plan);
            for (key, card) in per_card.all_cards() {
                let mut bytes = Vec::new();
                card.encode(&mut bytes);
                restored.insert_card(key, CardState::decode(&bytes).unwrap());
            }
            restored.set_clock(per_card.clock());
            per_card = restored;
        }
        let tx = tx_of(e, i);
        let Some((want, got)) = without_labels(&mut engine, &mut per_card, &tx, i)? else {
            continue;
        };
        prop_assert!(per_card.label_card_event(&tx.card_id, e.ts, e.fraud));
        same_columns(&plan, (i, e), &got, &want)?;
    }
    Ok(())
}

/// The engine on [`LABEL_FILE`] against the definitions: the entity's
/// earlier admitted events in `(t − d − w, t − d]`, d the label delay.
fn check_label_windows(events: &[Ev], cfg: FeatureConfig) -> Result<(), TestCaseError> {
    let plan = Plan::compile(LABEL_FILE).unwrap();
    let mut engine = Engine::with_plan(cfg, &plan);
    let d = cfg.label_delay_secs;
    let mut admitted: Vec<&Ev> = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let Ok(f) = engine.process(&tx_of(e, i)) else {
            continue;
        };
        let got: Vec<f64> = plan.slots.iter().map(|&s| f.0[s] as f64).collect();
        let end = e.ts - d;
        let known = |w: i64| {
            admitted
                .iter()
                .filter(move |a| a.ts <= end && a.ts > end - w)
        };
        let card_frauds = known(30 * DAY)
            .filter(|a| a.card == e.card && a.fraud)
            .count() as f64;
        let merchant: Vec<bool> = known(7 * DAY)
            .filter(|a| a.merchant == e.merchant)
            .map(|a| a.fraud)
            .collect();
        let share = if merchant.is_empty() {
            -1.0
        } else {
            merchant.iter().filter(|&&f| f).count() as f64 / merchant.len() as f64
        };
        for (k, want) in [card_frauds, share].into_iter().enumerate() {
            prop_assert!(
                close(got[k], want),
                "event {i} ({e:?}): {} is {}, want {want}",
                plan.names[k],
                got[k]
            );
        }
        admitted.push(e);
    }
    Ok(())
}

/// The default features file compiled for the interpreter (every card
/// feature from its declaration, none from the built-in code) against the
/// built-in engine, on the same stream: same values, column by column.
fn check_interpreted(events: &[Ev], cfg: FeatureConfig) -> Result<(), TestCaseError> {
    compare_interpreted(events.iter().enumerate().map(|(i, e)| tx_of(e, i)), cfg)
        .map(|_| ())
        .map_err(TestCaseError::fail)
}

fn compare_interpreted(
    txs: impl Iterator<Item = Transaction>,
    cfg: FeatureConfig,
) -> Result<usize, String> {
    let plan = Plan::compile_interpreted(DEFAULT_FILE).unwrap();
    let mut builtin = Engine::new(cfg);
    let mut declared = Engine::with_plan(cfg, &plan);
    let mut compared = 0;
    for (i, tx) in txs.enumerate() {
        let (a, b) = (builtin.process(&tx), declared.process(&tx));
        if a.is_ok() != b.is_ok() {
            return Err(format!("event {i} admitted differently"));
        }
        let (Ok(a), Ok(b)) = (a, b) else { continue };
        for (k, &slot) in plan.slots.iter().enumerate() {
            let (want, got) = (a.0[k] as f64, b.0[slot] as f64);
            if (want - got).abs() > 1e-4 * want.abs().max(1.0) {
                return Err(format!(
                    "event {i} {tx:?}: {} is {got} interpreted, {want} built in",
                    plan.names[k]
                ));
            }
        }
        compared += 1;
        if tx.is_fraud == Some(true) {
            builtin.schedule_label(&tx.merchant_id, tx.time.utc);
            declared.schedule_label(&tx.merchant_id, tx.time.utc);
        }
    }
    Ok(compared)
}

/// The same on a simulated file, with every scenario and the optional
/// fields filled.
#[test]
fn declared_features_equal_the_built_in_ones_on_a_simulation() {
    let sim = Simulation::run(SimConfig {
        customers: 300,
        terminals: 600,
        days: 40,
        seed: 3,
        scenarios: vec![1, 2, 3, 4, 5, 6],
        ..SimConfig::default()
    });
    let txs = (0..sim.transactions.len()).map(|i| {
        let mut tx = Transaction::default();
        sim.fill(i, &mut tx);
        tx
    });
    let compared = compare_interpreted(txs, FeatureConfig::default()).unwrap();
    assert!(compared > 20_000, "{compared} events compared");
}

/// The interpreter computes the card features of the default file, not
/// the built-in code: the check above compares something.
#[test]
fn the_interpreted_default_file_interprets_the_card_features() {
    let plan = Plan::compile_interpreted(DEFAULT_FILE).unwrap();
    assert_eq!(plan.names, NAMES);
    let interpreted: Vec<&str> = plan
        .slots
        .iter()
        .zip(&plan.names)
        .filter(|(s, _)| **s >= N_FEATURES)
        .map(|(_, n)| n.as_str())
        .collect();
    // All but the merchant's ten features.
    assert_eq!(interpreted.len(), 20, "{interpreted:?}");
    assert!(interpreted.contains(&"card.amount_zscore_30d"));
    assert!(interpreted.contains(&"card.geo_velocity_kmh"));
    assert!(interpreted.contains(&"card.large_count_30d"));
}

/// A label does reach the risk features once its delay has passed, so the
/// leak test above is not passing because labels never count.
#[test]
fn known_labels_do_count() {
    let c = cfg(1, HOUR);
    let mut events = Vec::new();
    for k in 0..10 {
        events.push(Ev {
            ts: T0 + k * HOUR,
            card: k as u8 % 3,
            merchant: 1,
            amount: 10.0,
            fraud: k % 2 == 0,
            coords: None,
        });
    }
    events.push(Ev {
        ts: T0 + 2 * DAY,
        card: 4,
        merchant: 1,
        amount: 10.0,
        fraud: false,
        coords: None,
    });
    let f = run_engine(&events, c).pop().unwrap().unwrap();
    assert_eq!(f.get("merchant.count_1d"), Some(10.0));
    assert_eq!(f.get("merchant.risk_1d"), Some(0.5));
}

/// State stays bounded: a card that bursts far past the raw-event bound
/// keeps at most that many, and idle cards and merchants expire.
#[test]
fn state_is_bounded_and_idle_keys_expire() {
    let c = FeatureConfig {
        max_recent: 16,
        ..cfg(7, HOUR)
    };
    let mut engine = Engine::new(c);
    for k in 0..1000 {
        let e = Ev {
            ts: T0 + k,
            card: 1,
            merchant: (k % 7) as u8,
            amount: 1.0,
            fraud: false,
            coords: None,
        };
        engine.process(&tx_of(&e, k as usize)).unwrap();
    }
    assert!(engine.stats().recent_overflows > 900);
    let f = engine.peek(&tx_of(
        &Ev {
            ts: T0 + 1000,
            card: 1,
            merchant: 0,
            amount: 1.0,
            fraud: false,
            coords: None,
        },
        0,
    ));
    assert_eq!(f.get("card.count_1h"), Some(17.0));
    assert_eq!(f.get("card.count_7d"), Some(1001.0));
    assert_eq!(engine.cards(), 1);
    let later = Ev {
        ts: T0 + 60 * DAY,
        card: 2,
        merchant: 9,
        amount: 1.0,
        fraud: false,
        coords: None,
    };
    engine.process(&tx_of(&later, 1)).unwrap();
    assert_eq!(engine.cards(), 1, "the idle card expired");
    assert_eq!(engine.merchants(), 1, "the idle merchants expired");
    assert_eq!(engine.stats().cards_expired, 1);
}

/// The file commands run a card's and a merchant's halves of the state on
/// two threads (`backtest::stream`); one engine on one thread must give
/// the same features, bit for bit, on a file with late events, repeats and
/// labels.
#[test]
fn the_file_pipeline_equals_one_engine_on_a_disordered_file() {
    use peregrine::features::Keys;
    let sim = Simulation::run(SimConfig {
        customers: 300,
        terminals: 600,
        days: 40,
        seed: 5,
        scenarios: vec![1, 2, 3, 4, 5, 6],
        ..SimConfig::default()
    });
    let mut csv = Vec::new();
    sim.write_csv(&mut csv).unwrap();
    let text = String::from_utf8(csv).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let rows: Vec<&str> = lines.collect();
    // Deterministic disorder: every 97th row also twice, every 53rd held
    // back 3,000 rows (far past the lateness), every 11th held back 5.
    let mut out = vec![header];
    let mut held: Vec<(usize, &str)> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if i % 53 == 0 {
            held.push((i + 3000, r));
        } else if i % 11 == 0 {
            held.push((i + 5, r));
        } else {
            out.push(r);
        }
        if i % 97 == 0 {
            out.push(r);
        }
        held.retain(|&(at, r)| {
            if at <= i {
                out.push(r);
            }
            at > i
        });
    }
    out.extend(held.iter().map(|&(_, r)| r));
    let dir = std::env::temp_dir().join(format!("peregrine-windows-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disordered.csv");
    std::fs::write(&path, out.join("\n") + "\n").unwrap();

    for file in [
        DEFAULT_FILE,
        include_str!("../models/features-extended.toml"),
        ENTITY_FILE,
    ] {
        let plan = Plan::compile(file).unwrap();
        let cfg = FeatureConfig::default();
        let mut piped = Vec::new();
        let summary = peregrine::backtest::stream(&path, cfg, &plan, false, |_, f| {
            piped.push(*f);
            Ok(())
        })
        .unwrap();
        assert!(
            summary.late > 100,
            "the file has late rows and repeats: {summary:?}"
        );
        assert!(summary.engine.labels_applied > 10, "{summary:?}");

        let mut engine = Engine::with_plan(cfg, &plan);
        let mut reader = peregrine::ingest::TransactionReader::open(&path).unwrap();
        let mut tx = Transaction::default();
        let mut one = Vec::new();
        while reader.next_into(&mut tx).unwrap() {
            let keys = Keys::of(&tx);
            let mut f = Features::default();
            let observed = match engine.observe_keyed(&tx, keys, &mut f) {
                Ok(o) => o,
                Err(_) => engine.peek_observed(&tx, keys, &mut f),
            };
            if tx.is_fraud == Some(true) {
                engine.schedule_label(&tx.merchant_id, tx.time.utc);
            }
            observed.derive(&tx, &mut f);
            one.push(f);
        }
        assert_eq!(piped.len(), one.len());
        for (i, (a, b)) in piped.iter().zip(&one).enumerate() {
            let same =
                a.0.iter()
                    .zip(&b.0)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "row {i}: {:?} against {:?}", a.0, b.0);
        }
        assert_eq!(summary.engine, engine.stats());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
