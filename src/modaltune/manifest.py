"""Run manifest: what produced a cohort's results (config fingerprint, versions, checkpoints, git, failures)."""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import pandas as pd

from modaltune.io_utils import file_sha256, write_json

PACKAGES = ("modaltune", "snakemake", "torch", "torchvision", "timm", "numpy", "pandas", "scikit-learn",
            "scipy", "lifelines", "h5py", "openslide-python", "openslide-bin", "tifffile", "matplotlib",
            "open_clip_torch", "pyarrow")


def config_fingerprint(config: dict) -> str:
    """sha256 of the canonical JSON of the config (sorted keys, no whitespace)."""
    canon = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def checkpoints(config: dict, base_dir=".") -> list[dict]:
    """Every ``checkpoint`` entry of the config (any depth) with its sha256 when the file exists."""
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "checkpoint" and isinstance(v, str) and v:
                    found.append((".".join(where + [k]), v))
                else:
                    walk(v, where + [str(k)])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, where + [str(i)])

    walk(config, [])
    out = []
    for key, value in sorted(set(found)):
        p = Path(value) if Path(value).is_absolute() else Path(base_dir) / value
        out.append({"key": key, "path": value, "exists": p.is_file(),
                    "sha256": file_sha256(p) if p.is_file() else None})
    return out


def git_commit(directory) -> dict | None:
    """HEAD commit and dirty flag of the git repository holding ``directory``; None when it is not one."""
    def git(*args):
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def write_manifest(config: dict, out_path, *, workflow_dir, failures_tsv=None, base_dir=".") -> dict:
    """Write the manifest JSON to ``out_path`` and return it."""
    failures = []
    if failures_tsv is not None:
        f = pd.read_csv(failures_tsv, sep="\t", dtype=str).fillna("")
        failures = f.to_dict("records")
    manifest = {
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config_sha256": config_fingerprint(config),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "checkpoints": checkpoints(config, base_dir),
        "git": git_commit(workflow_dir),
        "failures": failures,
        "n_failures": len(failures),
    }
    write_json(manifest, out_path)
    return manifest


__all__ = ["checkpoints", "config_fingerprint", "git_commit", "package_versions", "write_manifest"]
