//! Interaction files in, [`Dataset`] out: the five supported file formats and the preprocessing they
//! share (rating filter, stable time sort, minimum-length filter, dense id remapping, fingerprint).
//!
//! Files are read line by line as bytes and each field is decoded on its own, so every problem can be
//! reported with the file, the 1-based line and the field it is in.

use super::{fingerprint, DataError, Dataset};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// The interaction file formats we read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// MovieLens-100K `u.data`: `user \t item \t rating \t timestamp` (any whitespace accepted).
    MovieLensTab,
    /// MovieLens-1M/10M `ratings.dat`: `user::item::rating::timestamp`.
    MovieLensDat,
    /// SASRec text: `user item` per line; file order is time order.
    SasRecPairs,
    /// SASRec/ICLRec text: `user i1 i2 ...` per line in time order; repeated users are appended.
    SasRecLists,
    /// RecBole atomic `.inter`: tab-separated with a typed header (`user_id:token\titem_id:token\t...`);
    /// columns are found by name, `rating` and `timestamp` are optional, other columns are ignored.
    RecBoleInter,
}

/// The `--format` names, in the order the help text lists them.
const FORMAT_NAMES: [(&str, Format); 5] = [
    ("movielens", Format::MovieLensTab),
    ("movielens-dat", Format::MovieLensDat),
    ("sasrec", Format::SasRecPairs),
    ("sasrec-lists", Format::SasRecLists),
    ("recbole", Format::RecBoleInter),
];

impl Format {
    /// The `--format` name of this format (what [`parse_format`] accepts).
    pub fn name(self) -> &'static str {
        FORMAT_NAMES
            .iter()
            .find(|(_, f)| *f == self)
            .map(|(n, _)| *n)
            .unwrap_or("unknown")
    }
}

/// Parses a `--format` value.
pub fn parse_format(s: &str) -> Result<Format, DataError> {
    FORMAT_NAMES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(s.trim()))
        .map(|(_, f)| *f)
        .ok_or_else(|| {
            let names: Vec<&str> = FORMAT_NAMES.iter().map(|(n, _)| *n).collect();
            DataError::Invalid(format!(
                "unknown data format {s:?}; expected one of: {}",
                names.join(", ")
            ))
        })
}

/// How to read and filter a file.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// `None`: pick the format from the file name (and, for `.txt`, from the line shapes).
    pub format: Option<Format>,
    /// Keep only interactions with rating >= this; ignored for formats (or `.inter` files) without ratings.
    pub min_rating: Option<f32>,
    /// Drop users with fewer interactions than this (after the rating filter).
    pub min_items_per_user: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            format: None,
            min_rating: None,
            min_items_per_user: 5,
        }
    }
}

/// Reads an interaction file (or a directory holding one) and preprocesses it into a [`Dataset`].
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Dataset, DataError> {
    let file = resolve_file(path)?;
    let format = match opts.format {
        Some(f) => f,
        None => detect_format(&file)?,
    };
    let raw = read_raw(&file, format, opts.min_rating)?;
    build(raw, &file, dataset_name(path, &file), opts)
}

/// File names a directory is searched for, most specific first (ML-1M directories also hold
/// `movies.dat` and `users.dat`, so only `ratings.dat` counts there).
fn resolve_file(path: &Path) -> Result<PathBuf, DataError> {
    if !path.exists() {
        return Err(DataError::File {
            file: path.to_path_buf(),
            msg: "no such file or directory".into(),
        });
    }
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let io_err = |e: std::io::Error| DataError::File {
        file: path.to_path_buf(),
        msg: format!("cannot list directory: {e}"),
    };
    let mut names: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        if entry.path().is_file() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    let classes: [&dyn Fn(&str) -> bool; 4] = [
        &|n| n == "u.data",
        &|n| n == "ratings.dat",
        &|n| n.ends_with(".inter"),
        &|n| n.ends_with(".txt"),
    ];
    for class in classes {
        let found: Vec<&String> = names.iter().filter(|n| class(n)).collect();
        match found.as_slice() {
            [] => continue,
            [one] => return Ok(path.join(one)),
            many => {
                let list: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
                return Err(DataError::File {
                    file: path.to_path_buf(),
                    msg: format!(
                        "several candidate interaction files ({}); pass the file itself",
                        list.join(", ")
                    ),
                });
            }
        }
    }
    Err(DataError::File {
        file: path.to_path_buf(),
        msg:
            "no interaction file in this directory (looked for u.data, ratings.dat, *.inter, *.txt)"
                .into(),
    })
}

fn detect_format(file: &Path) -> Result<Format, DataError> {
    let ext = file
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        // MovieLens-100K's `u.data` (and its `*.data` siblings).
        "data" => Ok(Format::MovieLensTab),
        "dat" => Ok(Format::MovieLensDat),
        "inter" => Ok(Format::RecBoleInter),
        "txt" => sniff_txt(file),
        _ => {
            let names: Vec<&str> = FORMAT_NAMES.iter().map(|(n, _)| *n).collect();
            Err(DataError::File {
                file: file.to_path_buf(),
                msg: format!(
                    "cannot tell the format from the file name; pass --format ({})",
                    names.join(", ")
                ),
            })
        }
    }
}

/// `.txt` holds either pairs or lists; a file is pairs only if every non-blank line has exactly two fields.
/// Malformed lines are left to the real parse, which reports them properly.
fn sniff_txt(file: &Path) -> Result<Format, DataError> {
    let mut lines = LineReader::open(file)?;
    while let Some((_, line)) = lines.next_line()? {
        if line
            .split(u8::is_ascii_whitespace)
            .filter(|f| !f.is_empty())
            .count()
            != 2
        {
            return Ok(Format::SasRecLists);
        }
    }
    Ok(Format::SasRecPairs)
}

/// The name recorded in the data set: the file stem, or the directory name for generic file names.
fn dataset_name(path: &Path, file: &Path) -> String {
    let dir_name = |p: &Path| {
        let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        p.file_name().map(|n| n.to_string_lossy().into_owned())
    };
    if path.is_dir() {
        return dir_name(path).unwrap_or_else(|| "data".into());
    }
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if stem.is_empty() || stem == "u" || stem == "ratings" {
        if let Some(n) = file.parent().and_then(dir_name) {
            return n;
        }
    }
    if stem.is_empty() {
        "data".into()
    } else {
        stem
    }
}

/// Non-blank lines of a file as bytes, with their 1-based numbers.
struct LineReader {
    file: PathBuf,
    reader: BufReader<File>,
    buf: Vec<u8>,
    line: usize,
}

impl LineReader {
    fn open(file: &Path) -> Result<Self, DataError> {
        let f = File::open(file).map_err(|e| DataError::File {
            file: file.to_path_buf(),
            msg: format!("cannot open: {e}"),
        })?;
        Ok(LineReader {
            file: file.to_path_buf(),
            reader: BufReader::with_capacity(1 << 16, f),
            buf: Vec::new(),
            line: 0,
        })
    }

    /// The next non-blank line without its `\n` / `\r\n`; a last line without a newline counts too.
    fn next_line(&mut self) -> Result<Option<(usize, &[u8])>, DataError> {
        loop {
            self.buf.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut self.buf)
                .map_err(|e| DataError::File {
                    file: self.file.clone(),
                    msg: format!("read error after line {}: {e}", self.line),
                })?;
            if n == 0 {
                return Ok(None);
            }
            self.line += 1;
            let mut end = self.buf.len();
            while end > 0 && matches!(self.buf[end - 1], b'\n' | b'\r') {
                end -= 1;
            }
            if !self.buf[..end].iter().all(u8::is_ascii_whitespace) {
                return Ok(Some((self.line, &self.buf[..end])));
            }
        }
    }
}

/// How fields are separated on a line.
#[derive(Clone, Copy)]
enum Sep {
    Whitespace,
    Tab,
    DoubleColon,
}

impl Sep {
    fn split(self, line: &[u8]) -> Vec<&[u8]> {
        match self {
            Sep::Whitespace => line
                .split(u8::is_ascii_whitespace)
                .filter(|f| !f.is_empty())
                .collect(),
            Sep::Tab => line
                .split(|&b| b == b'\t')
                .map(<[u8]>::trim_ascii)
                .collect(),
            Sep::DoubleColon => {
                let mut out = Vec::with_capacity(4);
                let mut rest = line;
                while let Some(p) = rest.windows(2).position(|w| w == b"::") {
                    out.push(rest[..p].trim_ascii());
                    rest = &rest[p + 2..];
                }
                out.push(rest.trim_ascii());
                out
            }
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Sep::Whitespace => "whitespace",
            Sep::Tab => "tabs",
            Sep::DoubleColon => "'::'",
        }
    }
}

/// Where the columns of a fixed-column format are (0-based) and what to call them in messages.
struct Layout {
    sep: Sep,
    fields: usize,
    names: Vec<String>,
    user: usize,
    item: usize,
    rating: Option<usize>,
    timestamp: Option<usize>,
}

impl Layout {
    fn movielens(sep: Sep) -> Self {
        Layout {
            sep,
            fields: 4,
            names: ["user", "item", "rating", "timestamp"]
                .map(String::from)
                .to_vec(),
            user: 0,
            item: 1,
            rating: Some(2),
            timestamp: Some(3),
        }
    }

    /// Reads a RecBole header (`name:type` per column); `user_id` and `item_id` are required.
    fn recbole(file: &Path, line: usize, header: &[u8]) -> Result<Self, DataError> {
        let fields = Sep::Tab.split(header);
        let mut names = Vec::with_capacity(fields.len());
        for (k, f) in fields.iter().enumerate() {
            let text = decode(file, line, k, "header", f)?;
            names.push(text.split(':').next().unwrap_or("").to_string());
        }
        let find = |want: &str| names.iter().position(|n| n == want);
        let missing: Vec<&str> = ["user_id", "item_id"]
            .into_iter()
            .filter(|w| find(w).is_none())
            .collect();
        if !missing.is_empty() {
            let found: Vec<String> = fields
                .iter()
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .collect();
            return Err(DataError::Parse {
                file: file.to_path_buf(),
                line,
                msg: format!(
                    "header: no {} column (expected tab-separated columns like user_id:token, item_id:token; found {:?})",
                    missing.join(" and no "),
                    found
                ),
            });
        }
        Ok(Layout {
            sep: Sep::Tab,
            fields: names.len(),
            user: find("user_id").unwrap_or(0),
            item: find("item_id").unwrap_or(0),
            rating: find("rating"),
            timestamp: find("timestamp"),
            names,
        })
    }

    fn field_count_error(&self, file: &Path, line: usize, found: usize) -> DataError {
        DataError::Parse {
            file: file.to_path_buf(),
            line,
            msg: format!(
                "expected {} fields ({}) separated by {}, found {found}",
                self.fields,
                self.names.join(", "),
                self.sep.describe()
            ),
        }
    }
}

/// Interactions as read, keyed by first-appearance indices of the original ids.
struct Raw {
    users: Vec<String>,
    user_index: HashMap<String, u32>,
    items: Vec<String>,
    item_index: HashMap<String, u32>,
    /// Per raw user: `(timestamp, raw item)` in file order (timestamp 0 where the format has none).
    events: Vec<Vec<(f64, u32)>>,
    /// Whether the events carry real timestamps to sort by.
    timed: bool,
    /// Non-blank data lines read (header excluded).
    lines: usize,
}

fn intern(index: &mut HashMap<String, u32>, names: &mut Vec<String>, id: &str) -> u32 {
    if let Some(&k) = index.get(id) {
        return k;
    }
    let k = names.len() as u32;
    names.push(id.to_string());
    index.insert(id.to_string(), k);
    k
}

impl Raw {
    fn new(timed: bool) -> Self {
        Raw {
            users: Vec::new(),
            user_index: HashMap::new(),
            items: Vec::new(),
            item_index: HashMap::new(),
            events: Vec::new(),
            timed,
            lines: 0,
        }
    }

    /// Registers the user even when the interaction is filtered out, so that the summary can say how many
    /// users the rating filter removed entirely.
    fn user(&mut self, id: &str) -> usize {
        let u = intern(&mut self.user_index, &mut self.users, id) as usize;
        if u == self.events.len() {
            self.events.push(Vec::new());
        }
        u
    }

    fn push(&mut self, user: usize, item: &str, ts: f64) {
        let i = intern(&mut self.item_index, &mut self.items, item);
        self.events[user].push((ts, i));
    }
}

fn parse_error(file: &Path, line: usize, msg: String) -> DataError {
    DataError::Parse {
        file: file.to_path_buf(),
        line,
        msg,
    }
}

/// Shows a bad field in a message, shortened so a garbage line cannot flood the terminal.
fn shown(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    if s.chars().count() > 40 {
        format!("{:?}...", s.chars().take(40).collect::<String>())
    } else {
        format!("{s:?}")
    }
}

/// Decodes field `k` (0-based) as UTF-8.
fn decode<'a>(
    file: &Path,
    line: usize,
    k: usize,
    name: &str,
    raw: &'a [u8],
) -> Result<&'a str, DataError> {
    std::str::from_utf8(raw).map_err(|_| {
        parse_error(
            file,
            line,
            format!(
                "field {} ({name}): expected UTF-8 text, found invalid bytes {}",
                k + 1,
                shown(raw)
            ),
        )
    })
}

fn id<'a>(
    file: &Path,
    line: usize,
    k: usize,
    name: &str,
    raw: &'a [u8],
) -> Result<&'a str, DataError> {
    let s = decode(file, line, k, name, raw)?;
    if s.is_empty() {
        return Err(parse_error(
            file,
            line,
            format!(
                "field {} ({name}): expected an id, found an empty field",
                k + 1
            ),
        ));
    }
    // Ids are tokens, but a token that reads as an integer must be one the rest of the engine can use as
    // one: feature id files hold int64 ids (and may not be negative), and one id past i64 would silently
    // switch the whole file from numeric to text order of the dense ids ("10" before "9").
    let digits = s.strip_prefix('-').unwrap_or(s);
    if !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (s.starts_with('-') || s.parse::<i64>().is_err())
    {
        return Err(parse_error(
            file,
            line,
            format!(
                "field {} ({name}): expected a non-negative integer id of at most {} (int64), found {}",
                k + 1,
                i64::MAX,
                shown(raw)
            ),
        ));
    }
    Ok(s)
}

fn rating(file: &Path, line: usize, k: usize, name: &str, raw: &[u8]) -> Result<f32, DataError> {
    let s = decode(file, line, k, name, raw)?;
    match s.parse::<f32>() {
        Ok(r) if r.is_finite() => Ok(r),
        _ => Err(parse_error(
            file,
            line,
            format!(
                "field {} ({name}): expected a number, found {}",
                k + 1,
                shown(raw)
            ),
        )),
    }
}

fn timestamp(file: &Path, line: usize, k: usize, name: &str, raw: &[u8]) -> Result<f64, DataError> {
    let s = decode(file, line, k, name, raw)?;
    match s.parse::<f64>() {
        // `+ 0.0` turns -0 into +0 so that the total-order sort sees them as a tie.
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t + 0.0),
        _ => Err(parse_error(
            file,
            line,
            format!(
                "field {} ({name}): expected a non-negative number, found {}",
                k + 1,
                shown(raw)
            ),
        )),
    }
}

fn read_raw(file: &Path, format: Format, min_rating: Option<f32>) -> Result<Raw, DataError> {
    let mut lines = LineReader::open(file)?;
    let raw = match format {
        Format::MovieLensTab => {
            read_columns(&mut lines, Layout::movielens(Sep::Whitespace), min_rating)?
        }
        Format::MovieLensDat => {
            read_columns(&mut lines, Layout::movielens(Sep::DoubleColon), min_rating)?
        }
        Format::RecBoleInter => {
            let Some((n, header)) = lines.next_line()? else {
                return Err(DataError::File {
                    file: file.to_path_buf(),
                    msg: "empty file (expected a RecBole header line)".into(),
                });
            };
            let layout = Layout::recbole(file, n, header)?;
            read_columns(&mut lines, layout, min_rating)?
        }
        Format::SasRecPairs | Format::SasRecLists => {
            read_sasrec(&mut lines, format == Format::SasRecPairs)?
        }
    };
    if raw.lines == 0 {
        return Err(DataError::File {
            file: file.to_path_buf(),
            msg: "empty file: no interaction lines".into(),
        });
    }
    Ok(raw)
}

fn read_columns(
    lines: &mut LineReader,
    layout: Layout,
    min_rating: Option<f32>,
) -> Result<Raw, DataError> {
    let file = lines.file.clone();
    let mut raw = Raw::new(layout.timestamp.is_some());
    while let Some((n, line)) = lines.next_line()? {
        let f = layout.sep.split(line);
        if f.len() != layout.fields {
            return Err(layout.field_count_error(&file, n, f.len()));
        }
        let name = |k: usize| layout.names[k].as_str();
        let user = id(&file, n, layout.user, name(layout.user), f[layout.user])?;
        let item = id(&file, n, layout.item, name(layout.item), f[layout.item])?;
        let ts = match layout.timestamp {
            Some(k) => timestamp(&file, n, k, name(k), f[k])?,
            None => 0.0,
        };
        // Ratings are checked even when not filtering: a malformed rating means a malformed line.
        let r = match layout.rating {
            Some(k) => Some(rating(&file, n, k, name(k), f[k])?),
            None => None,
        };
        let keep = match (r, min_rating) {
            (Some(r), Some(min)) => r >= min,
            _ => true,
        };
        raw.lines += 1;
        let u = raw.user(user);
        if keep {
            raw.push(u, item, ts);
        }
    }
    Ok(raw)
}

fn read_sasrec(lines: &mut LineReader, pairs: bool) -> Result<Raw, DataError> {
    let file = lines.file.clone();
    let mut raw = Raw::new(false);
    while let Some((n, line)) = lines.next_line()? {
        let f = Sep::Whitespace.split(line);
        if pairs && f.len() != 2 {
            return Err(parse_error(
                &file,
                n,
                format!(
                    "expected 2 fields (user, item) separated by whitespace, found {}",
                    f.len()
                ),
            ));
        }
        if f.len() < 2 {
            return Err(parse_error(
                &file,
                n,
                "expected a user id followed by at least one item id, found 1 field".into(),
            ));
        }
        let user = id(&file, n, 0, "user", f[0])?;
        let u = raw.user(user);
        for (k, it) in f.iter().enumerate().skip(1) {
            let item = id(&file, n, k, "item", it)?;
            raw.push(u, item, 0.0);
        }
        raw.lines += 1;
    }
    Ok(raw)
}

/// The order of dense ids: numeric when every id is an integer (so "10" follows "9"), else lexicographic.
/// Returns the indices of `ids` in that order.
fn id_order(ids: &[&str]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    let numeric: Option<Vec<i64>> = ids.iter().map(|s| s.parse::<i64>().ok()).collect();
    match numeric {
        // Ties ("7" and "007") fall back to the text so the order stays total.
        Some(v) => order.sort_by(|&a, &b| v[a].cmp(&v[b]).then_with(|| ids[a].cmp(ids[b]))),
        None => order.sort_by(|&a, &b| ids[a].cmp(ids[b])),
    }
    order
}

fn build(
    mut raw: Raw,
    file: &Path,
    name: String,
    opts: &LoadOptions,
) -> Result<Dataset, DataError> {
    if raw.timed {
        // `sort_by` is stable: equal timestamps keep file order. No item-id tie-break, on purpose.
        for ev in &mut raw.events {
            ev.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
    }
    let (mut by_rating, mut by_length) = (0usize, 0usize);
    let mut kept: Vec<usize> = Vec::new();
    for (u, ev) in raw.events.iter().enumerate() {
        if ev.is_empty() {
            by_rating += 1;
        } else if ev.len() < opts.min_items_per_user {
            by_length += 1;
        } else {
            kept.push(u);
        }
    }
    if kept.is_empty() {
        let rating_part = match opts.min_rating {
            Some(r) => format!("{by_rating} had no rating >= {r}"),
            None => format!("{by_rating} had no interactions"),
        };
        return Err(DataError::File {
            file: file.to_path_buf(),
            msg: format!(
                "no users left after filtering: of {} users read, {rating_part} and {by_length} had fewer than {} items (min_items_per_user)",
                raw.users.len(),
                opts.min_items_per_user
            ),
        });
    }

    let kept_ids: Vec<&str> = kept.iter().map(|&u| raw.users[u].as_str()).collect();
    let users: Vec<usize> = id_order(&kept_ids).into_iter().map(|k| kept[k]).collect();

    let mut used = vec![false; raw.items.len()];
    for &u in &users {
        for &(_, i) in &raw.events[u] {
            used[i as usize] = true;
        }
    }
    let used_items: Vec<usize> = (0..raw.items.len()).filter(|&i| used[i]).collect();
    let used_ids: Vec<&str> = used_items.iter().map(|&i| raw.items[i].as_str()).collect();
    let mut dense_item = vec![0u32; raw.items.len()];
    let mut item_original = Vec::with_capacity(used_items.len());
    for (d, k) in id_order(&used_ids).into_iter().enumerate() {
        dense_item[used_items[k]] = d as u32 + 1;
        item_original.push(used_ids[k].to_string());
    }

    let sequences: Vec<Vec<u32>> = users
        .iter()
        .map(|&u| {
            raw.events[u]
                .iter()
                .map(|&(_, i)| dense_item[i as usize])
                .collect()
        })
        .collect();
    let user_original: Vec<String> = users
        .iter()
        .map(|&u| std::mem::take(&mut raw.users[u]))
        .collect();
    let fingerprint = fingerprint(&user_original, &item_original, &sequences);
    Ok(Dataset {
        name,
        num_users: user_original.len(),
        num_items: item_original.len(),
        user_original,
        item_original,
        sequences,
        fingerprint,
        item_text: None,
        item_visual: None,
        user_text: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory for one test (no tempfile crate).
    fn scratch(test: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ur4rec-readers-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn opts(min_items: usize) -> LoadOptions {
        LoadOptions {
            min_items_per_user: min_items,
            ..Default::default()
        }
    }

    /// Each user's items as original ids, keyed by original user id.
    fn originals(ds: &Dataset) -> Vec<(String, Vec<String>)> {
        ds.sequences
            .iter()
            .enumerate()
            .map(|(u, s)| {
                (
                    ds.user_original[u].clone(),
                    s.iter()
                        .map(|&i| ds.item_original[i as usize - 1].clone())
                        .collect(),
                )
            })
            .collect()
    }

    fn seq(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn movielens_tab_sorts_stably_by_time_with_file_order_on_ties() {
        let d = scratch("tab");
        // User 2: items 30 and 10 share timestamp 100; file order (30 before 10) must survive.
        let p = write(
            &d,
            "u.data",
            "2\t30\t5\t100\n1\t7\t3\t50\n2\t20\t4\t90\n2\t10\t1\t100\n1\t8\t2\t40\n",
        );
        let ds = load(&p, &opts(1)).unwrap();
        assert_eq!(
            originals(&ds),
            vec![
                ("1".into(), seq(&["8", "7"])),
                ("2".into(), seq(&["20", "30", "10"]))
            ]
        );
        assert_eq!(ds.num_interactions(), 5);
        assert!(
            ds.name.ends_with("-tab"),
            "generic file names take the directory name: {}",
            ds.name
        );
    }

    #[test]
    fn movielens_dat_and_rating_filter_and_min_items() {
        let d = scratch("dat");
        let p = write(
            &d,
            "ratings.dat",
            "1::5::5::3\n1::6::3::2\n1::7::4::1\n2::5::1::1\n2::6::2::2\n3::9::4::1\n",
        );
        let all = load(&p, &opts(1)).unwrap();
        assert_eq!(all.num_users, 3);
        let four = LoadOptions {
            min_rating: Some(4.0),
            min_items_per_user: 1,
            ..Default::default()
        };
        let ds = load(&p, &four).unwrap();
        // User 2 has no rating >= 4; item 6 only occurs with low ratings so it leaves the catalogue.
        assert_eq!(
            originals(&ds),
            vec![("1".into(), seq(&["7", "5"])), ("3".into(), seq(&["9"]))]
        );
        assert_eq!(ds.item_original, seq(&["5", "7", "9"]));
        let two = LoadOptions {
            min_rating: Some(4.0),
            min_items_per_user: 2,
            ..Default::default()
        };
        assert_eq!(load(&p, &two).unwrap().user_original, seq(&["1"]));
    }

    #[test]
    fn empty_after_filtering_says_which_filter_dropped_whom() {
        let d = scratch("empty-after");
        let p = write(&d, "u.data", "1\t5\t1\t3\n2\t5\t5\t3\n");
        let o = LoadOptions {
            min_rating: Some(4.0),
            min_items_per_user: 2,
            ..Default::default()
        };
        let msg = load(&p, &o).unwrap_err().to_string();
        assert!(
            msg.contains("of 2 users read, 1 had no rating >= 4 and 1 had fewer than 2 items"),
            "{msg}"
        );
    }

    #[test]
    fn remap_is_dense_ordered_and_reversible() {
        let d = scratch("remap");
        // Numeric ids order numerically (9 < 10 < 100), not as text.
        let p = write(&d, "x.txt", "100 9\n100 10\n10 100\n9 10\n9 9\n");
        let ds = load(&p, &opts(1)).unwrap();
        assert_eq!(ds.user_original, seq(&["9", "10", "100"]));
        assert_eq!(ds.item_original, seq(&["9", "10", "100"]));
        assert_eq!(ds.sequences, vec![vec![2, 1], vec![3], vec![1, 2]]);
        // Any non-integer id switches to lexicographic order.
        let p = write(&d, "y.txt", "b 10\na 9\nb x\n");
        let ds = load(&p, &opts(1)).unwrap();
        assert_eq!(ds.user_original, seq(&["a", "b"]));
        assert_eq!(ds.item_original, seq(&["10", "9", "x"]));
        assert_eq!(
            originals(&ds),
            vec![("a".into(), seq(&["9"])), ("b".into(), seq(&["10", "x"]))]
        );
    }

    #[test]
    fn txt_is_sniffed_as_pairs_or_lists() {
        let d = scratch("sniff");
        let pairs = write(&d, "p.txt", "1 4\n1 3\n\n2 4\n");
        let lists = write(&d, "l.txt", "1 4 3\n2 4\n1 5\n");
        assert_eq!(detect_format(&pairs).unwrap(), Format::SasRecPairs);
        assert_eq!(detect_format(&lists).unwrap(), Format::SasRecLists);
        let ds = load(&lists, &opts(1)).unwrap();
        assert_eq!(
            originals(&ds),
            vec![
                ("1".into(), seq(&["4", "3", "5"])),
                ("2".into(), seq(&["4"]))
            ]
        );
        let ds = load(&pairs, &opts(1)).unwrap();
        assert_eq!(
            originals(&ds),
            vec![("1".into(), seq(&["4", "3"])), ("2".into(), seq(&["4"]))]
        );
        // The same interactions give the same fingerprint whatever the file shape.
        let same = write(&d, "q.txt", "1 4 3\n2 4\n");
        assert_eq!(load(&same, &opts(1)).unwrap().fingerprint, ds.fingerprint);
    }

    #[test]
    fn recbole_columns_by_name_in_any_order() {
        let d = scratch("recbole");
        let p = write(
            &d,
            "toy.inter",
            "timestamp:float\tnote:token_seq\titem_id:token\trating:float\tuser_id:token\r\n\
             20\ta b\ti2\t5\tu1\r\n10\t\ti1\t2\tu1\r\n10\tc\ti3\t4\tu1\r\n",
        );
        let ds = load(&p, &opts(1)).unwrap();
        assert_eq!(ds.name, "toy");
        assert_eq!(
            originals(&ds),
            vec![("u1".into(), seq(&["i1", "i3", "i2"]))]
        );
        let o = LoadOptions {
            min_rating: Some(4.0),
            min_items_per_user: 1,
            ..Default::default()
        };
        assert_eq!(
            originals(&load(&p, &o).unwrap()),
            vec![("u1".into(), seq(&["i3", "i2"]))]
        );
        // Without a timestamp column the file order is the time order.
        let p = write(&d, "b.inter", "user_id:token\titem_id:token\n1\tz\n1\ty\n");
        assert_eq!(
            originals(&load(&p, &opts(1)).unwrap()),
            vec![("1".into(), seq(&["z", "y"]))]
        );
    }

    #[test]
    fn directories_and_format_names() {
        let d = scratch("dir");
        write(&d, "u.data", "1\t2\t3\t4\n");
        write(&d, "u.item", "not interactions\n");
        assert_eq!(load(&d, &opts(1)).unwrap().num_interactions(), 1);
        for (name, f) in FORMAT_NAMES {
            assert_eq!(parse_format(name).unwrap(), f);
            assert_eq!(f.name(), name);
        }
        assert!(parse_format("csv")
            .unwrap_err()
            .to_string()
            .contains("movielens, movielens-dat"));
        let e = scratch("dir-none");
        write(&e, "README", "x");
        assert!(load(&e, &opts(1))
            .unwrap_err()
            .to_string()
            .contains("no interaction file"));
    }

    #[test]
    fn explicit_format_overrides_the_file_name() {
        let d = scratch("explicit");
        let p = write(&d, "ratings.csv", "1::2::3::4\n");
        assert!(load(&p, &opts(1))
            .unwrap_err()
            .to_string()
            .contains("--format"));
        let o = LoadOptions {
            format: Some(Format::MovieLensDat),
            min_items_per_user: 1,
            ..Default::default()
        };
        assert_eq!(load(&p, &o).unwrap().item_original, seq(&["2"]));
    }

    fn shared(rel: &str) -> Option<PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data")
            .join(rel);
        if p.exists() {
            Some(p)
        } else {
            eprintln!(
                "skipped: {} is absent (the shared data sets are not in this checkout)",
                p.display()
            );
            None
        }
    }

    #[test]
    fn movielens_100k_counts() {
        let Some(p) = shared("ml-100k/u.data") else {
            return;
        };
        let ds = load(&p, &LoadOptions::default()).unwrap();
        assert_eq!(
            (ds.num_users, ds.num_items, ds.num_interactions()),
            (943, 1682, 100_000)
        );
        assert_eq!(ds.name, "ml-100k");
        let four = LoadOptions {
            min_rating: Some(4.0),
            ..Default::default()
        };
        assert_eq!(load(p.parent().unwrap(), &four).unwrap().num_users, 938);
    }

    #[test]
    fn amazon_games_counts() {
        let Some(p) = shared("amazon-games") else {
            return;
        };
        // The published counts are of the whole file: 1,672 of its users have fewer than 5 items (112 fewer
        // than 3), so they hold only without the length filter.
        let ds = load(
            &p,
            &LoadOptions {
                min_items_per_user: 1,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            (ds.num_users, ds.num_items, ds.num_interactions()),
            (31_013, 23_715, 287_107)
        );
        // Ids are already dense from 1 in this file, so the remap must be the identity.
        assert!(ds
            .user_original
            .iter()
            .enumerate()
            .all(|(k, s)| *s == (k + 1).to_string()));
        assert!(ds
            .item_original
            .iter()
            .enumerate()
            .all(|(k, s)| *s == (k + 1).to_string()));
        let ds = load(&p, &LoadOptions::default()).unwrap();
        assert_eq!(
            (ds.num_users, ds.num_items, ds.num_interactions()),
            (29_341, 23_464, 280_945)
        );
    }
}
