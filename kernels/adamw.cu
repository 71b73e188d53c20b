// Fused AdamW over the flat buffers (every trainable parameter's range in one launch), gated by the step's
// verdict in the device-side step log (train::step_log), so the host never reads a step's gradients
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

// Every segment of the flat buffers in one launch (one block per (segment, block of the segment)): segment s
// at learning rate lr<s.group> (up to 8 groups, passed as arguments: MAX_LR_GROUPS in src/backend/mod.rs),
// its group's clip scale row[scales_at + s.group], its step count counts[s.param] + 1.
// row[ok_at] is the step's verdict: 0 skips the update.
extern "C" __global__ void adamw_segments_f32(float* p, const float* g, float* m, float* v, const unsigned int* segs,
                                              unsigned int nsegs, float beta1, float beta2, float eps,
                                              const double* row, unsigned int ok_at, unsigned int scales_at,
                                              const unsigned int* counts, float lr0, float lr1, float lr2, float lr3,
                                              float lr4, float lr5, float lr6, float lr7) {
    const float lrs[8] = {lr0, lr1, lr2, lr3, lr4, lr5, lr6, lr7};
    if (row[ok_at] == 0.0) return;
    const Seg sg = segment_of_block(segs, nsegs, blockIdx.x);
    const float grad_scale = (float)row[scales_at + sg.group];
    const unsigned long long t = (unsigned long long)counts[sg.param] + 1ull;
    const float bc1 = bias_correction(beta1, t), bc2 = bias_correction(beta2, t);
    const float lr = lrs[sg.group];
    // 1 − lr·wd rounded as the host rounds it (no FMA).
    const float decay = __fsub_rn(1.0f, __fmul_rn(lr, sg.weight_decay));
    float* ps = p + sg.offset;
    const float* gs = g + sg.offset;
    float* ms = m + sg.offset;
    float* vs = v + sg.offset;
    for (unsigned long long i = (unsigned long long)sg.block * blockDim.x + threadIdx.x; i < sg.len;
         i += (unsigned long long)sg.blocks * blockDim.x) {
        float gi = gs[i] * grad_scale;
        float mi = beta1 * ms[i] + (1.0f - beta1) * gi;
        float vi = beta2 * vs[i] + (1.0f - beta2) * gi * gi;
        ms[i] = mi;
        vs[i] = vi;
        float mhat = mi / bc1;
        float vhat = vi / bc2;
        ps[i] = ps[i] * decay - lr * mhat / (sqrtf(vhat) + eps);
    }
}

// counts[s.param] += 1 for each segment s (distinct parameters), if the step's verdict allowed the update.
// Runs after adamw_segments_f32 (stream order), which read the counts before it.
extern "C" __global__ void advance_steps_u32(unsigned int* counts, const unsigned int* segs, unsigned int nsegs,
                                             const double* row, unsigned int ok_at) {
    if (row[ok_at] == 0.0) return;
    for (unsigned int s = blockIdx.x * blockDim.x + threadIdx.x; s < nsegs; s += gridDim.x * blockDim.x) {
        counts[segs[s * SEG_WORDS + 4]] += 1u;
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
