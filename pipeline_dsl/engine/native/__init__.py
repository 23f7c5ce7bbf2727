"""agp's native CPU kernels (kernels.cpp), loaded with ctypes, with an eager fallback.

    lib = native.load()          # the library, or None (then everything runs eagerly)
    python -m pipeline_dsl.engine.native      # build it now (what `make native` runs)

The library is compiled once per machine with the system's C++ compiler (`-O3 -march=native
-fopenmp`) into build/ beside this file, named by a hash of the source, the flags, the compiler
and the CPU's instruction sets (target_isa()), so a changed source is rebuilt, a stale one is
never loaded, and a folder shared by machines of different CPUs (an image baked elsewhere, an
NFS home) holds one library per instruction set. The library says what it was compiled for
(`agp_isa()`); one that needs an instruction set this CPU lacks is refused before any kernel
runs (a warning; the eager path), never called into an illegal instruction. Where that folder cannot be written
(a read-only install: a container's image) it is built into the user's cache,
$XDG_CACHE_HOME/agp/native (else ~/.cache/agp/native), else the temporary folder's
agp-native-<uid> (TMPDIR; used only while this user owns it and no one else may write there);
processes sharing a folder share the library: one builds it (a lock in the folder), the others
wait and load it, and it lands by an atomic rename. It links libgomp by its soname,
which resolves to the copy torch has already loaded: the kernels share torch's one OpenMP
pool. Without a compiler, without AVX-512 or AVX2 + FMA (cpu_supported()), or with
AGP_NATIVE=0, `load()` returns None after a one-line warning and the runner keeps its eager
path (same tokens, slower).

What it offers (see kernels.cpp): `agp_decode_step` (a whole all-decode step in one
parallel region), `agp_paged_attention` (decode attention reading the paged KV blocks in
place) and `agp_linear` (int4 / int8 / bf16 / fp32 weights, a few rows).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

from pipeline_dsl.cliargs import env_switch
from pipeline_dsl.user_cache import one_at_a_time, private, user_cache

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "kernels.cpp"
BUILD = HERE / "build"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
STALE_BUILD_S = 600               # a partial build (.tmp…) older than this was left by a killed one; another
                                  # process's build in progress (maybe in another container: its pid unseen) is younger
VERSION = 9                       # agp_native_version() of a library this module can drive

_LIB: list = []                   # [lib or None] once tried
_WARNED: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
AVX2 = ("avx2", "fma")            # the kernels use no F16C instruction (their bf16 is integer shifts)
# kernels.cpp's agp_isa() bits, in order, as /proc/cpuinfo names them: what -march=native compiled in
ISA_BITS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
            "avx512_bf16", "avx_vnni")


def cpu_supported() -> bool:
    """Whether the kernels build here: AVX-512 (F, BW, VL, DQ), or AVX2 with FMA (each kernel is
    compiled for what -march=native gives: kernels.cpp's 16-lane layer)."""
    flags = cpu_flags()
    return all(f in flags for f in AVX512) or all(f in flags for f in AVX2)


def cpu_missing() -> list[str]:
    """What cpu_supported() lacks here (the warning names it): the AVX2 set's, [] when supported."""
    return [] if cpu_supported() else [f for f in AVX2 if f not in cpu_flags()]


def target_isa() -> tuple[str, ...]:
    """The instruction sets -march=native compiles for on this CPU (of those the kernels' code
    depends on: ISA_BITS), sorted: part of the library's name."""
    return tuple(sorted(f for f in ISA_BITS if f in cpu_flags()))


def library_path(cxx: str | None = None, folder: Path | None = None, isa: tuple[str, ...] | None = None) -> Path:
    """Where the library for this source, FLAGS, compiler `cxx` and instruction sets `isa`
    (default: this CPU's, target_isa()) is, in `folder` (default build/)."""
    isa = target_isa() if isa is None else tuple(sorted(isa))
    key = SOURCE.read_bytes() + " ".join(FLAGS).encode() + str(cxx).encode() + " ".join(isa).encode()
    h = hashlib.sha256(key).hexdigest()[:12]
    return (BUILD if folder is None else folder) / f"libagp_native-{h}.so"


def library_isa(lib) -> list[str]:
    """The instruction sets a loaded library was compiled for (its agp_isa())."""
    bits = lib.agp_isa()
    return [f for i, f in enumerate(ISA_BITS) if bits >> i & 1]


def folders() -> list[Path]:
    """Where the library is looked for, and built in the first that can be written: build/ beside
    this file, the user's cache, then the temporary folder's own (module docstring)."""
    user = [folder] if (folder := user_cache("native")) is not None else []
    try:
        tmp = [Path(tempfile.gettempdir()) / f"agp-native-{os.getuid()}"]
    except OSError:               # no writable temporary folder at all (a wholly read-only container)
        tmp = []
    return [BUILD, *user, *tmp]


def _usable(folder: Path, make: bool = False) -> bool:
    """Whether the library may be loaded from (or, with `make`, built in: the folder made when
    missing, and writable) this folder. The temporary folder is everyone's: a folder of it is
    used only when it is this user's and no one else may write in it."""
    shared = folder.name == f"agp-native-{os.getuid()}"   # the temporary folder's (folders())
    try:
        if make:
            folder.mkdir(mode=0o700 if shared else 0o777, parents=True, exist_ok=True)
        st = folder.lstat()
    except OSError:
        return False
    if shared and not private(st):
        return False
    return not make or os.access(folder, os.W_OK | os.X_OK)


def build(force: bool = False, quiet: bool = True) -> Path:
    """Compile kernels.cpp (if not already built for this source); returns the library path."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++, c++ or clang++) on PATH")
    places = folders()
    if not force:
        for folder in places:
            if library_path(cxx, folder).exists() and _usable(folder):
                return library_path(cxx, folder)
    folder = next((f for f in places if _usable(f, make=True)), None)
    if folder is None:
        raise RuntimeError("no writable folder to build them in: build them into the image "
                           "(python -m pipeline_dsl.engine.native) or set XDG_CACHE_HOME")
    out = library_path(cxx, folder)
    with one_at_a_time(folder, ".build.lock"):   # replicas sharing a cache compile once
        if out.exists() and not force:
            return out                    # another process built it while this one waited
        return _compile(cxx, out, quiet)


def _compile(cxx: str, out: Path, quiet: bool) -> Path:
    folder = out.parent
    tmp = out.with_suffix(f".tmp{os.getpid()}-{os.urandom(4).hex()}")    # replicas sharing the folder may share a pid
    cmd = [cxx, *FLAGS, str(SOURCE), "-o", str(tmp)]
    started = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building the native kernels failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    tmp.replace(out)              # atomic: a concurrent loader never sees half a file
    for old in folder.glob("libagp_native-*"):
        if old != out and (old.suffix == ".so" or _age(old) > STALE_BUILD_S):
            old.unlink(missing_ok=True)   # an older source's library, or what a killed build left
    logging.getLogger("agp.native").info("built the native kernels in %.0f s: %s", time.monotonic() - started, out)
    if not quiet:
        print(f"built {out}")
    return out


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def load():
    """The ctypes library, or None (with a one-line warning) when it cannot be had here."""
    if _LIB:
        return _LIB[0]
    lib = None
    if not env_switch("AGP_NATIVE", True):
        pass                      # switched off: the eager path, silently (tests, A/B)
    elif not cpu_supported():
        _warn_once(f"agp: this CPU has no AVX-512 and lacks {' and '.join(cpu_missing())} of AVX2 with FMA; "
                   "the decode step runs eagerly (slower)")
    elif compiler() is None:
        _warn_once("agp: no C++ compiler found; the decode step runs eagerly (slower). "
                   "Install g++ and run `make native` for the native kernels")
    else:
        try:
            import torch  # noqa: F401  (its libgomp must be loaded first: one OpenMP pool)
            path = build()
            lib = ctypes.CDLL(str(path))
            if lib.agp_native_version() != VERSION:
                raise RuntimeError("version mismatch")
            # built on another CPU (a shared folder): its first kernel would be an illegal instruction
            lacking = [f for f in library_isa(lib) if f not in cpu_flags()]
            if lacking:
                _warn_once(f"agp: the native kernels at {path} were built for {', '.join(lacking)}, which this "
                           "CPU lacks (another machine's; remove the file to rebuild it here); "
                           "the decode step runs eagerly (slower)")
                lib = None
            else:
                _declare(lib)
        except (OSError, RuntimeError, AttributeError) as e:
            _warn_once(f"agp: native kernels unavailable ({str(e).splitlines()[0][:160]}); "
                       "the decode step runs eagerly (slower)")
            lib = None
    _LIB.append(lib)
    return lib


def activation_parts() -> int:
    """How the native int4 / Q8 linears take their inputs (read when a layer is built):
    2: int8 in two parts per block of 32, the leftover of the first rounding quantised again
       (finer than bf16; int8 dot products at memory speed: the default),
    1: int8 in one part (llama.cpp's numerics: greedy text parts from the float path sooner),
    0: float (the eager path's numerics; the kernels are bound by converting weights).
    AGP_NATIVE_ACT=int8x2 | int8 | f32 picks; where int8_dot_products() is False it is 0."""
    parts = activation_choice()
    return parts if int8_dot_products() else 0


def int8_dot_products() -> bool:
    """Whether the kernels' int8 dot products pay here: AVX512-VNNI, or a CPU whose kernels are
    the AVX2 build (pmaddubsw, or AVX-VNNI where present): on a 2-core AVX2 EPYC one request
    alone decoded 2.9x faster with them (and bf16 storage, `dtype = auto`) than with float inputs
    (fp32), and W32 ran 1.7-1.9x faster than the eager fp32 path (docs/engine_benchmarks.md).
    AVX-512 without VNNI (Skylake) would run the AVX2 form on each half: unmeasured, it keeps
    float inputs."""
    flags = cpu_flags()
    return "avx512_vnni" in flags or ("avx512f" not in flags and all(f in flags for f in AVX2))


def int8_isa() -> str:
    """The instruction set of the loaded library's int8 dot products, in words: "AVX-512 VNNI"
    (vpdpbusd), "AVX-VNNI" (vpdpbusd on 256 bits) or "AVX2" (pmaddubsw); "" without a library."""
    lib = load()
    if lib is None:
        return ""
    isa = library_isa(lib)
    return "AVX-512 VNNI" if "avx512_vnni" in isa else "AVX-VNNI" if "avx_vnni" in isa else "AVX2"


ACTIVATIONS = {"int8x2": 2, "int8": 1, "f32": 0}     # AGP_NATIVE_ACT's words -> activation_parts()


def activation_choice() -> int:
    """What AGP_NATIVE_ACT asks for (unset or empty: int8x2); another word is a ValueError naming
    the variable (it was taken for int8x2 without a word)."""
    raw = os.environ.get("AGP_NATIVE_ACT", "")
    choice = raw.strip().lower() or "int8x2"
    if choice not in ACTIVATIONS:
        raise ValueError(f"AGP_NATIVE_ACT={raw!r}: expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[choice]


def int8_activations() -> bool:
    """Whether the native int4 / Q8 linears take int8 inputs (activation_parts() > 0)."""
    return activation_parts() > 0


def fast_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AMX or AVX512-BF16): oneDNN's bf16 GEMMs
    are fast there and emulated, ~10x slower, elsewhere."""
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def fast_fp16() -> bool:
    """Whether this CPU computes fp16 in hardware (AMX-FP16 or AVX512-FP16): elsewhere torch's
    fp16 GEMMs are emulated, as bf16's are without fast_bf16 (~5x slower than fp32 at 32 rows of
    SmolLM2-135M's shapes on an AVX2 EPYC, measured)."""
    flags = cpu_flags()
    return "amx_fp16" in flags or "avx512_fp16" in flags


def fast_half(dtype) -> bool:
    """Whether this CPU computes the half type `dtype` (torch.bfloat16 or torch.float16) in
    hardware: fast_bf16 or fast_fp16; any other dtype is not emulated (True)."""
    import torch
    if dtype == torch.bfloat16:
        return fast_bf16()
    if dtype == torch.float16:
        return fast_fp16()
    return True


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's flags (/proc/cpuinfo's words), read once per process; empty where unknown."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def reset() -> None:
    """Forget the loaded library (tests switch AGP_NATIVE and load again)."""
    _LIB.clear()


# ---- the C structs (kernels.cpp) ----------------------------------------------------------

class Lin(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("N", ctypes.c_int32), ("K", ctypes.c_int32),
                ("round", ctypes.c_int32), ("w", ctypes.c_void_p), ("s", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p),
                ("qkv", Lin), ("o", Lin), ("gate_up", Lin), ("down", Lin),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p)]


class Model(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("n_layers", "hidden", "inter", "n_heads", "n_kv",
                                              "head_dim", "vocab", "block_size")] + [
        ("eps", ctypes.c_float), ("bf16", ctypes.c_int32), ("embed_bf16", ctypes.c_int32),
        ("kv_bf16", ctypes.c_int32), ("embed", ctypes.c_void_p), ("norm", ctypes.c_void_p),
        ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("layers", ctypes.c_void_p),
        ("lm_head", Lin), ("k_pool", ctypes.c_void_p), ("v_pool", ctypes.c_void_p),
        ("layer_stride", ctypes.c_int64)]


class Step(ctypes.Structure):
    _fields_ = [("B", ctypes.c_int32), ("nblk", ctypes.c_int32), ("n_out", ctypes.c_int32),
                ("spin_us", ctypes.c_int32), ("tokens", ctypes.c_void_p), ("pos", ctypes.c_void_p),
                ("slots", ctypes.c_void_p), ("tables", ctypes.c_void_p), ("out_rows", ctypes.c_void_p),
                ("prof", ctypes.c_void_p)]


# Step.prof's columns: seconds a thread spent in each phase of agp_decode_step (kernels.cpp Phase)
PHASES = ("glue", "qkv", "attention", "o", "gate_up", "down", "head", "barrier")


def _declare(lib) -> None:
    P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.agp_linear.argtypes = [P, P, I, P, I]
    lib.agp_linear.restype = None
    lib.agp_paged_attention.argtypes = [P, I, I, P, L, I, P, I, P, P, I]
    lib.agp_paged_attention.restype = None
    lib.agp_phases.restype = I
    if lib.agp_phases() != len(PHASES):
        raise RuntimeError("phase table mismatch")
    lib.agp_read_bytes.argtypes = [P, L, I]
    lib.agp_read_bytes.restype = L
    lib.agp_decode_step.argtypes = [P, P, P, I]
    lib.agp_decode_step.restype = None
    lib.agp_add_rmsnorm.argtypes = [P, P, P, P, I, I, ctypes.c_float, I, I]
    lib.agp_add_rmsnorm.restype = None
    lib.agp_silu_mul.argtypes = [P, P, I, I, I, I]
    lib.agp_silu_mul.restype = None
    lib.agp_decode_attention_block.argtypes = [P, I, I, P, I, P, P, P, I, P, I]
    lib.agp_decode_attention_block.restype = None
    lib.agp_barrier_check.argtypes = [I, I, I, I, P]
    lib.agp_barrier_check.restype = I

