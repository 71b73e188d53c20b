// Fused InfoNCE against the memory bank. CPU twin: src/backend/cpu_infonce.rs (same candidate set, same
// masking, f32 logits, f64 log-sum-exp). For query i the candidate columns are the B in-batch keys (k_i is
// its positive) and the K bank slots; a slot is masked when its user equals the query's user, except user 0.
// Logit = (q · key, an f32 dot product) / τ. The [B, B+K] logits never reach memory.
//
// Tiled like a GEMM (gpu-toolchain.md roofline: 2·B·K·D FLOP against one read of the bank): a block takes
// TQ queries and a RANGE of candidate columns, computes TQ × TC logit tiles from shared-memory chunks of
// DCH dimensions (each thread 4 queries × 4 candidates), and keeps an online log-sum-exp per query; so every
// bank row is read once per TQ queries instead of once per query. A merge kernel combines the per-range
// partials in a fixed order (deterministic). The backward's dq is P · keys over the same tiles, written as
// per-range partials and summed in a fixed order; dk (in-batch keys only) is a small per-key kernel.
// The bank is f32 or 16-bit storage (type T), widened as it is loaded. Tensor cores (mma in bf16 with f32
// accumulate) are the next step towards the memory floor; this is the CUDA-core version.

#define TQ 64        // queries per block
#define TC 64        // candidate columns per tile
#define DCH 32       // dimensions per shared-memory chunk
#define RANGE 1024   // candidate columns per block (a multiple of TC)
#define DQ 256       // dq dimensions accumulated per pass (d > DQ takes several passes)
#define WARPS (BLOCK / 32)
#define TILE 64
// infonce_dk: per-thread accumulators cover d ≤ BLOCK * MAX_PER_THREAD (the launcher checks).
#define MAX_PER_THREAD 4

// Column c: in-batch key c (c < b) or bank slot c − b, element x, as f32.
template <typename T>
__device__ __forceinline__ float column_value(unsigned int c, unsigned int x, const float* k, const T* bank,
                                              unsigned int b, unsigned int d) {
    return c < b ? k[(unsigned long long)c * d + x] : to_f32(bank[(unsigned long long)(c - b) * d + x]);
}

// Whether column c enters the log-sum-exp of a query of user `u`: in-batch keys always; bank slots unless
// written for the same (non-zero) user.
__device__ __forceinline__ bool column_included(unsigned int c, unsigned int u, const unsigned int* bank_users,
                                                unsigned int b) {
    if (c < b) return true;
    unsigned int su = bank_users[c - b];
    return su == 0 || su != u;
}

// Unscaled logits of queries q0.. (TQ of them) against columns c0.. (TC): thread (tx, ty) = (t % 16, t / 16)
// gets acc[a][j] = q_{q0+ty+16a} · col_{c0+tx+16j}, an f32 fmaf chain over the dimensions in order (the
// positive's logit is recomputed the same way in infonce_lse_merge, so it matches bit for bit). Rows or
// columns out of range read zeros. Every thread of the block must call it (it synchronises).
template <typename T>
__device__ __forceinline__ void tile_logits(float acc[4][4], float (*qs)[DCH + 1], float (*cs)[DCH + 1],
                                            const float* q, const float* k, const T* bank, unsigned int b,
                                            unsigned int ncols, unsigned int d, unsigned int q0, unsigned int c0) {
    const unsigned int tx = threadIdx.x & 15u, ty = threadIdx.x >> 4;
#pragma unroll
    for (int a = 0; a < 4; a++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[a][j] = 0.0f;
    for (unsigned int x0 = 0; x0 < d; x0 += DCH) {
        for (unsigned int e = threadIdx.x; e < TQ * DCH; e += BLOCK) {
            const unsigned int r = e / DCH, x = e % DCH, xx = x0 + x;
            const unsigned int qi = q0 + r, c = c0 + r;
            qs[r][x] = (qi < b && xx < d) ? q[(unsigned long long)qi * d + xx] : 0.0f;
            cs[r][x] = (c < ncols && xx < d) ? column_value(c, xx, k, bank, b, d) : 0.0f;
        }
        __syncthreads();
        const unsigned int xn = d - x0 < DCH ? d - x0 : DCH;
        for (unsigned int x = 0; x < xn; x++) {
            float qa[4], cb[4];
#pragma unroll
            for (int a = 0; a < 4; a++) qa[a] = qs[ty + 16 * a][x];
#pragma unroll
            for (int j = 0; j < 4; j++) cb[j] = cs[tx + 16 * j][x];
#pragma unroll
            for (int a = 0; a < 4; a++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[a][j] = fmaf(qa[a], cb[j], acc[a][j]);
        }
        __syncthreads();
    }
}

// (m, s) ⊕ logit l: running max and running Σ exp(l − m).
__device__ __forceinline__ void lse_add(double& m, double& s, double l) {
    if (l > m) {
        s = s * exp(m - l) + 1.0;
        m = l;
    } else {
        s += exp(l - m);
    }
}

// Grid (ranges, query tiles): the (max, Σ exp) of each query's logits over the block's RANGE of columns,
// into part_m / part_s [b, ranges] (f64; s = 0 where every column was masked).
template <typename T>
__device__ void infonce_lse_parts(double* part_m, double* part_s, const float* q, const float* k, const T* bank,
                                  const unsigned int* bank_users, const unsigned int* users, unsigned int b,
                                  unsigned int nbank, unsigned int d, double inv_tau) {
    __shared__ float qs[TQ][DCH + 1], cs[TC][DCH + 1];
    const unsigned int tx = threadIdx.x & 15u, ty = threadIdx.x >> 4;
    const unsigned int ncols = b + nbank, nranges = gridDim.x, r = blockIdx.x, q0 = blockIdx.y * TQ;
    const unsigned int cbeg = r * RANGE, cend = cbeg + RANGE < ncols ? cbeg + RANGE : ncols;
    double m[4], s[4];
    unsigned int uq[4];
#pragma unroll
    for (int a = 0; a < 4; a++) {
        const unsigned int qi = q0 + ty + 16 * a;
        m[a] = NEG_INF_D;
        s[a] = 0.0;
        uq[a] = qi < b ? users[qi] : 0;
    }
    for (unsigned int c0 = cbeg; c0 < cend; c0 += TC) {
        float acc[4][4];
        tile_logits(acc, qs, cs, q, k, bank, b, cend, d, q0, c0);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const unsigned int c = c0 + tx + 16 * j;
            if (c >= cend) continue;
#pragma unroll
            for (int a = 0; a < 4; a++)
                if (column_included(c, uq[a], bank_users, b)) lse_add(m[a], s[a], (double)acc[a][j] * inv_tau);
        }
    }
    // The 16 threads of a query row are the lanes of one half-warp that differ in their low 4 bits.
#pragma unroll
    for (int a = 0; a < 4; a++) {
        double mx = m[a];
        for (int o = 8; o > 0; o >>= 1) mx = fmax(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        double sum = s[a] > 0.0 ? s[a] * exp(m[a] - mx) : 0.0;
        for (int o = 8; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        const unsigned int qi = q0 + ty + 16 * a;
        if (tx == 0 && qi < b) {
            part_m[(unsigned long long)qi * nranges + r] = mx;
            part_s[(unsigned long long)qi * nranges + r] = sum;
        }
    }
}

// One thread per query: lse[i] from the ranges' partials in range order, and pos[i] = q_i · k_i / τ by the
// same fmaf chain as tile_logits.
extern "C" __global__ void infonce_lse_merge_f32(double* lse, double* pos, const double* part_m, const double* part_s,
                                                 const float* q, const float* k, unsigned int b, unsigned int nranges,
                                                 unsigned int d, double inv_tau) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= b) return;
    double mx = NEG_INF_D;
    for (unsigned int r = 0; r < nranges; r++)
        if (part_s[(unsigned long long)i * nranges + r] > 0.0) mx = fmax(mx, part_m[(unsigned long long)i * nranges + r]);
    double sum = 0.0;
    for (unsigned int r = 0; r < nranges; r++) {
        const double sr = part_s[(unsigned long long)i * nranges + r];
        if (sr > 0.0) sum += sr * exp(part_m[(unsigned long long)i * nranges + r] - mx);
    }
    lse[i] = mx + log(sum);
    float p = 0.0f;
    for (unsigned int x = 0; x < d; x++) p = fmaf(q[(unsigned long long)i * d + x], k[(unsigned long long)i * d + x], p);
    pos[i] = (double)p * inv_tau;
}

// out[0] = mean_i (lse_i − pos_i); one block, fixed order.
extern "C" __global__ void infonce_loss_f32(float* out, const double* lse, const double* pos, unsigned int b) {
    __shared__ double sh[BLOCK];
    double acc = 0.0;
    for (unsigned int i = threadIdx.x; i < b; i += BLOCK) acc += lse[i] - pos[i];
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = (float)(sh[0] / (double)(b > 0 ? b : 1));
}

// Grid (ranges, query tiles): part[r, i, :] = Σ_{c in range r} w_ic col_c with w_ic = exp(l_ic − lse_i) (0 when
// masked) minus 1 for the positive (c = i): the unscaled dq of the block's queries over its columns. Per
// tile the weights go to shared memory, then each thread accumulates 4 queries × DQ/16 dimensions from
// DCH-dimension chunks of the columns. Every block writes its whole [TQ, d] slice (zeros where it has no
// columns), so the reduce kernel can sum every range.
template <typename T>
__device__ void infonce_dq_parts(float* part, const double* lse, const float* q, const float* k, const T* bank,
                                 const unsigned int* bank_users, const unsigned int* users, unsigned int b,
                                 unsigned int nbank, unsigned int d, double inv_tau) {
    __shared__ float qs[TQ][DCH + 1], cs[TC][DCH + 1];
    __shared__ float ws[TQ][TC + 1];
    const unsigned int tx = threadIdx.x & 15u, ty = threadIdx.x >> 4;
    const unsigned int ncols = b + nbank, r = blockIdx.x, q0 = blockIdx.y * TQ;
    const unsigned int cbeg = r * RANGE, cend = cbeg + RANGE < ncols ? cbeg + RANGE : ncols;
    double lq[4];
    unsigned int uq[4];
#pragma unroll
    for (int a = 0; a < 4; a++) {
        const unsigned int qi = q0 + ty + 16 * a;
        lq[a] = qi < b ? lse[qi] : 0.0;
        uq[a] = qi < b ? users[qi] : 0;
    }
    for (unsigned int x0 = 0; x0 < d; x0 += DQ) {
        float acc_dq[4][DQ / 16];
#pragma unroll
        for (int a = 0; a < 4; a++)
#pragma unroll
            for (int jj = 0; jj < DQ / 16; jj++) acc_dq[a][jj] = 0.0f;
        for (unsigned int c0 = cbeg; c0 < cend; c0 += TC) {
            float acc[4][4];
            tile_logits(acc, qs, cs, q, k, bank, b, cend, d, q0, c0);
#pragma unroll
            for (int a = 0; a < 4; a++) {
                const unsigned int qi = q0 + ty + 16 * a;
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const unsigned int c = c0 + tx + 16 * j;
                    float w = 0.0f;
                    if (qi < b && c < cend && column_included(c, uq[a], bank_users, b)) {
                        w = (float)exp((double)acc[a][j] * inv_tau - lq[a]);
                        if (c == qi) w -= 1.0f;
                    }
                    ws[ty + 16 * a][tx + 16 * j] = w;
                }
            }
            __syncthreads();
#pragma unroll
            for (unsigned int xs = 0; xs < DQ; xs += DCH) {
                for (unsigned int e = threadIdx.x; e < TC * DCH; e += BLOCK) {
                    const unsigned int t = e / DCH, x = e % DCH, c = c0 + t, xx = x0 + xs + x;
                    cs[t][x] = (c < cend && xx < d) ? column_value(c, xx, k, bank, b, d) : 0.0f;
                }
                __syncthreads();
                for (unsigned int t = 0; t < TC; t++) {
                    const float k0 = cs[t][tx], k1 = cs[t][tx + 16];
#pragma unroll
                    for (int a = 0; a < 4; a++) {
                        const float w = ws[ty + 16 * a][t];
                        acc_dq[a][xs / 16] = fmaf(w, k0, acc_dq[a][xs / 16]);
                        acc_dq[a][xs / 16 + 1] = fmaf(w, k1, acc_dq[a][xs / 16 + 1]);
                    }
                }
                __syncthreads();
            }
        }
#pragma unroll
        for (int a = 0; a < 4; a++) {
            const unsigned int qi = q0 + ty + 16 * a;
#pragma unroll
            for (int jj = 0; jj < DQ / 16; jj++) {
                // acc_dq[a][jj] holds dimension x0 + 16·jj + tx (chunk xs = 16·jj for even jj: k0; odd: k1).
                const unsigned int xx = x0 + 16 * jj + tx;
                if (qi < b && xx < d) part[((unsigned long long)r * b + qi) * d + xx] = acc_dq[a][jj];
            }
        }
    }
}

// dq[i, :] += dloss · (1/τ) / B · Σ_r part[r, i, :], ranges summed in order (deterministic).
extern "C" __global__ void infonce_dq_reduce_f32(float* dq, const float* part, const float* dloss, unsigned int b,
                                                 unsigned int nranges, unsigned int d, double inv_tau) {
    const unsigned long long n = (unsigned long long)b * d;
    const double scale = (double)dloss[0] * inv_tau / (double)b;
    GRID_STRIDE(e, n) {
        double acc = 0.0;
        for (unsigned int r = 0; r < nranges; r++) acc += (double)part[(unsigned long long)r * n + e];
        dq[e] += (float)(acc * scale);
    }
}

// Warp-wide q·key / τ in f64 (products in f32), for infonce_dk.
__device__ __forceinline__ double logit_f64(const float* q, const float* key, unsigned int d, double inv_tau,
                                            unsigned int lane) {
    double s = 0.0;
    for (unsigned int x = lane; x < d; x += 32) s += (double)(q[x] * key[x]);
    return warp_sum_d(s) * inv_tau;
}

// dk_j += scale · (Σ_i p_ij q_i − q_j): one block per key j, tiles over queries i. The bank gets no gradient.
extern "C" __global__ void infonce_dk_f32(float* dk, const double* lse, const float* q, const float* k,
                                          const float* dloss, unsigned int b, unsigned int d, double inv_tau) {
    __shared__ double coeff[TILE];
    const unsigned int j = blockIdx.x, lane = threadIdx.x & 31u, w = threadIdx.x >> 5;
    const float* kj = k + (unsigned long long)j * d;
    const double scale = (double)dloss[0] * inv_tau / (double)b;
    double acc[MAX_PER_THREAD];
    for (int x = 0; x < MAX_PER_THREAD; x++) acc[x] = 0.0;
    for (unsigned int i0 = 0; i0 < b; i0 += TILE) {
        for (unsigned int t = w; t < TILE; t += WARPS) {
            unsigned int i = i0 + t;
            double cf = 0.0;
            if (i < b) {
                cf = exp(logit_f64(q + (unsigned long long)i * d, kj, d, inv_tau, lane) - lse[i]);
                if (i == j) cf -= 1.0;
            }
            if (lane == 0) coeff[t] = cf;
        }
        __syncthreads();
        for (unsigned int t = 0; t < TILE && i0 + t < b; t++) {
            double cf = coeff[t];
            const float* qi = q + (unsigned long long)(i0 + t) * d;
            for (int x = 0; x < MAX_PER_THREAD; x++) {
                unsigned int dd = threadIdx.x + x * BLOCK;
                if (dd < d) acc[x] += cf * (double)qi[dd];
            }
        }
        __syncthreads();
    }
    for (int x = 0; x < MAX_PER_THREAD; x++) {
        unsigned int dd = threadIdx.x + x * BLOCK;
        if (dd < d) dk[(unsigned long long)j * d + dd] += (float)(acc[x] * scale);
    }
}

// The entry points, one per bank storage format (src/backend/stored.rs), written out so that every kernel
// name appears literally (the backend loads kernels by the names it finds in the source).
extern "C" __global__ void infonce_lse_parts_f32(double* part_m, double* part_s, const float* q, const float* k,
                                                 const float* bank, const unsigned int* bank_users,
                                                 const unsigned int* users, unsigned int b, unsigned int nbank,
                                                 unsigned int d, double inv_tau) {
    infonce_lse_parts(part_m, part_s, q, k, bank, bank_users, users, b, nbank, d, inv_tau);
}
extern "C" __global__ void infonce_dq_parts_f32(float* part, const double* lse, const float* q, const float* k,
                                                const float* bank, const unsigned int* bank_users,
                                                const unsigned int* users, unsigned int b, unsigned int nbank,
                                                unsigned int d, double inv_tau) {
    infonce_dq_parts(part, lse, q, k, bank, bank_users, users, b, nbank, d, inv_tau);
}
extern "C" __global__ void infonce_lse_parts_bf16(double* part_m, double* part_s, const float* q, const float* k,
                                                 const bf16_bits* bank, const unsigned int* bank_users,
                                                 const unsigned int* users, unsigned int b, unsigned int nbank,
                                                 unsigned int d, double inv_tau) {
    infonce_lse_parts(part_m, part_s, q, k, bank, bank_users, users, b, nbank, d, inv_tau);
}
extern "C" __global__ void infonce_dq_parts_bf16(float* part, const double* lse, const float* q, const float* k,
                                                const bf16_bits* bank, const unsigned int* bank_users,
                                                const unsigned int* users, unsigned int b, unsigned int nbank,
                                                unsigned int d, double inv_tau) {
    infonce_dq_parts(part, lse, q, k, bank, bank_users, users, b, nbank, d, inv_tau);
}
extern "C" __global__ void infonce_lse_parts_f16(double* part_m, double* part_s, const float* q, const float* k,
                                                 const f16_bits* bank, const unsigned int* bank_users,
                                                 const unsigned int* users, unsigned int b, unsigned int nbank,
                                                 unsigned int d, double inv_tau) {
    infonce_lse_parts(part_m, part_s, q, k, bank, bank_users, users, b, nbank, d, inv_tau);
}
extern "C" __global__ void infonce_dq_parts_f16(float* part, const double* lse, const float* q, const float* k,
                                                const f16_bits* bank, const unsigned int* bank_users,
                                                const unsigned int* users, unsigned int b, unsigned int nbank,
                                                unsigned int d, double inv_tau) {
    infonce_dq_parts(part, lse, q, k, bank, bank_users, users, b, nbank, d, inv_tau);
}
