//! Checkpoints: safetensors files with one tensor per named parameter, written atomically.
//!
//! Atomic write: the bytes go to a temporary file in the same directory, which is fsynced and then
//! renamed over the target, and the directory is fsynced — a crash leaves either the old or the new file,
//! never a torn one.
use crate::backend::Backend;
use crate::params::ParamStore;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{file}: {msg}")]
    Io { file: String, msg: String },
    #[error("{file}: tensor {tensor:?}: {msg}")]
    Tensor { file: String, tensor: String, msg: String },
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp-{}", path.file_name().unwrap().to_string_lossy(), std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Serialises every parameter (one f32 tensor per name) plus string metadata.
pub fn params_to_safetensors<B: Backend>(backend: &B, store: &ParamStore<B>, metadata: HashMap<String, String>) -> Vec<u8> {
    let host = backend.to_host(&store.values);
    let bytes: Vec<Vec<u8>> = store.infos.iter()
        .map(|p| bytemuck::cast_slice::<f32, u8>(&host[p.offset..p.offset + p.len]).to_vec()).collect();
    let views: Vec<(String, TensorView)> = store.infos.iter().zip(&bytes)
        .map(|(p, b)| (p.name.clone(), TensorView::new(Dtype::F32, p.shape.clone(), b).expect("consistent view")))
        .collect();
    safetensors::serialize(views, &Some(metadata)).expect("safetensors serialisation")
}

pub fn save_params<B: Backend>(backend: &B, store: &ParamStore<B>, path: &Path, metadata: HashMap<String, String>)
                               -> Result<(), CheckpointError> {
    let bytes = params_to_safetensors(backend, store, metadata);
    write_atomic(path, &bytes).map_err(|e| CheckpointError::Io { file: path.display().to_string(), msg: e.to_string() })
}

/// Loads every parameter of `store` from a safetensors file; every name must be present with the same
/// shape and dtype f32, and the file may hold no unknown tensors.
pub fn load_params<B: Backend>(backend: &B, store: &mut ParamStore<B>, path: &Path) -> Result<HashMap<String, String>, CheckpointError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| CheckpointError::Io { file: file.clone(), msg: e.to_string() })?;
    let st = crate::data::features::parse_safetensors(&bytes).map_err(|m| CheckpointError::Io { file: file.clone(), msg: format!("not a valid safetensors file: {m}") })?;
    let mut host = backend.to_host(&store.values);
    for p in &store.infos {
        let t = st.tensor(&p.name).map_err(|_| CheckpointError::Tensor { file: file.clone(), tensor: p.name.clone(), msg: "missing".into() })?;
        if t.dtype() != Dtype::F32 {
            return Err(CheckpointError::Tensor { file: file.clone(), tensor: p.name.clone(), msg: format!("dtype {:?}, expected F32", t.dtype()) });
        }
        if t.shape() != p.shape.as_slice() {
            return Err(CheckpointError::Tensor { file: file.clone(), tensor: p.name.clone(), msg: format!("shape {:?}, expected {:?}", t.shape(), p.shape) });
        }
        let dst = &mut host[p.offset..p.offset + p.len];
        for (d, c) in dst.iter_mut().zip(t.data().chunks_exact(4)) {
            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    for name in st.names() {
        if !store.infos.iter().any(|p| &p.name == name) {
            return Err(CheckpointError::Tensor { file: file.clone(), tensor: name.to_string(), msg: "not a parameter of this model".into() });
        }
    }
    store.values = backend.from_host(&host);
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| CheckpointError::Io { file: file.clone(), msg: e.to_string() })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;
    use crate::params::{Init, ParamBuilder};
    use crate::rng::Rng;

    #[test]
    fn round_trip_and_mismatch_errors() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(3);
        let mut b = ParamBuilder::new();
        b.add("g", "w", &[2, 3], Init::Normal(1.0), &mut rng);
        b.add("g", "b", &[3], Init::Normal(1.0), &mut rng);
        let store = b.build(&be);
        let dir = std::env::temp_dir().join(format!("ur4rec-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.safetensors");
        save_params(&be, &store, &path, HashMap::from([("k".into(), "v".into())])).unwrap();
        let mut b2 = ParamBuilder::new();
        b2.add("g", "w", &[2, 3], Init::Zeros, &mut rng);
        b2.add("g", "b", &[3], Init::Zeros, &mut rng);
        let mut other = b2.build(&be);
        let meta = load_params(&be, &mut other, &path).unwrap();
        assert_eq!(other.values, store.values);
        assert_eq!(meta.get("k").map(String::as_str), Some("v"));
        let mut b3 = ParamBuilder::new();
        b3.add("g", "w", &[3, 2], Init::Zeros, &mut rng);
        b3.add("g", "b", &[3], Init::Zeros, &mut rng);
        let e = load_params(&be, &mut b3.build(&be), &path).unwrap_err().to_string();
        assert!(e.contains("\"w\"") && e.contains("shape"), "{e}");
        std::fs::write(&path, b"garbage").unwrap();
        let e = load_params(&be, &mut other, &path).unwrap_err().to_string();
        assert!(e.contains("p.safetensors") && e.contains("not a valid"), "{e}");
    }
}
