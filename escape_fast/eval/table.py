"""One table of several evaluations (splits x shot counts), as a CAPE paper prints it.

A row per method and measure (PCK@0.2, mPCK), a column per (split, shots) and
the mean over the splits per shot count; where an evaluated checkpoint is one
of the ESCAPE authors' released files, their README's PCK@0.2 for it stands
in a row beside (models/authors.py, RELEASED_PCK).
"""

from __future__ import annotations

from escape_fast.eval.metrics import THRESHOLDS
from escape_fast.models.authors import RELEASED_PCK, released_file

_AUTHORS_KIND = {"baseline": "MLE", "finetune": "MLE", "escape": "ESCAPE"}


def _thresholds() -> str:
    return ", ".join(f"{t:.2f}" for t in THRESHOLDS)


def build_table(reports: list[dict]) -> dict:
    """The table of ``reports`` (the eval command's JSON reports, each with
    "split", "shots", "checkpoint" and "results") as a dict: columns, rows
    {name: {column: value in %}}, the mean per shot count over the splits."""
    columns = [f"split {r['split']}, {r['shots']}-shot" for r in reports]
    shots = sorted({r["shots"] for r in reports})
    splits = sorted({r["split"] for r in reports})
    rows: dict[str, dict[str, float]] = {}
    for r, col in zip(reports, columns):
        for method, res in r["results"].items():
            rows.setdefault(f"{method.upper()} PCK@0.2", {})[col] = 100 * res["pck"]["0.20"]
            rows.setdefault(f"{method.upper()} mPCK", {})[col] = 100 * res["mpck"]
        released = released_file(r["checkpoint"])
        if released and released[1] == r["split"] and (released[0], r["shots"]) in RELEASED_PCK:
            kind = released[0]
            name = f"{_AUTHORS_KIND[kind]} PCK@0.2, the authors' README ({kind}_splitN.pth)"
            rows.setdefault(name, {})[col] = RELEASED_PCK[kind, r["shots"]][r["split"] - 1]
    means = {}
    for name, values in rows.items() if len(splits) > 1 else ():
        for s in shots:
            got = [values.get(f"split {sp}, {s}-shot") for sp in splits]
            if all(v is not None for v in got):
                means.setdefault(name, {})[f"mean, {s}-shot"] = sum(got) / len(got)
    return {"measures": f"PCK@0.2 and mPCK (the mean of PCK at {_thresholds()}), in %",
            "pairs": sorted({r["episodes"] for r in reports}), "splits": splits, "shots": shots,
            "columns": columns + ([f"mean, {s}-shot" for s in shots] if len(splits) > 1 else []), "rows": rows,
            "means": means}


def markdown(table: dict) -> str:
    """The table in markdown, with a line saying what the numbers are."""
    pairs = " / ".join(f"{n:,}" for n in table["pairs"])
    n = len(table["splits"])
    lines = [f"{table['measures']}; {pairs} (support set, query) pairs per column"
             + (f"; mean over {n} splits" if n > 1 else ""), ""]
    lines.append("| | " + " | ".join(table["columns"]) + " |")
    lines.append("| --- |" + " --- |" * len(table["columns"]))
    for name, values in table["rows"].items():
        merged = {**values, **table["means"].get(name, {})}
        cells = [f"{merged[c]:.2f}" if c in merged else "" for c in table["columns"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
