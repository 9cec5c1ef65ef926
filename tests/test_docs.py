"""Docs stay in step with the code: method references resolve, the architecture tables are complete."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "modaltune"
NOTES = (ROOT / "docs" / "METHOD_NOTES.md").read_text()
ARCH = (ROOT / "docs" / "ARCHITECTURE.md").read_text()

SECTION = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", re.MULTILINE)
BUG_ENTRY = re.compile(r"^### Bug (\d+):", re.MULTILINE)
METHOD_REF = re.compile(r"\bmethod (\d+(?:\.\d+)?(?:/\d+(?:\.\d+)?)*)")
BUG_REF = re.compile(r"\b(?:bugs?|fix list) (\d+(?:\s*(?:,|-|and)\s*\d+)*)", re.IGNORECASE)


def _numbers(text: str) -> list[int]:
    out = []
    for part in re.split(r"\s*(?:,|and)\s*", text):
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-"))
            out += list(range(lo, hi + 1))
        elif part.strip():
            out.append(int(part))
    return out


def references(text: str) -> tuple[set[str], set[int]]:
    sections = {s for m in METHOD_REF.finditer(text) for s in m.group(1).split("/")}
    bugs = {n for m in BUG_REF.finditer(text) for n in _numbers(m.group(1))}
    return sections, bugs


def test_reference_parser():
    sections, bugs = references("method 3.4/4.2 ... method 6, bug 4; bugs 2-3 and fix list 10; (bugs 7, 8)")
    assert sections == {"3.4", "4.2", "6"} and bugs == {2, 3, 4, 7, 8, 10}


def test_every_method_and_bug_reference_in_src_resolves():
    headings = set(SECTION.findall(NOTES))
    entries = {int(n) for n in BUG_ENTRY.findall(NOTES)}
    missing = []
    n_refs = 0
    for path in sorted(SRC.rglob("*.py")):
        sections, bugs = references(path.read_text())
        n_refs += len(sections) + len(bugs)
        missing += [f"{path.relative_to(ROOT)}: method {s}" for s in sorted(sections - headings)]
        missing += [f"{path.relative_to(ROOT)}: bug {b}" for b in sorted(bugs - entries)]
    assert n_refs > 20  # the package does cite the notes; an empty scan would pass vacuously
    assert not missing, "references without a heading/entry in docs/METHOD_NOTES.md: " + "; ".join(missing)
    assert "docs/METHOD_NOTES.md" in ARCH


def _table(doc: str, heading: str) -> str:
    start = doc.index(heading)
    end = doc.find("\n## ", start + 1)
    return doc[start:end if end > 0 else None]


def test_every_module_is_in_the_architecture_table():
    table = _table(ARCH, "## Package layout")
    listed = set(re.findall(r"^\| `([^`]+)` \|", table, re.MULTILINE))
    modules = {p.name for p in SRC.glob("*.py") if p.name != "__init__.py"}
    packages = {f"{p.name}/" for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    assert not (modules | packages) - listed, f"missing from ARCHITECTURE's table: {sorted((modules | packages) - listed)}"
    assert not listed - (modules | packages), f"table lists what does not exist: {sorted(listed - (modules | packages))}"


OUTPUT = re.compile(r'^\s+\w+=(?:update\()?\s*(?:directory\()?\s*f"([^"]+)"', re.MULTILINE)


def rule_outputs() -> set[str]:
    """Declared per-cohort output patterns of the rules, as paths below results/{cohort}/."""
    out = set()
    run = "{RESULTS}/{{cohort}}/runs/{{model}}/seed_{{seed}}/fold_{{fold}}"
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        text = smk.read_text()
        for block in re.findall(r"\n    output:\n((?:        .*\n|            .*\n)+)", text):
            for pattern in OUTPUT.findall(block):
                pattern = pattern.replace("{RUN}", run).replace("{SCHEME}", "{{scheme}}")
                m = re.match(r"\{RESULTS\}/\{\{(?:eval_)?cohort\}\}/(.+)$", pattern)
                if m:
                    out.add(m.group(1).replace("{{", "{").replace("}}", "}"))
    return out


def test_every_rule_output_is_in_the_results_table():
    outputs = rule_outputs()
    assert {"tiles/{slide}.h5", "runs/{model}/seed_{seed}/fold_{fold}/metrics.json"} <= outputs
    table = _table(ARCH, "## Results layout")
    listed = set(re.findall(r"`([^`]+)`", table))
    assert not outputs - listed, f"rule outputs missing from ARCHITECTURE's results table: {sorted(outputs - listed)}"
