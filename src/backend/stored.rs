//! Tensors that are only stored and read, never trained: the memory-bank keys. They may be kept in a
//! 16-bit format (bf16 or f16, the `half` crate's rounding: round to nearest, ties to even) to halve the
//! bytes the fused InfoNCE streams; every kernel widens them to f32 on load and accumulates in f32/f64,
//! so only the stored values are rounded (mission.md §9: f32 softmax, log-sum-exp and losses).
//!
//! The host side of the conversion lives here; the device side is `to_f32` / `from_f32` in
//! `kernels/common.cuh`, which must round exactly as `half` does (tested in tests/cuda_parity.rs).
use crate::backend::Backend;
use serde::{Deserialize, Serialize};

/// The element format of a stored tensor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreFormat {
    #[default]
    F32,
    Bf16,
    F16,
}

impl StoreFormat {
    pub fn name(self) -> &'static str {
        match self {
            StoreFormat::F32 => "f32",
            StoreFormat::Bf16 => "bf16",
            StoreFormat::F16 => "f16",
        }
    }
    /// Bytes per stored element.
    pub fn bytes(self) -> usize {
        match self {
            StoreFormat::F32 => 4,
            StoreFormat::Bf16 | StoreFormat::F16 => 2,
        }
    }
    /// `x` rounded to this format and widened back: the value a stored element reads as.
    pub fn round(self, x: f32) -> f32 {
        match self {
            StoreFormat::F32 => x,
            f => f.widen(f.bits(x)),
        }
    }
    /// The 16-bit pattern of `x` in this (16-bit) format.
    pub fn bits(self, x: f32) -> u16 {
        match self {
            StoreFormat::Bf16 => half::bf16::from_f32(x).to_bits(),
            StoreFormat::F16 => half::f16::from_f32(x).to_bits(),
            StoreFormat::F32 => panic!("bits: f32 is not a 16-bit format"),
        }
    }
    /// The value of a 16-bit pattern of this format.
    pub fn widen(self, bits: u16) -> f32 {
        match self {
            StoreFormat::Bf16 => half::bf16::from_bits(bits).to_f32(),
            StoreFormat::F16 => half::f16::from_bits(bits).to_f32(),
            StoreFormat::F32 => panic!("widen: f32 is not a 16-bit format"),
        }
    }
}

/// Host bits of a 16-bit format.
pub fn to_bits(format: StoreFormat, x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| format.bits(v)).collect()
}

/// Widens host bits of a 16-bit format.
pub fn from_bits(format: StoreFormat, bits: &[u16]) -> Vec<f32> {
    bits.iter().map(|&b| format.widen(b)).collect()
}

/// A stored tensor on a backend: f32, or 16-bit bits with their format.
pub enum Stored<B: Backend> {
    F32(B::Buf),
    Half(B::Half, StoreFormat),
}

impl<B: Backend> Stored<B> {
    /// `values` rounded to `format` and uploaded.
    pub fn from_host(backend: &B, values: &[f32], format: StoreFormat) -> Self {
        match format {
            StoreFormat::F32 => Stored::F32(backend.from_host(values)),
            f => Stored::Half(backend.half_from_host(&to_bits(f, values)), f),
        }
    }
    /// The stored values widened to f32, on the host.
    pub fn to_host(&self, backend: &B) -> Vec<f32> {
        match self {
            Stored::F32(x) => backend.to_host(x),
            Stored::Half(x, f) => from_bits(*f, &backend.half_to_host(x)),
        }
    }
    pub fn format(&self) -> StoreFormat {
        match self {
            Stored::F32(_) => StoreFormat::F32,
            Stored::Half(_, f) => *f,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even_and_round_trips() {
        // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to the even one, 1.
        assert_eq!(StoreFormat::Bf16.round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(StoreFormat::Bf16.round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        // f16 has 10 mantissa bits: 1 + 2^-11 ties to 1.
        assert_eq!(StoreFormat::F16.round(1.0 + 1.0 / 2048.0), 1.0);
        assert_eq!(StoreFormat::F32.round(0.1), 0.1);
        let x: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.37).sin()).collect();
        for f in [StoreFormat::Bf16, StoreFormat::F16] {
            let once = from_bits(f, &to_bits(f, &x));
            // A stored value is stored again unchanged (a resumed bank must equal the live one).
            assert_eq!(from_bits(f, &to_bits(f, &once)), once, "{f:?}");
            let worst = x.iter().zip(&once).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let bound = if f == StoreFormat::Bf16 { 1.0 / 256.0 } else { 1.0 / 2048.0 };
            assert!(worst <= bound && worst > 0.0, "{f:?}: worst rounding error {worst}");
        }
    }
}
