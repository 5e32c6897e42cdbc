//! Scores with reasons: the model's score, the anomaly score, the rules that
//! fired, the top contributing features, and the decision they lead to.

use super::rules::{RuleInput, RuleSet, Severity};
use super::trees::Compiled;
use super::{Body, Model, Thresholds};
use crate::features::Features;
use crate::features::file::{MAX_COLUMNS, Plan};
use serde::Serialize;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Review,
    Block,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Review => "review",
            Decision::Block => "block",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Contribution {
    pub feature: Arc<str>,
    pub value: f32,
    /// Signed: positive pushes towards fraud. Log-odds for logistic and
    /// boosted models, probability for a forest, isolation for the anomaly model.
    pub contribution: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleHit {
    pub rule: String,
    pub severity: Severity,
}

#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Reasons {
    pub top_features: Vec<Contribution>,
    pub rules: Vec<RuleHit>,
    /// Set when the anomaly score alone raised the alert.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub anomalous: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Score {
    pub score: f64,
    pub anomaly: Option<f64>,
    pub decision: Decision,
    pub reasons: Reasons,
}

/// How many features an explanation lists.
pub const TOP_FEATURES: usize = 5;

/// A model's input row: the features' first slots as they are, or the
/// model's columns copied out of them (only a file that does not list the
/// built-in columns first needs the copy, and so pays for it). The copy
/// lives on the stack for one call: boxing it would allocate per score.
#[allow(clippy::large_enum_variant)]
enum Row<'a> {
    Prefix(&'a [f32]),
    Gathered([f32; MAX_COLUMNS], usize),
}

impl std::ops::Deref for Row<'_> {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match self {
            Row::Prefix(x) => x,
            Row::Gathered(buf, n) => &buf[..*n],
        }
    }
}

pub struct Scorer {
    pub model: Model,
    pub rules: RuleSet,
    pub thresholds: Thresholds,
    /// The model's trees in their fast layout, when they are shallow enough.
    fast: Option<Compiled>,
    /// The same for the isolation forest, with path lengths in the leaves.
    fast_anomaly: Option<Compiled>,
    rules_read_anomaly: bool,
    /// For [`Scorer::alert`]: the model's tree sum below which the score is
    /// under the review threshold, when nothing else needs the exact score.
    allow_below: Option<f64>,
    /// The model's features file, compiled.
    plan: Plan,
    names: Vec<Arc<str>>,
    /// The model's row is the first `width` slots of the features, as
    /// with the default file: no copy.
    prefix: Option<usize>,
}

impl Scorer {
    pub fn new(model: Model, rules: RuleSet) -> Scorer {
        let plan = model
            .plan()
            .expect("a model's features file is checked when it is loaded or trained");
        let names = plan.names.iter().map(|n| Arc::from(n.as_str())).collect();
        let thresholds = model.thresholds;
        let fast = match &model.body {
            Body::Gbt(m) => Compiled::new(&m.trees),
            Body::Forest(m) => Compiled::new(&m.trees),
            Body::Iforest(m) => m.compile(),
            _ => None,
        };
        let fast_anomaly = model.anomaly.as_ref().and_then(|a| a.compile());
        let review = thresholds.review;
        // Only a review threshold well inside (0, 1) has a finite sum whose
        // rounding through the sigmoid cannot cross it.
        let allow_below = match &model.body {
            _ if rules.reads_score()
                || rules.reads_anomaly()
                || thresholds.anomaly_review.is_some()
                || !(1e-6..=1.0 - 1e-6).contains(&review) =>
            {
                None
            }
            Body::Gbt(m) => Some((review / (1.0 - review)).ln() - m.base_margin),
            Body::Forest(m) => Some(review * m.trees.len() as f64),
            _ => None,
        };
        Scorer {
            model,
            rules_read_anomaly: rules.reads_anomaly(),
            rules,
            thresholds,
            fast,
            fast_anomaly,
            allow_below,
            prefix: plan.is_prefix().then_some(plan.width()),
            plan,
            names,
        }
    }

    /// The model's features file, compiled: an engine for this model is
    /// built with it ([`crate::features::Engine::with_plan`]).
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The model's columns of `f`, by name: what an API response shows.
    pub fn named_features(&self, f: &Features) -> serde_json::Map<String, serde_json::Value> {
        let row = &self.row(f);
        self.plan
            .names
            .iter()
            .zip(row.iter())
            .map(|(n, &v)| (n.clone(), serde_json::json!(f64::from(v))))
            .collect()
    }

    /// The model's input row: a prefix of the features' slots, or those
    /// the model's columns name, copied into `buf`.
    fn row<'a>(&self, f: &'a Features) -> Row<'a> {
        if let Some(width) = self.prefix {
            return Row::Prefix(&f.0[..width]);
        }
        let slots = &self.plan.slots;
        let mut buf = [0f32; MAX_COLUMNS];
        for (b, &s) in buf.iter_mut().zip(slots) {
            *b = f.0[s];
        }
        Row::Gathered(buf, slots.len())
    }

    /// The score of a transaction that raises an alert, `None` for one that
    /// is allowed: `score(f, false)` without its allows. Where the decision
    /// rests on the review threshold alone, the tree walk stops as soon as
    /// the sum cannot reach it, so allowed transactions cost less. For
    /// backtests, which write alerts only.
    pub fn alert(&self, f: &Features) -> Option<Score> {
        if let (Some(limit), Some(c)) = (self.allow_below, &self.fast)
            && c.sum_reaching(&self.row(f), limit).is_none()
        {
            // The model says allow; only a rule can say otherwise. No rule
            // reads the score (checked when `allow_below` was set).
            let input = RuleInput {
                features: &f.0,
                score: f64::NAN,
                anomaly: 0.0,
            };
            let raised = self
                .rules
                .rules
                .iter()
                .any(|r| r.severity != Severity::Low && r.fires(&input));
            if !raised {
                return None;
            }
        }
        let s = self.score(f, false);
        (s.decision != Decision::Allow).then_some(s)
    }

    /// The model's score alone: the fast path for evaluation.
    pub fn raw_score(&self, f: &Features) -> f64 {
        let x = &self.row(f);
        match (&self.model.body, &self.fast) {
            (Body::Gbt(m), Some(c)) => return 1.0 / (1.0 + (-(m.base_margin + c.sum(x))).exp()),
            (Body::Forest(m), Some(c)) => return c.sum(x) / m.trees.len().max(1) as f64,
            (Body::Iforest(m), Some(c)) => return m.score_from_paths(c.sum(x)),
            _ => {}
        }
        match &self.model.body {
            Body::Logistic(m) => m.score(x),
            Body::Forest(m) => m.score(x),
            Body::Gbt(m) => m.score(x),
            Body::Iforest(m) => m.score(x),
        }
    }

    /// The full score. Explanations are computed only when the decision is
    /// not `allow` or `explain` is set, since they cost more than the score.
    pub fn score(&self, f: &Features, explain: bool) -> Score {
        let score = self.raw_score(f);
        // Rules may read the anomaly score, and a threshold may alert on it:
        // only then is it needed for every transaction.
        let needs_anomaly = self.thresholds.anomaly_review.is_some() || self.rules_read_anomaly;
        let mut anomaly = if needs_anomaly { self.anomaly(f) } else { None };
        let input = RuleInput {
            features: &f.0,
            score,
            anomaly: anomaly.unwrap_or(0.0),
        };
        let rules: Vec<RuleHit> = self
            .rules
            .rules
            .iter()
            .filter(|r| r.fires(&input))
            .map(|r| RuleHit {
                rule: r.name.clone(),
                severity: r.severity,
            })
            .collect();
        let t = &self.thresholds;
        // A score that is not a number fails closed: never `allow`.
        let mut decision = if !score.is_finite() {
            Decision::Review
        } else if score >= t.block {
            Decision::Block
        } else if score >= t.review {
            Decision::Review
        } else {
            Decision::Allow
        };
        let anomalous = decision == Decision::Allow
            && matches!((anomaly, t.anomaly_review), (Some(a), Some(limit)) if a >= limit);
        if anomalous {
            decision = Decision::Review;
        }
        for r in &rules {
            decision = decision.max(match r.severity {
                Severity::High => Decision::Block,
                Severity::Medium => Decision::Review,
                Severity::Low => Decision::Allow,
            });
        }
        if anomaly.is_none() && (explain || decision != Decision::Allow) {
            anomaly = self.anomaly(f);
        }
        let top_features = if explain || decision != Decision::Allow {
            self.explain(f, anomalous)
        } else {
            Vec::new()
        };
        Score {
            score,
            anomaly,
            decision,
            reasons: Reasons {
                top_features,
                rules,
                anomalous,
            },
        }
    }

    /// The anomaly score of the forest trained alongside the model, if any.
    pub fn anomaly(&self, f: &Features) -> Option<f64> {
        let a = self.model.anomaly.as_ref()?;
        let x = &self.row(f);
        Some(match &self.fast_anomaly {
            Some(c) => a.score_from_paths(c.sum(x)),
            None => a.score(x),
        })
    }

    /// The features that contributed most, by absolute contribution.
    pub fn explain(&self, f: &Features, from_anomaly: bool) -> Vec<Contribution> {
        let x = &self.row(f);
        let mut c = [0f64; MAX_COLUMNS];
        let c = &mut c[..x.len()];
        match (&self.model.body, &self.model.anomaly) {
            (_, Some(a)) if from_anomaly => a.contributions(x, c),
            (Body::Logistic(m), _) => m.contributions(x, c),
            (Body::Forest(m), _) => m.contributions(x, c),
            (Body::Gbt(m), _) => m.contributions(x, c),
            (Body::Iforest(m), _) => m.contributions(x, c),
        }
        let mut order: Vec<usize> = (0..x.len()).filter(|&i| c[i] != 0.0).collect();
        order.sort_by(|&a, &b| c[b].abs().total_cmp(&c[a].abs()));
        order
            .into_iter()
            .take(TOP_FEATURES)
            .map(|i| Contribution {
                feature: self.names[i].clone(),
                value: x[i],
                contribution: c[i],
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{Engine, FeatureConfig};
    use crate::ingest::Transaction;
    use crate::sim::{SimConfig, Simulation};

    /// A score that is not a number (a corrupt model) fails closed.
    #[test]
    fn a_score_that_is_not_a_number_is_never_allowed() {
        use crate::features::{Features, N_FEATURES};
        use crate::model::Body;
        use crate::model::logistic::{Logistic, Scaling};
        let with_weight = |w: f64| {
            let mut model = super::super::builtin::scorer().unwrap().model.clone();
            let x = vec![1.0f32; 2 * N_FEATURES];
            model.body = Body::Logistic(Logistic {
                scaling: Scaling::fit(&x, N_FEATURES),
                weights: vec![w; N_FEATURES],
                intercept: -10.0,
            });
            model.anomaly = None;
            Scorer::new(model, RuleSet::default())
        };
        let f = Features::default();
        assert_eq!(with_weight(0.1).score(&f, false).decision, Decision::Allow);
        let s = with_weight(f64::NAN).score(&f, false);
        assert!(s.score.is_nan());
        assert_eq!(s.decision, Decision::Review);
    }

    /// `alert` is `score` without the allows, whether or not its tree walk
    /// stopped early: same alerts, same scores to the bit.
    #[test]
    fn alerts_are_the_scores_that_are_not_allowed() {
        let scorer = super::super::builtin::scorer().unwrap();
        assert!(
            scorer.allow_below.is_some(),
            "the built-in model stops early"
        );
        let sim = Simulation::run(SimConfig {
            customers: 300,
            terminals: 600,
            days: 40,
            seed: 11,
            ..SimConfig::default()
        });
        let mut engine = Engine::new(FeatureConfig::default());
        let mut tx = Transaction::default();
        let (mut alerts, mut allowed) = (0, 0);
        for i in 0..sim.transactions.len() {
            sim.fill(i, &mut tx);
            let f = engine.process(&tx).unwrap();
            let full = scorer.score(&f, false);
            match scorer.alert(&f) {
                Some(s) => {
                    assert_eq!(s, full);
                    alerts += 1;
                }
                None => {
                    assert_eq!(full.decision, Decision::Allow);
                    allowed += 1;
                }
            }
        }
        assert!(
            alerts > 50 && allowed > 10_000,
            "{alerts} alerts, {allowed} allowed"
        );
    }
}
