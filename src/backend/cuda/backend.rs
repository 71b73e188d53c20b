//! `CudaBackend`: the `Backend` operation set on one GPU.
//!
//! Storage is `CudaSlice<f32>` / `CudaSlice<u32>` on one stream; cuBLAS does `gemm`, the kernels in
//! `kernels/*.cu` (compiled by NVRTC, see `kernels.rs`) do everything else. Nothing here synchronises
//! with the host except the methods whose signature returns host data (`to_host`, `read_scalar(s)`,
//! `sum_squares(_many)`); 1-element loss buffers and upstream gradients stay on the device.
//!
//! Error policy: `CudaBackend::new` never panics (no GPU, no driver, no NVRTC or a kernel that fails to
//! compile are all `Err`). The `Backend` methods have no error channel (the CPU twin asserts on bad
//! shapes the same way), so a driver error after a successful start panics with the kernel's name.
use super::kernels::{self, KernelError};
use super::{probe, CudaUnavailable, GpuInfo};
use crate::backend::{AdamWGate, AdamWHyper, Backend, MAX_LR_GROUPS, DropoutKey, Segments, SeqLayout, Stored, VerdictLayout};
use crate::rng::counter_base;
use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// Why the CUDA backend could not start.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CudaError {
    #[error(transparent)]
    Unavailable(#[from] CudaUnavailable),
    #[error(transparent)]
    Kernels(#[from] KernelError),
    #[error("CUDA driver error while starting the backend: {0}")]
    Driver(String),
}

/// Threads per block for element-wise and warp-per-row kernels (8 warps).
const BLOCK: u32 = 256;
/// Grid cap for grid-stride kernels: enough blocks to fill an H200 many times over.
const MAX_GRID: usize = 1 << 20;
/// Fixed stage-1 grid cap of the deterministic two-stage reductions (partials are f64).
const REDUCE_GRID: usize = 1024;
/// Threads per attention block (one block per (sequence, head), one warp per row).
const ATTN_BLOCK: u32 = 256;

pub struct CudaBackend {
    info: GpuInfo,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<String, CudaFunction>,
    /// Embedding-style backwards (`scatter_add_rows`, the table gradient of `score_candidates_backward`)
    /// without float atomics: a device-built CSR summed in position order, bit-identical to the CPU twin and
    /// from run to run. Off by default (the atomic version is faster); see [`CudaBackend::with_deterministic`].
    deterministic: bool,
    /// cuBLAS in TF32 tensor-core math ([`CudaBackend::with_tf32`]); off by default.
    tf32: bool,
    /// Kernel launches so far (NVRTC kernels and cuBLAS calls): the step benchmark reports kernels per step
    /// (mission.md §9: launches are the small model's enemy).
    launches: AtomicU64,
    /// Device-to-host reads so far, each a host synchronisation: training reads once per `train.readback_every` steps
    /// (`train::step_log`; tests/cuda_training.rs counts them).
    readbacks: AtomicU64,
}

fn check<T, E: std::fmt::Debug>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("CUDA backend: {what} failed: {e:?}"),
    }
}

/// One thread per element, grid-stride.
fn cfg_elems(n: usize) -> LaunchConfig {
    let grid = n.div_ceil(BLOCK as usize).clamp(1, MAX_GRID) as u32;
    LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// One warp per row (8 rows per block), grid-stride over rows.
fn cfg_warp_rows(rows: usize) -> LaunchConfig {
    let grid = rows.div_ceil((BLOCK / 32) as usize).clamp(1, MAX_GRID) as u32;
    LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Stage 1 of a deterministic reduction: the grid depends on n only, so the summation order does too.
fn reduce_grid(n: usize) -> usize {
    n.div_ceil(BLOCK as usize).clamp(1, REDUCE_GRID)
}

/// Queries per block and candidate columns per block of the tiled InfoNCE kernels (TQ and RANGE in
/// kernels/infonce_bank.cu).
const INFONCE_TQ: usize = 64;
const INFONCE_RANGE: usize = 1024;

/// The tiled InfoNCE launch: a block per (column range, query tile), 256 threads; and the number of ranges.
fn infonce_tiles(b: usize, bank_slots: usize) -> (LaunchConfig, u32) {
    let nranges = u32_of((b + bank_slots).div_ceil(INFONCE_RANGE), "InfoNCE column ranges");
    let qtiles = u32_of(b.div_ceil(INFONCE_TQ), "InfoNCE query tiles");
    (LaunchConfig { grid_dim: (nranges, qtiles, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }, nranges)
}

/// Column reductions: 32 columns x 16 row lanes per block.
fn cfg_cols(cols: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (cols.div_ceil(32).max(1) as u32, 1, 1), block_dim: (32, 16, 1), shared_mem_bytes: 0 }
}

fn u32_of(x: usize, what: &str) -> u32 {
    u32::try_from(x).unwrap_or_else(|_| panic!("CUDA backend: {what} = {x} does not fit in u32"))
}

/// Launch kernel `$name` with the given arguments (each must be a reference that outlives the call).
macro_rules! launch {
    ($self:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let f = $self.func($name);
        let mut b = $self.stream.launch_builder(f);
        $( b.arg($arg); )*
        check(unsafe { b.launch($cfg) }, $name);
        $self.launches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }};
}

/// Runs `$body` with `$x` bound to a stored tensor's device buffer and `$suffix` to the kernel-name suffix of
/// its format (`f32`, `bf16`, `f16`): the kernels that read a `Stored` have one entry point per format.
macro_rules! with_stored {
    ($stored:expr, |$x:ident, $suffix:ident| $body:expr) => {
        match $stored {
            Stored::F32($x) => {
                let $suffix = "f32";
                $body
            }
            Stored::Half($x, format) => {
                let $suffix = format.name();
                $body
            }
        }
    };
}

impl CudaBackend {
    /// Start on GPU `ordinal`: probe the driver, create the context, compile and load every kernel.
    /// Never panics.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        let info = probe(ordinal)?;
        let ptx = kernels::compiled_ptx()?;
        let prev = panic::take_hook();
        panic::set_hook(Box::new(|_| {}));
        let r = panic::catch_unwind(AssertUnwindSafe(|| -> Result<CudaBackend, CudaError> {
            let drv = |what: &str, e: &dyn std::fmt::Debug| {
                let msg = format!("{what}: {e:?}");
                CudaError::Driver(format!("{msg} ({})", super::failure::advice(&msg)))
            };
            let ctx = CudaContext::new(ordinal).map_err(|e| drv("context", &e))?;
            // One stream only: cudarc's cross-stream event tracking is pure overhead here.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx.default_stream();
            let blas = CudaBlas::new(stream.clone()).map_err(|e| drv("cuBLAS", &e))?;
            let mut funcs = HashMap::new();
            for (family, text) in ptx {
                let module = ctx
                    .load_module(cudarc::nvrtc::Ptx::from_src(text.clone()))
                    .map_err(|e| drv(&format!("loading kernels/{family}.cu"), &e))?;
                let src = kernels::KERNEL_SOURCES.iter().find(|(f, _)| f == family).map(|(_, s)| *s).unwrap_or("");
                for name in kernels::kernel_names(src) {
                    let f = module.load_function(&name).map_err(|e| drv(&format!("kernel {name}"), &e))?;
                    funcs.insert(name, f);
                }
            }
            let deterministic = std::env::var("UR4REC_CUDA_DETERMINISTIC").map(|v| v == "1").unwrap_or(false);
            Ok(CudaBackend { info: info.clone(), ctx, stream, blas, funcs, deterministic, tf32: false, launches: AtomicU64::new(0),
                            readbacks: AtomicU64::new(0) })
        }));
        panic::set_hook(prev);
        match r {
            Ok(r) => r,
            Err(_) => Err(CudaError::Driver("the CUDA driver panicked while starting".into())),
        }
    }

    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// Selects the deterministic embedding backward (no float atomics; see the `deterministic` field). The
    /// default comes from `UR4REC_CUDA_DETERMINISTIC=1`, else off.
    pub fn with_deterministic(mut self, on: bool) -> Self {
        self.deterministic = on;
        self
    }

    pub fn is_deterministic(&self) -> bool {
        self.deterministic
    }

    /// cuBLAS's math mode for the plain matrix products (`train.tf32`): TF32 tensor-core math (inputs rounded
    /// to 10 mantissa bits, f32 accumulation) when on, the default full-f32 math when off (the default).
    pub fn with_tf32(mut self, on: bool) -> Self {
        use cudarc::cublas::sys::{cublasMath_t, cublasSetMathMode, cublasStatus_t};
        let mode = if on { cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH } else { cublasMath_t::CUBLAS_DEFAULT_MATH };
        // SAFETY: the handle is this backend's live cuBLAS handle; the call only sets a mode on it.
        let status = unsafe { cublasSetMathMode(*self.blas.handle(), mode) };
        assert_eq!(status, cublasStatus_t::CUBLAS_STATUS_SUCCESS, "CUDA backend: cublasSetMathMode({mode:?}) failed");
        self.tf32 = on;
        self
    }

    pub fn is_tf32(&self) -> bool {
        self.tf32
    }

    /// The stream every op is queued on (benchmarks time it with events).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `(sorted, starts)`: the lookups `p` with `idx[p] = row` (excluding `skip` and rows past the table) are
    /// `sorted[starts[row] .. starts[row + 1]]`, in increasing `p`. Built on the device with integer atomics
    /// and a stable ranking (kernels/embedding.cu); queues work only, never synchronises.
    fn lookup_csr(&self, idx: &CudaSlice<u32>, skip: Option<u32>, table_rows: usize) -> (CudaSlice<u32>, CudaSlice<u32>) {
        let n = idx.len();
        let _ = u32_of(n, "lookups");
        let tr = u32_of(table_rows, "table rows");
        let mut counts = check(self.stream.alloc_zeros::<u32>(table_rows.max(1)), "alloc csr counts");
        let mut starts = check(self.stream.alloc_zeros::<u32>(table_rows + 1), "alloc csr starts");
        let mut perm = check(self.stream.alloc_zeros::<u32>(n.max(1)), "alloc csr perm");
        let mut sorted = check(self.stream.alloc_zeros::<u32>(n.max(1)), "alloc csr sorted");
        let (n64, sk, has) = (n as u64, skip.unwrap_or(0), skip.is_some() as i32);
        launch!(self, "scatter_csr_count_f32", cfg_elems(n); &mut counts, idx, &n64, &sk, &has, &tr);
        let scan = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "scatter_csr_scan_f32", scan; &mut starts, &mut counts, &tr);
        launch!(self, "scatter_csr_fill_f32", cfg_elems(n); &mut perm, &mut counts, &starts, idx, &n64, &sk, &has, &tr);
        launch!(self, "scatter_csr_order_f32", cfg_elems(n); &mut sorted, &perm, &starts, idx, &n64, &tr);
        (sorted, starts)
    }

    /// Wait for all queued work (benchmarks, tests).
    pub fn synchronize(&self) {
        check(self.stream.synchronize(), "synchronize");
    }

    /// Kernel launches (NVRTC kernels and cuBLAS calls) since the backend started.
    pub fn launches(&self) -> u64 {
        self.launches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Device-to-host reads (host synchronisations) since the backend started.
    pub fn readbacks(&self) -> u64 {
        self.readbacks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Device memory in use (total − free, whole device) once the queued work is done, in bytes: what the
    /// bounded-memory test compares between step 10 and step 1,000.
    pub fn memory_in_use(&self) -> usize {
        self.synchronize();
        let (free, total) = check(self.ctx.mem_get_info(), "mem_get_info");
        total - free
    }

    fn func(&self, name: &str) -> &CudaFunction {
        self.funcs.get(name).unwrap_or_else(|| panic!("CUDA backend: kernel {name} not loaded"))
    }

    /// Uninitialised-free allocation: every buffer starts as zeros (cheap next to the kernels, and a
    /// kernel that forgets an element then shows 0 rather than garbage).
    fn alloc(&self, n: usize) -> CudaSlice<f32> {
        if n == 0 {
            return check(self.stream.null::<f32>(), "alloc(0)");
        }
        check(self.stream.alloc_zeros::<f32>(n), "alloc")
    }

    /// A device-to-host copy: a host synchronisation, counted in [`CudaBackend::readbacks`].
    fn read_back<T: DeviceRepr, S: DevicePtr<T>>(&self, x: &S, what: &str) -> Vec<T> {
        self.readbacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        check(self.stream.clone_dtoh(x), what)
    }

    fn alloc_f64(&self, n: usize) -> CudaSlice<f64> {
        check(self.stream.alloc_zeros::<f64>(n.max(1)), "alloc f64")
    }

    /// `out[i] = f(a[i], b[i])` style kernels: (out, a, b, n).
    fn map2(&self, name: &str, a: &CudaSlice<f32>, b: &CudaSlice<f32>) -> CudaSlice<f32> {
        assert_eq!(a.len(), b.len(), "{name}: lengths differ");
        let n = a.len();
        let mut out = self.alloc(n);
        if n > 0 {
            let n64 = n as u64;
            launch!(self, name, cfg_elems(n); &mut out, a, b, &n64);
        }
        out
    }

    /// `out[i] = f(x[i])` kernels: (out, x, n).
    fn map1(&self, name: &str, x: &CudaSlice<f32>) -> CudaSlice<f32> {
        let n = x.len();
        let mut out = self.alloc(n);
        if n > 0 {
            let n64 = n as u64;
            launch!(self, name, cfg_elems(n); &mut out, x, &n64);
        }
        out
    }

    /// `dx[i] += f(a[i], b[i])` kernels: (dx, a, b, n).
    fn acc2(&self, name: &str, dx: &mut CudaSlice<f32>, a: &CudaSlice<f32>, b: &CudaSlice<f32>) {
        assert!(a.len() == dx.len() && b.len() == dx.len(), "{name}: lengths differ");
        let n = dx.len();
        if n > 0 {
            let n64 = n as u64;
            launch!(self, name, cfg_elems(n); dx, a, b, &n64);
        }
    }

    /// Stage 2 of a reduction: a 1-element f32 buffer holding `Σ partials / divisor`.
    fn finish(&self, partials: &CudaSlice<f64>, nparts: usize, divisor: f64) -> CudaSlice<f32> {
        let mut out = self.alloc(1);
        let np = nparts as u32;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "reduce_finish_f32", cfg; &mut out, partials, &np, &divisor);
        out
    }

    /// `Σ x / divisor` (f64 accumulation) as a 1-element buffer.
    fn mean_of(&self, x: &CudaSlice<f32>, divisor: f64) -> CudaSlice<f32> {
        let n = x.len();
        let g = reduce_grid(n);
        let mut partials = self.alloc_f64(g);
        let (n64, mode) = (n as u64, 0i32);
        let cfg = LaunchConfig { grid_dim: (g as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "sum_partials_f32", cfg; &mut partials, x, &n64, &mode);
        self.finish(&partials, g, divisor)
    }

    fn dropout_args(key: DropoutKey) -> (u64, f32, f32) {
        (counter_base(key.seed, key.stream), key.p, 1.0 / (1.0 - key.p))
    }
}

impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;
    type Idx = CudaSlice<u32>;
    type Half = CudaSlice<u16>;
    type Wide = CudaSlice<f64>;

    fn name(&self) -> String {
        format!("cuda:{} ({})", self.info.ordinal, self.info.name)
    }

    // ---- storage ---------------------------------------------------------------------------------
    fn zeros(&self, n: usize) -> CudaSlice<f32> {
        self.alloc(n)
    }
    fn from_host(&self, x: &[f32]) -> CudaSlice<f32> {
        if x.is_empty() {
            return self.alloc(0);
        }
        check(self.stream.clone_htod(x), "from_host")
    }
    fn idx_from_host(&self, x: &[u32]) -> CudaSlice<u32> {
        if x.is_empty() {
            return check(self.stream.null::<u32>(), "idx_from_host(empty)");
        }
        check(self.stream.clone_htod(x), "idx_from_host")
    }
    fn to_host(&self, x: &CudaSlice<f32>) -> Vec<f32> {
        if x.is_empty() {
            return Vec::new();
        }
        self.read_back(x, "to_host")
    }
    fn idx_len(&self, x: &CudaSlice<u32>) -> usize {
        x.len()
    }
    fn idx_to_host(&self, x: &CudaSlice<u32>) -> Vec<u32> {
        if x.is_empty() {
            return Vec::new();
        }
        self.read_back(x, "idx_to_host")
    }
    fn wide_zeros(&self, n: usize) -> CudaSlice<f64> {
        self.alloc_f64(n)
    }
    fn wide_from_host(&self, x: &[f64]) -> CudaSlice<f64> {
        if x.is_empty() {
            return self.wide_zeros(1);
        }
        check(self.stream.clone_htod(x), "wide_from_host")
    }
    fn wide_to_host(&self, x: &CudaSlice<f64>) -> Vec<f64> {
        self.read_back(x, "wide_to_host")
    }
    fn half_from_host(&self, bits: &[u16]) -> CudaSlice<u16> {
        if bits.is_empty() {
            return check(self.stream.null::<u16>(), "half_from_host(empty)");
        }
        check(self.stream.clone_htod(bits), "half_from_host")
    }
    fn half_to_host(&self, x: &CudaSlice<u16>) -> Vec<u16> {
        if x.is_empty() {
            return Vec::new();
        }
        self.read_back(x, "half_to_host")
    }
    fn len(&self, x: &CudaSlice<f32>) -> usize {
        x.len()
    }
    fn copy_range(&self, src: &CudaSlice<f32>, offset: usize, len: usize) -> CudaSlice<f32> {
        assert!(offset + len <= src.len(), "copy_range out of bounds");
        let mut out = self.alloc(len);
        if len > 0 {
            check(self.stream.memcpy_dtod(&src.slice(offset..offset + len), &mut out), "copy_range");
        }
        out
    }
    fn add_into_range(&self, dst: &mut CudaSlice<f32>, offset: usize, src: &CudaSlice<f32>) {
        let n = src.len();
        assert!(offset + n <= dst.len(), "add_into_range out of bounds");
        if n > 0 {
            let mut view = dst.slice_mut(offset..offset + n);
            let n64 = n as u64;
            launch!(self, "add_into_f32", cfg_elems(n); &mut view, src, &n64);
        }
    }
    fn write_range(&self, dst: &mut CudaSlice<f32>, offset: usize, src: &CudaSlice<f32>) {
        let n = src.len();
        assert!(offset + n <= dst.len(), "write_range out of bounds");
        if n > 0 {
            check(self.stream.memcpy_dtod(src, &mut dst.slice_mut(offset..offset + n)), "write_range");
        }
    }
    fn axpy(&self, y: &mut CudaSlice<f32>, a: f32, x: &CudaSlice<f32>) {
        assert_eq!(y.len(), x.len(), "axpy: lengths differ");
        let n = y.len();
        if n > 0 {
            let n64 = n as u64;
            launch!(self, "axpy_f32", cfg_elems(n); y, &a, x, &n64);
        }
    }
    fn fill(&self, x: &mut CudaSlice<f32>, value: f32) {
        let n = x.len();
        if n > 0 {
            let n64 = n as u64;
            launch!(self, "fill_f32", cfg_elems(n); x, &value, &n64);
        }
    }

    fn concat_cols(&self, a: &CudaSlice<f32>, ca: usize, b: &CudaSlice<f32>, cb: usize) -> CudaSlice<f32> {
        let rows = a.len() / ca.max(1);
        assert_eq!(b.len(), rows * cb, "concat_cols: row counts differ");
        let n = rows * (ca + cb);
        let mut out = self.alloc(n);
        if n > 0 {
            let (r, ca32, cb32) = (u32_of(rows, "rows"), ca as u32, cb as u32);
            launch!(self, "concat_cols_f32", cfg_elems(n); &mut out, a, b, &r, &ca32, &cb32);
        }
        out
    }
    fn split_cols_acc(&self, g: &CudaSlice<f32>, ca: usize, cb: usize, da: Option<&mut CudaSlice<f32>>,
                      db: Option<&mut CudaSlice<f32>>) {
        let total = ca + cb;
        let rows = g.len() / total.max(1);
        let (r, t) = (u32_of(rows, "rows"), total as u32);
        for (d, width, col0) in [(da, ca, 0usize), (db, cb, ca)] {
            if let Some(d) = d {
                let n = rows * width;
                assert_eq!(d.len(), n, "split_cols_acc: gradient shape");
                if n > 0 {
                    let (w, c0) = (width as u32, col0 as u32);
                    launch!(self, "split_cols_acc_f32", cfg_elems(n); d, g, &r, &w, &t, &c0);
                }
            }
        }
    }

    // ---- optimizer -------------------------------------------------------------------------------
    fn round_to_format(&self, x: &mut CudaSlice<f32>, format: crate::backend::StoreFormat) {
        let n = x.len();
        if format != crate::backend::StoreFormat::F32 && n > 0 {
            let n64 = n as u64;
            launch!(self, &format!("round_to_{}_f32", format.name()), cfg_elems(n); x, &n64);
        }
    }
    fn ring_enqueue(&self, bank: &mut Stored<Self>, bank_users: &mut CudaSlice<u32>, ptr: &mut CudaSlice<u32>,
                    keys: &CudaSlice<f32>, users: &CudaSlice<u32>, dim: usize, gate: (&CudaSlice<f64>, usize)) {
        let (b, nslots) = (users.len(), bank_users.len());
        assert_eq!(keys.len(), b * dim, "ring_enqueue: keys are [{b}, {dim}]");
        assert_eq!(ptr.len(), 1, "ring_enqueue: the pointer is one index");
        assert!(gate.1 < gate.0.len(), "ring_enqueue: gate slot {} outside the log", gate.1);
        if b == 0 || nslots == 0 {
            return;
        }
        let (b32, d32, k32) = (u32_of(b, "batch"), u32_of(dim, "dim"), u32_of(nslots, "bank slots"));
        let cfg = cfg_elems(b.min(nslots) * dim);
        let gate = gate.0.slice(gate.1..gate.1 + 1);
        with_stored!(bank, |x, suffix| {
            launch!(self, &format!("ring_enqueue_{suffix}"), cfg; x, bank_users, &*ptr, keys, users, &b32, &d32, &k32, &gate)
        });
        // The pointer moves in its own launch, after every thread of the enqueue has read it.
        let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "ring_advance_u32", one; ptr, &b32, &k32, &gate);
    }

    fn sum_squares(&self, x: &CudaSlice<f32>, offset: usize, len: usize) -> f64 {
        assert!(offset + len <= x.len(), "sum_squares out of bounds");
        if len == 0 {
            return 0.0;
        }
        let view = x.slice(offset..offset + len);
        let g = reduce_grid(len);
        let mut partials = self.alloc_f64(g);
        let (n64, mode) = (len as u64, 1i32);
        let cfg = LaunchConfig { grid_dim: (g as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "sum_partials_f32", cfg; &mut partials, &view, &n64, &mode);
        let mut out = self.alloc_f64(1);
        let np = g as u32;
        let cfg1 = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "reduce_finish_f64", cfg1; &mut out, &partials, &np);
        self.read_back(&out, "sum_squares readback")[0]
    }

    fn record_step(&self, log: &mut CudaSlice<f64>, at: usize, x: &CudaSlice<f32>, segs: &Segments<Self>,
                   scalars: &[&CudaSlice<f32>]) {
        // Two launches for every segment's sum (partials, then one finishing block per segment, each with
        // sum_squares's grid and order, so sum_squares's bits), then the scalars widened after them.
        let n = segs.len();
        assert!(at + n + scalars.len() <= log.len(), "record_step: the row does not fit the log");
        for (i, sg) in segs.host.iter().enumerate() {
            assert!(sg.offset + sg.len <= x.len(), "record_step: segment {i} out of bounds");
        }
        if n > 0 {
            let mut partials = self.alloc_f64(segs.blocks);
            let nsegs = n as u32;
            let cfg = LaunchConfig { grid_dim: (u32_of(segs.blocks, "segment blocks"), 1, 1), block_dim: (BLOCK, 1, 1),
                                     shared_mem_bytes: 0 };
            launch!(self, "sum_squares_segments_f64", cfg; &mut partials, x, &segs.table, &nsegs);
            let mut out = log.slice_mut(at..at + n);
            let cfg = LaunchConfig { grid_dim: (nsegs, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
            launch!(self, "finish_segments_f64", cfg; &mut out, &partials, &segs.table);
        }
        // The loss values: one launch per 8.
        for (c, chunk) in scalars.chunks(8).enumerate() {
            for (i, s) in chunk.iter().enumerate() {
                assert!(!s.is_empty(), "record_step: scalar {} is empty", c * 8 + i);
            }
            let to = at + n + c * 8;
            let mut slots = log.slice_mut(to..to + chunk.len());
            let x: Vec<&CudaSlice<f32>> = (0..8).map(|i| chunk[i.min(chunk.len() - 1)]).collect();
            let k = chunk.len() as u32;
            let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (8, 1, 1), shared_mem_bytes: 0 };
            launch!(self, "widen_scalars_f32", cfg; &mut slots, &k, x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]);
        }
    }

    fn step_verdict(&self, log: &mut CudaSlice<f64>, at: usize, l: &VerdictLayout, groups: &CudaSlice<u32>, clip: f32) {
        assert_eq!(groups.len(), l.sums, "step_verdict: one group per sum");
        let end = [l.sums, l.checked_at + 1, l.ok_at + 1, l.scales_at + l.groups].into_iter().max().unwrap_or(0);
        assert!(at + end <= log.len(), "step_verdict: the row does not fit the log");
        let mut row = log.slice_mut(at..);
        let (sums, checked, ok, scales, ngroups) = (l.sums as u32, l.checked_at as u32, l.ok_at as u32, l.scales_at as u32,
                                                    l.groups as u32);
        let cfg1 = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
        if groups.is_empty() {
            // A null pointer for an empty list (the kernel reads no group).
            let none = self.idx_from_host(&[0]);
            launch!(self, "step_verdict_f64", cfg1; &mut row, &none, &sums, &checked, &ok, &scales, &ngroups, &clip);
        } else {
            launch!(self, "step_verdict_f64", cfg1; &mut row, groups, &sums, &checked, &ok, &scales, &ngroups, &clip);
        }
    }

    fn adamw(&self, p: &mut CudaSlice<f32>, g: &CudaSlice<f32>, m: &mut CudaSlice<f32>, v: &mut CudaSlice<f32>,
             segs: &Segments<Self>, hp: &AdamWHyper, lrs: &[f32], gate: &AdamWGate<Self>) {
        assert!(lrs.len() <= MAX_LR_GROUPS, "adamw: {} learning rates, at most {MAX_LR_GROUPS}", lrs.len());
        if segs.is_empty() {
            return;
        }
        let mut lr = [0f32; MAX_LR_GROUPS];
        lr[..lrs.len()].copy_from_slice(lrs);
        for (i, sg) in segs.host.iter().enumerate() {
            assert!(sg.offset + sg.len <= p.len(), "adamw: segment {i} out of bounds");
            assert!(sg.group < lrs.len() && gate.scales_at + sg.group < gate.log.len(), "adamw: segment {i}'s group");
            assert!(sg.param < gate.counts.len(), "adamw: parameter {} has no step count", sg.param);
        }
        assert!(gate.ok_at < gate.log.len(), "adamw: verdict slot outside the log");
        let (nsegs, ok_at, scales_at) = (segs.len() as u32, gate.ok_at as u32, gate.scales_at as u32);
        let cfg = LaunchConfig { grid_dim: (u32_of(segs.blocks, "segment blocks"), 1, 1), block_dim: (BLOCK, 1, 1),
                                 shared_mem_bytes: 0 };
        launch!(self, "adamw_segments_f32", cfg; p, g, m, v, &segs.table, &nsegs, &hp.beta1, &hp.beta2, &hp.eps,
                gate.log, &ok_at, &scales_at, gate.counts, &lr[0], &lr[1], &lr[2], &lr[3], &lr[4], &lr[5], &lr[6], &lr[7]);
    }

    fn advance_steps(&self, counts: &mut CudaSlice<u32>, segs: &Segments<Self>, log: &CudaSlice<f64>, ok_at: usize) {
        if segs.is_empty() {
            return;
        }
        assert!(ok_at < log.len(), "advance_steps: verdict slot outside the log");
        let (n, ok) = (segs.len() as u32, ok_at as u32);
        launch!(self, "advance_steps_u32", cfg_elems(segs.len()); counts, &segs.table, &n, log, &ok);
    }

    // ---- dense linear algebra --------------------------------------------------------------------
    fn gemm(&self, batch: usize, m: usize, n: usize, k: usize, alpha: f32, a: &CudaSlice<f32>, trans_a: bool,
            b: &CudaSlice<f32>, trans_b: bool, beta: f32, c: &mut CudaSlice<f32>) {
        assert_eq!(a.len(), batch * m * k, "gemm: A has {} elements, expected {}x{}x{}", a.len(), batch, m, k);
        assert_eq!(b.len(), batch * k * n, "gemm: B has {} elements, expected {}x{}x{}", b.len(), batch, k, n);
        assert_eq!(c.len(), batch * m * n, "gemm: C has {} elements, expected {}x{}x{}", c.len(), batch, m, n);
        if batch == 0 || m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            // An empty product: C = beta·C (cuBLAS would reject ld = 0 here).
            if beta == 0.0 {
                self.fill(c, 0.0);
            }
            return;
        }
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: call cuBLAS with the operands
        // swapped (gpu-toolchain.md). A row-major [r, c] matrix is a column-major [c, r] one with ld = c.
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let gemm = GemmConfig {
            transa: op(trans_b),
            transb: op(trans_a),
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha,
            lda: if trans_b { k } else { n } as i32,
            ldb: if trans_a { m } else { k } as i32,
            beta,
            ldc: n as i32,
        };
        if batch == 1 {
            check(unsafe { self.blas.gemm(gemm, b, a, c) }, "cublasSgemm");
            self.launches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            let cfg = StridedBatchedConfig {
                gemm,
                batch_size: batch as i32,
                stride_a: (k * n) as i64,
                stride_b: (m * k) as i64,
                stride_c: (m * n) as i64,
            };
            check(unsafe { self.blas.gemm_strided_batched(cfg, b, a, c) }, "cublasSgemmStridedBatched");
            self.launches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    fn add_bias(&self, x: &mut CudaSlice<f32>, bias: &CudaSlice<f32>, cols: usize) {
        assert_eq!(bias.len(), cols);
        let n = x.len();
        if n > 0 {
            let (n64, c) = (n as u64, cols as u32);
            launch!(self, "add_bias_f32", cfg_elems(n); x, bias, &n64, &c);
        }
    }
    fn sum_rows_into(&self, x: &CudaSlice<f32>, cols: usize, out: &mut CudaSlice<f32>) {
        assert_eq!(out.len(), cols);
        if cols == 0 {
            return;
        }
        let rows = u32_of(x.len() / cols, "rows");
        let c = cols as u32;
        launch!(self, "sum_rows_into_f32", cfg_cols(cols); out, x, &rows, &c);
    }

    // ---- elementwise -----------------------------------------------------------------------------
    fn add(&self, a: &CudaSlice<f32>, b: &CudaSlice<f32>) -> CudaSlice<f32> {
        self.map2("add_f32", a, b)
    }
    fn mul(&self, a: &CudaSlice<f32>, b: &CudaSlice<f32>) -> CudaSlice<f32> {
        self.map2("mul_f32", a, b)
    }
    fn mul_acc(&self, dx: &mut CudaSlice<f32>, dy: &CudaSlice<f32>, other: &CudaSlice<f32>) {
        self.acc2("mul_acc_f32", dx, dy, other)
    }
    fn scale(&self, x: &CudaSlice<f32>, c: f32) -> CudaSlice<f32> {
        let n = x.len();
        let mut out = self.alloc(n);
        if n > 0 {
            let n64 = n as u64;
            launch!(self, "scale_f32", cfg_elems(n); &mut out, x, &c, &n64);
        }
        out
    }
    fn relu(&self, x: &CudaSlice<f32>) -> CudaSlice<f32> {
        self.map1("relu_f32", x)
    }
    fn relu_backward(&self, x: &CudaSlice<f32>, dy: &CudaSlice<f32>, dx: &mut CudaSlice<f32>) {
        self.acc2("relu_backward_f32", dx, x, dy)
    }
    fn gelu(&self, x: &CudaSlice<f32>) -> CudaSlice<f32> {
        self.map1("gelu_f32", x)
    }
    fn gelu_backward(&self, x: &CudaSlice<f32>, dy: &CudaSlice<f32>, dx: &mut CudaSlice<f32>) {
        self.acc2("gelu_backward_f32", dx, x, dy)
    }
    fn softplus(&self, x: &CudaSlice<f32>) -> CudaSlice<f32> {
        self.map1("softplus_f32", x)
    }
    fn softplus_backward(&self, x: &CudaSlice<f32>, dy: &CudaSlice<f32>, dx: &mut CudaSlice<f32>) {
        self.acc2("softplus_backward_f32", dx, x, dy)
    }
    fn dropout(&self, x: &CudaSlice<f32>, key: DropoutKey) -> CudaSlice<f32> {
        let n = x.len();
        let mut out = self.alloc(n);
        if n > 0 {
            let (base, p, s) = Self::dropout_args(key);
            let n64 = n as u64;
            launch!(self, "dropout_f32", cfg_elems(n); &mut out, x, &n64, &base, &p, &s);
        }
        out
    }
    fn dropout_backward(&self, dy: &CudaSlice<f32>, key: DropoutKey, dx: &mut CudaSlice<f32>) {
        assert_eq!(dy.len(), dx.len(), "dropout_backward: lengths differ");
        let n = dx.len();
        if n > 0 {
            let (base, p, s) = Self::dropout_args(key);
            let n64 = n as u64;
            launch!(self, "dropout_backward_f32", cfg_elems(n); dx, dy, &n64, &base, &p, &s);
        }
    }

    // ---- row-wise ops over the last dimension ----------------------------------------------------
    fn layer_norm(&self, x: &CudaSlice<f32>, gamma: &CudaSlice<f32>, beta: &CudaSlice<f32>, cols: usize, eps: f32)
        -> (CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>) {
        let rows = x.len() / cols;
        let mut y = self.alloc(x.len());
        let mut mean = self.alloc(rows);
        let mut rstd = self.alloc(rows);
        if rows > 0 {
            let (r, c) = (u32_of(rows, "rows"), cols as u32);
            launch!(self, "layer_norm_f32", cfg_warp_rows(rows); &mut y, &mut mean, &mut rstd, x, gamma, beta, &r, &c, &eps);
        }
        (y, mean, rstd)
    }
    fn layer_norm_backward(&self, x: &CudaSlice<f32>, gamma: &CudaSlice<f32>, mean: &CudaSlice<f32>,
                           rstd: &CudaSlice<f32>, dy: &CudaSlice<f32>, cols: usize,
                           dx: Option<&mut CudaSlice<f32>>, dgamma: Option<&mut CudaSlice<f32>>,
                           dbeta: Option<&mut CudaSlice<f32>>) {
        let rows = x.len() / cols;
        if rows == 0 {
            return;
        }
        let (r, c) = (u32_of(rows, "rows"), cols as u32);
        if let Some(dx) = dx {
            launch!(self, "layer_norm_backward_dx_f32", cfg_warp_rows(rows); dx, x, gamma, mean, rstd, dy, &r, &c);
        }
        if let Some(dg) = dgamma {
            launch!(self, "layer_norm_dgamma_f32", cfg_cols(cols); dg, x, mean, rstd, dy, &r, &c);
        }
        if let Some(db) = dbeta {
            launch!(self, "sum_rows_into_f32", cfg_cols(cols); db, dy, &r, &c);
        }
    }
    fn softmax(&self, x: &CudaSlice<f32>, cols: usize) -> CudaSlice<f32> {
        self.row_map("softmax_f32", x, cols)
    }
    fn softmax_backward(&self, y: &CudaSlice<f32>, dy: &CudaSlice<f32>, cols: usize, dx: &mut CudaSlice<f32>) {
        self.row_acc("softmax_backward_f32", y, dy, cols, dx)
    }
    fn log_softmax(&self, x: &CudaSlice<f32>, cols: usize) -> CudaSlice<f32> {
        self.row_map("log_softmax_f32", x, cols)
    }
    fn log_softmax_backward(&self, y: &CudaSlice<f32>, dy: &CudaSlice<f32>, cols: usize, dx: &mut CudaSlice<f32>) {
        self.row_acc("log_softmax_backward_f32", y, dy, cols, dx)
    }
    fn l2_normalize(&self, x: &CudaSlice<f32>, cols: usize, eps: f32) -> (CudaSlice<f32>, CudaSlice<f32>) {
        let rows = x.len() / cols;
        let mut y = self.alloc(x.len());
        let mut norms = self.alloc(rows);
        if rows > 0 {
            let (r, c) = (u32_of(rows, "rows"), cols as u32);
            launch!(self, "l2_normalize_f32", cfg_warp_rows(rows); &mut y, &mut norms, x, &r, &c, &eps);
        }
        (y, norms)
    }
    fn l2_normalize_backward(&self, x: &CudaSlice<f32>, norms: &CudaSlice<f32>, dy: &CudaSlice<f32>, cols: usize,
                             eps: f32, dx: &mut CudaSlice<f32>) {
        let rows = x.len() / cols;
        if rows > 0 {
            let (r, c) = (u32_of(rows, "rows"), cols as u32);
            launch!(self, "l2_normalize_backward_f32", cfg_warp_rows(rows); dx, x, norms, dy, &r, &c, &eps);
        }
    }
    fn row_dot(&self, a: &CudaSlice<f32>, b: &CudaSlice<f32>, cols: usize) -> CudaSlice<f32> {
        assert_eq!(a.len(), b.len(), "row_dot: shapes differ");
        let rows = a.len() / cols;
        let mut out = self.alloc(rows);
        if rows > 0 {
            let (r, c) = (u32_of(rows, "rows"), cols as u32);
            launch!(self, "row_dot_f32", cfg_warp_rows(rows); &mut out, a, b, &r, &c);
        }
        out
    }
    fn row_scale_acc(&self, dx: &mut CudaSlice<f32>, g: &CudaSlice<f32>, other: &CudaSlice<f32>, cols: usize) {
        let n = dx.len();
        if n > 0 {
            let (n64, c) = (n as u64, cols as u32);
            launch!(self, "row_scale_acc_f32", cfg_elems(n); dx, g, other, &n64, &c);
        }
    }

    // ---- indexing ----------------------------------------------------------------------------------
    fn gather_rows(&self, table: &CudaSlice<f32>, idx: &CudaSlice<u32>, cols: usize) -> CudaSlice<f32> {
        let n = idx.len() * cols;
        let mut out = self.alloc(n);
        if n > 0 {
            let (n64, c, tr) = (n as u64, cols as u32, u32_of(table.len() / cols, "table rows"));
            launch!(self, "gather_rows_f32", cfg_elems(n); &mut out, table, idx, &n64, &c, &tr);
        }
        out
    }
    fn scatter_add_rows(&self, dy: &CudaSlice<f32>, idx: &CudaSlice<u32>, cols: usize, skip: Option<u32>,
                        dtable: &mut CudaSlice<f32>) {
        let n = dy.len();
        if n > 0 {
            let (n64, c, tr) = (n as u64, cols as u32, u32_of(dtable.len() / cols, "table rows"));
            let (sk, has) = (skip.unwrap_or(0), skip.is_some() as i32);
            if self.deterministic {
                assert_eq!(n, idx.len() * cols, "scatter_add_rows: dy shape");
                let (sorted, starts) = self.lookup_csr(idx, skip, tr as usize);
                let cfg = cfg_elems(tr as usize * cols);
                launch!(self, "scatter_add_rows_sorted_f32", cfg; dtable, dy, &sorted, &starts, &tr, &c);
            } else {
                launch!(self, "scatter_add_rows_f32", cfg_elems(n); dtable, dy, idx, &n64, &c, &sk, &has, &tr);
            }
        }
    }
    fn gather_cols(&self, x: &CudaSlice<f32>, idx: &CudaSlice<u32>, c: usize, j: usize) -> CudaSlice<f32> {
        let n = idx.len();
        let mut out = self.alloc(n);
        if n > 0 {
            let (r, c32, j32) = (u32_of(n / j, "rows"), c as u32, j as u32);
            launch!(self, "gather_cols_f32", cfg_elems(n); &mut out, x, idx, &r, &c32, &j32);
        }
        out
    }
    fn gather_cols_backward(&self, dy: &CudaSlice<f32>, idx: &CudaSlice<u32>, c: usize, j: usize,
                            dx: &mut CudaSlice<f32>) {
        let n = idx.len();
        if n > 0 {
            let rows = n / j;
            let (r, c32, j32) = (u32_of(rows, "rows"), c as u32, j as u32);
            launch!(self, "gather_cols_backward_f32", cfg_elems(rows); dx, dy, idx, &r, &c32, &j32);
        }
    }
    fn score_candidates(&self, h: &CudaSlice<f32>, table: &CudaSlice<f32>, idx: &CudaSlice<u32>, d: usize,
                        j: usize) -> CudaSlice<f32> {
        let n = idx.len();
        let mut out = self.alloc(n);
        if n > 0 {
            let (r, d32, j32, tr) = (u32_of(n / j, "rows"), d as u32, j as u32, u32_of(table.len() / d, "table rows"));
            launch!(self, "score_candidates_f32", cfg_warp_rows(n); &mut out, h, table, idx, &r, &d32, &j32, &tr);
        }
        out
    }
    fn score_candidates_backward(&self, h: &CudaSlice<f32>, table: &CudaSlice<f32>, idx: &CudaSlice<u32>, d: usize,
                                 j: usize, dy: &CudaSlice<f32>, dh: Option<&mut CudaSlice<f32>>,
                                 dtable: Option<&mut CudaSlice<f32>>) {
        let n = idx.len();
        if n == 0 {
            return;
        }
        let rows = n / j;
        let (r, d32, j32, tr) = (u32_of(rows, "rows"), d as u32, j as u32, u32_of(table.len() / d, "table rows"));
        if let Some(dh) = dh {
            launch!(self, "score_candidates_backward_dh_f32", cfg_warp_rows(rows); dh, table, idx, dy, &r, &d32, &j32, &tr);
        }
        if let Some(dt) = dtable {
            if self.deterministic {
                let (sorted, starts) = self.lookup_csr(idx, None, tr as usize);
                let cfg = cfg_elems(tr as usize * d);
                launch!(self, "score_candidates_backward_dtable_sorted_f32", cfg; dt, h, dy, &sorted, &starts, &tr, &d32, &j32);
            } else {
                launch!(self, "score_candidates_backward_dtable_f32", cfg_elems(n * d); dt, h, idx, dy, &r, &d32, &j32, &tr);
            }
        }
    }

    // ---- attention -------------------------------------------------------------------------------
    fn attention(&self, qkv: &CudaSlice<f32>, layout: &SeqLayout<Self>, d: usize, heads: usize,
                 dropout: Option<DropoutKey>) -> (CudaSlice<f32>, CudaSlice<f32>) {
        assert_eq!(d % heads, 0, "attention: d = {d} is not divisible by heads = {heads}");
        let t = layout.num_tokens();
        assert_eq!(qkv.len(), t * 3 * d, "attention: qkv has {} values, expected [{t}, {}]", qkv.len(), 3 * d);
        let nprobs = *layout.prob_offsets(heads).last().unwrap();
        let mut out = self.alloc(t * d);
        let mut probs = self.alloc(nprobs);
        let s = layout.num_seqs();
        if s == 0 || t == 0 {
            return (out, probs);
        }
        let (d32, h32) = (d as u32, heads as u32);
        let scale = 1.0 / ((d / heads) as f32).sqrt();
        let (has, (base, p, ds)) = match dropout {
            Some(k) => (1i32, Self::dropout_args(k)),
            None => (0i32, (0u64, 0.0f32, 1.0f32)),
        };
        let cfg = LaunchConfig { grid_dim: (u32_of(s, "sequences"), h32, 1), block_dim: (ATTN_BLOCK, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "attention_forward_f32", cfg; &mut out, &mut probs, qkv, &layout.offsets, &layout.key_valid,
                &d32, &h32, &scale, &has, &base, &p, &ds);
        (out, probs)
    }
    fn attention_backward(&self, qkv: &CudaSlice<f32>, probs: &CudaSlice<f32>, layout: &SeqLayout<Self>, d: usize,
                          heads: usize, dropout: Option<DropoutKey>, dout: &CudaSlice<f32>,
                          dqkv: &mut CudaSlice<f32>) {
        let t = layout.num_tokens();
        let s = layout.num_seqs();
        if s == 0 || t == 0 {
            return;
        }
        assert_eq!(dqkv.len(), t * 3 * d, "attention_backward: dqkv shape");
        // dS scratch, laid out like probs; every element is written before it is read.
        let mut ds = self.alloc(probs.len());
        let (d32, h32) = (d as u32, heads as u32);
        let scale = 1.0 / ((d / heads) as f32).sqrt();
        let (has, (base, p, dsc)) = match dropout {
            Some(k) => (1i32, Self::dropout_args(k)),
            None => (0i32, (0u64, 0.0f32, 1.0f32)),
        };
        let cfg = LaunchConfig { grid_dim: (u32_of(s, "sequences"), h32, 1), block_dim: (ATTN_BLOCK, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "attention_backward_f32", cfg; dqkv, &mut ds, qkv, probs, dout, &layout.offsets, &d32, &h32,
                &scale, &has, &base, &p, &dsc);
    }

    // ---- losses ----------------------------------------------------------------------------------
    fn bpr(&self, pos: &CudaSlice<f32>, neg: &CudaSlice<f32>, k: usize) -> CudaSlice<f32> {
        let n = pos.len() * k;
        let g = reduce_grid(n);
        let mut partials = self.alloc_f64(g);
        let (r, k32) = (u32_of(pos.len(), "rows"), k as u32);
        let cfg = LaunchConfig { grid_dim: (g as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "bpr_partials_f32", cfg; &mut partials, pos, neg, &r, &k32);
        self.finish(&partials, g, n.max(1) as f64)
    }
    fn bpr_backward(&self, pos: &CudaSlice<f32>, neg: &CudaSlice<f32>, k: usize, dloss: &CudaSlice<f32>,
                    dpos: Option<&mut CudaSlice<f32>>, dneg: Option<&mut CudaSlice<f32>>) {
        let rows = pos.len();
        let n = rows * k;
        if n == 0 {
            return;
        }
        let (r, k32, count) = (u32_of(rows, "rows"), k as u32, n as f32);
        if let Some(dp) = dpos {
            launch!(self, "bpr_backward_pos_f32", cfg_elems(rows); dp, pos, neg, dloss, &r, &k32, &count);
        }
        if let Some(dn) = dneg {
            launch!(self, "bpr_backward_neg_f32", cfg_elems(n); dn, pos, neg, dloss, &r, &k32, &count);
        }
    }
    fn bce_logits(&self, logits: &CudaSlice<f32>, labels: &CudaSlice<f32>) -> CudaSlice<f32> {
        assert_eq!(logits.len(), labels.len(), "bce_logits: shapes differ");
        let n = logits.len();
        let g = reduce_grid(n);
        let mut partials = self.alloc_f64(g);
        let n64 = n as u64;
        let cfg = LaunchConfig { grid_dim: (g as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "bce_partials_f32", cfg; &mut partials, logits, labels, &n64);
        self.finish(&partials, g, n.max(1) as f64)
    }
    fn bce_logits_backward(&self, logits: &CudaSlice<f32>, labels: &CudaSlice<f32>, dloss: &CudaSlice<f32>,
                           dx: &mut CudaSlice<f32>) {
        let n = logits.len();
        if n > 0 {
            let (n64, count) = (n as u64, n as f32);
            launch!(self, "bce_backward_f32", cfg_elems(n); dx, logits, labels, dloss, &n64, &count);
        }
    }
    fn cross_entropy(&self, logits: &CudaSlice<f32>, target: &CudaSlice<u32>, cols: usize) -> CudaSlice<f32> {
        let rows = target.len();
        let mut rowloss = self.alloc(rows);
        if rows > 0 {
            let (r, c) = (u32_of(rows, "rows"), cols as u32);
            launch!(self, "cross_entropy_rows_f32", cfg_warp_rows(rows); &mut rowloss, logits, target, &r, &c);
        }
        self.mean_of(&rowloss, rows.max(1) as f64)
    }
    fn cross_entropy_backward(&self, logits: &CudaSlice<f32>, target: &CudaSlice<u32>, cols: usize,
                              dloss: &CudaSlice<f32>, dx: &mut CudaSlice<f32>) {
        let rows = target.len();
        if rows > 0 {
            let (r, c, count) = (u32_of(rows, "rows"), cols as u32, rows as f32);
            launch!(self, "cross_entropy_backward_f32", cfg_warp_rows(rows); dx, logits, target, dloss, &r, &c, &count);
        }
    }
    fn kl_div(&self, logits: &CudaSlice<f32>, teacher: &CudaSlice<f32>, cols: usize) -> CudaSlice<f32> {
        let rows = logits.len() / cols;
        let mut rowloss = self.alloc(rows);
        if rows > 0 {
            let (r, c) = (u32_of(rows, "rows"), cols as u32);
            launch!(self, "kl_rows_f32", cfg_warp_rows(rows); &mut rowloss, logits, teacher, &r, &c);
        }
        self.mean_of(&rowloss, rows.max(1) as f64)
    }
    fn kl_div_backward(&self, logits: &CudaSlice<f32>, teacher: &CudaSlice<f32>, cols: usize, dloss: &CudaSlice<f32>,
                       dx: &mut CudaSlice<f32>) {
        let rows = logits.len() / cols;
        if rows > 0 {
            let (r, c, count) = (u32_of(rows, "rows"), cols as u32, rows as f32);
            launch!(self, "kl_backward_f32", cfg_warp_rows(rows); dx, logits, teacher, dloss, &r, &c, &count);
        }
    }
    fn mse(&self, a: &CudaSlice<f32>, b: &CudaSlice<f32>) -> CudaSlice<f32> {
        assert_eq!(a.len(), b.len(), "mse: shapes differ");
        let n = a.len();
        let g = reduce_grid(n);
        let mut partials = self.alloc_f64(g);
        let n64 = n as u64;
        let cfg = LaunchConfig { grid_dim: (g as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "mse_partials_f32", cfg; &mut partials, a, b, &n64);
        self.finish(&partials, g, n.max(1) as f64)
    }
    fn infonce_bank(&self, q: &CudaSlice<f32>, k: &CudaSlice<f32>, bank: &Stored<Self>, bank_users: &CudaSlice<u32>,
                    users: &CudaSlice<u32>, d: usize, tau: f32) -> CudaSlice<f32> {
        let b = users.len();
        let mut out = self.alloc(1);
        let (lse, pos) = self.infonce_rows(q, k, bank, bank_users, users, d, tau);
        let b32 = b as u32;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "infonce_loss_f32", cfg; &mut out, &lse, &pos, &b32);
        out
    }
    fn infonce_bank_backward(&self, q: &CudaSlice<f32>, k: &CudaSlice<f32>, bank: &Stored<Self>,
                             bank_users: &CudaSlice<u32>, users: &CudaSlice<u32>, d: usize, tau: f32,
                             dloss: &CudaSlice<f32>, dq: Option<&mut CudaSlice<f32>>, dk: Option<&mut CudaSlice<f32>>) {
        let b = users.len();
        if b == 0 || (dq.is_none() && dk.is_none()) {
            return;
        }
        let (lse, _pos) = self.infonce_rows(q, k, bank, bank_users, users, d, tau);
        let (b32, kb, d32, inv_tau) = (b as u32, u32_of(bank_users.len(), "bank slots"), d as u32, (1.0f32 / tau) as f64);
        let cfg = LaunchConfig { grid_dim: (b32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        if let Some(dq) = dq {
            // Per-range partials of P · keys over the query × column tiles, then a fixed-order sum over ranges.
            let (tiles, nranges) = infonce_tiles(b, bank_users.len());
            let mut part = self.alloc(nranges as usize * b * d);
            with_stored!(bank, |x, suffix| {
                launch!(self, &format!("infonce_dq_parts_{suffix}"), tiles; &mut part, &lse, q, k, x, bank_users, users,
                        &b32, &kb, &d32, &inv_tau)
            });
            launch!(self, "infonce_dq_reduce_f32", cfg_elems(b * d); dq, &part, dloss, &b32, &nranges, &d32, &inv_tau);
        }
        if let Some(dk) = dk {
            launch!(self, "infonce_dk_f32", cfg; dk, &lse, q, k, dloss, &b32, &d32, &inv_tau);
        }
    }
    fn fuse_softmax(&self, s: &CudaSlice<f32>, q: &CudaSlice<f32>, cols: usize, alpha: f32) -> CudaSlice<f32> {
        assert_eq!(s.len(), q.len(), "fuse_softmax: the two score matrices differ in size");
        let rows = s.len() / cols.max(1);
        let mut out = self.alloc(s.len());
        if rows > 0 {
            let (c32, a64) = (u32_of(cols, "fuse_softmax cols"), alpha as f64);
            let cfg = LaunchConfig { grid_dim: (u32_of(rows, "fuse_softmax rows"), 1, 1), block_dim: (BLOCK, 1, 1),
                                     shared_mem_bytes: 0 };
            launch!(self, "fuse_softmax_f32", cfg; &mut out, s, q, &c32, &a64);
        }
        out
    }
    fn rank_counts(&self, scores: &CudaSlice<f32>, cols: usize, targets: &CudaSlice<u32>, ex_offsets: &CudaSlice<u32>,
                   ex_items: &CudaSlice<u32>) -> CudaSlice<u32> {
        let rows = targets.len();
        assert_eq!(scores.len(), rows * cols, "rank_counts: scores are [{rows}, {cols}]");
        assert_eq!(ex_offsets.len(), rows + 1, "rank_counts: {} offsets for {rows} rows", ex_offsets.len());
        if rows == 0 {
            return check(self.stream.null::<u32>(), "rank_counts(no rows)");
        }
        let mut counts = check(self.stream.alloc_zeros::<u32>(3 * rows), "rank_counts alloc");
        {
            let c32 = u32_of(cols, "rank_counts cols");
            let cfg = LaunchConfig { grid_dim: (u32_of(rows, "rank_counts rows"), 1, 1), block_dim: (BLOCK, 1, 1),
                                     shared_mem_bytes: 0 };
            // An empty exclusion list is a null slice; the kernel never reads it then (offsets are all 0).
            launch!(self, "rank_counts_f32", cfg; &mut counts, scores, targets, ex_offsets, ex_items, &c32);
        }
        counts
    }
    fn logdet_spd(&self, g: &CudaSlice<f32>, n: usize) -> (CudaSlice<f32>, CudaSlice<f32>) {
        assert_eq!(g.len(), n * n, "logdet_spd: G is [{n}, {n}]");
        let (mut value, mut inverse) = (self.alloc(1), self.alloc(n * n));
        if n > 0 {
            let (mut l, mut y) = (self.alloc_f64(n * n), self.alloc_f64(n * n));
            let n32 = u32_of(n, "logdet_spd n");
            // One block: the factorisation is a sequence of n dependent steps (kernels/logdet.cu).
            let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
            launch!(self, "logdet_spd_f32", cfg; &mut value, &mut inverse, &mut l, &mut y, g, &n32);
        } else {
            let zero = self.from_host(&[0.0]); // log det of the empty matrix
            value = zero;
        }
        (value, inverse)
    }
    fn sum_all(&self, x: &CudaSlice<f32>) -> CudaSlice<f32> {
        self.mean_of(x, 1.0)
    }
    fn add_scalar_acc(&self, dx: &mut CudaSlice<f32>, c: &CudaSlice<f32>, scale: f32) {
        let n = dx.len();
        if n > 0 {
            let n64 = n as u64;
            launch!(self, "add_scalar_acc_f32", cfg_elems(n); dx, c, &scale, &n64);
        }
    }
    fn read_scalar(&self, x: &CudaSlice<f32>) -> f32 {
        self.read_back(&x.slice(0..1), "read_scalar")[0]
    }

    fn read_scalars(&self, xs: &[&CudaSlice<f32>]) -> Vec<f32> {
        if xs.is_empty() {
            return Vec::new();
        }
        // Device-to-device copies into one array (ordered on the stream), then a single readback.
        let mut packed = self.zeros(xs.len());
        for (i, x) in xs.iter().enumerate() {
            assert!(!x.is_empty(), "read_scalars: buffer {i} is empty");
            check(self.stream.memcpy_dtod(&x.slice(0..1), &mut packed.slice_mut(i..i + 1)), "read_scalars");
        }
        let mut host = self.read_back(&packed, "read_scalars readback");
        host.truncate(xs.len());
        host
    }
}

impl CudaBackend {
    /// Per-query (log-sum-exp, positive logit) of the fused InfoNCE, in f64 on the device.
    #[allow(clippy::too_many_arguments)]
    fn infonce_rows(&self, q: &CudaSlice<f32>, k: &CudaSlice<f32>, bank: &Stored<Self>, bank_users: &CudaSlice<u32>,
                    users: &CudaSlice<u32>, d: usize, tau: f32) -> (CudaSlice<f64>, CudaSlice<f64>) {
        let b = users.len();
        // infonce_dk_f32 keeps ≤ 4 accumulators per thread of a 256-thread block (the tiled kernels take any d).
        assert!(d <= 4 * BLOCK as usize, "infonce_bank: d = {d} > {} is not supported by the CUDA kernel", 4 * BLOCK);
        assert_eq!(q.len(), b * d, "infonce_bank: q shape");
        assert_eq!(k.len(), b * d, "infonce_bank: k shape");
        let bank_len = with_stored!(bank, |x, _suffix| x.len());
        assert_eq!(bank_len, bank_users.len() * d, "infonce_bank: bank shape");
        let mut lse = self.alloc_f64(b);
        let mut pos = self.alloc_f64(b);
        if b > 0 {
            let (b32, kb, d32, inv_tau) = (b as u32, u32_of(bank_users.len(), "bank slots"), d as u32, (1.0f32 / tau) as f64);
            // Per (query, column range) partial log-sum-exps over the tiles, then one merge per query.
            let (tiles, nranges) = infonce_tiles(b, bank_users.len());
            let (mut part_m, mut part_s) = (self.alloc_f64(b * nranges as usize), self.alloc_f64(b * nranges as usize));
            with_stored!(bank, |x, suffix| {
                launch!(self, &format!("infonce_lse_parts_{suffix}"), tiles; &mut part_m, &mut part_s, q, k, x, bank_users,
                        users, &b32, &kb, &d32, &inv_tau)
            });
            let cfg = LaunchConfig { grid_dim: (b.div_ceil(BLOCK as usize) as u32, 1, 1), block_dim: (BLOCK, 1, 1),
                                     shared_mem_bytes: 0 };
            launch!(self, "infonce_lse_merge_f32", cfg; &mut lse, &mut pos, &part_m, &part_s, q, k, &b32, &nranges, &d32,
                    &inv_tau);
        }
        (lse, pos)
    }

    /// Warp-per-row map kernels: (y, x, rows, cols).
    fn row_map(&self, name: &str, x: &CudaSlice<f32>, cols: usize) -> CudaSlice<f32> {
        let rows = x.len() / cols;
        let mut y = self.alloc(x.len());
        if rows > 0 {
            let (r, c) = (u32_of(rows, "rows"), cols as u32);
            launch!(self, name, cfg_warp_rows(rows); &mut y, x, &r, &c);
        }
        y
    }
    /// Warp-per-row backward kernels: (dx, y, dy, rows, cols).
    fn row_acc(&self, name: &str, y: &CudaSlice<f32>, dy: &CudaSlice<f32>, cols: usize, dx: &mut CudaSlice<f32>) {
        let rows = y.len() / cols;
        if rows > 0 {
            let (r, c) = (u32_of(rows, "rows"), cols as u32);
            launch!(self, name, cfg_warp_rows(rows); dx, y, dy, &r, &c);
        }
    }
}
