"""Training-cohort builders shared by test_training.py, test_evaluation.py and test_data.py.

``make_cohort`` writes a tiny cohort with a planted signal in the documented file formats; importing this
module registers the tiny test model (``tiny_test``); ``prepare_env`` and ``run_args`` set up one trainer run.
Not a test module: test files import from here, never from each other.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from modaltune.models.registry import _REGISTRY, register_model

D, N_PATCH, N_PATHWAYS, GENES_PER_PW, T_DIM, E_DIM = 16, 40, 6, 8, 12, 16


def make_cohort(root: Path, n_patients: int = 30, seed: int = 0, cohort: str = "COH", sites=None,
                n_folds: int = 1, signal: float = 1.0, two_slides_every: int = 5, prefix: str = "P") -> dict:
    """A tiny cohort with a planted label signal in patches, genes, text; survival tied to the label."""
    rng = np.random.default_rng(seed)
    base = root / cohort
    ids = [f"{prefix}{i:03d}" for i in range(n_patients)]
    label = np.array([i % 2 for i in range(n_patients)])
    risk = label * 1.0 + rng.normal(0, 0.3, n_patients)
    times = rng.exponential(30 * np.exp(-risk))
    event = (rng.random(n_patients) < 0.7).astype(int)
    stage = np.array(["I", "II", "III", None])[rng.integers(0, 4, n_patients)]
    cases = pd.DataFrame({
        "patient_id": ids, "case_id": [f"uuid-{p}" for p in ids], "project_id": f"TCGA-{cohort}",
        "site": (np.array(sites)[(np.arange(n_patients) // 2) % len(sites)] if sites else cohort),
        "primary_diagnosis": np.where(label == 1, "lobular carcinoma", "infiltrating duct carcinoma"),
        "label": label, "survival_months": times, "event": event, "stage": stage,
        "t": "T2", "n": "N0", "m": "M0", "age": rng.normal(60, 10, n_patients), "has_rna": True,
        "n_slides": 1,
    })
    if n_patients > 3:
        cases.loc[3, "label"] = -1  # a patient outside the subtype task
    (base / "clinical").mkdir(parents=True, exist_ok=True)
    cases_path = base / "clinical" / "cases.parquet"
    cases.to_parquet(cases_path, index=False)

    rows = []
    for fold in range(n_folds):
        order = np.random.default_rng(seed + 100 + fold).permutation(n_patients)
        n_test, n_val = max(2, n_patients // 5), max(2, n_patients // 5)
        for j, i in enumerate(order):
            part = "test" if j < n_test else "val" if j < n_test + n_val else "train"
            rows.append({"patient_id": ids[i], "fold": fold, "partition": part,
                         "site": cases.loc[i, "site"]})
    splits_path = base / "splits" / "holdout.parquet"
    splits_path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(splits_path, index=False)

    genes = [f"G{k}" for k in range(N_PATHWAYS * GENES_PER_PW)]
    gx = rng.normal(5.0, 1.0, (n_patients, len(genes))).astype(np.float32)
    gx[:, :GENES_PER_PW] += signal * label[:, None]
    gdf = pd.DataFrame(gx, columns=genes, index=pd.Index(ids, name="patient_id"))
    gdf["sample_id"] = [f"{p}-01" for p in ids]
    gdf = gdf.drop(index=ids[-1])  # the last patient has no RNA
    groups = {f"PW{k}": genes[k * GENES_PER_PW:(k + 1) * GENES_PER_PW] for k in range(N_PATHWAYS)}
    from modaltune.genomics import GROUPS_KEY

    table = pa.Table.from_pandas(gdf, preserve_index=True)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), GROUPS_KEY: json.dumps(groups).encode()})
    pw_path = base / "genomics" / "pathways.parquet"
    pw_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, pw_path)

    feat_dir = base / "features" / "tiny"
    feat_dir.mkdir(parents=True, exist_ok=True)
    sheet, files = [], []
    for i, p in enumerate(ids):
        n_sl = 2 if i % two_slides_every == 1 else 1
        for s in range(n_sl):
            sid = f"{p}-DX{s + 1}"
            f = feat_dir / f"{sid}.h5"
            failed = i == 2 and s == 0 and n_sl == 1  # patient 2: its only slide failed
            n = 0 if failed else N_PATCH + int(rng.integers(0, 10))
            feats = rng.normal(0, 1, (n, D)).astype(np.float32)
            feats[:, :4] += signal * label[i]
            grid = np.stack(np.meshgrid(np.arange(8), np.arange(8)), -1).reshape(-1, 2)[:n] * 256
            with h5py.File(f, "w") as h5:
                h5["features"] = feats
                h5["coords"] = (grid * 2 + 1000).astype(np.int64)
                h5["coords_target"] = grid.astype(np.int64)
                h5.attrs.update({"status": "failed" if failed else "ok", "error": "no tissue" if failed else "",
                                 "feature_dim": D, "tiles_per_s": 100.0 + i, "encoder": "tiny",
                                 "complete": True})
            sheet.append({"slide_id": sid, "patient_id": p, "path": f"/slides/{sid}.tiff"})
            files.append(str(f))
    sheet_path = base / "sheet.tsv"
    pd.DataFrame(sheet).to_csv(sheet_path, sep="\t", index=False)

    protos = np.random.default_rng(1234).normal(0, 1, (2, 4, T_DIM))  # shared across cohorts: same "language"
    text = protos[np.clip(label, 0, 1)] + rng.normal(0, 0.3, (n_patients, 4, T_DIM))
    text_path = base / "text" / "fold_0.h5"
    text_path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(text_path, "w") as h5:
        h5.create_dataset("patient_id", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
        h5["embeddings"] = text.astype(np.float32)
        h5.attrs["fold"] = 0
    return {"cases_path": str(cases_path), "splits_path": str(splits_path), "pathways_path": str(pw_path),
            "feature_files": files, "sheet": str(sheet_path), "text_h5": str(text_path), "ids": ids,
            "labels": label, "cohort": cohort}


class TinyTestModel(nn.Module):
    """Masked mean of patches + genes + clinical -> (B, 3, E) tokens (text_kl) or (B, E) + head.

    Holds a frozen random "encoder" with a buffer, to check that frozen weights are never saved.
    """

    def __init__(self, cfg: dict, dims):
        super().__init__()
        self.objective = cfg.get("objective", "text_kl")
        # Model facts (contract C3), as ModalTune / the baselines declare them.
        if self.objective == "text_kl":
            self.token_names, self.text_prompt_index = ("general", "diagnosis", "survival"), (0, 1, 3)
            self.headline_tokens = {"subtype": "diagnosis", "survival": "survival"}
        else:
            self.token_names, self.text_prompt_index = ("embedding",), (0,)
            self.headline_tokens = {"subtype": "embedding", "survival": "embedding"}
        e = int(cfg.get("embed_dim", E_DIM))
        self.frozen = nn.Linear(dims.feature_dim, dims.feature_dim)
        self.frozen.register_buffer("stat", torch.randn(dims.feature_dim))
        self.frozen.requires_grad_(False)
        self.img = nn.Linear(dims.feature_dim, e)
        self.gene = nn.Linear(dims.n_genes, e)
        self.clin = nn.Linear(max(1, dims.clinical_dim), e)
        self.task = nn.Embedding(3, e)
        self.drop = nn.Dropout(0.1)
        self.norm = nn.BatchNorm1d(e)  # a trainable module with buffers (running stats)
        if self.objective == "none":
            self.requires_grad_(False)
        self.head = None
        if self.objective == "classification":
            self.head = nn.Linear(e, dims.n_classes)
        elif self.objective == "survival":
            self.head = nn.Linear(e, dims.n_bins)

    def forward(self, batch):
        m = batch["patch_mask"].float().unsqueeze(-1)
        f = self.frozen(batch["features"]) + batch["features"]
        pooled = (f * m).sum(1) / m.sum(1).clamp_min(1)
        z = self.img(self.drop(pooled)) + self.gene(batch["genes"]) * batch["has_genes"].float()[:, None]
        if batch["clinical"].shape[1]:
            z = z + 0.1 * self.clin(batch["clinical"])
        z = self.norm(z) if z.shape[0] > 1 or not self.training else z
        if self.objective == "text_kl":
            return {"embedding": z[:, None, :] + self.task.weight[None]}
        out = {"embedding": z}
        if self.head is not None:
            out["logits" if self.objective == "classification" else "hazards"] = self.head(z)
        return out


if "tiny_test" not in _REGISTRY:
    register_model("tiny_test")(TinyTestModel)


def prepare_env(monkeypatch):
    """One CPU thread; until every colleague's module exists, import only the ones present."""
    import importlib
    import importlib.util

    from modaltune.models import registry

    # Tiny tensors: OpenMP threads only contend on a shared 2-core machine (30 ms vs 2 us per op).
    torch.set_num_threads(1)
    present = tuple(m for m in registry._MODEL_MODULES if importlib.util.find_spec(m) is not None)
    monkeypatch.setattr(registry, "_MODEL_MODULES", present)
    for m in present:
        importlib.import_module(m)
    if importlib.util.find_spec("modaltune.text") is None:  # stand-in until modaltune.text lands
        import sys
        import types

        def make_text_projector(in_dim, out_dim=256, seed=0):
            g = torch.Generator().manual_seed(seed)
            net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.ReLU(),
                                nn.Linear(out_dim, out_dim))
            with torch.no_grad():
                for prm in net.parameters():
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.3)
            return net.requires_grad_(False).eval()

        monkeypatch.setitem(sys.modules, "modaltune.text",
                            types.SimpleNamespace(make_text_projector=make_text_projector))


def run_args(c: dict, out_dir, model_cfg=None, train_cfg=None, seed=0, model_name="tiny"):
    return dict(model_name=model_name, model_cfg=model_cfg or {"arch": "tiny_test", "objective": "text_kl"},
                train_cfg={"epochs": 3, "warmup_epochs": 1, "lr": 3e-3, "projector_dim": E_DIM, "max_patches": 30,
                           **(train_cfg or {})},
                cases_path=c["cases_path"], splits_path=c["splits_path"], fold=0, seed=seed,
                pathways_path=c["pathways_path"], feature_files=c["feature_files"], sheet=c["sheet"],
                text_h5=c["text_h5"], out_dir=str(out_dir), cohort=c["cohort"])
