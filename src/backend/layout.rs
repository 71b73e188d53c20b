//! Packed-sequence layout shared by the attention op and the model.
//!
//! The engine stores a batch of left-padded sequences without their padding: the `n_s` real tokens of
//! sequence `s` are rows `offsets[s]..offsets[s+1]` of every `[T, ·]` activation. This is exactly
//! equivalent to the padded `[B, L, ·]` form with a causal + key-padding mask (padded positions can
//! neither see nor be seen, and their outputs are zeroed), but does no work for padding. A per-token
//! `key_valid` flag keeps the general key-padding mask available (tests use it to check the padded form).
use super::Backend;

pub struct SeqLayout<B: Backend> {
    /// `offsets[s]..offsets[s+1]` are the rows of sequence `s`; `offsets[0] = 0`, last = T.
    pub offsets_host: Vec<u32>,
    pub key_valid_host: Vec<u32>,
    pub offsets: B::Idx,
    pub key_valid: B::Idx,
}

impl<B: Backend> SeqLayout<B> {
    /// A layout from sequence lengths, all keys valid.
    pub fn from_lengths(backend: &B, lengths: &[usize]) -> Self {
        let mut offsets = Vec::with_capacity(lengths.len() + 1);
        offsets.push(0u32);
        for &n in lengths {
            offsets.push(offsets.last().unwrap() + n as u32);
        }
        let total = *offsets.last().unwrap() as usize;
        Self::new(backend, offsets, vec![1; total])
    }

    pub fn new(backend: &B, offsets_host: Vec<u32>, key_valid_host: Vec<u32>) -> Self {
        assert_eq!(*offsets_host.last().unwrap() as usize, key_valid_host.len());
        SeqLayout {
            offsets: backend.idx_from_host(&offsets_host),
            key_valid: backend.idx_from_host(&key_valid_host),
            offsets_host,
            key_valid_host,
        }
    }

    pub fn num_seqs(&self) -> usize {
        self.offsets_host.len() - 1
    }

    pub fn num_tokens(&self) -> usize {
        *self.offsets_host.last().unwrap() as usize
    }

    pub fn seq_range(&self, s: usize) -> std::ops::Range<usize> {
        self.offsets_host[s] as usize..self.offsets_host[s + 1] as usize
    }

    /// Rows holding each sequence's last token (the user vector); `None` for an empty sequence.
    pub fn last_rows(&self) -> Vec<Option<u32>> {
        (0..self.num_seqs()).map(|s| {
            let r = self.seq_range(s);
            if r.is_empty() { None } else { Some(r.end as u32 - 1) }
        }).collect()
    }

    /// Offsets of each sequence's block in the per-(sequence, head) attention-probability buffer.
    pub fn prob_offsets(&self, heads: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.num_seqs() + 1);
        let mut acc = 0usize;
        out.push(0);
        for s in 0..self.num_seqs() {
            let n = self.seq_range(s).len();
            acc += heads * n * n;
            out.push(acc);
        }
        out
    }
}
