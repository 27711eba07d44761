"""`diffkit bench --model CKPT`: image quality of a class-conditional digits model per solver and budget.

For each (solver, NFE) the same class-balanced noise is sampled with the probability-flow ODE and measured with
`diffkit.image_metrics` (classifier accuracy, Fréchet distance to the held-out real digits, k-NN precision and
recall in the classifier's feature space). The markdown block lands in BENCHMARKS.md between
``<!-- bench/digits.py:start -->`` and ``<!-- bench/digits.py:end -->`` (only that block is replaced), with the
issue's targets checked: accuracy >= 90 % at NFE 20 and FD(NFE 10) <= 1.2 x FD(NFE 100), default solver.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

__all__ = ["digits_benchmark", "digits_markdown", "write_block", "MARKER"]

MARKER = "bench/digits.py"
DEFAULT_SOLVERS = ("default", "dpmpp_2m")
DEFAULT_NFES = (5, 10, 20, 100)


def digits_benchmark(model=None, *, solvers=DEFAULT_SOLVERS, nfes=DEFAULT_NFES, per_class: int = 30, seed: int = 0,
                     progress: bool = True) -> dict:
    """Run every (solver, NFE) on one noise draw; returns {'rows': [...], 'n', 'model', 'seconds', ...}.
    Solver 'default' lets `diffkit.sample` choose (the library's default for the budget)."""
    from .demo import digits_model, sample_classes
    from .image_metrics import digits_report
    from .solvers import get_solver

    for s in solvers:
        if s != "default":
            get_solver(s)
    from .models import model_config

    den = digits_model(model)
    num_classes = model_config(den.model).get("num_classes") or 0
    if num_classes != 10:
        raise ValueError(f"the digits benchmark needs a 10-class conditional model; this one has {num_classes}")
    n = 10 * per_class
    labels = torch.arange(n) % 10
    noise = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    configs = [(s, b) for s in solvers for b in nfes]
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=len(configs), desc="bench", unit="config", file=sys.stderr)
    rows, t_all = [], time.perf_counter()
    for s, nfe in configs:
        t0 = time.perf_counter()
        x, info = sample_classes(den, labels, noise, solver=None if s == "default" else s, nfe=nfe)
        secs = time.perf_counter() - t0
        rep = digits_report(x, labels)
        rows.append({"solver": s, "resolved": info["solver"], "nfe": nfe, "calls": info["nfe"], "seconds": secs,
                     **rep})
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{s} NFE {nfe}: acc {rep['accuracy']:.0%} FD {rep['fd']:.1f}")
    if bar is not None:
        bar.close()
    return {"rows": rows, "real": real_digits_row(n, seed), "n": n, "seed": seed,
            "model": str(model or "shipped (src/diffkit/assets/digits)"),
            "seconds": time.perf_counter() - t_all, "threads": torch.get_num_threads()}


def real_digits_row(n: int, seed: int = 0) -> dict:
    """The metrics of `n` real training digits (drawn with `seed`, class-balanced by chance only) against the same
    held-out reference: the floor that small-sample bias puts under the Fréchet distance and precision/recall."""
    from .classifier import digits_split
    from .image_metrics import digits_report

    x, y, _, _ = digits_split()
    i = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return {"solver": "real training digits", "n": len(i), **digits_report(x[i], y[i])}


def _targets(rows) -> list[str]:
    by = {(r["solver"], r["nfe"]): r for r in rows}
    out = []
    acc = by.get(("default", 20))
    if acc:
        ok = "PASS" if acc["accuracy"] >= 0.9 else "FAIL"
        out.append(f"- accuracy of class-conditional samples at NFE 20 (default solver, {acc['resolved']}): "
                   f"{acc['accuracy']:.1%} (target >= 90 %): **{ok}**")
    a, b = by.get(("default", 10)), by.get(("default", 100))
    if a and b:
        ratio = a["fd"] / b["fd"]
        ok = "PASS" if ratio <= 1.2 else "FAIL"
        out.append(f"- FD at NFE 10 / FD at NFE 100 (default solver): {a['fd']:.2f} / {b['fd']:.2f} = {ratio:.3f} "
                   f"(target <= 1.2): **{ok}**")
    return out


def digits_markdown(result: dict, command: str) -> str:
    """The BENCHMARKS.md block for a `digits_benchmark` result."""
    rows = result["rows"]
    lines = [f"### Digits model: image quality per solver and NFE ({result['n']} class-conditional samples, "
             f"same noise for every row)", "",
             f"Model: {result['model']}. Metrics in the feature space of diffkit's digits classifier "
             "(`python -m diffkit.classifier`, 99.3 % held-out accuracy): FD = Fréchet distance to the 540 "
             "held-out real digits (the digits analogue of FID; real training digits vs this reference score about "
             "4 at n = 540 and 16 at n = 100: FD has a positive small-sample bias; the last row is real training "
             "digits at the same n), accuracy = samples classified as their label, precision/recall = k-NN manifold "
             "estimate (Kynkäänniemi et al. 2019, k = 3). The shipped model was trained on all 1797 digits, the "
             "reference included, so these numbers measure fit to the data set, not generalization.", "",
             f"Command: `{command}` ({result['seconds'] / 60:.1f} min, {result['threads']} torch threads, "
             f"{platform.machine()} CPU, machine shared with other jobs: times are indicative only).", "",
             "| solver | NFE | accuracy | FD | precision | recall | seconds |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = r["solver"] if r["solver"] != "default" else f"default ({r['resolved']})"
        lines.append(f"| {name} | {r['calls']} | {r['accuracy']:.1%} | {r['fd']:.2f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['seconds']:.1f} |")
    real = result.get("real")
    if real:
        lines.append(f"| {real['solver']} | - | {real['accuracy']:.1%} | {real['fd']:.2f} | {real['precision']:.3f} | "
                     f"{real['recall']:.3f} | - |")
    targets = _targets(rows)
    if targets:
        lines += ["", "Targets:", *targets]
    return "\n".join(lines) + "\n"


def write_block(path, text: str, marker: str = MARKER) -> None:
    """Replace the `<!-- marker:start -->` ... `<!-- marker:end -->` block of `path` (appended when absent),
    leaving everything else untouched; the file is re-read right before writing."""
    from .checkpoint import atomic_write

    path = Path(path)
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in old and end in old:
        i, j = old.index(start), old.index(end) + len(end)
        new = old[:i] + block + old[j:]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write(path, new.encode())
