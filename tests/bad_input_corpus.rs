//! The bad-input corpus (tests/bad_inputs/, described by its MANIFEST.toml): every file goes through its
//! reader, which must return (never panic) and, for the defective files, give an error that names the file
//! and says what is wrong and what was expected. The directory listing must equal the manifest, so a file
//! added without a case (or a case whose file is gone) fails the test.

use serde::Deserialize;
use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use ur4rec_engine::backend::{Backend, CpuBackend};
use ur4rec_engine::checkpoint::load_params;
use ur4rec_engine::config::Config;
use ur4rec_engine::data::features::{load_features, load_features_safetensors, read_npy};
use ur4rec_engine::data::{load, parse_format, DataError, LoadOptions};
use ur4rec_engine::params::{Init, ParamBuilder, ParamStore};
use ur4rec_engine::rng::Rng;
use ur4rec_engine::train::optim::AdamW;
use ur4rec_engine::train::resume::ResumeFile;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    case: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    file: String,
    reader: String,
    #[serde(default)]
    ok: bool,
    #[serde(default)]
    expect: Vec<String>,
    line: Option<usize>,
    format: Option<String>,
    min_items: Option<usize>,
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad_inputs")
}

fn manifest() -> Manifest {
    let p = corpus_dir().join("MANIFEST.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The ids of the data set the feature readers align to.
fn originals() -> Vec<String> {
    ["1", "2", "3"].map(String::from).to_vec()
}

/// What a reader did with a file: `Ok` with a check of what it loaded, or the error's message (and, for
/// the interaction readers, the line a parse error points at).
struct Outcome {
    result: Result<(), String>,
    parse_line: Option<usize>,
}

fn run_case(case: &Case, path: &Path) -> Outcome {
    let dir = corpus_dir();
    let plain = |r: Result<(), String>| Outcome { result: r, parse_line: None };
    match case.reader.as_str() {
        "ratings" => {
            let opts = LoadOptions {
                format: case.format.as_deref().map(|f| parse_format(f).unwrap()),
                min_rating: None,
                min_items_per_user: case.min_items.unwrap_or(1),
            };
            match load(path, &opts) {
                Ok(ds) => {
                    // ok-ratings.data: users 1 and 2, items 10 and 11, in time order.
                    assert_eq!(ds.sequences, vec![vec![1, 2], vec![1]], "{}", path.display());
                    plain(Ok(()))
                }
                Err(e) => Outcome {
                    parse_line: match &e {
                        DataError::Parse { line, .. } => Some(*line),
                        _ => None,
                    },
                    result: Err(e.to_string()),
                },
            }
        }
        "npy" => plain(read_npy(path).map(|_| ()).map_err(|e| e.to_string())),
        "npy-rows" | "npy-ids" => {
            let (rows, ids) = if case.reader == "npy-rows" {
                (path.to_path_buf(), dir.join("ok-ids.npy"))
            } else {
                (dir.join("ok-rows.npy"), path.to_path_buf())
            };
            plain(
                load_features(&rows, &ids, &originals())
                    .map(|(f, rep)| {
                        assert_eq!((rep.matched, rep.missing, f.dim), (3, 0, 2));
                        assert_eq!(&f.rows[2..], &[0.5, 1.0, 1.5, 2.0, 2.5, 3.0]);
                    })
                    .map_err(|e| e.to_string()),
            )
        }
        "safetensors-features" => plain(
            load_features_safetensors(path, "rows", "ids", &originals())
                .map(|(f, rep)| {
                    assert_eq!((rep.matched, rep.missing, f.dim), (3, 0, 2));
                    assert_eq!(&f.rows[2..], &[0.5, 1.0, 1.5, 2.0, 2.5, 3.0]);
                })
                .map_err(|e| e.to_string()),
        ),
        "checkpoint" => {
            let be = CpuBackend::new();
            let mut store = two_param_store(&be);
            let r = load_params(&be, &mut store, path);
            let values = be.to_host(&store.values);
            match r {
                Ok(meta) => {
                    assert_eq!(values, vec![1., 2., 3., 4., 5., 6., 0.1, 0.2, 0.3]);
                    assert_eq!(meta.get("step").map(String::as_str), Some("7"));
                    plain(Ok(()))
                }
                Err(e) => {
                    // A failed load must leave the parameters as they were, not half overwritten.
                    assert!(values.iter().all(|&v| v == 0.0), "{}: parameters changed by a failed load", path.display());
                    plain(Err(e.to_string()))
                }
            }
        }
        "resume" => {
            let be = CpuBackend::new();
            let mut store = two_param_store(&be);
            let mut opt = AdamW::new(2, 0.9, 0.999, 1e-8, 0.0);
            let r = ResumeFile::open(path).and_then(|f| {
                let info = f.info()?;
                f.restore_params(&be, &mut store, &mut opt)?;
                let order = f.permutation("order", 5)?;
                Ok((info.step, order))
            });
            plain(r.map(|(step, order)| {
                // ok-resume.safetensors: step 7, order [3, 1, 4, 0, 2], w trainable, b frozen.
                assert_eq!((step, order), (7, vec![3, 1, 4, 0, 2]));
                assert_eq!(be.to_host(&store.values), vec![1., 2., 3., 4., 5., 6., 0.1, 0.2, 0.3]);
                assert_eq!(opt.steps, vec![7, 7]);
                assert_eq!(store.infos.iter().map(|p| p.trainable).collect::<Vec<_>>(), vec![true, false]);
            }).map_err(|e| format!("{e:#}")))
        }
        "config" => plain(
            Config::from_file(path, "default")
                .map(|c| {
                    // ok-config.toml: the sasrec preset with 3 epochs.
                    let mut want = Config::preset("sasrec").unwrap();
                    want.train.epochs = 3;
                    assert_eq!(c, want);
                }),
        ),
        other => panic!("{}: unknown reader {other:?} in MANIFEST.toml", case.file),
    }
}

/// The store the checkpoint and resume files of the corpus are for: f32 parameters `w [2, 3]` and `b [3]`,
/// all zero.
fn two_param_store(be: &CpuBackend) -> ParamStore<CpuBackend> {
    let mut rng = Rng::new(1);
    let mut b = ParamBuilder::new();
    b.add("g", "w", &[2, 3], Init::Zeros, &mut rng);
    b.add("g", "b", &[3], Init::Zeros, &mut rng);
    b.build(be)
}

#[test]
fn corpus_listing_equals_manifest() {
    let m = manifest();
    let mut listed = BTreeSet::new();
    for c in &m.case {
        assert!(listed.insert(c.file.clone()), "MANIFEST.toml lists {} twice", c.file);
        assert!(c.ok || !c.expect.is_empty(), "{}: a bad input needs `expect` substrings", c.file);
        assert!(!c.ok || c.expect.is_empty(), "{}: `ok` and `expect` together", c.file);
    }
    let on_disk: BTreeSet<String> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "MANIFEST.toml")
        .collect();
    let unlisted: Vec<_> = on_disk.difference(&listed).collect();
    let missing: Vec<_> = listed.difference(&on_disk).collect();
    assert!(unlisted.is_empty() && missing.is_empty(),
            "tests/bad_inputs and its MANIFEST.toml disagree: files without a case {unlisted:?}, cases without a file {missing:?}");
    // Each reader has both a well-formed file and bad ones, so the bad ones fail for their defect.
    for reader in ["ratings", "npy-rows", "npy-ids", "safetensors-features", "checkpoint", "config"] {
        assert!(m.case.iter().any(|c| c.reader == reader && c.ok), "no ok file for {reader}");
        assert!(m.case.iter().any(|c| c.reader == reader && !c.ok), "no bad file for {reader}");
    }
}

#[test]
fn every_bad_input_gives_a_clear_error_and_never_a_panic() {
    let m = manifest();
    let mut failures = Vec::new();
    for case in &m.case {
        let path = corpus_dir().join(&case.file);
        let outcome = match catch_unwind(AssertUnwindSafe(|| run_case(case, &path))) {
            Ok(o) => o,
            Err(p) => {
                let msg = p.downcast_ref::<String>().cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                failures.push(format!("{}: PANIC {msg}", case.file));
                continue;
            }
        };
        match (&outcome.result, case.ok) {
            (Ok(()), true) => {}
            (Ok(()), false) => failures.push(format!("{}: loaded, expected an error", case.file)),
            (Err(msg), true) => failures.push(format!("{}: expected to load, got: {msg}", case.file)),
            (Err(msg), false) => {
                // Shown with `-- --nocapture`, to read every message the corpus produces.
                println!("{}: {msg}", case.file);
                let shown = path.display().to_string();
                let mut missing: Vec<String> = Vec::new();
                if !msg.contains(&shown) {
                    missing.push(format!("the path {shown}"));
                }
                missing.extend(case.expect.iter().filter(|e| !msg.contains(e.as_str())).map(|e| format!("{e:?}")));
                if let Some(line) = case.line {
                    if outcome.parse_line != Some(line) || !msg.starts_with(&format!("{shown}:{line}: ")) {
                        missing.push(format!("a parse error at line {line} (got line {:?})", outcome.parse_line));
                    }
                }
                if !missing.is_empty() {
                    failures.push(format!("{}: message {msg:?} lacks {}", case.file, missing.join(", ")));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} corpus cases failed:\n{}", failures.len(), m.case.len(), failures.join("\n"));
}
