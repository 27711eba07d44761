"""`make demo`: sample the 2-D ring testbed with a few solvers and budgets, against the exact flow map.

Writes `<out>/ring_samples.png` (scatter plots: rows are solvers, columns are budgets of model calls, the last
column the exact probability-flow samples) and `<out>/error_vs_nfe.md` (relative RMS error against the exact
flow map), and prints where they are.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from .processes import EDM
from .solvers import sample
from .testbeds import GaussianMixture

SOLVERS = (("euler", "karras"), ("heun", "karras"), ("dpmpp_2m", "logsnr"), ("unipc", "logsnr"), (None, None))
BUDGETS = (5, 10, 20)


def relative_rms(x, ref) -> float:
    """RMS of (x - ref) divided by the RMS of ref."""
    return float((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def run(out: Path, n: int = 2000, seed: int = 0) -> dict:
    """Sample, measure and plot; returns {(solver, nfe): error}."""
    torch.manual_seed(seed)
    gm, process = GaussianMixture.ring(), EDM()
    den = gm.denoiser(process, "eps")
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x_start = process.noise_to_canonical(noise, process.sigma_bar_max)
    exact = gm.flow_map(x_start, process.sigma_bar_max, 0.0)
    results, samples = {}, {}
    for name, schedule in SOLVERS:
        for nfe in BUDGETS:
            x, info = sample(den, noise, solver=name, schedule=schedule, nfe=nfe, return_info=True)
            label = name or f"default ({info['solver']})"
            results[(label, nfe)] = relative_rms(x, exact)
            samples[(label, nfe)] = x
    out.mkdir(parents=True, exist_ok=True)
    _write_table(out / "error_vs_nfe.md", results)
    _plot(out / "ring_samples.png", samples, exact, results)
    return results


def _atomic_write_bytes(path: Path, data: bytes):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_table(path: Path, results: dict):
    labels = list(dict.fromkeys(k[0] for k in results))
    lines = ["Relative RMS error against the exact probability-flow map, 2-D ring testbed (EDM process).", "",
             "| solver | " + " | ".join(f"NFE {b}" for b in BUDGETS) + " |",
             "|---|" + "---:|" * len(BUDGETS)]
    for lab in labels:
        lines.append(f"| {lab} | " + " | ".join(f"{results[(lab, b)]:.2e}" for b in BUDGETS) + " |")
    _atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def _plot(path: Path, samples: dict, exact, results: dict):
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(k[0] for k in samples))
    fig, axes = plt.subplots(len(labels), len(BUDGETS) + 1, figsize=(2.6 * (len(BUDGETS) + 1), 2.6 * len(labels)),
                             squeeze=False)
    for r, lab in enumerate(labels):
        for c, b in enumerate(BUDGETS):
            ax = axes[r, c]
            x = samples[(lab, b)]
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5)
            ax.set_title(f"{lab}, NFE {b}\nerr {results[(lab, b)]:.1e}", fontsize=8)
        ax = axes[r, -1]
        ax.scatter(exact[:, 0], exact[:, 1], s=1, alpha=0.5, color="black")
        ax.set_title("exact flow map", fontsize=8)
    for ax in axes.flat:
        ax.set_xlim(-1.6, 1.6)
        ax.set_ylim(-1.6, 1.6)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _atomic_write_bytes(path, buf.getvalue())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffkit.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: %(default)s)")
    parser.add_argument("--n", type=int, default=2000, help="number of samples (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be positive")
    out = Path(args.out)
    run(out, n=args.n, seed=args.seed)
    print((out / "error_vs_nfe.md").read_text())
    print(f"wrote {out / 'ring_samples.png'}")
    print(f"wrote {out / 'error_vs_nfe.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
