// Fused AdamW over one parameter range (the launcher offsets p, g, m, v to the range start).
// CPU twin: `adamw` in src/backend/cpu.rs; the arithmetic is written in the same order so results agree
// to rounding. Decoupled weight decay: p ← p·(1 − lr·wd) − lr·m̂ / (√v̂ + eps); the gradient is first
// multiplied by grad_scale (gradient-norm clipping), so clipping never needs its own pass.

extern "C" __global__ void adamw_f32(float* p, const float* g, float* m, float* v, unsigned long long n,
                                     float lr, float beta1, float beta2, float eps, float decay, float grad_scale,
                                     float bc1, float bc2) {
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
