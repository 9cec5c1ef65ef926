"""Gene sets (MSigDB GMT or a gene x pathway 0/1 CSV) and gene-symbol aliases (HGNC renames).

Xena's HiSeqV2 matrices carry pre-2016 symbols while MSigDB / SurvPath gene sets use current ones;
:func:`resolve_gene` finds a set's gene in the matrix through the alias graph, in both directions.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pandas as pd

from modaltune.errors import InputError
from modaltune.xena import open_text

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


def read_gene_sets(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read MSigDB GMT (name, description, genes...) or a gene x pathway 0/1 CSV (column `gene`).

    Genes keep file order; a gene listed twice in one set is kept once.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: gene-set file not found (GMT or gene x pathway 0/1 CSV)")
    suffix = path.suffix.lower()
    if suffix != ".gmt":
        with open_text(path) as fh:
            first = fh.readline()
        # a membership CSV is comma-separated; GMT lines are tab-separated
        if suffix == ".csv" or ("\t" not in first and "," in first):
            return _read_membership_csv(path)
    return _read_gmt(path)


def _read_gmt(path: Path) -> dict[str, list[str]]:
    sets: dict[str, list[str]] = {}
    with open_text(path) as fh:
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
        with open_text(path) as fh:
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


def resolve_gene(gene: str, present: set[str], aliases: dict[str, set[str]]) -> str | None:
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
