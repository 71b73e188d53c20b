// Inverted dropout with a counter-based mask. CPU twin: `dropout` / `dropout_backward` in src/backend/cpu.rs.
// The mask must be bit-identical to src/rng.rs: element e is dropped iff
//   u = (mix64(base ^ e) >> 40) * 2^-24  <  p,     base = counter_base(seed, stream) (computed on the host).
// u has 24 random bits, so the u64 -> f32 conversion is exact on both sides and the comparison agrees.
// No state is stored: the backward recomputes the same mask from the same (base, element).

// SplitMix64 finaliser, identical to `rng::mix64`.
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float keep_factor(unsigned long long base, unsigned long long e, float p, float scale) {
    float u = (float)(mix64(base ^ e) >> 40) * (1.0f / 16777216.0f);
    return u >= p ? scale : 0.0f;
}

#define GRID_STRIDE(i, n) \
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (unsigned long long)gridDim.x * blockDim.x)

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
