"""The one evaluator: frozen embeddings of every patient, linear probes fitted on TRAIN only, metrics.json.

Probes follow method 3.4/4.2: sklearn LogisticRegression (balanced accuracy, plus AUROC) for the subtype
and a lifelines CoxPH (Harrell C-index of -partial hazard) for survival, both fitted on the training
partition's embeddings and scored on val/test. Test labels never reach a ``fit`` call.

Token choice (method 4.2 is ambiguous): every ModalTune token is probed and reported under ``tokens``;
the headline ``subtype_bacc`` uses the Diagnosis token and ``survival_cindex`` the Survival token.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from modaltune.errors import InputError
from modaltune.io_utils import atomic_path, write_json

log = logging.getLogger(__name__)

TOKEN_NAMES = {3: ["general", "diagnosis", "survival"]}
HEADLINE = {"subtype": "diagnosis", "survival": "survival"}


def token_names(k: int | None) -> list[str]:
    if k is None:
        return ["embedding"]
    return TOKEN_NAMES.get(k, [f"token_{i}" for i in range(k)])


# ------------------------------------------------------------------------------------------------ probes
def fit_lr_probe(x_train: np.ndarray, y_train: np.ndarray, seed: int = 0, max_iter: int = 1000):
    """StandardScaler + LogisticRegression (max_iter 1000, no class weights as the paper, multinomial)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    keep = y_train >= 0
    if len(np.unique(y_train[keep])) < 2:
        return None
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    pipe.fit(x_train[keep], y_train[keep])
    return pipe


def score_classifier(pipe, x: np.ndarray, y: np.ndarray) -> dict:
    """Balanced accuracy and AUROC (one-vs-rest macro for > 2 classes) on rows with a label >= 0."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    keep = y >= 0
    out = {"bacc": None, "auroc": None, "n": int(keep.sum())}
    if pipe is None or keep.sum() == 0:
        return out
    x, y = x[keep], y[keep]
    out["bacc"] = float(balanced_accuracy_score(y, pipe.predict(x)))
    proba = pipe.predict_proba(x)
    classes = list(pipe.classes_)
    if len(np.unique(y)) >= 2 and set(np.unique(y)) <= set(classes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if len(classes) == 2:
                out["auroc"] = float(roc_auc_score(y, proba[:, 1]))
            else:
                out["auroc"] = float(roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=classes))
    return out


def fit_cox_probe(x_train: np.ndarray, times: np.ndarray, events: np.ndarray, penalizer: float = 0.1,
                  pca: int | str | None = None, retries: int = 2) -> dict:
    """lifelines CoxPHFitter on standardised embedding dims, fitted on training rows only.

    ``pca``: None keeps every dim (the paper: 256 covariates, penalizer 0.1); "auto" projects to at most
    n_events/5 principal components when there are fewer than 5 events per dim (a common rule of thumb
    for Cox models); an int fixes the number of components. A ConvergenceError or non-finite fit is
    retried with a 10x larger penalizer; after ``retries`` it is recorded, never replaced by 0 or 0.5.
    """
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    ok = np.isfinite(times) & np.isfinite(events)
    x, t, e = x_train[ok], times[ok], events[ok]
    res = {"model": None, "scaler": None, "pca": None, "keep": None, "penalizer": penalizer, "converged": False,
           "error": None}
    n_events = int(e.sum())
    if n_events < 2:
        res["error"] = f"only {n_events} events among training patients; Cox probe not fitted"
        return res
    scaler = StandardScaler().fit(x)
    # lifelines rescales every covariate by its std: a constant dim (dead ReLU unit) would give NaN.
    keep = scaler.var_ > 1e-12
    if not keep.any():
        res["error"] = "every embedding dim is constant on the training patients; Cox probe not fitted"
        return res
    res["keep"] = keep
    z = scaler.transform(x)[:, keep]
    n_comp = None
    if pca == "auto" and z.shape[1] > max(1, n_events // 5):
        n_comp = max(1, n_events // 5)
    elif isinstance(pca, int):
        n_comp = pca
    if n_comp is not None:
        n_comp = min(n_comp, z.shape[0] - 1, z.shape[1])
        res["pca"] = PCA(n_components=n_comp, random_state=0).fit(z)
        z = res["pca"].transform(z)
    cols = [f"x{i}" for i in range(z.shape[1])]
    df = pd.DataFrame(z, columns=cols)
    df["T"], df["E"] = np.maximum(t, 1e-6), e
    pen = float(penalizer)
    for attempt in range(retries + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cph = CoxPHFitter(penalizer=pen).fit(df, duration_col="T", event_col="E")
            if not np.all(np.isfinite(cph.params_.to_numpy())):
                raise FloatingPointError("non-finite Cox coefficients")
            res.update(model=cph, scaler=scaler, penalizer=pen, converged=True, error=None)
            return res
        except (ConvergenceError, FloatingPointError, np.linalg.LinAlgError, ValueError) as exc:
            res["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]} (penalizer {pen})"
            log.warning("Cox probe attempt %d failed: %s", attempt + 1, res["error"])
            pen *= 10.0
    res["penalizer"] = pen / 10.0
    return res


def harrell_c(times: np.ndarray, risk: np.ndarray, events: np.ndarray) -> float | None:
    """lifelines' Harrell C of -risk; None when no pair is comparable (e.g. no event in a tiny test set)."""
    from lifelines.utils import concordance_index

    ok = np.isfinite(times) & np.isfinite(events) & np.isfinite(risk)
    if ok.sum() < 2 or events[ok].sum() < 1:
        return None
    try:
        return float(concordance_index(times[ok], -risk[ok], events[ok]))
    except ZeroDivisionError:
        return None


def cox_cindex(probe: dict, x: np.ndarray, times: np.ndarray, events: np.ndarray) -> float | None:
    """Harrell's C of -partial hazard (higher hazard = shorter survival); None when not computable."""
    if probe is None or probe.get("model") is None:
        return None
    ok = np.isfinite(times) & np.isfinite(events)
    if ok.sum() < 2 or events[ok].sum() < 1:
        return None
    z = probe["scaler"].transform(x[ok])
    if probe.get("keep") is not None:
        z = z[:, probe["keep"]]
    if probe["pca"] is not None:
        z = probe["pca"].transform(z)
    df = pd.DataFrame(z, columns=[f"x{i}" for i in range(z.shape[1])])
    risk = np.asarray(probe["model"].predict_partial_hazard(df), float)
    if not np.all(np.isfinite(risk)):
        return None
    return harrell_c(times[ok], risk, events[ok])


def probe_embeddings(emb: np.ndarray, part: np.ndarray, labels: np.ndarray, times: np.ndarray,
                     events: np.ndarray, *, penalizer: float = 0.1, pca=None, seed: int = 0,
                     survival: bool = True, lr_max_iter: int = 1000) -> dict:
    """Fit both probes on the rows with ``part == "train"``, score them on val and test."""
    tr = part == "train"
    pipe = fit_lr_probe(emb[tr], labels[tr], seed=seed, max_iter=lr_max_iter)
    out: dict = {}
    for p in ("val", "test"):
        s = score_classifier(pipe, emb[part == p], labels[part == p])
        out[f"{p}_bacc"], out[f"{p}_auroc"] = s["bacc"], s["auroc"]
    if survival:
        cox = fit_cox_probe(emb[tr], times[tr], events[tr], penalizer=penalizer, pca=pca)
        for p in ("val", "test"):
            m = part == p
            out[f"{p}_cindex"] = cox_cindex(cox, emb[m], times[m], events[m])
        out["cox"] = {"converged": cox["converged"], "penalizer": cox["penalizer"], "error": cox["error"]}
    return out


# ---------------------------------------------------------------------------------------------- embedding
@torch.inference_mode()
def embed_dataset(model, dataset, *, device="cpu", batch_size: int = 1, amp_dtype=None,
                  desc: str = "embed") -> dict:
    """Run the model in eval mode over a dataset; embeddings (P, E) or (P, K, E) plus logits/hazards."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from modaltune.data import collate_patients

    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_patients)
    ids, embs, logits, hazards = [], [], [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=None):
        batch = to_device(batch, device)
        with torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(batch)
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


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------- runs
def cohort_name(cases_path) -> str:
    """results/{cohort}/clinical/cases.parquet -> cohort; otherwise the file's folder name."""
    p = Path(str(cases_path)).resolve()
    return p.parent.parent.name if p.parent.name == "clinical" else p.parent.name


def load_state(run_dir) -> dict:
    path = Path(run_dir) / "state.pt"
    if not path.exists():
        raise InputError(f"{path} does not exist; run the train rule for this model/seed/fold first")
    # Our own file, holding plain config dicts and scaler states besides tensors.
    return torch.load(path, map_location="cpu", weights_only=False)


def _head_metrics(emb: dict, labels, times, events, part, objective: str) -> dict | None:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from modaltune.losses import risk_from_hazards

    test = part == "test"
    if objective == "classification" and emb["logits"] is not None:
        lg, y = emb["logits"][test], labels[test]
        keep = y >= 0
        if not keep.any():
            return {"bacc": None, "auroc": None}
        pred = lg[keep].argmax(1)
        prob = torch.softmax(torch.from_numpy(lg[keep]), 1).numpy()
        auroc = None
        if len(np.unique(y[keep])) >= 2:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                auroc = (float(roc_auc_score(y[keep], prob[:, 1])) if prob.shape[1] == 2 else
                         float(roc_auc_score(y[keep], prob, multi_class="ovr", labels=list(range(prob.shape[1])))))
        return {"bacc": float(balanced_accuracy_score(y[keep], pred)), "auroc": auroc}
    if objective == "survival" and emb["hazards"] is not None:
        risk = risk_from_hazards(torch.from_numpy(emb["hazards"][test])).numpy()
        return {"cindex": harrell_c(times[test], risk, events[test])}
    return None


def evaluate_run(*, run_dir, cases_path, splits_path, fold: int, pathways_path, feature_files, sheet,
                 text_h5=None, out_metrics, out_embeddings, probe_cfg: dict | None = None,
                 eval_cohort: str | None = None) -> dict:
    """Embed every train/val/test patient with the run's frozen weights, probe, write metrics + embeddings.

    Out-of-distribution (the inputs belong to another cohort than the run's): the gene scaler and the
    clinical covariates are refitted on the target cohort's TRAIN patients, the weights stay the same.
    Writes ``out_metrics`` (JSON, one schema for all models) and ``out_embeddings`` (npz:
    patient_id, partition, embedding).
    """
    from modaltune.data import PatientDataset, load_gene_table, read_cases, read_splits
    from modaltune.training import (
        build_from_state,
        drops_slideless,
        file_sha256,
        fit_fold_preprocessing,
        grid_of,
        pick_device,
    )

    probe_cfg = dict(probe_cfg or {})
    state = load_state(run_dir)
    train_cfg, model_cfg = state["train_cfg"], state["model_cfg"]
    seed, objective = int(state["seed"]), state["objective"]
    train_cohort = state.get("cohort")
    eval_cohort = eval_cohort or cohort_name(cases_path)
    same_cases = state["fingerprints"].get("cases") == file_sha256(cases_path)
    ood = eval_cohort != train_cohort or not same_cases

    cases = read_cases(cases_path)
    split = read_splits(splits_path, fold)
    gene_table = load_gene_table(pathways_path)
    if gene_table[1] != list(state["gene_names"]):
        missing = sorted(set(state["gene_names"]) - set(gene_table[1]))
        if missing:
            raise InputError(f"pathways {pathways_path}: {len(missing)} genes the model was trained on are "
                             f"missing (e.g. {missing[:5]}); rebuild it with the training cohort's gene list")
        df = gene_table[0][list(state["gene_names"])]
        gene_table = (df, list(state["gene_names"]), state["dims"]["pathway_groups"])
    if ood:
        # Never the target's val/test: refit on its training partition only (method 4.3, bug 7).
        gene_scaler, cov_state = fit_fold_preprocessing(cases, split, gene_table, use_clinical=state["covariates"]
                                                        is not None)
    else:
        from modaltune.training import restore_preprocessing

        gene_scaler, cov_state = restore_preprocessing(state)

    device = pick_device(train_cfg.get("device", "auto"))
    model = build_from_state(state, device)
    ngrids, tile = grid_of(model_cfg)
    ds = PatientDataset(
        cases, split, fold, ["train", "val", "test"], feature_files=feature_files, sheet=sheet,
        pathways_path=pathways_path, text_h5=None, gene_scaler=gene_scaler, covariate_state=cov_state,
        coords_space=train_cfg.get("coords_space", "target"), slide_gap=train_cfg.get("slide_gap", 1500),
        max_patches=probe_cfg.get("max_patches"), seed=seed, train=False,
        subsample_eval=probe_cfg.get("max_patches") is not None, grid_ngrids=ngrids, grid_tile=tile,
        gene_table=gene_table, drop_without_slides=drops_slideless(train_cfg, model_cfg, state["model_name"], feature_files),
    )
    if cov_state is not None and ds.clinical.shape[1] != state["dims"]["clinical_dim"]:
        raise InputError(f"cases {cases_path}: clinical covariates have {ds.clinical.shape[1]} columns, the "
                         f"model expects {state['dims']['clinical_dim']}; use the same covariate vocabulary")
    emb = embed_dataset(model, ds, device=device, desc=f"embed fold {fold}")
    ids = emb["patient_id"]
    part = np.array([ds.partition[p] for p in ids])
    labels = np.array([int(cases.at[p, "label"]) if pd.notna(cases.at[p, "label"]) else -1 for p in ids])
    times = cases.loc[ids, "survival_months"].to_numpy(float)
    events = cases.loc[ids, "event"].to_numpy(float)
    sites = (cases.loc[ids, "site"].astype(str).to_numpy() if "site" in cases.columns
             else np.array([""] * len(ids)))
    x = emb["embedding"]
    names = token_names(x.shape[1] if x.ndim == 3 else None)
    pen = float(probe_cfg.get("cox_penalizer", probe_cfg.get("penalizer", 0.1)))
    pca, max_iter = probe_cfg.get("cox_pca"), int(probe_cfg.get("lr_max_iter", 1000))

    def token(i):
        return x[:, i] if x.ndim == 3 else x

    tokens = {n: probe_embeddings(token(i), part, labels, times, events, penalizer=pen, pca=pca, seed=seed,
                                 lr_max_iter=max_iter)
              for i, n in enumerate(names)}
    sub_tok = HEADLINE["subtype"] if HEADLINE["subtype"] in tokens else names[0]
    surv_tok = HEADLINE["survival"] if HEADLINE["survival"] in tokens else names[0]

    per_site: dict = {}
    uniq_sites = sorted(set(sites) - {""})
    if len(uniq_sites) > 1:  # pan-cancer: probes per site (method 3.6 / 4.2), headline = mean over sites
        for s in uniq_sites:
            m = sites == s
            per_site[s] = {
                "n": {p: int(((part == p) & m).sum()) for p in ("train", "val", "test")},
                "tokens": {n: probe_embeddings(token(i)[m], part[m], labels[m], times[m], events[m],
                                               penalizer=pen, pca=pca, seed=seed, lr_max_iter=max_iter)
                           for i, n in enumerate(names)},
            }
            per_site[s]["subtype_bacc"] = per_site[s]["tokens"][sub_tok]["test_bacc"]
            per_site[s]["subtype_auroc"] = per_site[s]["tokens"][sub_tok]["test_auroc"]
            per_site[s]["survival_cindex"] = per_site[s]["tokens"][surv_tok]["test_cindex"]

    def site_mean(key):
        vals = [v[key] for v in per_site.values() if v[key] is not None]
        return float(np.mean(vals)) if vals else None

    if per_site:
        subtype_bacc, subtype_auroc, cindex = (site_mean("subtype_bacc"), site_mean("subtype_auroc"),
                                               site_mean("survival_cindex"))
    else:
        subtype_bacc = tokens[sub_tok]["test_bacc"]
        subtype_auroc = tokens[sub_tok]["test_auroc"]
        cindex = tokens[surv_tok]["test_cindex"]
    head = None if ood else _head_metrics(emb, labels, times, events, part, objective)
    metrics = {
        "model": state["model_name"], "arch": state["arch"], "objective": objective, "seed": seed,
        "fold": int(fold), "train_cohort": train_cohort, "eval_cohort": eval_cohort, "ood": bool(ood),
        "n": {p: int((part == p).sum()) for p in ("train", "val", "test")},
        "subtype_bacc": subtype_bacc, "subtype_auroc": subtype_auroc, "survival_cindex": cindex,
        "subtype_token": sub_tok, "survival_token": surv_tok,
        "tokens": tokens, "per_site": per_site, "head": head, "cox": tokens[surv_tok]["cox"],
        "best_epoch": state.get("best_epoch"), "dropped_without_slides": ds.dropped_without_slides,
        "test_patients": sorted(p for p, q in zip(ids, part, strict=True) if q == "test"),
    }
    write_json(metrics, out_metrics)
    with atomic_path(out_embeddings, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, patient_id=np.array(ids, dtype=str), partition=part, embedding=x.astype(np.float32))
    log.info("evaluated %s seed %d fold %d on %s: subtype bacc %s, C-index %s", state["model_name"], seed, fold,
             eval_cohort, subtype_bacc, cindex)
    return metrics


__all__ = ["cox_cindex", "embed_dataset", "evaluate_run", "fit_cox_probe", "fit_lr_probe", "probe_embeddings",
           "score_classifier"]
