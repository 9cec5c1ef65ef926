"""Pathway attribution by token occlusion: which pathway tokens carry a model's prediction.

Method: MCAT, SurvPath and ModalTune (its Gene Mixer) all build one token per pathway with a per-pathway
S-MLP tower (``PathwayTowers``). For every test patient with RNA and every pathway p, the tower's output
for p is replaced by the token the tower gives for an average patient (all z-scored genes 0 = the
training mean), the model is rerun, and the change of its task output is recorded. The pathway's score
is the mean absolute change over test patients (``mean_abs_delta``; also the signed mean and its share
of the total). Why this: it is faithful (the model itself is rerun with only that token changed, no
gradient approximation), it works for every architecture with pathway tokens, and replacing the token
rather than zeroing the genes keeps pathways that share genes apart.

Task output: a survival head gives the risk (``-sum S(t)``, as evaluated); a classification head the
log-odds of the class predicted on the intact input; a model without a head (ModalTune, text_kl) the
evaluation's linear probe fitted on the run's TRAIN embeddings (``embeddings.npz``) on the task's token:
Cox log partial hazard on the Survival token, logistic-regression log-odds on the Diagnosis token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from modaltune.errors import InputError
from modaltune.io_utils import atomic_path
from modaltune.probes import cox_design

log = logging.getLogger(__name__)

TASKS = ("survival", "subtype")


def pathway_towers(model):
    """The model's ``PathwayTowers`` module (exactly one), else InputError."""
    from modaltune.models.gene_encoder import PathwayTowers

    towers = [m for m in model.modules() if isinstance(m, PathwayTowers)]
    if len(towers) != 1:
        raise InputError(f"model {type(model).__name__} has {len(towers)} pathway tower modules; pathway "
                         "attribution needs pathway tokens (modaltune, mcat, survpath)")
    return towers[0]


def occlusion_scores(model, batches: Sequence[dict], output_fn: Callable, *, chunk: int = 8) -> np.ndarray:
    """(n_patients, P) change of ``output_fn(model(batch))`` when pathway token p is replaced by the
    average-patient token. ``batches`` hold one patient each; ``output_fn(out)`` returns (B,) floats for a
    batch whose row 0 is the intact input (outputs that depend on the predicted class take it from row 0)."""
    import torch

    towers = pathway_towers(model)
    n_p = towers.n_pathways
    model.eval()
    state = {"paths": None}
    with torch.inference_mode():
        ref_tokens = towers(torch.zeros(1, towers.max_index + 1, device=next(model.parameters()).device))

    def hook(_m, _args, out):
        out = out.clone()
        # Row 0 is the intact input; row r > 0 gets pathway paths[r - 1] replaced.
        paths = state["paths"]
        rows = torch.arange(1, len(paths) + 1, device=out.device)
        out[rows, paths] = ref_tokens[0, paths].to(out.dtype)
        return out

    handle = towers.register_forward_hook(hook)
    deltas = np.zeros((len(batches), n_p))
    try:
        with torch.inference_mode():
            for i, batch in enumerate(batches):
                for start in range(0, n_p, chunk):
                    paths = torch.arange(start, min(n_p, start + chunk), device=ref_tokens.device)
                    # The intact input rides along as row 0, so that it and the occluded rows go through the
                    # same batched kernels: a token the output does not read then changes it by exactly 0
                    # (a separate batch-of-one call can round differently in float32).
                    n = len(paths) + 1
                    rep = {k: (v.expand(n, *v.shape[1:]) if torch.is_tensor(v) and v.shape[:1] == (1,)
                               else (v * n if isinstance(v, list) else v)) for k, v in batch.items()}
                    state["paths"] = paths
                    occ = output_fn(model(rep))
                    deltas[i, start:start + len(paths)] = (occ[1:] - occ[0]).cpu().numpy()
    finally:
        handle.remove()
    return deltas


def head_output(objective: str) -> Callable:
    """output_fn for a model with a task head (see module docstring)."""
    import torch

    from modaltune.losses import risk_from_hazards

    def fn(out):
        if objective == "survival":
            return risk_from_hazards(out["hazards"]).float()
        logits = out["logits"].float()
        cls = logits[:1].argmax(1).expand(logits.shape[0])  # the class predicted for the intact row 0
        logp = torch.log_softmax(logits, 1)
        rows = torch.arange(logits.shape[0], device=logits.device)
        p = logp[rows, cls]
        return p - torch.log1p(-p.exp().clamp(max=1 - 1e-7))  # log-odds of the reference class

    return fn


def probe_output(probe, token: int | None, task: str) -> Callable:
    """output_fn for an embedding model: a fitted probe on token ``token`` of ``out["embedding"]``."""
    import torch

    def fn(out):
        emb = out["embedding"].float()
        x = (emb[:, token] if emb.dim() == 3 else emb).cpu().numpy()
        if task == "survival":
            val = np.asarray(probe["model"].predict_log_partial_hazard(cox_design(probe, x)), float)
        else:
            val = probe.decision_function(x)
            val = val if val.ndim == 1 else val.max(1)
        return torch.from_numpy(np.asarray(val, np.float64))

    return fn


def _fit_probe(embeddings_npz, cases, task: str, token: int | None, seed: int):
    from modaltune.data import read_cases
    from modaltune.probes import fit_cox_probe, fit_lr_probe

    with np.load(embeddings_npz, allow_pickle=False) as z:
        ids, part, emb = z["patient_id"].astype(str), z["partition"].astype(str), z["embedding"]
    x = emb[:, token] if emb.ndim == 3 else emb
    tr = part == "train"
    c = read_cases(cases).loc[ids[tr]]
    if task == "survival":
        probe = fit_cox_probe(x[tr], c["survival_months"].to_numpy(float), c["event"].to_numpy(float))
        if probe["model"] is None:
            raise InputError(f"{embeddings_npz}: Cox probe could not be fitted ({probe['error']})")
        return probe
    probe = fit_lr_probe(x[tr], c["label"].fillna(-1).to_numpy(int), seed=seed)
    if probe is None:
        raise InputError(f"{embeddings_npz}: fewer than two classes among training patients; no subtype probe")
    return probe


def pathway_attribution(*, run_dir, cases, splits, fold: int, pathways_path, feature_files, sheet, out_tsv,
                        out_png, embeddings_npz=None, task: str = "survival", max_patients: int | None = None,
                        top: int = 15, title: str = "") -> pd.DataFrame:
    """Occlusion scores per pathway on the run's test patients -> TSV (all pathways) + bar plot (top)."""
    from modaltune.data import collate_patients
    from modaltune.genomics import load_pathways
    from modaltune.heatmaps import load_run_and_data
    from modaltune.runs import headline_tokens, to_device, token_names

    if task not in TASKS:
        raise InputError(f"heatmaps.attribution.task={task!r}; use one of {list(TASKS)}")
    state, model, ds, device = load_run_and_data(run_dir, cases=cases, splits=splits, fold=fold,
                                                 pathways_path=pathways_path, feature_files=feature_files,
                                                 sheet=sheet, partitions=("test",))
    names = list(load_pathways(pathways_path)[1])
    n_p = pathway_towers(model).n_pathways
    if len(names) != n_p:
        raise InputError(f"pathways {pathways_path}: {len(names)} pathways but the model has {n_p} tokens")
    objective = state["objective"]
    if objective in ("survival", "classification"):
        if (objective == "survival") != (task == "survival"):
            log.info("model %s has a %s head: attributing that head (task %s ignored)", state["model_name"],
                     objective, task)
        task = "survival" if objective == "survival" else "subtype"
        fn, source = head_output(objective), "head"
    else:
        if embeddings_npz is None:
            raise InputError(f"model {state['model_name']} has no task head: pass the run's embeddings.npz")
        with np.load(embeddings_npz, allow_pickle=False) as z:
            k = z["embedding"].shape[1] if z["embedding"].ndim == 3 else None
        tok_names = token_names(model, 3 if k else 2, k)  # the model's own token facts (C3)
        token = tok_names.index(headline_tokens(model, tok_names)[task]) if k else None
        fn, source = probe_output(_fit_probe(embeddings_npz, cases, task, token, int(state["seed"])), token,
                                  task), "probe"
    pids = [p for p in ds.patient_ids if ds.has_genes[p]]
    if max_patients:
        pids = pids[: int(max_patients)]
    if not pids:
        raise InputError(f"run {run_dir}: no test patient with RNA in fold {fold}; nothing to attribute")
    batches = [to_device(collate_patients([ds[ds.patient_ids.index(p)]]), device) for p in pids]
    d = occlusion_scores(model, batches, fn)
    table = pd.DataFrame({
        "pathway": names, "n_genes": [len(g) for g in state["dims"]["pathway_groups"]],
        "mean_abs_delta": np.abs(d).mean(0), "mean_delta": d.mean(0), "sd_delta": d.std(0),
    })
    total = table["mean_abs_delta"].sum()
    table["share"] = table["mean_abs_delta"] / total if total > 0 else 0.0
    table = table.sort_values(["mean_abs_delta", "pathway"], ascending=[False, True]).reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    table["task"], table["output_source"], table["n_patients"] = task, source, len(pids)
    table["model"], table["seed"], table["fold"] = state["model_name"], int(state["seed"]), int(fold)
    with atomic_path(out_tsv) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    _bar_plot(table.head(int(top)), out_png, title=title or f"{state['model_name']}: pathway attribution",
              task=task, source=source, n=len(pids))
    return table


def _bar_plot(top: pd.DataFrame, path, *, title: str, task: str, source: str, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.35 * len(top) + 1.6), constrained_layout=True)
    y = np.arange(len(top))[::-1]
    colors = np.where(top["mean_delta"] >= 0, "#c0392b", "#2e86c1")
    ax.barh(y, top["mean_abs_delta"], color=colors)
    ax.set_yticks(y, top["pathway"], fontsize=8)
    what = "risk" if task == "survival" else "subtype log-odds"
    ax.set_xlabel(f"mean |change of {what} ({source})| when the pathway token is set to average\n"
                  f"(test patients, n = {n})")
    ax.set_title(f"{title}\nred: occlusion raises the output on average, blue: lowers it", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


__all__ = ["head_output", "occlusion_scores", "pathway_attribution", "pathway_towers", "probe_output"]
