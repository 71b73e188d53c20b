//! Side-feature files: the `.npy` reader on hand-written bytes (every malformed case gives a clear error
//! naming the file), safetensors, alignment to dense ids through original ids, and — when the shared data are
//! present — the ML-100K item-description embeddings.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use ur4rec_engine::data::features::{
    align_features, load_features, load_features_safetensors, mean_of_items, read_npy,
    read_safetensors, Array, ArrayData,
};
use ur4rec_engine::data::{load, DataError, Features, LoadOptions};

/// A fresh directory per call (tests run in parallel).
fn scratch(test: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let k = NEXT.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("ur4rec-features-{}-{k}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `.npy` bytes with the given header fields, written as numpy does (header padded so the data start at a
/// multiple of 64, ending in '\n').
fn npy_with_header(version: u8, header_dict: &str, data: &[u8]) -> Vec<u8> {
    let len_bytes = if version == 1 { 2 } else { 4 };
    let pre = 8 + len_bytes;
    let mut h = header_dict.to_string();
    while !(pre + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY".to_vec();
    out.extend([version, 0]);
    if version == 1 {
        out.extend((h.len() as u16).to_le_bytes());
    } else {
        out.extend((h.len() as u32).to_le_bytes());
    }
    out.extend(h.as_bytes());
    out.extend(data);
    out
}

fn npy(descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
    let f = if fortran { "True" } else { "False" };
    npy_with_header(
        1,
        &format!("{{'descr': '{descr}', 'fortran_order': {f}, 'shape': {shape}, }}"),
        data,
    )
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Asserts a file error naming `file` whose message contains every needle.
fn assert_file_error<T: std::fmt::Debug>(r: Result<T, DataError>, file: &Path, needles: &[&str]) {
    let e = r.expect_err("expected an error");
    let msg = e.to_string();
    match &e {
        DataError::File { file: f, .. } => assert_eq!(f, file, "{msg}"),
        other => panic!("expected DataError::File, got {other:?}"),
    }
    assert!(msg.contains(&file.display().to_string()), "{msg}");
    for n in needles {
        assert!(msg.contains(n), "{msg:?} lacks {n:?}");
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn reads_f32_and_integer_arrays_in_all_versions() {
    let d = scratch("versions");
    let vals = [1.0f32, -2.5, 3.25, 0.0, 1e-3, 7.0];
    for version in [1u8, 2, 3] {
        let bytes = npy_with_header(
            version,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
            &f32_bytes(&vals),
        );
        let p = write(&d, &format!("v{version}.npy"), &bytes);
        let a = read_npy(&p).unwrap();
        assert_eq!(
            a,
            Array {
                shape: vec![2, 3],
                data: ArrayData::F32(vals.to_vec())
            },
            "version {version}"
        );
    }
    let p = write(
        &d,
        "ids8.npy",
        &npy("<i8", false, "(3,)", &i64_bytes(&[7, -1, 1 << 40])),
    );
    assert_eq!(
        read_npy(&p).unwrap().data,
        ArrayData::I64(vec![7, -1, 1 << 40])
    );
    let p = write(
        &d,
        "ids4.npy",
        &npy("<i4", false, "(2,)", &i32_bytes(&[5, 9])),
    );
    assert_eq!(
        read_npy(&p).unwrap(),
        Array {
            shape: vec![2],
            data: ArrayData::I32(vec![5, 9])
        }
    );
    // Double quotes, no trailing comma, and an empty array.
    let p = write(
        &d,
        "dq.npy",
        &npy_with_header(
            1,
            "{\"descr\": \"<f4\", \"shape\": (0, 4), \"fortran_order\": False}",
            &[],
        ),
    );
    assert_eq!(
        read_npy(&p).unwrap(),
        Array {
            shape: vec![0, 4],
            data: ArrayData::F32(vec![])
        }
    );
}

#[test]
fn rejects_fortran_order() {
    let d = scratch("fortran");
    let p = write(
        &d,
        "f.npy",
        &npy("<f4", true, "(2, 2)", &f32_bytes(&[1.0; 4])),
    );
    assert_file_error(read_npy(&p), &p, &["Fortran", "C order"]);
}

#[test]
fn rejects_big_endian_object_and_other_dtypes() {
    let d = scratch("dtypes");
    let p = write(&d, "be.npy", &npy(">f4", false, "(2,)", &[0u8; 8]));
    assert_file_error(read_npy(&p), &p, &["big-endian", "'>f4'", "'<f4'"]);
    let p = write(&d, "obj.npy", &npy("|O", false, "(2,)", &[0u8; 16]));
    assert_file_error(read_npy(&p), &p, &["object dtype", "'|O'"]);
    let p = write(&d, "f8.npy", &npy("<f8", false, "(2,)", &[0u8; 16]));
    assert_file_error(read_npy(&p), &p, &["unsupported dtype '<f8'", "'<i8'"]);
    let p = write(
        &d,
        "rec.npy",
        &npy_with_header(
            1,
            "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }",
            &[0u8; 4],
        ),
    );
    assert_file_error(read_npy(&p), &p, &["structured"]);
}

#[test]
fn rejects_shape_and_byte_count_mismatch() {
    let d = scratch("mismatch");
    let p = write(
        &d,
        "short.npy",
        &npy("<f4", false, "(2, 3)", &f32_bytes(&[1.0; 5])),
    );
    assert_file_error(
        read_npy(&p),
        &p,
        &["(2, 3)", "needs 24 data bytes", "has 20"],
    );
    let p = write(
        &d,
        "long.npy",
        &npy("<i8", false, "(2,)", &i64_bytes(&[1, 2, 3])),
    );
    assert_file_error(read_npy(&p), &p, &["needs 16 data bytes", "has 24"]);
}

#[test]
fn rejects_huge_declared_shapes_before_allocating() {
    let d = scratch("huge");
    // 10^18 floats declared, 16 bytes present: refused from the file length, no allocation attempted.
    let p = write(
        &d,
        "huge.npy",
        &npy("<f4", false, "(1000000000, 1000000000)", &[0u8; 16]),
    );
    assert_file_error(
        read_npy(&p),
        &p,
        &["needs 4000000000000000000 data bytes", "has 16"],
    );
    // A product that overflows usize.
    let p = write(
        &d,
        "overflow.npy",
        &npy("<f4", false, "(4294967296, 4294967296, 16)", &[0u8; 16]),
    );
    assert_file_error(read_npy(&p), &p, &["too large"]);
    // A single dimension beyond u64.
    let p = write(
        &d,
        "bigdim.npy",
        &npy("<f4", false, "(99999999999999999999999,)", &[0u8; 4]),
    );
    assert_file_error(read_npy(&p), &p, &["too large"]);
}

#[test]
fn rejects_bad_preambles_and_headers() {
    let d = scratch("preamble");
    let p = write(&d, "magic.npy", b"PK\x03\x04 this is a zip file, not npy");
    assert_file_error(read_npy(&p), &p, &["magic"]);
    let p = write(&d, "tiny.npy", b"\x93NUM");
    assert_file_error(read_npy(&p), &p, &["shorter than"]);
    let mut v4 = npy("<f4", false, "(1,)", &[0u8; 4]);
    v4[6] = 4;
    let p = write(&d, "v4.npy", &v4);
    assert_file_error(read_npy(&p), &p, &["version 4.0", "1.0, 2.0 or 3.0"]);
    // Header length pointing past the end of the file.
    let mut bad = npy("<f4", false, "(1,)", &[0u8; 4]);
    bad[8..10].copy_from_slice(&60000u16.to_le_bytes());
    let p = write(&d, "hlen.npy", &bad);
    assert_file_error(read_npy(&p), &p, &["header length 60000", "past the end"]);
    // Missing key, unknown key, garbage.
    let p = write(
        &d,
        "nokey.npy",
        &npy_with_header(1, "{'descr': '<f4', 'shape': (1,), }", &[0u8; 4]),
    );
    assert_file_error(read_npy(&p), &p, &["missing key 'fortran_order'"]);
    let p = write(
        &d,
        "extra.npy",
        &npy_with_header(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}",
            &[0u8; 4],
        ),
    );
    assert_file_error(read_npy(&p), &p, &["unexpected key 'x'"]);
    let p = write(&d, "neg.npy", &npy("<f4", false, "(-1,)", &[0u8; 4]));
    assert_file_error(read_npy(&p), &p, &["negative"]);
    let p = write(&d, "missing.npy", b"");
    std::fs::remove_file(&p).unwrap();
    assert_file_error(read_npy(&p), &p, &["cannot open"]);
}

/// Original ids 10, 20, 30, 40 (dense 1..4); the file has rows for 30, 10, 99 (not in the data), 40.
fn aligned_case(dir: &Path) -> (PathBuf, PathBuf, Vec<String>) {
    let rows = [
        3.0f32, 3.5, // id 30
        1.0, 1.5, // id 10
        9.0, 9.5, // id 99
        4.0, 4.5, // id 40
    ];
    let r = write(
        dir,
        "feat.npy",
        &npy("<f4", false, "(4, 2)", &f32_bytes(&rows)),
    );
    let i = write(
        dir,
        "feat.ids.npy",
        &npy("<i8", false, "(4,)", &i64_bytes(&[30, 10, 99, 40])),
    );
    (r, i, strings(&["10", "20", "30", "40"]))
}

#[test]
fn aligns_rows_by_original_id_with_missing_and_extra_ids() {
    let d = scratch("align");
    let (r, i, originals) = aligned_case(&d);
    let (f, rep) = load_features(&r, &i, &originals).unwrap();
    assert_eq!(f.dim, 2);
    assert_eq!(f.present, vec![false, true, false, true, true]);
    assert_eq!(
        f.rows,
        vec![0.0, 0.0, 1.0, 1.5, 0.0, 0.0, 3.0, 3.5, 4.0, 4.5]
    );
    assert_eq!(rep.rows_in_file, 4);
    assert_eq!(rep.matched, 3);
    assert_eq!(rep.missing, 1);
    assert_eq!(rep.missing_dense_ids, vec![2]);
    assert_eq!(rep.missing_original_ids, strings(&["20"]));
    assert_eq!(rep.ignored_rows, 1);
    let text = rep.to_string();
    assert!(
        text.contains("3 of 4 ids") && text.contains("original ids 20"),
        "{text}"
    );

    // int32 ids give the same result.
    let i4 = write(
        &d,
        "feat.ids4.npy",
        &npy("<i4", false, "(4,)", &i32_bytes(&[30, 10, 99, 40])),
    );
    let (f4, rep4) = load_features(&r, &i4, &originals).unwrap();
    assert_eq!((f4.rows, f4.present, rep4), (f.rows, f.present, rep));
}

#[test]
fn rejects_duplicate_ids_non_finite_used_rows_and_shape_errors() {
    let d = scratch("align-errors");
    let (r, _, originals) = aligned_case(&d);
    let dup = write(
        &d,
        "dup.ids.npy",
        &npy("<i8", false, "(4,)", &i64_bytes(&[30, 10, 30, 40])),
    );
    assert_file_error(
        load_features(&r, &dup, &originals),
        &dup,
        &["id 30", "rows 0 and 2", "unique"],
    );

    // NaN in the row of id 40 (row 3, column 1): an error naming the features file, row and column.
    let nan = write(
        &d,
        "nan.npy",
        &npy(
            "<f4",
            false,
            "(4, 2)",
            &f32_bytes(&[3.0, 3.5, 1.0, 1.5, 9.0, 9.5, 4.0, f32::NAN]),
        ),
    );
    let ids = write(
        &d,
        "ok.ids.npy",
        &npy("<i8", false, "(4,)", &i64_bytes(&[30, 10, 99, 40])),
    );
    assert_file_error(
        load_features(&nan, &ids, &originals),
        &nan,
        &["row 3", "id 40", "column 1", "NaN"],
    );
    // inf in the ignored row of id 99 is harmless.
    let inf_unused = write(
        &d,
        "inf.npy",
        &npy(
            "<f4",
            false,
            "(4, 2)",
            &f32_bytes(&[3.0, 3.5, 1.0, 1.5, f32::INFINITY, 9.5, 4.0, 4.5]),
        ),
    );
    assert_eq!(
        load_features(&inf_unused, &ids, &originals)
            .unwrap()
            .1
            .matched,
        3
    );

    // Row / id count mismatch, float ids, 1-D features.
    let three = write(
        &d,
        "three.ids.npy",
        &npy("<i8", false, "(3,)", &i64_bytes(&[30, 10, 99])),
    );
    assert_file_error(
        load_features(&r, &three, &originals),
        &r,
        &["4 feature rows but 3 ids"],
    );
    let fids = write(
        &d,
        "f.ids.npy",
        &npy("<f4", false, "(4,)", &f32_bytes(&[30.0, 10.0, 99.0, 40.0])),
    );
    assert_file_error(
        load_features(&r, &fids, &originals),
        &fids,
        &["1-D integer id array"],
    );
    let flat = write(
        &d,
        "flat.npy",
        &npy("<f4", false, "(4,)", &f32_bytes(&[1.0; 4])),
    );
    assert_file_error(
        load_features(&flat, &ids, &originals),
        &flat,
        &["2-D float32"],
    );
}

#[test]
fn reads_named_tensors_from_safetensors() {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let d = scratch("safetensors");
    let feats = f32_bytes(&[3.0, 3.5, 1.0, 1.5, 9.0, 9.5, 4.0, 4.5]);
    let ids = i64_bytes(&[30, 10, 99, 40]);
    let bytes = safetensors::serialize(
        [
            (
                "text",
                TensorView::new(Dtype::F32, vec![4, 2], &feats).unwrap(),
            ),
            ("ids", TensorView::new(Dtype::I64, vec![4], &ids).unwrap()),
        ],
        &None,
    )
    .unwrap();
    let p = write(&d, "items.safetensors", &bytes);
    let (f, rep) =
        load_features_safetensors(&p, "text", "ids", &strings(&["10", "20", "30", "40"])).unwrap();
    assert_eq!(
        f.rows,
        vec![0.0, 0.0, 1.0, 1.5, 0.0, 0.0, 3.0, 3.5, 4.0, 4.5]
    );
    assert_eq!(
        (rep.matched, rep.ignored_rows, rep.missing_dense_ids.clone()),
        (3, 1, vec![2])
    );
    assert_eq!(
        read_safetensors(&p, "ids").unwrap().data,
        ArrayData::I64(vec![30, 10, 99, 40])
    );
    assert_file_error(
        read_safetensors(&p, "visual"),
        &p,
        &["no tensor named \"visual\"", "\"ids\"", "\"text\""],
    );
    // Two tensors in one file cannot go through the single-array entry point.
    assert_file_error(
        load_features(&p, &p, &strings(&["10"])),
        &p,
        &["holds 2 tensors"],
    );
    let junk = write(
        &d,
        "junk.safetensors",
        b"\xff\xff\xff\xff\xff\xff\xff\xffnot json",
    );
    assert_file_error(
        read_safetensors(&junk, "x"),
        &junk,
        &["not a valid safetensors file"],
    );
}

#[test]
fn aligns_arrays_already_in_memory() {
    let rows = Array {
        shape: vec![2, 1],
        data: ArrayData::F32(vec![5.0, 6.0]),
    };
    let ids = Array {
        shape: vec![2],
        data: ArrayData::I64(vec![2, 1]),
    };
    let (f, rep) = align_features(
        &rows,
        Path::new("r"),
        &ids,
        Path::new("i"),
        &strings(&["1", "2"]),
    )
    .unwrap();
    assert_eq!(f.rows, vec![0.0, 6.0, 5.0]);
    assert_eq!((rep.matched, rep.missing), (2, 0));
}

#[test]
fn user_vectors_are_means_of_present_history_items() {
    // Items 1..3, item 2 missing; dim 2.
    let item = Features {
        dim: 2,
        rows: vec![0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 3.0, 6.0],
        present: vec![false, true, false, true],
    };
    let users = mean_of_items(&item, &[vec![1, 3], vec![2], vec![3, 2, 3, 0], vec![]]);
    assert_eq!(users.dim, 2);
    assert_eq!(users.present, vec![false, true, false, true, false]);
    assert_eq!(
        users.rows,
        vec![0.0, 0.0, 2.0, 4.0, 0.0, 0.0, 3.0, 6.0, 0.0, 0.0]
    );
}

/// The shared data, when this checkout sits next to them (skipped with a reason otherwise).
fn shared_data() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if root.join("ml-100k-llm").is_dir() && root.join("ml-100k").is_dir() {
        Some(root)
    } else {
        eprintln!("skipping: {} has no ml-100k-llm / ml-100k", root.display());
        None
    }
}

#[test]
fn ml100k_item_descriptions_align_with_23_missing() {
    let Some(root) = shared_data() else { return };
    let ds = load(
        &root.join("ml-100k"),
        &LoadOptions {
            min_rating: None,
            min_items_per_user: 5,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ds.num_items, 1682);
    let llm = root.join("ml-100k-llm");
    let (f, rep) = load_features(
        &llm.join("item_descriptions.minilm384.npy"),
        &llm.join("item_descriptions.ids.npy"),
        &ds.item_original,
    )
    .unwrap();
    assert_eq!(f.dim, 384);
    assert_eq!(rep.rows_in_file, 1659);
    assert_eq!(rep.matched, 1659);
    assert_eq!(rep.ignored_rows, 0);
    assert_eq!(rep.missing, 23);
    // SOURCES.md: the 23 ML-100K items without a description.
    let expected = "246 266 267 297 304 305 309 329 573 711 876 878 1128 1175 1201 1234 1256 1395 1412 1429 1477 1635 1645";
    let mut got: Vec<u32> = rep
        .missing_original_ids
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    got.sort();
    let want: Vec<u32> = expected.split(' ').map(|s| s.parse().unwrap()).collect();
    assert_eq!(got, want);
    // Each missing dense id really maps to its original id, has a zero row and is masked.
    for (&k, orig) in rep.missing_dense_ids.iter().zip(&rep.missing_original_ids) {
        assert_eq!(&ds.item_original[k as usize - 1], orig);
        assert!(!f.present[k as usize]);
        assert!(f.rows[k as usize * 384..(k as usize + 1) * 384]
            .iter()
            .all(|&v| v == 0.0));
    }
    // Present rows are the file's unit-norm MiniLM embeddings.
    let k = ds.item_original.iter().position(|s| s == "1").unwrap() + 1;
    let n: f32 = f.rows[k * 384..(k + 1) * 384].iter().map(|v| v * v).sum();
    assert!(f.present[k] && (n - 1.0).abs() < 1e-3, "norm² {n}");
    // History-pooled user vectors: every user has at least one described item.
    let users = mean_of_items(&f, &ds.sequences);
    assert_eq!(users.present.iter().filter(|&&p| p).count(), ds.num_users);
}

#[test]
fn npy_writer_round_trips_through_the_reader() {
    use ur4rec_engine::data::features::{read_npy, write_npy, Array, ArrayData};
    let dir = std::env::temp_dir().join(format!("ur4rec-npy-write-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for a in [Array { shape: vec![3, 4], data: ArrayData::F32((0..12).map(|i| i as f32 * 0.5 - 2.0).collect()) },
              Array { shape: vec![5], data: ArrayData::I64(vec![1, -2, 3, 1 << 40, 0]) }] {
        let p = dir.join("a.npy");
        write_npy(&p, &a).unwrap();
        assert_eq!(read_npy(&p).unwrap(), a);
    }
}
