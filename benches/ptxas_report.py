#!/usr/bin/env python3
"""Registers, spills and shared memory of every kernel of one family (kernels/FAMILY.cu), from NVRTC's ptxas
report (sm_90), on a machine without a GPU: the numbers a kernel's occupancy depends on.

Usage: python3 benches/ptxas_report.py FAMILY
Needs libnvrtc.so.13 on LD_LIBRARY_PATH (.ci/run caches it under ~/.cache/ur4rec-nvrtc-13.0.88/lib).
Compiles exactly as src/backend/cuda/kernels.rs does: the prelude kernels/common.cuh, then the family.
"""
import ctypes
import os
import sys

family = sys.argv[1]
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
lib = "libnvrtc.so.13"
for d in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
    if d and os.path.exists(os.path.join(d, lib)):
        lib = os.path.join(d, lib)
        break
nv = ctypes.CDLL(lib)
prelude = open(os.path.join(root, "kernels", "common.cuh")).read()
src = prelude + f'\n#line 1 "{family}.cu"\n' + open(os.path.join(root, "kernels", f"{family}.cu")).read()
prog = ctypes.c_void_p()
if nv.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), f"{family}.cu".encode(), 0, None, None) != 0:
    sys.exit("nvrtcCreateProgram failed")
opts = [b"--gpu-architecture=sm_90", b"--std=c++17", b"--ptxas-options=-v"]
rc = nv.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
size = ctypes.c_size_t()
nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
nv.nvrtcGetProgramLog(prog, log)
kernel = None
for line in log.value.decode().splitlines():
    if "Compiling entry function" in line:
        kernel = line.split("'")[1]
    elif "spill" in line and kernel:
        spills = line.split(",")[1].strip()
    elif "Used" in line and kernel:
        print(f"{kernel:<40} {line.split(':', 1)[1].strip()}; {spills}")
if rc != 0:
    print(log.value.decode())
    sys.exit(f"NVRTC failed with status {rc}")
