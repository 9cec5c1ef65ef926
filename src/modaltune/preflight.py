"""Preflight: check every input a cohort's DAG will read, on the login node, before any GPU job.

``preflight_cohort(config, cohort)`` runs the CPU parts of the first stages on the real inputs into a
scratch folder — the same package functions the rules call (``read_sheet``, ``build_pathways``,
``build_clinical_table``, ``make_splits``), so what passes here passes there — and adds the checks no
stage makes up front: slide headers and their mpp, ID consistency across sheet, RNA, clinical and
biospecimen, every fold having all classes and events in train, config-time model blocks (unknown keys,
unknown architecture), the patch encoder, checkpoints (exist, expected keys, sha256 recorded).

The result lists ``problems`` (each one line naming the file or config key, the field and the fix; any
problem = exit non-zero / the preflight rule fails) and ``warnings`` (graceful paths: a slide that will
be recorded as failed, patients without RNA, ...), plus a composition table (patients with slides / RNA /
clinical / subtype label / survival, per partition). Slide pixels are never read; ``quick`` also skips
opening slide headers (existence only). A demo cohort is generated first when its files are missing.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from modaltune.errors import InputError, SlideError
from modaltune.io_utils import write_json
from modaltune.models.configs import model_config
from modaltune.workflow import (
    cohort_inputs,
    demo_dir,
    load_sheet,
    site_cohorts,
    target_cohorts,
    target_models,
)

log = logging.getLogger(__name__)

COMPOSITION_COLUMNS = ["partition", "patients", "slides", "rna", "clinical", "label", "survival", "events"]


@dataclass
class CohortReport:
    cohort: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    composition: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=COMPOSITION_COLUMNS))
    checkpoints: dict[str, dict] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "cohort": self.cohort,
            "ok": not self.problems,
            "problems": self.problems,
            "warnings": self.warnings,
            "composition": self.composition.to_dict(orient="records"),
            "checkpoints": self.checkpoints,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


# --------------------------------------------------------------------------------------------- config


def merge_configs(base: dict, *overlays: Mapping) -> dict:
    """Key-by-key merge as Snakemake merges --configfile's (nested dicts merged, lists replaced)."""
    out = copy.deepcopy(base)
    for over in overlays:
        for key, val in (over or {}).items():
            if isinstance(val, Mapping) and isinstance(out.get(key), dict):
                out[key] = merge_configs(out[key], val)
            else:
                out[key] = copy.deepcopy(val)
    return out


def load_config(configfiles: Sequence[str | os.PathLike], base: str | os.PathLike | None = "config/config.yaml",
                schema: str | os.PathLike | None = "config/schemas/config.schema.yaml") -> dict:
    """The config a ``snakemake --configfile ...`` run would see: the Snakefile's default config file,
    overlaid by each file in order, validated against the schema (defaults filled in)."""
    import yaml

    cfg: dict = {}
    paths = ([base] if base and Path(base).is_file() else []) + list(configfiles)
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"config file {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"config file {path}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise InputError(f"config file {path}: the top level must be a mapping of keys")
        cfg = merge_configs(cfg, data)
    if schema and Path(schema).is_file():
        validate_config(cfg, schema)
    return cfg


def validate_config(cfg: dict, schema: str | os.PathLike) -> None:
    """Schema validation with the message naming the key path (config typos, wrong value types)."""
    import jsonschema
    import yaml

    spec = yaml.safe_load(Path(schema).read_text())
    validator = jsonschema.Draft202012Validator(spec)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors[:10]:
            where = ".".join(map(str, err.absolute_path)) or "(top level)"
            lines.append(f"config {where}: {err.message} (schema {schema})")
        raise InputError("\n".join(lines))
    _fill_defaults(cfg, spec)


def _fill_defaults(cfg: dict, spec: Mapping) -> None:
    for key, sub in (spec.get("properties") or {}).items():
        if key not in cfg and "default" in sub:
            cfg[key] = copy.deepcopy(sub["default"])
        elif isinstance(cfg.get(key), dict) and isinstance(sub, Mapping):
            _fill_defaults(cfg[key], sub)


# ----------------------------------------------------------------------------------------- checks


def check_models(config: dict, feature_dim: int | None) -> list[str]:
    """Every model of run.models builds from its block (unknown keys / arch / values stop here)."""
    from modaltune.models.registry import check_model_block

    problems = []
    for cohort in target_cohorts(config):  # demo cohorts get the demo sizes, others the paper's
        for name in target_models(config):
            try:
                with _capture_warnings("modaltune.models"):  # "randomly initialised": expected here
                    check_model_block(name, model_config(config, name, cohort), feature_dim=feature_dim)
            except InputError as exc:
                problems.append(str(exc))
    return list(dict.fromkeys(problems))


def checkpoint_entries(config: dict) -> list[tuple[str, str]]:
    """(config key, path) of every checkpoint the DAG loads."""
    out = []
    if config.get("embedding", {}).get("checkpoint"):
        out.append(("embedding.checkpoint", str(config["embedding"]["checkpoint"])))
    if config.get("text", {}).get("checkpoint"):
        out.append(("text.checkpoint", str(config["text"]["checkpoint"])))

    def walk(obj, where):
        if isinstance(obj, Mapping):
            for key, val in obj.items():
                if key == "checkpoint" and isinstance(val, str) and val:
                    out.append((f"{where}.{key}", val))
                else:
                    walk(val, f"{where}.{key}")

    for name in target_models(config):
        walk(config["models"][name], f"models.{name}")
    return out


def encoder_feature_dim(config: dict) -> tuple[int | None, list[str]]:
    """The patch encoder's output width (registry hint), or a problem naming embedding.encoder."""
    from modaltune.encoders import encoder_class

    emb = config["embedding"]
    try:
        cls = encoder_class(emb["encoder"])
        cls.resolve_config(**(emb.get("encoder_kwargs") or {}))
    except InputError as exc:
        return None, [f"config embedding.encoder / encoder_kwargs: {exc}"]
    return cls.feature_dim_hint, []


def check_encoder_checkpoint(config: dict, path: str) -> list[str]:
    """The encoder's checkpoint has the keys and shapes of its architecture (model built on the meta
    device: no memory, the checkpoint memory-mapped)."""
    import torch

    from modaltune.encoders import encoder_class
    from modaltune.encoders.base import check_keys, read_checkpoint

    emb = config["embedding"]
    cls = encoder_class(emb["encoder"])
    try:
        with torch.device("meta"):
            enc = cls(checkpoint=None, **(emb.get("encoder_kwargs") or {}))
    except RuntimeError as exc:  # an op without a meta kernel: keys are checked when the job loads it
        log.info("encoder %s cannot be built on the meta device (%s): checkpoint keys not checked", cls.name, exc)
        return []
    try:
        sd = cls.adapt_state_dict(enc, read_checkpoint(path), enc.model)
        check_keys(enc.model, sd, f"{path} (config embedding.checkpoint)")
    except InputError as exc:
        return [f"config embedding.checkpoint: {exc}"]
    return []


def check_backbone_checkpoint(key: str, path: str, bcfg: Mapping, feature_dim: int | None) -> list[str]:
    """A slide-encoder checkpoint holds every tensor the configured backbone needs, with its shape."""
    import torch

    from modaltune.models.modaltune import build_backbone

    cfg = {**dict(bcfg), "checkpoint": None}
    try:
        with torch.device("meta"):
            model = build_backbone(cfg, int(feature_dim or cfg.get("in_chans") or 16))
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except InputError as exc:
        return [f"config {key}: {exc}"]
    except Exception as exc:  # noqa: BLE001 - unreadable file or no meta kernel: one clear line
        return [f"config {key}: {path} cannot be read as a slide-encoder checkpoint ({type(exc).__name__}: {exc})"]
    state = obj["model"] if isinstance(obj, dict) and "model" in obj else obj
    if not isinstance(state, Mapping):
        return [f"config {key}: {path} is not a state dict (name -> tensor) or {{'model': state_dict}}"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        return [f"config {key}: {path} lacks {len(missing)} of the {len(expected)} tensors the backbone needs, "
                f"e.g. {missing[:5]}; give the slide-encoder weights matching backbone embed_dim/depth"]
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        return [f"config {key}: {path}: {len(wrong)} tensors have the wrong shape, e.g. {k} "
                f"{tuple(state[k].shape)} vs model {tuple(expected[k].shape)}; check the backbone's "
                "embed_dim/depth/in_chans (in_chans must equal the patch encoder's feature width)"]
    return []


def check_checkpoints(config: dict, feature_dim: int | None, report: CohortReport) -> None:
    from modaltune.encoders.base import sha256_file

    for key, path in checkpoint_entries(config):
        if not Path(path).is_file():
            report.problems.append(
                f"config {key}: checkpoint {path} not found; set {key} to a local copy of the weights "
                "(nothing is downloaded at run time) or to null for random initialisation"
            )
            continue
        report.checkpoints[key] = {"path": path, "sha256": sha256_file(path), "bytes": Path(path).stat().st_size}
        if key == "embedding.checkpoint":
            report.problems += check_encoder_checkpoint(config, path)
        elif key.endswith("backbone.checkpoint"):
            block = config["models"][key.split(".")[1]]
            node = block
            for part in key.split(".")[2:-1]:
                node = node[part]
            report.problems += check_backbone_checkpoint(key, path, node, feature_dim)


def check_feature_dims(config: dict, feature_dim: int | None) -> list[str]:
    """backbone.in_chans fixed in a model block must equal the patch encoder's width."""
    if feature_dim is None:
        return []
    problems = []
    for name in target_models(config):

        def walk(obj, where):
            if isinstance(obj, Mapping):
                if obj.get("in_chans") not in (None, feature_dim) and "type" in obj:
                    problems.append(
                        f"config {where}.in_chans={obj['in_chans']} but encoder "
                        f"{config['embedding']['encoder']} gives {feature_dim}-dim features; set in_chans to "
                        "null (taken from the features) or use the matching encoder"
                    )
                for key, val in obj.items():
                    walk(val, f"{where}.{key}")

        walk(config["models"][name], f"models.{name}")
    return problems


def check_slides(sheet: pd.DataFrame, quick: bool, on_error: str, report: CohortReport, where: str) -> set[str]:
    """Slides exist, open (header only) and carry an mpp (or the sheet's override). Returns the slide ids
    that will go through; unreadable ones are problems with ``tiling.on_error: raise``, else warnings."""
    from modaltune.slide_io import open_openslide, resolve_mpp

    ok: set[str] = set()
    missing, failed = [], []
    for row in sheet.itertuples(index=False):
        path = str(row.path)
        if not os.path.isfile(path):
            missing.append((row.slide_id, path))
            continue
        if quick:
            ok.add(row.slide_id)
            continue
        override = None if pd.isna(row.mpp) else float(row.mpp)
        try:
            osr = open_openslide(path)
            try:
                resolve_mpp(osr, path, override)
            finally:
                osr.close()
        except SlideError as exc:
            failed.append(f"{where}: slide {row.slide_id}: {exc.reason}")
            continue
        except InputError as exc:
            failed.append(f"{where}: slide {row.slide_id}: {exc}")
            continue
        ok.add(row.slide_id)
    if missing:
        shown = "; ".join(f"{s} -> {p}" for s, p in missing[:5])
        report.problems.append(
            f"{where}: field path: {len(missing)} slide file(s) not found, e.g. {shown}; fix the path column "
            "(relative paths are resolved against the sheet's folder) or remove the rows"
        )
    if failed:
        if on_error == "raise":
            report.problems += [f"{m}; fix or remove the slide (or set tiling.on_error: record)" for m in failed]
        else:
            report.warnings += [f"{m}; the slide will be recorded as failed (tiling.on_error: record)"
                                for m in failed]
    return ok


def _ids_note(what: str, ids: Sequence[str], fix: str) -> str:
    ids = sorted(ids)
    return f"{what}: {len(ids)} patient(s), e.g. {ids[:5]}; {fix}"


def check_biospecimen(path: str, sheet: pd.DataFrame, report: CohortReport) -> None:
    from modaltune.clinical import read_biospecimen_tsv

    try:
        bio = read_biospecimen_tsv(path)
    except InputError as exc:
        report.problems.append(str(exc))
        return
    pairs = dict(zip(bio["slide_id"], bio["patient_id"], strict=False))
    wrong = [(s, p, pairs[s]) for s, p in zip(sheet["slide_id"], sheet["patient_id"], strict=True)
             if s in pairs and pairs[s] != p]
    if wrong:
        report.problems.append(
            f"{path}: field case_submitter_id: {len(wrong)} slide(s) belong to another patient than in the "
            f"cohort sheet, e.g. (slide, sheet, biospecimen) {wrong[:3]}; fix patient_id in the sheet"
        )
    unknown = sorted(set(sheet["patient_id"]) - set(bio["patient_id"]))
    if unknown:
        report.warnings.append(_ids_note(f"{path}: sheet patients not in the biospecimen export", unknown,
                                         "n_slides is counted from the sheet, so this only matters for provenance"))


def composition_table(cases: pd.DataFrame | None, splits: pd.DataFrame | None, sheet_patients: set[str],
                      rna_patients: set[str]) -> pd.DataFrame:
    """Patients with slides / RNA / clinical / subtype label / survival, overall and per fold x partition."""
    everyone = sorted(sheet_patients | rna_patients | (set(cases["patient_id"]) if cases is not None else set()))
    info = cases.set_index("patient_id") if cases is not None else None

    def row(name, ids):
        ids = list(ids)
        clin = [p for p in ids if info is not None and p in info.index]
        sub = info.loc[clin] if info is not None else None
        return {
            "partition": name,
            "patients": len(ids),
            "slides": sum(p in sheet_patients for p in ids),
            "rna": sum(p in rna_patients for p in ids),
            "clinical": len(clin),
            "label": int((sub["label"] >= 0).sum()) if sub is not None else 0,
            "survival": int(sub["survival_months"].notna().sum()) if sub is not None else 0,
            "events": int(pd.to_numeric(sub["event"], errors="coerce").fillna(0).sum()) if sub is not None else 0,
        }

    rows = [row("all", everyone)]
    if splits is not None:
        for (fold, part), g in splits.groupby(["fold", "partition"], sort=False):
            rows.append(row(f"fold {fold} {part}", g["patient_id"]))
    return pd.DataFrame(rows, columns=COMPOSITION_COLUMNS)


def _demo_ready(config: dict, cohort: str) -> bool:
    return all(Path(p).exists() for p in cohort_inputs(config, cohort).values())


def generate_demo(config: dict, cohort: str) -> None:
    from modaltune.demo import make_demo_cohort

    d = config["cohorts"][cohort]["demo"]
    log.info("preflight: generating demo cohort %s under %s", cohort, demo_dir(config, cohort))
    make_demo_cohort(demo_dir(config, cohort), n_patients=int(d.get("n_patients", 40)), seed=int(d.get("seed", 0)))


def preflight_cohort(config: dict, cohort: str, *, quick: bool = False, generate: bool = True,
                     global_checks: bool = True) -> CohortReport:
    """All checks of one site cohort (see module docstring). Never raises for bad input: problems are
    collected in the report."""
    report = CohortReport(cohort)
    t0 = time.perf_counter()

    def lap(name):
        nonlocal t0
        now = time.perf_counter()
        report.timings[name] = now - t0
        t0 = now

    blk = config["cohorts"][cohort]
    if blk.get("demo") and not _demo_ready(config, cohort):
        if not generate:
            report.warnings.append(f"demo cohort {cohort}: not generated yet (only the config was checked); "
                                   "the workflow's demo rule writes it first")
            _global(config, report, global_checks)
            return report
        generate_demo(config, cohort)
        lap("generate_demo")

    try:
        inputs = cohort_inputs(config, cohort)
    except InputError as exc:
        report.problems.append(str(exc))
        return report
    for key, path in inputs.items():
        if not Path(path).exists():
            report.problems.append(f"config cohorts.{cohort}.{key}: file {path} not found; fix the path "
                                   "(relative to the folder snakemake runs in)")
    if report.problems:
        _global(config, report, global_checks)
        return report

    # sheet + slides
    sheet = None
    try:
        sheet = load_sheet(config, cohort)
    except InputError as exc:
        report.problems.append(str(exc))
    lap("sheet")
    has_sheet = "sheet" in inputs  # a cohort of RNA + clinical only has no sheet and no biospecimen
    if sheet is not None and has_sheet:
        check_slides(sheet, quick, config["tiling"].get("on_error", "record"), report, inputs["sheet"])
        if "biospecimen" in inputs:
            check_biospecimen(inputs["biospecimen"], sheet, report)
    lap("slides")
    sheet_patients = set(sheet["patient_id"]) if sheet is not None and has_sheet else None

    with tempfile.TemporaryDirectory(prefix=".preflight.", dir=None) as scratch:
        scratch = Path(scratch)
        rna_parquet, rna_patients = _rna(config, inputs, sheet_patients, scratch, report)
        lap("rna")
        cases = _clinical(config, cohort, inputs, sheet, rna_parquet, scratch, report)
        lap("clinical")
        splits = _splits(config, inputs, cases, scratch, report) if cases is not None else None
        lap("splits")
    report.composition = composition_table(cases, splits, sheet_patients or set(), rna_patients)
    _global(config, report, global_checks)
    lap("models_checkpoints")
    return report


def _global(config: dict, report: CohortReport, enabled: bool) -> None:
    if not enabled:
        return
    feature_dim, problems = encoder_feature_dim(config)
    report.problems += problems
    report.problems += check_feature_dims(config, feature_dim)
    report.problems += check_models(config, feature_dim)
    check_checkpoints(config, feature_dim, report)


def _rna(config, inputs, sheet_patients, scratch: Path, report: CohortReport):
    import json

    from modaltune.genomics import build_pathways

    gcfg = config.get("genomics", {})
    try:
        rep = build_pathways(inputs["rna"], inputs["gene_sets"], scratch / "pathways.parquet", scratch / "rna.json",
                             patients=None if sheet_patients is None else sorted(sheet_patients),
                             allow_normal=bool(gcfg.get("allow_normal", False)),
                             alias_table=gcfg.get("alias_table"),
                             min_genes_per_pathway=int(gcfg.get("min_genes_per_pathway", 1)))
    except InputError as exc:
        report.problems.append(str(exc))
        return None, set()
    m = rep.get("matrix", {})
    if m.get("n_inf_set_to_nan") or m.get("n_nan_in_file"):
        report.warnings.append(f"{inputs['rna']}: {m.get('n_nan_in_file', 0)} NaN and {m.get('n_inf_set_to_nan', 0)} "
                               "inf values (inf read as NaN; NaN genes are imputed by the fold's scaler)")
    if m.get("n_duplicate_gene_ids"):
        report.warnings.append(f"{inputs['rna']}: {m['n_duplicate_gene_ids']} duplicated gene id(s), e.g. "
                               f"{m.get('duplicate_gene_ids', [])[:3]}; {m.get('duplicate_policy')}")
    if rep.get("dropped_pathways_without_genes"):
        report.warnings.append(f"{inputs['gene_sets']}: pathways without genes dropped: "
                               f"{rep['dropped_pathways_without_genes'][:5]}")
    without = rep.get("patients_requested_without_rna", [])
    if without:
        report.warnings.append(_ids_note(f"{inputs['rna']}: sheet patients without an RNA sample", without,
                                         "they train with the missing-genes token and are never tested"))
    json.dumps(rep)  # the stage writes it as JSON; a non-serialisable report would fail there
    return scratch / "pathways.parquet", set(pd.read_parquet(scratch / "pathways.parquet").index)


def _clinical(config, cohort, inputs, sheet, rna_parquet, scratch: Path, report: CohortReport):
    from modaltune.clinical import build_clinical_table

    blk = config["cohorts"][cohort]
    if sheet is None:
        return None
    sheet_file = None
    if "sheet" in inputs:
        sheet_file = scratch / "sheet.tsv"  # the resolved sheet (demo sheets are built in memory)
        sheet.to_csv(sheet_file, sep="\t", index=False)
    try:
        with _capture_warnings("modaltune.clinical"):  # summarised as warnings below
            cases = build_clinical_table(inputs["clinical"], inputs.get("biospecimen"), scratch / "cases.parquet",
                                         cohort=blk["site"], label_map=blk.get("label_map") or None,
                                         sheet=sheet_file, rna_parquet=rna_parquet,
                                         report_path=scratch / "clinical.json")
    except InputError as exc:
        msg = str(exc)
        report.problems.append(msg.replace(str(sheet_file), inputs["sheet"]) if sheet_file else msg)
        return None
    import json

    crep = json.loads((scratch / "clinical.json").read_text())
    report.problems += crep.get("label_problems", [])  # every class of the map must have patients
    if crep.get("patients_without_slides"):
        report.warnings.append(_ids_note(f"{inputs['clinical']}: clinical patients without a slide in the sheet",
                                         crep["patients_without_slides"], "they train on genes/clinical only"))
    if crep.get("unknown_diagnoses"):
        report.warnings.append(f"{inputs['clinical']}: diagnoses outside the {blk['site']} label map (label -1, "
                               f"left out of the subtype task): {crep['unknown_diagnoses']}")
    surv = crep.get("survival", {})
    if surv.get("no_usable_survival"):
        report.warnings.append(_ids_note(f"{inputs['clinical']}: no usable survival (vital status or days missing)",
                                         surv["no_usable_survival"], "they drop out of survival metrics only"))
    return cases


def _splits(config, inputs, cases, scratch: Path, report: CohortReport):
    from modaltune.errors import LeakageError
    from modaltune.splits import make_splits, partition_summary, split_notes

    scfg = dict(config["splits"])
    scfg["import_path"] = scfg.get("import_path")
    try:
        with _capture_warnings("modaltune.splits"):
            splits = make_splits(scratch / "cases.parquet", scratch / "splits.parquet", sheet=inputs.get("sheet"),
                                 **scfg)
    except (InputError, LeakageError) as exc:
        report.problems.append(f"splits ({scfg.get('scheme')}): {exc}")
        return None
    summary = partition_summary(cases, splits)
    classes = sorted(int(c) for c in cases["label"].unique() if c >= 0)
    for row in summary.itertuples():
        if row.partition == "train":
            absent = [c for c in classes if getattr(row, f"n_class_{c}", 0) == 0]
            if absent:
                report.problems.append(f"splits fold {row.fold}: class(es) {absent} have no training patient; "
                                       "lower splits.n_folds or add patients of that class")
            if row.n_events == 0 and cases["event"].notna().any():
                report.warnings.append(f"splits fold {row.fold}: no events in train: survival probes of this "
                                       "fold will be empty (notes in metrics.json)")
    report.warnings += [f"splits: {n}" for n in split_notes(summary) if " train:" not in n]
    return splits


class _capture_warnings:
    """Keep a module's warnings out of the preflight console (they are summarised as notes instead)."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


# ----------------------------------------------------------------------------------------- entry points


def run_preflight(config: dict, cohorts: Sequence[str] | None = None, *, quick: bool = False,
                  generate: bool = True) -> list[CohortReport]:
    cohorts = list(cohorts) if cohorts else site_cohorts(config)
    reports = []
    for i, c in enumerate(cohorts):
        # config-wide checks (models, encoder, checkpoints) once, attached to the first cohort
        reports.append(preflight_cohort(config, c, quick=quick, generate=generate, global_checks=i == 0))
    return reports


def format_report(reports: Sequence[CohortReport]) -> str:
    lines = []
    for r in reports:
        lines.append(f"== preflight: cohort {r.cohort}")
        if len(r.composition):
            lines.append(r.composition.to_string(index=False))
        for key, ck in r.checkpoints.items():
            lines.append(f"checkpoint {key}: {ck['path']} sha256 {ck['sha256']}")
        lines += [f"warning: {w}" for w in r.warnings]
        lines += [f"problem: {p}" for p in r.problems]
    n = sum(len(r.problems) for r in reports)
    lines.append(f"preflight: {n} problem(s)" + ("" if n else ", ok to run"))
    return "\n".join(lines)


def inputs_digest(config: dict, cohort: str) -> str:
    """Digest of what the preflight of ``cohort`` read: the whole config and the size + mtime of every
    input file (cohort files, imported split files, checkpoints)."""
    import hashlib
    import json

    from modaltune.splits import import_split_files
    from modaltune.workflow import config_digest

    files = list(cohort_inputs(config, cohort).values()) + [p for _, p in checkpoint_entries(config)]
    if config.get("splits", {}).get("scheme") == "import":
        try:
            files += import_split_files(config["splits"].get("import_path"))
        except InputError:
            pass
    stats = []
    for f in files:
        try:
            st = os.stat(f)
            stats.append((str(f), st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((str(f), None, None))
    blob = json.dumps([config_digest(config), stats], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def preflight_rule(config: dict, cohort: str, out_json: str | os.PathLike) -> CohortReport:
    """The preflight rule: all checks of ``cohort``; InputError (one line per problem) or the JSON."""
    report = preflight_cohort(config, cohort, generate=False)
    text = format_report([report])
    for line in text.splitlines():
        log.info("%s", line)
    if report.problems:
        raise InputError(f"preflight of cohort {cohort} found {len(report.problems)} problem(s):\n"
                         + "\n".join(f"problem: {p}" for p in report.problems))
    write_json({**report.to_json(), "digest": inputs_digest(config, cohort)}, out_json)
    return report


def recheck_preflight(config: dict, results_dir: str | os.PathLike, cohorts: Sequence[str],
                      cache_dir: str | os.PathLike = ".snakemake/modaltune-preflight") -> list[str]:
    """The Snakefile's onstart: re-run the checks of every cohort whose preflight.json exists but whose
    config or input files changed since (the preflight rule itself runs once per cohort, so that a
    config edit never reruns the stages after it). InputError with every problem stops the run before
    any job; a passing digest is cached under ``cache_dir`` so unchanged inputs are not checked again."""
    checked = []
    problems: list[str] = []
    for cohort in cohorts:
        done = Path(results_dir) / cohort / "preflight.json"
        if not done.is_file():
            continue  # the preflight rule checks it before the cohort's first stage
        digest = inputs_digest(config, cohort)
        stored = (_read_json(done) or {}).get("digest")
        cache = Path(cache_dir) / f"{cohort}.digest"
        if digest == stored or (cache.is_file() and cache.read_text().strip() == digest):
            continue
        report = preflight_cohort(copy.deepcopy(config), cohort, generate=False)
        checked.append(cohort)
        if report.problems:
            problems += [f"cohort {cohort}: {p}" for p in report.problems]
        else:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(digest + "\n")
    if problems:
        raise InputError(f"preflight: the config or inputs changed since the last run and "
                         f"{len(problems)} problem(s) were found:\n" + "\n".join(f"problem: {p}" for p in problems))
    if checked:
        print(f"modaltune preflight: re-checked {checked} (config or inputs changed): ok", file=sys.stderr)
    return checked


# ------------------------------------------------------------------------------- end-of-run summary


def _read_json(path: Path):
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_summary(results_dir: str | os.PathLike, cohorts: Sequence[str], logs_dir: str | os.PathLike = "logs",
                max_lines: int = 8) -> list[str]:
    """Everything skipped or degraded in a run, from the files that exist (any may be missing): failed
    slides (failures.tsv or shard manifests), RNA and clinical notes (report.json), split notes (one-class /
    no-event partitions), runs with empty metrics and their notes (metrics.json), preflight problems."""
    results = Path(results_dir)
    lines: list[str] = []

    def few(items, n=3):
        items = list(items)
        return ", ".join(map(str, items[:n])) + (f" (+{len(items) - n} more)" if len(items) > n else "")

    for cohort in cohorts:
        base = results / cohort
        if not base.is_dir():
            continue
        fails = None
        if (base / "failures.tsv").is_file():
            try:
                fails = pd.read_csv(base / "failures.tsv", sep="\t", dtype=str).fillna("")
            except (pd.errors.EmptyDataError, pd.errors.ParserError):
                fails = None
        if fails is None:
            frames = []
            for manifest in sorted(base.glob("features/*/shards/*.tsv")):
                try:
                    frames.append(pd.read_csv(manifest, sep="\t", dtype=str).fillna(""))
                except (pd.errors.EmptyDataError, pd.errors.ParserError):
                    continue
            if frames:
                allm = pd.concat(frames, ignore_index=True)
                fails = allm[~allm["status"].isin(["ok", "skipped"])] if "status" in allm else None
        if fails is not None and len(fails):
            lines.append(f"{cohort}: {len(fails)} slide(s) failed and were left out: "
                         + few(f"{r.slide_id} ({r.error[:80]})" for r in fails.itertuples()))
        rna = _read_json(base / "genomics" / "report.json") or {}
        if rna.get("patients_requested_without_rna"):
            lines.append(f"{cohort}: {len(rna['patients_requested_without_rna'])} patient(s) without RNA "
                         "(missing-genes token, train only): " + few(rna["patients_requested_without_rna"]))
        matrix = rna.get("matrix") or {}
        if matrix.get("n_inf_set_to_nan") or matrix.get("n_duplicate_gene_ids"):
            lines.append(f"{cohort}: RNA matrix had {matrix.get('n_inf_set_to_nan', 0)} inf value(s) (read as NaN) "
                         f"and {matrix.get('n_duplicate_gene_ids', 0)} duplicated gene id(s)")
        if rna.get("dropped_pathways_without_genes"):
            lines.append(f"{cohort}: pathways without genes dropped: " + few(rna["dropped_pathways_without_genes"]))
        clin = _read_json(base / "clinical" / "report.json") or {}
        if clin.get("unknown_diagnoses"):
            lines.append(f"{cohort}: diagnoses outside the label map (left out of the subtype task): "
                         f"{clin['unknown_diagnoses']}")
        for problem in clin.get("label_problems") or []:
            lines.append(f"{cohort}: {problem}")
        no_surv = (clin.get("survival") or {}).get("no_usable_survival") or []
        if no_surv:
            lines.append(f"{cohort}: {len(no_surv)} patient(s) without usable survival: " + few(no_surv))
        for summary in sorted(base.glob("splits/*_summary.tsv")):
            try:
                table = pd.read_csv(summary, sep="\t", keep_default_na=False)
            except (pd.errors.EmptyDataError, pd.errors.ParserError):
                continue
            if "notes" in table:
                notes = [f"fold {r.fold} {r.partition}: {r.notes}" for r in table.itertuples() if r.notes]
                if notes:
                    lines.append(f"{cohort}: splits: " + few(notes, 4))
        empty: dict[str, list[str]] = {}
        for mfile in sorted(base.glob("runs/*/seed_*/fold_*/metrics.json")) + sorted(
                base.glob("ood/*/*/seed_*/fold_*/metrics.json")):
            m = _read_json(mfile)
            if not isinstance(m, dict):
                continue
            run = "/".join(mfile.parent.relative_to(base).parts[-3:])
            for note in m.get("notes") or []:
                empty.setdefault(str(note), []).append(run)
            for key in ("subtype_bacc", "survival_cindex"):
                if key in m and m[key] is None and not m.get("notes"):
                    empty.setdefault(f"{key} empty", []).append(run)
        for note, runs in empty.items():
            lines.append(f"{cohort}: {len(runs)} run(s): {note}: " + few(runs, 2))
    for log_file in sorted(Path(logs_dir).glob("preflight/*.log")):
        try:
            problems = [ln.split("problem: ", 1)[1] for ln in log_file.read_text().splitlines() if "problem: " in ln]
        except OSError:
            continue
        for p in dict.fromkeys(problems):
            lines.append(f"preflight {log_file.stem}: {p}")
    return lines[: max_lines * max(1, len(cohorts)) + 20]


def print_run_summary(results_dir, cohorts, logs_dir="logs", status: str = "finished", file=None) -> None:
    """The Snakefile's onsuccess/onerror: a short console summary; never raises."""
    file = file or sys.stderr
    try:
        lines = run_summary(results_dir, cohorts, logs_dir)
    except Exception as exc:  # noqa: BLE001 - a summary must never turn a finished run into an error
        lines = [f"(summary unavailable: {type(exc).__name__}: {exc})"]
    print(f"modaltune: run {status}; " + (f"{len(lines)} thing(s) skipped or degraded:" if lines
                                          else "nothing skipped or degraded"), file=file)
    for line in lines:
        print(f"  - {line}", file=file)
