// Losses and their backward. CPU twins: `bpr`, `bce_logits`, `cross_entropy`, `kl_div`, `mse` in
// src/backend/cpu.rs. Forward: per-element (or per-row) terms are summed in f64 by the same fixed-grid,
// two-stage scheme as reduce.cu (stage 1 here, stage 2 = `reduce_finish_f32`), so the loss is
// deterministic and the 1-element result never leaves the device. Backward: `dloss` is the 1-element
// upstream gradient, read on the device (no host sync); each scale is computed as `dloss[0] / count`
// exactly as the CPU does.

__device__ __forceinline__ float softplus_f(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }
__device__ __forceinline__ float sigmoid_f(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    float e = expf(x);
    return e / (1.0f + e);
}

#define BLOCK_STRIDE(i, n) \
    for (unsigned long long i = (unsigned long long)blockIdx.x * BLOCK + threadIdx.x; i < (n); \
         i += (unsigned long long)gridDim.x * BLOCK)

// ---- BPR: mean_{r,k} softplus(neg[r,k] − pos[r]) --------------------------------------------------------
extern "C" __global__ void bpr_partials_f32(double* partials, const float* pos, const float* neg, unsigned int rows,
                                            unsigned int k) {
    double acc = 0.0;
    BLOCK_STRIDE(e, (unsigned long long)rows * k) acc += (double)softplus_f(neg[e] - pos[e / k]);
    double s = block_sum_d(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// dneg[r,k] += scale · σ(neg − pos).
extern "C" __global__ void bpr_backward_neg_f32(float* dneg, const float* pos, const float* neg, const float* dloss,
                                                unsigned int rows, unsigned int k, float count) {
    float scale = dloss[0] / count;
    GRID_STRIDE(e, (unsigned long long)rows * k) dneg[e] += scale * sigmoid_f(neg[e] - pos[e / k]);
}

// dpos[r] −= Σ_k scale · σ(neg − pos): one thread per row, subtracting in the CPU's order.
extern "C" __global__ void bpr_backward_pos_f32(float* dpos, const float* pos, const float* neg, const float* dloss,
                                                unsigned int rows, unsigned int k, float count) {
    float scale = dloss[0] / count;
    GRID_STRIDE(r, (unsigned long long)rows) {
        float v = dpos[r];
        for (unsigned int t = 0; t < k; t++) v -= scale * sigmoid_f(neg[r * k + t] - pos[r]);
        dpos[r] = v;
    }
}

// ---- BCE with logits: mean softplus(x) − y·x = −[y log σ(x) + (1−y) log(1−σ(x))] -----------------------
extern "C" __global__ void bce_partials_f32(double* partials, const float* x, const float* y, unsigned long long n) {
    double acc = 0.0;
    BLOCK_STRIDE(e, n) acc += (double)(softplus_f(x[e]) - y[e] * x[e]);
    double s = block_sum_d(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

extern "C" __global__ void bce_backward_f32(float* dx, const float* x, const float* y, const float* dloss,
                                            unsigned long long n, float count) {
    float scale = dloss[0] / count;
    GRID_STRIDE(e, n) dx[e] += scale * (sigmoid_f(x[e]) - y[e]);
}

// ---- MSE: mean (a − b)² (difference in f32, square in f64, as the CPU) ---------------------------------
extern "C" __global__ void mse_partials_f32(double* partials, const float* a, const float* b, unsigned long long n) {
    double acc = 0.0;
    BLOCK_STRIDE(e, n) {
        double dv = (double)(a[e] - b[e]);
        acc += dv * dv;
    }
    double s = block_sum_d(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// ---- cross-entropy: per-row lse − x[target], then the mean by reduce.cu --------------------------------
// A target past the row (a caller bug the CPU asserts on) yields NaN, so it cannot pass silently.
extern "C" __global__ void cross_entropy_rows_f32(float* rowloss, const float* logits, const unsigned int* target,
                                                  unsigned int rows, unsigned int cols) {
    WARP_ROWS(r, rows) {
        const float* xr = logits + r * cols;
        const RowExp e = warp_row_exp(xr, cols, lane);
        const float lse = e.mx + logf(e.s);
        unsigned int t = target[r];
        if (lane == 0) rowloss[r] = t < cols ? lse - xr[t] : QNAN;
    }
}

// dx[r] += scale · (softmax(x[r]) − onehot(target[r])).
extern "C" __global__ void cross_entropy_backward_f32(float* dx, const float* logits, const unsigned int* target,
                                                      const float* dloss, unsigned int rows, unsigned int cols,
                                                      float count) {
    float scale = dloss[0] / count;
    WARP_ROWS(r, rows) {
        const float* xr = logits + r * cols;
        const RowExp e = warp_row_exp(xr, cols, lane);
        const float mx = e.mx, s = e.s;
        unsigned int t = target[r];
        float* d = dx + r * cols;
        for (unsigned int i = lane; i < cols; i += 32) {
            float v = d[i] + scale * (expf(xr[i] - mx) / s);
            if (i == t) v -= scale;
            d[i] = v;
        }
    }
}

// ---- KL(teacher ‖ softmax(logits)), 'batchmean' ------------------------------------------------------------
// Per row Σ_i t_i (log t_i − log q_i) with 0·log 0 = 0, summed in f64; the mean over rows by reduce.cu.
extern "C" __global__ void kl_rows_f32(float* rowloss, const float* logits, const float* teacher, unsigned int rows,
                                       unsigned int cols) {
    WARP_ROWS(r, rows) {
        const float* xr = logits + r * cols;
        const float* tr = teacher + r * cols;
        const RowExp e = warp_row_exp(xr, cols, lane);
        const float lse = e.mx + logf(e.s);
        double acc = 0.0;
        for (unsigned int i = lane; i < cols; i += 32) {
            float p = tr[i];
            if (p > 0.0f) acc += (double)(p * (logf(p) - (xr[i] - lse)));
        }
        acc = warp_sum_d(acc);
        if (lane == 0) rowloss[r] = (float)acc;
    }
}

// dx[r] += scale · (Σt · softmax(x[r]) − t[r]) (Σt = 1 for a proper teacher; kept general like the CPU).
extern "C" __global__ void kl_backward_f32(float* dx, const float* logits, const float* teacher, const float* dloss,
                                           unsigned int rows, unsigned int cols, float count) {
    float scale = dloss[0] / count;
    WARP_ROWS(r, rows) {
        const float* xr = logits + r * cols;
        const float* tr = teacher + r * cols;
        float ts = 0.0f;
        for (unsigned int i = lane; i < cols; i += 32) ts += tr[i];
        ts = warp_sum(ts);
        const RowExp e = warp_row_exp(xr, cols, lane);
        const float mx = e.mx, s = e.s;
        float* d = dx + r * cols;
        for (unsigned int i = lane; i < cols; i += 32) d[i] += scale * (ts * expf(xr[i] - mx) / s - tr[i]);
    }
}
