"""Ablation of the authors' adapter bugs 2 and 3 on the complementary-signal cohort of bench_science.

Trains ModalTune (the bench's demo-width model, 3 slide-encoder layers) on one (fold, seed) of a finished
``bench_science.py`` work folder, once per switch setting (``adapter.double_residual`` x
``adapter.frozen_dropout``), evaluates it with the pipeline's probes, and reports per setting:

- the headline probe metrics (subtype balanced accuracy, survival C-index) on the fold's test patients;
- how much of each planted latent the embedding carries: held-out R^2 of a ridge regression (fitted on the
  training patients' embeddings, scored on the test patients) of the slide latent s and of the pathway
  latent g, per task token (``truth.tsv`` of the cohort);
- the last epoch's training loss next to what a constant prediction of the mean target reaches.

    python benchmarks/bench_adapter_ablation.py --workdir WORKDIR [--fold 0] [--seed 0] [--epochs 15]

WORKDIR is the ``--workdir`` of bench_science.py after its workflow ran (cases, splits, pathways,
features and text targets are read from ``WORKDIR/results/science``). Runs write under
``WORKDIR/ablation``. CPU only; about 3 min per setting on an idle 2-core machine at 15 epochs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
SETTINGS = {  # name -> (double_residual, frozen_dropout)
    "authors (both bugs)": (True, True),
    "double residual fixed": (False, True),
    "frozen dropout fixed": (True, False),
    "both fixed (default)": (False, False),
}


def token_r2(emb_npz: Path, truth: pd.DataFrame) -> list[dict]:
    """bench_science.latent_r2 of s and g from each token of a run's embeddings.npz."""
    from bench_science import LATENTS, latent_r2

    z = np.load(emb_npz)
    emb = z["embedding"] if z["embedding"].ndim == 3 else z["embedding"][:, None]
    lat = truth.loc[z["patient_id"], list(LATENTS)]
    return [{"token": k, **latent_r2(emb[:, k], z["partition"], lat)} for k in range(emb.shape[1])]


def constant_floor(text_h5: Path, prompt_index, projector_dim: int, seed: int, kl_weight: float) -> float:
    """Text-KL loss of predicting, for every patient, the mean of the normalised targets."""
    import torch
    import torch.nn.functional as F

    from modaltune.data import read_text_h5
    from modaltune.losses import text_kl_loss
    from modaltune.text import make_text_projector

    _, text = read_text_h5(text_h5)
    t = torch.tensor(np.asarray(text)[:, list(prompt_index)]).float()
    with torch.no_grad():
        p = make_text_projector(t.shape[-1], projector_dim, seed=seed)(t)
    const = F.normalize(p, dim=-1).mean(0, keepdim=True).expand_as(p)
    return float(text_kl_loss(const, p, weight=kl_weight))


def main(argv=None) -> int:
    import torch
    from bench_science import bench_models, feature_files

    from modaltune.evaluation import evaluate_run
    from modaltune.training import train_run

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.workdir = args.workdir.resolve()
    os.chdir(args.workdir)  # shard manifests list paths relative to the workflow's folder
    res = args.workdir / "results" / "science"
    if not (res / "splits" / "kfold.parquet").is_file():
        raise SystemExit(f"{res}/splits/kfold.parquet not found: run bench_science.py --workdir {args.workdir} first")
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    train_cfg = {**config["training"], "epochs": args.epochs, "warmup_epochs": 2}
    base = copy.deepcopy(config["models"]["modaltune"])
    base.update(copy.deepcopy(bench_models(["modaltune"])["modaltune"]))
    truth = pd.read_csv(args.workdir / "cohort" / "truth.tsv", sep="\t").set_index("patient_id")
    feats = feature_files(res)
    common = dict(cases_path=str(res / "clinical" / "cases.parquet"), splits_path=str(res / "splits" / "kfold.parquet"),
                  fold=args.fold, pathways_path=str(res / "genomics" / "pathways.parquet"), feature_files=feats,
                  sheet=[str(args.workdir / "cohort" / "cohort_sheet.tsv")])
    text_h5 = res / "text" / f"fold_{args.fold}.h5"
    rows = []
    for name, (double, frozen) in SETTINGS.items():
        cfg = copy.deepcopy(base)
        cfg.setdefault("adapter", {}).update(double_residual=double, frozen_dropout=frozen)
        out = args.workdir / "ablation" / f"dr{int(double)}_fd{int(frozen)}" / f"seed_{args.seed}_fold_{args.fold}"
        summary = train_run(model_name="modaltune", model_cfg=cfg, train_cfg=train_cfg, seed=args.seed,
                            text_h5=str(text_h5), out_dir=str(out), cohort="science", **common)
        m = evaluate_run(run_dir=str(out), out_metrics=str(out / "metrics.json"),
                         out_embeddings=str(out / "embeddings.npz"), out_predictions=str(out / "predictions.parquet"),
                         probe_cfg=config.get("probes") or {}, eval_cohort="science", **common)
        hist = pd.read_parquet(out / "history.parquet")
        r2 = token_r2(out / "embeddings.npz", truth)
        rows.append({"setting": name, "bacc": m["subtype_bacc"], "cindex": m["survival_cindex"],
                     "train_loss_last": float(hist["train_loss"].iloc[-1]), "best_epoch": summary.get("best_epoch"),
                     **{f"r2_{lat[0]}_tok{r['token']}": r[lat] for r in r2 for lat in ("slide_signal", "pathway_signal")}})
    floor = constant_floor(text_h5, (0, 1, 3), int(train_cfg.get("projector_dim", 256)), args.seed,
                           float(train_cfg.get("kl_weight", 10.0)))
    df = pd.DataFrame(rows)
    print(f"fold {args.fold}, seed {args.seed}, {args.epochs} epochs; constant-prediction loss {floor:.5f}")
    print("| setting | subtype bal. acc. | C-index | R² s / g (General) | R² s / g (Diagnosis) | R² s / g (Survival) | "
          "last train loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        r2s = " | ".join(f"{r[f'r2_s_tok{k}']:.2f} / {r[f'r2_p_tok{k}']:.2f}" for k in range(3))
        print(f"| {r['setting']} | {r['bacc']:.3f} | {r['cindex']:.3f} | {r2s} | {r['train_loss_last']:.4f} |")
    print(json.dumps(df.to_dict("records")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
