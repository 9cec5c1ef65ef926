"""GeneScaler: per-gene z-scoring fitted on one fold's training patients only (method notes, bug 7).

The reference code z-scores genes over the whole cohort, val/test included; here the scaler is
fitted per fold and its checkpointed state records which patients it saw. No torch import.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from modaltune.errors import InputError, LeakageError
from modaltune.genomics import gene_columns


def ids_hash(patient_ids: Iterable[str]) -> str:
    """Order-free fingerprint of a patient set (sha256 of the sorted unique ids)."""
    return hashlib.sha256("\n".join(sorted(set(map(str, patient_ids)))).encode()).hexdigest()


class GeneScaler:
    """Per-gene z-scoring fitted on one fold's training patients only (fix for transductive leakage).

    NaN (and inf, counted) are ignored in the fit and become 0 after scaling, i.e. the training mean.
    Zero or undefined std -> 1. The state is plain lists so it can live in a checkpoint.
    """

    def __init__(self) -> None:
        self.genes: list[str] = []
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.n_fitted = 0
        self.fitted_ids_sha256 = ""
        self.counts: dict[str, int] = {}

    def fit(self, df: pd.DataFrame) -> GeneScaler:
        from sklearn.preprocessing import StandardScaler

        if df.index.has_duplicates:
            raise InputError(
                f"GeneScaler.fit: duplicated patient ids {list(df.index[df.index.duplicated()][:5])}"
            )
        if len(df) == 0:
            raise InputError("GeneScaler.fit: no training patients with RNA in this fold")
        self.genes = gene_columns(df)
        x = df[self.genes].to_numpy(dtype=np.float64, copy=True)
        n_inf, n_nan = int(np.isinf(x).sum()), int(np.isnan(x).sum())
        x[np.isinf(x)] = np.nan
        all_nan = np.isnan(x).all(axis=0)
        x[:, all_nan] = 0.0  # a gene never measured in training: mean 0, std 1
        # StandardScaler ignores NaN in fit and sets scale 1 for constant genes: exactly the rule wanted.
        sk = StandardScaler().fit(x)
        self.mean = sk.mean_.astype(np.float64)
        self.std = np.where(np.isfinite(sk.scale_) & (sk.scale_ > 0), sk.scale_, 1.0).astype(np.float64)
        self.n_fitted = int(len(df))
        self.fitted_ids_sha256 = ids_hash(df.index)
        self.counts = {"fit_n_inf": n_inf, "fit_n_nan": n_nan, "fit_all_nan_genes": int(all_nan.sum())}
        return self

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        if self.mean is None:
            raise RuntimeError("GeneScaler.transform called before fit")
        absent = [g for g in self.genes if g not in df.columns]
        if absent:
            raise InputError(
                f"GeneScaler.transform: gene column(s) {absent[:5]} missing; rebuild pathways.parquet"
            )
        x = df[self.genes].to_numpy(dtype=np.float64, copy=True)
        n_inf, n_nan = int(np.isinf(x).sum()), int(np.isnan(x).sum())
        x[np.isinf(x)] = np.nan
        # Same formula as StandardScaler.transform, in numpy so that a scaler restored from plain
        # lists needs no pickle.
        z = (x - self.mean) / self.std
        z[np.isnan(z)] = 0.0
        self.counts.update({"transform_n_inf": n_inf, "transform_n_nan": n_nan})
        return z.astype(np.float32)

    def fit_transform(self, df: pd.DataFrame) -> np.ndarray:
        return self.fit(df).transform(df)

    def fitted_on(self, patient_ids: Iterable[str]) -> bool:
        return self.fitted_ids_sha256 == ids_hash(patient_ids)

    def check_fitted_on(self, train_ids: Iterable[str]) -> None:
        """LeakageError unless the scaler was fitted on exactly ``train_ids``."""
        if not self.fitted_on(train_ids):
            raise LeakageError(
                "GeneScaler was not fitted on exactly this fold's training patients "
                f"(fitted on {self.n_fitted} patients, hash {self.fitted_ids_sha256[:12]})"
            )

    def state_dict(self) -> dict:
        if self.mean is None:
            raise RuntimeError("GeneScaler.state_dict called before fit")
        return {
            "genes": list(self.genes),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "n_fitted": self.n_fitted,
            "fitted_ids_sha256": self.fitted_ids_sha256,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping) -> GeneScaler:
        obj = cls()
        try:
            obj.genes = list(state["genes"])
            obj.mean = np.asarray(state["mean"], dtype=np.float64)
            obj.std = np.asarray(state["std"], dtype=np.float64)
            obj.n_fitted = int(state["n_fitted"])
            obj.fitted_ids_sha256 = str(state["fitted_ids_sha256"])
        except KeyError as exc:
            raise InputError(
                f"GeneScaler state lacks field {exc}; checkpoint is from another version"
            ) from exc
        if not (len(obj.genes) == len(obj.mean) == len(obj.std)):
            raise InputError("GeneScaler state: genes, mean and std differ in length")
        return obj
