//! A small search for the gradient-boosted trees' rounds, depth and
//! learning rate, on a validation period that follows the fitting period in
//! time, as the model will meet the future: a long training window then
//! gets the capacity it can use instead of the defaults chosen for a short
//! one.

use super::trees::{Gbt, GbtParams};
use crate::evaluate::average_precision;
use serde::Serialize;

/// What the search may vary; a dimension the user fixed holds one value.
#[derive(Debug, Clone)]
pub struct Grid {
    pub depths: Vec<usize>,
    pub learning_rates: Vec<f64>,
    /// Rounds are read off one fit of the largest count, at each of these.
    pub rounds: Vec<usize>,
}

impl Grid {
    /// The default search: depths 4 and 6, learning rates 0.05 and 0.15,
    /// 25 to 300 rounds; `Some` fixes a dimension to the user's value.
    pub fn new(depth: Option<usize>, learning_rate: Option<f64>, rounds: Option<usize>) -> Grid {
        Grid {
            depths: depth.map_or_else(|| vec![4, 6], |d| vec![d]),
            learning_rates: learning_rate.map_or_else(|| vec![0.05, 0.15], |r| vec![r]),
            rounds: rounds.map_or_else(|| (1..=12).map(|k| 25 * k).collect(), |n| vec![n]),
        }
    }
}

/// One point of the grid and its validation average precision.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Trial {
    pub max_depth: usize,
    pub learning_rate: f64,
    pub rounds: usize,
    pub average_precision: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TuneReport {
    pub fit_rows: usize,
    pub validation_rows: usize,
    pub validation_frauds: usize,
    pub best: Trial,
    pub trials: Vec<Trial>,
}

/// Fits every depth and learning rate of `grid` on the fitting rows, scores
/// the validation rows after each count of rounds, and returns the
/// parameters with the best validation AP (the fewest rounds among equals).
pub fn tune(
    fit: (&[f32], &[u8]),
    validation: (&[f32], &[u8]),
    cols: usize,
    base: &GbtParams,
    grid: &Grid,
) -> (GbtParams, TuneReport) {
    let (xv, yv) = validation;
    let most = grid.rounds.iter().copied().max().unwrap_or(base.rounds);
    let mut trials = Vec::new();
    for &depth in &grid.depths {
        for &rate in &grid.learning_rates {
            let mut p = *base;
            p.rounds = most;
            p.learning_rate = rate;
            p.tree.max_depth = depth;
            let model = Gbt::train(fit.0, fit.1, cols, &p);
            let mut margin = vec![model.base_margin; yv.len()];
            for (k, tree) in model.trees.iter().enumerate() {
                for (m, row) in margin.iter_mut().zip(xv.chunks_exact(cols)) {
                    *m += tree.predict(row) as f64;
                }
                if grid.rounds.contains(&(k + 1)) {
                    trials.push(Trial {
                        max_depth: depth,
                        learning_rate: rate,
                        rounds: k + 1,
                        average_precision: average_precision(&margin, yv),
                    });
                }
            }
        }
    }
    let best = *trials
        .iter()
        .filter(|t| !t.average_precision.is_nan())
        .max_by(|a, b| {
            a.average_precision
                .total_cmp(&b.average_precision)
                .then(b.rounds.cmp(&a.rounds))
        })
        .unwrap_or(&Trial {
            max_depth: base.tree.max_depth,
            learning_rate: base.learning_rate,
            rounds: base.rounds,
            average_precision: f64::NAN,
        });
    let mut chosen = *base;
    chosen.rounds = best.rounds;
    chosen.learning_rate = best.learning_rate;
    chosen.tree.max_depth = best.max_depth;
    let report = TuneReport {
        fit_rows: fit.1.len(),
        validation_rows: yv.len(),
        validation_frauds: yv.iter().filter(|&&v| v == 1).count(),
        best,
        trials,
    };
    (chosen, report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// On data whose signal needs interactions and many rounds, the search
    /// leaves the smallest grid point and reports every trial.
    #[test]
    fn the_search_picks_capacity_the_validation_rewards() {
        let mut rng = Rng::new(3);
        let cols = 3;
        let mut make = |n: usize| {
            let mut x = Vec::with_capacity(n * cols);
            let mut y = Vec::with_capacity(n);
            for _ in 0..n {
                let (a, b, c) = (rng.f64(), rng.f64(), rng.f64());
                x.extend([a as f32, b as f32, c as f32]);
                let p = if (a > 0.5) ^ (b > 0.5) && c > 0.3 {
                    0.6
                } else {
                    0.02
                };
                y.push(u8::from(rng.f64() < p));
            }
            (x, y)
        };
        let (xf, yf) = make(4000);
        let (xv, yv) = make(2000);
        let grid = Grid {
            depths: vec![1, 3],
            learning_rates: vec![0.1],
            rounds: vec![5, 40],
        };
        let (chosen, report) = tune((&xf, &yf), (&xv, &yv), cols, &GbtParams::default(), &grid);
        assert_eq!(report.trials.len(), 4);
        // Depth 1 cannot express an exclusive-or; depth 3 can.
        assert_eq!(chosen.tree.max_depth, 3, "{report:?}");
        let shallow = report.trials.iter().filter(|t| t.max_depth == 1);
        assert!(
            shallow
                .clone()
                .all(|t| t.average_precision < report.best.average_precision)
        );
        assert_eq!(chosen.rounds, report.best.rounds);
    }

    #[test]
    fn fixed_dimensions_hold_one_value() {
        let g = Grid::new(Some(5), None, Some(80));
        assert_eq!(g.depths, vec![5]);
        assert_eq!(g.rounds, vec![80]);
        assert_eq!(g.learning_rates.len(), 2);
    }
}
