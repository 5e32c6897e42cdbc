//! Logistic regression, fitted by linfa-logistic on scaled features.

use linfa::prelude::*;
use linfa_logistic::LogisticRegression;
use ndarray::{Array1, Array2};
use serde::{Deserialize, Serialize};

/// Per-feature scaling: `log1p` for non-negative heavy-tailed features,
/// then standardisation, so the optimiser sees comparable columns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scaling {
    pub log1p: Vec<bool>,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl Scaling {
    pub fn fit(x: &[f32], cols: usize) -> Scaling {
        let rows = (x.len() / cols).max(1);
        let mut log1p = vec![true; cols];
        for r in x.chunks_exact(cols) {
            for (c, v) in r.iter().enumerate() {
                if *v < 0.0 {
                    log1p[c] = false;
                }
            }
        }
        let mut mean = vec![0.0; cols];
        let mut sq = vec![0.0; cols];
        for r in x.chunks_exact(cols) {
            for c in 0..cols {
                let v = transform(r[c], log1p[c]);
                mean[c] += v;
                sq[c] += v * v;
            }
        }
        let std = (0..cols)
            .map(|c| {
                mean[c] /= rows as f64;
                (sq[c] / rows as f64 - mean[c] * mean[c])
                    .max(0.0)
                    .sqrt()
                    .max(1e-9)
            })
            .collect();
        Scaling { log1p, mean, std }
    }

    #[inline]
    pub fn apply(&self, c: usize, v: f32) -> f64 {
        (transform(v, self.log1p[c]) - self.mean[c]) / self.std[c]
    }
}

fn transform(v: f32, log: bool) -> f64 {
    if log {
        (v.max(0.0) as f64).ln_1p()
    } else {
        v as f64
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Logistic {
    pub scaling: Scaling,
    pub weights: Vec<f64>,
    pub intercept: f64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct LogisticParams {
    /// L2 penalty.
    pub alpha: f64,
    pub max_iterations: u64,
}

impl Default for LogisticParams {
    fn default() -> Self {
        LogisticParams {
            alpha: 1.0,
            max_iterations: 200,
        }
    }
}

impl Logistic {
    pub fn train(x: &[f32], y: &[u8], cols: usize, p: &LogisticParams) -> anyhow::Result<Logistic> {
        let scaling = Scaling::fit(x, cols);
        let rows = x.len() / cols;
        let records =
            Array2::from_shape_fn((rows, cols), |(r, c)| scaling.apply(c, x[r * cols + c]));
        let targets: Array1<bool> = y.iter().map(|&v| v == 1).collect();
        if targets.iter().all(|&t| t) || targets.iter().all(|&t| !t) {
            anyhow::bail!(
                "the training window holds only one class; logistic regression needs both"
            );
        }
        let fitted = LogisticRegression::default()
            .alpha(p.alpha)
            .max_iterations(p.max_iterations)
            .fit(&Dataset::new(records, targets))?;
        // linfa's positive class is the more frequent label, so with rare
        // fraud the fitted sign has to be turned around.
        let sign = if fitted.labels().pos.class { 1.0 } else { -1.0 };
        Ok(Logistic {
            scaling,
            weights: fitted.params().iter().map(|w| sign * w).collect(),
            intercept: sign * fitted.intercept(),
        })
    }

    pub fn margin(&self, x: &[f32]) -> f64 {
        self.intercept
            + x.iter()
                .enumerate()
                .map(|(c, &v)| self.weights[c] * self.scaling.apply(c, v))
                .sum::<f64>()
    }

    pub fn score(&self, x: &[f32]) -> f64 {
        1.0 / (1.0 + (-self.margin(x)).exp())
    }

    /// Contributions in log-odds, relative to a feature at its training mean.
    pub fn contributions(&self, x: &[f32], out: &mut [f64]) {
        for (c, &v) in x.iter().enumerate() {
            out[c] += self.weights[c] * self.scaling.apply(c, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn learns_a_linear_boundary() {
        let mut rng = Rng::new(5);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for _ in 0..3000 {
            let a = rng.normal(0.0, 1.0) as f32;
            let b = rng.normal(0.0, 1.0) as f32;
            x.extend([a, b]);
            y.push(u8::from(2.0 * a - b + rng.normal(0.0, 0.3) as f32 > 1.0));
        }
        let m = Logistic::train(
            &x,
            &y,
            2,
            &LogisticParams {
                alpha: 0.01,
                max_iterations: 200,
            },
        )
        .unwrap();
        assert!(m.weights[0] > 0.0 && m.weights[1] < 0.0, "{:?}", m.weights);
        assert!(m.score(&[2.0, -1.0]) > 0.9);
        assert!(m.score(&[-2.0, 1.0]) < 0.1);
        let mut c = [0.0; 2];
        m.contributions(&[2.0, -1.0], &mut c);
        assert!((m.intercept + c[0] + c[1] - m.margin(&[2.0, -1.0])).abs() < 1e-9);
    }
}
