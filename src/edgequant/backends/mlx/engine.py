"""The MLX engine: importing it with a clear error, and where its speed means something."""

from __future__ import annotations

import platform

from edgequant.errors import EdgequantError

INSTALL_HINT = "pip install 'edgequant[mlx]' (on Linux it installs mlx[cpu] and mlx-lm 0.29.1)"


def require_mlx():
    """The mlx modules, or an error naming the extra that installs them."""
    try:
        import mlx.core as mx
        import mlx_lm
    except ImportError as exc:
        raise EdgequantError(f"the MLX engine is not installed ({getattr(exc, 'name', None) or exc} is missing)",
                             INSTALL_HINT) from None
    return mx, mlx_lm


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"
