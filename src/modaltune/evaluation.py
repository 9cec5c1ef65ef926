"""The one evaluator: frozen embeddings of every patient, linear probes fitted on TRAIN only, each model
reported on its own task; writes metrics.json, predictions.parquet and embeddings.npz.

Probes follow method 3.4/4.2 (``modaltune.probes``): a logistic regression (balanced accuracy, AUROC)
for the subtype and a lifelines CoxPH (Harrell C-index of -partial hazard) for survival, both fitted
on the training partition's embeddings and scored on val/test. Test labels never reach a ``fit`` call.

Token choice (method 4.2 is ambiguous): every token of a model is probed and reported under ``tokens``;
the headline ``subtype_bacc`` / ``survival_cindex`` use the model's ``headline_tokens`` (ModalTune:
Diagnosis and Survival).

Task (docs/METRICS.md): a classification model is reported on the subtype task by its own head, a
survival model on the survival task by its own head (risk of its hazards), a text_kl or probe-only
model on both tasks by the probes. metrics.json has one key set for every model (null where a value
does not apply, with the reason in ``notes``); 95 % CIs are percentile bootstraps over test patients.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from modaltune.data import CohortData, load_gene_table
from modaltune.errors import InputError
from modaltune.io_utils import atomic_path, file_sha256, write_json
from modaltune.losses import risk_from_hazards
from modaltune.models import positional_grid
from modaltune.probes import (
    PROBE_DEFAULTS,
    bootstrap_weights,
    class_metrics,
    harrell_c,
    mean_or_none,
    percentile_ci,
    probe_embeddings,
    probe_sites,
    site_groups,
    site_mean_weights,
    weighted_auroc,
    weighted_bacc,
    weighted_cindex,
)
from modaltune.runs import (
    build_from_state,
    drops_slideless,
    embed_dataset,
    fit_fold_preprocessing,
    headline_tokens,
    load_state,
    pick_device,
    restore_preprocessing,
    task_classes,
    token_names,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
TASK_OF_OBJECTIVE = {"classification": "subtype", "survival": "survival", "text_kl": "both", "none": "both"}
PREDICTION_COLUMNS = ("patient_id", "partition", "site", "label", "time", "event", "subtype_pred")


def _site_mean(fn, sites: np.ndarray, n: int):
    """mean over sites of fn(site rows): the pan-cancer headline (one site: fn(all rows))."""
    return mean_or_none(fn(m) for _, m in site_groups(sites) if m.any()) if n else None


def _task_scores(y, prob, classes, t, e, risk, sites, n_boot: int, seed: int) -> dict:
    """Point estimates (mean over sites) and bootstrap 95 % CIs over test rows of bacc / AUROC / C-index.

    Point estimates use sklearn / lifelines; the resamples use the vectorised weighted metrics of
    ``modaltune.probes`` (one shared set of resamples, seeded)."""
    n = len(y)
    out = {}
    w = bootstrap_weights(n, n_boot, seed) if n_boot > 0 and n >= 2 else None
    if prob is not None:
        pred = np.asarray(classes)[prob.argmax(1)]
        out["bacc"] = _site_mean(lambda m: class_metrics(y[m], pred[m], None, classes)["bacc"], sites, n)
        out["auroc"] = _site_mean(lambda m: class_metrics(y[m], pred[m], prob[m], classes)["auroc"], sites, n)
        for key, metric in (("bacc", lambda ww: weighted_bacc(ww, y, pred)),
                            ("auroc", lambda ww: weighted_auroc(ww, y, prob, classes))):
            out[f"{key}_ci95"] = (percentile_ci(site_mean_weights(metric, w, sites))
                                  if w is not None and out[key] is not None else None)
    if risk is not None:
        out["cindex"] = _site_mean(lambda m: harrell_c(t[m], risk[m], e[m]), sites, n)
        out["cindex_ci95"] = (percentile_ci(site_mean_weights(lambda ww: weighted_cindex(ww, t, risk, e), w, sites))
                              if w is not None and out["cindex"] is not None else None)
    return out


def _probe_predictions(res: dict, per_site: dict, sites: np.ndarray, n: int, n_classes: int):
    """Row-aligned (subtype prob (n, K) or None, Cox risk (n,) or None) of a token's probes."""
    prob = np.full((n, n_classes), np.nan)
    risk = np.full(n, np.nan)
    any_prob = any_risk = False
    parts = [(res, np.ones(n, bool))] if not per_site else [(per_site[s], sites == s) for s in per_site]
    for r, m in parts:
        p = r["_pred"]
        if p["subtype_prob"] is not None:
            sub = np.zeros((int(m.sum()), n_classes))
            for j, c in enumerate(p["classes"]):
                if 0 <= c < n_classes:
                    sub[:, c] = p["subtype_prob"][:, j]
            prob[m] = sub
            any_prob = True
        if p["risk"] is not None:
            risk[m] = p["risk"]
            any_risk = True
    return (prob if any_prob else None), (risk if any_risk else None)


def _strip(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "_pred"}


def evaluate_run(*, run_dir, cases_path, splits_path, fold: int, pathways_path, feature_files, sheet,
                 text_h5=None, out_metrics, out_embeddings, out_predictions=None, probe_cfg: dict | None = None,
                 eval_cohort: str | None = None) -> dict:
    """Embed every train/val/test patient with the run's frozen weights, probe, write metrics + embeddings.

    ``eval_cohort``: the name of the cohort the inputs belong to (the workflow's wildcard). It is
    out-of-distribution when it differs from the run's cohort or the cases file differs from the
    training one: the gene scaler and the clinical covariates are then refitted on the target cohort's
    TRAIN patients, the weights stay the same, and heads are not applied (their classes belong to the
    training cohort). Writes ``out_metrics`` (JSON, one key set for all models, docs/METRICS.md),
    ``out_embeddings`` (npz: patient_id, partition, embedding) and ``out_predictions`` (parquet, one
    row per patient) when given. ``text_h5`` is unused (evaluation needs no text targets).
    """
    probe_cfg = {**PROBE_DEFAULTS, **(probe_cfg or {})}
    state = load_state(run_dir)
    train_cfg, model_cfg = state["train_cfg"], state["model_cfg"]
    seed, objective = int(state["seed"]), state["objective"]
    train_cohort = state.get("cohort")
    same_cases = state["fingerprints"].get("cases") == file_sha256(cases_path)
    ood = (train_cohort is not None and eval_cohort is not None and eval_cohort != train_cohort) or not same_cases

    gene_table = load_gene_table(pathways_path)
    if gene_table[1] != list(state["gene_names"]):
        missing = sorted(set(state["gene_names"]) - set(gene_table[1]))
        if missing:
            raise InputError(f"pathways {pathways_path}: {len(missing)} genes the model was trained on are "
                             f"missing (e.g. {missing[:5]}); rebuild it with the training cohort's gene list")
        df = gene_table[0][list(state["gene_names"])]
        gene_table = (df, list(state["gene_names"]), state["dims"]["pathway_groups"])
    data = CohortData(cases_path, splits_path, fold, feature_files=feature_files, sheet=sheet,
                      gene_table=gene_table,
                      drop_without_slides=drops_slideless(train_cfg, model_cfg, state["model_name"], feature_files),
                      require_rna=bool(train_cfg.get("require_rna", False)))
    cases = data.cases
    if ood:
        # Never the target's val/test: refit on its training partition only (method 4.3, bug 7).
        gene_scaler, cov_state = fit_fold_preprocessing(cases, data.fit_ids(), gene_table,
                                                        use_clinical=state["covariates"] is not None)
    else:
        gene_scaler, cov_state = restore_preprocessing(state)

    device = pick_device(train_cfg.get("device", "auto"))
    model = build_from_state(state, device)
    ngrids, tile = positional_grid(state["arch"], model_cfg)
    max_patches = probe_cfg.get("max_patches")
    ds = data.dataset(
        ["train", "val", "test"], gene_scaler=gene_scaler, covariate_state=cov_state,
        coords_space=train_cfg.get("coords_space", "target"), slide_gap=train_cfg.get("slide_gap", 1500),
        max_patches=max_patches, seed=seed, train=False, subsample_eval=max_patches is not None,
        grid_ngrids=ngrids, grid_tile=tile, use_text=False,
    )
    if cov_state is not None and ds.clinical.shape[1] != state["dims"]["clinical_dim"]:
        raise InputError(f"cases {cases_path}: clinical covariates have {ds.clinical.shape[1]} columns, the "
                         f"model expects {state['dims']['clinical_dim']}; use the same covariate vocabulary")
    emb = embed_dataset(model, ds, device=device, desc=f"embed fold {fold}")
    ids = emb["patient_id"]
    n = len(ids)
    part = np.array([ds.partition[p] for p in ids])
    labels = np.array([int(cases.at[p, "label"]) if pd.notna(cases.at[p, "label"]) else -1 for p in ids], int)
    times = cases.loc[ids, "survival_months"].to_numpy(float)
    events = cases.loc[ids, "event"].to_numpy(float)
    sites = (cases.loc[ids, "site"].astype(str).to_numpy() if "site" in cases.columns
             else np.array([""] * n))
    x = emb["embedding"]
    names = token_names(model, x.ndim, x.shape[1] if x.ndim == 3 else None)
    heads = headline_tokens(model, names)
    sub_tok, surv_tok = heads["subtype"], heads["survival"]
    n_classes = int(state["dims"]["n_classes"]) if not ood else task_classes(cases, f"cases {cases_path}")
    kw = dict(penalizer=float(probe_cfg.get("cox_penalizer", 0.1)), pca=probe_cfg.get("cox_pca"), seed=seed,
              lr_max_iter=int(probe_cfg.get("lr_max_iter", 1000)), lr_mode=probe_cfg.get("lr", "standard"))

    def token(i):
        return x[:, i] if x.ndim == 3 else x

    tokens, site_tokens, preds = {}, {}, {}
    headline = {}
    for i, name in enumerate(names):
        # ``tokens``: probes on all patients (pooled over sites); pan-cancer headline: per-site probes.
        pooled = probe_embeddings(token(i), part, labels, times, events, predictions=True, **kw)
        res, ps = (pooled, {}) if len(site_groups(sites)) == 1 else probe_sites(
            token(i), part, labels, times, events, sites, predictions=True, **kw)
        if name in (sub_tok, surv_tok):
            preds[name] = _probe_predictions(res, ps, sites, n, n_classes)
        tokens[name] = _strip(pooled)
        headline[name] = res
        site_tokens[name] = ps

    per_site: dict = {}
    for s in next(iter(site_tokens.values())):
        m = sites == s
        per_site[s] = {
            "n": {p: int(((part == p) & m).sum()) for p in ("train", "val", "test")},
            "tokens": {name: _strip(site_tokens[name][s]) for name in names},
        }
        per_site[s]["subtype_bacc"] = per_site[s]["tokens"][sub_tok]["test_bacc"]
        per_site[s]["subtype_auroc"] = per_site[s]["tokens"][sub_tok]["test_auroc"]
        per_site[s]["survival_cindex"] = per_site[s]["tokens"][surv_tok]["test_cindex"]
    # the headline: the single fit, or the mean over sites for pan-cancer (method 3.6 / 4.2)
    subtype_bacc, subtype_auroc = headline[sub_tok]["test_bacc"], headline[sub_tok]["test_auroc"]
    cindex = headline[surv_tok]["test_cindex"]

    # ---- the task's source: the model's own head, or the probes
    notes: list[str] = []
    task = TASK_OF_OBJECTIVE[objective]
    probe_prob, _ = preds[sub_tok]
    _, probe_risk = preds[surv_tok]
    head_prob = head_risk = None
    if not ood and objective == "classification" and emb["logits"] is not None:
        head_prob = torch.softmax(torch.from_numpy(emb["logits"]).float(), 1).numpy()
    if not ood and objective == "survival" and emb["hazards"] is not None:
        head_risk = risk_from_hazards(torch.from_numpy(emb["hazards"])).numpy()
    if ood and objective in ("classification", "survival"):
        notes.append("out-of-distribution: the model's head is not applied (its classes and bins belong to the "
                     "training cohort); the task is reported by the probes refitted on the target cohort")
    sub_source = None if task == "survival" else ("head" if head_prob is not None else "probe")
    surv_source = None if task == "subtype" else ("head" if head_risk is not None else "probe")
    if task == "survival":
        notes.append(f"subtype: not reported (objective {objective} is reported on the survival task)")
    if task == "subtype":
        notes.append(f"survival: not reported (objective {objective} is reported on the subtype task)")
    sub_prob = head_prob if sub_source == "head" else probe_prob if sub_source == "probe" else None
    surv_risk = head_risk if surv_source == "head" else probe_risk if surv_source == "probe" else None

    test = part == "test"
    n_boot = int(probe_cfg.get("bootstrap", 1000))
    classes = list(range(n_classes))
    y_t, t_t, e_t, s_t = labels[test], times[test], events[test], sites[test]

    def with_nan_rows(prob):
        return None if prob is None or not np.isfinite(prob[test]).all() else prob[test]

    sub_scores = _task_scores(y_t, with_nan_rows(sub_prob), classes, t_t, e_t, None, s_t, n_boot, seed)
    surv_scores = _task_scores(y_t, None, classes, t_t, e_t, None if surv_risk is None else surv_risk[test], s_t,
                               n_boot, seed)
    probe_sub = _task_scores(y_t, with_nan_rows(probe_prob), classes, t_t, e_t, None, s_t, n_boot, seed)
    probe_surv = _task_scores(y_t, None, classes, t_t, e_t, None if probe_risk is None else probe_risk[test], s_t,
                              n_boot, seed)
    n_lab = int((y_t >= 0).sum())
    if sub_source is not None and sub_prob is None:
        notes.append("subtype: no classifier (fewer than two classes among labelled training patients)")
    if sub_source is not None and n_lab and len(np.unique(y_t[y_t >= 0])) < 2:
        notes.append("subtype: one-class test partition, AUROC undefined")
    if surv_source == "probe" and probe_risk is None:
        notes.append(f"survival: Cox probe not usable ({tokens[surv_tok].get('cox', {})})")
    if surv_source is not None and not np.nansum(e_t) >= 1:
        notes.append("survival: no event among test patients, C-index undefined")
    if data.dropped_without_rna:
        notes.append(f"require_rna: {len(data.dropped_without_rna)} patient(s) without RNA left out")

    subtype_block = {
        "reported": task in ("subtype", "both"), "source": sub_source,
        "bacc": sub_scores.get("bacc"), "auroc": sub_scores.get("auroc"),
        "bacc_ci95": sub_scores.get("bacc_ci95"), "auroc_ci95": sub_scores.get("auroc_ci95"),
        "n_test": n_lab, "n_classes": n_classes,
    }
    ok_t = np.isfinite(t_t) & np.isfinite(e_t)
    survival_block = {
        "reported": task in ("survival", "both"), "source": surv_source,
        "cindex": surv_scores.get("cindex"), "cindex_ci95": surv_scores.get("cindex_ci95"),
        "n_test": int(ok_t.sum()), "n_events": int(e_t[ok_t].sum()),
    }
    head = None
    if head_prob is not None:
        head = {"bacc": sub_scores.get("bacc"), "auroc": sub_scores.get("auroc")}
    elif head_risk is not None:
        head = {"cindex": surv_scores.get("cindex")}
    selection = state.get("selection") or {"criterion": None, "best_epoch": state.get("best_epoch"),
                                           "best_score": None}
    metrics = {
        "schema_version": SCHEMA_VERSION,
        "model": state["model_name"], "arch": state["arch"], "objective": objective, "task": task, "seed": seed,
        "fold": int(fold), "train_cohort": train_cohort, "eval_cohort": eval_cohort, "ood": bool(ood),
        "n": {p: int((part == p).sum()) for p in ("train", "val", "test")},
        "subtype_bacc": subtype_bacc, "subtype_auroc": subtype_auroc, "survival_cindex": cindex,
        "subtype_token": sub_tok, "survival_token": surv_tok,
        "tokens": tokens, "per_site": per_site, "head": head, "cox": tokens[surv_tok].get("cox"),
        "subtype": subtype_block, "survival": survival_block,
        "probe_ci95": {"subtype_bacc": probe_sub.get("bacc_ci95"), "subtype_auroc": probe_sub.get("auroc_ci95"),
                       "survival_cindex": probe_surv.get("cindex_ci95")},
        "selection": {"criterion": selection.get("criterion"), "best_epoch": selection.get("best_epoch"),
                      "best_score": selection.get("best_score")},
        "best_epoch": state.get("best_epoch"), "dropped_without_slides": ds.dropped_without_slides,
        "test_patients": sorted(p for p, q in zip(ids, part, strict=True) if q == "test"),
        "notes": notes,
    }
    write_json(metrics, out_metrics)
    with atomic_path(out_embeddings, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, patient_id=np.array(ids, dtype=str), partition=part, embedding=x.astype(np.float32))
    if out_predictions is not None:
        write_predictions(out_predictions, ids=ids, part=part, sites=sites, labels=labels, times=times,
                          events=events, prob=sub_prob, n_classes=n_classes, risk=surv_risk,
                          subtype_source=sub_source, survival_source=surv_source)
    log.info("evaluated %s seed %d fold %d on %s: %s %s bacc %s, %s C-index %s", state["model_name"], seed, fold,
             eval_cohort, task, sub_source, subtype_block["bacc"], surv_source, survival_block["cindex"])
    return metrics


def write_predictions(path, *, ids, part, sites, labels, times, events, prob, n_classes: int, risk,
                      subtype_source, survival_source) -> pd.DataFrame:
    """predictions.parquet (one row per evaluated patient; columns in docs/METRICS.md)."""
    n = len(ids)
    df = pd.DataFrame({"patient_id": pd.Series(ids, dtype=str), "partition": pd.Series(part, dtype=str),
                       "site": pd.Series(sites, dtype=str), "label": np.asarray(labels, np.int64),
                       "time": np.asarray(times, float), "event": np.asarray(events, float)})
    if prob is not None:
        ok = np.isfinite(prob).all(1)
        df["subtype_pred"] = np.where(ok, np.nan_to_num(prob).argmax(1), -1).astype(np.int64)
    else:
        df["subtype_pred"] = np.full(n, -1, np.int64)
    for k in range(n_classes):
        df[f"subtype_prob_{k}"] = prob[:, k].astype(float) if prob is not None else np.full(n, np.nan)
    df["risk"] = np.asarray(risk, float) if risk is not None else np.full(n, np.nan)
    df["subtype_source"] = pd.Series([subtype_source] * n, dtype=object)
    df["survival_source"] = pd.Series([survival_source] * n, dtype=object)
    with atomic_path(path, suffix=".parquet") as tmp:
        df.to_parquet(tmp, index=False)
    return df


__all__ = ["PREDICTION_COLUMNS", "SCHEMA_VERSION", "TASK_OF_OBJECTIVE", "evaluate_run", "write_predictions"]
