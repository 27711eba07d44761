#!/usr/bin/env python
"""Memory of calibrating a real network: `diffkit.calibrate(..., batch_size=...)` on the shipped digits UNet.

A gradient-based calibration (`joint`, `grid`, `dc_solver`) differentiates the teacher loss through every model call
of the plan for every calibration noise; done in one batch, the autograd graph of nfe UNet calls on all the noises
is held at once. With `batch_size` the loss and its gradient are accumulated chunk by chunk (and the teacher, the
screening and the evaluations run in chunks), so the peak memory is that of one chunk. Each batch size runs in a
fresh subprocess: peak resident set (VmHWM, reset through /proc/self/clear_refs once the model and noises are
built) minus the resident set then, wall time, loss evaluations, and the calibration error reached. The same
noises, teacher and starting solver for every run; the optimiser stops on its time budget, so the runs differ in
how many evaluations they fit into it, not in what one evaluation computes (tests/test_calibrate.py checks that the
chunked loss and gradient equal the full-batch ones).

    python bench/calibrate_memory.py            # 256 noises, NFE 6, joint, budget 90 s, 3 batch sizes (about 12 min)
    python bench/calibrate_memory.py --quick    # 32 noises, prints only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training import _status_kib  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MARKER = "bench/calibrate_memory.py"
BATCH_SIZES = (None, 64, 16)
NOISES, NFE, TEACHER_NFE, BUDGET, METHOD, SOLVER = 256, 6, 100, 90.0, "joint", "unipc"  # diffkit calibrate's defaults


def child(batch_size: int | None, noises: int, budget: float) -> dict:
    """One calibration in this (fresh) process; returns its measurements."""
    import diffkit
    from diffkit.demo import digits_model

    torch.set_num_threads(1)
    den = digits_model()
    cal = torch.randn(noises, 1, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.arange(noises) % 10
    teacher = diffkit.calibrate.solver_teacher(den, nfe=TEACHER_NFE)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = diffkit.calibrate(den, NFE, noises=cal, heldout=0, teacher=teacher, method=METHOD, budget=budget,
                                 cond={"label": labels}, solver=SOLVER, batch_size=batch_size)
    wall = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    m = plan.metrics
    return {"batch_size": batch_size, "noises": noises, "peak_rss_growth_mib": (peak - before) / 1024,
            "peak_rss_mib": peak / 1024, "wall_s": wall, "teacher_s": m["teacher_seconds"],
            "optimiser_s": m["seconds"], "loss_evaluations": m["loss_evaluations"], "start_error": m["start_error"],
            "error": m["error"]}


def run(batch_size, noises: int, budget: float) -> dict:
    cmd = [sys.executable, __file__, "--child", "none" if batch_size is None else str(batch_size),
           "--noises", str(noises), "--budget", str(budget)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"calibration with batch_size={batch_size} failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def markdown(res: dict) -> str:
    rows = res["runs"]
    full = next(r for r in rows if r["batch_size"] is None)
    lines = [f"## Memory-bounded calibration (`{MARKER}`)", "",
             f"`diffkit.calibrate(den, {NFE}, method=\"{METHOD}\", solver=\"{SOLVER}\", budget={res['budget']:g}, "
             f"batch_size=...)` on the shipped digits UNet (16x16, class-conditional), {res['noises']} float64 "
             f"calibration noises, teacher `solver_teacher(den, nfe={TEACHER_NFE})`, one torch thread, each run in a "
             "fresh subprocess. Peak memory = peak resident set (VmHWM, reset once the model and noises are built) "
             "minus the resident set then. The optimiser stops on its time budget, so the runs differ in how many "
             "loss evaluations fit into it; the chunked loss and gradient equal the full-batch ones "
             f"(tests/test_calibrate.py). torch {res['torch']}, {res['machine']['cpu']} "
             f"({res['machine']['cores']} cores); diffkit at commit {res['revision']}.", "",
             "| batch_size | peak memory growth (MiB) | vs all at once | wall s | teacher s | optimiser s | "
             "loss evaluations | calibration error (start → plan) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        name = "None (all at once)" if r["batch_size"] is None else str(r["batch_size"])
        lines.append(f"| {name} | {r['peak_rss_growth_mib']:.0f} | "
                     f"{r['peak_rss_growth_mib'] / full['peak_rss_growth_mib']:.2f}x | {r['wall_s']:.0f} | "
                     f"{r['teacher_s']:.0f} | {r['optimiser_s']:.0f} | {r['loss_evaluations']} | "
                     f"{r['start_error']:.4f} → {r['error']:.4f} |")
    lines += ["", f"Command: `{res['command']}` ({res['wall_s'] / 60:.1f} min)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--noises", type=int, default=NOISES, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, default=BUDGET, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(None if args.child == "none" else int(args.child), args.noises, args.budget)))
        return 0
    noises, budget, sizes = (32, 3.0, (None, 8)) if args.quick else (args.noises, args.budget, BATCH_SIZES)
    from solvers import git_revision, machine  # bench/ is on the path (top of the module)

    t0 = time.time()
    runs = []
    for bs in sizes:
        runs.append(run(bs, noises, budget))
        r = runs[-1]
        print(f"batch_size {bs}: peak +{r['peak_rss_growth_mib']:.0f} MiB, {r['wall_s']:.0f} s, "
              f"{r['loss_evaluations']} evaluations, error {r['start_error']:.4f} -> {r['error']:.4f}", flush=True)
    res = {"runs": runs, "noises": noises, "budget": budget, "torch": torch.__version__, "machine": machine(),
           "revision": git_revision()[0], "wall_s": time.time() - t0,
           "command": "python bench/calibrate_memory.py" + (" --quick" if args.quick else "")}
    text = markdown(res)
    print(text)
    if not args.quick:
        from diffkit.benchmark import write_block
        from diffkit.checkpoint import atomic_write

        atomic_write(ROOT / "bench" / "results" / "calibrate_memory.json", json.dumps(res, indent=1).encode())
        write_block(ROOT / "BENCHMARKS.md", text, MARKER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
