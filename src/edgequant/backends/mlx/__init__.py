"""The MLX backend. Importing it arranges for mlx to multiply through a fast BLAS on Linux (blas.py)."""

from edgequant.backends.mlx.blas import install_import_hook

install_import_hook()
