//! Packed training / evaluation batches of item sequences.
//!
//! A batch keeps only real tokens (see `backend::layout`): each sequence is truncated to its last
//! `max_len` items and is right-aligned, so token `j` of a sequence of `n` items has the absolute position
//! `max_len − n + j` — the same position it would have in the left-padded `[B, max_len]` form, and the
//! last item always sits at `max_len − 1`.
use crate::backend::{Backend, SeqLayout};
use std::sync::Arc;

pub struct SeqBatch<B: Backend> {
    pub layout: Arc<SeqLayout<B>>,
    /// Item id of each packed token, `[T]`.
    pub items: Vec<u32>,
    /// Absolute position of each packed token, `[T]`, in `0..max_len`.
    pub positions: Vec<u32>,
    /// Row of each sequence's last token, `[S]`.
    pub last_rows: Vec<u32>,
}

impl<B: Backend> SeqBatch<B> {
    /// Packs the last `max_len` items of each sequence. Every sequence must be non-empty (a user with no
    /// history has no user vector; callers never build one).
    pub fn new(backend: &B, seqs: &[&[u32]], max_len: usize) -> Self {
        let mut items = Vec::new();
        let mut positions = Vec::new();
        let mut lengths = Vec::with_capacity(seqs.len());
        for s in seqs {
            assert!(!s.is_empty(), "SeqBatch: empty sequence");
            let tail = &s[s.len().saturating_sub(max_len)..];
            let n = tail.len();
            items.extend_from_slice(tail);
            positions.extend((0..n).map(|j| (max_len - n + j) as u32));
            lengths.push(n);
        }
        let layout = SeqLayout::from_lengths(backend, &lengths);
        let last_rows = layout.last_rows().into_iter().map(|r| r.unwrap()).collect();
        SeqBatch { layout: Arc::new(layout), items, positions, last_rows }
    }

    pub fn num_seqs(&self) -> usize {
        self.last_rows.len()
    }
    pub fn num_tokens(&self) -> usize {
        self.items.len()
    }
}
