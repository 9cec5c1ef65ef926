"""UCSC Xena RNA-seq matrices: reading (genes x samples, gzip or plain) and one sample per patient.

The ModalTune reference code keeps the first Xena column per barcode prefix, which can be a
normal-tissue sample; :func:`choose_samples` prefers tumour sample types explicitly (method notes,
bug 9). No torch import.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from modaltune.errors import InputError

_GZIP_MAGIC = b"\x1f\x8b"
_TCGA_BARCODE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})-(\d{2})([A-Z]?)(?:-.*)?$", re.IGNORECASE)
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
NORMAL_TYPES = tuple(f"{t:02d}" for t in range(10, 20))


def _is_gzip(path: Path) -> bool:
    # Xena publishes both gzip and plain TSVs under inconsistent suffixes: trust the magic bytes.
    with open(path, "rb") as fh:
        return fh.read(2) == _GZIP_MAGIC


def open_text(path: Path):
    if _is_gzip(path):
        return gzip.open(path, "rt", newline="")
    return open(path, newline="")


def _clean_gene_id(raw: str) -> str:
    """`?|100130426` -> `100130426` (an Entrez id: kept, never matches a symbol); `A1BG|1` -> `A1BG`."""
    gid = str(raw).strip()
    if "|" in gid:
        symbol, _, rest = gid.partition("|")
        gid = rest if symbol in ("?", "") else symbol
    return gid


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _parse_matrix(path: Path, samples: list[str]) -> tuple[list[str], np.ndarray]:
    """Body of a Xena TSV -> (raw gene ids, float64 genes x samples). pyarrow's CSV reader: ~3x faster than
    pandas' C parser on a 20k x 1.2k matrix, which matters for the 11k-sample EB++ file."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    names = ["__gene__", *samples]
    compression = "gzip" if _is_gzip(path) else None
    try:
        table = pcsv.read_csv(
            pa.input_stream(str(path), compression=compression),
            read_options=pcsv.ReadOptions(column_names=names, skip_rows=1, block_size=1 << 24),
            parse_options=pcsv.ParseOptions(delimiter="\t"),
            convert_options=pcsv.ConvertOptions(
                column_types={"__gene__": pa.string()}, null_values=["", "NA", "NaN", "nan", "null"]
            ),
        )
    except pa.ArrowInvalid as exc:
        raise InputError(
            f"{path}: not a rectangular genes x samples TSV ({str(exc).splitlines()[0]})"
        ) from exc
    gene_ids = [str(g).strip() for g in table.column(0).to_pylist()]
    arr = np.empty((table.num_rows, len(samples)), dtype=np.float64)
    for j, name in enumerate(samples):
        col = table.column(j + 1)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            vals = pd.to_numeric(pd.Series(col.to_pylist(), dtype=object), errors="coerce")
            bad = np.flatnonzero(vals.isna().to_numpy() & col.is_valid().to_numpy(zero_copy_only=False))
            if len(bad):
                raise InputError(
                    f"{path}: non-numeric value {col[int(bad[0])].as_py()!r} at gene {gene_ids[bad[0]]!r}, "
                    f"sample {name!r}; expected a genes x samples matrix of numbers"
                )
            arr[:, j] = vals.to_numpy(dtype=np.float64)
        elif pa.types.is_null(col.type):
            arr[:, j] = np.nan
        elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
            arr[:, j] = col.cast(pa.float64()).to_numpy()  # nulls come back as NaN
        else:
            raise InputError(f"{path}: column {name!r} holds {col.type} values; expected numbers")
    return gene_ids, arr


def read_xena(path: str | os.PathLike) -> pd.DataFrame:
    """Read a Xena gene x sample matrix (HiSeqV2_PANCAN, EB++ PANCAN); gzip or plain, sniffed.

    Returns float64 genes x samples with cleaned gene ids as index. Duplicated gene ids keep the row
    with the highest variance across samples (the most informative copy; averaging would blend
    unrelated probes that share a symbol). Infinite values become NaN. What was done is recorded in
    ``df.attrs["read_report"]`` (duplicate count and ids, NaN and inf counts).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: RNA matrix not found; give the path of the Xena genes x samples file")
    with open_text(path) as fh:
        try:
            header = fh.readline().rstrip("\r\n").split("\t")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read as a (gzipped) tab-separated text file ({exc})") from exc
        if len(header) < 2:
            raise InputError(
                f"{path}: expected a tab-separated genes x samples matrix (first column gene symbol, "
                f"one column per sample) but the first line has {len(header)} field(s); check the separator"
            )
        samples = [h.strip() for h in header[1:]]
        if all(_is_number(s) for s in samples):
            raise InputError(
                f"{path}: header line is missing (the first line holds numbers); Xena matrices start with a "
                "line `sample<TAB>TCGA-..-....-01<TAB>...`: add it"
            )
        dup_samples = sorted({s for s in samples if samples.count(s) > 1})
        if dup_samples:
            raise InputError(f"{path}: sample column(s) appear twice in the header: {dup_samples[:5]}")
    gene_ids, arr = _parse_matrix(path, samples)
    if len(gene_ids) == 0:
        raise InputError(f"{path}: no gene rows below the header")
    if sum(bool(_TCGA_BARCODE.match(i)) for i in gene_ids) > 0.5 * len(gene_ids):
        raise InputError(
            f"{path}: the row ids look like sample barcodes, i.e. the matrix is samples x genes; "
            "Xena format is genes x samples: transpose it"
        )
    n_inf, n_nan_file = int(np.isinf(arr).sum()), int(np.isnan(arr).sum())
    arr[np.isinf(arr)] = np.nan
    df = pd.DataFrame(arr, index=[_clean_gene_id(i) for i in gene_ids], columns=samples, copy=False)
    df.index.name = "gene"
    dup_mask = df.index.duplicated(keep=False)
    dup_ids = sorted(set(df.index[dup_mask]))
    if dup_ids:
        var = df.var(axis=1, skipna=True).fillna(-np.inf).to_numpy()
        ranked = pd.DataFrame({"var": var, "pos": np.arange(len(df))}, index=df.index)
        # highest variance first, file order among equals
        ranked = ranked.sort_values(["var", "pos"], ascending=[False, True])
        keep = ranked.groupby(level=0, sort=False)["pos"].first().to_numpy()
        df = df.iloc[np.sort(keep)]
    df.attrs["read_report"] = {
        "file": str(path),
        "n_genes": int(df.shape[0]),
        "n_samples": int(df.shape[1]),
        "n_duplicate_gene_ids": len(dup_ids),
        "n_duplicate_rows_dropped": int(dup_mask.sum() - len(dup_ids)),
        "duplicate_gene_ids": dup_ids[:200],
        "duplicate_policy": "keep the row with the highest variance across samples",
        "n_nan_in_file": n_nan_file,
        "n_nan": int(np.isnan(df.to_numpy()).sum()),  # after inf -> NaN and duplicate removal
        "n_inf_set_to_nan": n_inf,
    }
    return df


def check_id_namespace(matrix_ids: Iterable[str], set_genes: Iterable[str], rna_path, genesets_path) -> None:
    matrix_ids = list(matrix_ids)
    set_genes = list(set_genes)
    frac_ens = np.mean([bool(_ENSEMBL.match(g)) for g in matrix_ids]) if matrix_ids else 0.0
    frac_set_ens = np.mean([bool(_ENSEMBL.match(g)) for g in set_genes]) if set_genes else 0.0
    if frac_ens > 0.5 and frac_set_ens <= 0.5:
        raise InputError(
            f"{rna_path}: {frac_ens:.0%} of the gene ids are Ensembl ids (ENSG...) but the gene sets in "
            f"{genesets_path} use gene symbols; map the matrix to HGNC symbols first "
            "(e.g. with the Xena/GENCODE probe map of the dataset) or give gene sets keyed by Ensembl id"
        )


# ------------------------------------------------------------------------------------ sample choice


def parse_barcode(sample_id: str) -> tuple[str, str, str] | None:
    """`TCGA-XX-YYYY-01A-...` -> (patient `TCGA-XX-YYYY`, sample type `01`, vial `A`); None if not TCGA."""
    m = _TCGA_BARCODE.match(str(sample_id).strip())
    if not m:
        return None
    return m.group(1).upper(), m.group(2), m.group(3).upper()


def _read_sample_map(sample_map) -> dict[str, str]:
    if sample_map is None:
        return {}
    if isinstance(sample_map, Mapping):
        return {str(k): str(v) for k, v in sample_map.items()}
    if isinstance(sample_map, pd.DataFrame):
        table, where = sample_map, "sample_map"
    else:
        where = Path(sample_map)
        if not where.is_file():
            raise InputError(f"{where}: sample map not found (TSV/CSV with columns sample_id, patient_id)")
        table = pd.read_csv(where, sep=None, engine="python", dtype=str)
    missing = {"sample_id", "patient_id"} - set(table.columns)
    if missing:
        raise InputError(f"{where}: sample map lacks column(s) {sorted(missing)}; need sample_id, patient_id")
    return dict(zip(table["sample_id"].astype(str), table["patient_id"].astype(str), strict=True))


def choose_samples(
    sample_ids: Sequence[str],
    allow_normal: bool = False,
    preference: Sequence[str] = ("01", "03", "02", "06", "05"),
    sample_map=None,
) -> pd.DataFrame:
    """Pick one RNA sample per patient.

    TCGA barcodes: patient = first three fields; sample types ranked by ``preference``; normals (10-19)
    only when ``allow_normal`` (after all preferred types); other types are not used. Ties (01A vs 01B,
    or aliquots) -> lexicographically first id. Other ids: the whole id is the patient unless
    ``sample_map`` (dict, DataFrame or TSV/CSV with sample_id, patient_id) says otherwise.
    Returns one row per patient: patient_id, sample_id (None when no usable sample), sample_type,
    n_candidates, reason.
    """
    mapping = _read_sample_map(sample_map)
    ranks = {t: i for i, t in enumerate(preference)}
    by_patient: dict[str, list[tuple[str, str | None]]] = {}
    for sid in map(str, sample_ids):
        if sid in mapping:
            parsed = parse_barcode(sid)
            patient, stype = mapping[sid], (parsed[1] if parsed else None)
        else:
            parsed = parse_barcode(sid)
            patient, stype = (parsed[0], parsed[1]) if parsed else (sid, None)
        by_patient.setdefault(patient, []).append((sid, stype))

    rows = []
    for patient in sorted(by_patient):
        cands = sorted(by_patient[patient])
        typed = [c for c in cands if c[1] is not None]
        if not typed:  # in-house ids: no type information
            chosen = cands[0][0]
            reason = (
                "mapped by sample_map" if chosen in mapping else "non-TCGA id: the whole id is the patient"
            )
            if len(cands) > 1:
                reason += f"; {len(cands)} samples, lexicographically first kept"
            rows.append((patient, chosen, None, len(cands), reason))
            continue

        def rank(c):
            if c[1] in ranks:
                return ranks[c[1]]
            if allow_normal and c[1] in NORMAL_TYPES:
                return len(ranks)
            return None

        usable = sorted((rank(c), c[0], c[1]) for c in typed if rank(c) is not None)
        types = ",".join(sorted({c[1] for c in typed}))
        if not usable:
            reason = f"no usable sample (types {types}; normals need allow_normal)"
            rows.append((patient, None, None, len(cands), reason))
            continue
        best_rank, chosen, stype = usable[0]
        ties = [u[1] for u in usable if u[0] == best_rank]
        reason = f"type {stype} preferred among {types}" if len(cands) > 1 else f"only sample (type {stype})"
        if stype in NORMAL_TYPES:
            reason += "; NORMAL tissue used (allow_normal)"
        if len(ties) > 1:
            reason += f"; tie {ties} -> lexicographically first"
        rows.append((patient, chosen, stype, len(cands), reason))
    return pd.DataFrame(rows, columns=["patient_id", "sample_id", "sample_type", "n_candidates", "reason"])
