// Fused InfoNCE against the memory bank. CPU twin: src/backend/cpu_infonce.rs (same candidate set, same
// masking, f64 log-sum-exp). For query i the candidates are c = 0 (its positive k_i), c = 1..B-1 (the other
// in-batch keys, skipping k_i) and c = B..B+K-1 (bank slots; a slot is masked when its user equals the
// query's user, except user 0). Logit = (Σ_d q·key, f32 products summed in f64) / τ.
// The [B, B+K] logits never reach memory: each block streams its candidates with an online log-sum-exp.
// This is the straightforward CUDA-core version (one block per query / key, warps over candidates);
// a tensor-core tiled version is the performance follow-up (gpu-toolchain.md roofline).

#define WARPS (BLOCK / 32)
#define TILE 64
// Per-thread accumulators cover d ≤ BLOCK * MAX_PER_THREAD (the launcher checks).
#define MAX_PER_THREAD 4

// Candidate c of query i: an in-batch key (f32) or a bank slot (f32 or 16-bit storage, type T); both null
// when the slot is masked.
template <typename T>
struct Cand {
    const float* key;
    const T* slot;
    __device__ __forceinline__ bool masked() const { return !key && !slot; }
    __device__ __forceinline__ float at(unsigned int x) const { return key ? key[x] : to_f32(slot[x]); }
};

template <typename T>
__device__ __forceinline__ Cand<T> candidate(unsigned int c, unsigned int i, const float* k, const T* bank,
                                             const unsigned int* bank_users, const unsigned int* users,
                                             unsigned int b, unsigned int d) {
    if (c == 0) return Cand<T>{k + (unsigned long long)i * d, 0};
    if (c < b) {
        unsigned int j = c - 1 < i ? c - 1 : c;
        return Cand<T>{k + (unsigned long long)j * d, 0};
    }
    unsigned int slot = c - b;
    unsigned int u = bank_users[slot];
    if (u != 0 && u == users[i]) return Cand<T>{0, 0};
    return Cand<T>{0, bank + (unsigned long long)slot * d};
}

// Warp-wide q·key / τ in f64 (products in f32, as the CPU twin).
template <typename T>
__device__ __forceinline__ double logit(const float* q, Cand<T> key, unsigned int d, double inv_tau, unsigned int lane) {
    double s = 0.0;
    if (key.key) {
        for (unsigned int x = lane; x < d; x += 32) s += (double)(q[x] * key.key[x]);
    } else {
        for (unsigned int x = lane; x < d; x += 32) s += (double)(q[x] * to_f32(key.slot[x]));
    }
    return warp_sum_d(s) * inv_tau;
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

// One block per query: lse[i] and pos[i] (the positive logit), both f64.
template <typename T>
__device__ void infonce_rows(double* lse, double* pos, const float* q, const float* k, const T* bank,
                             const unsigned int* bank_users, const unsigned int* users, unsigned int b,
                             unsigned int nbank, unsigned int d, double inv_tau) {
    __shared__ double sm[WARPS], ss[WARPS];
    const unsigned int i = blockIdx.x, lane = threadIdx.x & 31u, w = threadIdx.x >> 5;
    const float* qi = q + (unsigned long long)i * d;
    double m = NEG_INF_D, s = 0.0;
    for (unsigned int c = w; c < b + nbank; c += WARPS) {
        Cand<T> key = candidate(c, i, k, bank, bank_users, users, b, d);
        if (key.masked()) continue;
        double l = logit(qi, key, d, inv_tau, lane);
        if (c == 0 && lane == 0) pos[i] = l;
        lse_add(m, s, l);
    }
    if (lane == 0) { sm[w] = m; ss[w] = s; }
    __syncthreads();
    if (threadIdx.x == 0) {
        double M = NEG_INF_D;
        for (int x = 0; x < WARPS; x++) M = fmax(M, sm[x]);
        double S = 0.0;
        for (int x = 0; x < WARPS; x++) if (ss[x] > 0.0) S += ss[x] * exp(sm[x] - M);
        lse[i] = M + log(S);
    }
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

// dq_i += scale · (Σ_c p_ic key_c − k_i), scale = dloss·(1/τ)/B. One block per query; per tile of TILE
// candidates, warps compute the weights into shared memory, then every thread accumulates its dims.
template <typename T>
__device__ void infonce_dq(float* dq, const double* lse, const float* q, const float* k, const T* bank,
                           const unsigned int* bank_users, const unsigned int* users, const float* dloss,
                           unsigned int b, unsigned int nbank, unsigned int d, double inv_tau) {
    __shared__ double coeff[TILE];
    const unsigned int i = blockIdx.x, lane = threadIdx.x & 31u, w = threadIdx.x >> 5;
    const float* qi = q + (unsigned long long)i * d;
    const double scale = (double)dloss[0] * inv_tau / (double)b;
    double acc[MAX_PER_THREAD];
    for (int x = 0; x < MAX_PER_THREAD; x++) acc[x] = 0.0;
    const unsigned int total = b + nbank;
    for (unsigned int c0 = 0; c0 < total; c0 += TILE) {
        for (unsigned int t = w; t < TILE; t += WARPS) {
            unsigned int c = c0 + t;
            double cf = 0.0;
            Cand<T> key = c < total ? candidate(c, i, k, bank, bank_users, users, b, d) : Cand<T>{0, 0};
            if (!key.masked()) {
                cf = exp(logit(qi, key, d, inv_tau, lane) - lse[i]);
                if (c == 0) cf -= 1.0;
            }
            if (lane == 0) coeff[t] = cf;
        }
        __syncthreads();
        for (unsigned int t = 0; t < TILE && c0 + t < total; t++) {
            double cf = coeff[t];
            if (cf == 0.0) continue;
            Cand<T> key = candidate(c0 + t, i, k, bank, bank_users, users, b, d);
            for (int x = 0; x < MAX_PER_THREAD; x++) {
                unsigned int dd = threadIdx.x + x * BLOCK;
                if (dd < d) acc[x] += cf * (double)key.at(dd);
            }
        }
        __syncthreads();
    }
    for (int x = 0; x < MAX_PER_THREAD; x++) {
        unsigned int dd = threadIdx.x + x * BLOCK;
        if (dd < d) dq[(unsigned long long)i * d + dd] += (float)(acc[x] * scale);
    }
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
                cf = exp(logit(q + (unsigned long long)i * d, Cand<float>{kj, 0}, d, inv_tau, lane) - lse[i]);
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
extern "C" __global__ void infonce_rows_f32(double* lse, double* pos, const float* q, const float* k, const float* bank,
                                             const unsigned int* bank_users, const unsigned int* users, unsigned int b,
                                             unsigned int nbank, unsigned int d, double inv_tau) {
    infonce_rows(lse, pos, q, k, bank, bank_users, users, b, nbank, d, inv_tau);
}
extern "C" __global__ void infonce_dq_f32(float* dq, const double* lse, const float* q, const float* k, const float* bank,
                                           const unsigned int* bank_users, const unsigned int* users, const float* dloss,
                                           unsigned int b, unsigned int nbank, unsigned int d, double inv_tau) {
    infonce_dq(dq, lse, q, k, bank, bank_users, users, dloss, b, nbank, d, inv_tau);
}
extern "C" __global__ void infonce_rows_bf16(double* lse, double* pos, const float* q, const float* k, const bf16_bits* bank,
                                             const unsigned int* bank_users, const unsigned int* users, unsigned int b,
                                             unsigned int nbank, unsigned int d, double inv_tau) {
    infonce_rows(lse, pos, q, k, bank, bank_users, users, b, nbank, d, inv_tau);
}
extern "C" __global__ void infonce_dq_bf16(float* dq, const double* lse, const float* q, const float* k, const bf16_bits* bank,
                                           const unsigned int* bank_users, const unsigned int* users, const float* dloss,
                                           unsigned int b, unsigned int nbank, unsigned int d, double inv_tau) {
    infonce_dq(dq, lse, q, k, bank, bank_users, users, dloss, b, nbank, d, inv_tau);
}
extern "C" __global__ void infonce_rows_f16(double* lse, double* pos, const float* q, const float* k, const f16_bits* bank,
                                             const unsigned int* bank_users, const unsigned int* users, unsigned int b,
                                             unsigned int nbank, unsigned int d, double inv_tau) {
    infonce_rows(lse, pos, q, k, bank, bank_users, users, b, nbank, d, inv_tau);
}
extern "C" __global__ void infonce_dq_f16(float* dq, const double* lse, const float* q, const float* k, const f16_bits* bank,
                                           const unsigned int* bank_users, const unsigned int* users, const float* dloss,
                                           unsigned int b, unsigned int nbank, unsigned int d, double inv_tau) {
    infonce_dq(dq, lse, q, k, bank, bank_users, users, dloss, b, nbank, d, inv_tau);
}
