//! Data: readers, filtering, dense id remapping, leave-one-out split, negative sampling, synthetic data.
//!
//! Id convention everywhere in the engine: users and items are dense ids `1..=N`; `0` is padding.
//! Per-user vectors are indexed by `user - 1`.

pub mod readers;
pub mod split;
pub mod negatives;
pub mod synthetic;

// (re-exported once written) pub use readers::{load, Format, LoadOptions};
// (re-exported once written) pub use split::{leave_one_out, Split};
// (re-exported once written) pub use synthetic::{synthetic, SyntheticConfig};

use std::path::PathBuf;

/// A dense feature table aligned with dense ids: row 0 is padding (zeros), row `k` belongs to dense id `k`.
#[derive(Clone, Debug)]
pub struct Features {
    pub dim: usize,
    /// `(count + 1) * dim` values, row-major.
    pub rows: Vec<f32>,
    /// `present[k]` is false where the source had no row for dense id `k` (that row is zeros). `present[0]` = false.
    pub present: Vec<bool>,
}

/// An interaction data set after filtering and remapping.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub name: String,
    pub num_users: usize,
    pub num_items: usize,
    /// Original id of dense user `u` is `user_original[u - 1]`.
    pub user_original: Vec<String>,
    /// Original id of dense item `i` is `item_original[i - 1]`.
    pub item_original: Vec<String>,
    /// `sequences[u - 1]`: dense item ids of user `u` in time order (stable sort by timestamp, file order on ties).
    pub sequences: Vec<Vec<u32>>,
    /// Hex SHA-256 over the remapped sequences (and the original ids), for the run manifest.
    pub fingerprint: String,
    /// Optional side features (the synthetic generator fills them; file loading is added later).
    pub item_text: Option<Features>,
    pub item_visual: Option<Features>,
    pub user_text: Option<Features>,
}

/// Errors from reading or preparing data. Every parse error names the file, the 1-based line and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{file}:{line}: {msg}")]
    Parse { file: PathBuf, line: usize, msg: String },
    #[error("{file}: {msg}")]
    File { file: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
}
