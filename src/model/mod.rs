//! Models: SASRec now; the preference retriever and UR4Rec scoring join it in `retriever.rs` / `ur4rec.rs`.
pub mod retriever;
pub mod sasrec;
pub mod ur4rec;

pub use sasrec::SasRec;
