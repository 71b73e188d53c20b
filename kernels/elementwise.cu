// Elementwise maps and their backward passes. CPU twins: `map1` / `map2` / `acc2` users in src/backend/cpu.rs.
// One thread per element with a grid-stride loop, so any length runs on a capped grid. Backward kernels
// ACCUMULATE (`dx +=`), as the Backend trait requires: a tensor used twice receives both gradients.

// Same branch structure as the CPU `sigmoid`: never overflows expf for large |x|.
__device__ __forceinline__ float sigmoid_f(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    float e = expf(x);
    return e / (1.0f + e);
}

extern "C" __global__ void add_f32(float* out, const float* a, const float* b, unsigned long long n) {
    GRID_STRIDE(i, n) out[i] = a[i] + b[i];
}

extern "C" __global__ void mul_f32(float* out, const float* a, const float* b, unsigned long long n) {
    GRID_STRIDE(i, n) out[i] = a[i] * b[i];
}

// dx += dy * other: the backward of an elementwise product.
extern "C" __global__ void mul_acc_f32(float* dx, const float* dy, const float* other, unsigned long long n) {
    GRID_STRIDE(i, n) dx[i] += dy[i] * other[i];
}

extern "C" __global__ void scale_f32(float* out, const float* x, float c, unsigned long long n) {
    GRID_STRIDE(i, n) out[i] = x[i] * c;
}

// y += a * x.
extern "C" __global__ void axpy_f32(float* y, float a, const float* x, unsigned long long n) {
    GRID_STRIDE(i, n) y[i] += a * x[i];
}

extern "C" __global__ void fill_f32(float* x, float value, unsigned long long n) {
    GRID_STRIDE(i, n) x[i] = value;
}

// dst += src (dst is already offset to the target range by the launcher).
extern "C" __global__ void add_into_f32(float* dst, const float* src, unsigned long long n) {
    GRID_STRIDE(i, n) dst[i] += src[i];
}

// x[r, c] += bias[c] over a row-major [n / cols, cols] matrix.
extern "C" __global__ void add_bias_f32(float* x, const float* bias, unsigned long long n, unsigned int cols) {
    GRID_STRIDE(i, n) x[i] += bias[i % cols];
}

// dx += scale * c[0]: c is the 1-element upstream gradient, read on the device so the host never syncs.
extern "C" __global__ void add_scalar_acc_f32(float* dx, const float* c, float scale, unsigned long long n) {
    float v = c[0] * scale;
    GRID_STRIDE(i, n) dx[i] += v;
}

extern "C" __global__ void relu_f32(float* out, const float* x, unsigned long long n) {
    GRID_STRIDE(i, n) out[i] = fmaxf(x[i], 0.0f);
}

extern "C" __global__ void relu_backward_f32(float* dx, const float* x, const float* dy, unsigned long long n) {
    GRID_STRIDE(i, n) dx[i] += x[i] > 0.0f ? dy[i] : 0.0f;
}

// Exact (erf) GELU, as PyTorch's default and the CPU twin (libm::erff).
extern "C" __global__ void gelu_f32(float* out, const float* x, unsigned long long n) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        out[i] = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    }
}

extern "C" __global__ void gelu_backward_f32(float* dx, const float* x, const float* dy, unsigned long long n) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
        float pdf = 0.3989423f * expf(-0.5f * v * v);
        dx[i] += dy[i] * (cdf + v * pdf);
    }
}

// log(1 + e^x) = max(x, 0) + log1p(e^{-|x|}): no overflow, full precision for large |x|.
extern "C" __global__ void softplus_f32(float* out, const float* x, unsigned long long n) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        out[i] = fmaxf(v, 0.0f) + log1pf(expf(-fabsf(v)));
    }
}

extern "C" __global__ void softplus_backward_f32(float* dx, const float* x, const float* dy, unsigned long long n) {
    GRID_STRIDE(i, n) dx[i] += dy[i] * sigmoid_f(x[i]);
}

// x ← x rounded to a 16-bit format and widened back (train.table_format: the forward reads the item tables as
// 16-bit storage holds them). Same rounding as the `half` crate: to nearest, ties to even.
extern "C" __global__ void round_to_bf16_f32(float* x, unsigned long long n) {
    GRID_STRIDE(i, n) {
        bf16_bits h;
        store_as(&h, x[i]);
        x[i] = to_f32(h);
    }
}
extern "C" __global__ void round_to_f16_f32(float* x, unsigned long long n) {
    GRID_STRIDE(i, n) {
        f16_bits h;
        store_as(&h, x[i]);
        x[i] = to_f32(h);
    }
}
