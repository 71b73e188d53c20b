//! Data: readers, filtering, dense id remapping, leave-one-out split, negative sampling, synthetic data.
//!
//! Id convention everywhere in the engine: users and items are dense ids `1..=N`; `0` is padding.
//! Per-user vectors are indexed by `user - 1`.

pub mod features;
pub mod negatives;
pub mod readers;
pub mod split;
pub mod synthetic;

pub use negatives::NegativeSampler;
pub use readers::{load, parse_format, Format, LoadOptions};
pub use split::{eval_negatives, fingerprint_negatives, leave_one_out, Split};
pub use synthetic::{synthetic, SyntheticConfig};

use sha2::{Digest, Sha256};
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
    Parse {
        file: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{file}: {msg}")]
    File { file: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
}

impl Dataset {
    /// A data set from dense sequences (items in `1..=num_items`), with the dense ids as original ids and no
    /// side features: for generated data and tests, where there is no other id to keep.
    pub fn from_sequences(name: &str, num_items: usize, sequences: Vec<Vec<u32>>) -> Dataset {
        let user_original: Vec<String> = (1..=sequences.len()).map(|u| u.to_string()).collect();
        let item_original: Vec<String> = (1..=num_items).map(|i| i.to_string()).collect();
        Dataset {
            name: name.to_string(),
            num_users: sequences.len(),
            num_items,
            fingerprint: fingerprint(&user_original, &item_original, &sequences),
            user_original,
            item_original,
            sequences,
            item_text: None,
            item_visual: None,
            user_text: None,
        }
    }

    /// Total number of interactions over all users.
    pub fn num_interactions(&self) -> usize {
        self.sequences.iter().map(Vec::len).sum()
    }
}

/// The data-set fingerprint: SHA-256 over the original id lists and the remapped sequences.
///
/// Lengths are hashed before every list and string so that no two different data sets can produce the
/// same byte stream (e.g. ids "1","23" versus "12","3"). The data-set name is left out on purpose: the
/// same interactions read from another path are the same data.
pub(crate) fn fingerprint(
    user_original: &[String],
    item_original: &[String],
    sequences: &[Vec<u32>],
) -> String {
    let mut h = Sha256::new();
    h.update(b"ur4rec-dataset-v1");
    for ids in [user_original, item_original] {
        h.update((ids.len() as u64).to_le_bytes());
        for id in ids {
            h.update((id.len() as u64).to_le_bytes());
            h.update(id.as_bytes());
        }
    }
    h.update((sequences.len() as u64).to_le_bytes());
    for seq in sequences {
        h.update((seq.len() as u64).to_le_bytes());
        for &i in seq {
            h.update(i.to_le_bytes());
        }
    }
    hex(&h.finalize())
}

/// Lower-case hex of a digest.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
