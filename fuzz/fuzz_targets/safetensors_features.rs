//! Feature tables from safetensors files: a named tensor (`read_safetensors`), the rows and ids of one file
//! (`load_features_safetensors`) and a single-tensor file as the rows (`load_features`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use ur4rec_engine::data::features::{
    load_features, load_features_safetensors, read_safetensors, write_npy, Array, ArrayData,
};
use ur4rec_engine_fuzz::{assert_names_file, scratch_file};

fuzz_target!(|data: &[u8]| {
    let path = scratch_file("x.safetensors", data);
    let originals: Vec<String> = ["1", "2", "3", "4"].map(String::from).to_vec();
    if let Err(e) = read_safetensors(&path, "rows") {
        assert_names_file(&e.to_string(), &path);
    }
    match load_features_safetensors(&path, "rows", "ids", &originals) {
        Ok((f, rep)) => {
            assert_eq!(f.rows.len(), (originals.len() + 1) * f.dim);
            assert!(f.rows.iter().all(|v| v.is_finite()));
            assert_eq!(rep.matched + rep.missing, originals.len());
        }
        Err(e) => assert_names_file(&e.to_string(), &path),
    }
    let ids = path.parent().unwrap().join("ids.npy");
    if !ids.exists() {
        write_npy(&ids, &Array { shape: vec![3], data: ArrayData::I64(vec![1, 2, 3]) }).unwrap();
    }
    if let Err(e) = load_features(&path, &ids, &originals) {
        let m = e.to_string();
        assert!(m.contains(&path.display().to_string()) || m.contains(&ids.display().to_string()), "{m}");
    }
});
