//! Tree ensembles: gradient-boosted trees (logistic loss) and a random
//! forest, both grown by one histogram-based tree builder, and stored as
//! flat node arrays so that they serialize and evaluate fast.

use crate::rng::Rng;
use serde::{Deserialize, Serialize};

/// One tree as parallel arrays; node 0 is the root. A leaf has `feature`
/// equal to [`LEAF`]. Every node keeps its value so that a prediction can be
/// split into per-feature contributions along its path.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tree {
    pub feature: Vec<u16>,
    pub threshold: Vec<f32>,
    pub left: Vec<u32>,
    pub right: Vec<u32>,
    pub value: Vec<f32>,
}

pub const LEAF: u16 = u16::MAX;

impl Tree {
    pub fn len(&self) -> usize {
        self.feature.len()
    }

    pub fn is_empty(&self) -> bool {
        self.feature.is_empty()
    }

    fn push(&mut self, value: f32) -> usize {
        self.feature.push(LEAF);
        self.threshold.push(0.0);
        self.left.push(0);
        self.right.push(0);
        self.value.push(value);
        self.feature.len() - 1
    }

    #[inline]
    pub fn predict(&self, x: &[f32]) -> f32 {
        let mut i = 0usize;
        loop {
            let f = self.feature[i];
            if f == LEAF {
                return self.value[i];
            }
            i = if x[f as usize] <= self.threshold[i] {
                self.left[i]
            } else {
                self.right[i]
            } as usize;
        }
    }

    /// Adds each split's change in value to its feature (Saabas attribution);
    /// returns the root value, the part no feature explains.
    pub fn contribute(&self, x: &[f32], out: &mut [f64], scale: f64) -> f64 {
        let mut i = 0usize;
        loop {
            let f = self.feature[i];
            if f == LEAF {
                return self.value[0] as f64 * scale;
            }
            let next = if x[f as usize] <= self.threshold[i] {
                self.left[i]
            } else {
                self.right[i]
            } as usize;
            out[f as usize] += (self.value[next] - self.value[i]) as f64 * scale;
            i = next;
        }
    }

    /// Checks the structure, so a hand-edited or corrupt file fails at load
    /// rather than looping or indexing out of bounds at scoring time.
    pub fn validate(&self, n_features: usize) -> Result<(), String> {
        let n = self.feature.len();
        if n == 0 {
            return Err("a tree has no nodes".into());
        }
        if [
            self.threshold.len(),
            self.left.len(),
            self.right.len(),
            self.value.len(),
        ]
        .iter()
        .any(|&l| l != n)
        {
            return Err("a tree's node arrays differ in length".into());
        }
        for i in 0..n {
            let f = self.feature[i];
            if f == LEAF {
                continue;
            }
            if f as usize >= n_features {
                return Err(format!(
                    "node {i} splits on feature {f}, but there are {n_features}"
                ));
            }
            let (l, r) = (self.left[i] as usize, self.right[i] as usize);
            if l <= i || r <= i || l >= n || r >= n {
                return Err(format!("node {i} has children out of order"));
            }
        }
        Ok(())
    }
}

/// Features quantised into at most 256 bins, column by column.
pub struct Binned {
    pub rows: usize,
    pub cols: usize,
    bins: Vec<u8>,
    /// Upper edge of each bin but the last: bin b holds x ≤ edges[b].
    edges: Vec<Vec<f32>>,
}

impl Binned {
    /// Up to 255 edges per feature: quantiles of all rows, quantiles of the
    /// positive rows (fraud is rare, so plain quantiles leave the values where
    /// it lives in a few wide bins: an amount limit would blur), and edges
    /// evenly spaced on a log scale for the sparse tails.
    pub fn new(x: &[f32], cols: usize, labels: Option<&[u8]>) -> Binned {
        let rows = x.len() / cols;
        let mut bins = vec![0u8; rows * cols];
        let mut edges = Vec::with_capacity(cols);
        let step = (rows / 200_000).max(1);
        let quantiles = |mut v: Vec<f32>, k: usize| -> Vec<f32> {
            v.sort_by(f32::total_cmp);
            v.dedup();
            if v.len() <= k {
                return v;
            }
            (1..k).map(|i| v[i * v.len() / k]).collect()
        };
        for c in 0..cols {
            let all: Vec<f32> = (0..rows).step_by(step).map(|r| x[r * cols + c]).collect();
            let mut distinct = all.clone();
            distinct.sort_by(f32::total_cmp);
            distinct.dedup();
            let e: Vec<f32> = if distinct.len() <= 255 {
                distinct[..distinct.len().saturating_sub(1)].to_vec()
            } else {
                let squash = |v: f32| (v.abs() as f64).ln_1p().copysign(v as f64);
                let unsquash = |s: f64| (s.abs().exp_m1().copysign(s)) as f32;
                let (lo, hi) = (squash(distinct[0]), squash(distinct[distinct.len() - 1]));
                let mut e = quantiles(all, 128);
                if let Some(y) = labels {
                    let pos: Vec<f32> = (0..rows)
                        .filter(|&r| y[r] == 1)
                        .map(|r| x[r * cols + c])
                        .collect();
                    e.extend(quantiles(pos, 64));
                }
                e.extend((1..64).map(|k| unsquash(lo + (hi - lo) * k as f64 / 64.0)));
                e.sort_by(f32::total_cmp);
                e.dedup();
                // The last edge must stay below the largest value or its bin is empty.
                e.retain(|&v| v < distinct[distinct.len() - 1]);
                e.truncate(255);
                e
            };
            for r in 0..rows {
                bins[c * rows + r] = e.partition_point(|&edge| edge < x[r * cols + c]) as u8;
            }
            edges.push(e);
        }
        Binned {
            rows,
            cols,
            bins,
            edges,
        }
    }

    #[inline]
    fn bin(&self, col: usize, row: u32) -> u8 {
        self.bins[col * self.rows + row as usize]
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct TreeParams {
    pub max_depth: usize,
    /// Least sum of weights (hessians) in a child.
    pub min_child_weight: f64,
    pub lambda: f64,
    pub min_gain: f64,
    /// Share of features tried at each node.
    pub feature_fraction: f64,
}

#[derive(Clone, Copy, Default)]
struct Bin {
    g: f64,
    h: f64,
}

struct Pending {
    node: usize,
    start: usize,
    end: usize,
    depth: usize,
    hist: Option<Vec<Bin>>,
    g: f64,
    h: f64,
}

/// Grows one tree on targets `g` with weights `h` over `rows`: each leaf
/// predicts Σg / (Σh + λ), times `scale`.
pub fn grow(
    data: &Binned,
    g: &[f32],
    h: &[f32],
    mut rows: Vec<u32>,
    p: &TreeParams,
    scale: f64,
    rng: &mut Rng,
) -> Tree {
    let cols = data.cols;
    let mut tree = Tree::default();
    let (g0, h0) = rows.iter().fold((0.0, 0.0), |(a, b), &r| {
        (a + g[r as usize] as f64, b + h[r as usize] as f64)
    });
    let leaf_value = |g: f64, h: f64| (g / (h + p.lambda) * scale) as f32;
    let root = tree.push(leaf_value(g0, h0));
    let all_features = p.feature_fraction >= 1.0;
    let mut stack = vec![Pending {
        node: root,
        start: 0,
        end: rows.len(),
        depth: 0,
        hist: None,
        g: g0,
        h: h0,
    }];
    while let Some(n) = stack.pop() {
        if n.depth >= p.max_depth || n.h < 2.0 * p.min_child_weight {
            continue;
        }
        let features: Vec<usize> = if all_features {
            (0..cols).collect()
        } else {
            let k = ((cols as f64 * p.feature_fraction).ceil() as usize).clamp(1, cols);
            rng.sample(cols, k)
        };
        let hist = match n.hist {
            Some(h) => h,
            None => histogram(data, g, h, &rows[n.start..n.end], &features),
        };
        let parent_score = n.g * n.g / (n.h + p.lambda);
        let mut best: Option<(f64, usize, usize, f64, f64)> = None;
        for &f in &features {
            let hf = &hist[f * 256..f * 256 + 256];
            let (mut gl, mut hl) = (0.0, 0.0);
            for (b, bin) in hf.iter().enumerate().take(data.edges[f].len()) {
                gl += bin.g;
                hl += bin.h;
                let (gr, hr) = (n.g - gl, n.h - hl);
                if hl < p.min_child_weight || hr < p.min_child_weight {
                    continue;
                }
                let gain = gl * gl / (hl + p.lambda) + gr * gr / (hr + p.lambda) - parent_score;
                if gain > p.min_gain && best.is_none_or(|b| gain > b.0) {
                    best = Some((gain, f, b, gl, hl));
                }
            }
        }
        let Some((_, f, b, gl, hl)) = best else {
            continue;
        };
        let slice = &mut rows[n.start..n.end];
        let mut mid = 0;
        for i in 0..slice.len() {
            if data.bin(f, slice[i]) as usize <= b {
                slice.swap(i, mid);
                mid += 1;
            }
        }
        let mid = n.start + mid;
        let (gr, hr) = (n.g - gl, n.h - hl);
        let l = tree.push(leaf_value(gl, hl));
        let r = tree.push(leaf_value(gr, hr));
        tree.feature[n.node] = f as u16;
        tree.threshold[n.node] = data.edges[f][b];
        tree.left[n.node] = l as u32;
        tree.right[n.node] = r as u32;
        // The subtraction trick: build the smaller child's histogram and
        // derive the larger one from the parent's. It needs the same feature
        // set in parent and children, so only when all features are tried.
        let (lh, rh) = if all_features && n.depth + 1 < p.max_depth {
            let left_small = mid - n.start <= n.end - mid;
            let small = if left_small {
                &rows[n.start..mid]
            } else {
                &rows[mid..n.end]
            };
            let sh = histogram(data, g, h, small, &features);
            let big: Vec<Bin> = hist
                .iter()
                .zip(&sh)
                .map(|(a, b)| Bin {
                    g: a.g - b.g,
                    h: a.h - b.h,
                })
                .collect();
            if left_small {
                (Some(sh), Some(big))
            } else {
                (Some(big), Some(sh))
            }
        } else {
            (None, None)
        };
        stack.push(Pending {
            node: l,
            start: n.start,
            end: mid,
            depth: n.depth + 1,
            hist: lh,
            g: gl,
            h: hl,
        });
        stack.push(Pending {
            node: r,
            start: mid,
            end: n.end,
            depth: n.depth + 1,
            hist: rh,
            g: gr,
            h: hr,
        });
    }
    tree
}

fn histogram(data: &Binned, g: &[f32], h: &[f32], rows: &[u32], features: &[usize]) -> Vec<Bin> {
    let mut hist = vec![Bin::default(); data.cols * 256];
    for &f in features {
        let hf = &mut hist[f * 256..f * 256 + 256];
        let col = &data.bins[f * data.rows..(f + 1) * data.rows];
        for &r in rows {
            let b = &mut hf[col[r as usize] as usize];
            b.g += g[r as usize] as f64;
            b.h += h[r as usize] as f64;
        }
    }
    hist
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Gradient-boosted trees with logistic loss; the score is sigmoid(margin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gbt {
    pub base_margin: f64,
    pub trees: Vec<Tree>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct GbtParams {
    pub rounds: usize,
    pub learning_rate: f64,
    pub subsample: f64,
    pub tree: TreeParams,
    pub seed: u64,
}

impl Default for GbtParams {
    fn default() -> Self {
        GbtParams {
            rounds: 100,
            learning_rate: 0.15,
            subsample: 0.8,
            tree: TreeParams {
                max_depth: 4,
                min_child_weight: 1.0,
                lambda: 1.0,
                min_gain: 0.0,
                feature_fraction: 1.0,
            },
            seed: 1,
        }
    }
}

impl Gbt {
    pub fn train(x: &[f32], y: &[u8], cols: usize, p: &GbtParams) -> Gbt {
        let data = Binned::new(x, cols, Some(y));
        let n = data.rows;
        let pos = y.iter().filter(|&&v| v == 1).count() as f64;
        let prior = ((pos + 0.5) / (n as f64 + 1.0)).clamp(1e-6, 1.0 - 1e-6);
        let base = (prior / (1.0 - prior)).ln();
        let mut margin = vec![base; n];
        let mut g = vec![0f32; n];
        let mut h = vec![0f32; n];
        let mut rng = Rng::new(p.seed);
        let mut trees = Vec::with_capacity(p.rounds);
        for _ in 0..p.rounds {
            for i in 0..n {
                let q = sigmoid(margin[i]);
                g[i] = (y[i] as f64 - q) as f32;
                h[i] = (q * (1.0 - q)).max(1e-6) as f32;
            }
            let rows: Vec<u32> = (0..n as u32).filter(|_| rng.f64() < p.subsample).collect();
            let tree = grow(&data, &g, &h, rows, &p.tree, p.learning_rate, &mut rng);
            for (i, m) in margin.iter_mut().enumerate() {
                *m += tree.predict(&x[i * cols..(i + 1) * cols]) as f64;
            }
            trees.push(tree);
        }
        Gbt {
            base_margin: base,
            trees,
        }
    }

    pub fn margin(&self, x: &[f32]) -> f64 {
        self.base_margin + self.trees.iter().map(|t| t.predict(x) as f64).sum::<f64>()
    }

    pub fn score(&self, x: &[f32]) -> f64 {
        sigmoid(self.margin(x))
    }

    /// Contributions in log-odds.
    pub fn contributions(&self, x: &[f32], out: &mut [f64]) {
        for t in &self.trees {
            t.contribute(x, out, 1.0);
        }
    }
}

/// A random forest: trees on bootstrap samples, a random subset of features
/// at each split; the score is the mean of the leaves' fraud shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forest {
    pub trees: Vec<Tree>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ForestParams {
    pub trees: usize,
    pub tree: TreeParams,
    pub seed: u64,
}

impl Default for ForestParams {
    fn default() -> Self {
        ForestParams {
            trees: 100,
            tree: TreeParams {
                max_depth: 10,
                min_child_weight: 10.0,
                lambda: 0.0,
                min_gain: 1e-3,
                feature_fraction: 0.35,
            },
            seed: 1,
        }
    }
}

impl Forest {
    pub fn train(x: &[f32], y: &[u8], cols: usize, p: &ForestParams) -> Forest {
        let data = Binned::new(x, cols, Some(y));
        let n = data.rows;
        let mut rng = Rng::new(p.seed);
        let mut g = vec![0f32; n];
        let mut h = vec![0f32; n];
        let trees = (0..p.trees)
            .map(|_| {
                let mut rows = Vec::with_capacity(n);
                for i in 0..n {
                    // Poisson(1) weights are the bootstrap without copying rows.
                    let w = rng.poisson(1.0) as f32;
                    g[i] = w * y[i] as f32;
                    h[i] = w;
                    if w > 0.0 {
                        rows.push(i as u32);
                    }
                }
                grow(&data, &g, &h, rows, &p.tree, 1.0, &mut rng)
            })
            .collect();
        Forest { trees }
    }

    pub fn score(&self, x: &[f32]) -> f64 {
        self.trees.iter().map(|t| t.predict(x) as f64).sum::<f64>() / self.trees.len().max(1) as f64
    }

    /// Contributions in probability.
    pub fn contributions(&self, x: &[f32], out: &mut [f64]) {
        let s = 1.0 / self.trees.len().max(1) as f64;
        for t in &self.trees {
            t.contribute(x, out, s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// y = 1 when x0 > 0.5 and x1 < 0.3, with a little noise.
    fn data(n: usize, seed: u64) -> (Vec<f32>, Vec<u8>) {
        let mut rng = Rng::new(seed);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for _ in 0..n {
            let a = rng.f64() as f32;
            let b = rng.f64() as f32;
            let c = rng.f64() as f32;
            x.extend([a, b, c]);
            let truth = a > 0.5 && b < 0.3;
            y.push(u8::from(truth != (rng.f64() < 0.02)));
        }
        (x, y)
    }

    fn accuracy(score: impl Fn(&[f32]) -> f64) -> f64 {
        let (x, y) = data(2000, 99);
        let ok = y
            .iter()
            .enumerate()
            .filter(|&(i, &t)| (score(&x[i * 3..i * 3 + 3]) > 0.5) == (t == 1))
            .count();
        ok as f64 / y.len() as f64
    }

    #[test]
    fn gbt_learns_and_explains() {
        let (x, y) = data(5000, 1);
        let p = GbtParams {
            rounds: 60,
            learning_rate: 0.3,
            ..GbtParams::default()
        };
        let m = Gbt::train(&x, &y, 3, &p);
        assert!(accuracy(|r| m.score(r)) > 0.95);
        for t in &m.trees {
            t.validate(3).unwrap();
        }
        let row = [0.9f32, 0.1, 0.5];
        let mut c = [0.0; 3];
        m.contributions(&row, &mut c);
        let bias: f64 = m.base_margin + m.trees.iter().map(|t| t.value[0] as f64).sum::<f64>();
        assert!((bias + c.iter().sum::<f64>() - m.margin(&row)).abs() < 1e-3);
        assert!(c[0] > 0.0 && c[1] > 0.0 && c[2].abs() < c[0].min(c[1]));
    }

    #[test]
    fn forest_learns() {
        let (x, y) = data(5000, 2);
        let m = Forest::train(
            &x,
            &y,
            3,
            &ForestParams {
                trees: 30,
                ..ForestParams::default()
            },
        );
        assert!(accuracy(|r| m.score(r)) > 0.95);
    }

    #[test]
    fn corrupt_tree_is_rejected() {
        let mut t = Tree::default();
        let root = t.push(0.0);
        t.feature[root] = 0;
        t.left[root] = 0;
        assert!(t.validate(3).is_err());
    }
}

/// Trees laid out for scoring: each tree as a complete binary tree of fixed
/// depth (a leaf above that depth is padded with always-left nodes), so a
/// walk is `depth` branch-free steps, and eight trees walk side by side.
///
/// Each group of eight trees is stored as one heap: the trees' roots are
/// the eight nodes of the heap's fourth level, so every node's children,
/// in every tree, are at `2a + 1` and `2a + 2`. A step is then a load, a
/// compare and one address computation, with nothing else to keep per walk.
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    depth: u32,
    /// Per group, `2^(3 + depth)` slots as (threshold as an [`order_key`],
    /// feature); the top seven and the last are unused.
    nodes: Vec<(u32, u32)>,
    /// Per group, `2^(3 + depth)` leaf values, tree by tree.
    leaves: Vec<f32>,
    /// Per group, the most that it and the groups after it can add: a walk
    /// whose total cannot reach a limit stops early.
    most_from: Vec<f64>,
    max_feature: usize,
}

/// Deeper trees pad to too many nodes (a group of depth 10 takes 64 kB);
/// they keep the pointer walk.
pub const MAX_COMPILED_DEPTH: u32 = 10;
/// Trees walked side by side: eight independent walks in flight hide the
/// latency of each step.
const GROUP_LOG: u32 = 3;
const GROUP: usize = 1 << GROUP_LOG;

impl Tree {
    pub fn depth(&self) -> u32 {
        fn go(t: &Tree, i: usize) -> u32 {
            if t.feature[i] == LEAF {
                0
            } else {
                1 + go(t, t.left[i] as usize).max(go(t, t.right[i] as usize))
            }
        }
        if self.is_empty() { 0 } else { go(self, 0) }
    }

    /// The tree as a complete binary tree of `depth` levels, in level order:
    /// `2^depth − 1` nodes as (threshold, feature) and `2^depth` leaf values.
    fn complete(&self, depth: u32) -> (Vec<(f32, u32)>, Vec<f32>) {
        let inner = (1usize << depth) - 1;
        let mut nodes = vec![(f32::INFINITY, 0u32); inner];
        let mut leaves = vec![0.0f32; inner + 1];
        // (complete-tree slot, source node, level)
        let mut stack = vec![(0usize, 0usize, 0u32)];
        while let Some((slot, src, level)) = stack.pop() {
            if level == depth {
                leaves[slot - inner] = self.value[src];
                continue;
            }
            if self.feature[src] == LEAF {
                // Padding: always go left, and give every leaf below the value.
                let first = ((slot + 1) << (depth - level)) - 1 - inner;
                let n = 1usize << (depth - level);
                leaves[first..first + n].fill(self.value[src]);
                continue;
            }
            nodes[slot] = (self.threshold[src], self.feature[src] as u32);
            stack.push((2 * slot + 1, self.left[src] as usize, level + 1));
            stack.push((2 * slot + 2, self.right[src] as usize, level + 1));
        }
        (nodes, leaves)
    }
}

impl Compiled {
    pub fn new(trees: &[Tree]) -> Option<Compiled> {
        let depth = trees.iter().map(Tree::depth).max().unwrap_or(0).max(1);
        if depth > MAX_COMPILED_DEPTH {
            return None;
        }
        let heap = 1usize << (GROUP_LOG + depth);
        let groups = trees.len().div_ceil(GROUP);
        // Missing trees of the last group stay always-left with leaves of 0.
        let mut c = Compiled {
            depth,
            nodes: vec![(order_key(f32::INFINITY), 0); heap * groups],
            leaves: vec![0.0; heap * groups],
            most_from: vec![0.0; groups + 1],
            max_feature: 0,
        };
        // Trees that can add the most come first: the most the rest can add
        // then shrinks fastest, so that a sum that cannot reach a limit is
        // known sooner (see `sum_reaching`).
        let most = |t: &Tree| {
            (0..t.feature.len())
                .filter(|&i| t.feature[i] == LEAF)
                .map(|i| t.value[i])
                .fold(f32::NEG_INFINITY, f32::max)
        };
        let mut order: Vec<&Tree> = trees.iter().collect();
        order.sort_by(|a, b| most(b).total_cmp(&most(a)));
        for (k, t) in order.into_iter().enumerate() {
            let (g, j) = (k / GROUP, k % GROUP);
            let (nodes, leaves) = t.complete(depth);
            for (slot, &node) in nodes.iter().enumerate() {
                // Slot s is at level l = ⌊log2(s + 1)⌋, position s + 1 − 2^l;
                // in the heap, level 3 + l holds the eight trees' levels l
                // one after another.
                let level = (slot + 1).ilog2();
                let position = slot + 1 - (1 << level);
                let at = (1usize << (GROUP_LOG + level)) - 1 + (j << level) + position;
                c.nodes[g * heap + at] = (order_key(node.0), node.1);
                c.max_feature = c.max_feature.max(node.1 as usize);
            }
            let first = g * heap + (j << depth);
            c.leaves[first..first + leaves.len()].copy_from_slice(&leaves);
            c.most_from[g] += leaves.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        }
        for g in (0..groups).rev() {
            c.most_from[g] += c.most_from[g + 1];
        }
        Some(c)
    }

    /// Sum of the trees' leaf values for `x`.
    #[inline]
    pub fn sum(&self, x: &[f32]) -> f64 {
        self.sum_reaching(x, f64::NEG_INFINITY).unwrap_or(f64::NAN)
    }

    /// [`Compiled::sum`], or `None` as soon as the sum is sure to stay
    /// below `limit`, by a margin that covers rounding. A sum that is
    /// returned is the same, to the bit, as `sum` gives.
    #[inline]
    pub fn sum_reaching(&self, x: &[f32], limit: f64) -> Option<f64> {
        // Features are checked once here, so the walk needs no bounds checks.
        if self.max_feature >= x.len() {
            return Some(f64::NAN);
        }
        // Sums of a few hundred leaves round by far less than this.
        let limit = limit - 1e-9 * (1.0 + limit.abs());
        let mut on_stack = [0u32; 64];
        let mut on_heap = Vec::new();
        let keys = if x.len() <= on_stack.len() {
            &mut on_stack[..x.len()]
        } else {
            on_heap.resize(x.len(), 0);
            &mut on_heap[..]
        };
        for (k, &v) in keys.iter_mut().zip(x) {
            *k = order_key(v);
        }
        // A depth known at compile time unrolls the walk completely.
        match self.depth {
            1 => self.sum_at::<1>(keys, limit),
            2 => self.sum_at::<2>(keys, limit),
            3 => self.sum_at::<3>(keys, limit),
            4 => self.sum_at::<4>(keys, limit),
            5 => self.sum_at::<5>(keys, limit),
            6 => self.sum_at::<6>(keys, limit),
            7 => self.sum_at::<7>(keys, limit),
            8 => self.sum_at::<8>(keys, limit),
            9 => self.sum_at::<9>(keys, limit),
            _ => self.sum_at::<MAX_COMPILED_DEPTH>(keys, limit),
        }
    }

    fn sum_at<const DEPTH: u32>(&self, x: &[u32], limit: f64) -> Option<f64> {
        debug_assert!(self.depth == DEPTH && self.max_feature < x.len());
        let heap = 1usize << (GROUP_LOG + DEPTH);
        let mut total = 0.0f64;
        for ((nodes, leaves), most) in self
            .nodes
            .chunks_exact(heap)
            .zip(self.leaves.chunks_exact(heap))
            .zip(&self.most_from)
        {
            if total + most < limit {
                return None;
            }
            let step = |a: usize| {
                debug_assert!(a < nodes.len());
                // SAFETY: above the leaves a walk is at a heap level below
                // 3 + depth, so a < 2^(3 + depth) − 1 < nodes.len(); every
                // node's feature is ≤ max_feature < x.len(), checked by `sum`.
                let (t, f) = unsafe { *nodes.get_unchecked(a) };
                let v = unsafe { *x.get_unchecked(f as usize) };
                2 * a + 1 + usize::from(v > t)
            };
            let mut a: [usize; GROUP] = std::array::from_fn(|j| GROUP - 1 + j);
            for _ in 0..DEPTH {
                for s in a.iter_mut() {
                    *s = step(*s);
                }
            }
            // The walks end on the heap's last level, which starts at heap − 1:
            // a − (heap − 1) < heap = leaves.len().
            for s in a {
                debug_assert!(s + 1 - heap < leaves.len());
                // SAFETY: see above.
                total += unsafe { *leaves.get_unchecked(s + 1 - heap) } as f64;
            }
        }
        Some(total)
    }
}

/// A float as an integer that orders the same way, so that a tree step is an
/// integer compare, which needs fewer instructions and registers than a
/// float one. −0 counts as +0, and NaN as below everything, so that it goes
/// left as `NaN > t` does.
fn order_key(v: f32) -> u32 {
    if v.is_nan() {
        return 0;
    }
    let bits = (v + 0.0).to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 1 << 31
    }
}

#[cfg(test)]
mod compiled_tests {
    use super::*;

    #[test]
    fn order_keys_compare_as_the_floats_do() {
        let values = [
            f32::NEG_INFINITY,
            -3.5e30,
            -2.0,
            -1e-40,
            -0.0,
            0.0,
            1e-40,
            0.5,
            7.25,
            f32::MAX,
            f32::INFINITY,
            f32::NAN,
            -f32::NAN,
        ];
        for &a in &values {
            for &b in &values {
                if b.is_nan() {
                    continue;
                }
                assert_eq!(order_key(a) > order_key(b), a > b, "{a} > {b}");
            }
        }
    }

    #[test]
    fn compiled_trees_score_like_the_walk() {
        let mut rng = Rng::new(8);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for _ in 0..3000 {
            let r: Vec<f32> = (0..4).map(|_| rng.normal(0.0, 1.0) as f32).collect();
            y.push(u8::from(r[0] * r[1] > 0.3 || r[2] > 1.5));
            x.extend(r);
        }
        for depth in [1, 3, 6, 10] {
            let p = GbtParams {
                rounds: 23,
                tree: TreeParams {
                    max_depth: depth,
                    ..GbtParams::default().tree
                },
                ..GbtParams::default()
            };
            let m = Gbt::train(&x, &y, 4, &p);
            let c = Compiled::new(&m.trees).unwrap();
            for r in x.chunks_exact(4).take(500) {
                let walk: f64 = m.trees.iter().map(|t| t.predict(r) as f64).sum();
                assert!((walk - c.sum(r)).abs() < 1e-9, "depth {depth}");
                // A sum that may reach the limit is the full sum; one that
                // stops early is below it.
                for limit in [-1.0, 0.0, 0.5, walk, walk + 1e-6, walk - 1e-6] {
                    match c.sum_reaching(r, limit) {
                        Some(s) => assert_eq!(s.to_bits(), c.sum(r).to_bits()),
                        None => assert!(walk < limit, "{walk} stopped below {limit}"),
                    }
                }
            }
        }
    }
}
