//! Malformed inputs: each must give a clear error naming the file, the line and the field — never a panic.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use ur4rec_engine::data::{load, DataError, Format, LoadOptions};

/// A fresh directory per call: tests run in parallel and several write files of the same name.
fn scratch(test: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let k = NEXT.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!(
        "ur4rec-data-errors-{}-{k}-{test}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn opts() -> LoadOptions {
    LoadOptions {
        min_items_per_user: 1,
        ..Default::default()
    }
}

fn load_bytes(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    opts: &LoadOptions,
) -> (PathBuf, Result<usize, DataError>) {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let r = load(&p, opts).map(|ds| ds.num_interactions());
    (p, r)
}

/// Asserts a parse error at `line` whose message contains each of `needles`.
fn assert_parse_error(name: &str, bytes: &[u8], line: usize, needles: &[&str]) {
    assert_parse_error_with(name, bytes, &opts(), line, needles);
}

fn assert_parse_error_with(
    name: &str,
    bytes: &[u8],
    o: &LoadOptions,
    line: usize,
    needles: &[&str],
) {
    let dir = scratch(&name.replace('.', "-"));
    let (p, r) = load_bytes(&dir, name, bytes, o);
    match r {
        Err(e) => {
            let shown = e.to_string();
            let DataError::Parse {
                file,
                line: got,
                msg,
            } = e
            else {
                panic!("{name}: expected a parse error, got {shown}")
            };
            assert_eq!(file, p);
            assert_eq!(got, line, "{msg}");
            assert!(
                shown.starts_with(&format!("{}:{line}: ", p.display())),
                "{shown}"
            );
            for n in needles {
                assert!(msg.contains(n), "{name}: expected {n:?} in {msg:?}");
            }
        }
        Ok(n) => panic!("{name}: expected a parse error at line {line}, loaded {n} interactions"),
    }
}

#[test]
fn wrong_field_counts() {
    assert_parse_error(
        "u.data",
        b"1\t2\t5\t100\n1\t3\t5\n",
        2,
        &[
            "expected 4 fields (user, item, rating, timestamp)",
            "found 3",
        ],
    );
    assert_parse_error(
        "ratings.dat",
        b"1::2::5::100::9\n",
        1,
        &["expected 4 fields", "'::'", "found 5"],
    );
    assert_parse_error(
        "a.txt",
        b"1 2\n1\n",
        2,
        &["expected a user id followed by at least one item id"],
    );
    let pairs = LoadOptions {
        format: Some(Format::SasRecPairs),
        ..opts()
    };
    assert_parse_error_with(
        "b.txt",
        b"1 2\n\n1 2 3\n",
        &pairs,
        3,
        &["expected 2 fields (user, item)", "found 3"],
    );
    assert_parse_error(
        "c.inter",
        b"user_id:token\titem_id:token\n1\t2\n1\t2\t3\n",
        3,
        &["expected 2 fields (user_id, item_id)", "tabs"],
    );
}

#[test]
fn bad_numbers() {
    let rated = LoadOptions {
        min_rating: Some(4.0),
        ..opts()
    };
    assert_parse_error_with(
        "u.data",
        b"1\t2\t5\t100\n1\t3\tx\t100\n",
        &rated,
        2,
        &["field 3 (rating): expected a number, found \"x\""],
    );
    // Ratings are validated even when no rating filter is set.
    assert_parse_error(
        "ratings.dat",
        b"1::2::nan::100\n",
        1,
        &["field 3 (rating): expected a number"],
    );
    assert_parse_error(
        "u.data",
        b"1\t2\t5\t-7\n",
        1,
        &["field 4 (timestamp): expected a non-negative number, found \"-7\""],
    );
    assert_parse_error(
        "u.data",
        b"1\t2\t5\tyesterday\n",
        1,
        &["field 4 (timestamp)", "\"yesterday\""],
    );
    assert_parse_error(
        "d.inter",
        b"timestamp:float\tuser_id:token\titem_id:token\n12\t1\t2\n1e999\t1\t3\n",
        3,
        &["field 1 (timestamp): expected a non-negative number"],
    );
}

#[test]
fn empty_ids() {
    assert_parse_error(
        "ratings.dat",
        b"1::::5::100\n",
        1,
        &["field 2 (item): expected an id, found an empty field"],
    );
    assert_parse_error(
        "e.inter",
        b"user_id:token\titem_id:token\n\t2\n",
        2,
        &["field 1 (user_id): expected an id"],
    );
}

#[test]
fn non_utf8_bytes_name_the_field() {
    assert_parse_error(
        "u.data",
        b"1\t2\t5\t100\n1\t\xff\xfe\t5\t100\n",
        2,
        &["field 2 (item): expected UTF-8 text"],
    );
    assert_parse_error(
        "f.txt",
        b"7 1 2 \xc3\n",
        1,
        &["field 4 (item): expected UTF-8 text"],
    );
}

#[test]
fn recbole_header_without_item_id() {
    assert_parse_error(
        "g.inter",
        b"user_id:token\titem:token\trating:float\n1\t2\t3\n",
        1,
        &["header: no item_id column", "item:token"],
    );
}

#[test]
fn empty_and_missing_files() {
    let dir = scratch("empty");
    for (name, bytes) in [
        ("u.data", &b""[..]),
        ("h.txt", b"\n  \n\r\n"),
        ("i.inter", b""),
    ] {
        let (p, r) = load_bytes(&dir, name, bytes, &opts());
        match r {
            Err(DataError::File { file, msg }) => {
                assert_eq!(file, p);
                assert!(msg.contains("empty file"), "{msg}");
            }
            other => panic!("{name}: expected an empty-file error, got {other:?}"),
        }
    }
    let (_, r) = load_bytes(&dir, "j.inter", b"user_id:token\titem_id:token\n", &opts());
    assert!(r
        .unwrap_err()
        .to_string()
        .contains("empty file: no interaction lines"));
    let missing = dir.join("nope.dat");
    let e = load(&missing, &opts()).unwrap_err().to_string();
    assert!(e.contains("nope.dat") && e.contains("no such file"), "{e}");
}

#[test]
fn complete_last_line_without_newline_parses() {
    let dir = scratch("no-newline");
    let (_, r) = load_bytes(&dir, "u.data", b"1\t2\t5\t100\r\n1\t3\t4\t101", &opts());
    assert_eq!(r.unwrap(), 2);
    // A truncated last line is still an error at its line.
    assert_parse_error(
        "u.data",
        b"1\t2\t5\t100\n1\t3",
        2,
        &["expected 4 fields", "found 2"],
    );
}
