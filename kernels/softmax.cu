// Row softmax / log-softmax and their backward. CPU twins: `softmax*` / `log_softmax*` in src/backend/cpu.rs.
// One warp per row, loops over the row in strides of 32 lanes, so any number of columns works (the
// item-vocabulary rows of full cross-entropy included). Max-subtraction keeps expf in range.

extern "C" __global__ void softmax_f32(float* y, const float* x, unsigned int rows, unsigned int cols) {
    WARP_ROWS(r, rows) {
        const float* xr = x + r * cols;
        const RowExp e = warp_row_exp(xr, cols, lane);
        const float mx = e.mx, s = e.s;
        float* yr = y + r * cols;
        for (unsigned int i = lane; i < cols; i += 32) yr[i] = expf(xr[i] - mx) / s;
    }
}

// dx += y ∘ (dy − Σ dy·y).
extern "C" __global__ void softmax_backward_f32(float* dx, const float* y, const float* dy, unsigned int rows,
                                                unsigned int cols) {
    WARP_ROWS(r, rows) {
        const float* yr = y + r * cols;
        const float* g = dy + r * cols;
        float dot = 0.0f;
        for (unsigned int i = lane; i < cols; i += 32) dot += yr[i] * g[i];
        dot = warp_sum(dot);
        float* d = dx + r * cols;
        for (unsigned int i = lane; i < cols; i += 32) d[i] += yr[i] * (g[i] - dot);
    }
}

extern "C" __global__ void log_softmax_f32(float* y, const float* x, unsigned int rows, unsigned int cols) {
    WARP_ROWS(r, rows) {
        const float* xr = x + r * cols;
        const RowExp e = warp_row_exp(xr, cols, lane);
        const float lse = e.mx + logf(e.s);
        float* yr = y + r * cols;
        for (unsigned int i = lane; i < cols; i += 32) yr[i] = xr[i] - lse;
    }
}

// dx += dy − e^y Σ dy.
extern "C" __global__ void log_softmax_backward_f32(float* dx, const float* y, const float* dy, unsigned int rows,
                                                    unsigned int cols) {
    WARP_ROWS(r, rows) {
        const float* yr = y + r * cols;
        const float* g = dy + r * cols;
        float s = 0.0f;
        for (unsigned int i = lane; i < cols; i += 32) s += g[i];
        s = warp_sum(s);
        float* d = dx + r * cols;
        for (unsigned int i = lane; i < cols; i += 32) d[i] += g[i] - expf(yr[i]) * s;
    }
}
