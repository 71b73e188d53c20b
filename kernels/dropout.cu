// Inverted dropout with a counter-based mask. CPU twin: `dropout` / `dropout_backward` in src/backend/cpu.rs.
// The mask must be bit-identical to src/rng.rs: element e is dropped iff
//   u = (mix64(base ^ e) >> 40) * 2^-24  <  p,     base = counter_base(seed, stream) (computed on the host).
// u has 24 random bits, so the u64 -> f32 conversion is exact on both sides and the comparison agrees.
// No state is stored: the backward recomputes the same mask from the same (base, element).

// out = x * factor; `scale` = 1 / (1 - p), computed once on the host in f32 exactly as the CPU does.
extern "C" __global__ void dropout_f32(float* out, const float* x, unsigned long long n, unsigned long long base,
                                       float p, float scale) {
    GRID_STRIDE(i, n) out[i] = x[i] * keep_factor(base, i, p, scale);
}

// dx += dy * factor.
extern "C" __global__ void dropout_backward_f32(float* dx, const float* dy, unsigned long long n,
                                                unsigned long long base, float p, float scale) {
    GRID_STRIDE(i, n) dx[i] += dy[i] * keep_factor(base, i, p, scale);
}
