"""What an evaluation is asked to do, declared once: the CLI's defaults, bench's, optimize's and
the Python API's all come from here (a light module, so `--help` loads no engine)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgequant.errors import EdgequantError


@dataclass(frozen=True)
class EvalConfig:
    ctx: int = 512  # tokens per window
    windows: int = 8  # number of windows scored
    data: Path | None = None  # None: the default Wikipedia prose
    speed: bool = True
    prompt_tokens: int = 128
    gen_tokens: int = 64
    repeats: int = 3
    threads: int = 0  # 0: all cores

    def __post_init__(self):
        for name in ("ctx", "windows", "prompt_tokens", "gen_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise EdgequantError(f"eval setting {name}={getattr(self, name)} must be at least 1",
                                     f"pass a positive --{name.replace('_', '-')}")
        if self.ctx < 16:
            raise EdgequantError(f"eval context {self.ctx} is too short to score", "use --ctx 16 or more (512 is the default)")


# What bench and optimize score per candidate unless told otherwise: 4 windows, half of `eval`'s
# 8, since they evaluate many candidates.
DEFAULT_EVAL = EvalConfig(windows=4)
