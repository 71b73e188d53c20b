//! The parameter ranges one fused pass over the flat buffers covers: a step's gradient sums of squares
//! (`Backend::record_step`) and its AdamW update (`Backend::adamw`) each run as one launch over every
//! trainable parameter, not one (or two) per parameter — the small model's step is launch-bound (mission.md
//! §9), and a UR4Rec model has a few dozen parameter tensors.
//!
//! Each segment gets a fixed number of blocks, `segment_blocks(len)`: the grid `Backend::sum_squares` uses
//! for a range of that length, so a segment's sum has exactly `sum_squares`'s bits. The table on the
//! backend holds, per segment, [`WORDS`] u32s: offset (low, high), length, group, parameter, weight decay
//! (f32 bits), first block, blocks — what `kernels/adamw.cu` and `kernels/reduce.cu` read.
use crate::backend::Backend;

/// One parameter range of the flat buffers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Segment {
    pub offset: usize,
    pub len: usize,
    /// The parameter group (its learning rate and clip scale).
    pub group: usize,
    /// The parameter (its AdamW step count).
    pub param: usize,
    /// Decoupled weight decay (0 where the parameter is not decayed).
    pub weight_decay: f32,
}

/// u32 words per segment in the backend's table.
pub const WORDS: usize = 8;
/// Threads per block of the segmented kernels (`BLOCK` in kernels/common.cuh).
pub const BLOCK: usize = 256;
/// The most blocks a segment gets (`REDUCE_GRID` of the CUDA backend's reductions).
pub const MAX_BLOCKS: usize = 1024;

/// Blocks of a segment of `len` elements: the fixed stage-1 grid of `sum_squares` for that length.
pub fn segment_blocks(len: usize) -> usize {
    len.div_ceil(BLOCK).clamp(1, MAX_BLOCKS)
}

/// Segments on the host and their table on the backend (built once per trainable set, not per step).
pub struct Segments<B: Backend> {
    pub host: Vec<Segment>,
    pub table: B::Idx,
    /// Blocks of all segments together (the grid of a segmented launch).
    pub blocks: usize,
}

impl<B: Backend> Segments<B> {
    pub fn new(backend: &B, host: Vec<Segment>) -> Self {
        let mut words = Vec::with_capacity(host.len() * WORDS);
        let mut blocks = 0usize;
        for s in &host {
            let len = u32::try_from(s.len).unwrap_or_else(|_| panic!("segment of {} elements: beyond u32", s.len));
            let nblk = segment_blocks(s.len);
            words.extend_from_slice(&[s.offset as u32, (s.offset as u64 >> 32) as u32, len, s.group as u32, s.param as u32,
                                      s.weight_decay.to_bits(), blocks as u32, nblk as u32]);
            blocks += nblk;
        }
        Segments { table: backend.idx_from_host(&words), host, blocks }
    }

    pub fn len(&self) -> usize {
        self.host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }
}
