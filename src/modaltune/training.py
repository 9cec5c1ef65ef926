"""The one trainer for every registered model (ModalTune and all baselines).

The loss follows ``model.objective``: "text_kl" (ModalTune, method 3.2), "classification" (CE),
"survival" (discrete-time NLL), "none" (frozen linear-probe baselines: nothing is trained).
Fixes relative to the reference trainer: every patient every epoch (bug 1), warmup + cosine valid for any
epoch count (bug 18), only trainable weights saved (bug 19), gene scaler / covariates / survival bins fitted
on the fold's training patients (bugs 7, 8), and an exact resume from the last finished epoch.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import random
import time
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from modaltune.data import CohortData
from modaltune.errors import InputError
from modaltune.io_utils import atomic_path, file_sha256
from modaltune.losses import classification_loss, discrete_survival_nll, risk_from_hazards, text_kl_loss
from modaltune.models import ModelDims, positional_grid
from modaltune.models.configs import train_max_patches
from modaltune.probes import class_metrics, harrell_c, mean_or_none, probe_sites, site_groups
from modaltune.runs import (
    amp_settings,
    build_seeded,
    drops_slideless,
    embed_dataset,
    fit_fold_preprocessing,
    load_trainable,
    loader,
    pick_device,
    seed_everything,
    task_classes,
    to_device,
    trainable_state,
)
from modaltune.survival_bins import hazard_bin_edges, hazard_bin_index
from modaltune.text import make_text_projector

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)

# The one source of the training block's defaults; config/schemas/config.schema.yaml repeats them
# (tests/test_training.py::test_train_defaults_equal_schema_defaults keeps the two equal).
TRAIN_DEFAULTS = {
    "epochs": 15, "lr": 1e-4, "weight_decay": 5e-4, "warmup_epochs": 10, "warmup_start_factor": 1 / 20,
    "grad_accum": 1, "batch_size": 1, "max_patches": "auto", "num_workers": 0, "device": "auto",
    "precision": "auto", "selection": "auto", "schedule": "ours", "val_cindex": True, "kl_weight": 10.0,
    "kl_tau": 1.0, "coords_space": "target", "slide_gap": 1500, "projector_dim": 256, "n_bins": 4,
    "surv_alpha": 0.0, "probe_penalizer": 0.1,
    # Patients whose slides all failed: left out of training, probes and test for every model alike, since
    # slide-encoder models cannot embed an empty bag and comparisons must stay paired.
    "drop_patients_without_slides": True,
    # The paper: patients without RNA are dropped (for every model alike); false keeps them with the
    # missing-RNA token.
    "require_rna": False,
    # True: dropping patients without a usable slide applies only to models that read slides;
    # RNA/clinical-only models keep those patients (docs/METRICS.md: compare on the common test patients).
    "keep_slideless_for_non_slide_models": False,
}

SCHEDULES = ("ours", "reference")
# Validation criterion of each ``training.selection`` value: the history column it maximises.
SELECTIONS = {
    "bacc": "val_bacc",  # balanced accuracy of an LR probe on the first (General) token (the paper, method 3.4)
    "cindex": "val_cindex",  # C-index of a Cox probe on the first token
    "bacc+cindex": "val_bacc+val_cindex",  # mean of the two probe scores
    "loss": "val_loss",  # lowest validation loss
    "head_bacc": "val_head_bacc",  # balanced accuracy of the model's own classification head
    "head_cindex": "val_head_cindex",  # C-index of the model's own risk (risk_from_hazards of its head)
}
# selection "auto": each model on its own task.
AUTO_SELECTION = {"survival": "head_cindex", "classification": "head_bacc", "text_kl": "bacc", "none": None}
HISTORY_COLUMNS = ["epoch", "lr", "train_loss", "val_loss", "val_head_bacc", "val_head_cindex", "val_bacc",
                   "val_cindex", "selection_score", "seconds"]

# Test hook: raise after this many finished epochs (the resume file is already written), to simulate a kill.
_STOP_AFTER_EPOCH: int | None = None


class _Interrupted(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ helpers
def lr_factor(epoch: int, epochs: int, warmup: int, start: float = 1 / 20, schedule: str = "ours") -> float:
    """Learning-rate factor of ``epoch`` (0-based; the scheduler steps once per epoch).

    "ours": linear warmup from ``start`` x lr to lr over ``warmup`` epochs, then a cosine to 0 over the
    remaining epochs, valid for any epoch count (method bug 18).
    "reference": exactly the authors' GradualWarmupScheduler + CosineAnnealingLR (method 3.3): linear
    for epochs 0..warmup (factor 1 at epoch ``warmup``), afterwards step max(0, e - warmup - 1) of a
    cosine over ``epochs - warmup`` steps (so epoch warmup + 1 repeats factor 1). Needs epochs > warmup.
    """
    if schedule == "reference":
        if warmup < 1 or epochs <= warmup:
            raise InputError(f"training.schedule=reference needs 1 <= warmup_epochs < epochs (got warmup "
                             f"{warmup}, epochs {epochs}), as the authors' scheduler; use schedule 'ours'")
        if epoch <= warmup:
            return start + (1 - start) * epoch / warmup
        return 0.5 * (1 + math.cos(math.pi * max(0, epoch - warmup - 1) / (epochs - warmup)))
    if schedule != "ours":
        raise InputError(f"training.schedule={schedule!r}: use one of {list(SCHEDULES)}")
    warmup = max(0, min(int(warmup), epochs - 1))
    if epoch < warmup:
        return start + (1 - start) * epoch / warmup
    span = max(1, epochs - warmup)
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / span))


def _objective(model, model_cfg: dict) -> str:
    obj = getattr(model, "objective", None) or model_cfg.get("objective") or "none"
    if obj not in ("text_kl", "classification", "survival", "none"):
        raise InputError(f"model {model_cfg.get('arch')}: unknown objective {obj!r}")
    return obj


def resolve_selection(selection: str, objective: str) -> str | None:
    """The validation criterion (a history column, see ``SELECTIONS``) of a model; None = nothing to select."""
    if selection == "auto":
        key = AUTO_SELECTION[objective]
        return None if key is None else SELECTIONS[key]
    if selection not in SELECTIONS:
        raise InputError(f"training.selection={selection!r}: use 'auto' or one of {sorted(SELECTIONS)}")
    if objective == "none":
        return None
    if selection == "head_bacc" and objective != "classification":
        raise InputError(f"training.selection=head_bacc needs a classification head; this model's objective "
                         f"is {objective!r} (use 'auto')")
    if selection == "head_cindex" and objective != "survival":
        raise InputError(f"training.selection=head_cindex needs a survival head; this model's objective is "
                         f"{objective!r} (use 'auto')")
    return SELECTIONS[selection]


# ----------------------------------------------------------------------------------------------- loss
class _LossFn:
    def __init__(self, objective, projector, edges, cfg, prompt_index=(0,)):
        self.objective, self.projector, self.edges, self.cfg = objective, projector, edges, cfg
        self.prompt_index = list(prompt_index)

    def __call__(self, out: dict, batch: dict) -> torch.Tensor | None:
        if self.objective == "text_kl":
            emb = out["embedding"]
            text = batch["text"].float()
            # Which of the 4 prompts each token targets is a model fact (C3); one token -> General only.
            idx = self.prompt_index if emb.ndim == 3 and emb.shape[1] == len(self.prompt_index) else [0]
            with torch.autocast(device_type=emb.device.type, enabled=False):  # projector in fp32 (method 3.1)
                tgt = self.projector(text[:, idx])
            emb3 = emb if emb.ndim == 3 else emb[:, None]
            return text_kl_loss(emb3.float(), tgt.float(), weight=self.cfg["kl_weight"], tau=self.cfg["kl_tau"])
        if self.objective == "classification":
            if not bool((batch["label"] >= 0).any()):
                return None
            return classification_loss(out["logits"], batch["label"])
        if self.objective == "survival":
            bins = torch.from_numpy(hazard_bin_index(batch["time"].cpu().numpy(), self.edges)).to(batch["time"].device)
            if not bool(((bins >= 0) & torch.isfinite(batch["event"])).any()):
                return None
            return discrete_survival_nll(out["hazards"], bins, batch["event"], alpha=self.cfg["surv_alpha"])
        return None


def _val_pass(model, ds_val, loss_fn, cfg, device, amp_dtype) -> tuple[dict, float]:
    """One eval-mode pass over the val patients: embeddings + head outputs and the mean val loss."""
    losses = []

    def add_loss(out, batch):
        loss = loss_fn(out, batch)
        if loss is not None:
            losses.append(float(loss) * len(batch["patient_id"]))

    emb = embed_dataset(model, ds_val, device=device, batch_size=int(cfg["batch_size"]), amp_dtype=amp_dtype,
                        desc="val", num_workers=int(cfg["num_workers"]), on_batch=add_loss)
    return emb, (float(np.sum(losses) / max(1, len(ds_val))) if losses else float("nan"))


def _head_scores(va: dict, labels, times, events, sites, n_classes: int) -> tuple[float, float]:
    """(val head balanced accuracy, val head C-index) of the model's own head; NaN where it has none.

    Pan-cancer: mean over sites, as the probes (method 3.6)."""
    bacc = cindex = float("nan")
    groups = site_groups(sites)
    if va["logits"] is not None:
        lg = va["logits"]
        m = mean_or_none(class_metrics(labels[g], lg[g].argmax(1), None, range(n_classes))["bacc"] for _, g in groups)
        bacc = float("nan") if m is None else m
    if va["hazards"] is not None:
        risk = risk_from_hazards(torch.from_numpy(va["hazards"])).numpy()
        m = mean_or_none(harrell_c(times[g], risk[g], events[g]) for _, g in groups)
        cindex = float("nan") if m is None else m
    return bacc, cindex


def _val_metrics(model, ds_train, ds_val, loss_fn, cfg, device, amp_dtype, seed, criterion, n_classes,
                 probe_lr) -> dict:
    """Val loss, the model's own head on val, and probes on the General token (method 3.4): fitted on
    train embeddings, scored on val."""
    va, val_loss = _val_pass(model, ds_val, loss_fn, cfg, device, amp_dtype)
    tr = embed_dataset(model, ds_train, device=device, amp_dtype=amp_dtype, desc="probe train")
    cases = ds_train.cases
    va_ids = va["patient_id"]
    labels_va = np.array([int(v) if pd.notna(v) else -1 for v in cases.loc[va_ids, "label"]])
    times_va = cases.loc[va_ids, "survival_months"].to_numpy(float)
    events_va = cases.loc[va_ids, "event"].to_numpy(float)
    sites_va = (cases.loc[va_ids, "site"].astype(str).to_numpy() if "site" in cases.columns
                else np.array([""] * len(va_ids)))
    head_bacc, head_cindex = _head_scores(va, labels_va, times_va, events_va, sites_va, n_classes)

    ids = tr["patient_id"] + va_ids
    x = np.concatenate([tr["embedding"], va["embedding"]])
    x = x[:, 0] if x.ndim == 3 else x
    part = np.array(["train"] * len(tr["patient_id"]) + ["val"] * len(va_ids))
    labels = np.array([int(v) if pd.notna(v) else -1 for v in cases.loc[ids, "label"]])
    times = cases.loc[ids, "survival_months"].to_numpy(float)
    events = cases.loc[ids, "event"].to_numpy(float)
    sites = cases.loc[ids, "site"].astype(str).to_numpy() if "site" in cases.columns else np.array([""] * len(ids))
    survival = criterion in ("val_cindex", "val_bacc+val_cindex") or bool(cfg.get("val_cindex", True))
    res, _ = probe_sites(x, part, labels, times, events, sites, penalizer=cfg["probe_penalizer"], seed=seed,
                         survival=survival, score_on=("val",), lr_mode=probe_lr)
    nan = float("nan")
    return {
        "val_loss": val_loss, "val_head_bacc": head_bacc, "val_head_cindex": head_cindex,
        "val_bacc": nan if res.get("val_bacc") is None else float(res["val_bacc"]),
        "val_cindex": nan if res.get("val_cindex") is None else float(res["val_cindex"]),
    }


def _selection_score(row: dict, criterion: str | None) -> float:
    """Higher is better: the criterion's value (the negative val loss for "val_loss")."""
    if criterion is None:
        return float("nan")
    if criterion == "val_loss":
        return -row["val_loss"]
    if criterion == "val_bacc+val_cindex":
        vals = [v for v in (row["val_bacc"], row["val_cindex"]) if np.isfinite(v)]
        return float(np.mean(vals)) if vals else float("nan")
    return float(row[criterion])


def _plot_curves(history: pd.DataFrame, path: Path, title: str) -> None:
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    if len(history):
        ax[0].plot(history["epoch"], history["train_loss"], "o-", label="train")
        ax[0].plot(history["epoch"], history["val_loss"], "o-", label="val")
        for col, lab in (("val_bacc", "val bal. acc (probe)"), ("val_cindex", "val C-index (probe)"),
                         ("val_head_bacc", "val bal. acc (head)"), ("val_head_cindex", "val C-index (head)")):
            if history[col].notna().any():
                ax[1].plot(history["epoch"], history[col], "o-", label=lab)
    ax[0].set(xlabel="epoch", ylabel="loss", title=title)
    ax[1].set(xlabel="epoch", ylabel="metric")
    for a in ax:
        if a.lines:
            a.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ------------------------------------------------------------------------------------------------- main
def train_run(*, model_name: str, model_cfg: dict, train_cfg: dict, cases_path, splits_path, fold: int,
              seed: int, pathways_path, feature_files: list[str], sheet, text_h5=None, out_dir,
              cohort: str | None = None, probe_lr: str = "standard") -> dict:
    """Train one (model, seed, fold); write ``state.pt``, ``history.parquet`` and ``curve.png`` in ``out_dir``.

    ``cohort`` is the cohort's name (the workflow's {cohort} wildcard), recorded in the state for the
    evaluator's in-distribution / OOD decision. ``probe_lr`` (``probes.lr``) is the LR probe of the
    per-epoch validation probes. The epoch is selected on the model's own task (``training.selection``,
    see ``SELECTIONS`` / ``AUTO_SELECTION``); every epoch's criterion values are in history.parquet.
    Resumable: after every epoch ``out_dir/.resume.pt`` holds the full training state (model, optimiser,
    scheduler, grad scaler, RNG states, history, best so far); a restarted call continues from it and
    ends with the same state as an uninterrupted run. Returns a summary dict (best epoch, history rows).
    """
    cfg = {**TRAIN_DEFAULTS, **(train_cfg or {}), **(model_cfg.get("training") or {})}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg["device"])
    amp_dtype, use_scaler = amp_settings(cfg["precision"], device)
    seed_everything(int(seed), device)

    data = CohortData(cases_path, splits_path, fold, feature_files=feature_files, sheet=sheet,
                      pathways_path=pathways_path, text_h5=text_h5,
                      drop_without_slides=drops_slideless(cfg, model_cfg, model_name, feature_files),
                      require_rna=bool(cfg["require_rna"]))
    cases, gene_table = data.cases, data.gene_table
    fit_ids = data.fit_ids()
    gene_scaler, cov_state = fit_fold_preprocessing(cases, fit_ids, gene_table)
    tr_cases = cases.loc[fit_ids]
    edges = hazard_bin_edges(tr_cases["survival_months"], tr_cases["event"], int(cfg["n_bins"]))
    ngrids, tile = positional_grid(model_cfg.get("arch", model_name), model_cfg)
    view = dict(gene_scaler=gene_scaler, covariate_state=cov_state, coords_space=cfg["coords_space"],
                slide_gap=cfg["slide_gap"], seed=int(seed), grid_ngrids=ngrids, grid_tile=tile)
    max_patches = train_max_patches(model_cfg.get("arch", model_name), model_cfg, cfg["max_patches"])
    ds_train = data.dataset(["train"], max_patches=max_patches, train=True, **view)
    ds_probe = data.dataset(["train"], max_patches=None, train=False, use_text=False, **view)
    ds_val = data.dataset(["val"], max_patches=None, train=False, **view)
    n_classes = task_classes(cases, where=f"cases {cases_path}" if not isinstance(cases_path, pd.DataFrame)
                             else "cases")
    dims = ModelDims(feature_dim=ds_train.feature_dim, n_genes=len(gene_table[1]),
                     pathway_groups=gene_table[2], clinical_dim=int(ds_train.clinical.shape[1]),
                     n_classes=n_classes, n_bins=int(cfg["n_bins"]), text_dim=int(ds_train.text_dim))
    model = build_seeded(model_name, model_cfg, dims, int(seed), device)
    objective = _objective(model, model_cfg)
    criterion = resolve_selection(cfg["selection"], objective)

    projector = None
    if objective == "text_kl":
        if text_h5 is None:
            raise InputError(f"model {model_name}: objective text_kl needs text targets (text/fold_{fold}.h5)")
        projector = make_text_projector(dims.text_dim, int(cfg["projector_dim"]), seed=int(seed)).to(device)
        projector.eval()
        for p in projector.parameters():
            p.requires_grad_(False)
    loss_fn = _LossFn(objective, projector, edges, cfg, getattr(model, "text_prompt_index", (0,)))

    fingerprints = {
        "cases": file_sha256(cases_path) if not isinstance(cases_path, pd.DataFrame) else None,
        "splits": file_sha256(splits_path) if not isinstance(splits_path, pd.DataFrame) else None,
        "pathways": file_sha256(pathways_path), "text": file_sha256(text_h5),
        "feature_files": hashlib.sha256("\n".join(sorted(map(str, feature_files))).encode()).hexdigest(),
    }
    epochs = 0 if objective == "none" else int(cfg["epochs"])
    params = [p for p in model.parameters() if p.requires_grad]
    history: list[dict] = []
    best = {"epoch": None, "score": -math.inf, "state": trainable_state(model)}
    start = 0
    resume_path = out_dir / ".resume.pt"
    if epochs > 0:
        if not params:
            raise InputError(f"model {model_name}: objective {objective} but no trainable parameters")
        schedule, warmup = cfg["schedule"], int(cfg["warmup_epochs"])
        lr_factor(0, epochs, warmup, float(cfg["warmup_start_factor"]), schedule)  # config errors before epoch 0
        opt = torch.optim.AdamW(params, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]),
                                betas=(0.9, 0.999))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda e: lr_factor(e, epochs, warmup, float(cfg["warmup_start_factor"]), schedule))
        scaler = torch.amp.GradScaler(device.type, enabled=use_scaler, init_scale=2.0**15)
        run_key = {"model_cfg": model_cfg, "train_cfg": cfg, "seed": int(seed), "fold": int(fold),
                   "fingerprints": fingerprints, "probe_lr": probe_lr}
        if resume_path.exists():
            res = torch.load(resume_path, map_location="cpu", weights_only=False)
            if res.get("run_key") == run_key:
                load_trainable(model, {k: v.to(device) for k, v in res["model"].items()})
                opt.load_state_dict(res["optimizer"])
                sched.load_state_dict(res["scheduler"])
                scaler.load_state_dict(res["scaler"])
                _set_rng_state(res["rng"])
                history, best, start = res["history"], res["best"], int(res["epoch"]) + 1
                log.info("resuming %s seed %d fold %d after epoch %d", model_name, seed, fold, start - 1)
            else:
                log.warning("%s belongs to another configuration; starting from scratch", resume_path)

        accum = max(1, int(cfg["grad_accum"]))
        for epoch in range(start, epochs):
            t0 = time.time()
            ds_train.set_epoch(epoch)
            gen = torch.Generator().manual_seed(int(seed) * 100_003 + epoch)
            model.train()
            opt.zero_grad(set_to_none=True)
            tot, n_seen, pending = 0.0, 0, False
            batches = loader(ds_train, cfg["batch_size"], shuffle=True, generator=gen,
                             num_workers=cfg["num_workers"])
            bar = tqdm(batches, desc=f"{model_name} s{seed} f{fold} e{epoch}", leave=False, disable=None)
            for step, batch in enumerate(bar):
                batch = to_device(batch, device)
                with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = model(batch)
                loss = loss_fn(out, batch)
                if loss is not None:
                    scaler.scale(loss / accum).backward()
                    tot += float(loss.detach()) * len(batch["patient_id"])
                    n_seen += len(batch["patient_id"])
                    pending = True
                # A window without any loss (e.g. only unlabeled patients) must not step: GradScaler refuses it.
                if pending and ((step + 1) % accum == 0 or step + 1 == len(batches)):
                    pending = False
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad(set_to_none=True)
            lr = opt.param_groups[0]["lr"]
            sched.step()
            val = _val_metrics(model, ds_probe, ds_val, loss_fn, cfg, device, amp_dtype, int(seed), criterion,
                               n_classes, probe_lr)
            row = {"epoch": epoch, "lr": lr, "train_loss": tot / max(1, n_seen), **val}
            score = _selection_score(row, criterion)
            row["selection_score"] = score
            row["seconds"] = time.time() - t0
            history.append(row)
            if np.isfinite(score) and score >= best["score"]:  # ties -> later epoch, as the paper
                best = {"epoch": epoch, "score": float(score), "state": trainable_state(model)}
            elif not np.isfinite(score) and not np.isfinite(best["score"]):
                # No finite criterion yet (e.g. a one-class val set): keep the latest epoch.
                best = {"epoch": epoch, "score": -math.inf, "state": trainable_state(model)}
            log.info("%s seed %d fold %d epoch %d/%d: lr %.2e train_loss %.4f val_loss %.4f head bacc %.3f "
                     "head C %.3f probe bacc %.3f probe C %.3f; %s %.4f (%.1fs)", model_name, seed, fold,
                     epoch + 1, epochs, lr, row["train_loss"], row["val_loss"], row["val_head_bacc"],
                     row["val_head_cindex"], row["val_bacc"], row["val_cindex"], criterion, score, row["seconds"])
            with atomic_path(resume_path, suffix=".pt") as tmp:
                torch.save({"run_key": run_key, "model": trainable_state(model), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                            "epoch": epoch, "best": best, "history": history}, tmp)
            if _STOP_AFTER_EPOCH is not None and epoch + 1 >= _STOP_AFTER_EPOCH:
                raise _Interrupted(f"stopped after epoch {epoch} (test hook)")

    best_score = best["score"] if best["epoch"] is not None and np.isfinite(best["score"]) else None
    selection = {"criterion": criterion, "setting": cfg["selection"], "best_epoch": best["epoch"],
                 "best_score": best_score}
    state = {
        "trainable": best["state"], "model_cfg": model_cfg, "train_cfg": cfg, "model_name": model_name,
        "arch": model_cfg.get("arch", model_name), "objective": objective, "dims": vars(copy.deepcopy(dims)),
        "seed": int(seed), "fold": int(fold), "best_epoch": best["epoch"], "best_score": best["score"],
        "selection": selection, "gene_scaler": gene_scaler.state_dict(), "gene_names": list(gene_table[1]),
        "covariates": cov_state, "survival_edges": edges.tolist(), "cohort": cohort,
        "fingerprints": fingerprints, "epochs_run": epochs, "probe_lr": probe_lr,
    }
    with atomic_path(out_dir / "state.pt", suffix=".pt") as tmp:
        torch.save(state, tmp)
    hist = pd.DataFrame(history, columns=HISTORY_COLUMNS).astype({c: float for c in HISTORY_COLUMNS[1:]})
    hist["epoch"] = hist["epoch"].astype(int)
    hist["criterion"] = pd.Series([criterion or "none"] * len(hist), dtype=str)
    with atomic_path(out_dir / "history.parquet", suffix=".parquet") as tmp:
        hist.to_parquet(tmp, index=False)
    _plot_curves(hist, out_dir / "curve.png", f"{model_name} seed {seed} fold {fold}")
    resume_path.unlink(missing_ok=True)
    return {"model": model_name, "objective": objective, "best_epoch": best["epoch"],
            "best_score": best["score"], "epochs": epochs, "history": history, "selection": selection}


__all__ = ["AUTO_SELECTION", "HISTORY_COLUMNS", "SELECTIONS", "TRAIN_DEFAULTS", "lr_factor", "resolve_selection",
           "train_run"]
