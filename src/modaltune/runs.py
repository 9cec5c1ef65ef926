"""What the trainer and the evaluator share about a run: device, AMP, seeding, trainable state, fold
preprocessing, building a model from a saved state, and embedding a dataset.

Neither ``modaltune.training`` nor ``modaltune.evaluation`` imports the other; both import this module.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from modaltune import devices
from modaltune.clinical import encode_covariates
from modaltune.data import collate_patients
from modaltune.errors import InputError
from modaltune.gene_scaler import GeneScaler
from modaltune.models import ModelDims, build_model, needs_slides


# ----------------------------------------------------------------------------------------- device / AMP
def pick_device(name: str = "auto") -> torch.device:
    return devices.pick_device(name, key="training.device")


def amp_settings(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler) for ``training.precision`` (modaltune.devices)."""
    return devices.amp_settings(precision, device, key="training.precision")


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


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def loader(dataset, batch_size: int = 1, shuffle: bool = False, generator=None, num_workers: int = 0):
    return DataLoader(dataset, batch_size=int(batch_size), shuffle=shuffle, generator=generator,
                      collate_fn=collate_patients, num_workers=int(num_workers))


# ----------------------------------------------------------------------------------------- trainable state
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


def build_seeded(model_name: str, model_cfg: dict, dims: ModelDims, seed: int, device) -> torch.nn.Module:
    """The registered model, built right after ``torch.manual_seed(seed)`` so frozen random-init parts
    rebuild identically at evaluation."""
    torch.manual_seed(seed)
    cfg = {k: v for k, v in model_cfg.items() if k != "training"}
    return build_model(model_cfg.get("arch", model_name), cfg, dims).to(device)


def load_state(run_dir) -> dict:
    path = Path(run_dir) / "state.pt"
    if not path.exists():
        raise InputError(f"{path} does not exist; run the train rule for this model/seed/fold first")
    # Our own file, holding plain config dicts and scaler states besides tensors.
    return torch.load(path, map_location="cpu", weights_only=False)


def build_from_state(state: dict, device) -> torch.nn.Module:
    """The trained model of a ``state.pt`` dict in eval mode on ``device``."""
    model = build_seeded(state["model_name"], state["model_cfg"], ModelDims(**state["dims"]), int(state["seed"]),
                         device)
    load_trainable(model, {k: v.to(device) for k, v in state["trainable"].items()})
    model.eval()
    return model


# ------------------------------------------------------------------------------------------ model facts
def token_names(model, embedding_ndim: int, n_tokens: int | None = None) -> tuple[str, ...]:
    """The model's ``token_names`` (C3); models without the attribute: "embedding" or token_i."""
    names = getattr(model, "token_names", None)
    if names is not None and (embedding_ndim == 2 or len(names) == n_tokens):
        return tuple(names)
    if embedding_ndim == 2:
        return ("embedding",)
    return tuple(f"token_{i}" for i in range(int(n_tokens or 0)))


def headline_tokens(model, names: tuple[str, ...]) -> dict[str, str]:
    """{"subtype": token, "survival": token}; defaults to the first token."""
    want = dict(getattr(model, "headline_tokens", None) or {})
    return {task: (want.get(task) if want.get(task) in names else names[0]) for task in ("subtype", "survival")}


# ------------------------------------------------------------------------------------- fold preprocessing
def task_classes(cases: pd.DataFrame, where: str = "cases") -> int:
    """Number of subtype classes of the task: the distinct labels >= 0 of the cohort (never -1 cases).

    Labels must be 0..K-1 (the class map's codes); a gap would give the head an output no patient has.
    """
    labels = pd.to_numeric(cases["label"], errors="coerce").fillna(-1).astype(int)
    present = sorted(set(labels[labels >= 0].tolist()))
    if present and present != list(range(len(present))):
        raise InputError(f"{where}: subtype labels must be 0..K-1, found {present}; fix the label map "
                         "(config cohorts.<name>.label_map) so classes are numbered from 0 without gaps")
    return max(2, len(present))



def fit_fold_preprocessing(cases: pd.DataFrame, train_ids, gene_table, use_clinical: bool = True):
    """GeneScaler and clinical covariates fitted on the fold's TRAIN patients only (method bugs 7, 8)."""
    genes_df, gene_names, _ = gene_table
    train_ids = [str(p) for p in train_ids]
    with_rna = [p for p in train_ids if p in genes_df.index]
    if not with_rna:
        raise InputError("fold has no training patient with RNA; cannot fit the gene scaler")
    scaler = GeneScaler().fit(genes_df.loc[with_rna, gene_names])
    cov_state = None
    if use_clinical:
        _, _, cov_state = encode_covariates(cases.reset_index(drop=True), train_ids)
    return scaler, cov_state


def restore_preprocessing(state: dict):
    return GeneScaler.from_state_dict(state["gene_scaler"]), state["covariates"]


# ---------------------------------------------------------------------------------------------- embedding
@torch.inference_mode()
def embed_dataset(model, dataset, *, device="cpu", batch_size: int = 1, amp_dtype=None,
                  desc: str = "embed", num_workers: int = 0, on_batch=None) -> dict:
    """Run the model in eval mode over a dataset; embeddings (P, E) or (P, K, E) plus logits/hazards.

    ``on_batch(out, batch)``: called for every batch (the trainer's val pass adds up its loss there)."""
    model.eval()
    ids, embs, logits, hazards = [], [], [], []
    dev_type = torch.device(device).type
    for batch in tqdm(loader(dataset, batch_size, num_workers=num_workers), desc=desc, leave=False, disable=None):
        batch = to_device(batch, device)
        with torch.autocast(device_type=dev_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(batch)
        if on_batch is not None:
            on_batch(out, batch)
        ids += batch["patient_id"]
        embs.append(out["embedding"].float().cpu().numpy())
        if out.get("logits") is not None:
            logits.append(out["logits"].float().cpu().numpy())
        if out.get("hazards") is not None:
            hazards.append(out["hazards"].float().cpu().numpy())
    return {
        "patient_id": ids,
        "embedding": np.concatenate(embs) if embs else np.zeros((0, 0), np.float32),
        "logits": np.concatenate(logits) if logits else None,
        "hazards": np.concatenate(hazards) if hazards else None,
    }


__all__ = ["amp_settings", "build_from_state", "build_seeded", "embed_dataset", "fit_fold_preprocessing",
           "headline_tokens", "load_state", "load_trainable", "loader", "pick_device", "restore_preprocessing",
           "seed_everything", "task_classes", "to_device", "token_names", "trainable_state"]
