"""``cpcluster aggregate`` as a function: shard files in, certified radii, tables and a figure out.

Order of work: expand the paths, read and check every file, merge per ``(method, sigma, mode)``, decide per image,
render every output to bytes, and only then write. So any validation error leaves the output folder untouched.
The outputs of one aggregation appear together or not at all: all are written to temporary names first and
renamed into place only when every one is written (:func:`cpcluster.util.fileio.write_files_together`), so a full disk
leaves the folder as it was.

Outputs in ``out``: one TSV per group (``<method>-sigma<s>[-predict].tsv``), ``summary.json``, ``table.md`` (and
``table.tex`` / ``table.csv`` with ``format``), ``certified_accuracy.png``, when the shards recorded their device
time ``cost.csv`` and ``cost.png`` (certified accuracy at ``cost_radius`` against device-seconds per image; the
cost table is also appended to ``table.md``), and ``inputs.json`` (the options, the
input files with their hashes and the list of outputs written: the one output that depends on how the units were
split into files). Outputs of an earlier aggregation into ``out`` that this one does not write (its
``inputs.json`` lists them) are removed once the new ones are in place; other files are left as they are.
"""
from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass

import fsspec

from cpcluster.aggregate.cost import cost_csv, cost_png, cost_table
from cpcluster.aggregate.evaluate import envelopes, evaluate_group
from cpcluster.aggregate.merge import merge_shards
from cpcluster.aggregate.plot import plot_png
from cpcluster.aggregate.report import TABLE_FILES, summary_bytes, table_text, tsv_bytes, tsv_names
from cpcluster.core.config import AggregateOptions
from cpcluster.core.shards import SHARD_GLOB, expand_paths, read_shard
from cpcluster.util.errors import InputError
from cpcluster.util.fileio import filesystem, join_url, read_json, write_files_together

PLOT_FILE = "certified_accuracy.png"
COST_PLOT = "cost.png"
COST_CSV = "cost.csv"


@dataclass(frozen=True)
class AggregateResult:
    """What one run produced: the groups' results, the printed table, warnings, and the files written."""

    results: list
    envelopes: list
    table: str  # in options.format
    warnings: list
    out: str
    written: list


def default_out(paths: list) -> str:
    """``<deepest folder that holds every input file>/aggregate`` (same protocol for all, else an error)."""
    split = [fsspec.core.split_protocol(p) for p in paths]
    protocols = {proto for proto, _ in split}
    if len(protocols) != 1:
        raise InputError("inputs on different filesystems: give --out")
    proto = protocols.pop()
    if proto in (None, "file"):
        folder = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for _, p in split])
        return os.path.join(folder, "aggregate")
    folder = posixpath.commonpath([posixpath.dirname(p) for _, p in split])
    return f"{proto}://{folder.lstrip('/')}/aggregate" if proto != "memory" else f"memory://{folder}/aggregate"


def input_files(patterns) -> list:
    """:func:`cpcluster.core.shards.expand_paths`, plus: a folder matched by a glob stands for the shard files in it
    (folders without any, like an earlier ``aggregate`` output, are skipped)."""
    for p in patterns:
        _refuse_unstarted_run(p)
    out = []
    for p in expand_paths(patterns):
        fs, path = filesystem(p)
        if not fs.isdir(path):
            out.append(p)
        elif fs.glob(path.rstrip("/") + "/" + SHARD_GLOB):
            out += expand_paths([p])
    if not out:
        raise InputError(f"{' '.join(patterns)}: matches folders only, none holding {SHARD_GLOB} files")
    return sorted(dict.fromkeys(out))


def _refuse_unstarted_run(path: str) -> None:
    """A certify run folder (it has ``run.json``) without any shard file yet: say so, and how to see its state."""
    fs, local = filesystem(path)
    if any(c in local for c in "*?[") or not fs.isdir(local) or fs.glob(local.rstrip("/") + "/" + SHARD_GLOB):
        return
    record = join_url(path, "run.json")
    if fs.exists(filesystem(record)[1]):
        try:
            total = read_json(record).get("num_shards", "?")
        except InputError:
            total = "?"
        raise InputError(f"{path}: unfinished certify run, none of its {total} shard files is written yet; "
                         f"`cpcluster status {path}` shows where its shards stand")


def _stale_outputs(out: str, names: set) -> list:
    """Files an earlier aggregate wrote into ``out`` (its ``inputs.json`` lists them) that this one will not:
    they are removed after the new outputs are in place, so the folder never mixes two aggregations."""
    url = join_url(out, "inputs.json")
    fs, path = filesystem(url, "--out")
    if not fs.exists(path):
        return []
    try:
        listed = read_json(url, "--out").get("outputs")
    except InputError:
        return []
    if not isinstance(listed, list):
        return []
    return [join_url(out, n) for n in listed if isinstance(n, str) and n not in names and "/" not in n
            and n not in (".", "..") and fs.exists(filesystem(join_url(out, n))[1])]


def build_outputs(opts: AggregateOptions):
    """Everything up to (not including) writing: ``(results, envelopes, {file name: bytes}, table, warnings)``."""
    files = input_files(opts.paths)
    shards = [read_shard(p) for p in files]
    groups = merge_shards(shards)
    warnings = [w for g in groups for w in g.warnings]
    results = [evaluate_group(g, opts.alpha, opts.radii, opts.allow_partial) for g in groups]
    for r in results:
        p = r.group.plan
        if len(r.missing):
            head = ", ".join(map(str, r.missing[:10].tolist())) + (" ..." if len(r.missing) > 10 else "")
            warnings.append(f"{p.method} sigma {p.sigma:g}: {len(r.missing)} image(s) with missing units excluded "
                            f"(index {head}); see summary.json, or --allow-partial to use the draws present")
        if len(r.partial):
            warnings.append(f"{p.method} sigma {p.sigma:g}: {len(r.partial)} image(s) decided with fewer draws "
                            "than planned (--allow-partial); the TSV's n0 and n columns give them")
    if any(len(g.missing_shards) for g in groups):
        warnings.append("the run is unfinished: `cpcluster status RUN_DIR` shows its shards, `cpcluster resubmit "
                        "RUN_DIR` reruns the failed ones")
    envs = envelopes(results)
    for e in envs:
        sets = {tuple(r.idx.tolist()) for r in results if r.group.plan.method == e.method
                and r.group.plan.mode == "certify"}
        if len(sets) > 1:
            warnings.append(f"{e.method}: the sigmas were evaluated on different image sets; the best-over-sigma "
                            "row compares unlike sets")
    outputs = {name: tsv_bytes(r) for r, name in zip(results, tsv_names(results))}
    outputs["summary.json"] = summary_bytes(results, envs, opts.alpha, opts.radii, opts.allow_partial)
    costs = cost_table(results)
    md = table_text(results, envs, opts.radii, "md")
    if costs:
        md += "\nCost (device time spent counting, from the shard files):\n\n" + costs
        outputs[COST_CSV] = cost_csv(results)
    outputs[TABLE_FILES["md"]] = md.encode("utf-8")
    table = md if opts.format == "md" else table_text(results, envs, opts.radii, opts.format)
    outputs[TABLE_FILES[opts.format]] = table.encode("utf-8")
    if opts.plot:
        png = plot_png(results, envs, opts.radii)
        if png is not None:
            outputs[PLOT_FILE] = png
        png = cost_png(results, opts.radius_for_cost) if costs else None
        if png is not None:
            outputs[COST_PLOT] = png
    inputs = {"options": opts.to_dict(), "warnings": warnings, "outputs": sorted(outputs) + ["inputs.json"],
              "files": [{"path": s.path, "config_hash": s.config_hash, "complete": s.complete, "shard": s.shard,
                         "units": int(len(s.units))} for s in sorted(shards, key=lambda s: s.path)]}
    outputs["inputs.json"] = (json.dumps(inputs, indent=1, sort_keys=True) + "\n").encode("utf-8")
    return results, envs, outputs, table, warnings, files


def run_aggregate(opts: AggregateOptions) -> AggregateResult:
    """Run the whole aggregation; raises :class:`InputError` before writing anything if any input is bad."""
    results, envs, outputs, table, warnings, files = build_outputs(opts)
    out = opts.out or default_out(files)
    fs, path = filesystem(out, "--out")
    if fs.exists(path) and not fs.isdir(path):
        raise InputError(f"--out {out}: exists and is not a folder; give a folder")
    stale = _stale_outputs(out, set(outputs))
    written = write_files_together(out, outputs)  # all or nothing: an error leaves the folder as it was
    for url in stale:  # outputs of an earlier aggregate into this folder that this one does not write
        try:
            filesystem(url)[0].rm(filesystem(url)[1])
        except OSError:
            pass
    return AggregateResult(results=results, envelopes=envs, table=table, warnings=warnings, out=out,
                           written=written)
