"""Specs: `FORMAT:PRECISION[?key=value&...]`, one parser and one table of precisions.

Each backend declares its precisions and options next to its implementation (see
`edgequant.backend`); this module only knows how to read a spec string and check it against what
the named format declared. It does not know which formats exist: the registry
(`edgequant.registry.parse_spec`) hands it the catalog of registered backends.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterable, Mapping, Protocol

from edgequant.errors import EdgequantError


class PrecisionClass(str, Enum):
    ULTRA_LOW = "ultra-low"  # 1-2 bit
    LOW = "low"  # 3-4 bit
    MEDIUM = "medium"  # 5-8 bit
    FLOAT = "float"  # 16/32 bit

    @classmethod
    def for_bits(cls, bits: float) -> "PrecisionClass":
        if bits >= 16:
            return cls.FLOAT
        if bits >= 5:
            return cls.MEDIUM
        if bits >= 3:
            return cls.LOW
        return cls.ULTRA_LOW


@dataclass(frozen=True)
class Precision:
    """One precision a backend offers.

    `bits` is the nominal width class users know the type by (4 for Q4_K_M); `bpw` is the bits per
    weight it really stores, scales included, used for size estimates.
    """

    name: str
    bits: int
    bpw: float
    description: str
    needs_imatrix: bool = False

    @property
    def klass(self) -> PrecisionClass:
        return PrecisionClass.for_bits(self.bits)


@dataclass(frozen=True)
class Option:
    """One `?key=value` option: its type, allowed values and default.

    A default that depends on the precision is declared in `by_precision` (e.g. a block size of
    32 for one precision and per-channel for another): `default_for` is the value a precision
    really uses when the spec names none, so "the user gave this value" and "the user gave
    nothing" mean the same thing exactly when they build the same artifact."""

    name: str
    kind: type  # int, float, bool or str
    default: Any
    help: str
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    applies_to: tuple[str, ...] = ()  # the precisions it means something for; () = every one
    by_precision: Mapping[str, Any] = field(default_factory=dict)  # precision -> its own default

    def applies(self, precision: str) -> bool:
        return not self.applies_to or precision in self.applies_to

    def default_for(self, precision: str) -> Any:
        return self.by_precision.get(precision, self.default)

    def parse(self, raw: str, spec_text: str) -> Any:
        value = self._coerce(raw, spec_text)
        if self.choices and value not in self.choices:
            self._reject(raw, spec_text)
        if self.minimum is not None and value < self.minimum:
            self._reject(raw, spec_text)
        if self.maximum is not None and value > self.maximum:
            self._reject(raw, spec_text)
        return value

    def allowed(self) -> str:
        if self.choices:
            return "|".join(str(c) for c in self.choices)
        if self.kind is bool:
            return "0|1"
        if self.minimum is not None or self.maximum is not None:
            return f"{self.minimum}..{self.maximum}"
        return self.kind.__name__

    def _coerce(self, raw: str, spec_text: str) -> Any:
        try:
            if self.kind is bool:
                if raw not in ("0", "1", "true", "false"):
                    raise ValueError(raw)
                return raw in ("1", "true")
            return self.kind(raw)
        except ValueError:
            self._reject(raw, spec_text)

    def _reject(self, raw: str, spec_text: str):
        raise EdgequantError(
            f"option {self.name}={raw!r} in spec {spec_text!r} is out of range",
            f"use {self.name}={self.allowed()} ({self.help})",
        )


@dataclass(frozen=True)
class Spec:
    format: str
    precision: str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        text = f"{self.format}:{self.precision}"
        if self.options:
            text += "?" + "&".join(f"{k}={_format_value(v)}" for k, v in sorted(self.options.items()))
        return text

    @property
    def slug(self) -> str:
        """A file-name-safe form, used for default artifact folder names: characters a file name
        should not hold become `_`, and a long one (a regex, a path) is cut and told apart by a hash."""
        text = str(self)
        slug = re.sub(r"[^A-Za-z0-9._-]", "_", text.replace(":", "-").replace("?", "-").replace("&", "-").replace("=", ""))
        if len(slug) > 80:
            slug = f"{slug[:64]}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
        return slug

    def to_json(self) -> dict:
        return {"format": self.format, "precision": self.precision, "options": dict(self.options)}

    def with_options(self, **changes: Any) -> "Spec":
        return Spec(self.format, self.precision, {**self.options, **changes})


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


class SpecTarget(Protocol):
    """What a spec is checked against: a format's precisions, options and cross-option rules."""

    precisions: Mapping[str, Precision]
    options: Mapping[str, Option]

    def validate(self, spec: "Spec") -> None: ...


def parse_spec(text: str, formats: Mapping[str, SpecTarget]) -> Spec:
    """Parse `text` and check it against `formats`; errors list the valid formats, precisions or
    options. An option given where it does not apply is refused here, the same way for every format.

    The format's cross-option rules see the options as the user wrote them; the spec returned then
    drops each value equal to the default its precision would use, so equal specs print (and
    cache) alike."""
    text = text.strip()
    query = text.partition("?")[2]
    fmt, precision = format_and_precision(text)
    known = ", ".join(sorted(formats))
    if ":" not in text.partition("?")[0] or not fmt or not precision:
        raise EdgequantError(f"spec {text!r} is not of the form FORMAT:PRECISION[?key=value&...]",
                             f"write e.g. FORMAT:PRECISION with FORMAT one of: {known}")
    target = formats.get(fmt)
    if target is None:
        raise EdgequantError(f"unknown format {fmt!r} in spec {text!r}", f"use one of: {known}")
    if precision not in target.precisions:
        raise EdgequantError(f"unknown precision {precision!r} for format {fmt!r}", f"use one of: {', '.join(target.precisions)}")
    given = {}
    for key, raw in _query_items(query):
        if key in given:
            raise EdgequantError(f"option {key!r} is given twice in spec {text!r}", "keep one of them")
        given[key] = _applicable_option(target, fmt, precision, key, text).parse(raw, text)
    target.validate(Spec(fmt, precision, given))
    return Spec(fmt, precision, {k: v for k, v in given.items() if v != target.options[k].default_for(precision)})


def format_and_precision(text: str) -> tuple[str, str]:
    """The format and precision a spec string names, lower-cased, not checked against any format:
    how result rows (which may name a format no longer installed) are read back."""
    fmt, _, precision = text.partition("?")[0].partition(":")
    return fmt.strip().lower(), precision.strip().lower()


def _query_items(query: str) -> list[tuple[str, str]]:
    """`a=1&b=2` as pairs, split at `&` and at each item's first `=`. Values are taken as typed,
    not URL-decoded: a per-tensor regex keeps its `+` and its `\\`."""
    return [(key.strip(), raw.strip()) for key, _, raw in (item.partition("=") for item in query.split("&")) if key.strip()]


def _applicable_option(target: SpecTarget, fmt: str, precision: str, key: str, text: str) -> Option:
    option = target.options.get(key)
    if option is None:
        valid = ", ".join(f"{o.name}={o.allowed()}" for o in target.options.values()) or "none"
        raise EdgequantError(f"unknown option {key!r} for format {fmt!r} in spec {text!r}", f"valid options: {valid}")
    if not option.applies(precision):
        usable = ", ".join(o.name for o in target.options.values() if o.applies(precision)) or "none"
        raise EdgequantError(f"option {key!r} does not apply to {fmt}:{precision} (only to {', '.join(option.applies_to)})",
                             f"drop it; options of {fmt}:{precision}: {usable}")
    return option


def parse_specs(specs: "str | Spec | Iterable[str | Spec]", formats: Mapping[str, SpecTarget]) -> list[Spec]:
    """The one reader of spec lists (CLI `--to`, recipes, the Python API): a comma-separated
    string, or any iterable of such strings and `Spec`s, validated entry by entry before any work
    starts. A comma starts a new spec only where a format name and a colon follow it, so an option
    value may hold commas of its own (`gguf:q4_k_m?tensor=ffn_down:q6_k,attn_v:q6_k,onnx:int4` is
    two specs)."""
    if isinstance(specs, Spec):
        return [specs]
    if not isinstance(specs, str):
        return [found for item in specs for found in parse_specs(item, formats)]
    names = "|".join(re.escape(name) for name in sorted(formats, key=len, reverse=True))
    parts = re.split(rf",(?=\s*(?:{names}):)", specs, flags=re.IGNORECASE) if names else specs.split(",")
    return [parse_spec(part, formats) for part in parts if part.strip()]
