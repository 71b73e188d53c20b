// Full reductions (sum_all, sum_squares, the mean of per-row losses) and column sums (sum_rows_into).
// CPU twins in src/backend/cpu.rs accumulate in f64; so do these. All reductions are two-stage and
// deterministic: stage 1 runs a FIXED grid (chosen by the launcher from n only) and reduces each block
// in a fixed tree order into one f64 partial; stage 2 sums the partials in one block. No float atomics,
// so two runs on the same input give the same bits (mission §9, deterministic mode).

// mode 0: Σ x;  mode 1: Σ x² (squared in f64, as the CPU's gradient-norm sum).
extern "C" __global__ void sum_partials_f32(double* partials, const float* x, unsigned long long n, int mode) {
    double acc = 0.0;
    for (unsigned long long i = (unsigned long long)blockIdx.x * BLOCK + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * BLOCK) {
        double v = (double)x[i];
        // Rounded products and sums (no FMA contraction): the segmented twin below gives the same bits.
        acc = __dadd_rn(acc, mode == 1 ? __dmul_rn(v, v) : v);
    }
    double s = block_sum_d(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// sum_partials_f32 (mode 1) of every segment of a table in one launch (Backend::record_step): block b of a
// segment of n elements does exactly what block b of sum_partials_f32's fixed grid (the same block count)
// does on that range, so each segment's partials — and, after finish_segments_f64, its sum — have
// sum_squares's bits. Partials are indexed by the launch's block.
extern "C" __global__ void sum_squares_segments_f64(double* partials, const float* x, const unsigned int* segs,
                                                    unsigned int nsegs) {
    const Seg sg = segment_of_block(segs, nsegs, blockIdx.x);
    const float* xs = x + sg.offset;
    double acc = 0.0;
    for (unsigned long long i = (unsigned long long)sg.block * BLOCK + threadIdx.x; i < sg.len;
         i += (unsigned long long)sg.blocks * BLOCK) {
        double v = (double)xs[i];
        acc = __dadd_rn(acc, __dmul_rn(v, v));
    }
    double s = block_sum_d(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// out[s] = Σ of segment s's partials, one block per segment, in reduce_finish_f64's order.
extern "C" __global__ void finish_segments_f64(double* out, const double* partials, const unsigned int* segs) {
    const unsigned int* w = segs + blockIdx.x * SEG_WORDS;
    const unsigned int first = w[6], nparts = w[7];
    double acc = 0.0;
    for (unsigned int i = threadIdx.x; i < nparts; i += BLOCK) acc += partials[first + i];
    double s = block_sum_d(acc);
    if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// out[0] = (f32)(Σ partials / divisor). divisor is the element count for means, 1 for sums.
extern "C" __global__ void reduce_finish_f32(float* out, const double* partials, unsigned int nparts, double divisor) {
    double acc = 0.0;
    for (unsigned int i = threadIdx.x; i < nparts; i += BLOCK) acc += partials[i];
    double s = block_sum_d(acc);
    if (threadIdx.x == 0) out[0] = (float)(s / divisor);
}

// The same, kept in f64 for sum_squares (read back by the host for gradient-norm clipping).
extern "C" __global__ void reduce_finish_f64(double* out, const double* partials, unsigned int nparts) {
    double acc = 0.0;
    for (unsigned int i = threadIdx.x; i < nparts; i += BLOCK) acc += partials[i];
    double s = block_sum_d(acc);
    if (threadIdx.x == 0) out[0] = s;
}

// out[i] = x_i[0] widened to f64 for i < n ≤ 8, one launch for a step's loss values (Backend::record_step);
// the unused pointers repeat x0.
extern "C" __global__ void widen_scalars_f32(double* out, unsigned int n, const float* x0, const float* x1,
                                             const float* x2, const float* x3, const float* x4, const float* x5,
                                             const float* x6, const float* x7) {
    const float* xs[8] = {x0, x1, x2, x3, x4, x5, x6, x7};
    const unsigned int i = threadIdx.x;
    if (i < n && i < 8) out[i] = (double)xs[i][0];
}

// out[c] += Σ_r x[r, c] (bias gradient). Block (32, 16): 32 adjacent columns (coalesced reads of each row),
// 16 row lanes each summing a fixed strided subset of rows in f64, then a fixed-order combine in shared memory.
extern "C" __global__ void sum_rows_into_f32(float* out, const float* x, unsigned int rows, unsigned int cols) {
    __shared__ double sh[16][33];
    unsigned int c = blockIdx.x * 32 + threadIdx.x;
    double acc = 0.0;
    if (c < cols) {
        for (unsigned int r = threadIdx.y; r < rows; r += 16) acc += (double)x[(unsigned long long)r * cols + c];
    }
    sh[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        double s = 0.0;
        for (int y = 0; y < 16; y++) s += sh[y][threadIdx.x];
        out[c] += (float)s;
    }
}
