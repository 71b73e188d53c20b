//! Training: batches, objectives, optimizer, schedule and the trainer loop.
pub mod batch;
pub mod explicit_batch;
pub mod optim;
pub mod schedule;
pub mod objective;
pub mod guard;
pub mod step_log;
pub mod trainer;
pub mod ur4rec_trainer;
pub mod strategies;
pub mod resume;
pub mod interrupt;
