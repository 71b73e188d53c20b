// Evaluation over the whole catalogue (mission.md §9, "full ranking at scale"): the scores never leave the
// device; only three counts per user come back. CPU twins: CpuBackend::fuse_softmax (= model::ur4rec::
// fuse_scores) and CpuBackend::rank_counts (the counting core of eval::rank_full).

// One block per row: out = α·softmax(s) + (1−α)·softmax(r) over the row's `cols` scores, in f64 (max in f32
// as the CPU twin takes it), rounded to f32.
extern "C" __global__ void fuse_softmax_f32(float* out, const float* s, const float* r, unsigned int cols,
                                           double alpha) {
    __shared__ float shm[BLOCK];
    const unsigned long long base = (unsigned long long)blockIdx.x * cols;
    const float* rows[2] = {s + base, r + base};
    double mx[2], z[2];
    for (int t = 0; t < 2; t++) {
        float m = NEG_INF;
        for (unsigned int i = threadIdx.x; i < cols; i += BLOCK) m = fmaxf(m, rows[t][i]);
        shm[threadIdx.x] = m;
        __syncthreads();
        for (int o = BLOCK / 2; o > 0; o >>= 1) {
            if (threadIdx.x < o) shm[threadIdx.x] = fmaxf(shm[threadIdx.x], shm[threadIdx.x + o]);
            __syncthreads();
        }
        mx[t] = (double)shm[0];
        __syncthreads();
        double acc = 0.0;
        for (unsigned int i = threadIdx.x; i < cols; i += BLOCK) acc += exp((double)rows[t][i] - mx[t]);
        z[t] = block_sum_d(acc);
        __syncthreads();  // block_sum_d's shared array is reused by the next call
    }
    for (unsigned int i = threadIdx.x; i < cols; i += BLOCK) {
        const double ps = exp((double)rows[0][i] - mx[0]) / z[0], pr = exp((double)rows[1][i] - mx[1]) / z[1];
        out[base + i] = (float)(alpha * ps + (1.0 - alpha) * pr);
    }
}

// A finite f32 (NaN fails both comparisons; ±inf fails the bound).
__device__ __forceinline__ bool finite_f32(float x) { return x >= -3.402823466e38f && x <= 3.402823466e38f; }

// One block per row r: counts[r] = (higher, equal, non-finite) of the items 1..cols−1 against the target's
// score, leaving out the row's excluded items ex_items[ex_offsets[r] .. ex_offsets[r+1]] (distinct, never 0
// or the target). The target counts as equal to itself. Integer sums: the same in any order.
extern "C" __global__ void rank_counts_f32(unsigned int* counts, const float* scores, const unsigned int* targets,
                                           const unsigned int* ex_offsets, const unsigned int* ex_items,
                                           unsigned int cols) {
    __shared__ unsigned int sh[3][BLOCK];
    const unsigned long long base = (unsigned long long)blockIdx.x * cols;
    const float ts = scores[base + targets[blockIdx.x]];
    unsigned int higher = 0, equal = 0, bad = 0;
    for (unsigned int i = 1 + threadIdx.x; i < cols; i += BLOCK) {
        const float x = scores[base + i];
        higher += x > ts;
        equal += x == ts;
        bad += !finite_f32(x);
    }
    for (unsigned int e = ex_offsets[blockIdx.x] + threadIdx.x; e < ex_offsets[blockIdx.x + 1]; e += BLOCK) {
        const float x = scores[base + ex_items[e]];
        higher -= x > ts;
        equal -= x == ts;
        bad -= !finite_f32(x);
    }
    sh[0][threadIdx.x] = higher;
    sh[1][threadIdx.x] = equal;
    sh[2][threadIdx.x] = bad;
    __syncthreads();
    for (int o = BLOCK / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o)
            for (int c = 0; c < 3; c++) sh[c][threadIdx.x] += sh[c][threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x < 3) counts[3ull * blockIdx.x + threadIdx.x] = sh[threadIdx.x][0];
}
