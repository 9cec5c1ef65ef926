"""Pan-cancer cohorts: the union of site cohorts, each site keeping its labels, bins and splits."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from modaltune.errors import InputError
from modaltune.io_utils import atomic_path


def merge_cohorts(cases: dict[str, str], pathways: dict[str, str], splits: dict[str, str], *,
                  out_cases: str, out_pathways: str, out_splits: str) -> None:
    """Concatenate site cohorts' cases, pathway tables and splits into one pan-cancer cohort.

    Gene columns must agree across sites (same gene sets): the union would silently fill
    missing genes, so a mismatch is an error naming the sites.
    """
    from modaltune.genomics import load_pathways
    from modaltune.splits import check_no_leakage

    case_frames = [pd.read_parquet(p).assign(cohort=name) for name, p in cases.items()]
    all_cases = pd.concat(case_frames, ignore_index=True)
    dup = all_cases["patient_id"][all_cases["patient_id"].duplicated()].tolist()
    if dup:
        raise InputError(f"pan-cancer merge: patients {dup[:5]} appear in several site cohorts")

    tables, groups_ref, cols_ref = [], None, None
    for name, p in pathways.items():
        df, groups = load_pathways(p)
        genes = [c for c in df.columns if c != "sample_id"]
        if cols_ref is None:
            cols_ref, groups_ref = genes, groups
        elif genes != cols_ref or groups != groups_ref:
            raise InputError(
                f"pan-cancer merge: {p} ({name}) has other genes or pathways than "
                f"{next(iter(pathways.values()))}; use the same gene-set file for every site"
            )
        tables.append(df)
    all_genes = pd.concat(tables)

    site_of = all_cases.set_index("patient_id")["site"]
    all_splits = pd.concat([pd.read_parquet(p) for p in splits.values()], ignore_index=True)
    all_splits["site"] = site_of.reindex(all_splits["patient_id"]).to_numpy()
    check_no_leakage(all_splits)

    with atomic_path(out_cases) as tmp:
        all_cases.to_parquet(tmp, index=False)
    with atomic_path(out_splits) as tmp:
        all_splits.to_parquet(tmp, index=False)
    table = pa.Table.from_pandas(all_genes, preserve_index=True)
    meta = dict(table.schema.metadata or {})
    meta[b"modaltune.groups"] = json.dumps(groups_ref).encode()
    with atomic_path(out_pathways) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp)
