"""Plot the table of ``bench_real.py``: each product and ``eigsh``, per library, per workload.

    python benchmarks/plot_real.py [--json docs/bench-real-cpu.json] [--out docs/performance-real.png]

Top row: the cost of one product as a multiple of one gradient (16-column block: per column),
bars grouped by product — curvops eager, curvops compiled, curvlinops, PyHessian.  Bottom row:
top-10 eigenvalues, wall-clock seconds (the number of products over each bar).  One column per
workload.  A missing bar: the library has no such product, or it failed (the JSON says why).
"""

from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(os.path.dirname(HERE), "docs")

PRODUCTS = [("Hessian @ v", {"curvops": "H", "curvops compiled": "H.c", "curvlinops": "cl.H", "PyHessian": "ph.H"}),
            ("GGN @ v", {"curvops": "GGN", "curvops compiled": "GGN.c", "curvlinops": "cl.GGN"}),
            ("EF @ v", {"curvops": "EF", "curvlinops": "cl.EF"}),
            ("Hessian @ V[P,16]\nper column", {"curvops": "H16", "curvops compiled": "H16.c", "curvlinops": "cl.H16"})]
EIGSH = {"curvops": "eig", "curvops compiled": "eig.c", "curvlinops": "cl.eig", "PyHessian": "ph.eig"}
LIBRARIES = ["curvops", "curvops compiled", "curvlinops", "PyHessian"]
COLORS = {"curvops": "#1f77b4", "curvops compiled": "#17becf", "curvlinops": "#ff7f0e", "PyHessian": "#2ca02c"}


def plot(data: dict, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = data["results"]
    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(6.5 * len(names), 7.5), squeeze=False)
    width = 0.8 / len(LIBRARIES)
    for j, name in enumerate(names):
        rows = results[name]["rows"]
        ax = axes[0, j]
        for i, lib in enumerate(LIBRARIES):
            xs, ys = [], []
            for p, (_, keys) in enumerate(PRODUCTS):
                row = rows.get(keys.get(lib, ""), {})
                if "ratio" in row:
                    xs.append(p + (i - 1.5) * width)
                    ys.append(row["ratio"])
            bars = ax.bar(xs, ys, width, label=lib, color=COLORS[lib])
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(PRODUCTS)), [label for label, _ in PRODUCTS], fontsize=8)
        ax.set_ylabel("× one gradient")
        ax.set_title(f"{name}: {results[name]['num_params'] / 1e6:.2f} M parameters, "
                     f"gradient {results[name]['gradient_s'] * 1e3:.0f} ms", fontsize=10)
        ax.legend(fontsize=8)
        ax = axes[1, j]
        labels, secs, counts, colors = [], [], [], []
        for lib in LIBRARIES:
            row = rows.get(EIGSH[lib], {})
            if "seconds" in row:
                labels.append(lib)
                secs.append(row["seconds"])
                counts.append(row.get("products", "?"))
                colors.append(COLORS[lib])
        bars = ax.bar(range(len(secs)), secs, color=colors)
        ax.bar_label(bars, labels=[f"{s:.1f} s\n{c} products" for s, c in zip(secs, counts)], fontsize=8)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("seconds")
        ax.set_title(f"{name}: top-10 Hessian eigenvalues", fontsize=10)
        ax.margins(y=0.25)
    meta = data["meta"]
    fig.suptitle(f"bench_real ({meta['mode']} sizes) — {meta['device']}, torch {meta['torch']}, "
                 f"{meta['threads']} threads", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=os.path.join(DOCS, "bench-real-cpu.json"))
    p.add_argument("--out", default=os.path.join(DOCS, "performance-real.png"))
    args = p.parse_args(argv)
    with open(args.json) as fh:
        data = json.load(fh)
    return plot(data, args.out)


if __name__ == "__main__":
    print(main())
