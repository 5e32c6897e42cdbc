//! An isolation forest (Liu, Ting & Zhou 2008): linfa has none. Anomalies
//! are isolated by fewer random splits, so a short mean path is a high score.

use super::trees::{Compiled, LEAF, Tree};
use crate::rng::Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IsolationForest {
    /// Indices of the features the forest looks at.
    pub features: Vec<usize>,
    pub sample_size: usize,
    /// Trees whose leaf `value` is the number of training points that reached it.
    pub trees: Vec<Tree>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct IsolationParams {
    pub trees: usize,
    pub sample_size: usize,
    pub seed: u64,
}

impl Default for IsolationParams {
    fn default() -> Self {
        IsolationParams {
            trees: 100,
            sample_size: 256,
            seed: 1,
        }
    }
}

/// Average path length of an unsuccessful search in a binary search tree of n points.
fn c(n: f64) -> f64 {
    if n <= 1.0 {
        0.0
    } else if n < 2.5 {
        1.0
    } else {
        2.0 * ((n - 1.0).ln() + 0.577_215_664_9) - 2.0 * (n - 1.0) / n
    }
}

impl IsolationForest {
    pub fn train(
        x: &[f32],
        cols: usize,
        features: Vec<usize>,
        p: &IsolationParams,
    ) -> IsolationForest {
        let rows = x.len() / cols;
        let mut rng = Rng::new(p.seed);
        let size = p.sample_size.min(rows).max(2);
        let limit = (size as f64).log2().ceil() as usize;
        let trees = (0..p.trees)
            .map(|_| {
                let sample: Vec<usize> = if rows == 0 {
                    Vec::new()
                } else {
                    rng.sample(rows, size)
                };
                let mut tree = Tree::default();
                grow(&mut tree, x, cols, &features, sample, 0, limit, &mut rng);
                tree
            })
            .collect();
        IsolationForest {
            features,
            sample_size: size,
            trees,
        }
    }

    fn path(&self, t: &Tree, x: &[f32], visit: &mut impl FnMut(usize)) -> f64 {
        let mut i = 0;
        let mut depth = 0.0;
        while t.feature[i] != LEAF {
            let f = t.feature[i] as usize;
            visit(f);
            i = if x[f] <= t.threshold[i] {
                t.left[i]
            } else {
                t.right[i]
            } as usize;
            depth += 1.0;
        }
        depth + c(t.value[i] as f64)
    }

    /// The forest in the fast layout, each leaf holding its path length.
    pub fn compile(&self) -> Option<Compiled> {
        let trees: Vec<Tree> = self
            .trees
            .iter()
            .map(|t| {
                let mut t = t.clone();
                let mut stack = vec![(0usize, 0.0f64)];
                while let Some((i, depth)) = stack.pop() {
                    if t.feature[i] == LEAF {
                        t.value[i] = (depth + c(t.value[i] as f64)) as f32;
                    } else {
                        stack.push((t.left[i] as usize, depth + 1.0));
                        stack.push((t.right[i] as usize, depth + 1.0));
                    }
                }
                t
            })
            .collect();
        Compiled::new(&trees)
    }

    /// The score from the summed path lengths of a compiled forest.
    pub fn score_from_paths(&self, total: f64) -> f64 {
        let mean = total / self.trees.len().max(1) as f64;
        2f64.powf(-mean / c(self.sample_size as f64))
    }

    /// The anomaly score in (0, 1); about 0.5 is ordinary, near 1 is anomalous.
    pub fn score(&self, x: &[f32]) -> f64 {
        let mean = self
            .trees
            .iter()
            .map(|t| self.path(t, x, &mut |_| {}))
            .sum::<f64>()
            / self.trees.len().max(1) as f64;
        2f64.powf(-mean / c(self.sample_size as f64))
    }

    /// How much each feature took part in isolating `x`: each split on the
    /// path counts 1 / path length, averaged over trees, scaled by the score.
    pub fn contributions(&self, x: &[f32], out: &mut [f64]) {
        let mut counts = vec![0.0; out.len()];
        let score = self.score(x);
        for t in &self.trees {
            let mut used = Vec::new();
            let len = self.path(t, x, &mut |f| used.push(f)).max(1.0);
            for f in used {
                counts[f] += 1.0 / len;
            }
        }
        let n = self.trees.len().max(1) as f64;
        for (o, c) in out.iter_mut().zip(counts) {
            *o += c / n * score;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn grow(
    tree: &mut Tree,
    x: &[f32],
    cols: usize,
    features: &[usize],
    rows: Vec<usize>,
    depth: usize,
    limit: usize,
    rng: &mut Rng,
) -> usize {
    let node = tree.feature.len();
    tree.feature.push(LEAF);
    tree.threshold.push(0.0);
    tree.left.push(0);
    tree.right.push(0);
    tree.value.push(rows.len() as f32);
    if depth >= limit || rows.len() <= 1 {
        return node;
    }
    // Try features in random order until one still varies among these rows.
    for f in rng
        .sample(features.len(), features.len())
        .into_iter()
        .map(|k| features[k])
    {
        let (lo, hi) = rows
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &r| {
                let v = x[r * cols + f];
                (lo.min(v), hi.max(v))
            });
        if hi <= lo {
            continue;
        }
        let mut split = rng.uniform(lo as f64, hi as f64) as f32;
        if split >= hi {
            split = lo;
        }
        let (l, r): (Vec<usize>, Vec<usize>) =
            rows.iter().partition(|&&r| x[r * cols + f] <= split);
        tree.feature[node] = f as u16;
        tree.threshold[node] = split;
        let li = grow(tree, x, cols, features, l, depth + 1, limit, rng);
        let ri = grow(tree, x, cols, features, r, depth + 1, limit, rng);
        tree.left[node] = li as u32;
        tree.right[node] = ri as u32;
        return node;
    }
    node
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outliers_score_higher() {
        let mut rng = Rng::new(3);
        let mut x = Vec::new();
        for _ in 0..2000 {
            x.extend([rng.normal(0.0, 1.0) as f32, rng.normal(0.0, 1.0) as f32]);
        }
        let m = IsolationForest::train(&x, 2, vec![0, 1], &IsolationParams::default());
        let normal = m.score(&[0.1, -0.2]);
        let outlier = m.score(&[8.0, 0.0]);
        let fast = m.compile().unwrap();
        for x in [[0.1f32, -0.2], [8.0, 0.0], [-3.0, 2.5]] {
            assert!((m.score_from_paths(fast.sum(&x)) - m.score(&x)).abs() < 1e-6);
        }
        assert!(outlier > 0.65 && normal < 0.5, "{outlier} {normal}");
        let mut c = [0.0; 2];
        m.contributions(&[8.0, 0.0], &mut c);
        assert!(c[0] > c[1], "{c:?}");
        for t in &m.trees {
            t.validate(2).unwrap();
        }
    }
}
