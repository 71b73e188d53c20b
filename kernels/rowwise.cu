// Row-wise ops over the last dimension and column indexing. CPU twins in src/backend/cpu.rs under the
// same names. Row reductions use one warp per row (shuffles only); pure copies use one thread per element.

// y[r] = x[r] / max(‖x[r]‖, eps); norms[r] = ‖x[r]‖ (kept for the backward).
extern "C" __global__ void l2_normalize_f32(float* y, float* norms, const float* x, unsigned int rows,
                                            unsigned int cols, float eps) {
    WARP_ROWS(r, rows) {
        const float* xr = x + r * cols;
        float s = 0.0f;
        for (unsigned int i = lane; i < cols; i += 32) s += xr[i] * xr[i];
        float n = sqrtf(warp_sum(s));
        float inv = 1.0f / fmaxf(n, eps);
        float* yr = y + r * cols;
        for (unsigned int i = lane; i < cols; i += 32) yr[i] = xr[i] * inv;
        if (lane == 0) norms[r] = n;
    }
}

// Below eps the forward was a plain scaling x/eps; above, y = x/n and dx = (g − y (y·g)) / n.
extern "C" __global__ void l2_normalize_backward_f32(float* dx, const float* x, const float* norms, const float* dy,
                                                     unsigned int rows, unsigned int cols, float eps) {
    WARP_ROWS(r, rows) {
        const float* xr = x + r * cols;
        const float* g = dy + r * cols;
        float* d = dx + r * cols;
        float n = norms[r];
        if (n <= eps) {
            for (unsigned int i = lane; i < cols; i += 32) d[i] += g[i] / eps;
        } else {
            float dot = 0.0f;
            for (unsigned int i = lane; i < cols; i += 32) dot += xr[i] * g[i];
            dot = warp_sum(dot) / n;
            for (unsigned int i = lane; i < cols; i += 32) d[i] += (g[i] - xr[i] / n * dot) / n;
        }
    }
}

// out[r] = a[r] · b[r].
extern "C" __global__ void row_dot_f32(float* out, const float* a, const float* b, unsigned int rows, unsigned int cols) {
    WARP_ROWS(r, rows) {
        float s = 0.0f;
        for (unsigned int i = lane; i < cols; i += 32) s += a[r * cols + i] * b[r * cols + i];
        s = warp_sum(s);
        if (lane == 0) out[r] = s;
    }
}

// dx[r, :] += g[r] · other[r, :] (the backward of row_dot).
extern "C" __global__ void row_scale_acc_f32(float* dx, const float* g, const float* other, unsigned long long n,
                                             unsigned int cols) {
    GRID_STRIDE(i, n) dx[i] += g[i / cols] * other[i];
}

// out[r] = [a[r] | b[r]].
extern "C" __global__ void concat_cols_f32(float* out, const float* a, const float* b, unsigned int rows,
                                           unsigned int ca, unsigned int cb) {
    unsigned int w = ca + cb;
    GRID_STRIDE(i, (unsigned long long)rows * w) {
        unsigned long long r = i / w;
        unsigned int c = (unsigned int)(i - r * w);
        out[i] = c < ca ? a[r * ca + c] : b[r * cb + (c - ca)];
    }
}

// d[r, c] += g[r, col0 + c] for c < width, g having `total` columns: one half of split_cols_acc.
extern "C" __global__ void split_cols_acc_f32(float* d, const float* g, unsigned int rows, unsigned int width,
                                              unsigned int total, unsigned int col0) {
    GRID_STRIDE(i, (unsigned long long)rows * width) {
        unsigned long long r = i / width;
        unsigned int c = (unsigned int)(i - r * width);
        d[i] += g[r * total + col0 + c];
    }
}

// out[r, t] = x[r, idx[r, t]]; an out-of-range column (a caller bug the CPU asserts on) reads 0.
extern "C" __global__ void gather_cols_f32(float* out, const float* x, const unsigned int* idx, unsigned int rows,
                                           unsigned int c, unsigned int j) {
    GRID_STRIDE(i, (unsigned long long)rows * j) {
        unsigned long long r = i / j;
        unsigned int col = idx[i];
        out[i] = col < c ? x[r * c + col] : 0.0f;
    }
}

// dx[r, idx[r, t]] += dy[r, t]. One thread per row walks its J indices in order: repeated indices within
// a row are summed in the CPU's order, with no atomics (J is small: the candidate count).
extern "C" __global__ void gather_cols_backward_f32(float* dx, const float* dy, const unsigned int* idx,
                                                    unsigned int rows, unsigned int c, unsigned int j) {
    GRID_STRIDE(r, (unsigned long long)rows) {
        for (unsigned int t = 0; t < j; t++) {
            unsigned int col = idx[r * j + t];
            if (col < c) dx[r * c + col] += dy[r * j + t];
        }
    }
}

// out[r, t] = h[r] · table[idx[r, t]]: one warp per (row, candidate) pair, lanes along d.
extern "C" __global__ void score_candidates_f32(float* out, const float* h, const float* table, const unsigned int* idx,
                                                unsigned int rows, unsigned int d, unsigned int j,
                                                unsigned int table_rows) {
    WARP_ROWS(p, (unsigned long long)rows * j) {
        unsigned long long r = p / j;
        unsigned int item = idx[p];
        float s = 0.0f;
        if (item < table_rows) {
            const float* e = table + (unsigned long long)item * d;
            for (unsigned int i = lane; i < d; i += 32) s += h[r * d + i] * e[i];
        }
        s = warp_sum(s);
        if (lane == 0) out[p] = s;
    }
}

// dh[r] += Σ_t dy[r, t] · table[idx[r, t]]: one warp per row, lanes along d, no atomics.
extern "C" __global__ void score_candidates_backward_dh_f32(float* dh, const float* table, const unsigned int* idx,
                                                            const float* dy, unsigned int rows, unsigned int d,
                                                            unsigned int j, unsigned int table_rows) {
    WARP_ROWS(r, rows) {
        for (unsigned int i = lane; i < d; i += 32) {
            float acc = dh[r * d + i];
            for (unsigned int t = 0; t < j; t++) {
                unsigned int item = idx[r * j + t];
                if (item < table_rows) acc += dy[r * j + t] * table[(unsigned long long)item * d + i];
            }
            dh[r * d + i] = acc;
        }
    }
}

// dtable[idx[r, t]] += dy[r, t] · h[r]: candidates repeat across rows, so float atomics (order-dependent
// last bits, like the embedding backward).
extern "C" __global__ void score_candidates_backward_dtable_f32(float* dtable, const float* h, const unsigned int* idx,
                                                                const float* dy, unsigned int rows, unsigned int d,
                                                                unsigned int j, unsigned int table_rows) {
    GRID_STRIDE(e, (unsigned long long)rows * j * d) {
        unsigned long long p = e / d;
        unsigned int i = (unsigned int)(e - p * d);
        unsigned long long r = p / j;
        unsigned int item = idx[p];
        if (item < table_rows) atomicAdd(&dtable[(unsigned long long)item * d + i], dy[p] * h[r * d + i]);
    }
}
