"""A fast BLAS for mlx[cpu] on Linux.

mlx's Linux wheels multiply float matrices through the reference (netlib) BLAS they bundle: a
512x576 by 576x1536 product took 0.33 s here against 0.005 s in numpy, so scoring one 512-token
window of the default model took ~79 s. This module compiles a one-function
library, once per numpy build (cached under the tool folder), whose `cblas_sgemm` hands the call to
the OpenBLAS that numpy ships, and loads it into the global symbols before mlx's library is loaded
(mlx binds `cblas_sgemm` when it loads: a library loaded after it is never asked, measured). Since
mlx-lm, transformers or our own modules may be the first to import mlx, `install_import_hook`
(run when this package is imported) does it at the first import of `mlx.core`, whoever makes it.
mlx still runs its own graph, kernels and dequantization; only the library behind its float
products changes, as it does on macOS, where mlx calls Accelerate.

Where no C compiler or no numpy OpenBLAS is found, mlx keeps its own BLAS (slow, same figures).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from edgequant import children

_OPENBLAS_GEMM = "scipy_cblas_sgemm64_"  # numpy's OpenBLAS: symbols prefixed, 64-bit integers

# cblas_sgemm with the standard 32-bit interface, forwarded to numpy's 64-bit-integer OpenBLAS.
_SOURCE = """\
#include <stdint.h>
extern void %(target)s(int order, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
    const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);
void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
    %(target)s(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
"""


class _BeforeMlx:
    """An import finder that routes mlx's products before `mlx.core` is first loaded, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name == "mlx.core":
            sys.meta_path.remove(self)
            use_openblas()
        return None  # the usual finders import it


def install_import_hook() -> None:
    if sys.platform == "linux" and "mlx.core" not in sys.modules and not any(isinstance(f, _BeforeMlx) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeMlx())


@lru_cache(maxsize=1)
def use_openblas() -> str | None:
    """Route mlx's float matrix products to numpy's OpenBLAS; the library used, or None where mlx
    keeps its own (another platform, no compiler, no numpy OpenBLAS, or mlx already loaded)."""
    if sys.platform != "linux" or os.environ.get("EDGEQUANT_MLX_BLAS") == "0" or "mlx.core" in sys.modules:
        return None
    openblas = _numpy_openblas()
    if openblas is None:
        return None
    try:
        shim = _built_shim(openblas)
        ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    except (OSError, subprocess.SubprocessError):
        return None
    return openblas.name


def _numpy_openblas() -> Path | None:
    """The OpenBLAS library of numpy's wheel, if it has one with the product we forward to."""
    import numpy

    libs = Path(numpy.__file__).parent.parent / "numpy.libs"
    for path in sorted(libs.glob("libscipy_openblas64_*.so")):
        try:
            getattr(ctypes.CDLL(str(path)), _OPENBLAS_GEMM)
        except (OSError, AttributeError):
            continue
        return path
    return None


def _built_shim(openblas: Path) -> Path:
    """The compiled forwarding library for `openblas`, built on first use."""
    from edgequant.atomic import temp_sibling
    from edgequant.paths import cache_dir

    source = _SOURCE % {"target": _OPENBLAS_GEMM}
    key = hashlib.sha256(f"{source}{openblas}".encode()).hexdigest()[:16]
    shim = cache_dir("tools") / f"mlx-cblas-{key}.so"
    if shim.exists():
        return shim
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler")
    work = temp_sibling(shim)
    c_file = work.with_name(work.name + ".c")
    c_file.write_text(source)
    try:
        children.run([compiler, "-O2", "-shared", "-fPIC", str(c_file), "-o", str(work), f"-L{openblas.parent}",
                        f"-l:{openblas.name}", f"-Wl,-rpath,{openblas.parent}"],
                       check=True, capture_output=True, timeout=120)
        os.replace(work, shim)  # another process may have built it meanwhile: either copy works
    finally:
        c_file.unlink(missing_ok=True)
        work.unlink(missing_ok=True)
    return shim
