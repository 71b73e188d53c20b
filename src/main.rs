//! `ur4rec-engine`: the command line.
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use ur4rec_engine::backend::{cuda, Backend, CpuBackend};
use ur4rec_engine::config::{Config, Pipeline};
use ur4rec_engine::train::ur4rec_trainer::train_ur4rec;
use ur4rec_engine::params::ParamBuilder;
use ur4rec_engine::report::{default_run_dir, RunDir};
use ur4rec_engine::rng::Rng;
use ur4rec_engine::train::resume::{ResumeFile, StopReason, Stopped, RESUME_FILE};
use ur4rec_engine::train::trainer::{train_sasrec, PreparedData, RunOptions};

// Per-step activations are freed and reallocated every step; mimalloc reuses them without the page
// faults glibc's mmap threshold causes for large buffers.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "ur4rec-engine", version, about = "Train UR4Rec / SASRec on a Rust autograd tape (CPU and CUDA backends)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model and evaluate it on the test split; writes a run directory.
    Train(TrainArgs),
    /// Evaluate a checkpoint on the validation and test splits (both protocols); optionally export each
    /// user's test candidates and scores.
    Eval(EvalArgs),
    /// Run the baseline, each improvement alone and all five combined over several seeds; writes
    /// ablation.md and ablation.json.
    Ablation(AblationArgs),
    /// Print the compute device found (or why none is used) and, with --params, the parameter names.
    Info(InfoArgs),
}

#[derive(clap::Args)]
struct TrainArgs {
    #[command(flatten)]
    source: ConfigSource,
    /// `synthetic` (built-in data set) or a data file / directory (u.data, ratings.dat, *.inter, *.txt).
    #[arg(long)]
    data: Option<String>,
    /// Data file format when the file name does not tell: movielens, movielens-dat, sasrec, sasrec-lists, recbole.
    #[arg(long)]
    format: Option<String>,
    /// Run directory (default runs/<data>-<time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N. `auto` uses a GPU when one is usable and says why not otherwise.
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// CPU worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
    /// Deterministic mode: on the GPU, reductions without float atomics (embedding backward by sorted
    /// segments); the CPU backend is always independent of the thread count. Sets train.deterministic.
    #[arg(long)]
    deterministic: bool,
    /// Continue the run in this directory from its resume checkpoint (resume.safetensors), with the
    /// configuration recorded there. Only --device, --threads and --quiet may be given with it.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Write a resume checkpoint and stop after this many global steps (continue with --resume).
    #[arg(long, value_name = "STEPS")]
    stop_after_steps: Option<usize>,
    /// Configuration overrides, `section.key=value` (e.g. train.lr=5e-4 sasrec.norm=post).
    overrides: Vec<String>,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// A checkpoint written by `train` (e.g. RUN/best.safetensors or RUN/final.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The run's configuration (default: config.toml beside the checkpoint).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override the data source recorded in the configuration.
    #[arg(long)]
    data: Option<String>,
    /// SASRec's fusion weight (default: the run's calibrated weight from summary.json, else the config's).
    #[arg(long)]
    alpha: Option<f32>,
    /// Write the test candidates and scores: a directory of .npy files, or one .safetensors file.
    #[arg(long)]
    dump_scores: Option<PathBuf>,
}

#[derive(clap::Args)]
struct AblationArgs {
    #[command(flatten)]
    source: ConfigSource,
    #[arg(long)]
    data: Option<String>,
    /// Output directory (default runs/ablation-<data>-<time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Training seeds per variant (seed, seed+1, ...).
    #[arg(long, default_value_t = 3)]
    seeds: usize,
    /// Run only the variants whose name contains one of these strings (repeatable).
    #[arg(long)]
    only: Vec<String>,
    #[arg(long)]
    threads: Option<usize>,
    /// auto, cpu, cuda or cuda:N (as for `train`).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Configuration overrides, `section.key=value`.
    overrides: Vec<String>,
}

#[derive(clap::Args)]
struct InfoArgs {
    /// List the stable parameter names (for unfreezing schedules) of the configured model.
    #[arg(long)]
    params: bool,
    #[command(flatten)]
    source: ConfigSource,
    /// Number of items of the data set the model is sized for.
    #[arg(long, default_value_t = 1000)]
    items: usize,
}

/// Where a command's configuration comes from (train, ablation, info).
#[derive(clap::Args)]
struct ConfigSource {
    /// Configuration preset: default (small, synthetic-friendly), sasrec, ur4rec (the UR4Rec reference
    /// settings), sasrec-paper (Kang & McAuley's settings).
    #[arg(long)]
    preset: Option<String>,
    /// TOML configuration file (its `preset` key, if any, is applied first; --preset overrides it).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn resolve_config(source: &ConfigSource) -> Result<Config> {
    let (preset, file) = (&source.preset, &source.config);
    let base = preset.as_deref().unwrap_or("default");
    match file {
        Some(f) => Config::from_file(f, base),
        None => Config::preset(base),
    }
    .map_err(anyhow::Error::msg)
}

/// The backend chosen on the command line. Training code is generic over `Backend`; [`Device::run`] calls it
/// with whichever backend this holds.
enum Device {
    Cpu(CpuBackend),
    Cuda(Box<cuda::CudaBackend>),
}

/// A computation generic over the backend (what [`Device::run`] dispatches).
trait WithBackend {
    type Out;
    fn run<B: Backend>(self, backend: &B) -> Self::Out;
}

impl Device {
    fn name(&self) -> String {
        match self {
            Device::Cpu(b) => b.name(),
            Device::Cuda(b) => b.name(),
        }
    }
    /// Runs `f` on this device. On the GPU a driver failure mid-run (out of memory, a faulting kernel) ends
    /// in a clear error rather than a panic (`cuda::failure`).
    fn run<T, F: WithBackend<Out = Result<T>>>(&self, f: F) -> Result<T> {
        match self {
            Device::Cpu(b) => f.run(b),
            Device::Cuda(b) => cuda::failure::run_guarded(|| f.run(&**b)),
        }
    }
}

/// Set to 1 to let `--device auto` pick a GPU: the CUDA kernels pass their CPU-parity tests by construction
/// only so far and have not been validated on a GPU yet.
const ENABLE_CUDA_ENV: &str = "UR4REC_ENABLE_CUDA";

/// Picks the backend. `cpu`; `cuda` / `cuda:N`: the CUDA backend on GPU N or a clear error; `auto`: the GPU
/// when one starts and `UR4REC_ENABLE_CUDA=1`, otherwise the CPU, saying why. Never panics.
fn choose_device(device: &str, deterministic: bool, tf32: bool) -> Result<Device> {
    let d = device.trim().to_ascii_lowercase();
    // The GPU with the run's options: the deterministic embedding backward (also on by
    // UR4REC_CUDA_DETERMINISTIC=1) and cuBLAS's TF32 math (train.tf32).
    let start = |n: usize| cuda::CudaBackend::new(n).map(|g| {
        let on = deterministic || g.is_deterministic();
        g.with_deterministic(on).with_tf32(tf32)
    });
    let options = |g: &cuda::CudaBackend| {
        let mut o = String::new();
        if g.is_deterministic() {
            o.push_str("; deterministic embedding backward");
        }
        if g.is_tf32() {
            o.push_str("; cuBLAS in TF32 (train.tf32)");
        }
        o
    };
    if tf32 && d == "cpu" {
        eprintln!("note: train.tf32 has no effect on the CPU backend");
    }
    match d.as_str() {
        "cpu" => Ok(Device::Cpu(CpuBackend::new())),
        "auto" => {
            let enabled = std::env::var(ENABLE_CUDA_ENV).map(|v| v == "1").unwrap_or(false);
            let why = if enabled {
                match start(0) {
                    Ok(gpu) => {
                        eprintln!("device: {} ({ENABLE_CUDA_ENV}=1; note: the CUDA kernels have not been validated on a \
                                   GPU yet; compare against --device cpu){}", gpu.name(), options(&gpu));
                        return Ok(Device::Cuda(Box::new(gpu)));
                    }
                    Err(e) => format!("{ENABLE_CUDA_ENV}=1 but the CUDA backend did not start: {e}"),
                }
            } else {
                match cuda::probe(0) {
                    Ok(gpu) => format!("GPU {} found, but the CUDA kernels have not been validated on a GPU yet; set \
                                        {ENABLE_CUDA_ENV}=1 or pass --device cuda to use it", gpu.name),
                    Err(e) => e.to_string(),
                }
            };
            eprintln!("device: cpu ({why})");
            Ok(Device::Cpu(CpuBackend::new()))
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n: usize = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().with_context(|| format!("--device {device}: bad GPU ordinal"))?,
                None => 0,
            };
            match start(n) {
                Ok(gpu) => {
                    eprintln!("device: {} (note: the CUDA kernels have not been validated on a GPU yet){}", gpu.name(),
                              options(&gpu));
                    Ok(Device::Cuda(Box::new(gpu)))
                }
                Err(e) => bail!("--device {device}: {e}"),
            }
        }
        _ => bail!("--device {device}: expected auto, cpu, cuda or cuda:N"),
    }
}

/// Trains the configured pipeline on one backend and writes the summaries.
struct TrainJob<'a> {
    cfg: &'a Config,
    data: &'a PreparedData,
    run: &'a mut RunDir,
    opts: &'a RunOptions,
}

impl WithBackend for TrainJob<'_> {
    type Out = Result<()>;
    fn run<B: Backend>(self, backend: &B) -> Result<()> {
        let TrainJob { cfg, data, run, opts } = self;
        match cfg.pipeline {
            Pipeline::Sasrec => {
                let summary = train_sasrec(backend, cfg, data, run, opts)?;
                run.write("summary.json", serde_json::to_string_pretty(&summary)?.as_bytes())?;
                println!("{summary}");
            }
            Pipeline::Ur4rec => {
                let summary = train_ur4rec(backend, cfg, data, run, opts)?;
                run.write("summary.json", serde_json::to_string_pretty(&summary)?.as_bytes())?;
                ur4rec_engine::report::write_ur4rec_report(run, cfg, &summary)?;
                println!("{summary}");
            }
        }
        Ok(())
    }
}

/// The ablation study on one backend.
struct AblationJob<'a> {
    cfg: &'a Config,
    data: &'a PreparedData,
    seeds: usize,
    out: &'a std::path::Path,
    only: &'a [String],
}

impl WithBackend for AblationJob<'_> {
    type Out = Result<usize>;
    fn run<B: Backend>(self, backend: &B) -> Result<usize> {
        let rows = ur4rec_engine::ablation::run_ablation(backend, self.cfg, self.data, self.seeds, self.out, self.only)?;
        Ok(rows.len())
    }
}

fn train(args: TrainArgs) -> Result<()> {
    if let Some(t) = args.threads {
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global().context("setting the thread count")?;
    }
    // The recorded configuration of a run being resumed, and the metrics length to cut back to.
    let resumed = match &args.resume {
        Some(dir) => {
            let given = [("--preset", args.source.preset.is_some()), ("--config", args.source.config.is_some()), ("--data", args.data.is_some()),
                         ("--format", args.format.is_some()), ("--out", args.out.is_some()), ("--epochs", args.epochs.is_some()),
                         ("--seed", args.seed.is_some()), ("--deterministic", args.deterministic),
                         ("overrides", !args.overrides.is_empty())];
            if let Some((flag, _)) = given.iter().find(|(_, on)| *on) {
                bail!("--resume continues a run with the configuration recorded in its checkpoint; {flag} cannot be \
                       given with it");
            }
            let file = ResumeFile::open(&dir.join(RESUME_FILE))?;
            let info = file.info()?;
            let cfg: Config = toml::from_str(&info.config)
                .with_context(|| format!("{}: the recorded configuration does not parse", file.path.display()))?;
            Some((dir.clone(), cfg, info.metrics_bytes))
        }
        None => None,
    };
    let cfg = match &resumed {
        Some((_, cfg, _)) => cfg.clone(),
        None => {
            let mut cfg = resolve_config(&args.source)?;
            if let Some(d) = &args.data {
                cfg.data.source = d.clone();
            }
            if let Some(f) = &args.format {
                cfg.data.format = f.clone();
            }
            if let Some(e) = args.epochs {
                cfg.train.epochs = e;
            }
            if let Some(s) = args.seed {
                cfg.seed = s;
            }
            cfg.apply_overrides(&args.overrides).map_err(anyhow::Error::msg)?;
            if args.deterministic {
                cfg.train.deterministic = true;
            }
            cfg
        }
    };
    let device = choose_device(&args.device, cfg.train.deterministic, cfg.train.tf32)?;
    let data = PreparedData::from_config(&cfg)?;
    let (out, mut run) = match &resumed {
        Some((dir, _, metrics_bytes)) => {
            let run = RunDir::reopen(dir, *metrics_bytes).with_context(|| format!("reopening run directory {}", dir.display()))?;
            (dir.clone(), run)
        }
        None => {
            let out = args.out.clone().unwrap_or_else(|| default_run_dir(&data.dataset.name));
            let run = RunDir::create(&out).with_context(|| format!("creating run directory {}", out.display()))?;
            run.write("config.toml", cfg.to_toml().as_bytes())?;
            let manifest = serde_json::json!({
                "engine": env!("CARGO_PKG_VERSION"),
                "device": device.name(),
                "dataset": data.dataset.name,
                "dataset_fingerprint": data.dataset.fingerprint,
                "users": data.dataset.num_users,
                "items": data.dataset.num_items,
                "eval_negatives": cfg.eval.negatives,
                "eval_negatives_fingerprint": data.eval_negatives_fingerprint,
                "seed": cfg.seed,
            });
            run.write("manifest.json", serde_json::to_string_pretty(&manifest)?.as_bytes())?;
            (out, run)
        }
    };
    eprintln!("data {}: {} users, {} items; run directory {}", data.dataset.name, data.dataset.num_users,
              data.dataset.num_items, out.display());
    ur4rec_engine::train::interrupt::install_handler();
    let opts = RunOptions { quiet: args.quiet, resume: resumed.is_some(), stop_after_steps: args.stop_after_steps };
    device.run(TrainJob { cfg: &cfg, data: &data, run: &mut run, opts: &opts })?;
    println!("run directory: {}", out.display());
    Ok(())
}

fn eval(args: EvalArgs) -> Result<()> {
    use ur4rec_engine::checkpoint::load_params;
    use ur4rec_engine::ranking::{evaluate_sasrec, evaluate_ur4rec, EvalTarget, ScoreDump};
    let dir = args.checkpoint.parent().map(|p| p.to_path_buf()).unwrap_or_default();
    let cfg_path = args.config.clone().unwrap_or_else(|| dir.join("config.toml"));
    let mut cfg = Config::from_file(&cfg_path, "default").map_err(anyhow::Error::msg)
        .with_context(|| format!("reading the run configuration (pass --config if {} is not it)", cfg_path.display()))?;
    if let Some(d) = &args.data {
        cfg.data.source = d.clone();
    }
    let backend = CpuBackend::new();
    let data = PreparedData::from_config(&cfg)?;
    let mut b = ParamBuilder::new();
    let mut rng = Rng::new(0);
    let mut dump = args.dump_scores.as_ref().map(|_| ScoreDump::default());
    match cfg.pipeline {
        Pipeline::Sasrec => {
            let model = ur4rec_engine::model::SasRec::new(&mut b, &cfg.sasrec, data.dataset.num_items, &mut rng);
            let mut store = b.build(&backend);
            store.table_format = cfg.train.table_format;
            load_params(&backend, &mut store, &args.checkpoint)?;
            for (name, which) in [("valid", EvalTarget::Valid), ("test", EvalTarget::Test)] {
                let d = if which == EvalTarget::Test { dump.as_mut() } else { None };
                let r = evaluate_sasrec(&backend, &model, &store, &data.split, &data.eval_negatives, which, &cfg.eval, d)?;
                println!("{name}, sampled: {}", r.sampled);
                if let Some(f) = &r.full {
                    println!("{name}, full ranking: {f}");
                }
            }
        }
        Pipeline::Ur4rec => {
            let model = ur4rec_engine::model::ur4rec::Ur4Rec::new(&mut b, &cfg, &data.dataset, &data.split, &mut rng)?;
            let mut store = b.build(&backend);
            store.table_format = cfg.train.table_format;
            load_params(&backend, &mut store, &args.checkpoint)?;
            let recorded = std::fs::read_to_string(dir.join("summary.json")).ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .and_then(|v| v.get("fusion_alpha").and_then(|a| a.as_f64()));
            let alpha = args.alpha.or(recorded.map(|a| a as f32)).unwrap_or(cfg.ur4rec.fusion_alpha);
            for (name, which) in [("valid", EvalTarget::Valid), ("test", EvalTarget::Test)] {
                let d = if which == EvalTarget::Test { dump.as_mut() } else { None };
                let r = evaluate_ur4rec(&backend, &model, &store, &data.split, &data.eval_negatives, which, &cfg.eval, alpha, &[], d)?;
                println!("{name}, sampled: fused (α = {alpha:.2}) {}", r.fused.sampled);
                println!("{name}, sampled: SASRec    {}", r.sasrec.sampled);
                println!("{name}, sampled: retriever {}", r.retriever.sampled);
                if let Some(f) = &r.fused.full {
                    println!("{name}, full ranking: fused {f}");
                }
            }
        }
    }
    if let (Some(path), Some(d)) = (&args.dump_scores, dump) {
        write_dump(path, &d, data.split.train.len())?;
        println!("scores of {} users x {} candidates written to {}", data.split.train.len(), d.width, path.display());
    }
    Ok(())
}

/// Writes a score dump: `candidates` (i64 [U, C], original item ids are in the run's data; these are dense
/// ids, target first), `users` (i64 [U], dense ids), and f32 [U, C] `fused` / `sasrec` / `retriever` scores.
fn write_dump(path: &std::path::Path, d: &ur4rec_engine::ranking::ScoreDump, users: usize) -> Result<()> {
    use ur4rec_engine::data::features::{write_npy, Array, ArrayData};
    let shape = vec![users, d.width];
    let mut arrays = vec![
        ("users", Array { shape: vec![users], data: ArrayData::I64((1..=users as i64).collect()) }),
        ("candidates", Array { shape: shape.clone(), data: ArrayData::I64(d.candidates.iter().map(|&c| c as i64).collect()) }),
        ("sasrec", Array { shape: shape.clone(), data: ArrayData::F32(d.sasrec.clone()) }),
    ];
    if !d.fused.is_empty() {
        arrays.push(("fused", Array { shape: shape.clone(), data: ArrayData::F32(d.fused.clone()) }));
        arrays.push(("retriever", Array { shape, data: ArrayData::F32(d.retriever.clone()) }));
    }
    if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
        use safetensors::tensor::{Dtype, TensorView};
        let bytes: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = arrays.iter().map(|(n, a)| match &a.data {
            ArrayData::F32(v) => (n.to_string(), a.shape.clone(), Dtype::F32, bytemuck::cast_slice(v).to_vec()),
            ArrayData::I64(v) => (n.to_string(), a.shape.clone(), Dtype::I64, bytemuck::cast_slice(v).to_vec()),
            ArrayData::I32(v) => (n.to_string(), a.shape.clone(), Dtype::I32, bytemuck::cast_slice(v).to_vec()),
        }).collect();
        let views: Vec<(String, TensorView)> = bytes.iter()
            .map(|(n, s, t, b)| (n.clone(), TensorView::new(*t, s.clone(), b).expect("consistent view"))).collect();
        let out = safetensors::serialize(views, &None)?;
        ur4rec_engine::checkpoint::write_atomic(path, &out)?;
    } else {
        std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        for (n, a) in &arrays {
            write_npy(&path.join(format!("{n}.npy")), a)?;
        }
    }
    Ok(())
}

fn ablation(args: AblationArgs) -> Result<()> {
    let mut cfg = resolve_config(&args.source)?;
    if let Some(d) = &args.data {
        cfg.data.source = d.clone();
    }
    cfg.apply_overrides(&args.overrides).map_err(anyhow::Error::msg)?;
    if let Some(t) = args.threads {
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global().context("setting the thread count")?;
    }
    let device = choose_device(&args.device, cfg.train.deterministic, cfg.train.tf32)?;
    let data = PreparedData::from_config(&cfg)?;
    let out = args.out.clone().unwrap_or_else(|| default_run_dir(&format!("ablation-{}", data.dataset.name)));
    let rows = device.run(AblationJob { cfg: &cfg, data: &data, seeds: args.seeds, out: &out, only: &args.only })?;
    println!("{}", std::fs::read_to_string(out.join("ablation.md"))?);
    println!("{rows} variants; tables in {}", out.display());
    Ok(())
}

fn info(args: InfoArgs) -> Result<()> {
    match cuda::probe(0) {
        Ok(gpu) => println!("GPU: {} ({} device(s)); used with --device cuda, or by --device auto when {ENABLE_CUDA_ENV}=1 \
                             (the kernels have not been validated on a GPU yet)", gpu.name, gpu.device_count),
        Err(e) => println!("GPU: none — {e}"),
    }
    match cuda::probe_nvrtc() {
        Ok(v) => println!("NVRTC: {}.{} (the CUDA kernels can be compiled)", v.major, v.minor),
        Err(e) => println!("NVRTC: none — {e}"),
    }
    println!("CPU: {} threads", rayon::current_num_threads());
    if args.params {
        let cfg = resolve_config(&args.source)?;
        let mut b = ParamBuilder::new();
        let mut rng = Rng::new(0);
        ur4rec_engine::model::SasRec::new(&mut b, &cfg.sasrec, args.items, &mut rng);
        if cfg.pipeline == Pipeline::Ur4rec {
            // Names do not depend on the feature sizes; a visual branch is included so every name is listed.
            ur4rec_engine::model::retriever::Retriever::new(&mut b, &cfg.ur4rec.retriever, args.items, 384, Some(384), &mut rng);
        }
        let store = b.build(&CpuBackend::new());
        // The list is long and often piped into `head` or `grep`: a closed pipe is an error here (handled in
        // `main`), not println!'s panic.
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for p in &store.infos {
            writeln!(out, "{:<48} {:>10} {:?} group={}", p.name, p.len, p.shape, store.groups[p.group].name)?;
        }
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Train(a) => train(a),
        Command::Info(a) => info(a),
        Command::Ablation(a) => ablation(a),
        Command::Eval(a) => eval(a),
    };
    if let Err(e) = r {
        // The reader of our output went away (`info --params | head`): nothing left to say.
        if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) {
            std::process::exit(0);
        }
        // A stop on request (signal, step limit) is not a failure: the run continues with --resume.
        if let Some(stopped) = e.downcast_ref::<Stopped>() {
            eprintln!("{stopped}");
            std::process::exit(if stopped.reason == StopReason::Interrupted { 130 } else { 0 });
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
