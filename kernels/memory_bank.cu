// Ring-buffer enqueue of the memory bank (mission.md §7). CPU twin: `CpuBackend::ring_enqueue`, which
// `MemoryBank::enqueue` (one row at a time from the pointer, wrapping) is checked against.
// Row r of the batch goes to slot (ptr + r) mod K; rows r < b − K would be overwritten within the same
// batch, so they are skipped and the surviving rows land in distinct slots (no write races). Keys are
// rounded to the bank's storage format as they are written. The pointer lives on the device with the bank
// (ring_advance_u32 moves it after the enqueue). `gate` points at the step's verdict in the device-side step
// log (train::step_log): 0 means the step was refused (a non-finite loss or gradient), and nothing is written
// and the pointer stays — the host learns of it only when it next reads the log.

// One thread per (surviving row, dim) element; the thread of dim 0 also writes the slot's user.
template <typename T>
__device__ void ring_enqueue(T* bank, unsigned int* bank_users, const float* keys, const unsigned int* users,
                             unsigned int b, unsigned int dim, unsigned int nslots, const unsigned int* ptr_at,
                             const double* gate) {
    if (gate[0] == 0.0) return;
    const unsigned int ptr = ptr_at[0];
    const unsigned int skip = b > nslots ? b - nslots : 0;
    const unsigned long long n = (unsigned long long)(b - skip) * dim;
    GRID_STRIDE(e, n) {
        const unsigned int r = skip + (unsigned int)(e / dim), x = (unsigned int)(e % dim);
        const unsigned int slot = (unsigned int)(((unsigned long long)ptr + r) % nslots);
        store_as(bank + (unsigned long long)slot * dim + x, keys[(unsigned long long)r * dim + x]);
        if (x == 0) bank_users[slot] = users[r];
    }
}

extern "C" __global__ void ring_enqueue_f32(float* bank, unsigned int* bank_users, const unsigned int* ptr,
                                            const float* keys, const unsigned int* users, unsigned int b, unsigned int dim,
                                            unsigned int nslots, const double* gate) {
    ring_enqueue(bank, bank_users, keys, users, b, dim, nslots, ptr, gate);
}
extern "C" __global__ void ring_enqueue_bf16(bf16_bits* bank, unsigned int* bank_users, const unsigned int* ptr,
                                             const float* keys, const unsigned int* users, unsigned int b, unsigned int dim,
                                             unsigned int nslots, const double* gate) {
    ring_enqueue(bank, bank_users, keys, users, b, dim, nslots, ptr, gate);
}
extern "C" __global__ void ring_enqueue_f16(f16_bits* bank, unsigned int* bank_users, const unsigned int* ptr,
                                            const float* keys, const unsigned int* users, unsigned int b, unsigned int dim,
                                            unsigned int nslots, const double* gate) {
    ring_enqueue(bank, bank_users, keys, users, b, dim, nslots, ptr, gate);
}

// ptr = (ptr + b) mod K after an accepted enqueue (one thread).
extern "C" __global__ void ring_advance_u32(unsigned int* ptr, unsigned int b, unsigned int nslots, const double* gate) {
    if (gate[0] == 0.0 || blockIdx.x != 0 || threadIdx.x != 0) return;
    ptr[0] = (unsigned int)(((unsigned long long)ptr[0] + b) % nslots);
}
