"""Install the project's Snakemake profiles where ``snakemake --profile <name>`` looks for them."""

from __future__ import annotations

import shutil
from pathlib import Path

from modaltune.errors import InputError


def user_profile_dir() -> Path:
    """Snakemake's per-user profile folder (the second place a bare profile name is looked up)."""
    from snakemake.cli import get_appdirs

    return Path(get_appdirs().user_config_dir)


def install_profile(name: str = "slurm", source: str | Path = "profiles", dest: str | Path | None = None,
                    force: bool = False) -> Path:
    """Copy ``profiles/<name>`` into the user's Snakemake profile folder and return the new path.

    An existing profile of that name is only replaced with ``force``; a user's edits are never
    overwritten silently.
    """
    src = Path(source) / name
    if not (src / "config.yaml").is_file():
        raise InputError(
            f"profile {src}/config.yaml not found; run this from the workflow's repository root "
            f"or pass --source <repo>/profiles"
        )
    target = Path(dest) if dest is not None else user_profile_dir() / name
    if target.exists():
        if not force:
            raise InputError(f"profile {target} already exists; pass --force to replace it")
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, target)
    return target
