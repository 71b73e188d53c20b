// Embedding gather and its backward. CPU twins: `gather_rows` / `scatter_add_rows` in src/backend/cpu.rs.
// The gather is one thread per output element (coalesced along the row). The backward scatters with
// float atomics because several tokens can share an item; atomics make the summation order (and so the
// last bits) run-dependent. The deterministic variant below (CudaBackend::with_deterministic(true) or
// UR4REC_CUDA_DETERMINISTIC=1) uses no float atomics and reproduces the CPU twin's bits.
// An index past the table is a caller bug the CPU twin asserts on; here it reads 0 / writes nothing rather
// than touching memory outside the table.

extern "C" __global__ void gather_rows_f32(float* out, const float* table, const unsigned int* idx,
                                           unsigned long long n_out, unsigned int cols, unsigned int table_rows) {
    for (unsigned long long e = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; e < n_out;
         e += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long r = e / cols;
        unsigned int c = (unsigned int)(e - r * cols);
        unsigned int row = idx[r];
        out[e] = row < table_rows ? table[(unsigned long long)row * cols + c] : 0.0f;
    }
}

// dtable[idx[r]] += dy[r], skipping the padding row when has_skip != 0.
extern "C" __global__ void scatter_add_rows_f32(float* dtable, const float* dy, const unsigned int* idx,
                                                unsigned long long n_dy, unsigned int cols, unsigned int skip,
                                                int has_skip, unsigned int table_rows) {
    for (unsigned long long e = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; e < n_dy;
         e += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long r = e / cols;
        unsigned int c = (unsigned int)(e - r * cols);
        unsigned int row = idx[r];
        if ((has_skip && row == skip) || row >= table_rows) continue;
        atomicAdd(&dtable[(unsigned long long)row * cols + c], dy[e]);
    }
}

// ---- deterministic backward: no float atomics ----------------------------------------------------------
// A CSR of the lookups by destination row is built on the device, with no host synchronisation:
//   1. scatter_csr_count_f32: counts[row] += 1 (integer atomics: exact whatever their order);
//   2. scatter_csr_scan_f32:  starts = exclusive prefix sum of counts (one block); counts reset to 0 (the cursors);
//   3. scatter_csr_fill_f32:  perm[starts[row] + cursor[row]++] = p (order within a row still arbitrary);
//   4. scatter_csr_order_f32: sorted[starts[row] + rank] = p with rank = #{q in the row's segment : q < p}, i.e. the
//      lookups of each row in position order, independent of the atomics' order. Costs Σ segment² compares:
//      cheap unless one row takes most of the lookups (the padding row is skipped before this step).
//   5. one thread per (row, column) adds its row's contributions in position order, as the CPU twin does
//      (sequential f32 adds, products rounded before the add: no FMA contraction), so the bits match it.
// Lookups whose row is the skipped padding row or past the table are left out at step 1.
// (The scatter_csr_* kernels handle u32 indices only; `_f32` names the gradient path they serve, per the
// kernels' naming rule.)

extern "C" __global__ void scatter_csr_count_f32(unsigned int* counts, const unsigned int* idx, unsigned long long n,
                                         unsigned int skip, int has_skip, unsigned int table_rows) {
    for (unsigned long long p = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; p < n;
         p += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned int row = idx[p];
        if ((has_skip && row == skip) || row >= table_rows) continue;
        atomicAdd(&counts[row], 1u);
    }
}

// One block; blockDim.x a power of two <= 1024. starts has rows + 1 entries.
extern "C" __global__ void scatter_csr_scan_f32(unsigned int* starts, unsigned int* counts, unsigned int rows) {
    __shared__ unsigned int part[1024];
    const unsigned int t = threadIdx.x, nt = blockDim.x;
    const unsigned int chunk = (rows + nt - 1) / nt;
    const unsigned long long b0 = (unsigned long long)t * chunk;
    const unsigned int b = b0 < rows ? (unsigned int)b0 : rows;
    const unsigned int e = (unsigned long long)b + chunk < rows ? b + chunk : rows;
    unsigned int s = 0;
    for (unsigned int i = b; i < e; i++) s += counts[i];
    part[t] = s;
    __syncthreads();
    for (unsigned int off = 1; off < nt; off <<= 1) {
        unsigned int v = t >= off ? part[t - off] : 0u;
        __syncthreads();
        part[t] += v;
        __syncthreads();
    }
    unsigned int run = part[t] - s;
    for (unsigned int i = b; i < e; i++) {
        unsigned int c = counts[i];
        starts[i] = run;
        run += c;
        counts[i] = 0u;
    }
    if (t == nt - 1) starts[rows] = part[nt - 1];
}

extern "C" __global__ void scatter_csr_fill_f32(unsigned int* perm, unsigned int* cursor, const unsigned int* starts,
                                        const unsigned int* idx, unsigned long long n, unsigned int skip,
                                        int has_skip, unsigned int table_rows) {
    for (unsigned long long p = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; p < n;
         p += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned int row = idx[p];
        if ((has_skip && row == skip) || row >= table_rows) continue;
        unsigned int slot = atomicAdd(&cursor[row], 1u);
        perm[starts[row] + slot] = (unsigned int)p;
    }
}

// Launched with at least as many threads as lookups; entries past starts[table_rows] are unused.
extern "C" __global__ void scatter_csr_order_f32(unsigned int* sorted, const unsigned int* perm, const unsigned int* starts,
                                         const unsigned int* idx, unsigned long long n, unsigned int table_rows) {
    const unsigned int total = starts[table_rows];
    for (unsigned long long e = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; e < n && e < total;
         e += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned int p = perm[e];
        unsigned int row = idx[p];
        unsigned int b = starts[row], end = starts[row + 1];
        unsigned int rank = 0;
        for (unsigned int k = b; k < end; k++) rank += perm[k] < p ? 1u : 0u;
        sorted[b + rank] = p;
    }
}

// dtable[row, c] += Σ_{p in row's segment, in position order} dy[p, c].
extern "C" __global__ void scatter_add_rows_sorted_f32(float* dtable, const float* dy, const unsigned int* sorted,
                                                       const unsigned int* starts, unsigned int table_rows,
                                                       unsigned int cols) {
    const unsigned long long n = (unsigned long long)table_rows * cols;
    for (unsigned long long e = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long row = e / cols;
        unsigned int c = (unsigned int)(e - row * cols);
        unsigned int b = starts[row], end = starts[row + 1];
        if (b == end) continue;
        float acc = dtable[e];
        for (unsigned int k = b; k < end; k++) acc = __fadd_rn(acc, dy[(unsigned long long)sorted[k] * cols + c]);
        dtable[e] = acc;
    }
}

// The table gradient of candidate scoring (Backend::score_candidates_backward), deterministic:
// dtable[item, i] += Σ_{p = (r, t) with idx[p] = item, in position order} dy[p] · h[r, i].
extern "C" __global__ void score_candidates_backward_dtable_sorted_f32(float* dtable, const float* h, const float* dy,
                                                                      const unsigned int* sorted,
                                                                      const unsigned int* starts,
                                                                      unsigned int table_rows, unsigned int d,
                                                                      unsigned int j) {
    const unsigned long long n = (unsigned long long)table_rows * d;
    for (unsigned long long e = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long item = e / d;
        unsigned int i = (unsigned int)(e - item * d);
        unsigned int b = starts[item], end = starts[item + 1];
        if (b == end) continue;
        float acc = dtable[e];
        for (unsigned int k = b; k < end; k++) {
            unsigned int p = sorted[k];
            unsigned long long r = p / j;
            acc = __fadd_rn(acc, __fmul_rn(dy[p], h[r * d + i]));
        }
        dtable[e] = acc;
    }
}
