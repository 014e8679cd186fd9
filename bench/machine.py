"""The machine a benchmark ran on: CPU model, cores, memory, OS and library versions (no imports of them)."""
from __future__ import annotations

import os
import platform
from importlib import metadata

PACKAGES = ("onnxruntime", "torch", "transformers", "numpy", "tokenizers")
# The vector/matrix extensions that decide which kernels ONNX Runtime, PyTorch and llama.cpp run (bf16 and int8
# speed differ several-fold between hosts with and without them)
ISA_FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8",
             "amx_bf16")


def _cpuinfo() -> tuple[str, int | None, list]:
    """(CPU model name, physical cores, which of ISA_FLAGS it has) from /proc/cpuinfo."""
    model, cores, flags = platform.processor() or platform.machine(), set(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            block = {}
            for line in f.read().splitlines() + [""]:
                if not line.strip():
                    if "core id" in block:
                        cores.add((block.get("physical id"), block["core id"]))
                    block = {}
                    continue
                key, _, value = line.partition(":")
                block[key.strip()] = value.strip()
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags.update(value.split())
    except OSError:
        pass
    return model, len(cores) or None, [flag for flag in ISA_FLAGS if flag in flags]


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return None


def describe() -> dict:
    """A JSON-able description of this machine and the package versions installed."""
    model, physical, isa = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu": model, "physical_cores": physical, "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "isa": isa, "ram_gb": _mem_total_gb(), "os": platform.platform(), "versions": versions}


def markdown(machine: dict) -> str:
    """The machine as a few markdown lines (printed above the results table)."""
    v = machine["versions"]
    return "\n".join([
        f"- CPU: {machine['cpu']} ({machine['physical_cores']} physical cores, {machine['logical_cpus']} logical, "
        f"{machine['usable_cpus']} usable)",
        f"- ISA: {', '.join(machine['isa']) if machine.get('isa') else 'none of ' + '/'.join(ISA_FLAGS)}",
        f"- RAM: {machine['ram_gb']} GB; OS: {machine['os']}",
        "- versions: " + ", ".join(f"{k} {v[k]}" for k in ("onnxruntime", "torch", "transformers", "numpy",
                                                            "python") if v.get(k)),
    ])
