"""What `serve` is asked to do, declared once (the CLI reads its defaults here without loading the
web framework or any engine)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServeConfig:
    models: tuple[Path | None, ...]  # artifact folders or source models; None is the default model
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    n_ctx: int = 2048
    max_queue: int = 64  # waiting requests per model beyond the running one
    max_tokens_cap: int = 1024
    max_body_bytes: int = 1_000_000
    request_timeout_s: float = 300.0
    threads: int = 0
    batch: int = 4  # requests in flight together through the engine's batch decoder; 1 = one at a time
    cache_tokens: int = 0  # tokens the batch's cache holds in all (prompt plus budget of every running request); 0: batch x ctx
    names: tuple[str | None, ...] = ()  # the name each model is served as (a request's "model"); None: its folder's

    def served_names(self) -> list[str]:
        """Each model's name in requests: the one given, else its folder's, or "default"."""
        given = self.names or (None,) * len(self.models)
        return [name or ("default" if path is None else Path(path).resolve().name) for name, path in zip(given, self.models)]
