"""Static checks of the workflow: config schema, rule declarations, envs, profile."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.workflow_helpers import SMALL, make_workdir

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _config():
    return yaml.safe_load((ROOT / "config/config.yaml").read_text())


def _validate(cfg):
    from snakemake.utils import validate

    validate(cfg, str(ROOT / "config/schemas/config.schema.yaml"))


def test_default_and_example_configs_validate():
    _validate(_config())
    example = _config()
    for key, value in yaml.safe_load((ROOT / "config/cohort_example.yaml").read_text()).items():
        example[key] = value
    _validate(example)


@pytest.mark.parametrize(
    "path, value, expect",
    [
        (("tiling", "bogus_key"), 1, "bogus_key"),
        (("tiling", "tissue_method"), "magic", "magic"),
        (("splits", "n_folds"), 1, "n_folds"),
        (("training", "selection"), "auroc", "auroc"),
    ],
)
def test_schema_rejects_wrong_keys_and_values_with_a_clear_message(path, value, expect):
    from snakemake.exceptions import WorkflowError

    cfg = copy.deepcopy(_config())
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(WorkflowError, match=re.escape(expect)):
        _validate(cfg)


def _rule_blocks():
    """Yield (file, rule name, block text) for every rule in rules/*.smk."""
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        text = smk.read_text()
        starts = [m for m in re.finditer(r"^(\s*)rule\s*(\w*):", text, flags=re.M)]
        for i, m in enumerate(starts):
            end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
            yield smk.name, m.group(2) or "(named)", text[m.start():end]


def test_every_rule_has_log_and_a_stage_env_that_exists():
    blocks = list(_rule_blocks())
    assert len(blocks) >= 10
    for fname, name, block in blocks:
        assert re.search(r"^\s+log:", block, flags=re.M), f"{fname}:{name} has no log:"
        env = re.search(r'conda:\s*\n\s*"\.\./(envs/[\w.-]+\.yaml)"', block)
        assert env, f"{fname}:{name} has no conda: env"
        assert (ROOT / env.group(1)).is_file(), env.group(1)


def test_gpu_rules_request_gpu_singular():
    gpu_rules = {"text_targets", "train", "evaluate", "evaluate_ood"}
    for _, name, block in _rule_blocks():
        if name in gpu_rules:
            assert re.search(r"resources:\s*\n\s*gpu=1,", block), f"{name} must declare resources: gpu=1"
        if name in ("embed_patches", "slide_shard"):  # no GPU when features are imported
            assert re.search(r"resources:\s*\n(\s*#.*\n)*\s*gpu=0 if IMPORTING else 1,", block), name
        assert "gpus=" not in block and "nvidia_gpu" not in block


def _extras():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data["project"]["optional-dependencies"]


def test_env_files_install_the_package_with_their_stage_extra_only():
    extras = _extras()
    envs = sorted((ROOT / "envs").glob("*.yaml"))
    assert {e.stem for e in envs} >= {"tiling", "embed", "genomics", "text", "train", "report"}
    for env in envs:
        spec = yaml.safe_load(env.read_text())
        assert "conda-forge" in spec["channels"]
        pip = [d for d in spec["dependencies"] if isinstance(d, dict)][0]["pip"]
        assert len(pip) == 1, f"{env.name}: stage packages belong in pyproject's extras (one source of truth)"
        m = re.fullmatch(r"modaltune\[([\w,-]+)\] @ file://\$\{PWD\}", pip[0])
        assert m, f"{env.name}: unexpected pip entry {pip[0]!r}"
        for extra in m.group(1).split(","):
            assert extra in extras, f"{env.name}: extra {extra!r} missing from pyproject"
        if env.stem != "tiling-tiatoolbox":
            assert "tiatoolbox" not in m.group(1)


def test_tiatoolbox_and_flash_attn_stay_optional():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    base = " ".join(data["project"]["dependencies"])
    everyday = " ".join(sum((v for k, v in _extras().items() if k not in {"tiatoolbox", "flash"}), []))
    for pkg in ("tiatoolbox", "flash-attn"):
        assert pkg not in base and pkg not in everyday


def test_slurm_profile_requests_gpus_with_keys_the_plugin_honours():
    prof_text = (ROOT / "profiles/slurm/config.yaml").read_text()
    prof = yaml.safe_load(prof_text)
    assert prof["executor"] == "slurm"
    assert prof["rerun-triggers"] == ["mtime", "params", "input"]
    assert "software-deployment-method" not in prof and "sdm" not in prof
    for rule in ("train", "evaluate"):
        assert prof["set-resources"][rule]["gpu"] == 1
    # The embedding rules decide themselves (gpu=0 when importing): a profile value would override them.
    assert "gpu" not in prof["set-resources"]["embed_patches"] and "slide_shard" not in prof["set-resources"]
    assert not re.search(r"^\s*(gpus|nvidia_gpu)\s*:", prof_text, flags=re.M)
    # every key is explained by a comment line right above it or on its line
    lines = prof_text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s*[\w-]+:", line) and "#" not in line:
            assert lines[i - 1].strip().startswith("#"), f"profile key without a comment: {line.strip()}"


def test_snakefmt_and_lint_are_clean():
    fmt = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "rules"], cwd=ROOT,
                         capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    lint = subprocess.run(SNAKEMAKE + ["--lint"], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "Lints for" not in lint.stdout + lint.stderr, lint.stdout + lint.stderr


def test_dry_run_with_and_without_profile(tmp_path):
    for extra in ([], ["--profile", "profiles/slurm"]):
        res = subprocess.run(SNAKEMAKE + ["-n", "-q"] + extra, cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("slides_per_job,rule", [(1, "embed_patches"), (16, "slide_shard")])
def test_importing_features_requests_no_gpu_through_the_slurm_profile(tmp_path, slides_per_job, rule):
    """embedding.source: import converts existing features on the CPU: the embedding jobs get gpu=0 under
    the SLURM profile (sbatch without --gpus), training still gets its GPU; embedding from slides gets one."""
    imp = tmp_path / "imported"
    imp.mkdir()
    (imp / "TCGA-D0-A001-01Z-00-DX1.h5").touch()  # a dry run only looks for the file
    gpus = {}
    for source in ("import", "embed"):
        emb = {"source": source, "import_dir": str(imp)} if source == "import" else {}
        work = make_workdir(tmp_path / source, {**SMALL, "embedding": emb, "sharding": {"slides_per_job": slides_per_job}})
        res = subprocess.run([sys.executable, "-m", "snakemake", "--configfile", "test_config.yaml", "--profile",
                              "profiles/slurm", "-n"], cwd=work, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        seen, name = {}, None  # rule name -> gpu of its jobs (group jobs print their rules indented)
        for line in (res.stdout + res.stderr).splitlines():
            if m := re.match(r"\s*rule (\w+):$", line):
                name = m.group(1)
                seen.setdefault(name, set())
            elif (m := re.match(r"\s*resources: .*\bgpu=(\d+)", line)) and name:
                seen.setdefault(name, set()).add(m.group(1))
        gpus[source] = {r: "".join(sorted(seen.get(r, ()))) for r in (rule, "train")}
        assert ("tile" in seen) == (source == "embed" and slides_per_job == 1)  # imported: nothing is tiled
    assert gpus["import"] == {rule: "0", "train": "1"}, gpus
    assert gpus["embed"] == {rule: "1", "train": "1"}, gpus


def test_install_profile_makes_bare_profile_name_work(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-m", "modaltune.cli", "install-profile", "slurm"], cwd=ROOT,
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    installed = tmp_path / "xdg/snakemake/slurm/config.yaml"
    assert installed.read_text() == (ROOT / "profiles/slurm/config.yaml").read_text()
    again = subprocess.run([sys.executable, "-m", "modaltune.cli", "install-profile", "slurm"], cwd=ROOT,
                           capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "--force" in again.stderr
    dry = subprocess.run(SNAKEMAKE + ["-n", "-q", "--profile", "slurm"], cwd=ROOT, capture_output=True,
                         text=True, env=env)
    assert dry.returncode == 0, dry.stdout + dry.stderr
