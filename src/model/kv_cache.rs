//! The key/value cache of one sequence: for every layer, the rotated keys and the values of
//! every position seen so far, so that a new token attends to them without recomputing them.

/// Keys and values of up to `max_len` positions for every layer.
#[derive(Clone, Debug)]
pub struct KvCache {
    n_layers: usize,
    max_len: usize,
    kv_dim: usize,
    len: usize,
    keys: Vec<f32>,   // (L, max_len, KV * D)
    values: Vec<f32>, // (L, max_len, KV * D)
}

impl KvCache {
    /// An empty cache for `n_layers` layers of `kv_dim` (= KV * D) values per position.
    pub fn new(n_layers: usize, kv_dim: usize, max_len: usize) -> Self {
        let size = n_layers * max_len * kv_dim;
        KvCache {
            n_layers,
            max_len,
            kv_dim,
            len: 0,
            keys: vec![0.0; size],
            values: vec![0.0; size],
        }
    }

    /// Positions filled so far; the next token goes to position `len()`.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no position is filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions this cache can hold.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Positions still free.
    pub fn remaining(&self) -> usize {
        self.max_len - self.len
    }

    /// Forgets every position (keeps the memory).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Forgets the positions from `len` on (to rewind a conversation to what it shares with
    /// the next prompt). No-op when `len` is not shorter than what is filled.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Number of layers and values per position this cache was made for.
    pub(crate) fn shape(&self) -> (usize, usize) {
        (self.n_layers, self.kv_dim)
    }

    /// Keys and values of `layer`, every position: `(max_len, KV * D)` each.
    pub(crate) fn layer_mut(&mut self, layer: usize) -> (&mut [f32], &mut [f32]) {
        let size = self.max_len * self.kv_dim;
        let range = layer * size..(layer + 1) * size;
        (&mut self.keys[range.clone()], &mut self.values[range])
    }

    /// Marks `n` more positions as filled (after every layer has written them).
    pub(crate) fn advance(&mut self, n: usize) {
        assert!(
            self.len + n <= self.max_len,
            "KvCache::advance past max_len"
        );
        self.len += n;
    }
}
