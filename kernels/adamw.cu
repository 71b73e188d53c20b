// Fused AdamW over one parameter range (the launcher offsets p, g, m, v to the range start), gated by the
// step's verdict in the device-side step log (train::step_log), so the host never reads a step's gradients
// before its update. CPU twin: `adamw` in src/backend/cpu.rs; the arithmetic is written in the same order so
// results agree to rounding. Decoupled weight decay: p ← p·(1 − lr·wd) − lr·m̂ / (√v̂ + eps); the gradient is
// first multiplied by the clip scale the verdict wrote (gradient-norm clipping), so clipping never needs
// its own pass.

// 1 − beta^t with beta^t by squaring in f64: the same products in the same order as
// `backend::bias_correction`, each correctly rounded (__dmul_rn / __dsub_rn: no FMA contraction), so the
// host and the device agree bit for bit.
__device__ float bias_correction(float beta, unsigned long long t) {
    double r = 1.0, a = (double)beta;
    while (t > 0) {
        if (t & 1ull) r = __dmul_rn(r, a);
        t >>= 1;
        if (t > 0) a = __dmul_rn(a, a);
    }
    return (float)__dsub_rn(1.0, r);
}

// row: the step's log row; ok_at: its verdict (0 = skip); scale_at: this parameter's group clip scale;
// counts[param]: the parameter's AdamW steps so far (this update is step counts[param] + 1).
extern "C" __global__ void adamw_f32(float* p, const float* g, float* m, float* v, unsigned long long n,
                                     float lr, float beta1, float beta2, float eps, float decay,
                                     const double* row, unsigned int ok_at, unsigned int scale_at,
                                     const unsigned int* counts, unsigned int param) {
    if (row[ok_at] == 0.0) return;
    const float grad_scale = (float)row[scale_at];
    const unsigned long long t = (unsigned long long)counts[param] + 1ull;
    const float bc1 = bias_correction(beta1, t), bc2 = bias_correction(beta2, t);
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        float gi = g[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float mhat = mi / bc1;
        float vhat = vi / bc2;
        p[i] = p[i] * decay - lr * mhat / (sqrtf(vhat) + eps);
    }
}

// counts[params[j]] += 1 for each of the n stepped parameters (distinct), if the step's verdict allowed
// the update. Runs after the step's adamw_f32 launches (stream order), which read the counts before it.
extern "C" __global__ void advance_steps_u32(unsigned int* counts, const unsigned int* params, unsigned int n,
                                         const double* row, unsigned int ok_at) {
    if (row[ok_at] == 0.0) return;
    for (unsigned int j = blockIdx.x * blockDim.x + threadIdx.x; j < n; j += gridDim.x * blockDim.x) {
        counts[params[j]] += 1u;
    }
}

// The step's verdict on its log row (CPU twin: `CpuBackend::step_verdict`). One thread: the row holds a few
// dozen numbers, and a fixed sequential order gives the host's bits. ok = the checked loss and every
// gradient sum finite; each group's clip scale = min(1, clip / (√(Σ its sums, in row order) + 1e−6)).
extern "C" __global__ void step_verdict_f64(double* row, const unsigned int* groups, unsigned int sums,
                                        unsigned int checked_at, unsigned int ok_at, unsigned int scales_at,
                                        unsigned int ngroups, float clip) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    bool ok = isfinite(row[checked_at]);
    for (unsigned int j = 0; j < sums; j++) ok = ok && isfinite(row[j]);
    row[ok_at] = ok ? 1.0 : 0.0;
    for (unsigned int gr = 0; gr < ngroups; gr++) {
        double s = -0.0;  // Rust's f64 `sum` starts from −0.0
        for (unsigned int j = 0; j < sums; j++) {
            if (groups[j] == gr) s = __dadd_rn(s, row[j]);
        }
        const double norm = sqrt(s);
        float scale = 1.0f;
        if (clip > 0.0f) scale = (float)fmin(__ddiv_rn((double)clip, __dadd_rn(norm, 1e-6)), 1.0);
        row[scales_at + gr] = (double)scale;
    }
}
