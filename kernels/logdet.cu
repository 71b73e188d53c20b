// log det G and G⁻¹ of a symmetric positive-definite G [n, n] — the LogDet diversity term, whose gradient
// is G⁻¹ — by a Cholesky factorisation in f64, in one block, so the step needs no host round trip.
// CPU twin: src/linalg.rs (cholesky, cholesky_logdet, cholesky_inverse) through CpuBackend::logdet_spd.
// Every product and difference uses __dmul_rn / __dsub_rn (no fused multiply-add) in the CPU twin's
// order, so L and G⁻¹ are the CPU's bit for bit; only log() may differ in the last bit.
// A G that is not positive definite (or not finite) gives NaN for the value and every inverse element, as
// on the CPU; the trainer's non-finite guard reports it.
// Scratch: l and y, n·n doubles each.

// d is a usable pivot: positive and finite (NaN fails the first test).
__device__ __forceinline__ bool good_pivot(double d) { return d > 0.0 && d <= 1.7976931348623157e308; }

extern "C" __global__ void logdet_spd_f32(float* value, float* inverse, double* l, double* y, const float* g,
                                          unsigned int n) {
    __shared__ int failed;
    const unsigned int t = threadIdx.x, nt = blockDim.x;
    const unsigned long long nn = (unsigned long long)n * n;
    for (unsigned long long e = t; e < nn; e += nt) l[e] = (double)g[e];
    if (t == 0) failed = 0;
    __syncthreads();
    // Right-looking: at step k the pivot l[k][k] holds a[k][k] − Σ_{m<k} L[k][m]², the column below it
    // a[i][k] − Σ_{m<k} L[i][m] L[k][m]; both are finished here, then the trailing block is updated.
    for (unsigned int k = 0; k < n; k++) {
        if (t == 0) {
            double d = l[(unsigned long long)k * n + k];
            if (!good_pivot(d)) failed = 1;
            else l[(unsigned long long)k * n + k] = sqrt(d);
        }
        __syncthreads();
        if (failed) break;  // shared, read after the barrier: every thread leaves together
        const double dkk = l[(unsigned long long)k * n + k];
        for (unsigned int i = k + 1 + t; i < n; i += nt) l[(unsigned long long)i * n + k] /= dkk;
        __syncthreads();
        const unsigned int m = n - k - 1;
        for (unsigned long long e = t; e < (unsigned long long)m * m; e += nt) {
            const unsigned int i = k + 1 + (unsigned int)(e / m), j = k + 1 + (unsigned int)(e % m);
            if (j <= i) {
                double* a = l + (unsigned long long)i * n + j;
                *a = __dsub_rn(*a, __dmul_rn(l[(unsigned long long)i * n + k], l[(unsigned long long)j * n + k]));
            }
        }
        __syncthreads();
    }
    if (failed) {
        for (unsigned long long e = t; e < nn; e += nt) inverse[e] = QNAN;
        if (t == 0) value[0] = QNAN;
        return;
    }
    if (t == 0) {
        double s = 0.0;
        for (unsigned int i = 0; i < n; i++) s += log(l[(unsigned long long)i * n + i]);
        value[0] = (float)(s * 2.0);
    }
    // G⁻¹ column by column (one thread per column c): L y = e_c forward, then Lᵀ x = y backward, x
    // overwriting y in place (x[i] needs y[i] and the x[k > i] already written). y is stored row-major,
    // y[i][c], so the threads of a warp touch adjacent columns.
    for (unsigned int c = t; c < n; c += nt) {
        for (unsigned int i = 0; i < n; i++) {
            double s = i == c ? 1.0 : 0.0;
            for (unsigned int k = 0; k < i; k++)
                s = __dsub_rn(s, __dmul_rn(l[(unsigned long long)i * n + k], y[(unsigned long long)k * n + c]));
            y[(unsigned long long)i * n + c] = s / l[(unsigned long long)i * n + i];
        }
        for (int i = (int)n - 1; i >= 0; i--) {
            double s = y[(unsigned long long)i * n + c];
            for (unsigned int k = i + 1; k < n; k++)
                s = __dsub_rn(s, __dmul_rn(l[(unsigned long long)k * n + i], y[(unsigned long long)k * n + c]));
            y[(unsigned long long)i * n + c] = s / l[(unsigned long long)i * n + i];
        }
        for (unsigned int i = 0; i < n; i++) inverse[(unsigned long long)i * n + c] = (float)y[(unsigned long long)i * n + c];
    }
}
