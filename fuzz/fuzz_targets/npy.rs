//! The `.npy` reader, alone and through the feature alignment (the input as the feature rows with a fixed id
//! file, and as the ids with fixed rows), so shapes the reader accepts are also checked by `align_features`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ur4rec_engine::data::features::{load_features, read_npy, write_npy, Array, ArrayData};
use ur4rec_engine_fuzz::{assert_names_file, scratch_file};

fuzz_target!(|data: &[u8]| {
    let path = scratch_file("x.npy", data);
    match read_npy(&path) {
        Ok(a) => {
            let n: usize = a.shape.iter().product();
            let len = match &a.data {
                ArrayData::F32(v) => v.len(),
                ArrayData::I64(v) => v.len(),
                ArrayData::I32(v) => v.len(),
            };
            assert_eq!(n, len, "values do not match the shape");
        }
        Err(e) => assert_names_file(&e.to_string(), &path),
    }
    let dir = path.parent().unwrap();
    let ids = dir.join("ids.npy");
    let rows = dir.join("rows.npy");
    if !ids.exists() {
        write_npy(&ids, &Array { shape: vec![3], data: ArrayData::I64(vec![1, 2, 3]) }).unwrap();
        write_npy(&rows, &Array { shape: vec![3, 2], data: ArrayData::F32(vec![0.5; 6]) }).unwrap();
    }
    let originals: Vec<String> = ["1", "2", "3", "4"].map(String::from).to_vec();
    for (r, i) in [(&path, &ids), (&rows, &path)] {
        match load_features(r, i, &originals) {
            Ok((f, rep)) => {
                assert_eq!(f.rows.len(), (originals.len() + 1) * f.dim);
                assert_eq!(f.present.len(), originals.len() + 1);
                assert!(f.rows.iter().all(|v| v.is_finite()));
                assert_eq!(rep.matched + rep.missing, originals.len());
            }
            Err(e) => {
                // Either file may be the one named: the fuzzed one, or the fixed one it disagrees with.
                let m = e.to_string();
                let (r, i) = (r.display().to_string(), i.display().to_string());
                assert!(m.contains(&r) || m.contains(&i), "{m}");
            }
        }
    }
});
