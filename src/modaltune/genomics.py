"""The rna_pathways stage and its file: RNA-seq (Xena) + gene sets -> pathways.parquet.

One row per patient, one float32 column per kept gene (raw values, not scaled: the scaler is fitted
per fold on training patients, :mod:`modaltune.gene_scaler`, method notes bug 7), pathway membership in
the parquet metadata. Reading is in :mod:`modaltune.xena` and :mod:`modaltune.genesets`.
No torch import: the rna_pathways rule is CPU-only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from modaltune.errors import InputError
from modaltune.genesets import load_alias_table, read_gene_sets, resolve_gene
from modaltune.io_utils import atomic_path, write_json
from modaltune.xena import check_id_namespace, choose_samples, read_xena

GROUPS_KEY = b"modaltune.groups"
SAMPLE_COLUMN = "sample_id"
NON_GENE_COLUMNS = (SAMPLE_COLUMN, "patient_id")


def build_pathways(
    rna_path: str | os.PathLike,
    genesets_path: str | os.PathLike,
    out_parquet: str | os.PathLike,
    out_report: str | os.PathLike,
    *,
    patients: list[str] | None = None,
    allow_normal: bool = False,
    alias_table=None,
    sample_map=None,
    min_genes_per_pathway: int = 1,
    universe_path: str | os.PathLike | None = None,
) -> dict:
    """Xena matrix + gene sets -> pathways.parquet (patients x genes, raw values) and report.json.

    A pathway with fewer than ``min_genes_per_pathway`` genes in the matrix raises InputError; with
    ``min_genes_per_pathway=0`` pathways without any gene are dropped instead (listed in the report).
    ``universe_path`` (optional, e.g. the EB++ PANCAN matrix): as in the paper, only genes that are
    non-constant across that matrix are eligible.
    Returns the report dict.
    """
    gene_sets = read_gene_sets(genesets_path)
    matrix = read_xena(rna_path)
    read_report = matrix.attrs.get("read_report", {})
    all_set_genes = [g for genes in gene_sets.values() for g in genes]
    check_id_namespace(matrix.index, all_set_genes, rna_path, genesets_path)
    if SAMPLE_COLUMN in matrix.index:
        raise InputError(
            f"{rna_path}: a gene row is named {SAMPLE_COLUMN!r}, which clashes with the output column"
        )

    aliases = load_alias_table(alias_table)
    present = set(matrix.index)
    universe_report = None
    if universe_path is not None:
        universe = read_xena(universe_path)
        std = universe.std(axis=1, skipna=True)
        eligible = set(std.index[std > 0])
        universe_report = {
            "file": str(universe_path),
            "n_genes": int(len(universe)),
            "n_constant_or_empty": int(len(universe) - len(eligible)),
            "n_matrix_genes_outside_universe": len(present - eligible),
            "duplicates": universe.attrs["read_report"]["n_duplicate_gene_ids"],
        }
        present &= eligible
        del universe
    groups: dict[str, list[str]] = {}
    per_pathway: dict[str, dict] = {}
    dropped: list[str] = []
    too_small: list[str] = []
    for name, genes in gene_sets.items():
        found, missing, aliased = [], [], {}
        for g in genes:
            hit = resolve_gene(g, present, aliases)
            if hit is None:
                missing.append(g)
                continue
            if hit != g:
                aliased[g] = hit
            if hit not in found:
                found.append(hit)
        per_pathway[name] = {
            "n_genes": len(genes),
            "n_found": len(found),
            "missing": missing,
            "aliased": aliased,
        }
        if min_genes_per_pathway == 0 and not found:
            dropped.append(name)
        elif len(found) < max(min_genes_per_pathway, 1):
            too_small.append(name)
        else:
            groups[name] = found
    if too_small:
        detail = "; ".join(
            f"{p}: {per_pathway[p]['n_found']} found, missing {per_pathway[p]['missing'][:5]}"
            for p in too_small[:5]
        )
        raise InputError(
            f"{genesets_path}: {len(too_small)} pathway(s) have fewer than "
            f"{max(min_genes_per_pathway, 1)} gene(s) "
            f"present in {rna_path} ({detail}); check the gene id namespace / alias table, or pass "
            "min_genes_per_pathway=0 to drop empty pathways"
        )
    if not groups:
        raise InputError(f"{genesets_path}: no pathway has a gene present in {rna_path}")
    gene_columns = list(dict.fromkeys(g for genes in groups.values() for g in genes))

    choice = choose_samples(list(matrix.columns), allow_normal=allow_normal, sample_map=sample_map)
    no_sample = choice[choice["sample_id"].isna()]
    choice = choice[choice["sample_id"].notna()]
    requested_without_rna: list[str] = []
    not_requested = 0
    if patients is not None:
        wanted = list(dict.fromkeys(map(str, patients)))
        have = set(choice["patient_id"])
        requested_without_rna = [p for p in wanted if p not in have]
        not_requested = int((~choice["patient_id"].isin(wanted)).sum())
        choice = choice[choice["patient_id"].isin(wanted)]
    values = matrix.loc[gene_columns, choice["sample_id"].tolist()].T.astype(np.float32)
    out = pd.DataFrame(
        values.to_numpy(), columns=gene_columns, index=pd.Index(choice["patient_id"], name="patient_id")
    )
    out[SAMPLE_COLUMN] = choice["sample_id"].to_numpy()
    write_pathways(out, groups, Path(out_parquet))

    nan_per_gene = out[gene_columns].isna().sum()
    report = {
        "rna_file": str(rna_path),
        "genesets_file": str(genesets_path),
        "n_patients": int(len(out)),
        "n_genes": len(gene_columns),
        "n_pathways": len(groups),
        "pathways": per_pathway,
        "dropped_pathways_without_genes": dropped,
        "groups": groups,
        "matrix": read_report,
        "universe": universe_report,
        "n_nan_in_output": int(nan_per_gene.sum()),
        "genes_with_nan": {g: int(n) for g, n in nan_per_gene.items() if n > 0},
        "sample_choices": choice.to_dict(orient="records"),
        "patients_without_usable_sample": no_sample[["patient_id", "reason"]].to_dict(orient="records"),
        "patients_requested_without_rna": requested_without_rna,
        "n_rna_patients_not_requested": not_requested,
        "allow_normal": bool(allow_normal),
    }
    write_json(report, out_report)
    return report


def write_pathways(df: pd.DataFrame, groups: dict[str, list[str]], path: Path) -> None:
    """pathways.parquet: ``df`` (index patient_id) with ``groups`` in the key-value metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=True)
    meta = dict(table.schema.metadata or {})
    meta[GROUPS_KEY] = json.dumps(groups).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def load_pathways(path: str | os.PathLike) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Read pathways.parquet -> (DataFrame indexed by patient_id, {pathway: [gene columns]})."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: pathways parquet not found; run the rna_pathways stage first")
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    if GROUPS_KEY not in meta:
        raise InputError(
            f"{path}: no `modaltune.groups` metadata; rebuild it with modaltune.genomics.build_pathways"
        )
    groups = json.loads(meta[GROUPS_KEY].decode())
    df = table.to_pandas()
    if df.index.name != "patient_id":
        if "patient_id" not in df.columns:
            raise InputError(f"{path}: no patient_id index/column")
        df = df.set_index("patient_id")
    missing = sorted({g for genes in groups.values() for g in genes} - set(df.columns))
    if missing:
        raise InputError(f"{path}: pathway genes without a column: {missing[:5]}")
    return df, groups


def gene_columns(df: pd.DataFrame) -> list[str]:
    """The gene vector's columns, in order (everything but the bookkeeping columns)."""
    return [c for c in df.columns if c not in NON_GENE_COLUMNS]


def pathway_index_groups(columns: Sequence[str], groups: Mapping[str, Sequence[str]]) -> list[list[int]]:
    """Index lists into the gene vector (``columns`` minus sample_id), one per pathway, in groups order."""
    genes = [c for c in columns if c not in NON_GENE_COLUMNS]
    pos = {g: i for i, g in enumerate(genes)}
    out = []
    for name, members in groups.items():
        absent = [g for g in members if g not in pos]
        if absent:
            raise InputError(f"pathway {name!r}: gene(s) {absent[:5]} are not in the gene columns")
        out.append([pos[g] for g in members])
    return out
