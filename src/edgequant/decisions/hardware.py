"""This machine, and the hardware profile closest to it.

Profiles are data (`data/hardware_profiles.toml`). Detection reads what the operating system
exposes without importing an engine: the CPU's vendor, model and instruction-set flags
(/proc/cpuinfo on Linux, sysctl on macOS), cores, memory, and accelerators visible as devices
(an NVIDIA driver, Intel GPU and NPU devices in sysfs, Qualcomm's FastRPC nodes). Each profile
lists what it must see; the matching profile of highest priority is the closest one, and the
facts that matched are kept as the evidence.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import tomllib
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

from edgequant.errors import EdgequantError

PROFILES_FILE = Path(__file__).resolve().parents[1] / "data" / "hardware_profiles.toml"
# Instruction-set flags worth naming: they decide which kernels an engine uses.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
             "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "asimdhp", "i8mm", "sve", "bf16")
_ARM_IMPLEMENTERS = {"0x41": "ARM", "0x51": "Qualcomm", "0x61": "Apple", "0x48": "HiSilicon", "0x46": "Fujitsu"}


NO_VNNI = "avx2, no vnni: u8s8 int8 kernels may saturate"


def int8_dot_product(flags: set[str]) -> str | None:
    """How an x86 CPU multiplies int8 (None off x86): with VNNI the u8 x s8 products are summed
    exactly in 32 bits; without it, onnxruntime's u8s8 kernels (and OpenVINO's) sum pairs of products
    in 16 bits first, which saturates on large activations and weights. On a 2-core AMD EPYC without
    VNNI the default model's onnx:int8 lost 6.4% perplexity (under 3% on the machines the tests ran
    on before); with uint8 weights (`?weights=u8`, u8 x u8 kernels, no pairing) 3.5% (2026-12-05,
    4 windows of 512)."""
    if "avx2" not in flags:
        return None
    return "vnni" if {"avx512_vnni", "avx_vnni"} & flags else NO_VNNI


@dataclass(frozen=True)
class Profile:
    name: str
    title: str
    formats: tuple[str, ...]
    accelerates: tuple[str, ...]
    precisions: tuple[str, ...]
    memory: str
    speed: str  # "measured" or "stand-in"
    notes: str
    match: dict


@dataclass
class Machine:
    os: str
    machine: str
    cpu_vendor: str
    cpu_model: str
    cores: int
    ram_gb: float
    isa: list[str] = field(default_factory=list)
    devices: dict[str, list[str]] = field(default_factory=dict)  # kind -> what was seen

    def to_json(self) -> dict:
        return asdict(self)


@cache
def profiles() -> dict[str, Profile]:
    """Every profile in the data file, by name."""
    raw = tomllib.loads(PROFILES_FILE.read_text())
    return {name: Profile(name, p["title"], tuple(p["formats"]), tuple(p["accelerates"]), tuple(p["precisions"]),
                          p["memory"], p["speed"], p["notes"], dict(p.get("match", {})))
            for name, p in raw.items()}


def get_profile(name: str) -> Profile:
    found = profiles().get(name)
    if found is None:
        raise EdgequantError(f"unknown hardware profile {name!r}", f"use one of: {', '.join(profiles())}")
    return found


def detect() -> Machine:
    """This machine's facts, read without importing any engine."""
    import psutil

    vendor, model, flags = read_cpu()
    return Machine(os=platform.system(), machine=platform.machine().lower(), cpu_vendor=vendor, cpu_model=model,
                   cores=os.cpu_count() or 1, ram_gb=round(psutil.virtual_memory().total / 2**30, 1),
                   isa=[f for f in ISA_FLAGS if f in flags], devices=_devices())


def closest(machine: Machine) -> tuple[Profile, list[dict]]:
    """The matching profile of highest priority, and every profile's verdict with its evidence."""
    verdicts = []
    for profile in profiles().values():
        matched, missed = _match(profile.match, machine)
        verdicts.append({"profile": profile.name, "matches": not missed, "priority": profile.match.get("priority", 0),
                         "evidence": matched, "missing": missed})
    verdicts.sort(key=lambda v: (not v["matches"], -v["priority"]))
    if not verdicts[0]["matches"]:
        raise EdgequantError(f"no hardware profile matches this machine ({machine.os} {machine.machine})",
                             "pass --target PROFILE; profiles: " + ", ".join(profiles()))
    return profiles()[verdicts[0]["profile"]], verdicts


def runs_here(profile: Profile, machine: Machine) -> bool:
    """Whether this machine is of the profile's kind, so its speed and memory figures are the target's."""
    return not _match(profile.match, machine)[1]


def _match(rules: dict, machine: Machine) -> tuple[list[str], list[str]]:
    """The facts a profile's rules matched, and the rules it missed."""
    matched, missed = [], []
    for key in ("os", "machine", "cpu_vendor"):
        if key in rules:
            value = getattr(machine, key)
            hit = value.lower() in (w.lower() for w in rules[key])
            (matched if hit else missed).append(f"{key} {value!r} {'is' if hit else 'is not'} one of {', '.join(rules[key])}")
    for kind in rules.get("devices", []):
        seen = machine.devices.get(kind)
        (matched if seen else missed).append(f"{kind}: {', '.join(seen)}" if seen else f"no {kind} visible")
    for flag in rules.get("isa", []):
        (matched if flag in machine.isa else missed).append(f"ISA {flag} {'present' if flag in machine.isa else 'absent'}")
    return matched, missed


def read_cpu() -> tuple[str, str, set[str]]:
    """(vendor, model name, instruction-set flags)."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        text = info.read_text(errors="replace")
        def field_of(key):
            return next(iter(re.findall(rf"^{key}\s*:\s*(.+)$", text, re.M)), "").strip()
        flags = set((field_of("flags") or field_of("Features")).split())
        vendor = field_of("vendor_id") or _ARM_IMPLEMENTERS.get(field_of("CPU implementer").lower(), field_of("CPU implementer"))
        model = field_of("model name") or field_of("Hardware") or field_of("Model") or platform.processor()
        return vendor or "unknown", model or "unknown", flags
    if platform.system() == "Darwin":
        brand = _sysctl("machdep.cpu.brand_string")
        features = {f.lower() for f in _sysctl("machdep.cpu.features").split()}
        if platform.machine() == "arm64":
            features |= {"asimd"} | ({"asimddp"} if _sysctl("hw.optional.arm.FEAT_DotProd") == "1" else set())
            features |= {"i8mm"} if _sysctl("hw.optional.arm.FEAT_I8MM") == "1" else set()
        return ("Apple" if "Apple" in brand else brand.split()[0] if brand else "unknown"), brand or "unknown", features
    return "unknown", platform.processor() or "unknown", set()


def _sysctl(key: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _devices() -> dict[str, list[str]]:
    """Accelerators visible to this process, by kind."""
    found: dict[str, list[str]] = {}
    nvidia = sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")) if Path("/proc/driver/nvidia/gpus").is_dir() else []
    names = [next(iter(re.findall(r"^Model:\s*(.+)$", p.read_text(errors="replace"), re.M)), "NVIDIA GPU").strip() for p in nvidia]
    if not names and shutil.which("nvidia-smi"):
        names = ["nvidia-smi on PATH"]
    if names:
        found["nvidia-gpu"] = names
    for node in sorted(Path("/sys/class/drm").glob("renderD*")) if Path("/sys/class/drm").is_dir() else []:
        if _sysfs(node / "device" / "vendor") == "0x8086":
            found.setdefault("intel-gpu", []).append(f"{node.name} (driver {_driver(node)})")
    for node in sorted(Path("/sys/class/accel").glob("accel*")) if Path("/sys/class/accel").is_dir() else []:
        vendor, driver = _sysfs(node / "device" / "vendor"), _driver(node)
        if vendor == "0x8086" or driver == "intel_vpu":
            found.setdefault("intel-npu", []).append(f"{node.name} (driver {driver})")
        elif "qcom" in driver or vendor == "0x17cb":
            found.setdefault("qualcomm-npu", []).append(f"{node.name} (driver {driver})")
    fastrpc = sorted(str(p) for p in Path("/dev").glob("fastrpc-*dsp*"))
    if fastrpc:
        found.setdefault("qualcomm-npu", []).extend(fastrpc)
    return found


def _sysfs(path: Path) -> str:
    try:
        return path.read_text().strip().lower()
    except OSError:
        return ""


def _driver(node: Path) -> str:
    link = node / "device" / "driver"
    return link.resolve().name if link.exists() else "unknown"
