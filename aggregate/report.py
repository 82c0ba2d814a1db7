"""Render aggregation results as bytes: Cohen-compatible TSV, ``summary.json`` and the paper's Table 2.

Everything here is a pure function of the results (no file names of the inputs, no times), so the same units
split over any number of files give byte-identical outputs -- except the measured cost (``summary.json``'s
``cost``), which is the device time the shards recorded. Number formats are fixed: radii with 6 decimals in
the TSV, full ``repr`` precision in JSON (NaN written as ``null``), percentages with 1 decimal in tables.
"""
from __future__ import annotations

import json
import math
import re
from typing import Sequence

from cpcluster.aggregate.evaluate import Envelope, GroupResult
from cpcluster.aggregate.skipping import ABSTAIN_CERTAIN, REASONS, WRONG_CLASS

TSV_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\tn0\tn\n"
FORMATS = ("md", "latex", "csv")
TABLE_FILES = {"md": "table.md", "latex": "table.tex", "csv": "table.csv"}


def tsv_names(results: Sequence[GroupResult]) -> list:
    """File name of each group's TSV: ``<method slug>-sigma<sigma>[-predict].tsv``, made unique in result order."""
    names, seen = [], set()
    for r in results:
        slug = re.sub(r"[^A-Za-z0-9.=-]+", "-", r.group.plan.method).strip("-") or "method"
        base = f"{slug}-sigma{r.group.plan.sigma:g}" + ("-predict" if r.group.plan.mode == "predict" else "")
        name, k = base + ".tsv", 2
        while name in seen:
            name, k = f"{base}-{k}.tsv", k + 1
        seen.add(name)
        names.append(name)
    return names


def tsv_bytes(result: GroupResult) -> bytes:
    """Cohen's ``certify`` output columns ``idx label predict radius correct`` (predict -1 = abstain, radius 0.0
    on abstain), then ``n0 n``: the draws each image was decided with (fewer than planned only with
    ``--allow-partial`` or early stopping). Readers that select columns by name (Cohen's ``analyze.py``) read it
    unchanged.

    Runs with early stopping add a column ``skip``: ``-``, ``wrong-class`` or ``abstain-certain``. A skipped image
    has predict -1, radius 0.0, correct 0 and ``n`` = the estimation draws counted: no certificate was computed.
    For ``abstain-certain`` the full run abstains too (at every alpha up to the run's maximum); for
    ``wrong-class`` it returns the selected, wrong class or abstains -- wrong either way, so certified accuracy and
    ACR are those of the full run."""
    early = result.group.plan.max_alpha is not None
    lines = [TSV_HEADER.replace("\n", "\tskip\n") if early else TSV_HEADER]
    skips = [REASONS.get(int(r), "-") for r in result.skip.tolist()]
    for *row, skip in zip(result.idx.tolist(), result.label.tolist(), result.predict.tolist(),
                          result.radius.tolist(), result.correct.tolist(), result.n0.tolist(), result.n.tolist(),
                          skips):
        line = "%d\t%d\t%d\t%.6f\t%d\t%d\t%d" % tuple(row)
        lines.append(line + (f"\t{skip}\n" if early else "\n"))
    return "".join(lines).encode("utf-8")


def early_stop_summary(result: GroupResult) -> dict | None:
    """What early stopping did in one group (None without it): images skipped per reason, draws counted/saved."""
    plan, group = result.group.plan, result.group
    if plan.max_alpha is None:
        return None
    done = group.complete
    counted = int((group.n0_present[done] + group.n_present[done]).sum())
    saved = int(group.skips.draws[done].sum())
    return {"max_alpha": plan.max_alpha, "images_wrong_class": int((result.skip == WRONG_CLASS).sum()),
            "images_cut_short": int((result.skip == ABSTAIN_CERTAIN).sum()), "draws_counted": counted,
            "draws_saved": saved, "draws_planned": counted + saved}


def _num(x):
    x = float(x)
    return None if math.isnan(x) else x


def summary_dict(results: Sequence[GroupResult], envs: Sequence[Envelope], alpha: float,
                 radii: Sequence[float], allow_partial: bool) -> dict:
    """The content of ``summary.json`` (see :func:`summary_bytes`)."""
    names = tsv_names(results)
    groups = []
    for r, name in zip(results, names):
        p = r.group.plan
        groups.append({
            "method": p.method, "method_id": p.method_id, "sigma": p.sigma, "mode": p.mode, "n0": p.n0, "n": p.n,
            "num_classes": p.num_classes, "config_hash": r.group.config_hash, "tsv": name,
            "images_listed": int(len(r.group.image_index)), "images_evaluated": int(len(r.idx)),
            "images_missing": r.missing.tolist(), "images_partial": r.partial.tolist(),
            "missing_shards": list(r.group.missing_shards), "early_stop": early_stop_summary(r),
            "cost": r.group.cost.to_dict(),
            "certified_accuracy": [_num(v) for v in r.certified_accuracy],
            "acr": _num(r.acr), "abstain_rate": _num(r.abstain_rate),
        })
    best = [{"method": e.method, "sigmas": list(e.sigmas), "note": BEST_ROW_NOTE,
             "certified_accuracy": [_num(v) for v in e.certified_accuracy], "best_sigma": list(e.best_sigma)}
            for e in envs]
    return {"alpha": float(alpha), "radii": [float(v) for v in radii], "allow_partial": bool(allow_partial),
            "radius_space": "L2 in pixel space [0,1]", "groups": groups, "best_over_sigma": best}


def summary_bytes(results, envs, alpha, radii, allow_partial) -> bytes:
    """``summary.json``: alpha, radii, per group (method, sigma, mode, n0, n, images evaluated, missing image
    indices, partial image indices, certified accuracy per radius, ACR, abstain rate, TSV name) and the
    best-over-sigma row per method. Sorted keys, 1-space indent, trailing newline."""
    d = summary_dict(results, envs, alpha, radii, allow_partial)
    return (json.dumps(d, indent=1, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


# ------------------------------------------------------------------------------------------------------ table
BEST_ROW_NOTE = "per-radius maximum over different smoothed classifiers (one per sigma)"
BEST_NOTE = ("best over sigma: at each radius the highest certified accuracy among the method's sigma rows; a "
             "per-radius maximum over different smoothed classifiers (one per sigma), not the accuracy of any one "
             "classifier")


def table_rows(results: Sequence[GroupResult], envs: Sequence[Envelope]) -> list:
    """Table 2 rows ``(method, sigma text, images text, [accuracy or None per radius], acr or None, note)``: each
    method's groups by sigma, then its "best" row when it has two or more certify-mode sigmas. ``note`` is "" or
    what the row's numbers are (the best row: :data:`BEST_ROW_NOTE`)."""
    env = {e.method: e for e in envs}
    rows = []
    methods = sorted({r.group.plan.method for r in results})
    for method in methods:
        rs = [r for r in results if r.group.plan.method == method]
        for r in rs:
            sigma = f"{r.group.plan.sigma:g}" + (" (predict)" if r.group.plan.mode == "predict" else "")
            rows.append((method, sigma, str(len(r.idx)), [_num(v) for v in r.certified_accuracy], _num(r.acr),
                         row_note(r)))
        if method in env and len(env[method].sigmas) > 1:
            rows.append((method, "best", "", [_num(v) for v in env[method].certified_accuracy], None,
                         BEST_ROW_NOTE))
    return rows


def row_note(result: GroupResult) -> str:
    """What a sigma row's table note says about it ("" when nothing): what early stopping skipped."""
    early = early_stop_summary(result)
    if early is None:
        return ""
    share = early["draws_saved"] / early["draws_planned"] if early["draws_planned"] else 0.0
    return (f"early stopping skipped the estimation of {early['images_wrong_class']} image(s) whose selection "
            f"picked a wrong class and cut {early['images_cut_short']} short once abstention was certain at every "
            f"alpha <= {early['max_alpha']:g}; {early['draws_saved']:,} of {early['draws_planned']:,} planned draws "
            f"({100 * share:.1f}%) not counted; accuracy and ACR are those of the full run")


def table_notes(rows: list) -> list:
    """The notes printed under a Markdown or LaTeX table: what the best row is, then each row's own note."""
    notes = [BEST_NOTE] if any(sigma == "best" for _, sigma, *_ in rows) else []
    return notes + [f"{method}, sigma {sigma}: {note}" for method, sigma, *_, note in rows
                    if note and sigma != "best"]


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _csv_cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def table_text(results, envs, radii: Sequence[float], fmt: str = "md") -> str:
    """The paper's Table 2 layout: certified accuracy (%) at each radius, rows method x sigma then "best".

    Markdown and LaTeX end with notes (:func:`table_notes`); CSV carries them in a last ``note`` column."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}")
    rows = table_rows(results, envs)
    notes = table_notes(rows)
    heads = [f"r={r:g}" for r in radii]
    if fmt == "csv":
        out = ["method,sigma,images," + ",".join(heads) + ",acr,note"]
        for method, sigma, images, accs, acr, note in rows:
            cells = [_csv_cell(method), "best over sigma" if sigma == "best" else sigma, images, *map(_pct, accs),
                     "" if acr is None else f"{acr:.3f}", _csv_cell(note)]
            out.append(",".join(cells))
        return "\n".join(out) + "\n"
    if fmt == "latex":
        esc = lambda s: re.sub(r"([_%&#$^{}~\\])", r"\\\1", s)  # noqa: E731
        out = [r"\begin{tabular}{ll" + "r" * (len(radii) + 2) + "}", r"\toprule",
               r"Method & $\sigma$ & images & " + " & ".join(f"${r:g}$" for r in radii) + r" & ACR \\",
               r"\midrule"]
        prev = None
        for method, sigma, images, accs, acr, _ in rows:
            if prev is not None and method != prev:
                out.append(r"\midrule")
            label = "best over $\\sigma$" if sigma == "best" else esc(sigma)
            out.append(" & ".join([esc(method), label, images, *map(_pct, accs),
                                   "" if acr is None else f"{acr:.3f}"]) + r" \\")
            prev = method
        out += [r"\bottomrule", r"\end{tabular}"]
        out += [r"\par\smallskip{\footnotesize Note: " + esc(n) + "}" for n in notes]
        return "\n".join(out) + "\n"
    cells = [["Method", "sigma", "images", *heads, "ACR"]]
    for method, sigma, images, accs, acr, _ in rows:
        cells.append([method, "best over sigma" if sigma == "best" else sigma, images, *map(_pct, accs),
                      "" if acr is None else f"{acr:.3f}"])
    width = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    fmt_row = lambda c: "| " + " | ".join(x.ljust(w) if i < 2 else x.rjust(w)  # noqa: E731
                                          for i, (x, w) in enumerate(zip(c, width))) + " |"
    rule = "|" + "|".join(("-" * (w + 1) + ":") if i >= 2 else (":" + "-" * (w + 1))
                          for i, w in enumerate(width)) + "|"
    lines = [fmt_row(cells[0]), rule, *map(fmt_row, cells[1:])]
    return "\n".join(lines + ([""] + [f"Note: {n}" for n in notes] if notes else [])) + "\n"
