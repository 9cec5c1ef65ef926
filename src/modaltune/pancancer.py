"""Pan-cancer cohorts: the union of site cohorts, each site keeping its labels, bins and splits.

The one place where site cohorts are merged (the pancancer_merge rule runs it).
"""

from __future__ import annotations

import pandas as pd

from modaltune.errors import InputError, LeakageError
from modaltune.genomics import load_pathways, write_pathways
from modaltune.io_utils import atomic_path
from modaltune.splits import check_no_leakage
from modaltune.tables import read_cases, read_splits


def merge_cohorts(cases: dict[str, str], pathways: dict[str, str], splits: dict[str, str], *,
                  out_cases: str, out_pathways: str, out_splits: str) -> None:
    """Concatenate site cohorts' cases, pathway tables and splits into one pan-cancer cohort.

    Checked before anything is written: no patient in two sites; gene columns and pathways equal
    across sites (the union would silently fill missing genes); every site's splits have the same
    folds (same scheme and n_folds), so fold k of the union is fold k of every site; a split's
    ``site`` column, where filled, agrees with its cases.
    """
    case_frames = [read_cases(p, ("patient_id", "site")).reset_index(drop=True).assign(cohort=name)
                   for name, p in cases.items()]
    all_cases = pd.concat(case_frames, ignore_index=True)
    dup = all_cases["patient_id"][all_cases["patient_id"].duplicated()].tolist()
    if dup:
        clash = all_cases.loc[all_cases["patient_id"] == dup[0], "cohort"].tolist()
        raise LeakageError(f"pan-cancer merge: patients {dup[:5]} appear in several site cohorts "
                           f"(e.g. {dup[0]} in {clash}); a patient belongs to one site")

    tables, groups_ref, cols_ref, first = [], None, None, None
    for name, p in pathways.items():
        df, groups = load_pathways(p)
        genes = [c for c in df.columns if c != "sample_id"]
        if cols_ref is None:
            cols_ref, groups_ref, first = genes, groups, p
        elif genes != cols_ref or groups != groups_ref:
            raise InputError(
                f"pan-cancer merge: {p} ({name}) has other genes or pathways than {first}; "
                "use the same gene-set file and alias table for every site"
            )
        tables.append(df)
    all_genes = pd.concat(tables)

    site_of = all_cases.set_index("patient_id")["site"]
    frames, folds = [], {}
    for name, p in splits.items():
        df = read_splits(p)
        folds[name] = sorted(df["fold"].unique().tolist())
        if "site" in df:
            given = df["site"].fillna("").astype(str)
            expected = site_of.reindex(df["patient_id"]).fillna("").astype(str).to_numpy()
            bad = (given != "") & (given != expected)
            if bad.any():
                raise InputError(f"pan-cancer merge: {p} ({name}): its site column says "
                                 f"{sorted(set(given[bad]))} where the cases say {sorted(set(expected[bad]))}")
        frames.append(df)
    if len({tuple(f) for f in folds.values()}) > 1:
        raise InputError(f"pan-cancer merge: site splits have different folds {folds}; make every site's "
                         "splits with the same splits.scheme and splits.n_folds")
    all_splits = pd.concat(frames, ignore_index=True)
    unknown = sorted(set(all_splits["patient_id"]) - set(site_of.index))
    if unknown:
        raise InputError(f"pan-cancer merge: split patients {unknown[:5]} are in no site's cases table")
    all_splits["site"] = site_of.reindex(all_splits["patient_id"]).to_numpy()
    check_no_leakage(all_splits)

    with atomic_path(out_cases) as tmp:
        all_cases.to_parquet(tmp, index=False)
    with atomic_path(out_splits) as tmp:
        all_splits.to_parquet(tmp, index=False)
    write_pathways(all_genes, groups_ref, out_pathways)
