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

import numpy as np
import pandas as pd
import torch

from modaltune.errors import InputError
from modaltune.io_utils import atomic_path
from modaltune.models.registry import needs_slides

log = logging.getLogger(__name__)

TRAIN_DEFAULTS = {
    "epochs": 15, "lr": 1e-4, "weight_decay": 5e-4, "warmup_epochs": 10, "warmup_start_factor": 1 / 20,
    "grad_accum": 1, "batch_size": 1, "max_patches": 25000, "num_workers": 0, "device": "auto",
    "precision": "auto", "selection": "bacc", "kl_weight": 10.0, "kl_tau": 1.0, "coords_space": "target",
    "slide_gap": 1500, "projector_dim": 256, "n_bins": 4, "surv_alpha": 0.0, "probe_penalizer": 0.1,
    # Patients whose slides all failed: left out of training, probes and test for every model alike, since
    # slide-encoder models cannot embed an empty bag and comparisons must stay paired.
    "drop_patients_without_slides": True,
    # True: that rule applies only to models that read slides; RNA/clinical-only models keep those patients.
    "keep_slideless_for_non_slide_models": False,
}

# Test hook: raise after this many finished epochs (the resume file is already written), to simulate a kill.
_STOP_AFTER_EPOCH: int | None = None


class _Interrupted(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ helpers
def file_sha256(path) -> str | None:
    if path is None or not Path(str(path)).exists():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def amp_settings(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler): bf16 where supported, fp16 + scaler otherwise, fp32 on CPU."""
    if device.type != "cuda" or precision in ("fp32", "32"):
        return None, False
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return (torch.bfloat16, False) if precision == "bf16" else (torch.float16, True)


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)


def lr_factor(epoch: int, epochs: int, warmup: int, start: float = 1 / 20) -> float:
    """Linear warmup from ``start`` x lr to lr over ``warmup`` epochs, then cosine to 0 (any epoch count)."""
    warmup = max(0, min(int(warmup), epochs - 1))
    if epoch < warmup:
        return start + (1 - start) * epoch / warmup
    span = max(1, epochs - warmup)
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / span))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """requires_grad parameters plus buffers of modules that own trainable parameters (never frozen parts)."""
    out = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    persistent = set(model.state_dict().keys())  # non-persistent buffers are derived, never saved
    for mname, mod in model.named_modules():
        if not any(p.requires_grad for p in mod.parameters(recurse=False)):
            continue
        for bname, buf in mod.named_buffers(recurse=False):
            key = f"{mname}.{bname}" if mname else bname
            if key in persistent:
                out[key] = buf.detach().cpu().clone()
    return out


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = trainable_state(model)
    unexpected = sorted(set(state) - set(model.state_dict()))
    missing = sorted(set(expected) - set(state))
    if unexpected or missing:
        raise InputError(f"trainable state does not fit the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; the run was made with another model config")
    model.load_state_dict(state, strict=False)


def fit_fold_preprocessing(cases: pd.DataFrame, split: pd.DataFrame, gene_table, use_clinical: bool = True):
    """GeneScaler and clinical covariates fitted on the fold's TRAIN patients only (method bugs 7, 8)."""
    from modaltune.genomics import GeneScaler

    genes_df, gene_names, _ = gene_table
    train_ids = split.loc[split["partition"] == "train", "patient_id"].astype(str).tolist()
    with_rna = [p for p in train_ids if p in genes_df.index]
    if not with_rna:
        raise InputError("fold has no training patient with RNA; cannot fit the gene scaler")
    scaler = GeneScaler().fit(genes_df.loc[with_rna, gene_names])
    cov_state = None
    if use_clinical:
        from modaltune.clinical import encode_covariates

        _, _, cov_state = encode_covariates(cases.reset_index(drop=True), train_ids)
    return scaler, cov_state


def restore_preprocessing(state: dict):
    from modaltune.genomics import GeneScaler

    return GeneScaler.from_state_dict(state["gene_scaler"]), state["covariates"]


def _build(model_name: str, model_cfg: dict, dims, seed: int, device):
    from modaltune.models import build_model

    torch.manual_seed(seed)  # frozen random-init parts must rebuild identically at evaluation
    cfg = {k: v for k, v in model_cfg.items() if k != "training"}
    model = build_model(model_cfg.get("arch", model_name), cfg, dims)
    return model.to(device)


def build_from_state(state: dict, device) -> torch.nn.Module:
    from modaltune.models import ModelDims

    model = _build(state["model_name"], state["model_cfg"], ModelDims(**state["dims"]), int(state["seed"]), device)
    load_trainable(model, {k: v.to(device) for k, v in state["trainable"].items()})
    model.eval()
    return model


SLIDE_ENCODER_ARCHS = ("modaltune", "slide_encoder_lp", "slide_encoder_tuned")


def grid_of(model_cfg: dict) -> tuple[int | None, int]:
    """(slide_ngrids, tile_size) of a model's positional grid, None for models that ignore positions."""
    # late fusion keeps its slide encoder's block under slide.backbone
    b = model_cfg.get("backbone") or (model_cfg.get("slide") or {}).get("backbone") or {}
    ngrids = b.get("slide_ngrids", model_cfg.get("slide_ngrids"))
    tile = b.get("tile_size", model_cfg.get("tile_size", 256))
    if ngrids is None and model_cfg.get("arch") in SLIDE_ENCODER_ARCHS:
        ngrids = 1000  # Prov-GigaPath default (paper_config)
    return (None if ngrids is None else int(ngrids)), int(tile)


def drops_slideless(cfg: dict, model_cfg: dict, model_name: str, feature_files) -> bool:
    """Whether patients without a usable slide are left out of this run.

    Models that read slides always drop them (an empty bag cannot be embedded). Models that read none keep
    them when ``keep_slideless_for_non_slide_models`` is set, or when the cohort has no slides at all
    (RNA + clinical only: dropping would leave nobody).
    """
    if not cfg.get("drop_patients_without_slides", True):
        return False
    if needs_slides(model_cfg.get("arch", model_name), model_cfg):
        return True
    return not cfg.get("keep_slideless_for_non_slide_models", False) and bool(list(feature_files))


def _objective(model, model_cfg: dict) -> str:
    obj = getattr(model, "objective", None) or model_cfg.get("objective") or "none"
    if obj not in ("text_kl", "classification", "survival", "none"):
        raise InputError(f"model {model_cfg.get('arch')}: unknown objective {obj!r}")
    return obj


# ----------------------------------------------------------------------------------------------- loss
class _LossFn:
    def __init__(self, objective, projector, edges, cfg):
        self.objective, self.projector, self.edges, self.cfg = objective, projector, edges, cfg

    def __call__(self, out: dict, batch: dict) -> torch.Tensor | None:
        from modaltune.losses import classification_loss, discrete_survival_nll, text_kl_loss, time_to_bin

        if self.objective == "text_kl":
            emb = out["embedding"]
            text = batch["text"].float()
            idx = [0, 1, 3] if emb.ndim == 3 and emb.shape[1] == 3 else [0]
            with torch.autocast(device_type=emb.device.type, enabled=False):  # projector in fp32 (method 3.1)
                tgt = self.projector(text[:, idx])
            emb3 = emb if emb.ndim == 3 else emb[:, None]
            return text_kl_loss(emb3.float(), tgt.float(), weight=self.cfg["kl_weight"], tau=self.cfg["kl_tau"])
        if self.objective == "classification":
            if not bool((batch["label"] >= 0).any()):
                return None
            return classification_loss(out["logits"], batch["label"])
        if self.objective == "survival":
            bins = torch.from_numpy(time_to_bin(batch["time"].cpu().numpy(), self.edges)).to(batch["time"].device)
            if not bool(((bins >= 0) & torch.isfinite(batch["event"])).any()):
                return None
            return discrete_survival_nll(out["hazards"], bins, batch["event"], alpha=self.cfg["surv_alpha"])
        return None


def _loader(ds, cfg, shuffle: bool, generator=None):
    from torch.utils.data import DataLoader

    from modaltune.data import collate_patients

    return DataLoader(ds, batch_size=int(cfg["batch_size"]), shuffle=shuffle, generator=generator,
                      collate_fn=collate_patients, num_workers=int(cfg["num_workers"]))


def _val_metrics(model, ds_train, ds_val, loss_fn, cfg, device, amp_dtype, seed) -> dict:
    """Val loss + probes on the General token (method 3.4): fitted on train embeddings, scored on val."""
    from modaltune.evaluation import embed_dataset, probe_embeddings, to_device

    model.eval()
    losses = []
    with torch.inference_mode():
        for batch in _loader(ds_val, cfg, shuffle=False):
            batch = to_device(batch, device)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(batch)
            loss = loss_fn(out, batch)
            if loss is not None:
                losses.append(float(loss) * len(batch["patient_id"]))
    tr = embed_dataset(model, ds_train, device=device, amp_dtype=amp_dtype, desc="probe train")
    va = embed_dataset(model, ds_val, device=device, amp_dtype=amp_dtype, desc="probe val")
    ids = tr["patient_id"] + va["patient_id"]
    x = np.concatenate([tr["embedding"], va["embedding"]])
    x = x[:, 0] if x.ndim == 3 else x
    part = np.array(["train"] * len(tr["patient_id"]) + ["val"] * len(va["patient_id"]))
    cases = ds_train.cases
    labels = np.array([int(v) if pd.notna(v) else -1 for v in cases.loc[ids, "label"]])
    times = cases.loc[ids, "survival_months"].to_numpy(float)
    events = cases.loc[ids, "event"].to_numpy(float)
    survival = "cindex" in cfg["selection"] or cfg.get("val_cindex", True)
    sites = cases.loc[ids, "site"].astype(str).to_numpy() if "site" in cases.columns else np.array([""] * len(ids))
    groups = [sites == s for s in sorted(set(sites))] if len(set(sites)) > 1 else [np.ones(len(ids), bool)]
    baccs, cis = [], []
    for m in groups:  # pan-cancer: per-site probes, mean over sites (method 3.6)
        r = probe_embeddings(x[m], part[m], labels[m], times[m], events[m], penalizer=cfg["probe_penalizer"],
                             seed=seed, survival=survival)
        baccs.append(r["val_bacc"])
        cis.append(r.get("val_cindex"))
    baccs = [b for b in baccs if b is not None]
    cis = [c for c in cis if c is not None]
    return {
        "val_loss": float(np.sum(losses) / max(1, len(ds_val))) if losses else float("nan"),
        "val_bacc": float(np.mean(baccs)) if baccs else float("nan"),
        "val_cindex": float(np.mean(cis)) if cis else float("nan"),
    }


def _selection_score(row: dict, selection: str) -> float:
    if selection == "bacc":
        return row["val_bacc"]
    if selection == "bacc+cindex":
        vals = [v for v in (row["val_bacc"], row["val_cindex"]) if np.isfinite(v)]
        return float(np.mean(vals)) if vals else float("nan")
    if selection == "loss":
        return -row["val_loss"]
    raise InputError(f"train_cfg.selection must be 'bacc', 'bacc+cindex' or 'loss', got {selection!r}")


def _plot_curves(history: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    if len(history):
        ax[0].plot(history["epoch"], history["train_loss"], "o-", label="train")
        ax[0].plot(history["epoch"], history["val_loss"], "o-", label="val")
        ax[1].plot(history["epoch"], history["val_bacc"], "o-", label="val bal. acc (probe)")
        ax[1].plot(history["epoch"], history["val_cindex"], "o-", label="val C-index (probe)")
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
              seed: int, pathways_path, feature_files: list[str], sheet, text_h5=None, out_dir) -> dict:
    """Train one (model, seed, fold); write ``state.pt``, ``history.parquet`` and ``curve.png`` in ``out_dir``.

    Resumable: after every epoch ``out_dir/.resume.pt`` holds the full training state (model, optimiser,
    scheduler, grad scaler, RNG states, history, best so far); a restarted call continues from it and
    ends with the same state as an uninterrupted run. Returns a summary dict (best epoch, history rows).
    """
    from tqdm.auto import tqdm

    from modaltune.data import PatientDataset, load_gene_table, read_cases, read_splits
    from modaltune.evaluation import cohort_name, to_device
    from modaltune.losses import survival_bins
    from modaltune.models import ModelDims

    cfg = {**TRAIN_DEFAULTS, **(train_cfg or {}), **(model_cfg.get("training") or {})}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg["device"])
    amp_dtype, use_scaler = amp_settings(cfg["precision"], device)
    seed_everything(int(seed), device)

    cases = read_cases(cases_path)
    split = read_splits(splits_path, fold)
    gene_table = load_gene_table(pathways_path)
    gene_scaler, cov_state = fit_fold_preprocessing(cases, split, gene_table)
    train_ids = split.loc[split["partition"] == "train", "patient_id"].tolist()
    tr_cases = cases.loc[train_ids]
    edges = survival_bins(tr_cases["survival_months"], tr_cases["event"], int(cfg["n_bins"]))
    ngrids, tile = grid_of(model_cfg)
    common = dict(feature_files=feature_files, sheet=sheet, pathways_path=pathways_path, text_h5=text_h5,
                  gene_scaler=gene_scaler, covariate_state=cov_state, coords_space=cfg["coords_space"],
                  slide_gap=cfg["slide_gap"], seed=int(seed), grid_ngrids=ngrids, grid_tile=tile,
                  gene_table=gene_table,
                  drop_without_slides=drops_slideless(cfg, model_cfg, model_name, feature_files))
    ds_train = PatientDataset(cases, split, fold, ["train"], max_patches=cfg["max_patches"], train=True, **common)
    ds_probe = PatientDataset(cases, split, fold, ["train"], max_patches=None, train=False, **common)
    ds_val = PatientDataset(cases, split, fold, ["val"], max_patches=None, train=False, **common)
    labels = pd.to_numeric(cases["label"], errors="coerce").fillna(-1)
    dims = ModelDims(feature_dim=ds_train.feature_dim, n_genes=len(gene_table[1]),
                     pathway_groups=gene_table[2], clinical_dim=int(ds_train.clinical.shape[1]),
                     n_classes=max(2, int(labels.max()) + 1), n_bins=int(cfg["n_bins"]),
                     text_dim=int(ds_train.text_dim))
    model = _build(model_name, model_cfg, dims, int(seed), device)
    objective = _objective(model, model_cfg)

    projector = None
    if objective == "text_kl":
        if text_h5 is None:
            raise InputError(f"model {model_name}: objective text_kl needs text targets (text/fold_{fold}.h5)")
        from modaltune.text import make_text_projector

        projector = make_text_projector(dims.text_dim, int(cfg["projector_dim"]), seed=int(seed)).to(device)
        projector.eval()
        for p in projector.parameters():
            p.requires_grad_(False)
    loss_fn = _LossFn(objective, projector, edges, cfg)

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
        opt = torch.optim.AdamW(params, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]),
                                betas=(0.9, 0.999))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda e: lr_factor(e, epochs, int(cfg["warmup_epochs"]), float(cfg["warmup_start_factor"])))
        scaler = torch.amp.GradScaler(device.type, enabled=use_scaler, init_scale=2.0**15)
        run_key = {"model_cfg": model_cfg, "train_cfg": cfg, "seed": int(seed), "fold": int(fold),
                   "fingerprints": fingerprints}
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
            loader = _loader(ds_train, cfg, shuffle=True, generator=gen)
            bar = tqdm(loader, desc=f"{model_name} s{seed} f{fold} e{epoch}", leave=False, disable=None)
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
                if pending and ((step + 1) % accum == 0 or step + 1 == len(loader)):
                    pending = False
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad(set_to_none=True)
            lr = opt.param_groups[0]["lr"]
            sched.step()
            val = _val_metrics(model, ds_probe, ds_val, loss_fn, cfg, device, amp_dtype, int(seed))
            row = {"epoch": epoch, "lr": lr, "train_loss": tot / max(1, n_seen), **val,
                   "seconds": time.time() - t0}
            history.append(row)
            score = _selection_score(row, cfg["selection"])
            if np.isfinite(score) and score >= best["score"]:  # ties -> later epoch, as the paper
                best = {"epoch": epoch, "score": float(score), "state": trainable_state(model)}
            elif not np.isfinite(score) and not np.isfinite(best["score"]):
                # No finite criterion yet (e.g. a one-class val set): keep the latest epoch.
                best = {"epoch": epoch, "score": -math.inf, "state": trainable_state(model)}
            log.info("%s seed %d fold %d epoch %d/%d: lr %.2e train_loss %.4f val_loss %.4f val_bacc %.3f "
                     "val_cindex %.3f (%.1fs)", model_name, seed, fold, epoch + 1, epochs, lr, row["train_loss"],
                     row["val_loss"], row["val_bacc"], row["val_cindex"], row["seconds"])
            with atomic_path(resume_path, suffix=".pt") as tmp:
                torch.save({"run_key": run_key, "model": trainable_state(model), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                            "epoch": epoch, "best": best, "history": history}, tmp)
            if _STOP_AFTER_EPOCH is not None and epoch + 1 >= _STOP_AFTER_EPOCH:
                raise _Interrupted(f"stopped after epoch {epoch} (test hook)")

    state = {
        "trainable": best["state"], "model_cfg": model_cfg, "train_cfg": cfg, "model_name": model_name,
        "arch": model_cfg.get("arch", model_name), "objective": objective, "dims": vars(copy.deepcopy(dims)),
        "seed": int(seed), "fold": int(fold), "best_epoch": best["epoch"], "best_score": best["score"],
        "gene_scaler": gene_scaler.state_dict(), "gene_names": list(gene_table[1]), "covariates": cov_state,
        "survival_edges": edges.tolist(), "cohort": cohort_name(cases_path), "fingerprints": fingerprints,
        "epochs_run": epochs,
    }
    with atomic_path(out_dir / "state.pt", suffix=".pt") as tmp:
        torch.save(state, tmp)
    cols = ["epoch", "lr", "train_loss", "val_loss", "val_bacc", "val_cindex", "seconds"]
    hist = pd.DataFrame(history, columns=cols)
    with atomic_path(out_dir / "history.parquet", suffix=".parquet") as tmp:
        hist.to_parquet(tmp, index=False)
    _plot_curves(hist, out_dir / "curve.png", f"{model_name} seed {seed} fold {fold}")
    resume_path.unlink(missing_ok=True)
    return {"model": model_name, "objective": objective, "best_epoch": best["epoch"],
            "best_score": best["score"], "epochs": epochs, "history": history}


__all__ = ["TRAIN_DEFAULTS", "build_from_state", "drops_slideless", "fit_fold_preprocessing", "lr_factor", "train_run",
           "trainable_state"]
