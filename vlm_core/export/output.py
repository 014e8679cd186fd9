"""Staging and publishing the output folder.

The folder is built under a temporary name beside OUT (`.OUT.partial-PID`, same filesystem) and
renamed into place only when complete, so a failed or interrupted export never leaves a folder that
loads as complete, and an existing OUT is replaced only once its successor is whole.
"""
from __future__ import annotations

import os
import shutil

from vlm_core.export.errors import ExportError


def prepare_output(out: str, force: bool) -> str:
    """Check OUT and return the temporary folder to build in (beside OUT, same filesystem)."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"output {out!r} exists and is not a folder; choose another -o")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ExportError(f"output folder {out!r} is not empty; pass --force to replace it or choose another -o")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(parent, os.path.basename(out))
    staging = os.path.join(parent, f".{os.path.basename(out)}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def remove_stale_staging(parent: str, name: str) -> None:
    """Delete `.NAME.partial-PID` folders left by exports that were killed (their PID is gone)."""
    prefix = f".{name}.partial-"
    for entry in os.listdir(parent):
        pid = entry[len(prefix):]
        if entry.startswith(prefix) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def publish(staging: str, out: str) -> None:
    """Move the finished folder into place (replacing an old OUT only now, when the new one is complete)."""
    normalize_permissions(staging)
    out = os.path.abspath(out)
    if os.path.isdir(out):
        trash = out + f".old-{os.getpid()}"
        os.rename(out, trash)
        os.rename(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staging, out)


def normalize_permissions(folder: str) -> None:
    """Files as the user's umask makes them. ONNX's C++ writer creates external-data files owner-only
    (0600), so a folder copied to a server running as another user could not be read there."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~umask)
