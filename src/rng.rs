//! A small seeded generator (xoshiro256**), so that simulated data and
//! trained models are the same for a seed on every platform and version.

#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        Rng {
            s: [
                splitmix(&mut x),
                splitmix(&mut x),
                splitmix(&mut x),
                splitmix(&mut x),
            ],
        }
    }

    /// An independent stream for a (seed, stream, index) triple.
    pub fn derive(seed: u64, stream: u64, index: u64) -> Rng {
        let mut x = seed ^ stream.wrapping_mul(0xa076_1d64_78bd_642f);
        let a = splitmix(&mut x);
        Rng::new(a ^ index.wrapping_mul(0xe703_7ed1_a0b4_28db))
    }

    pub fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f64()
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    pub fn normal(&mut self, mean: f64, sd: f64) -> f64 {
        // Box–Muller; 1 - u keeps the logarithm finite.
        let u1 = 1.0 - self.f64();
        let u2 = self.f64();
        mean + sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Poisson by Knuth's method: exact, and fast for the small means used here.
    pub fn poisson(&mut self, lambda: f64) -> u32 {
        let l = (-lambda).exp();
        let mut k = 0;
        let mut p = self.f64();
        while p > l {
            k += 1;
            p *= self.f64();
        }
        k
    }

    /// `k` distinct indices from [0, n), by a partial Fisher–Yates shuffle.
    pub fn sample(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        let k = k.min(n);
        for i in 0..k {
            let j = i + self.below(n - i);
            v.swap(i, j);
        }
        v.truncate(k);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_are_right() {
        let mut r = Rng::new(7);
        let n = 200_000;
        let (mut s, mut s2, mut p) = (0.0, 0.0, 0.0);
        for _ in 0..n {
            let x = r.normal(3.0, 2.0);
            s += x;
            s2 += x * x;
            p += r.poisson(2.5) as f64;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!((mean - 3.0).abs() < 0.02, "{mean}");
        assert!((var - 4.0).abs() < 0.05, "{var}");
        assert!((p / n as f64 - 2.5).abs() < 0.02);
        let smp = r.sample(10, 10);
        let mut sorted = smp.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(Rng::new(1).next_u64(), Rng::new(1).next_u64());
    }
}
