//! Keyed state with a compact footprint: a hash index into a chunked slab,
//! so a million cards cost their state plus about 25 bytes each, and growth
//! never doubles a huge allocation.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// 64-bit hash of a card or merchant token. Keys are stored as this hash:
/// for a million keys the chance that any two collide is about 3·10⁻⁸.
pub fn key_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in s.as_bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // murmur3's finalizer: FNV alone leaves the high bits poorly mixed.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The keys are already hashes; hashing them again is wasted work.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// Asks the CPU to start loading `bytes` at `ptr` into cache. State lookups
/// are random over megabytes, so the engine prefetches a batch of events'
/// state before it computes any of them, overlapping the memory latencies.
#[inline]
pub fn prefetch<T>(ptr: *const T, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let base = ptr as *const i8;
        let mut off = 0;
        while off < bytes {
            // SAFETY: a prefetch is a hint; it never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(off)) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ptr, bytes);
}

pub type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

const CHUNK: usize = 4096;

pub struct KeyedStore<T> {
    index: IdMap<u32>,
    chunks: Vec<Vec<T>>,
    free: Vec<u32>,
}

impl<T: Default> Default for KeyedStore<T> {
    fn default() -> Self {
        KeyedStore {
            index: IdMap::default(),
            chunks: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T: Default> KeyedStore<T> {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn slot(&self, i: u32) -> &T {
        &self.chunks[i as usize / CHUNK][i as usize % CHUNK]
    }

    fn slot_mut(&mut self, i: u32) -> &mut T {
        &mut self.chunks[i as usize / CHUNK][i as usize % CHUNK]
    }

    pub fn get(&self, key: u64) -> Option<&T> {
        self.index.get(&key).map(|&i| self.slot(i))
    }

    pub fn get_or_default(&mut self, key: u64) -> &mut T {
        if let Some(&i) = self.index.get(&key) {
            return self.slot_mut(i);
        }
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
                    self.chunks.push(Vec::with_capacity(CHUNK));
                }
                let n = self.chunks.len() - 1;
                let chunk = self.chunks.last_mut().expect("a chunk was just ensured");
                chunk.push(T::default());
                (n * CHUNK + chunk.len() - 1) as u32
            }
        };
        self.index.insert(key, i);
        self.slot_mut(i)
    }

    /// Drops every entry for which `keep` is false, freeing its memory.
    pub fn retain(&mut self, mut keep: impl FnMut(&mut T) -> bool) -> usize {
        let mut dropped = Vec::new();
        let chunks = &mut self.chunks;
        self.index.retain(|_, &mut i| {
            let v = &mut chunks[i as usize / CHUNK][i as usize % CHUNK];
            if keep(v) {
                true
            } else {
                *v = T::default();
                dropped.push(i);
                false
            }
        });
        let n = dropped.len();
        self.free.extend(dropped);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_get_retain_reuse() {
        let mut s: KeyedStore<u32> = KeyedStore::default();
        for k in 0..10_000u64 {
            *s.get_or_default(key_hash(&k.to_string())) = k as u32;
        }
        assert_eq!(s.len(), 10_000);
        assert_eq!(s.get(key_hash("1234")), Some(&1234));
        assert_eq!(s.retain(|v| *v % 2 == 0), 5000);
        assert_eq!(s.get(key_hash("1233")), None);
        assert_eq!(*s.get_or_default(key_hash("new")), 0);
        assert_eq!(s.chunks.len(), 3);
    }
}
