#!/usr/bin/env python3
"""Writes tests/bad_inputs/ (the bad-input corpus checked by tests/bad_input_corpus.rs) and fuzz/seeds/.

Each corpus file holds one defect, named by the file; the `ok-*` files are the well-formed inputs the
defective ones are variations of (the test asserts they load, so each failure is due to its one defect).
Plain Python, no numpy: the .npy and safetensors layouts are written byte by byte, which is the point.
Run from the repository root: python3 tests/make_bad_inputs.py
"""
import json, os, struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD = os.path.join(ROOT, "tests", "bad_inputs")
SEEDS = os.path.join(ROOT, "fuzz", "seeds")


def npy(descr, shape, data, fortran=False, version=1):
    shp = "(%s)" % (str(shape[0]) + "," if len(shape) == 1 else ", ".join(map(str, shape)))
    header = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (descr, fortran, shp)
    return npy_raw(header, data, version)


def npy_raw(header, data, version=1, encoding=None):
    lenb = 2 if version == 1 else 4
    pad = (64 - (8 + lenb + len(header) + 1) % 64) % 64
    h = (header + " " * pad + "\n").encode(encoding or ("latin-1" if version < 3 else "utf-8"))
    fmt = "<H" if version == 1 else "<I"
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack(fmt, len(h)) + h + data


def f32(*v):
    return struct.pack("<%df" % len(v), *v)


def i64(*v):
    return struct.pack("<%dq" % len(v), *v)


def st(tensors, metadata=None, raw_header=None, header_len=None, trailing=b""):
    """tensors: list of (name, dtype, shape, bytes); offsets are laid out in order unless a tensor gives
    its own as a fifth element."""
    header, data, off = {}, b"", 0
    for t in tensors:
        name, dtype, shape, b = t[:4]
        offs = t[4] if len(t) > 4 else [off, off + len(b)]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": offs}
        data += b
        off += len(b)
    if metadata is not None:
        header["__metadata__"] = metadata
    h = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    n = len(h) if header_len is None else header_len
    return struct.pack("<Q", n) + h + data + trailing


OK_ROWS = f32(0.5, 1.0, 1.5, 2.0, 2.5, 3.0)  # 3 x 2
OK_IDS = i64(1, 2, 3)
ok_ckpt_tensors = [("b", "F32", [3], f32(0.1, 0.2, 0.3)), ("w", "F32", [2, 3], f32(1, 2, 3, 4, 5, 6))]

def resume(version="1", header="default", drop=None, replace=None):
    """A resume checkpoint for a store of w [2, 3] and b [3] (format ur4rec-engine-resume), optionally with a
    tensor dropped or replaced (name, dtype, shape, bytes)."""
    tensors = [
        ("param/w", "F32", [2, 3], f32(1, 2, 3, 4, 5, 6)), ("param/b", "F32", [3], f32(0.1, 0.2, 0.3)),
        ("adam_m/w", "F32", [2, 3], f32(*[0.01] * 6)), ("adam_m/b", "F32", [3], f32(*[0.02] * 3)),
        ("adam_v/w", "F32", [2, 3], f32(*[0.001] * 6)), ("adam_v/b", "F32", [3], f32(*[0.002] * 3)),
        ("adam_steps", "U64", [2], struct.pack("<2Q", 7, 7)), ("trainable", "U8", [2], bytes([1, 0])),
        ("order", "U32", [5], struct.pack("<5I", 3, 1, 4, 0, 2)),
    ]
    tensors = [t for t in tensors if t[0] != drop]
    if replace is not None:
        tensors = [replace if t[0] == replace[0] else t for t in tensors]
    if header == "default":
        header = json.dumps({"trainer": "sasrec", "config": "seed = 42\n", "metrics_bytes": 0, "step": 7, "state": {},
                             "data": {"dataset": "synthetic", "fingerprint": "abc", "users": 10, "items": 20,
                                      "eval_negatives_fingerprint": "def"}}, separators=(",", ":"))
    meta = {"format": "ur4rec-engine-resume", "version": version}
    if header is not None:
        meta["header"] = header
    return st(tensors, metadata=meta)


files = {
    # --- interaction files (data::load) ---
    "ok-ratings.data": b"1\t10\t5\t100\n1\t11\t4\t101\n2\t10\t3\t102\n",
    "ratings-empty.data": b"",
    "ratings-only-blank-lines.txt": b"\n  \n\r\n",
    "ratings-truncated-last-line.data": b"1\t10\t5\t100\n1\t11",
    "ratings-negative-user-id.data": b"1\t10\t5\t100\n-3\t10\t4\t101\n",
    "ratings-negative-item-id.dat": b"1::10::5::100\n1::-2::5::101\n",
    "ratings-item-id-overflows-u64.data": b"1\t18446744073709551616\t5\t100\n",
    "ratings-user-id-overflows-i64.txt": b"9223372036854775808 1\n",
    "ratings-non-utf8-item.data": b"1\t10\t5\t100\n1\t\xff\xfe\t5\t101\n",
    "ratings-non-utf8-recbole-header.inter": b"user_id:token\titem_\xe9id:token\n1\t2\n",
    "ratings-user-without-items.txt": b"1 10 11\n2\n",
    "ratings-no-user-long-enough.data": b"1\t10\t5\t100\n2\t10\t5\t100\n",
    "ratings-nan-rating.dat": b"1::10::nan::100\n",
    "ratings-infinite-timestamp.inter": b"user_id:token\titem_id:token\ttimestamp:float\n1\t2\t1e999\n",
    "ratings-negative-timestamp.data": b"1\t10\t5\t-7\n",
    "ratings-recbole-no-item-column.inter": b"user_id:token\titem:token\n1\t2\n",
    "ratings-recbole-header-only.inter": b"user_id:token\titem_id:token\n",
    "ratings-pairs-with-three-fields.txt": b"1 10\n1 11 12\n",
    "ratings-empty-item-field.dat": b"1::::5::100\n",
    "ratings-unknown-extension.csv": b"1,10,5,100\n",
    # --- .npy (features::read_npy, and through load_features) ---
    "ok-rows.npy": npy("<f4", [3, 2], OK_ROWS),
    "ok-ids.npy": npy("<i8", [3], OK_IDS),
    "npy-empty.npy": b"",
    "npy-bad-magic.npy": b"\x93NUMPX\x01\x00" + npy("<f4", [3, 2], OK_ROWS)[8:],
    "npy-version-9.npy": b"\x93NUMPY\x09\x00" + npy("<f4", [3, 2], OK_ROWS)[8:],
    "npy-truncated-preamble.npy": b"\x93NUMPY\x02\x00\x40\x00",
    "npy-truncated-header.npy": npy("<f4", [3, 2], OK_ROWS)[:40],
    "npy-header-not-a-dict.npy": npy_raw("['descr', '<f4']", OK_ROWS),
    "npy-header-missing-shape.npy": npy_raw("{'descr': '<f4', 'fortran_order': False, }", OK_ROWS),
    # A latin-1 byte in a version 3.0 header, which must be UTF-8.
    "npy-v3-header-not-utf8.npy": npy_raw("{'descr': '<f4', 'fortran_order': False, 'shape': (6,), 'note': 'caf\u00e9', }", OK_ROWS, 3, "latin-1"),
    "npy-dtype-f8.npy": npy("<f8", [3], struct.pack("<3d", 1, 2, 3)),
    "npy-dtype-u1.npy": npy("|u1", [6], bytes(range(6))),
    "npy-dtype-big-endian-f4.npy": npy(">f4", [3, 2], OK_ROWS),
    "npy-dtype-object.npy": npy("|O", [1], b"\x80\x04N."),
    "npy-structured-dtype.npy": npy_raw("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (6,), }", OK_ROWS),
    "npy-fortran-order.npy": npy("<f4", [3, 2], OK_ROWS, fortran=True),
    "npy-huge-shape-overflows.npy": npy("<f4", [1 << 40, 1 << 40], OK_ROWS),
    "npy-huge-shape-beyond-file.npy": npy("<f4", [1 << 30, 1 << 20], OK_ROWS),
    "npy-negative-dimension.npy": npy_raw("{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 2), }", OK_ROWS),
    "npy-truncated-data.npy": npy("<f4", [3, 2], OK_ROWS[:20]),
    "npy-trailing-bytes.npy": npy("<f4", [3, 2], OK_ROWS + b"\0\0\0\0"),
    "npy-rows-zero-rows-huge-width.npy": npy("<f4", [0, 1 << 40], b""),
    "npy-rows-too-wide.npy": npy("<f4", [1, 1 << 17], bytes(4 << 17)),
    "npy-rows-nan.npy": npy("<f4", [3, 2], f32(0.5, 1.0, float("nan"), 2.0, 2.5, 3.0)),
    "npy-rows-one-dimensional.npy": npy("<f4", [6], OK_ROWS),
    "npy-rows-fewer-than-ids.npy": npy("<f4", [2, 2], OK_ROWS[:16]),
    "npy-ids-duplicate.npy": npy("<i8", [3], i64(1, 2, 1)),
    "npy-ids-negative.npy": npy("<i8", [3], i64(1, -2, 3)),
    "npy-ids-float.npy": npy("<f4", [3], f32(1, 2, 3)),
    # --- safetensors feature files (features::load_features_safetensors, tensors "rows" and "ids") ---
    "ok-features.safetensors": st([("ids", "I64", [3], OK_IDS), ("rows", "F32", [3, 2], OK_ROWS)]),
    "st-empty.safetensors": b"",
    "st-header-length-beyond-file.safetensors": st([("ids", "I64", [3], OK_IDS), ("rows", "F32", [3, 2], OK_ROWS)], header_len=1 << 20),
    "st-header-length-over-limit.safetensors": st([("ids", "I64", [3], OK_IDS)], header_len=1 << 40),
    "st-header-not-json.safetensors": st([], raw_header=b"{\"ids\": [1, 2"),
    "st-header-not-utf8.safetensors": st([], raw_header=b"{\"\xff\": 1}"),
    "st-offsets-beyond-data.safetensors": st([("ids", "I64", [3], OK_IDS), ("rows", "F32", [3, 2], OK_ROWS, [24, 72])]),
    "st-offsets-overflow-usize.safetensors": st([("ids", "I64", [3], OK_IDS), ("rows", "U8", [18446744073709551590], OK_ROWS, [24, 18446744073709551614])]),
    "st-offsets-overlapping.safetensors": st([("ids", "I64", [3], OK_IDS, [0, 24]), ("rows", "F32", [3, 2], OK_ROWS, [16, 40])], trailing=b"\0" * 16),
    "st-offsets-gap.safetensors": st([("ids", "I64", [3], OK_IDS), ("rows", "F32", [3, 2], b"\0" * 8 + OK_ROWS, [32, 56])]),
    "st-data-after-last-tensor.safetensors": st([("ids", "I64", [3], OK_IDS), ("rows", "F32", [3, 2], OK_ROWS)], trailing=b"\0" * 4),
    "st-shape-does-not-match-offsets.safetensors": st([("ids", "I64", [3], OK_IDS), ("rows", "F32", [4, 2], OK_ROWS)]),
    "st-huge-shape.safetensors": st([("ids", "I64", [3], OK_IDS), ("rows", "F32", [1 << 40, 1 << 40], OK_ROWS)]),
    "st-unknown-dtype.safetensors": st([("ids", "I64", [3], OK_IDS), ("rows", "F31", [3, 2], OK_ROWS)]),
    "st-rows-dtype-f64.safetensors": st([("ids", "I64", [3], OK_IDS), ("rows", "F64", [3], OK_ROWS[:24])]),
    "st-rows-nan.safetensors": st([("ids", "I64", [3], OK_IDS), ("rows", "F32", [3, 2], f32(0.5, 1.0, 1.5, float("inf"), 2.5, 3.0))]),
    "st-ids-duplicate.safetensors": st([("ids", "I64", [3], i64(3, 2, 3)), ("rows", "F32", [3, 2], OK_ROWS)]),
    "st-ids-missing.safetensors": st([("rows", "F32", [3, 2], OK_ROWS)]),
    # --- checkpoints (checkpoint::load_params into w [2, 3] and b [3], f32) ---
    "ok-checkpoint.safetensors": st(ok_ckpt_tensors, metadata={"step": "7"}),
    "ckpt-empty.safetensors": b"",
    "ckpt-truncated.safetensors": st(ok_ckpt_tensors)[:-5],
    "ckpt-header-length-beyond-file.safetensors": st(ok_ckpt_tensors, header_len=4096),
    "ckpt-wrong-dtype.safetensors": st([("b", "F32", [3], f32(0.1, 0.2, 0.3)), ("w", "F64", [2, 3], struct.pack("<6d", 1, 2, 3, 4, 5, 6))]),
    "ckpt-wrong-shape.safetensors": st([("b", "F32", [3], f32(0.1, 0.2, 0.3)), ("w", "F32", [3, 2], f32(1, 2, 3, 4, 5, 6))]),
    "ckpt-missing-tensor.safetensors": st(ok_ckpt_tensors[1:]),
    "ckpt-unknown-tensor.safetensors": st(ok_ckpt_tensors + [("z", "F32", [1], f32(0))]),
    "ckpt-offsets-overlapping.safetensors": st([("b", "F32", [3], f32(0.1, 0.2, 0.3), [0, 12]), ("w", "F32", [2, 3], f32(1, 2, 3, 4, 5, 6), [8, 32])], trailing=b"\0" * 8),
    # --- resume checkpoints (train::resume::ResumeFile: open, header, restore into w [2, 3] and b [3], order) ---
    "ok-resume.safetensors": resume(),
    "resume-truncated.safetensors": resume()[:-7],
    "resume-plain-checkpoint.safetensors": st(ok_ckpt_tensors, metadata={"step": "7"}),
    "resume-newer-version.safetensors": resume(version="2"),
    "resume-version-not-a-number.safetensors": resume(version="one"),
    "resume-header-missing.safetensors": resume(header=None),
    "resume-header-bad-json.safetensors": resume(header='{"trainer": "sasrec", '),
    "resume-moment-missing.safetensors": resume(drop="adam_v/b"),
    "resume-moment-wrong-shape.safetensors": resume(replace=("adam_m/w", "F32", [3, 2], f32(*[0.01] * 6))),
    "resume-steps-wrong-dtype.safetensors": resume(replace=("adam_steps", "U32", [2], struct.pack("<2I", 7, 7))),
    "resume-trainable-flag-2.safetensors": resume(replace=("trainable", "U8", [2], bytes([2, 1]))),
    "resume-steps-beyond-u32.safetensors": resume(replace=("adam_steps", "U64", [2], struct.pack("<2Q", 1 << 32, 7))),
    "resume-order-not-permutation.safetensors": resume(replace=("order", "U32", [5], struct.pack("<5I", 0, 0, 1, 2, 3))),
    "resume-order-out-of-range.safetensors": resume(replace=("order", "U32", [5], struct.pack("<5I", 0, 1, 2, 3, 99))),
    # --- TOML configuration (config::Config::from_file) ---
    "ok-config.toml": b"preset = \"sasrec\"\n[train]\nepochs = 3\n",
    "config-unknown-key.toml": b"[train]\nepochs = 3\nepochz = 4\n",
    "config-unknown-section.toml": b"[trian]\nepochs = 3\n",
    "config-wrong-type.toml": b"[train]\nepochs = \"ten\"\n",
    "config-negative-count.toml": b"[sasrec]\nhidden = -64\n",
    "config-unknown-enum-value.toml": b"[sasrec]\nnorm = \"middle\"\n",
    "config-preset-not-a-string.toml": b"preset = 3\n",
    "config-unknown-preset.toml": b"preset = \"sasrec-large\"\n",
    "config-syntax-error.toml": b"[train]\nepochs = = 3\n",
    "config-non-utf8.toml": b"[data]\nsource = \"caf\xe9\"\n",
    "config-duplicate-key.toml": b"[train]\nepochs = 3\nepochs = 4\n",
}

os.makedirs(BAD, exist_ok=True)
for old in os.listdir(BAD):
    if old != "MANIFEST.toml":
        os.remove(os.path.join(BAD, old))
for name, data in files.items():
    with open(os.path.join(BAD, name), "wb") as f:
        f.write(data)

# Fuzz seeds: the well-formed inputs of each reader (libFuzzer mutates from these).
seeds = {
    "ratings": {
        "movielens-tab": b"\x00" + files["ok-ratings.data"],
        "movielens-dat": b"\x01" + b"1::10::5::100\n1::11::4::101\n2::10::3::102\n",
        "sasrec-pairs": b"\x02" + b"1 10\n1 11\n2 10\n",
        "sasrec-lists": b"\x03" + b"1 10 11\n2 10\n1 12\n",
        "recbole": b"\x04" + b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t5\t100\n1\t11\t4\t101\n",
        "auto-txt": b"\x15" + b"1 10 11\n2 10\n",
    },
    "npy": {"rows": files["ok-rows.npy"], "ids": files["ok-ids.npy"],
            "ids-i4": npy("<i4", [3], struct.pack("<3i", 1, 2, 3)),
            "v2": npy("<f4", [3, 2], OK_ROWS, version=2)},
    "safetensors_features": {"features": files["ok-features.safetensors"],
                             "rows-only": st([("rows", "F32", [3, 2], OK_ROWS)])},
    "checkpoint": {"ok": files["ok-checkpoint.safetensors"]},
    "resume": {"ok": files["ok-resume.safetensors"]},
    "config": {"sasrec": files["ok-config.toml"],
               "full": b"seed = 1\npipeline = \"ur4rec\"\n[data]\nmin_rating = 4.0\n[ur4rec]\nstage_epochs = [1, 1, 1, 1]\nunfreeze = [\"2:sasrec\"]\n[ur4rec.features]\nitem_text = \"a.npy\"\n",
               "overrides": b"[train]\nepochs = 3\n\x00train.lr=5e-4\nsasrec.norm=post\n"},
}
for target, d in seeds.items():
    p = os.path.join(SEEDS, target)
    os.makedirs(p, exist_ok=True)
    for name, data in d.items():
        with open(os.path.join(p, name), "wb") as f:
            f.write(data)
print("wrote %d corpus files and %d seeds" % (len(files), sum(len(d) for d in seeds.values())))
