// Fused causal multi-head self-attention over packed sequences, forward and backward.
// CPU twin: src/backend/cpu_attention.rs (same masking, same probability layout, same dropout mask).
//
// Layout: qkv is [T, 3d]; row t = [q | k | v], head h uses columns h·dh .. (h+1)·dh of each third.
// Sequence s owns rows offsets[s] .. offsets[s+1]. The saved probabilities are one n×n block per
// (sequence, head), at  heads·Σ_{s'<s} n_{s'}² + h·n²  — exactly `SeqLayout::prob_offsets` — so the CPU
// and GPU buffers are interchangeable and the dropout mask index (that offset + i·n + j) agrees.
//
// One block per (sequence, head): grid (num_seqs, heads). Within a block one warp owns one query row at
// a time: scores (lanes along keys), softmax (warp shuffles), output (lanes along dh). Rows are
// independent in the forward, so the forward needs no block-level sync at all; any n works because
// every loop strides. K and V are read through the cache, not staged in shared memory: at SASRec sizes
// (n ≤ 200, dh ≤ 64) the per-(sequence, head) working set is ≤ 100 KB and stays in L1/L2. A tiled
// shared-memory variant is the obvious next step once it can be timed on the GPU.

// Offset of this (sequence, head)'s n×n block in the probability buffer. Every thread recomputes it from
// the offsets (S reads, cached) so no prefix-sum buffer has to be built on the host per batch.
__device__ __forceinline__ unsigned long long prob_block(const unsigned int* offsets, unsigned int s, unsigned int h,
                                                         unsigned int heads, unsigned long long n) {
    unsigned long long acc = 0;
    for (unsigned int t = 0; t < s; t++) {
        unsigned long long m = offsets[t + 1] - offsets[t];
        acc += m * m;
    }
    return acc * heads + (unsigned long long)h * n * n;
}

extern "C" __global__ void attention_forward_f32(float* out, float* probs, const float* qkv,
                                                 const unsigned int* offsets, const unsigned int* key_valid,
                                                 unsigned int d, unsigned int heads, float scale, int has_dropout,
                                                 unsigned long long base, float p, float dscale) {
    const unsigned int s = blockIdx.x, h = blockIdx.y;
    const unsigned long long start = offsets[s];
    const unsigned long long n = offsets[s + 1] - start;
    if (n == 0) return;
    const unsigned int dh = d / heads, lane = threadIdx.x & 31u, warps = blockDim.x >> 5;
    const unsigned long long w3 = 3ull * d;
    const unsigned long long first = prob_block(offsets, s, h, heads, n);
    float* P = probs + first;
    for (unsigned long long i = threadIdx.x >> 5; i < n; i += warps) {
        const float* q = qkv + (start + i) * w3 + h * dh;
        float* prow = P + i * n;
        // Scores of visible keys (j <= i, key valid); masked entries hold -inf until the softmax pass.
        float mx = NEG_INF;
        for (unsigned long long j = lane; j < n; j += 32) {
            float sc = NEG_INF;
            if (j <= i && key_valid[start + j] != 0) {
                const float* k = qkv + (start + j) * w3 + d + h * dh;
                float dot = 0.0f;
                for (unsigned int c = 0; c < dh; c++) dot += q[c] * k[c];
                sc = dot * scale;
                mx = fmaxf(mx, sc);
            }
            prow[j] = sc;
        }
        mx = warp_max(mx);
        float* o = out + (start + i) * d + h * dh;
        if (mx == NEG_INF) {
            // No visible key: weights 0 and output 0 (never NaN), as the CPU twin.
            for (unsigned long long j = lane; j < n; j += 32) prow[j] = 0.0f;
            for (unsigned int c = lane; c < dh; c += 32) o[c] = 0.0f;
            continue;
        }
        float sum = 0.0f;
        for (unsigned long long j = lane; j < n; j += 32) {
            float e = (j <= i && key_valid[start + j] != 0) ? expf(prow[j] - mx) : 0.0f;
            prow[j] = e;
            sum += e;
        }
        float inv = 1.0f / warp_sum(sum);
        for (unsigned long long j = lane; j < n; j += 32) prow[j] *= inv;
        __syncwarp();  // the row was written lane-by-key; below every lane reads all of it
        for (unsigned int c = lane; c < dh; c += 32) {
            float acc = 0.0f;
            for (unsigned long long j = 0; j <= i; j++) {
                float pj = prow[j];
                if (has_dropout) pj *= keep_factor(base, first + i * n + j, p, dscale);
                acc += pj * qkv[(start + j) * w3 + 2ull * d + h * dh + c];
            }
            o[c] = acc;
        }
        __syncwarp();
    }
}

// Backward. With P the saved (pre-dropout) weights and F the dropout factors (1 without dropout):
//   dP = (dO Vᵀ) ∘ F,  dS = P ∘ (dP − rowsum(P ∘ dP)),  dQ += scale·dS K,  dK += scale·dSᵀ Q,  dV += (P∘F)ᵀ dO.
// Phase 1 (warp per query row i): the dS row into `ds` (scratch laid out like probs) and dQ_i.
// Phase 2 (warp per key row j), after a block sync: the dS column gives dK_j, the P column gives dV_j.
// Every dqkv element is written by exactly one thread: no atomics, deterministic.
extern "C" __global__ void attention_backward_f32(float* dqkv, float* ds, const float* qkv, const float* probs,
                                                  const float* dout, const unsigned int* offsets, unsigned int d,
                                                  unsigned int heads, float scale, int has_dropout,
                                                  unsigned long long base, float p, float dscale) {
    const unsigned int s = blockIdx.x, h = blockIdx.y;
    const unsigned long long start = offsets[s];
    const unsigned long long n = offsets[s + 1] - start;
    if (n == 0) return;
    const unsigned int dh = d / heads, lane = threadIdx.x & 31u, warps = blockDim.x >> 5;
    const unsigned long long w3 = 3ull * d;
    const unsigned long long first = prob_block(offsets, s, h, heads, n);
    const float* P = probs + first;
    float* DS = ds + first;
    for (unsigned long long i = threadIdx.x >> 5; i < n; i += warps) {
        const float* go = dout + (start + i) * d + h * dh;
        const float* prow = P + i * n;
        float* dsrow = DS + i * n;
        float dot = 0.0f;
        for (unsigned long long j = lane; j < n; j += 32) {
            // Above the diagonal P = 0, so dS = 0 whatever dP is; skip the product there.
            float dp = 0.0f;
            if (j <= i) {
                const float* v = qkv + (start + j) * w3 + 2ull * d + h * dh;
                for (unsigned int c = 0; c < dh; c++) dp += go[c] * v[c];
                if (has_dropout) dp *= keep_factor(base, first + i * n + j, p, dscale);
            }
            dsrow[j] = dp;
            dot += prow[j] * dp;
        }
        dot = warp_sum(dot);
        for (unsigned long long j = lane; j < n; j += 32) dsrow[j] = prow[j] * (dsrow[j] - dot);
        __syncwarp();
        float* dq = dqkv + (start + i) * w3 + h * dh;
        for (unsigned int c = lane; c < dh; c += 32) {
            float acc = 0.0f;
            for (unsigned long long j = 0; j <= i; j++) acc += dsrow[j] * qkv[(start + j) * w3 + d + h * dh + c];
            dq[c] += scale * acc;
        }
        __syncwarp();
    }
    __syncthreads();  // phase 2 reads dS columns written by every warp
    for (unsigned long long j = threadIdx.x >> 5; j < n; j += warps) {
        float* dk = dqkv + (start + j) * w3 + d + h * dh;
        float* dv = dqkv + (start + j) * w3 + 2ull * d + h * dh;
        for (unsigned int c = lane; c < dh; c += 32) {
            float ak = 0.0f, av = 0.0f;
            for (unsigned long long i = j; i < n; i++) {
                unsigned long long e = i * n + j;
                float pp = P[e];
                if (has_dropout) pp *= keep_factor(base, first + e, p, dscale);
                ak += DS[e] * qkv[(start + i) * w3 + h * dh + c];
                av += pp * dout[(start + i) * d + h * dh + c];
            }
            dk[c] += scale * ak;
            dv[c] += av;
        }
    }
}
