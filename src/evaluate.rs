//! Detection metrics, as the Fraud Detection Handbook computes them.

use std::collections::{HashMap, HashSet};

/// Area under the ROC curve; tied scores count one half.
pub fn auc_roc(scores: &[f64], labels: &[u8]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let pos = labels.iter().filter(|&&l| l == 1).count() as f64;
    let neg = labels.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return f64::NAN;
    }
    // Sum of the positives' mid-ranks (Mann–Whitney U).
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let mid = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += order[i..=j].iter().filter(|&&k| labels[k] == 1).count() as f64 * mid;
        i = j + 1;
    }
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

/// Average precision: Σ (Rₙ − Rₙ₋₁) Pₙ over the distinct score thresholds,
/// highest first (scikit-learn's definition).
pub fn average_precision(scores: &[f64], labels: &[u8]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let pos = labels.iter().filter(|&&l| l == 1).count() as f64;
    if pos == 0.0 {
        return f64::NAN;
    }
    let (mut tp, mut seen, mut ap, mut last_recall) = (0.0, 0.0, 0.0, 0.0);
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j < order.len() && scores[order[j]] == scores[order[i]] {
            tp += labels[order[j]] as f64;
            seen += 1.0;
            j += 1;
        }
        let recall = tp / pos;
        ap += (recall - last_recall) * (tp / seen);
        last_recall = recall;
        i = j;
    }
    ap
}

/// One scored transaction of a test period.
#[derive(Debug, Clone, Copy)]
pub struct Scored {
    pub day: i64,
    pub card: u64,
    pub score: f64,
    pub fraud: bool,
}

/// Card precision@k: per day, a card's score is its highest that day; of
/// the k highest cards, the share with a fraud that day; averaged over days.
/// A card detected (in the top k with a fraud) is left out of later days.
pub fn card_precision_at_k(rows: &[Scored], k: usize) -> f64 {
    let mut days: Vec<i64> = rows.iter().map(|r| r.day).collect();
    days.sort_unstable();
    days.dedup();
    let mut detected: HashSet<u64> = HashSet::new();
    let mut total = 0.0;
    for &day in &days {
        let mut cards: HashMap<u64, (f64, bool)> = HashMap::new();
        for r in rows
            .iter()
            .filter(|r| r.day == day && !detected.contains(&r.card))
        {
            let e = cards.entry(r.card).or_insert((f64::NEG_INFINITY, false));
            e.0 = e.0.max(r.score);
            e.1 |= r.fraud;
        }
        let mut ranked: Vec<(u64, f64, bool)> =
            cards.into_iter().map(|(c, (s, f))| (c, s, f)).collect();
        // Ties broken by card key so the result does not depend on hashing.
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let hits: Vec<u64> = ranked.iter().take(k).filter(|c| c.2).map(|c| c.0).collect();
        total += hits.len() as f64 / k as f64;
        detected.extend(hits);
    }
    if days.is_empty() {
        f64::NAN
    } else {
        total / days.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_and_ap_match_hand_computed_values() {
        let s = [0.1, 0.4, 0.35, 0.8];
        let y = [0, 0, 1, 1];
        assert!((auc_roc(&s, &y) - 0.75).abs() < 1e-12);
        // scikit-learn: average_precision_score([0,0,1,1],[0.1,0.4,0.35,0.8]) = 0.8333…
        assert!((average_precision(&s, &y) - 0.833_333_333).abs() < 1e-6);
        assert!((auc_roc(&[0.5, 0.5], &[0, 1]) - 0.5).abs() < 1e-12);
        assert!((average_precision(&[0.5, 0.5, 0.5], &[1, 0, 0]) - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn card_precision_leaves_detected_cards_out() {
        let r = |day, card, score, fraud| Scored {
            day,
            card,
            score,
            fraud,
        };
        let rows = [
            r(0, 1, 0.9, true),
            r(0, 2, 0.8, false),
            r(0, 3, 0.1, true),
            r(1, 1, 0.9, true),
            r(1, 3, 0.7, true),
            r(1, 3, 0.2, false),
            r(1, 4, 0.5, false),
        ];
        // Day 0: top 2 = cards 1 (fraud), 2 → 1/2. Day 1: card 1 left out;
        // top 2 = card 3 (max 0.7, fraud), card 4 → 1/2.
        assert!((card_precision_at_k(&rows, 2) - 0.5).abs() < 1e-12);
        assert!((card_precision_at_k(&rows, 1) - 1.0).abs() < 1e-12);
    }
}
