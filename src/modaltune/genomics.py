"""RNA-seq (UCSC Xena matrices) -> per-patient gene vectors grouped by pathway, plus the fold-wise scaler.

The ModalTune reference code keeps the first Xena column per barcode prefix (which can be a normal-tissue
sample) and z-scores genes over the whole cohort (val/test included). Here the sample choice prefers
tumour types explicitly and the scaler is fitted on training patients only (method notes, fix list 7, 9).
No torch import: the rna_pathways rule is CPU-only.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from modaltune.errors import InputError, LeakageError
from modaltune.io_utils import atomic_path, write_json

GROUPS_KEY = b"modaltune.groups"
SAMPLE_COLUMN = "sample_id"
NON_GENE_COLUMNS = (SAMPLE_COLUMN, "patient_id")

_GZIP_MAGIC = b"\x1f\x8b"
_TCGA_BARCODE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})-(\d{2})([A-Z]?)(?:-.*)?$", re.IGNORECASE)
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
NORMAL_TYPES = tuple(f"{t:02d}" for t in range(10, 20))

# Renamed HGNC symbols (previous -> current), facts from HGNC. Xena's HiSeqV2 matrices carry pre-2016
# symbols while MSigDB / SurvPath gene sets use current ones; resolution works in both directions.
_BUILTIN_ALIAS_TEXT = """
IL8:CXCL8 IL8RA:CXCR1 IL8RB:CXCR2 EIF2C1:AGO1 EIF2C2:AGO2 EIF2C3:AGO3 EIF2C4:AGO4 PKM2:PKM
MTATP6:MT-ATP6 ATP6:MT-ATP6 MTATP8:MT-ATP8 MLL:KMT2A MLL2:KMT2D MLL3:KMT2C WHSC1:NSD2 WHSC1L1:NSD3
C11orf30:EMSY MRE11A:MRE11 FAM175A:ABRAXAS1 KIAA1524:CIP2A KIAA0101:PCLAF FAM64A:PIMREG
GNB2L1:RACK1 SHFM1:SEM1 ERBB2IP:ERBIN ADRBK1:GRK2 ADRBK2:GRK3 PPAP2A:PLPP1 PPAP2B:PLPP3 TCEB1:ELOC
TCEB2:ELOB H3F3A:H3-3A H3F3B:H3-3B HIST1H3B:H3C2 H2AFX:H2AX SEPT2:SEPTIN2 SEPT7:SEPTIN7
SEPT9:SEPTIN9 CD97:ADGRE5 GPR56:ADGRG1 ELTD1:ADGRL4 EMR1:ADGRE1 BAI1:ADGRB1 CTGF:CCN2 CYR61:CCN1
NOV:CCN3 WISP1:CCN4 C7orf68:HILPDA FAM129A:NIBAN1 SQRDL:SQOR ATP5A1:ATP5F1A ATP5B:ATP5F1B
ATP5O:ATP5PO LHFP:LHFPL6 PTPLAD1:HACD3 NGFRAP1:BEX3 GLTSCR2:NOP53 TMEM173:STING1 C19orf10:MYDGF
AIM1:CRYBG1 MKL1:MRTFA MKL2:MRTFB TROVE2:RO60 ZNF259:ZPR1 WBSCR22:BUD23 ADCK3:COQ8A PARK2:PRKN
DARC:ACKR1 CCBP2:ACKR2 FAM46C:TENT5C HDGFRP3:HDGFL3
"""
BUILTIN_ALIASES: tuple[tuple[str, str], ...] = tuple(
    tuple(pair.split(":"))
    for pair in _BUILTIN_ALIAS_TEXT.split()  # (previous, current)
)


# --------------------------------------------------------------------------------------------- Xena


def _is_gzip(path: Path) -> bool:
    # Xena publishes both gzip and plain TSVs under inconsistent suffixes: trust the magic bytes.
    with open(path, "rb") as fh:
        return fh.read(2) == _GZIP_MAGIC


def _open_text(path: Path):
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
    with _open_text(path) as fh:
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


def _check_id_namespace(matrix_ids: Iterable[str], set_genes: Iterable[str], rna_path, genesets_path) -> None:
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


# ---------------------------------------------------------------------------------------- gene sets


def read_gene_sets(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read MSigDB GMT (name, description, genes...) or a gene x pathway 0/1 CSV (column `gene`).

    Genes keep file order; a gene listed twice in one set is kept once.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: gene-set file not found (GMT or gene x pathway 0/1 CSV)")
    suffix = path.suffix.lower()
    if suffix != ".gmt":
        with _open_text(path) as fh:
            first = fh.readline()
        # a membership CSV is comma-separated; GMT lines are tab-separated
        if suffix == ".csv" or ("\t" not in first and "," in first):
            return _read_membership_csv(path)
    return _read_gmt(path)


def _read_gmt(path: Path) -> dict[str, list[str]]:
    sets: dict[str, list[str]] = {}
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) < 3:
                raise InputError(
                    f"{path}: line {lineno} is not GMT (name<TAB>description<TAB>gene...); "
                    f"found {len(fields)} field(s)"
                )
            name = fields[0].strip()
            if name in sets:
                raise InputError(f"{path}: gene set {name!r} appears twice (line {lineno}); rename one")
            genes = list(dict.fromkeys(g.strip() for g in fields[2:] if g.strip()))
            if not genes:
                raise InputError(f"{path}: gene set {name!r} (line {lineno}) lists no genes")
            sets[name] = genes
    if not sets:
        raise InputError(f"{path}: no gene sets found")
    return sets


def _read_membership_csv(path: Path) -> dict[str, list[str]]:
    table = pd.read_csv(path)
    gene_col = next((c for c in table.columns if str(c).strip().lower() in ("gene", "genes")), None)
    if gene_col is None:
        if str(table.columns[0]).startswith("Unnamed"):
            gene_col = table.columns[0]
        else:
            raise InputError(f"{path}: pathway CSV needs a `gene` column plus one 0/1 column per pathway")
    genes = table[gene_col].astype(str).str.strip()
    if genes.duplicated().any():
        raise InputError(
            f"{path}: gene(s) listed on several rows: {sorted(set(genes[genes.duplicated()]))[:5]}"
        )
    sets: dict[str, list[str]] = {}
    for col in table.columns:
        if col == gene_col or str(col).startswith("Unnamed:"):  # a saved pandas index is no pathway
            continue
        member = pd.to_numeric(table[col], errors="coerce")
        if member.isna().any() or not member.isin([0, 1]).all():
            raise InputError(f"{path}: column {col!r} must hold only 0/1 membership flags")
        sets[str(col)] = genes[member.to_numpy() == 1].tolist()
    if not sets:
        raise InputError(f"{path}: no pathway columns besides {gene_col!r}")
    return sets


def load_alias_table(alias_table=None) -> dict[str, set[str]]:
    """Symmetric alias graph from the built-in renames plus an optional TSV/CSV of (old, new) pairs."""
    pairs = list(BUILTIN_ALIASES)
    if alias_table is not None:
        path = Path(alias_table)
        if not path.is_file():
            raise InputError(f"{path}: alias table not found (two columns: old symbol, new symbol)")
        with _open_text(path) as fh:
            sample = fh.read(4096)
            fh.seek(0)
            delim = "\t" if "\t" in sample else ","
            for lineno, row in enumerate(csv.reader(fh, delimiter=delim), 1):
                if not row or row[0].startswith("#"):
                    continue
                if len(row) < 2:
                    raise InputError(f"{path}: line {lineno} needs two columns (old, new symbol)")
                old, new = row[0].strip(), row[1].strip()
                if lineno == 1 and old.lower() == "old" and new.lower() == "new":
                    continue
                pairs.append((old, new))
    graph: dict[str, set[str]] = {}
    for old, new in pairs:
        graph.setdefault(old, set()).add(new)
        graph.setdefault(new, set()).add(old)
    return graph


def _resolve(gene: str, present: set[str], aliases: dict[str, set[str]]) -> str | None:
    if gene in present:
        return gene
    # breadth-first over the alias graph: IL8 -> CXCL8, or chains of successive renames
    seen, frontier = {gene}, [gene]
    while frontier:
        nxt = []
        for g in frontier:
            for a in sorted(aliases.get(g, ())):
                if a in seen:
                    continue
                if a in present:
                    return a
                seen.add(a)
                nxt.append(a)
        frontier = nxt
    return None


# --------------------------------------------------------------------------------------- main stage


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
    _check_id_namespace(matrix.index, all_set_genes, rna_path, genesets_path)
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
            hit = _resolve(g, present, aliases)
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
    _write_pathways(out, groups, Path(out_parquet))

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


def _write_pathways(df: pd.DataFrame, groups: dict[str, list[str]], path: Path) -> None:
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


# ------------------------------------------------------------------------------------------- scaler


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


def combine_site_pathways(
    pathway_paths: Mapping[str, str | os.PathLike], out_parquet: str | os.PathLike
) -> pd.DataFrame:
    """Pan-cancer gene table: union of per-site pathways.parquet files with identical gene groups."""
    frames, ref_groups, ref_site = [], None, None
    for site, path in pathway_paths.items():
        df, groups = load_pathways(path)
        if ref_groups is None:
            ref_groups, ref_site = groups, site
        elif groups != ref_groups:
            diff = sorted(p for p in set(groups) | set(ref_groups) if groups.get(p) != ref_groups.get(p))
            raise InputError(
                f"{path}: gene groups of site {site} differ from site {ref_site} (pathways {diff[:5]}); "
                "rebuild all "
                "sites with the same gene-set file and alias table (or build from one pan-cancer Xena matrix)"
            )
        frames.append(df)
    if not frames:
        raise InputError("combine_site_pathways: no site files given")
    union = pd.concat(frames)
    if union.index.has_duplicates:
        raise InputError(
            f"patient(s) {sorted(set(union.index[union.index.duplicated()]))[:5]} appear in two sites"
        )
    _write_pathways(union, ref_groups, Path(out_parquet))
    return union
