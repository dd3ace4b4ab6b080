"""The hand-written CPU decode kernel (``csrc/decode_attend.cpp``): built once on first use, then loaded.

The kernel attends a decode step's queries straight from the packed codes, scales and zeros (every layout the
quantizers write: 8, 4, 3 and 2 bits, per-token or per-channel groups), then the full-precision tokens, in tiles of
64 tokens with an online softmax in fp32; one task per (batch row, KV head) through ``at::parallel_for``. It is
portable C++ that the compiler vectorises for the ISA it is built for, so it is built on the machine that runs it:

* ``KVCACHE_PLUGINS_CPU_ISA`` picks the build: ``native`` (default: ``-march=native``, AVX-512 where the CPU has it,
  NEON on arm64), ``avx2`` (``-mavx2 -mfma -mf16c``: what an AVX2-only x86 machine runs, measurable on a wider one;
  pair it with ``ATEN_CPU_CAPABILITY=avx2`` for torch's own kernels) or ``generic`` (the compiler's baseline ISA).
* Nothing beyond a C++ compiler is needed (the one inductor uses: ``$CXX``, else ``c++``): the shared library is
  compiled with one compiler call into the torch extensions directory (``TORCH_EXTENSIONS_DIR``, default
  ``~/.cache/torch_extensions``) under a name that hashes the source, the flags and the torch version, so a
  later process only loads it. Where it cannot be built (no compiler, a failing build), :func:`load` warns once and
  returns ``None``; callers then take the fastest path that runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "decode_attend.cpp"
ISAS = ("native", "avx2", "generic")
#: set ``KVCACHE_PLUGINS_CPU_KERNEL=0`` to never build or use the C++ kernel
ENABLED = os.environ.get("KVCACHE_PLUGINS_CPU_KERNEL", "1") != "0"

_state: dict[str, object] = {}  # isa -> the loaded op, or the reason it is unavailable (str)


def requested_isa() -> str:
    """The build :envvar:`KVCACHE_PLUGINS_CPU_ISA` asks for (``ValueError`` naming the choices otherwise)."""
    isa = os.environ.get("KVCACHE_PLUGINS_CPU_ISA", "native").strip().lower() or "native"
    if isa not in ISAS:
        raise ValueError(f"KVCACHE_PLUGINS_CPU_ISA={isa!r}: choose one of {ISAS}")
    return isa


def isa_flags(isa: str) -> list[str]:
    """Compiler flags of a build. ``native`` on x86 with AVX-512 also asks for 512-bit vectors (compilers default
    to 256 on several AVX-512 targets)."""
    arm = platform.machine().lower() in ("aarch64", "arm64")
    if isa == "avx2":
        if arm:
            raise ValueError("KVCACHE_PLUGINS_CPU_ISA=avx2 is an x86 build; this machine is arm64")
        return ["-mavx2", "-mfma", "-mf16c", "-mno-avx512f"]
    if isa == "generic":
        return []
    if arm:
        return ["-mcpu=native"]
    flags = ["-march=native"]
    if torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512"):
        flags.append("-mprefer-vector-width=512")
    return flags


def _namespace(isa: str) -> str:
    return f"kvcache_plugins_{isa}"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _build(isa: str) -> Path:
    """Compile the kernel for ``isa`` (or find it built) and return the shared library's path."""
    from torch.utils import cpp_extension

    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found ($CXX, c++, g++, clang++)")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-std=c++17", "-fPIC", "-shared", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
             f"-DKVP_NAMESPACE={_namespace(isa)}", *isa_flags(isa)]
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cxx, *flags, torch.__version__, sys.version]).encode()).hexdigest()[:16]
    root = Path(cpp_extension.get_default_build_root()) / "kvcache_plugins"
    target = root / f"decode_attend_{isa}_{key}.so"
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [arg for p in cpp_extension.library_paths() for arg in (f"-L{p}", f"-Wl,-rpath,{p}")]
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        built = Path(tmp) / target.name
        cmd = [cxx, *flags, *includes, str(SOURCE), "-o", str(built), *libs, "-lc10", "-ltorch_cpu", "-ltorch"]
        logger.info("kvcache_plugins: building the CPU decode kernel (%s): %s", isa, " ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(cxx).name} failed: {(done.stderr or done.stdout).strip()[-600:]}")
        os.replace(built, target)  # atomic: concurrent builders leave one complete file
    return target


def load(isa: str | None = None):
    """The kernel op ``torch.ops.kvcache_plugins_<isa>.decode_attend`` built for ``isa`` (default
    :func:`requested_isa`), or ``None`` after one ``RuntimeWarning`` when it cannot be built here."""
    if not ENABLED:
        return None
    isa = isa or requested_isa()
    if isa not in _state:
        try:
            torch.ops.load_library(str(_build(isa)))
            _state[isa] = getattr(torch.ops, _namespace(isa)).decode_attend
        except Exception as exc:  # noqa: BLE001 - no compiler, a failed build: the other paths still run
            _state[isa] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            warnings.warn(
                f"kvcache_plugins: the C++ decode kernel ({isa}) could not be built, so quantized caches decode "
                f"through the fastest other path. Reason: {_state[isa]}",
                RuntimeWarning,
                stacklevel=2,
            )
    op = _state[isa]
    return None if isinstance(op, str) else op


def unavailable(isa: str | None = None) -> str | None:
    """Why the kernel for ``isa`` is unavailable (``None`` if it loaded or was not tried yet)."""
    op = _state.get(isa or requested_isa())
    return op if isinstance(op, str) else None
