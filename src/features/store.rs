//! Keyed state with a compact footprint: a hash index into a chunked slab,
//! so a million cards cost their state plus about 25 bytes each, and growth
//! never doubles a huge allocation.

/// 64-bit hash of a card or merchant token. Keys are stored as this hash:
/// for a million keys the chance that any two collide is about 3·10⁻⁸.
pub fn key_hash(s: &str) -> u64 {
    key_hash_bytes(s.as_bytes())
}

/// [`key_hash`] of an id as bytes (a Kafka record key).
pub fn key_hash_bytes(s: &[u8]) -> u64 {
    let mut h = KeyHasher::new();
    h.write(s);
    h.finish()
}

/// [`key_hash_bytes`] over bytes given in pieces, without gathering them:
/// an entity's key from several fields of a transaction.
pub struct KeyHasher(u64);

impl KeyHasher {
    pub fn new() -> KeyHasher {
        KeyHasher(0xcbf2_9ce4_8422_2325)
    }

    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn finish(self) -> u64 {
        // murmur3's finalizer: FNV alone leaves the high bits poorly mixed.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

impl Default for KeyHasher {
    fn default() -> Self {
        KeyHasher::new()
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

const CHUNK: usize = 4096;

/// Key → slot, open addressing with linear probing. Written here rather
/// than taken from `HashMap` so that a key's bucket can be prefetched
/// before it is looked up: with a million keys the index lookups miss the
/// cache as often as the state itself does.
struct Index {
    /// (key, slot); a key of 0 marks an empty bucket.
    buckets: Vec<(u64, u32)>,
    len: usize,
}

/// A key hash of 0 is stored as 1: one more way for two keys to collide,
/// as unlikely as the others.
fn stored(key: u64) -> u64 {
    key.max(1)
}

impl Index {
    fn new() -> Index {
        Index {
            buckets: Vec::new(),
            len: 0,
        }
    }

    fn mask(&self) -> usize {
        self.buckets.len().wrapping_sub(1)
    }

    fn prefetch(&self, key: u64) {
        if !self.buckets.is_empty() {
            let at = stored(key) as usize & self.mask();
            prefetch(&self.buckets[at], std::mem::size_of::<(u64, u32)>());
        }
    }

    fn get(&self, key: u64) -> Option<u32> {
        if self.buckets.is_empty() {
            return None;
        }
        let (key, mask) = (stored(key), self.mask());
        let mut at = key as usize & mask;
        loop {
            let (k, slot) = self.buckets[at];
            if k == key {
                return Some(slot);
            }
            if k == 0 {
                return None;
            }
            at = (at + 1) & mask;
        }
    }

    /// Adds a key that is not in the index.
    fn insert(&mut self, key: u64, slot: u32) {
        // At most three quarters full, so that probe runs stay short.
        if 4 * (self.len + 1) > 3 * self.buckets.len() {
            self.rebuild((2 * self.buckets.len()).max(16), |_, _| true);
        }
        self.place(stored(key), slot);
        self.len += 1;
    }

    fn place(&mut self, key: u64, slot: u32) {
        let mask = self.mask();
        let mut at = key as usize & mask;
        while self.buckets[at].0 != 0 {
            at = (at + 1) & mask;
        }
        self.buckets[at] = (key, slot);
    }

    /// Rehashes into `size` buckets, keeping the entries for which `keep` is true.
    fn rebuild(&mut self, size: usize, mut keep: impl FnMut(u64, u32) -> bool) {
        let old = std::mem::replace(&mut self.buckets, vec![(0, 0); size]);
        self.len = 0;
        for (k, slot) in old {
            if k != 0 && keep(k, slot) {
                self.place(k, slot);
                self.len += 1;
            }
        }
    }
}

/// An entry's place in a [`KeyedStore`].
#[derive(Debug, Clone, Copy)]
pub struct Found(u32);

pub struct KeyedStore<T> {
    index: Index,
    chunks: Vec<Vec<T>>,
    free: Vec<u32>,
}

impl<T: Default> Default for KeyedStore<T> {
    fn default() -> Self {
        KeyedStore {
            index: Index::new(),
            chunks: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T: Default> KeyedStore<T> {
    pub fn len(&self) -> usize {
        self.index.len
    }

    pub fn is_empty(&self) -> bool {
        self.index.len == 0
    }

    fn slot(&self, i: u32) -> &T {
        &self.chunks[i as usize / CHUNK][i as usize % CHUNK]
    }

    fn slot_mut(&mut self, i: u32) -> &mut T {
        &mut self.chunks[i as usize / CHUNK][i as usize % CHUNK]
    }

    /// Starts loading the index bucket of `key`: the first of the three
    /// dependent loads of a lookup (bucket, state, history).
    pub fn prefetch_key(&self, key: u64) {
        self.index.prefetch(key);
    }

    pub fn get(&self, key: u64) -> Option<&T> {
        self.index.get(key).map(|i| self.slot(i))
    }

    /// Where `key`'s entry is, if it has one: good until an entry is
    /// removed.
    pub fn find(&self, key: u64) -> Option<Found> {
        self.index.get(key).map(Found)
    }

    pub fn at(&self, found: Found) -> &T {
        self.slot(found.0)
    }

    /// `key`'s entry, at `found` when [`KeyedStore::find`] gave it and no
    /// entry was removed since: one lookup for a read then a write.
    pub fn found_or_default(&mut self, key: u64, found: Option<Found>) -> &mut T {
        match found {
            Some(f) => self.slot_mut(f.0),
            None => self.get_or_default(key),
        }
    }

    pub fn get_or_default(&mut self, key: u64) -> &mut T {
        if let Some(i) = self.index.get(key) {
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

    /// Every entry with its key (as stored: a key of 0 reads as 1).
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.index
            .buckets
            .iter()
            .filter(|(k, _)| *k != 0)
            .map(|&(k, slot)| (k, self.slot(slot)))
    }

    /// Drops every entry for which `keep` (given its key) is false, freeing its memory.
    pub fn retain(&mut self, mut keep: impl FnMut(u64, &mut T) -> bool) -> usize {
        let mut dropped = Vec::new();
        let chunks = &mut self.chunks;
        let size = self.index.buckets.len();
        self.index.rebuild(size, |key, i| {
            let v = &mut chunks[i as usize / CHUNK][i as usize % CHUNK];
            if keep(key, v) {
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
        assert_eq!(s.retain(|_, v| *v % 2 == 0), 5000);
        assert_eq!(s.iter().count(), 5000);
        assert_eq!(s.get(key_hash("1233")), None);
        assert_eq!(*s.get_or_default(key_hash("new")), 0);
        assert_eq!(s.chunks.len(), 3);
        // Freed slots are reused, and every kept key still finds its value.
        for k in 10_000..12_000u64 {
            *s.get_or_default(key_hash(&k.to_string())) = k as u32;
        }
        assert_eq!(s.chunks.len(), 3);
        for k in (0..10_000u64).step_by(2).chain(10_000..12_000) {
            assert_eq!(s.get(key_hash(&k.to_string())), Some(&(k as u32)), "{k}");
        }
        assert_eq!(s.len(), 7001);
    }

    #[test]
    fn key_zero_is_a_key() {
        let mut s: KeyedStore<u32> = KeyedStore::default();
        *s.get_or_default(0) = 7;
        assert_eq!(s.get(0), Some(&7));
        assert_eq!(s.get(2), None);
    }
}
