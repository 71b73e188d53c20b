//! The five training improvements of `seed-improvements.md`, each a small host-side object with its own unit
//! tests. They hold only plain state (serde), so a checkpoint can store and restore each exactly.
//!
//! - [`alternation`]: which tower trains at a step in stage 3 (parity baseline, or plateau detection on a
//!   smoothed loss; the seed's raw rule is kept as a `faithful` mode).
//! - [`curriculum`]: auxiliary loss weights per step (fixed baseline, or the curriculum scaled to the run).
//! - [`memory_bank`]: the ring queue of contrastive keys, with the user and step of every slot;
//!   [`device_bank`] keeps its keys on the backend during training.
//! - [`unfreezing`]: the progressive-unfreezing schedule over parameter-name prefixes.
//! - [`distillation`]: the bidirectional-KD configuration and a host f64 reference of the loss.

pub mod alternation;
pub mod curriculum;
pub mod device_bank;
pub mod distillation;
pub mod memory_bank;
pub mod unfreezing;

pub use alternation::{
    AdaptiveAlternation, AdaptiveRule, Alternation, Module, ParityAlternation, SwitchEvent,
};
pub use curriculum::{Curriculum, LossWeights, Weights};
pub use device_bank::DeviceBank;
pub use distillation::{kd_loss, DistillConfig, KdDirection};
pub use memory_bank::MemoryBank;
pub use unfreezing::{UnfreezeEvent, UnfreezeSchedule};
