"""Command line: ``modaltune <stage> ...``, one subcommand per workflow stage.

Each subcommand calls the same package function as the workflow rule, so any stage can be run
or debugged outside Snakemake.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _json(s: str):
    return json.loads(s)


def _add(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--log", default=None, help="write stdout/stderr/logging to this file")
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="modaltune", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = _add(sub, "demo", "write the deterministic demo cohort (slides, Xena RNA, GMT, GDC tables)")
    p.add_argument("--out", default="resources/demo/demo")
    p.add_argument("--n-patients", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)

    p = _add(sub, "tile", "tissue detection + patch grid for one slide -> tiles HDF5 + QC png")
    p.add_argument("slide")
    p.add_argument("out_h5")
    p.add_argument("--qc", default=None, help="QC thumbnail png")
    p.add_argument("--slide-id", default=None)
    p.add_argument("--mpp", type=float, default=None, help="level-0 mpp override (when the file has none)")
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--target-mpp", type=float, default=0.5)
    p.add_argument("--tissue-method", choices=["lab", "otsu"], default="lab")
    p.add_argument("--min-tissue", type=float, default=0.5)
    p.add_argument("--on-error", choices=["record", "raise"], default="raise")

    p = _add(sub, "embed", "embed one slide's tiles into a features HDF5 (streaming, resumable)")
    p.add_argument("tiles_h5")
    p.add_argument("out_h5")
    p.add_argument("--encoder", default="tiny")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--encoder-kwargs", type=_json, default=None, help="JSON dict")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")

    p = _add(sub, "rna-pathways", "Xena RNA matrix + gene sets -> pathways.parquet + report.json")
    p.add_argument("rna")
    p.add_argument("gene_sets")
    p.add_argument("out_parquet")
    p.add_argument("out_report")
    p.add_argument("--allow-normal", action="store_true")
    p.add_argument("--alias-table", default=None)

    p = _add(sub, "clinical", "GDC clinical + biospecimen TSVs -> cases.parquet")
    p.add_argument("clinical")
    p.add_argument("biospecimen")
    p.add_argument("out_parquet")
    p.add_argument("--cohort", required=True, help="cohort code, e.g. BRCA")
    p.add_argument("--sheet", default=None)
    p.add_argument("--rna", default=None, help="pathways.parquet (marks patients with RNA)")
    p.add_argument("--report", default=None)

    p = _add(sub, "splits", "patient-level splits -> splits parquet")
    p.add_argument("cases")
    p.add_argument("out_parquet")
    p.add_argument("--scheme", choices=["kfold", "fixed", "import"], default="kfold")
    p.add_argument("--n-folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--import-path", default=None)
    p.add_argument("--sheet", default=None)
    p.add_argument("--summary", default=None)

    p = _add(sub, "text-targets", "label prompts -> text embeddings for one fold")
    p.add_argument("cases")
    p.add_argument("splits")
    p.add_argument("fold", type=int)
    p.add_argument("out_h5")
    p.add_argument("--encoder", default="minilm")
    p.add_argument("--checkpoint", default=None)

    for name, help_ in (("train", "train one (model, seed, fold)"),
                        ("evaluate", "linear probes on a trained run")):
        p = _add(sub, name, help_)
        p.add_argument("--config", default="config/config.yaml", help="workflow config (model blocks)")
        p.add_argument("--model", required=True)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--fold", type=int, default=0)
        p.add_argument("--cases", required=True)
        p.add_argument("--splits", required=True)
        p.add_argument("--pathways", required=True)
        p.add_argument("--features", nargs="+", required=True, help="features HDF5 files")
        p.add_argument("--sheet", nargs="+", required=True, help="cohort sheet TSV(s)")
        p.add_argument("--run-dir", required=True)
        p.add_argument("--cohort", default=None,
                       help="cohort name (recorded in state.pt / metrics.json; train: a demo cohort of the config "
                            "gets the demo_models sizes, default paper sizes; evaluate: the cohort evaluated on)")
        if name == "train":
            p.add_argument("--text", default=None, help="text/fold_{k}.h5 (text_kl models only)")

    p = _add(sub, "aggregate", "summary tables + plots from metrics.json files")
    p.add_argument("metrics", nargs="+")
    p.add_argument("--out", required=True)

    p = _add(sub, "sheet", "cohort sheet TSV (slide_id, patient_id, path, mpp) from a folder of slides -> stdout")
    p.add_argument("slide_dir")
    p.add_argument("--biospecimen", default=None, help="GDC slide.tsv: slide -> patient for non-TCGA names")
    p.add_argument("--regex", default=None,
                   help="regex on the file name with named groups patient_id (and optionally slide_id)")
    p.add_argument("--no-mpp", action="store_true", help="do not open the slides (no mpp column, no checks)")
    p.add_argument("--out", default=None, help="write the TSV here instead of stdout")

    p = _add(sub, "preflight", "check every input of the workflow before any job runs (exit 1 on problems)")
    p.add_argument("--configfile", nargs="*", default=[], action="extend",
                   help="config files as given to snakemake (merged over config/config.yaml)")
    p.add_argument("--base-config", default="config/config.yaml")
    p.add_argument("--cohort", nargs="*", default=None, help="site cohorts to check (default: all the run uses)")
    p.add_argument("--quick", action="store_true", help="do not open slide headers (existence only)")
    p.add_argument("--no-generate", action="store_true",
                   help="do not generate a missing demo cohort (only its config is checked)")
    p.add_argument("--json", default=None, help="also write the reports as JSON")

    p = _add(sub, "cost", "estimate a cohort's wall / CPU / GPU hours from a finished run's measured rates")
    p.add_argument("--slides", type=int, required=True, help="number of slides of the cohort to estimate")
    p.add_argument("--patients", type=int, default=None, help="default: the measured patients per slide")
    p.add_argument("--models", nargs="+", default=None, help="default: every model of the measured run")
    p.add_argument("--runs", type=int, default=None, help="seeds x folds per model (default: as measured)")
    p.add_argument("--tiles-per-slide", type=float, default=None,
                   help="default: the measured mean (demo slides are small; real WSIs have ~10,000+ tiles)")
    p.add_argument("--rates", default="results/demo/cost/rates.json",
                   help="rates.json written by the workflow's cost rule")

    p = _add(sub, "install-profile", "install a project profile where `snakemake --profile NAME` finds it")
    p.add_argument("name", nargs="?", default="slurm")
    p.add_argument("--source", default="profiles")
    p.add_argument("--dest", default=None)
    p.add_argument("--force", action="store_true")
    return ap


def _load_config(path):
    import yaml

    return yaml.safe_load(Path(path).read_text())


def run(args: argparse.Namespace) -> None:
    cmd = args.cmd
    if cmd == "demo":
        from modaltune.demo import make_demo_cohort

        paths = make_demo_cohort(args.out, n_patients=args.n_patients, seed=args.seed)
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    elif cmd == "tile":
        from modaltune.tiling import tile_slide

        print(tile_slide(args.slide, args.out_h5, slide_id=args.slide_id, mpp_override=args.mpp,
                         qc_png=args.qc, patch_size=args.patch_size, target_mpp=args.target_mpp,
                         tissue_method=args.tissue_method, min_tissue=args.min_tissue,
                         on_error=args.on_error))
    elif cmd == "embed":
        from modaltune.embedding import embed_slide

        print(embed_slide(args.tiles_h5, args.out_h5, encoder=args.encoder, checkpoint=args.checkpoint,
                          encoder_kwargs=args.encoder_kwargs, batch_size=args.batch_size,
                          num_workers=args.num_workers, device=args.device, precision=args.precision))
    elif cmd == "rna-pathways":
        from modaltune.genomics import build_pathways

        build_pathways(args.rna, args.gene_sets, args.out_parquet, args.out_report,
                       allow_normal=args.allow_normal, alias_table=args.alias_table)
    elif cmd == "clinical":
        from modaltune.clinical import build_clinical_table

        build_clinical_table(args.clinical, args.biospecimen, args.out_parquet, cohort=args.cohort,
                             sheet=args.sheet, rna_parquet=args.rna, report_path=args.report)
    elif cmd == "splits":
        from modaltune.splits import make_splits

        make_splits(args.cases, args.out_parquet, scheme=args.scheme, n_folds=args.n_folds, seed=args.seed,
                    import_path=args.import_path, sheet=args.sheet, summary_path=args.summary)
    elif cmd == "text-targets":
        from modaltune.text import build_text_targets

        build_text_targets(args.cases, args.splits, args.fold, args.out_h5, encoder=args.encoder,
                           checkpoint=args.checkpoint)
    elif cmd in ("train", "evaluate"):
        cfg = _load_config(args.config)
        common = dict(cases_path=args.cases, splits_path=args.splits, fold=args.fold,
                      pathways_path=args.pathways, feature_files=args.features, sheet=args.sheet)
        if cmd == "train":
            from modaltune.models.configs import model_config
            from modaltune.training import train_run

            train_run(model_name=args.model, model_cfg=model_config(cfg, args.model, args.cohort),
                      train_cfg=cfg["training"], cohort=args.cohort, probe_lr=(cfg.get("probes") or {}).get("lr", "standard"),
                      seed=args.seed, text_h5=args.text, out_dir=args.run_dir, **common)
        else:
            from modaltune.evaluation import evaluate_run

            run_dir = Path(args.run_dir)
            evaluate_run(run_dir=str(run_dir), out_metrics=str(run_dir / "metrics.json"),
                         out_embeddings=str(run_dir / "embeddings.npz"),
                         out_predictions=str(run_dir / "predictions.parquet"), probe_cfg=cfg.get("probes"),
                         eval_cohort=args.cohort, **common)
    elif cmd == "aggregate":
        from modaltune.aggregate import aggregate

        def siblings(name):  # run outputs next to each metrics.json, when present
            return [str(q) for m in args.metrics if (q := Path(m).with_name(name)).exists()]

        print(aggregate(args.metrics, args.out, history_files=siblings("history.parquet"),
                        prediction_files=siblings("predictions.parquet")).to_string())
    elif cmd == "sheet":
        from modaltune.sheet import build_sheet

        sheet, problems = build_sheet(args.slide_dir, biospecimen=args.biospecimen, regex=args.regex,
                                      read_mpp=not args.no_mpp)
        for line in problems:
            print(f"modaltune sheet: {line}", file=sys.stderr)
        text = sheet.to_csv(sep="\t", index=False, lineterminator="\n", na_rep="")
        if args.out:
            from modaltune.io_utils import atomic_path

            with atomic_path(args.out) as tmp:
                tmp.write_text(text)
        else:
            sys.stdout.write(text)
        print(f"modaltune sheet: {len(sheet)} slide(s) of {sheet['patient_id'].nunique()} patient(s); "
              f"{len(problems)} file(s) reported", file=sys.stderr)
    elif cmd == "preflight":
        from modaltune.io_utils import write_json
        from modaltune.preflight import format_report, load_config, run_preflight

        cfg = load_config(args.configfile, base=args.base_config)
        reports = run_preflight(cfg, args.cohort, quick=args.quick, generate=not args.no_generate)
        print(format_report(reports))
        if args.json:
            write_json([r.to_json() for r in reports], args.json)
        if any(r.problems for r in reports):
            raise SystemExit(1)
    elif cmd == "cost":
        from modaltune.cost import estimate, load_rates

        table = estimate(load_rates(args.rates), slides=args.slides, patients=args.patients, models=args.models,
                         runs=args.runs, tiles_per_slide=args.tiles_per_slide)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    elif cmd == "install-profile":
        from modaltune.profiles import install_profile

        target = install_profile(args.name, source=args.source, dest=args.dest, force=args.force)
        print(f"installed profile {args.name} -> {target}\nuse it with: snakemake --profile {args.name}")


def main(argv: list[str] | None = None) -> int:
    from modaltune.errors import InputError
    from modaltune.workflow import log_to

    args = build_parser().parse_args(argv)
    try:
        with log_to(args.log):
            run(args)
    except InputError as exc:
        print(f"modaltune {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
