//! ur4rec-engine: a training engine for UR4Rec (SASRec + preference retriever) on a small Rust autograd
//! tape, with a CPU backend (the reference) and a CUDA backend (NVRTC kernels, cuBLAS).
//!
//! One batch travels straight down the modules: `data` makes it, `model` runs forward on the `tape`
//! through `backend` operations, `train` turns losses into gradients and steps, `eval` and `report`
//! read the results.

pub mod rng;
pub mod data;
pub mod eval;
pub mod backend;
pub mod linalg;
pub mod params;
pub mod tape;
pub mod config;
pub mod model;
pub mod train;
pub mod ranking;
pub mod checkpoint;
pub mod golden;
pub mod report;
pub mod ablation;
pub mod plot;
