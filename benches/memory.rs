//! State per card: loads a million cards with a month of history each and
//! counts the live heap with a counting allocator.
//! Run: `cargo bench --bench memory`.

use peregrine::features::file::Plan;
use peregrine::features::{Engine, FeatureConfig};
use peregrine::ingest::{Channel, EventTime, Transaction};
use peregrine::rng::Rng;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const T0: i64 = 1_530_403_200; // 2018-07-01

/// Loads `cards` cards, each paying `per_card` times at random moments of
/// 30 days, at `merchants` merchants; returns live heap bytes per card.
/// Amounts are whole cents, as card schemes carry them, unless
/// `any_float`.
fn load(
    cards: u64,
    per_card: u64,
    merchants: u64,
    plan: Option<&Plan>,
    any_float: bool,
) -> (f64, f64, f64) {
    let before = LIVE.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut engine = match plan {
        Some(p) => Engine::with_plan(FeatureConfig::default(), p),
        None => Engine::new(FeatureConfig::default()),
    };
    let mut rng = Rng::new(1);
    let mut tx = Transaction::default();
    let events = cards * per_card;
    // Time-ordered: event k happens at k/events of the month, on a random card.
    for k in 0..events {
        let card = rng.below(cards as usize) as u64;
        tx.transaction_id = k.to_string();
        tx.card_id = format!("card-{card}");
        tx.merchant_id = format!("m-{}", rng.below(merchants as usize));
        tx.time = EventTime {
            utc: T0 + (k as i128 * 30 * 86_400 / events as i128) as i64,
            offset: 0,
        };
        tx.amount = rng.uniform(1.0, 200.0);
        if !any_float {
            tx.amount = (tx.amount * 100.0).round() / 100.0;
        }
        tx.lat = Some(48.0 + rng.f64());
        tx.lon = Some(2.0 + rng.f64());
        // Categories and channels for the extended file's habits.
        tx.mcc = Some([5411, 5812, 5541, 5999, 5732, 4111][rng.below(6)]);
        tx.channel = Some([Channel::Pos, Channel::Ecom][rng.below(2)]);
        engine.process(&tx).expect("in order");
    }
    let bytes = (LIVE.load(Ordering::Relaxed) - before) as f64;
    let n = engine.cards() as f64;
    let rate = events as f64 / started.elapsed().as_secs_f64();
    drop(engine);
    (bytes / n, n, rate)
}

fn main() {
    let cards = std::env::var("PEREGRINE_BENCH_CARDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000u64);
    let extended = Plan::compile(include_str!("../models/features-extended.toml"))
        .expect("the extended file compiles");
    println!("cards  events/card  merchants  file  live heap per card  (load rate)");
    let runs = [
        (30, 1, None, false),
        (60, 1, None, false),
        (60, 1, None, true),
        (30, 100_000, None, false),
        (30, 1, Some(&extended), false),
        (60, 1, Some(&extended), false),
    ];
    for (per_card, merchants, plan, any_float) in runs {
        let (per, n, rate) = load(cards, per_card, merchants, plan, any_float);
        let file = match (plan.is_some(), any_float) {
            (true, _) => "extended",
            (false, true) => "default, amounts any f32",
            (false, false) => "default",
        };
        println!(
            "{n:>8.0}  {per_card:>6}  {merchants:>9}  {file:>8}  {per:>10.0} bytes  ({:.2} M events/s)",
            rate / 1e6
        );
    }
}
