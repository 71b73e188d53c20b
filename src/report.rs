//! The run directory: resolved configuration, manifest, `metrics.jsonl`, checkpoints and the summary.
use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub struct RunDir {
    pub path: PathBuf,
    metrics: BufWriter<File>,
}

impl RunDir {
    /// Creates (or reuses) the directory and starts a fresh `metrics.jsonl`.
    pub fn create(path: &Path) -> std::io::Result<RunDir> {
        std::fs::create_dir_all(path)?;
        let metrics = BufWriter::new(File::create(path.join("metrics.jsonl"))?);
        Ok(RunDir { path: path.to_path_buf(), metrics })
    }

    /// Appends one JSON object as a line of `metrics.jsonl`.
    pub fn log<T: Serialize>(&mut self, record: &T) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.metrics, record)?;
        self.metrics.write_all(b"\n")
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.metrics.flush()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes a whole file atomically.
    pub fn write(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        crate::checkpoint::write_atomic(&self.file(name), bytes)
    }
}

/// A default run directory name: `runs/<data>-<unix seconds>`.
pub fn default_run_dir(data_name: &str) -> PathBuf {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    PathBuf::from("runs").join(format!("{data_name}-{secs}"))
}
