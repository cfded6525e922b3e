"""A stored run in pandas, notebook style: load it, pivot protection by defense x tracker, plot it.

    python examples/notebook.py RUN [OUT]

RUN is a results folder (``cloakbench run SUITE --out RUN``); OUT (default ``RUN/notebook``) receives, per
protocol, ``protection-<protocol>.csv`` (the pivot) and ``protection-<protocol>.png`` (a heat map). Each cell
of the pivot is a protection rate (1 - top-1 accuracy on the protected users' clean query photos), averaged
over seeds; a tracker is recognizer / countermeasure / classifier. Every block below runs as is in a notebook
cell (set ``run`` and ``out`` by hand there). docs/python.md walks through it; tests/test_results.py runs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib as mpl
import numpy as np

mpl.use("Agg")  # files only; in a notebook leave this out and the figures show inline
import matplotlib.pyplot as plt

import cloakbench

run = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/quick")
out = Path(sys.argv[2]) if len(sys.argv) > 2 else run / "notebook"
out.mkdir(parents=True, exist_ok=True)

# 1. Load: one typed DataFrame per table of the results store (cells, queries, cloaks, adaptations, tasks).
results = cloakbench.results(run)
print(f"{results.name}: {len(results.cells)} cells, {len(results.queries)} query rows, {len(results.cloaks)} cloaks")

# 2. Only cells that produced a rate (a cell refused for low clean accuracy, or failed, has none).
cells = results.ok_cells.assign(
    tracker=lambda c: c["recognizer"].astype(str) + " / " + c["countermeasure"].astype(str) + " / "
    + c["classifier"].astype(str)
)  # fmt: skip

for protocol, part in cells.groupby("protocol", observed=True):
    # 3. Pivot: defenses (rows, in the suite's order: the column is categorical) x trackers.
    table = part.pivot_table(
        index="defense", columns="tracker", values="protection_rate", aggfunc="mean", observed=True
    )
    table.to_csv(out / f"protection-{protocol}.csv")
    print(f"\nprotection rate, {protocol} protocol\n{table.round(2).to_string()}")

    # 4. Plot: a heat map, the rate written in each cell.
    fig, ax = plt.subplots(figsize=(4.0 + 0.9 * table.shape[1], 3.0 + 0.45 * table.shape[0]), layout="constrained")
    values = table.to_numpy(dtype=float)
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="cividis", aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=40, ha="right")
    ax.set_yticks(range(table.shape[0]), table.index)
    for i, j in np.ndindex(values.shape):
        rate = values[i, j]
        ax.text(
            j, i, "–" if np.isnan(rate) else f"{rate:.2f}", ha="center", va="center", color="w" if rate < 0.6 else "k"
        )
    fig.colorbar(image, ax=ax, label="protection rate")
    ax.set_title(f"{results.name}: {protocol}")
    fig.savefig(out / f"protection-{protocol}.png", dpi=120)
    plt.close(fig)

print(f"\nwritten into {out}")
