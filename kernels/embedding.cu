// Embedding gather and its backward. CPU twins: `gather_rows` / `scatter_add_rows` in src/backend/cpu.rs.
// The gather is one thread per output element (coalesced along the row). The backward scatters with
// float atomics because several tokens can share an item; atomics make the summation order (and so the
// last bits) run-dependent. A deterministic sorted-segment variant is the `--deterministic` follow-up.
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
