"""A throw-away memory cgroup for one bench worker (Linux; cgroup v1 `memory` or v2 with the memory controller).

`probe()` finds where a child group can be made, or says why not (`CgroupUnavailable`); `MemoryGroup` is
one such child: a memory limit, the process start wrapper that puts a worker in it before exec, its peak
usage and OOM-kill count, and removal. The parsing helpers are pure so tests can feed them text.
"""
from __future__ import annotations

import os
import time

from vlm_core.runtime.engine.memory_hints import drop_unmapped_pages

V1_LIMIT, V1_SWAP, V1_PEAK = "memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.max_usage_in_bytes"
V2_LIMIT, V2_SWAP, V2_PEAK = "memory.max", "memory.swap.max", "memory.peak"


class CgroupUnavailable(RuntimeError):
    """No memory cgroup can be made here; the message says why (shown as the skip reason)."""


def _read(path: str, default: str = "") -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return default


def _write(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def swap_devices(text: str | None = None) -> list:
    """Active swap devices/files from /proc/swaps (`text` for tests): [] means no swap, so a cgroup at its
    limit reclaims page cache and then OOM-kills rather than swapping anonymous memory out."""
    text = _read("/proc/swaps") if text is None else text
    return [line.split()[0] for line in text.splitlines()[1:] if line.strip()]


def memory_hierarchy(mounts: str, self_cgroup: str) -> tuple | None:
    """(version, mount point, this process's group path inside it) for the memory controller, from the text of
    /proc/self/mounts and /proc/self/cgroup; None when no hierarchy has it. v1 (a `cgroup` mount with the
    `memory` option) is preferred: on hybrid hosts the v2 mount usually lacks the memory controller."""
    paths = {}  # controller ("" for v2) -> path, from lines "ID:controllers:/path"
    for line in self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    v2 = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point, fstype, options = fields[1], fields[2], fields[3].split(",")
        if fstype == "cgroup" and "memory" in options:
            return 1, point, paths.get("memory", "/")
        if fstype == "cgroup2" and v2 is None:
            controllers = _read(os.path.join(point, "cgroup.controllers")).split()
            if "memory" in controllers:
                v2 = (2, point, paths.get("", "/"))
    return v2


def skip_reason(euid: int, hierarchy: tuple | None, platform: str) -> str | None:
    """Why a memory cgroup cannot be made before trying (None: worth trying). Pure, for tests."""
    if platform != "linux":
        return f"memory cgroups are Linux-only (this is {platform})"
    if hierarchy is None:
        return "no cgroup hierarchy with the memory controller is mounted (checked /proc/self/mounts)"
    if euid != 0:
        return (f"not root (euid {euid}): making a cgroup under {hierarchy[1]} needs root "
                f"(or a delegated, writable cgroup)")
    return None


def _candidates(version: int, mount: str, own: str) -> list:
    """Parent folders to try, most specific first: under this process's own group (so the limits the host
    put on us still apply), then the hierarchy's root (v2's root is exempt from the no-internal-processes
    rule, which forbids enabling the memory controller below a group that holds processes)."""
    own_dir = os.path.join(mount, own.lstrip("/"))
    return [own_dir, mount] if version == 1 and os.path.normpath(own_dir) != os.path.normpath(mount) else [mount]


def probe(prefix: str = "vlm-bench") -> tuple:
    """(version, parent folder) where a child memory group can be made: tried by making and removing one.
    Raises CgroupUnavailable with the reason (platform, no hierarchy, not root, or the OS error)."""
    import sys

    hierarchy = memory_hierarchy(_read("/proc/self/mounts"), _read("/proc/self/cgroup"))
    euid = os.geteuid() if hasattr(os, "geteuid") else -1
    reason = skip_reason(euid, hierarchy, sys.platform)
    # A non-root user with a delegated writable group is still worth a try.
    if reason and not (reason.startswith("not root") and hierarchy):
        raise CgroupUnavailable(reason)
    version, mount, own = hierarchy
    errors = []
    for parent in _candidates(version, mount, own):
        if version == 2 and "memory" not in _read(os.path.join(parent, "cgroup.subtree_control")).split():
            try:
                _write(os.path.join(parent, "cgroup.subtree_control"), "+memory")
            except OSError as e:
                errors.append(f"enabling memory in {parent}/cgroup.subtree_control: {e}")
                continue
        test = os.path.join(parent, f"{prefix}-probe-{os.getpid()}")
        try:
            os.mkdir(test)
            limit = os.path.join(test, V1_LIMIT if version == 1 else V2_LIMIT)
            if not os.path.exists(limit):
                raise OSError(f"{limit} missing")
            os.rmdir(test)
            return version, parent
        except OSError as e:
            errors.append(f"mkdir {test}: {e}")
            try:
                os.rmdir(test)
            except OSError:
                pass
    raise CgroupUnavailable(reason or ("cannot make a memory cgroup: " + "; ".join(errors)))


class MemoryGroup:
    """One child memory cgroup: made on construction, `remove()`d after its worker exits."""

    def __init__(self, version: int, parent: str, name: str, limit_bytes: int | None, no_swap: bool = False):
        self.version, self.path = version, os.path.join(parent, name)
        os.mkdir(self.path)
        try:
            if limit_bytes is not None:
                self._set_limit(limit_bytes, no_swap)
        except OSError:
            self.remove()
            raise

    def _set_limit(self, limit: int, no_swap: bool) -> None:
        if self.version == 1:
            # memsw (memory + swap) must stay >= the memory limit, so it is written second.
            _write(os.path.join(self.path, V1_LIMIT), str(limit))
            swap = os.path.join(self.path, V1_SWAP)
            if no_swap and os.path.exists(swap):
                _write(swap, str(limit))
        else:
            _write(os.path.join(self.path, V2_LIMIT), str(limit))
            swap = os.path.join(self.path, V2_SWAP)
            if no_swap and os.path.exists(swap):
                _write(swap, "0")

    def wrap(self, argv: list) -> list:
        """argv run inside this group: a shell writes its own pid into cgroup.procs, then execs argv, so the
        worker is in the group from its first allocation (and its exit status is argv's own)."""
        procs = os.path.join(self.path, "cgroup.procs")
        return ["sh", "-c", 'echo $$ > "$1" || exit 125; shift; exec "$@"', "sh", procs] + list(argv)

    def limit_bytes(self) -> int | None:
        """The limit in force (None: unlimited)."""
        text = _read(os.path.join(self.path, V1_LIMIT if self.version == 1 else V2_LIMIT)).strip()
        if not text or text == "max" or int(text) >= 1 << 62:
            return None
        return int(text)

    def peak_bytes(self) -> int | None:
        """The group's peak charge (anonymous memory + page cache + kernel memory), None where not reported
        (memory.peak needs Linux 5.19 on v2)."""
        text = _read(os.path.join(self.path, V1_PEAK if self.version == 1 else V2_PEAK)).strip()
        return int(text) if text.isdigit() else None

    def oom_kills(self) -> int:
        """OOM kills inside the group (v1: memory.oom_control's oom_kill, Linux 4.13+; v2: memory.events)."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        for line in _read(os.path.join(self.path, name)).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        """rmdir the group (its page-cache charges move to the parent); retried briefly, since a just-killed
        worker can hold it a moment longer."""
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        os.rmdir(self.path)


def drop_file_cache(folder: str) -> int:
    """Evict `folder`'s files from the page cache (posix_fadvise DONTNEED: only clean, unmapped pages go).
    Needed because a cached page stays charged to the cgroup that first read it: weights left in the cache
    by an earlier run would not count against the next run's limit. Returns the bytes advised."""
    return sum(drop_unmapped_pages(os.path.join(base, name)) for base, _, files in os.walk(folder) for name in files)
