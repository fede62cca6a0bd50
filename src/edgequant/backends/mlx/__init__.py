"""MLX through mlx-lm (mlx[cpu] off Apple silicon)."""
