// The prelude every kernel family is compiled with (src/backend/cuda/kernels.rs prepends it, then resets
// the line numbers with #line so compiler logs point into the family's own file). One definition of each
// shared helper: warp and block reductions, the grid/row loops, bit-pattern constants, and the
// counter-based dropout hash, which must stay bit-identical to src/rng.rs.

// NVRTC has no <math.h> macros: -inf and a quiet NaN by their bit patterns.
#define NEG_INF (__int_as_float(0xff800000u))
#define NEG_INF_D (__longlong_as_double(0xfff0000000000000ull))
#define QNAN (__int_as_float(0x7fc00000u))

// Threads per block of the fixed-grid reductions (block_sum_d) and of the InfoNCE kernels.
#define BLOCK 256

// One element per thread, grid-strided.
#define GRID_STRIDE(i, n) \
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (unsigned long long)gridDim.x * blockDim.x)

// One warp per row, grid-strided over rows; defines `lane` for the loop body.
#define WARP_ROWS(row, rows) \
    const unsigned int lane = threadIdx.x & 31u; \
    const unsigned int wpb = blockDim.x >> 5; \
    for (unsigned long long row = (unsigned long long)blockIdx.x * wpb + (threadIdx.x >> 5); row < (rows); \
         row += (unsigned long long)gridDim.x * wpb)

// A segment table (src/backend/segments.rs): per segment, SEG_WORDS u32s — offset low, offset high, length,
// group, parameter, weight decay (f32 bits), first block, blocks. A segmented launch has one block per
// (segment, block of the segment), segments in table order.
#define SEG_WORDS 8
struct Seg {
    unsigned long long offset;
    unsigned int len, group, param;
    float weight_decay;
    unsigned int block;   // this block's index within its segment
    unsigned int blocks;  // the segment's blocks
    unsigned int index;   // the segment's index
};
// The segment of block `blk` (a linear scan: a model has a few dozen parameter tensors).
__device__ __forceinline__ Seg segment_of_block(const unsigned int* segs, unsigned int nsegs, unsigned int blk) {
    unsigned int s = 0;
    while (s + 1 < nsegs && segs[(s + 1) * SEG_WORDS + 6] <= blk) s++;
    const unsigned int* w = segs + s * SEG_WORDS;
    Seg r;
    r.offset = (unsigned long long)w[0] | ((unsigned long long)w[1] << 32);
    r.len = w[2];
    r.group = w[3];
    r.param = w[4];
    r.weight_decay = __uint_as_float(w[5]);
    r.block = blk - w[6];
    r.blocks = w[7];
    r.index = s;
    return r;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// One row's max and Σ exp(x − max), for a warp walking the row in lane strides; every lane gets both. The
// softmax, log-softmax, cross-entropy and KL kernels (forward and backward) all start from it, so they sum
// in the same order.
struct RowExp {
    float mx;
    float s;
};
__device__ __forceinline__ RowExp warp_row_exp(const float* xr, unsigned int cols, unsigned int lane) {
    float mx = NEG_INF;
    for (unsigned int i = lane; i < cols; i += 32) mx = fmaxf(mx, xr[i]);
    mx = warp_max(mx);
    float s = 0.0f;
    for (unsigned int i = lane; i < cols; i += 32) s += expf(xr[i] - mx);
    return RowExp{mx, warp_sum(s)};
}

// Tree reduction of one double per thread over a BLOCK-thread block, in a fixed order (deterministic);
// the result is valid in thread 0.
__device__ double block_sum_d(double v) {
    __shared__ double sh[BLOCK];
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    return sh[0];
}

// SplitMix64 finaliser, identical to `rng::mix64`.
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Dropout factor of element e: `scale` (= 1/(1−p)) if kept, else 0. Identical to
// `rng::counter_uniform_at(base, e) >= p` on the CPU: u has 24 random bits, exact in f32 on both sides.
__device__ __forceinline__ float keep_factor(unsigned long long base, unsigned long long e, float p, float scale) {
    float u = (float)(mix64(base ^ e) >> 40) * (1.0f / 16777216.0f);
    return u >= p ? scale : 0.0f;
}

// 16-bit storage formats (src/backend/stored.rs): raw bits wrapped in a tag type, so a kernel template
// picks the widening by its element type. Rounding is to nearest, ties to even, as the `half` crate rounds.
struct bf16_bits {
    unsigned short v;
};
struct f16_bits {
    unsigned short v;
};
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16_bits x) { return __uint_as_float(((unsigned int)x.v) << 16); }
__device__ __forceinline__ float to_f32(f16_bits x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.v));
    return f;
}
__device__ __forceinline__ void store_as(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_as(bf16_bits* p, float x) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    p->v = h;
}
__device__ __forceinline__ void store_as(f16_bits* p, float x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    p->v = h;
}
