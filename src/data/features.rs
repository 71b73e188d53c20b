//! Side features from files: a minimal, safe `.npy` reader, a safetensors tensor reader, and the alignment of
//! feature rows to dense ids through the original-id strings.
//!
//! A feature file comes with an id file: row `i` of the features belongs to the original id `ids[i]`
//! (integers, compared with the data set's original ids as decimal strings). The result is a [`Features`]
//! table in dense-id order. Rows for ids the data set does not contain are ignored (counted); dense ids
//! without a row get a zero row and `present = false` (counted and listed in the [`FeatureReport`]) — a row
//! is never shifted onto another id. Duplicate ids, non-finite values in a used row, and any malformed file
//! are errors naming the file and what was expected.
//!
//! `.npy` support (format versions 1.0, 2.0 and 3.0): dtypes `<f4`, `<i8` and `<i4`, C order only. The
//! declared shape is checked against the file's length before anything is allocated, so a corrupt or hostile
//! header cannot make the reader allocate more than the file holds.

use super::{DataError, Features};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Element types the readers accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    I64,
    I32,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::I64 => 8,
        }
    }
    fn npy_descr(self) -> &'static str {
        match self {
            Dtype::F32 => "<f4",
            Dtype::I64 => "<i8",
            Dtype::I32 => "<i4",
        }
    }
}

/// The values of an array read from a file.
#[derive(Clone, Debug, PartialEq)]
pub enum ArrayData {
    F32(Vec<f32>),
    I64(Vec<i64>),
    I32(Vec<i32>),
}

/// An array read from a file: C-order values and their shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: ArrayData,
}

impl Array {
    pub fn dtype(&self) -> Dtype {
        match self.data {
            ArrayData::F32(_) => Dtype::F32,
            ArrayData::I64(_) => Dtype::I64,
            ArrayData::I32(_) => Dtype::I32,
        }
    }
}

/// What aligning a feature file to the data set's ids found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FeatureReport {
    /// Rows (= ids) in the file.
    pub rows_in_file: usize,
    /// Dense ids that received a row.
    pub matched: usize,
    /// Dense ids without a row (zero vector, `present = false`).
    pub missing: usize,
    /// The first [`MAX_LISTED`] missing dense ids, ascending.
    pub missing_dense_ids: Vec<u32>,
    /// Their original ids, in the same order.
    pub missing_original_ids: Vec<String>,
    /// Rows whose id is not in the data set (not used).
    pub ignored_rows: usize,
    /// Columns per row.
    pub dim: usize,
}

/// How many missing ids a [`FeatureReport`] lists.
pub const MAX_LISTED: usize = 64;

/// Widest feature row accepted (text and image embeddings have hundreds to a few thousand columns).
pub const MAX_FEATURE_DIM: usize = 1 << 16;

impl std::fmt::Display for FeatureReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} ids have a row of {} values ({} rows in the file, {} for ids not in the data set ignored)",
            self.matched,
            self.matched + self.missing,
            self.dim,
            self.rows_in_file,
            self.ignored_rows
        )?;
        if self.missing > 0 {
            write!(
                f,
                "; {} without a row (zero vector, masked): original ids {}{}",
                self.missing,
                self.missing_original_ids.join(" "),
                if self.missing > self.missing_original_ids.len() {
                    " ..."
                } else {
                    ""
                }
            )?;
        }
        Ok(())
    }
}

fn file_err(file: &Path, msg: impl Into<String>) -> DataError {
    DataError::File {
        file: file.to_path_buf(),
        msg: msg.into(),
    }
}

// ------------------------------------------------------------------------------------------------------------
// .npy

/// Largest header accepted (numpy itself refuses headers over 10,000 bytes by default).
const MAX_NPY_HEADER: usize = 1 << 20;

/// Reads a `.npy` file (see the module documentation for what is accepted).
pub fn read_npy(path: &Path) -> Result<Array, DataError> {
    let err = |msg: String| file_err(path, msg);
    let mut f = std::fs::File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let file_len = f
        .metadata()
        .map_err(|e| err(format!("cannot stat: {e}")))?
        .len();
    let io = |e: std::io::Error| file_err(path, format!("read error: {e}"));

    // Magic (6), version (2), header length (2 for v1, 4 for v2/v3).
    if file_len < 10 {
        return Err(err(format!(
            "not a .npy file: {file_len} bytes, shorter than the 10-byte preamble"
        )));
    }
    let mut pre = [0u8; 8];
    f.read_exact(&mut pre).map_err(io)?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err(err(
            "not a .npy file: the magic string \\x93NUMPY is missing".into(),
        ));
    }
    let (major, minor) = (pre[6], pre[7]);
    let len_bytes = match (major, minor) {
        (1, 0) => 2,
        (2, 0) | (3, 0) => 4,
        _ => {
            return Err(err(format!(
                "unsupported .npy format version {major}.{minor} (expected 1.0, 2.0 or 3.0)"
            )))
        }
    };
    let mut lb = [0u8; 4];
    f.read_exact(&mut lb[..len_bytes])
        .map_err(|e| err(format!("truncated .npy preamble: {e}")))?;
    let header_len = u32::from_le_bytes(lb) as usize;
    let data_offset = 8 + len_bytes + header_len;
    if data_offset as u64 > file_len {
        return Err(err(format!(
            "header length {header_len} runs past the end of the file ({file_len} bytes)"
        )));
    }
    if header_len > MAX_NPY_HEADER {
        return Err(err(format!(
            "header length {header_len} exceeds the {MAX_NPY_HEADER}-byte limit"
        )));
    }
    let mut hb = vec![0u8; header_len];
    f.read_exact(&mut hb).map_err(io)?;
    let header: String = if major == 3 {
        String::from_utf8(hb).map_err(|_| err("the v3.0 header is not valid UTF-8".into()))?
    } else {
        hb.iter().map(|&b| b as char).collect() // latin-1
    };
    // The header is shown cut short: it may be up to MAX_NPY_HEADER bytes of anything.
    let h = parse_npy_header(&header)
        .map_err(|m| err(format!("bad .npy header {}: {m}", shorten(&format!("{:?}", header.trim_end())))))?;

    let dtype = match h.descr.as_str() {
        "<f4" => Dtype::F32,
        "<i8" => Dtype::I64,
        "<i4" => Dtype::I32,
        d if d.starts_with('>') => {
            return Err(err(format!(
                "big-endian dtype '{d}' is not supported (expected little-endian '<f4', '<i8' or '<i4')"
            )))
        }
        d if d.contains('O') => {
            return Err(err(format!(
                "object dtype '{d}' is not supported: .npy files holding Python objects are never read \
                 (expected '<f4', '<i8' or '<i4')"
            )))
        }
        d => return Err(err(format!("unsupported dtype '{d}' (expected '<f4', '<i8' or '<i4')"))),
    };
    if h.fortran_order {
        return Err(err(
            "Fortran-order (column-major) arrays are not supported (expected fortran_order False: save with C order)"
                .into(),
        ));
    }
    let shape_str = match h.shape.as_slice() {
        [d] => format!("({d},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let count = h
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| err(format!("declared shape {shape_str} is too large")))?;
    let nbytes = count
        .checked_mul(dtype.size())
        .ok_or_else(|| err(format!("declared shape {shape_str} is too large")))?;
    let available = file_len - data_offset as u64;
    if nbytes as u64 != available {
        return Err(err(format!(
            "declared shape {shape_str} of '{}' needs {nbytes} data bytes, but the file has {available} after the header",
            dtype.npy_descr()
        )));
    }
    let data = match dtype {
        Dtype::F32 => {
            let mut v = vec![0f32; count];
            f.read_exact(bytemuck::cast_slice_mut(&mut v)).map_err(io)?;
            if cfg!(target_endian = "big") {
                v.iter_mut()
                    .for_each(|x| *x = f32::from_bits(u32::from_le(x.to_bits())));
            }
            ArrayData::F32(v)
        }
        Dtype::I64 => {
            let mut v = vec![0i64; count];
            f.read_exact(bytemuck::cast_slice_mut(&mut v)).map_err(io)?;
            v.iter_mut().for_each(|x| *x = i64::from_le(*x));
            ArrayData::I64(v)
        }
        Dtype::I32 => {
            let mut v = vec![0i32; count];
            f.read_exact(bytemuck::cast_slice_mut(&mut v)).map_err(io)?;
            v.iter_mut().for_each(|x| *x = i32::from_le(*x));
            ArrayData::I32(v)
        }
    };
    Ok(Array {
        shape: h.shape,
        data,
    })
}

struct NpyHeader {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

#[derive(Debug, PartialEq)]
enum Tok {
    Open(char),
    Close(char),
    Colon,
    Comma,
    Str(String),
    Ident(String),
    Int(u128),
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let cs: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < cs.len() {
        let c = cs[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '{' | '(' => {
                out.push(Tok::Open(c));
                i += 1
            }
            '}' | ')' => {
                out.push(Tok::Close(c));
                i += 1
            }
            // Lists occur in headers only as structured dtypes; say both, as the list may be elsewhere.
            '[' => return Err("found a list '[...]' (structured (record) dtypes are not supported; expected a dict of descr, fortran_order, shape)".into()),
            ':' => {
                out.push(Tok::Colon);
                i += 1
            }
            ',' => {
                out.push(Tok::Comma);
                i += 1
            }
            '\'' | '"' => {
                let end = cs[i + 1..]
                    .iter()
                    .position(|&x| x == c)
                    .ok_or("unterminated string")?;
                out.push(Tok::Str(cs[i + 1..i + 1 + end].iter().collect()));
                i += end + 2;
            }
            c if c.is_ascii_digit() => {
                let start = i;
                while i < cs.len() && cs[i].is_ascii_digit() {
                    i += 1;
                }
                let digits: String = cs[start..i].iter().collect();
                let v = digits
                    .parse::<u128>()
                    .map_err(|_| format!("integer {digits} is too large"))?;
                if i < cs.len() && cs[i] == 'L' {
                    i += 1; // Python 2 long suffix
                }
                out.push(Tok::Int(v));
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let start = i;
                while i < cs.len() && (cs[i].is_ascii_alphanumeric() || cs[i] == '_') {
                    i += 1;
                }
                out.push(Tok::Ident(cs[start..i].iter().collect()));
            }
            '-' => return Err("negative dimension in shape".into()),
            c => return Err(format!("unexpected character {c:?}")),
        }
    }
    Ok(out)
}

/// Parses the header dict `{'descr': ..., 'fortran_order': ..., 'shape': (...), }`.
fn parse_npy_header(s: &str) -> Result<NpyHeader, String> {
    let toks = tokenize(s)?;
    let mut t = toks.iter().peekable();
    let expect = |got: Option<&Tok>, want: Tok| -> Result<(), String> {
        match got {
            Some(g) if *g == want => Ok(()),
            g => Err(format!("expected {want:?}, found {g:?}")),
        }
    };
    expect(t.next(), Tok::Open('{'))?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        match t.next() {
            Some(Tok::Close('}')) => break,
            Some(Tok::Str(key)) => {
                expect(t.next(), Tok::Colon)?;
                match key.as_str() {
                    "descr" => match t.next() {
                        Some(Tok::Str(d)) => descr = Some(d.clone()),
                        g => return Err(format!("'descr' must be a string, found {g:?}")),
                    },
                    "fortran_order" => match t.next() {
                        Some(Tok::Ident(b)) if b == "True" => fortran = Some(true),
                        Some(Tok::Ident(b)) if b == "False" => fortran = Some(false),
                        g => {
                            return Err(format!(
                                "'fortran_order' must be True or False, found {g:?}"
                            ))
                        }
                    },
                    "shape" => {
                        expect(t.next(), Tok::Open('('))?;
                        let mut dims = Vec::new();
                        loop {
                            match t.next() {
                                Some(Tok::Close(')')) => break,
                                Some(Tok::Int(v)) => {
                                    dims.push(
                                        usize::try_from(*v)
                                            .map_err(|_| format!("dimension {v} is too large"))?,
                                    );
                                    match t.next() {
                                        Some(Tok::Comma) => {}
                                        Some(Tok::Close(')')) => break,
                                        g => return Err(format!("bad shape tuple near {g:?}")),
                                    }
                                }
                                g => return Err(format!("bad shape tuple near {g:?}")),
                            }
                        }
                        shape = Some(dims);
                    }
                    k => {
                        return Err(format!(
                            "unexpected key '{k}' (expected descr, fortran_order, shape)"
                        ))
                    }
                }
                match t.next() {
                    Some(Tok::Comma) => {}
                    Some(Tok::Close('}')) => break,
                    g => return Err(format!("expected ',' or '}}', found {g:?}")),
                }
            }
            g => return Err(format!("expected a key or '}}', found {g:?}")),
        }
    }
    if let Some(extra) = t.next() {
        return Err(format!("unexpected {extra:?} after the header dict"));
    }
    Ok(NpyHeader {
        descr: descr.ok_or("missing key 'descr'")?,
        fortran_order: fortran.ok_or("missing key 'fortran_order'")?,
        shape: shape.ok_or("missing key 'shape'")?,
    })
}

// ------------------------------------------------------------------------------------------------------------
// safetensors

/// Reads tensor `name` (F32, I64 or I32) from a safetensors file.
pub fn read_safetensors(path: &Path, name: &str) -> Result<Array, DataError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let st = parse_safetensors(&bytes)
        .map_err(|m| file_err(path, format!("not a valid safetensors file: {m}")))?;
    tensor_of(&st, path, name)
}

/// Largest safetensors header accepted (the `safetensors` crate's own limit).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// Parses a safetensors file held in memory, after checking what the `safetensors` crate (0.4) trusts.
///
/// The crate adds the declared data end to the header length unchecked: a tensor whose `data_offsets` end
/// near `usize::MAX` (with a shape to match) overflows that sum, a panic wherever overflow checks are on
/// (debug builds; tests/bad_inputs/st-offsets-overflow-usize.safetensors). So every tensor's offsets are
/// checked against the data section here first, and its byte span against its shape and dtype, naming the
/// tensor. The crate's own errors are Debug names (`InvalidOffset("w")`), so they
/// are translated into what was expected. The error is the message without the file name; callers add it.
pub fn parse_safetensors(bytes: &[u8]) -> Result<safetensors::SafeTensors<'_>, String> {
    use safetensors::SafeTensorError as E;
    let len = bytes.len() as u64;
    if len < 8 {
        return Err(format!(
            "{len} bytes, shorter than the 8-byte header length that starts a safetensors file"
        ));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    if n > MAX_SAFETENSORS_HEADER {
        return Err(format!(
            "declared header length {n} exceeds the {MAX_SAFETENSORS_HEADER}-byte limit"
        ));
    }
    if n > len - 8 {
        return Err(format!(
            "declared header length {n} runs past the end of the file ({len} bytes)"
        ));
    }
    let data_len = len - 8 - n;
    let header = std::str::from_utf8(&bytes[8..8 + n as usize])
        .map_err(|e| format!("the header is not valid UTF-8 (byte {} of the header)", e.valid_up_to()))?;
    let expected_json = "expected a JSON object {\"name\": {\"dtype\": ..., \"shape\": [...], \"data_offsets\": [begin, end]}, ...}";
    let json: serde_json::Map<String, serde_json::Value> = serde_json::from_str(header)
        .map_err(|e| format!("the header is not valid JSON ({e}); {expected_json}"))?;
    for (name, info) in &json {
        if name == "__metadata__" {
            continue;
        }
        let (Some(dtype), Some(shape), Some(offsets)) = (
            info.get("dtype").and_then(|d| d.as_str()),
            info.get("shape").and_then(|s| s.as_array()),
            info.get("data_offsets").and_then(|o| o.as_array()),
        ) else {
            return Err(format!(
                "tensor {name:?}: expected \"dtype\", \"shape\" and \"data_offsets\" entries, found {}",
                shorten(&info.to_string())
            ));
        };
        let (Some(begin), Some(end)) = (
            offsets.first().and_then(|v| v.as_u64()),
            offsets.get(1).and_then(|v| v.as_u64()),
        ) else {
            return Err(format!(
                "tensor {name:?}: data_offsets {} are not two non-negative integers",
                shorten(&serde_json::Value::Array(offsets.clone()).to_string())
            ));
        };
        if offsets.len() != 2 || begin > end || end > data_len {
            return Err(format!(
                "tensor {name:?}: data_offsets [{begin}, {end}] are outside the {data_len} data bytes after the header \
                 (expected begin <= end <= {data_len})"
            ));
        }
        let elem_size: u64 = match dtype {
            "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
            "I16" | "U16" | "F16" | "BF16" => 2,
            "I32" | "U32" | "F32" => 4,
            "I64" | "U64" | "F64" => 8,
            d => return Err(format!("tensor {name:?}: unknown dtype {d:?}")),
        };
        let dims: Option<Vec<u64>> = shape.iter().map(|d| d.as_u64()).collect();
        let Some(dims) = dims else {
            return Err(format!(
                "tensor {name:?}: shape {} is not a list of non-negative integers",
                shorten(&serde_json::Value::Array(shape.clone()).to_string())
            ));
        };
        let nbytes = dims
            .iter()
            .try_fold(elem_size, |a, &d| a.checked_mul(d))
            .filter(|&b| b <= data_len);
        if nbytes != Some(end - begin) {
            return Err(format!(
                "tensor {name:?}: shape {dims:?} of {dtype} needs {} bytes, but its data_offsets [{begin}, {end}] span {}",
                nbytes.map_or("more than the file's".to_string(), |b| b.to_string()),
                end - begin
            ));
        }
    }
    safetensors::SafeTensors::deserialize(bytes).map_err(|e| match e {
        E::InvalidOffset(name) => format!(
            "tensor {name:?}: its data does not start where the previous tensor's ends \
             (expected the tensors' data_offsets to tile the data section without gaps or overlaps)"
        ),
        E::MetadataIncompleteBuffer => format!(
            "the tensors' data does not cover the {data_len} data bytes after the header exactly \
             (expected the last tensor to end at the end of the file)"
        ),
        E::InvalidHeaderDeserialization => {
            format!("the header is not a valid safetensors header; {expected_json}")
        }
        other => format!("{other}"),
    })
}

/// A piece of untrusted text for a message, cut at 80 characters.
fn shorten(s: &str) -> String {
    if s.chars().count() > 80 {
        format!("{}...", s.chars().take(80).collect::<String>())
    } else {
        s.to_string()
    }
}

fn tensor_of(st: &safetensors::SafeTensors, path: &Path, name: &str) -> Result<Array, DataError> {
    let view = st.tensor(name).map_err(|_| {
        let mut names: Vec<&String> = st.names();
        names.sort();
        file_err(
            path,
            format!("no tensor named {name:?} (tensors: {names:?})"),
        )
    })?;
    let raw = view.data();
    let shape = view.shape().to_vec();
    let data = match view.dtype() {
        safetensors::Dtype::F32 => ArrayData::F32(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        safetensors::Dtype::I64 => ArrayData::I64(
            raw.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        safetensors::Dtype::I32 => ArrayData::I32(
            raw.chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        d => {
            return Err(file_err(
                path,
                format!("tensor {name:?} has dtype {d:?} (expected F32 features or I64/I32 ids)"),
            ))
        }
    };
    Ok(Array { shape, data })
}

/// Reads a `.safetensors` file's only tensor, or a `.npy` file.
fn read_single(path: &Path) -> Result<Array, DataError> {
    if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
        let bytes = std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
        let st = parse_safetensors(&bytes)
            .map_err(|m| file_err(path, format!("not a valid safetensors file: {m}")))?;
        let names = st.names();
        if names.len() != 1 {
            return Err(file_err(
                path,
                format!(
                    "holds {} tensors {names:?}; name the tensors to read (load_features_safetensors)",
                    names.len()
                ),
            ));
        }
        let name = names[0].clone();
        tensor_of(&st, path, &name)
    } else {
        read_npy(path)
    }
}

// ------------------------------------------------------------------------------------------------------------
// Alignment

/// Loads a feature table (`.npy`, or a single-tensor `.safetensors`) and its id list, and aligns the rows with
/// the dense ids whose original ids are `originals` (`dataset.item_original` or `dataset.user_original`).
pub fn load_features(
    rows_path: &Path,
    ids_path: &Path,
    originals: &[String],
) -> Result<(Features, FeatureReport), DataError> {
    let rows = read_single(rows_path)?;
    let ids = read_single(ids_path)?;
    align_features(&rows, rows_path, &ids, ids_path, originals)
}

/// Like [`load_features`], with the features and ids as named tensors of one safetensors file.
pub fn load_features_safetensors(
    path: &Path,
    rows_tensor: &str,
    ids_tensor: &str,
    originals: &[String],
) -> Result<(Features, FeatureReport), DataError> {
    let rows = read_safetensors(path, rows_tensor)?;
    let ids = read_safetensors(path, ids_tensor)?;
    let tagged = |t: &str| PathBuf::from(format!("{}[{t}]", path.display()));
    align_features(
        &rows,
        &tagged(rows_tensor),
        &ids,
        &tagged(ids_tensor),
        originals,
    )
}

/// Aligns `rows` (`[n, dim]` f32) to dense ids through `ids` (`[n]` integers) and `originals`; the paths are
/// used in error messages.
pub fn align_features(
    rows: &Array,
    rows_file: &Path,
    ids: &Array,
    ids_file: &Path,
    originals: &[String],
) -> Result<(Features, FeatureReport), DataError> {
    let id_values: Vec<i64> = match (&ids.data, ids.shape.as_slice()) {
        (ArrayData::I64(v), [_]) => v.clone(),
        (ArrayData::I32(v), [_]) => v.iter().map(|&x| x as i64).collect(),
        _ => {
            return Err(file_err(
                ids_file,
                format!(
                    "expected a 1-D integer id array (int64 or int32), found {:?} of shape {:?}",
                    ids.dtype(),
                    ids.shape
                ),
            ))
        }
    };
    let (values, n, dim) = match (&rows.data, rows.shape.as_slice()) {
        (ArrayData::F32(v), &[n, dim]) if dim > 0 => (v, n, dim),
        _ => return Err(file_err(
            rows_file,
            format!(
                "expected a 2-D float32 feature array [rows, dim >= 1], found {:?} of shape {:?}",
                rows.dtype(),
                rows.shape
            ),
        )),
    };
    // The output table is `(ids in the data set + 1) * dim` values whatever the file holds, so `dim` is
    // bounded here: a file of zero rows can declare any width without holding a byte (a `(0, 2**40)` shape
    // would ask for terabytes), and one wide row multiplies with every id of the data set.
    if n == 0 {
        return Err(file_err(
            rows_file,
            format!("no feature rows (shape {:?}); expected at least one row", rows.shape),
        ));
    }
    if dim > MAX_FEATURE_DIM {
        return Err(file_err(
            rows_file,
            format!("rows of {dim} values; expected at most {MAX_FEATURE_DIM} columns"),
        ));
    }
    // Arrays built in memory (this function is public) may disagree with their own shape.
    if values.len() != n * dim {
        return Err(file_err(
            rows_file,
            format!("shape [{n}, {dim}] but {} values", values.len()),
        ));
    }
    if id_values.len() != n {
        return Err(file_err(
            rows_file,
            format!(
                "{n} feature rows but {} ids in {}",
                id_values.len(),
                ids_file.display()
            ),
        ));
    }

    let dense_of: HashMap<&str, u32> = originals
        .iter()
        .enumerate()
        .map(|(i, s)| (s.as_str(), i as u32 + 1))
        .collect();
    let mut first_row: HashMap<i64, usize> = HashMap::with_capacity(n);
    let count = originals.len();
    let mut out = vec![0f32; (count + 1) * dim];
    let mut present = vec![false; count + 1];
    let (mut matched, mut ignored) = (0usize, 0usize);
    for (i, &id) in id_values.iter().enumerate() {
        if let Some(&prev) = first_row.get(&id) {
            return Err(file_err(
                ids_file,
                format!("id {id} appears at rows {prev} and {i} (ids must be unique)"),
            ));
        }
        first_row.insert(id, i);
        // The interaction readers refuse negative ids, so a negative one here can only be corruption.
        if id < 0 {
            return Err(file_err(
                ids_file,
                format!("row {i}: id {id} is negative (expected non-negative ids)"),
            ));
        }
        let Some(&k) = dense_of.get(id.to_string().as_str()) else {
            ignored += 1;
            continue;
        };
        let row = &values[i * dim..(i + 1) * dim];
        if let Some(j) = row.iter().position(|v| !v.is_finite()) {
            return Err(file_err(
                rows_file,
                format!("row {i} (id {id}), column {j}: non-finite value {}", row[j]),
            ));
        }
        out[k as usize * dim..(k as usize + 1) * dim].copy_from_slice(row);
        present[k as usize] = true;
        matched += 1;
    }
    let missing_ids: Vec<u32> = (1..=count as u32)
        .filter(|&k| !present[k as usize])
        .collect();
    let listed: Vec<u32> = missing_ids.iter().take(MAX_LISTED).copied().collect();
    let report = FeatureReport {
        rows_in_file: n,
        matched,
        missing: missing_ids.len(),
        missing_original_ids: listed
            .iter()
            .map(|&k| originals[k as usize - 1].clone())
            .collect(),
        missing_dense_ids: listed,
        ignored_rows: ignored,
        dim,
    };
    Ok((
        Features {
            dim,
            rows: out,
            present,
        },
        report,
    ))
}

/// User vectors as the mean of the present item rows of each user's history (`histories[u - 1]` for dense
/// user `u`; item 0 is padding and skipped). A user with no present item gets a zero row and `present = false`.
pub fn mean_of_items(item: &Features, histories: &[Vec<u32>]) -> Features {
    let dim = item.dim;
    let num_items = item.present.len().saturating_sub(1);
    let mut rows = vec![0f32; (histories.len() + 1) * dim];
    let mut present = vec![false; histories.len() + 1];
    let mut acc = vec![0f64; dim];
    for (u, hist) in histories.iter().enumerate() {
        acc.iter_mut().for_each(|a| *a = 0.0);
        let mut n = 0usize;
        for &i in hist {
            let i = i as usize;
            if i == 0 {
                continue;
            }
            assert!(
                i <= num_items,
                "mean_of_items: item {i} outside the feature table ({num_items} items)"
            );
            if item.present[i] {
                for (a, &v) in acc.iter_mut().zip(&item.rows[i * dim..(i + 1) * dim]) {
                    *a += v as f64;
                }
                n += 1;
            }
        }
        if n > 0 {
            let dst = &mut rows[(u + 1) * dim..(u + 2) * dim];
            for (d, a) in dst.iter_mut().zip(&acc) {
                *d = (a / n as f64) as f32;
            }
            present[u + 1] = true;
        }
    }
    Features { dim, rows, present }
}

/// Writes `array` as a version 1.0 `.npy` file (little-endian, C order), atomically, so it can be read by
/// NumPy and by [`read_npy`]. Used to export evaluation scores.
pub fn write_npy(path: &Path, array: &Array) -> std::io::Result<()> {
    let (descr, bytes): (&str, Vec<u8>) = match &array.data {
        ArrayData::F32(v) => ("<f4", v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ArrayData::I64(v) => ("<i8", v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ArrayData::I32(v) => ("<i4", v.iter().flat_map(|x| x.to_le_bytes()).collect()),
    };
    let shape = match array.shape.len() {
        1 => format!("({},)", array.shape[0]),
        _ => format!("({})", array.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + header length (2) + header + '\n' is padded to a multiple of 64 bytes.
    let pad = (64 - (10 + header.len() + 1) % 64) % 64;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + bytes.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&bytes);
    crate::checkpoint::write_atomic(path, &out)
}
