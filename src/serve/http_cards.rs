//! Cards that only the HTTP API has seen (`update=true` for a card no
//! Kafka partition of this instance holds), bounded by count and by
//! wall-clock idle time, as any cache a client can fill must be.

use crate::features::file::Plan;
use crate::features::merchant::MerchantView;
use crate::features::{Engine, FeatureConfig, Features, Keys, Refused};
use crate::ingest::Transaction;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

pub struct HttpCards {
    engine: Engine,
    max_cards: usize,
    idle: Duration,
    epoch: Instant,
    /// Each card's last use, in milliseconds since `epoch`, and the same
    /// pairs ordered by time: the oldest are dropped from the front.
    last_used: HashMap<u64, u64>,
    by_time: BTreeSet<(u64, u64)>,
}

/// What the store did with a request's transaction.
pub enum Outcome {
    Folded(Features),
    Refused(Refused, Features),
    Read(Features),
}

impl HttpCards {
    pub fn new(cfg: FeatureConfig, plan: &Plan, max_cards: usize, idle: Duration) -> HttpCards {
        HttpCards {
            engine: Engine::with_plan_per_card(cfg, plan),
            max_cards: max_cards.max(1),
            idle,
            epoch: Instant::now(),
            last_used: HashMap::new(),
            by_time: BTreeSet::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.last_used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_used.is_empty()
    }

    /// Scores `tx` against the card's state here, folding it in with `update`.
    pub fn score(&mut self, tx: &Transaction, merchant: MerchantView, update: bool) -> Outcome {
        let key = Keys::of(tx).card.max(1);
        let known = self.last_used.contains_key(&key);
        let outcome = if update {
            match self.engine.process_card(tx, merchant, None) {
                Ok(f) => Outcome::Folded(f),
                Err(e) => Outcome::Refused(e, self.engine.peek_card(tx, merchant, None)),
            }
        } else {
            Outcome::Read(self.engine.peek_card(tx, merchant, None))
        };
        if update || known {
            self.touch(key);
        }
        outcome
    }

    fn touch(&mut self, key: u64) {
        let now = self.epoch.elapsed().as_millis() as u64;
        if let Some(before) = self.last_used.insert(key, now) {
            self.by_time.remove(&(before, key));
        }
        self.by_time.insert((now, key));
        self.evict(now);
    }

    /// Drops the idle cards and, past the limit, the least recently used:
    /// a tenth of the limit at once, as the engine's store frees keys in
    /// one pass over all of them.
    fn evict(&mut self, now: u64) {
        let idle_before = now.saturating_sub(self.idle.as_millis() as u64);
        let over = self.last_used.len() > self.max_cards;
        let idle = self.by_time.first().is_some_and(|&(t, _)| t < idle_before);
        if !over && !idle {
            return;
        }
        let keep = if over {
            self.max_cards - self.max_cards / 10
        } else {
            self.max_cards
        };
        let mut victims = HashSet::new();
        while let Some(&(t, key)) = self.by_time.first() {
            if t >= idle_before && self.last_used.len() <= keep {
                break;
            }
            self.by_time.pop_first();
            self.last_used.remove(&key);
            victims.insert(key);
        }
        self.engine.remove_cards(&victims);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::Transaction;

    fn tx(card: &str, id: &str) -> Transaction {
        Transaction::from_json(&serde_json::json!({
            "transaction_id": id,
            "timestamp": "2024-03-01T10:00:00Z",
            "card_id": card,
            "merchant_id": "m",
            "amount": 10.0,
        }))
        .unwrap()
    }

    fn count_1d(o: Outcome) -> f32 {
        let f = match o {
            Outcome::Folded(f) | Outcome::Read(f) | Outcome::Refused(_, f) => f,
        };
        f.get("card.count_1d").unwrap()
    }

    #[test]
    fn bounded_by_count_least_recently_used_first() {
        let mut s = HttpCards::new(
            FeatureConfig::default(),
            Plan::default_plan(),
            20,
            Duration::from_secs(3600),
        );
        let m = MerchantView::default();
        for i in 0..25 {
            s.score(&tx(&format!("c{i}"), &format!("t{i}")), m, true);
            assert!(s.len() <= 20);
        }
        // The newest stay; the first ones went.
        assert_eq!(count_1d(s.score(&tx("c24", "x"), m, false)), 2.0);
        assert_eq!(count_1d(s.score(&tx("c0", "y"), m, false)), 1.0);
        // A read does not add a card.
        let before = s.len();
        s.score(&tx("never", "z"), m, false);
        assert_eq!(s.len(), before);
    }

    #[test]
    fn idle_cards_go() {
        let mut s = HttpCards::new(
            FeatureConfig::default(),
            Plan::default_plan(),
            100,
            Duration::ZERO,
        );
        let m = MerchantView::default();
        s.score(&tx("a", "t1"), m, true);
        std::thread::sleep(Duration::from_millis(5));
        s.score(&tx("b", "t2"), m, true);
        assert_eq!(s.len(), 1, "a was idle past the limit");
        assert_eq!(count_1d(s.score(&tx("a", "t3"), m, false)), 1.0);
    }

    #[test]
    fn a_repeated_transaction_is_not_folded_twice() {
        let mut s = HttpCards::new(
            FeatureConfig::default(),
            Plan::default_plan(),
            100,
            Duration::from_secs(60),
        );
        let m = MerchantView::default();
        assert!(matches!(
            s.score(&tx("a", "t1"), m, true),
            Outcome::Folded(_)
        ));
        assert!(matches!(
            s.score(&tx("a", "t1"), m, true),
            Outcome::Refused(Refused::Duplicate, _)
        ));
        assert_eq!(count_1d(s.score(&tx("a", "t2"), m, false)), 2.0);
    }
}
