// Layer norm over the last dimension. CPU twin: `layer_norm` / `layer_norm_backward` in src/backend/cpu.rs.
// One warp per row (rows are short: d = 64..256), so the row statistics need only shuffles, no shared
// memory or block syncs. Mean and variance accumulate in f64 like the CPU twin, so mean/rstd agree to
// the last bit or two. The parameter gradients are column sums, done by a separate deterministic kernel.

// Every lane of a warp gets the same row, so the whole warp takes the same branches (full-mask shuffles).

extern "C" __global__ void layer_norm_f32(float* y, float* mean, float* rstd, const float* x, const float* gamma,
                                          const float* beta, unsigned int rows, unsigned int cols, float eps) {
    WARP_ROWS(r, rows) {
        const float* xr = x + r * cols;
        double s = 0.0;
        for (unsigned int i = lane; i < cols; i += 32) s += (double)xr[i];
        double m = warp_sum_d(s) / (double)cols;
        double q = 0.0;
        for (unsigned int i = lane; i < cols; i += 32) {
            double dv = (double)xr[i] - m;
            q += dv * dv;
        }
        double var = warp_sum_d(q) / (double)cols;
        double rs = 1.0 / sqrt(var + (double)eps);
        float* yr = y + r * cols;
        for (unsigned int i = lane; i < cols; i += 32) yr[i] = (float)(((double)xr[i] - m) * rs) * gamma[i] + beta[i];
        if (lane == 0) {
            mean[r] = (float)m;
            rstd[r] = (float)rs;
        }
    }
}

// dx += rstd · (dŷ − mean(dŷ) − x̂ · mean(dŷ·x̂)), dŷ = dy·gamma.
extern "C" __global__ void layer_norm_backward_dx_f32(float* dx, const float* x, const float* gamma, const float* mean,
                                                      const float* rstd, const float* dy, unsigned int rows,
                                                      unsigned int cols) {
    WARP_ROWS(r, rows) {
        const float* xr = x + r * cols;
        const float* g = dy + r * cols;
        float m = mean[r], rs = rstd[r];
        float s1 = 0.0f, s2 = 0.0f;
        for (unsigned int i = lane; i < cols; i += 32) {
            float xh = (xr[i] - m) * rs;
            float dh = g[i] * gamma[i];
            s1 += dh;
            s2 += dh * xh;
        }
        s1 = warp_sum(s1) / (float)cols;
        s2 = warp_sum(s2) / (float)cols;
        float* d = dx + r * cols;
        for (unsigned int i = lane; i < cols; i += 32) {
            float xh = (xr[i] - m) * rs;
            d[i] += rs * (g[i] * gamma[i] - s1 - xh * s2);
        }
    }
}

// dgamma[c] += Σ_r dy[r, c] · x̂[r, c]. Same fixed-order column reduction as `sum_rows_into_f32`
// (dbeta is exactly that kernel applied to dy).
extern "C" __global__ void layer_norm_dgamma_f32(float* dgamma, const float* x, const float* mean, const float* rstd,
                                                 const float* dy, unsigned int rows, unsigned int cols) {
    __shared__ double sh[16][33];
    unsigned int c = blockIdx.x * 32 + threadIdx.x;
    double acc = 0.0;
    if (c < cols) {
        for (unsigned int r = threadIdx.y; r < rows; r += 16) {
            unsigned long long e = (unsigned long long)r * cols + c;
            float xh = (x[e] - mean[r]) * rstd[r];
            acc += (double)(dy[e] * xh);
        }
    }
    sh[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        double s = 0.0;
        for (int y = 0; y < 16; y++) s += sh[y][threadIdx.x];
        dgamma[c] += (float)s;
    }
}
