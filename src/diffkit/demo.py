"""`make demo`: the shipped digits model, sampled with a few solvers at a few budgets, with image metrics.

`run_digits` samples every class of the class-conditional 16x16 digits model shipped in
`src/diffkit/assets/digits` (trained by `diffkit train --preset digits`) with three solvers at budgets of 5, 10
and 20 model calls from the same noise, measures each sample set with `diffkit.image_metrics` (classifier accuracy
and Fréchet distance in the digits classifier's feature space), and writes

* `<out>/grid.png`: one panel per (solver, NFE), rows = digit classes 0..9;
* `<out>/quality_vs_nfe.png`: accuracy and Fréchet distance against NFE per solver;
* `<out>/quality_vs_nfe.md`: the same numbers as a table; `<out>/samples.npz`: the raw samples.

`run_ring` (``diffkit demo --testbed ring``) samples the 2-D ring testbed with four solvers and compares each
with the exact probability-flow map (`ring_samples.png`, `error_vs_nfe.md`).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import torch

from .checkpoint import atomic_write
from .processes import EDM
from .solvers import default_for, sample
from .testbeds import GaussianMixture

DIGITS_SOLVERS = ((None, None), ("dpmpp_2m", None), ("heun", None))
DIGITS_BUDGETS = (5, 10, 20)


def digits_model(path=None):
    """The digits `Denoiser` at `path` (default: the shipped model in diffkit/assets/digits)."""
    from .checkpoint import load_denoiser

    return load_denoiser(path or Path(__file__).resolve().parent / "assets" / "digits")


def sample_classes(den, labels, noise, *, solver=None, nfe=10, schedule=None, batch: int = 500,
                   progress: bool = False):
    """Class-conditional samples (probability-flow ODE, `diffkit.sample`) for `labels` from `noise`, in batches;
    returns (samples, info of the last batch)."""
    outs, info = [], {}
    with torch.no_grad():
        for i in range(0, len(noise), batch):
            x, info = sample(den, noise[i:i + batch], solver=solver, nfe=nfe, schedule=schedule, return_info=True,
                             cond={"label": labels[i:i + batch]}, progress=progress)
            outs.append(x)
    return torch.cat(outs), info


def run_digits(out: Path, per_class: int = 5, seed: int = 0, model=None, solvers=DIGITS_SOLVERS,
               budgets=DIGITS_BUDGETS, progress: bool = True) -> dict:
    """Sample the digits model per (solver, NFE) from one noise draw, measure and plot; returns
    {(solver label, nfe): {'accuracy', 'fd', 'seconds'}}."""
    from .image_metrics import classifier_accuracy, frechet_digits_distance

    den = digits_model(model)
    n = 10 * per_class
    labels = torch.arange(n) % 10
    noise = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    configs = [(s, sch, b) for s, sch in solvers for b in budgets]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(configs), desc="demo", unit="config", file=sys.stderr)
    results, samples = {}, {}
    for name, schedule, nfe in configs:
        t0 = time.perf_counter()
        x, info = sample_classes(den, labels, noise, solver=name, nfe=nfe, schedule=schedule)
        label = name or "default"  # one row: the default's solver may change with the budget (in the titles)
        results[(label, nfe)] = {"accuracy": classifier_accuracy(x, labels), "fd": frechet_digits_distance(x),
                                 "seconds": time.perf_counter() - t0, "solver": info["solver"]}
        samples[(label, nfe)] = x
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{label} NFE {nfe}")
    if bar is not None:
        bar.close()
    out.mkdir(parents=True, exist_ok=True)
    _digits_grid(out / "grid.png", samples, labels, results)
    _quality_plot(out / "quality_vs_nfe.png", results)
    _quality_table(out / "quality_vs_nfe.md", results, n)
    buf = io.BytesIO()
    import numpy as np

    np.savez(buf, labels=labels.numpy(), **{f"{lab.split()[0]}_nfe{b}": x.numpy() for (lab, b), x in samples.items()})
    atomic_write(out / "samples.npz", buf.getvalue())
    return results


def _digits_grid(path: Path, samples: dict, labels, results: dict):
    plt = pyplot()
    keys = list(samples)
    labs = list(dict.fromkeys(k[0] for k in keys))
    nfes = list(dict.fromkeys(k[1] for k in keys))
    per_class = len(labels) // 10
    fig, axes = plt.subplots(len(labs), len(nfes), figsize=(1.0 + 0.55 * per_class * len(nfes),
                                                           0.6 + 5.6 * len(labs)), squeeze=False)
    for (lab, nfe), x in samples.items():
        ax = axes[labs.index(lab), nfes.index(nfe)]
        ax.imshow(tile_by_class(x, labels), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
        r = results[(lab, nfe)]
        name = f"default ({r['solver']})" if lab == "default" else lab
        ax.set_title(f"{name}, NFE {nfe}\nacc {r['accuracy']:.0%}  FD {r['fd']:.1f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([8 + 17 * c for c in range(10)], [str(c) for c in range(10)], fontsize=7)
    fig.suptitle("diffkit digits model: rows = class 0..9", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def tile_by_class(x, labels):
    """(H', W') image with one row per class (0..9) of the 16x16 samples `x`, 1-pixel gaps (value -1)."""
    per = max(int((labels == c).sum()) for c in range(10))
    grid = torch.full((10 * 17 - 1, per * 17 - 1), -1.0)
    for c in range(10):
        for j, img in enumerate(x[labels == c]):
            grid[17 * c:17 * c + 16, 17 * j:17 * j + 16] = img[0].clamp(-1, 1)
    return grid.numpy()


def _quality_plot(path: Path, results: dict):
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for lab in dict.fromkeys(k[0] for k in results):
        nfes = [b for (lb, b) in results if lb == lab]
        a1.plot(nfes, [100 * results[(lab, b)]["accuracy"] for b in nfes], "o-", label=lab)
        a2.plot(nfes, [results[(lab, b)]["fd"] for b in nfes], "o-", label=lab)
    a1.set(xlabel="NFE (model calls)", ylabel="classifier accuracy (%)", title="samples classified as their label")
    a2.set(xlabel="NFE (model calls)", ylabel="Fréchet distance", title="Fréchet distance (classifier features)",
           yscale="log")
    for a in (a1, a2):
        a.set_xscale("log")
        a.xaxis.set_minor_locator(plt.NullLocator())
        a.set_xticks(sorted({k[1] for k in results}), [str(b) for b in sorted({k[1] for k in results})])
        a.grid(alpha=0.3)
    a1.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _quality_table(path: Path, results: dict, n: int):
    nfes = sorted({k[1] for k in results})
    lines = [f"Digits model, {n} class-conditional samples per configuration (same noise): classifier accuracy / "
             "Fréchet distance to the held-out real digits.", "",
             "| solver | " + " | ".join(f"NFE {b}" for b in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for lab in dict.fromkeys(k[0] for k in results):
        cells = [f"{results[(lab, b)]['accuracy']:.0%} / {results[(lab, b)]['fd']:.1f}" if (lab, b) in results
                 else "" for b in nfes]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    atomic_write(path, ("\n".join(lines) + "\n").encode())


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (figures are only written to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int = 110) -> None:
    """Write a matplotlib figure to `path` as PNG atomically (`atomic_write`) and close it."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


SOLVERS = (("euler", "karras"), ("heun", "karras"), ("dpmpp_2m", "logsnr"), ("unipc", "logsnr"), (None, None))
BUDGETS = (5, 10, 20)


def relative_rms(x, ref) -> float:
    """RMS of (x - ref) divided by the RMS of ref."""
    return float((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def run_ring(out: Path, n: int = 2000, seed: int = 0) -> dict:
    """Sample, measure and plot; returns {(solver, nfe): error}."""
    torch.manual_seed(seed)
    gm, process = GaussianMixture.ring(), EDM()
    den = gm.denoiser(process, "eps")
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x_start = process.noise_to_canonical(noise, process.sigma_bar_max)
    exact = gm.flow_map(x_start, process.sigma_bar_max, 0.0)
    results, samples, resolved = {}, {}, {}
    for name, schedule in SOLVERS:
        for nfe in BUDGETS:
            x, info = sample(den, noise, solver=name, schedule=schedule, nfe=nfe, return_info=True)
            label = name or "default"
            if name is None:
                c = default_for(nfe)
                resolved[nfe] = f"{c.solver} / {c.schedule} / {c.end}"
            results[(label, nfe)] = relative_rms(x, exact)
            samples[(label, nfe)] = x
    out.mkdir(parents=True, exist_ok=True)
    _write_table(out / "error_vs_nfe.md", results, resolved)
    _plot(out / "ring_samples.png", samples, exact, results)
    return results


def _write_table(path: Path, results: dict, resolved: dict | None = None):
    labels = list(dict.fromkeys(k[0] for k in results))
    lines = ["Relative RMS error against the exact probability-flow map, 2-D ring testbed (EDM process).", "",
             "| solver | " + " | ".join(f"NFE {b}" for b in BUDGETS) + " |",
             "|---|" + "---:|" * len(BUDGETS)]
    for lab in labels:
        lines.append(f"| {lab} | " + " | ".join(f"{results[(lab, b)]:.2e}" for b in BUDGETS) + " |")
    if resolved:
        lines += ["", "default = " + "; ".join(f"NFE {b}: {c}" for b, c in resolved.items())]
    atomic_write(path, ("\n".join(lines) + "\n").encode())


def _plot(path: Path, samples: dict, exact, results: dict):
    plt = pyplot()

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
    save_figure(fig, path)


def build_parser(prog: str = "python -m diffkit.demo") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="examples:\n  diffkit demo\n  diffkit demo --out /tmp/demo --per-class 2\n"
                                            "  diffkit demo --testbed ring")
    add_arguments(parser)
    return parser


def add_arguments(parser):
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: %(default)s)")
    parser.add_argument("--testbed", choices=("digits", "ring"), default="digits",
                        help="digits: the shipped digits model; ring: the 2-D ring testbed (default: %(default)s)")
    parser.add_argument("--model", default=None, help="digits model folder (default: the shipped model)")
    parser.add_argument("--per-class", type=int, default=5, help="digits samples per class (default: %(default)s)")
    parser.add_argument("--budgets", default=",".join(map(str, DIGITS_BUDGETS)),
                        help="digits: comma-separated NFE budgets (default: %(default)s)")
    parser.add_argument("--n", type=int, default=2000, help="ring testbed samples (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """Positive integers from a comma-separated string (ValueError naming `what` otherwise)."""
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers; got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what} must be positive integers; got {text!r}")
    return values


def run_args(args) -> int:
    """Run the demo for parsed arguments (shared by `python -m diffkit.demo` and `diffkit demo`)."""
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.testbed == "ring":
        if args.n < 1:
            raise ValueError(f"--n must be positive; got {args.n}")
        run_ring(out, n=args.n, seed=args.seed)
        print((out / "error_vs_nfe.md").read_text())
        files = ["ring_samples.png", "error_vs_nfe.md"]
    else:
        if args.per_class < 2:
            raise ValueError(f"--per-class must be at least 2; got {args.per_class}")
        budgets = parse_ints(args.budgets, "--budgets")
        run_digits(out, per_class=args.per_class, seed=args.seed, model=args.model, budgets=budgets,
                   progress=not args.no_progress)
        print((out / "quality_vs_nfe.md").read_text())
        files = ["grid.png", "quality_vs_nfe.png", "quality_vs_nfe.md", "samples.npz"]
    for f in files:
        print(f"wrote {out / f}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_args(args)
    except (ValueError, OSError) as e:
        print(f"diffkit demo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
