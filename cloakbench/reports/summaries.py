"""The report's tables, as pure functions of a stored run (:class:`cloakbench.reports.data.RunData`).

Seeds are pooled: a suite run with several seeds gets one row per (protocol, defense, recognizer,
countermeasure, classifier), whose protection rate is over every query photo of every seed and whose
interval is :func:`~cloakbench.bench.metrics.protection_interval` over those photos, a person seen in several
seeds being one cluster (``seed`` 0 of NumPy's generator, the suite's resamples and confidence: the same run
always gives the same interval). A single seed keeps the interval the run stored.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cloakbench.bench.metrics import INTERVAL_METHOD, protection_interval
from cloakbench.reports.data import RunData
from cloakbench.reports.render import Column, Estimate, Table
from cloakbench.reports.worst_case import ANY_RECOGNIZER, truthy, worst_case
from cloakbench.results import table_frame

CELL = ("protocol", "defense", "recognizer", "countermeasure", "classifier")
PER_SEED = ("seed", *CELL)


def _mean(values: Sequence[Any]) -> float:
    finite = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(finite)) if finite else float("nan")


def attach_quality(summary: Sequence[Mapping[str, Any]], cloaks: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Summary rows with the budget each cell's defense actually used (max/mean L-inf, mean L2, PSNR, SSIM, max
    DSSIM over the cloaked photos of its seed)."""
    groups: dict[tuple[Any, Any], list[Mapping[str, Any]]] = defaultdict(list)
    for row in cloaks:
        groups[(row["seed"], row["defense"])].append(row)
    out = []
    for row in summary:
        g = groups.get((row["seed"], row["defense"]), [])
        extra: dict[str, Any] = {}
        if g:
            extra = {
                "linf_max": max(float(r["linf"]) for r in g),
                "linf_mean": float(np.mean([r["linf"] for r in g])),
                "l2_mean": float(np.mean([r["l2"] for r in g])),
                "psnr_mean": float(np.mean([r["psnr"] for r in g])),
                "ssim_mean": float(np.mean([r["ssim"] for r in g])),
                "dssim_max": max(float(r["dssim"]) for r in g),
            }
        out.append({**row, **extra})
    return out


def _status(cells: Sequence[Mapping[str, Any]]) -> str:
    bad = [c for c in cells if c.get("status") != "ok"]
    if not bad:
        return "ok"
    first = bad[0]
    note = str(first.get("note") or "").splitlines()
    detail = f": {note[0][:160]}" if note else ""
    if len(bad) < len(cells):
        return f"{len(bad)} of {len(cells)} seeds {first.get('status')}{detail}"
    return f"{first.get('status')}{detail}"


def _pooled_topk(
    ok: Sequence[Mapping[str, Any]], ranks: Mapping[tuple[str, ...], list[int]], key: tuple[str, ...], k: int
) -> float:
    """Top-k accuracy over every seed's query photos; NaN where the run stored none (k covers every candidate)."""
    stored = [c.get(f"top{k}_accuracy") for c in ok]
    if not ok or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in stored):
        return float("nan")
    if len(ok) == 1:
        return float(stored[0])  # type: ignore[arg-type]
    per_seed = [(str(c["seed"]), *key) for c in ok]
    pooled = [r for seed_key in per_seed for r in ranks[seed_key]]
    return float(np.mean([r <= k for r in pooled])) if pooled else float("nan")


def pooled_cells(data: RunData) -> list[dict[str, Any]]:
    """One row per cell of the grid without its seed: protection (an :class:`Estimate`) over every seed's query
    photos, clean and top-k accuracies averaged over seeds, ``status`` ``ok`` when every seed's cell was."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for cell in data.cells:
        groups[tuple(str(cell.get(k, "")) for k in CELL)].append(cell)
    correct: dict[tuple[str, ...], list[bool]] = defaultdict(list)
    ranks: dict[tuple[str, ...], list[int]] = defaultdict(list)
    people: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for q in data.queries:
        k = tuple(str(q.get(k, "")) for k in PER_SEED)
        correct[k].append(truthy(q.get("correct")))
        people[k].append(str(q.get("protected_identity", "")))
        ranks[k].append(int(q.get("rank") or 0))
    boot = data.suite.get("bootstrap") or {}
    resamples, confidence = int(boot.get("resamples", 1000)), float(boot.get("confidence", 0.95))
    out = []
    for key, cells in groups.items():
        ok = [c for c in cells if c.get("status") == "ok"]
        row: dict[str, Any] = dict(zip(CELL, key, strict=True))
        row.update(
            oblivious=cells[0].get("oblivious"), status=_status(cells), n_seeds=len(ok),
            n_queries=sum(int(c.get("n_queries") or 0) for c in ok),
            n_identities=max((int(c.get("n_identities") or 0) for c in ok), default=0),
            clean_accuracy_protected=_mean([c.get("clean_accuracy_protected") for c in ok]),
            clean_accuracy_all=_mean([c.get("clean_accuracy_all") for c in ok]),
            top5_accuracy=_pooled_topk(ok, ranks, key, 5),
            top50_accuracy=_pooled_topk(ok, ranks, key, 50),
            cloak_s_per_image=_mean([c.get("cloak_s_per_image") for c in ok]),
        )  # fmt: skip
        if not ok:
            row["protection"] = Estimate(float("nan"), float("nan"), float("nan"))
        elif len(ok) == 1:
            c = ok[0]
            row["protection"] = Estimate(float(c["protection_rate"]), float(c["ci_low"]), float(c["ci_high"]))
        else:
            per_seed = [(str(c["seed"]), *key) for c in ok]
            flags = np.array([f for k in per_seed for f in correct[k]], dtype=bool)
            protected = 1.0 - flags.astype(np.float64)
            who = [p for k in per_seed for p in people[k]]  # one person over several seeds is one cluster
            lo, hi = protection_interval(
                protected, who, rng=np.random.default_rng(0), resamples=resamples, confidence=confidence
            )
            row["protection"] = Estimate(float(protected.mean()) if protected.size else float("nan"), lo, hi)
        out.append(row)
    return data.sort(out, CELL)


def pooled_quality(data: RunData) -> list[dict[str, Any]]:
    """Per defense, over every photo it cloaked (all seeds): the perturbation it used and the image quality."""
    cloaks = table_frame(data, "cloaks").groupby("defense", observed=True)  # categories in suite order
    stats = cloaks.agg(
        photos=("linf", "size"), linf_max=("linf", "max"), linf_mean=("linf", "mean"), l2_mean=("l2", "mean"),
        psnr_mean=("psnr", "mean"), ssim_mean=("ssim", "mean"), dssim_mean=("dssim", "mean"),
        dssim_max=("dssim", "max"),
    )  # fmt: skip
    return [{"defense": str(defense), **row} for defense, row in stats.to_dict("index").items()]


# -- the tables ---------------------------------------------------------------------------------------------


def _text(key: str, header: str | None = None) -> Column:
    return Column(key=key, header=header or key, numeric=False)


_KEY_COLUMNS = (
    _text("protocol"),
    _text("defense"),
    _text("recognizer"),
    _text("countermeasure"),
    _text("classifier"),
)


def protection_table(data: RunData, pooled: Sequence[Mapping[str, Any]]) -> Table:
    confidence = float((data.suite.get("bootstrap") or {}).get("confidence", 0.95))
    rows = [{**r, "oblivious": "yes" if truthy(r.get("oblivious")) else "no"} for r in pooled]
    return Table(
        name="protection",
        title="Protection rate",
        caption=(
            "Share of the protected identities' query photos the tracker did not identify (1 - top-1 accuracy), "
            f"with a {confidence:.0%} interval whose unit is the person ({INTERVAL_METHOD}); seeds pooled. "
            "'oblivious': the recognizer had no part in making the cloak. Top-5 / top-50: the tracker's accuracy on "
            "the same photos when the true identity (poisoning) or one of its photos (evasion) only has to be among "
            "the first k candidates "
            "('–' where k covers every candidate)."
        ),
        columns=(
            *_KEY_COLUMNS,
            _text("oblivious"),
            Column(key="protection", header=f"protection ({confidence:.0%} CI)"),
            Column(key="top5_accuracy", header="top-5 acc."),
            Column(key="top50_accuracy", header="top-50 acc."),
            Column(key="n_queries", header="queries"),
            Column(key="n_seeds", header="seeds"),
            _text("status"),
        ),
        rows=tuple(rows),
    )


def clean_accuracy_table(data: RunData, pooled: Sequence[Mapping[str, Any]]) -> Table:
    """Per tracker (protocol, recognizer, countermeasure, classifier): accuracy on clean photos, which says
    whether a protection rate means anything (a tracker that fails on clean photos 'protects' everyone)."""
    keys = ["protocol", "recognizer", "countermeasure", "classifier"]
    measured = pd.DataFrame.from_records(
        [r for r in pooled if r.get("n_seeds")], columns=[*keys, "clean_accuracy_protected", "clean_accuracy_all"]
    ).astype({"clean_accuracy_protected": "float64", "clean_accuracy_all": "float64"})
    stats = measured.groupby(keys, sort=False).agg(
        clean_accuracy_protected=("clean_accuracy_protected", "mean"), low=("clean_accuracy_protected", "min"),
        high=("clean_accuracy_protected", "max"), clean_accuracy_all=("clean_accuracy_all", "mean"),
    )  # fmt: skip
    stats["spread"] = stats["high"] - stats["low"]
    rows = stats.drop(columns=["low", "high"]).reset_index().to_dict("records")
    return Table(
        name="clean-accuracy",
        title="Clean accuracy of each tracker",
        caption=(
            "Top-1 accuracy on clean query photos: of the protected identities (averaged over the defenses' cells and "
            "seeds; 'spread' is max - min over them, non-zero when the tracker retrains per defense) and of every "
            "identity."
        ),
        columns=(
            _text("protocol"),
            _text("recognizer"),
            _text("countermeasure"),
            _text("classifier"),
            Column(key="clean_accuracy_protected", header="protected identities", digits=3),
            Column(key="spread", header="spread", digits=3),
            Column(key="clean_accuracy_all", header="all identities", digits=3),
        ),
        rows=tuple(data.sort(rows, ("protocol", "recognizer", "countermeasure", "classifier"))),
    )


def quality_table(quality: Sequence[Mapping[str, Any]]) -> Table:
    return Table(
        name="quality",
        title="Image quality of the cloaks",
        caption=(
            "Over every photo each defense cloaked (all seeds), measured on the stored 8-bit PNG cloaks: L-inf in "
            "units of 1/255, L2 over [0, 1] pixels of a 112x112x3 photo, PSNR in dB, SSIM, DSSIM = (1 - SSIM) / 2."
        ),
        columns=(
            _text("defense"),
            Column(key="photos", header="photos"),
            Column(key="linf_max", header="L-inf max (/255)", scale=255.0, digits=1),
            Column(key="linf_mean", header="L-inf mean (/255)", scale=255.0, digits=1),
            Column(key="l2_mean", header="L2 mean", digits=2),
            Column(key="psnr_mean", header="PSNR (dB)", digits=1),
            Column(key="ssim_mean", header="SSIM", digits=3),
            Column(key="dssim_mean", header="DSSIM mean", digits=4),
            Column(key="dssim_max", header="DSSIM max", digits=4),
        ),
        rows=tuple(quality),
    )


def cost_rows(data: RunData, pooled: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per defense: seconds per cloaked photo (as the run measured it, averaged over seeds), photos cloaked, and
    the cloaking stage's wall seconds summed over the run's tasks."""
    per_image = (
        pd.DataFrame.from_records(list(pooled), columns=["defense", "cloak_s_per_image"])
        .astype({"cloak_s_per_image": "float64"})
        .groupby("defense", sort=False)["cloak_s_per_image"]
        .mean()
    )
    photos = table_frame(data, "cloaks")["defense"].value_counts()
    tasks = table_frame(data, "tasks")
    subject = tasks.loc[tasks["kind"] == "cloak"].set_index("task_key")["subject"].astype(str)
    timings = pd.DataFrame.from_records(list(data.timings), columns=["task_key", "stage", "seconds"])
    cloaking = timings[(timings["stage"] == "cloaking") & timings["task_key"].isin(subject.index)]
    stage = cloaking.groupby(cloaking["task_key"].map(subject))["seconds"].sum()
    rows = [
        {"defense": d, "photos": int(photos.get(d, 0)), "s_per_image": float(v),
         "cloaking_s": float(stage.get(d, float("nan")))}
        for d, v in per_image.items()
    ]  # fmt: skip
    return data.sort(rows, ("defense",))


def cost_table(data: RunData, rows: Sequence[Mapping[str, Any]]) -> Table:
    devices = ", ".join(data.devices) or "–"
    return Table(
        name="cost",
        title="Cost of cloaking",
        caption=(
            f"Milliseconds per cloaked photo as the run measured it (device: {devices}; a cloak read from the "
            "cache reports what making it cost), and the wall seconds of the cloaking stage in this run's tasks "
            "(0 when every cloak came from the cache)."
        ),
        columns=(
            _text("defense"),
            Column(key="photos", header="photos cloaked"),
            Column(key="s_per_image", header="ms / photo", scale=1000.0, digits=1),
            Column(key="cloaking_s", header="cloaking stage (s)", digits=1),
        ),
        rows=tuple(rows),
    )


def time_table(data: RunData) -> Table:
    """Wall seconds per stage, summed per kind of task, with the number of tasks and their total."""
    kind = {str(t["task_key"]): str(t["kind"]) for t in data.tasks}
    stages: list[str] = []
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for t in data.timings:
        k = kind.get(str(t["task_key"]))
        if k is None:
            continue
        if t["stage"] not in stages:
            stages.append(str(t["stage"]))
        sums[k][str(t["stage"])] += float(t["seconds"])
    rows = []
    for k in ("cloak", "evaluate", "service"):
        tasks = [t for t in data.tasks if t["kind"] == k]
        if not tasks:
            continue
        rows.append({
            "kind": k, "tasks": len(tasks), "failed": sum(1 for t in tasks if t["status"] != "ok"),
            "seconds": sum(float(t["seconds"]) for t in tasks), **{f"stage_{s}": sums[k].get(s, 0.0) for s in stages},
        })  # fmt: skip
    return Table(
        name="time",
        title="Where the time went",
        caption="Wall seconds per stage, summed over the committed tasks of each kind (every attempt at the run).",
        columns=(
            _text("kind", "tasks"),
            Column(key="tasks", header="count"),
            Column(key="failed", header="failed"),
            Column(key="seconds", header="total (s)", digits=1),
            *(Column(key=f"stage_{s}", header=f"{s} (s)", digits=1) for s in stages),
        ),
        rows=tuple(rows),
    )


def worst_case_table(data: RunData) -> Table:
    boot = data.suite.get("bootstrap") or {}
    confidence = float(boot.get("confidence", 0.95))
    rows = worst_case(data.queries, data.cells, resamples=int(boot.get("resamples", 1000)), confidence=confidence)
    rows = data.sort(rows, ("seed", "protocol", "defense"))  # stable: each defense's recognizers, then "*"
    shown = [
        {
            **r, "recognizer": "every recognizer" if r["recognizer"] == ANY_RECOGNIZER else r["recognizer"],
            "protection": Estimate(r["worst_case_protection"], r["ci_low"], r["ci_high"]),
        }
        for r in rows
    ]  # fmt: skip
    return Table(
        name="worst-case",
        title="Worst case over countermeasures",
        caption=(
            "A photo counts as protected only if no countermeasure and no classifier of the suite identified it (the "
            "tracker tries them all); 'strongest' is the one that identified the most photos alone."
        ),
        columns=(
            _text("protocol"),
            _text("defense"),
            _text("recognizer"),
            Column(key="seed", header="seed"),
            Column(key="protection", header=f"worst-case protection ({confidence:.0%} CI)"),
            _text("strongest"),
            Column(key="strongest_protection", header="its protection"),
            Column(key="n_countermeasures", header="trackers counted"),
        ),
        rows=tuple(shown),
    )


def adaptation_table(data: RunData) -> Table:
    return Table(
        name="adaptations",
        title="Retrained trackers",
        caption=(
            "One row per model a countermeasure retrained: its training set, epochs, throughput and nearest-neighbour "
            "clean accuracy before and after (every identity's clean queries)."
        ),
        columns=(
            _text("recognizer"),
            _text("countermeasure"),
            _text("defense"),
            _text("protected_identity", "protected identity"),
            _text("training_set", "training set"),
            Column(key="epochs", header="epochs"),
            Column(key="images_per_s", header="images/s", digits=1),
            Column(key="clean_accuracy_before", header="clean acc. before", digits=3),
            Column(key="clean_accuracy_after", header="clean acc. after", digits=3),
        ),
        rows=tuple(data.adaptations),
    )


def identity_table(data: RunData) -> Table | None:
    """Protection per protected identity and defense, a column per recognizer, for one slice of the grid (the
    suite's first protocol and classifier, no countermeasure when the suite has it): who a defense fails."""
    cells, queries = table_frame(data, "cells"), table_frame(data, "queries")
    protocol = data.first("protocol", cells["protocol"].astype(str))
    classifier = data.first("classifier", cells["classifier"].astype(str))
    cm = data.first("countermeasure", cells["countermeasure"].astype(str), prefer="none")
    ok = cells.loc[cells["status"] == "ok", list(PER_SEED)].astype(str).set_index(list(PER_SEED)).index
    shown = queries[
        queries[list(PER_SEED)].astype(str).set_index(list(PER_SEED)).index.isin(ok)
        & (queries["protocol"] == protocol) & (queries["countermeasure"] == cm)
        & (queries["classifier"] == classifier)
    ]  # fmt: skip
    if shown.empty:
        return None
    per = shown.assign(identity=shown["protected_identity"].astype(str), hit=shown["correct"].astype("float64"))
    per = per.pivot_table(
        index=["identity", "defense"], columns="recognizer", values="hit", aggfunc=["mean", "size"], observed=True
    )  # rows: identity by name, then defense in suite order; columns: recognizers in suite order
    recognizers = [str(r) for r in per["mean"].columns]
    rows = []
    for (ident, defense), r in per.iterrows():
        row: dict[str, Any] = {"identity": ident, "defense": str(defense), "photos": int(r["size"].max())}
        for i, rec in enumerate(per["mean"].columns):
            hit = r["mean"][rec]
            row[f"r{i}"] = 1.0 - float(hit) if pd.notna(hit) else float("nan")
        rows.append(row)
    return Table(
        name="identities",
        title="Protection per protected identity",
        caption=(
            f"Share of each protected identity's query photos not identified ({protocol} protocol, {classifier} "
            f"tracker, countermeasure {cm}; seeds pooled), one column per recognizer. Few photos per identity: "
            "read single rows with care."
        ),
        columns=(
            _text("identity", "protected identity"),
            _text("defense"),
            Column(key="photos", header="query photos"),
            *(Column(key=f"r{i}", header=rec) for i, rec in enumerate(recognizers)),
        ),
        rows=tuple(rows),
    )


def report_tables(data: RunData) -> tuple[Table, ...]:
    """Every table of the report, in the order they appear."""
    pooled = pooled_cells(data)
    tables = [
        protection_table(data, pooled),
        worst_case_table(data),
        clean_accuracy_table(data, pooled),
        quality_table(pooled_quality(data)),
        cost_table(data, cost_rows(data, pooled)),
        time_table(data),
    ]
    identities = identity_table(data)
    if identities is not None:
        tables.append(identities)
    if data.adaptations:
        tables.append(adaptation_table(data))
    return tuple(tables)
