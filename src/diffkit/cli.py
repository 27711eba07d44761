"""The `diffkit` command: `demo`, `sample`, `train`, `bench`, `info`, `solvers`, `schedules`.

Every subcommand has `--help` with its defaults and examples. Errors are one line on stderr
(``diffkit: error: ...``) and exit status 2; `--debug` (before the subcommand) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = """examples:
  diffkit demo                                   # the shipped digits model: outputs/demo/grid.png
  diffkit sample --class 3 --nfe 10 --out outputs/threes
  diffkit sample --model runs/digits/model --solver dpmpp_2m --nfe 20 --seed 1
  diffkit train --preset digits --out runs/digits --max-minutes 14
  diffkit bench --model src/diffkit/assets/digits
  diffkit info src/diffkit/assets/digits
  diffkit solvers
"""

SHIPPED = Path(__file__).resolve().parent / "assets" / "digits"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except None/False ones (their help text says what happens)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default:" in (action.help or "") \
                or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _sub(sub, name, help, examples, **kw):
    return sub.add_parser(name, help=help, description=help, epilog="examples:\n" + examples,
                          formatter_class=_Help, **kw)


# ---- demo
def _cmd_demo(args) -> int:
    from . import demo

    return demo.run_args(args)


# ---- sample
def _schedule_option(text: str) -> tuple[str, float | tuple[float, ...]]:
    """KEY=VALUE with a number or comma-separated numbers: rho=5, focus=1.0,3.0."""
    key, eq, value = text.partition("=")
    try:
        if not (eq and key.isidentifier()):
            raise ValueError
        nums = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEY=NUMBER or KEY=NUMBER,NUMBER (e.g. rho=5, focus=1,3); "
                                         f"got {text!r}") from None
    return key, nums[0] if len(nums) == 1 else nums


def _add_schedule_options(p: argparse.ArgumentParser, help: str) -> None:
    """--schedule-option KEY=VALUE (repeatable), collected as (key, value) pairs in args.schedule_options."""
    p.add_argument("--schedule-option", dest="schedule_options", type=_schedule_option, action="append", default=[],
                   metavar="KEY=VALUE", help=help)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _classes(spec: str | None, num_classes: int) -> list[int] | None:
    if spec is None:
        return list(range(num_classes)) if num_classes else None
    if not num_classes:
        raise ValueError("--class given but the model is unconditional")
    try:
        classes = [int(c) for c in spec.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--class must be comma-separated integers; got {spec!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(f"class {bad[0] if bad else spec!r} out of range: the model has classes 0..{num_classes - 1}")
    return classes


def _load_model_denoiser(args):
    """(Denoiser, checkpoint config, sample shape, number of classes) of `args.model` on `args.device`."""
    from .checkpoint import load_model
    from .denoiser import Denoiser
    from .processes import process_from_config

    _check_device(args.device)
    model, cfg = load_model(args.model, map_location=args.device)
    den = Denoiser(model, process_from_config(cfg["process"]), cfg["prediction"])
    shape = (cfg.get("data") or {}).get("shape") or _shape_from_model(cfg["model"])
    return den, cfg, shape, int(cfg["model"].get("num_classes") or 0)


def _cmd_sample(args) -> int:
    import numpy as np
    import torch

    from .calibrate.plan import SolverPlan
    from .noise import randn
    from .solvers import get_solver, plan, sample

    solver_plan = None
    schedule_options = dict(args.schedule_options)
    if args.plan is not None:
        if args.solver is not None or args.schedule is not None or schedule_options:
            raise ValueError("--plan fixes the solver and schedule; do not also give --solver, --schedule or "
                             "--schedule-option")
        solver_plan = SolverPlan.load(args.plan)  # malformed files fail before loading the model
        if args.nfe is not None and args.nfe != solver_plan.nfe:
            raise ValueError(f"{args.plan} is a plan for --nfe {solver_plan.nfe}; got --nfe {args.nfe}")
    elif args.nfe is None:
        args.nfe = 20
    if args.solver is not None:
        get_solver(args.solver)  # unknown solver: fail before loading anything
    den, cfg, shape, num_classes = _load_model_denoiser(args)
    if solver_plan is None:
        plan(args.solver, process=den.process, nfe=args.nfe, schedule=args.schedule,
             schedule_options=schedule_options)  # budget / schedule errors early
    classes = _classes(args.classes, num_classes)
    labels = None
    if classes is not None:
        labels = torch.tensor(classes).repeat_interleave(args.n)
        n = len(labels)
    else:
        n = args.n
    seeds = [args.seed * 1_000_003 + i for i in range(n)]
    noise = randn((n, *shape), seeds=seeds).to(args.device)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        kw = dict(plan=solver_plan) if solver_plan is not None else dict(
            solver=args.solver, nfe=args.nfe, schedule=args.schedule, schedule_options=schedule_options)
        x, info = sample(den, noise, return_info=True, cond={} if labels is None else {"label": labels.to(args.device)},
                         seeds=seeds, progress=not args.no_progress, **kw)
    x = x.float().cpu()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    norm = (cfg.get("data") or {}).get("normalization") or {"mean": 0.0, "std": 1.0}
    arrays = {"x": x.numpy(), "data_units": (x * float(norm["std"]) + float(norm["mean"])).numpy(),
              "noise": noise.float().cpu().numpy(), "seeds": np.array(seeds)}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    np.savez(out / "samples.npz", **arrays)
    title = f"{info['solver']}, {info['nfe']} model calls, seed {args.seed}"
    _labelled_grid(out / "grid.png", x, labels, title)
    meta = {"model": str(args.model), "solver": info["solver"], "nfe": info["nfe"], "schedule": args.schedule,
            "schedule_options": schedule_options, "plan": args.plan,
            "seed": args.seed, "n": n, "classes": classes, "sigmas": [float(s) for s in info["sigmas"]]}
    (out / "sample.json").write_text(json.dumps(meta, indent=1))
    print(f"{n} samples ({title})")
    for f in ("grid.png", "samples.npz", "sample.json"):
        print(f"wrote {out / f}")
    return 0


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available; use --device cpu")


def _shape_from_model(mcfg: dict) -> list[int]:
    if mcfg.get("type") == "mlp":
        return [int(mcfg["dim"])]
    return [int(mcfg["in_channels"]), int(mcfg["image_size"]), int(mcfg["image_size"])]


def _labelled_grid(path: Path, x, labels, title: str) -> None:
    """PNG of samples: images as a grid with one row per class (labelled), 2-D points as a scatter plot."""
    import torch

    from .demo import pyplot, save_figure

    plt = pyplot()
    if x.ndim == 2:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(x[:, 0], x[:, 1], s=2, c=None if labels is None else labels.numpy(), cmap="tab10")
        ax.set_aspect("equal")
    else:
        rows = [x[labels == c] for c in labels.unique()] if labels is not None else \
            list(x.split(max(1, int(len(x) ** 0.5))))
        names = [str(int(c)) for c in labels.unique()] if labels is not None else [""] * len(rows)
        c, h, w = x.shape[1:]
        ncol = max(len(r) for r in rows)
        grid = torch.ones(c, len(rows) * (h + 1) - 1, ncol * (w + 1) - 1)
        for i, r in enumerate(rows):
            for j, img in enumerate(r):
                grid[:, i * (h + 1):i * (h + 1) + h, j * (w + 1):j * (w + 1) + w] = ((img + 1) / 2).clamp(0, 1)
        fig, ax = plt.subplots(figsize=(1.0 + 0.35 * ncol, 0.8 + 0.35 * len(rows)))
        if c == 1:
            ax.imshow(1 - grid[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(grid[:3].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([i * (h + 1) + h / 2 for i in range(len(rows))], names)
        if labels is not None:
            ax.set_ylabel("class")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


# ---- train
def _cmd_train(args) -> int:
    from .train.__main__ import main as train_main

    return train_main(args.train_argv)


# ---- bench
def _cmd_bench(args) -> int:
    from .benchmark import digits_benchmark, digits_markdown, write_block
    from .demo import parse_ints

    solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
    nfes = parse_ints(args.nfe, "--nfe")
    per_class = 2 if args.quick else args.per_class
    if args.quick:
        solvers, nfes = solvers[:1], nfes[:1]
    if per_class < 2:
        raise ValueError(f"--per-class must be at least 2; got {per_class}")
    result = digits_benchmark(args.model, solvers=solvers, nfes=nfes, per_class=per_class, seed=args.seed,
                              progress=not args.no_progress)
    cmd = "diffkit bench" + ("" if args.model is None else f" --model {args.model}") + \
        "".join(f" {a}" for a in args.shown)
    text = digits_markdown(result, cmd)
    print(text)
    if args.write and not args.quick:
        write_block(args.write, text)
        print(f"wrote its block of {args.write}")
    return 0


# ---- info
def _cmd_calibrate(args) -> int:
    import torch

    from .calibrate import calibrate, methods, solver_teacher
    from .noise import randn

    if args.method not in methods():
        raise ValueError(f"unknown calibration method {args.method!r}; valid: {', '.join(methods())}")
    den, _, shape, num_classes = _load_model_denoiser(args)

    def draw(n, offset):
        noise = randn((n, *shape), seeds=[args.seed * 1_000_003 + offset + i for i in range(n)]).to(args.device)
        cond = {"label": (torch.arange(n) % num_classes).to(args.device)} if num_classes else {}
        return noise, cond

    noise, cond = draw(args.noises, 0)
    held, held_cond = draw(args.heldout, 500_000) if args.heldout else (0, None)
    plan = calibrate(den, args.nfe, solver=args.solver, schedule=args.schedule,
                     schedule_options=dict(args.schedule_options), noises=noise, heldout=held, method=args.method,
                     budget=args.budget, cond=cond, heldout_cond=held_cond, verbose=not args.no_progress,
                     teacher=solver_teacher(den, nfe=args.teacher_nfe), select=args.select,
                     batch_size=args.batch_size)
    plan.metrics["model"] = str(args.model)
    plan.save(args.out)
    m = plan.metrics
    start = m["start"].get("candidate", plan.solver)
    print(f"{args.method} plan for nfe={args.nfe} ({start} start): relative error vs the teacher "
          f"{m['start_error']:.4g} -> {m['error']:.4g} on {m['calibration_noises']} calibration noises"
          + (f", {m['heldout_start_error']:.4g} -> {m['heldout_error']:.4g} held out" if "heldout_error" in m else "")
          + f"; {m['seconds']:.1f} s (+{m['teacher_seconds']:.1f} s teacher)")
    print(f"wrote {args.out}")
    return 0


def _cmd_info(args) -> int:
    from .checkpoint import latest_checkpoint, load_model

    path = Path(args.checkpoint)
    if path.is_dir() and not (path / "config.json").exists() and not list(path.glob("ckpt-*.json")):
        # a training run folder (python -m diffkit.train --out): its exported model, else its newest checkpoint
        if (path / "model" / "config.json").exists():
            path = path / "model"
        elif (path / "checkpoints").is_dir() and latest_checkpoint(path / "checkpoints") is not None:
            path = latest_checkpoint(path / "checkpoints")
    model, cfg = load_model(path)
    params = sum(p.numel() for p in model.parameters())
    shown = {k: v for k, v in cfg.items() if k not in ("tensors", "optimizer", "rng")}
    if path.suffix == ".json" and path.exists():
        shown = {"step": json.loads(path.read_text()).get("step"), **shown}
    print(f"{path}: {type(model).__name__}, {params:,} parameters")
    print(json.dumps(shown, indent=1, default=str))
    return 0


def _cmd_solvers(args) -> int:
    from .solvers import get_solver, solvers

    for name in solvers():
        spec = get_solver(name)
        print(f"{name:14s} min NFE {spec.min_nfe:<3d} default schedule {spec.schedule:15s} {spec.summary}")
    return 0


def _cmd_schedules(args) -> int:
    from .schedules import schedules

    print("\n".join(schedules()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `diffkit` command."""
    from . import demo

    parser = _Parser(prog="diffkit", description="Diffusion and flow models through one denoiser.",
                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _sub(sub, "demo", "sample the shipped digits model with three solvers at NFE 5/10/20, plot quality vs NFE",
             "  diffkit demo\n  diffkit demo --out /tmp/demo --per-class 2 --budgets 5,10\n"
             "  diffkit demo --testbed ring\n")
    demo.add_arguments(p)
    p.set_defaults(func=_cmd_demo)

    p = _sub(sub, "sample", "sample a model: a labelled PNG grid (rows = classes) and the raw tensors (.npz)",
             "  diffkit sample                                  # shipped digits model, 8 per class\n"
             "  diffkit sample --class 3,5 --n 16 --solver heun --nfe 18\n"
             "  diffkit sample --model runs/digits/model --schedule karras --seed 2\n"
             "  diffkit sample --solver unipc --nfe 8 --schedule tuned --schedule-option focus=1,3\n"
             "  diffkit sample --plan plan.json                  # a plan from diffkit calibrate\n")
    p.add_argument("--model", default=str(SHIPPED), help="exported model folder or training checkpoint")
    p.add_argument("--solver", default=None, help="solver name (diffkit solvers); default: the budget's default")
    p.add_argument("--nfe", type=_positive, default=None, help="budget of model calls (default: 20, or the plan's)")
    p.add_argument("--schedule", default=None, help="step schedule (diffkit schedules); default: the solver's")
    _add_schedule_options(p, "option of the schedule, repeatable: rho=5 (karras, polyexponential), focus=1,3 "
                             "(tuned: more steps around σ̄ = 1, gain 3)")
    p.add_argument("--plan", default=None, help="solver plan JSON from `diffkit calibrate` (replaces solver and "
                   "schedule)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (sample i uses seed*1000003+i)")
    p.add_argument("--class", dest="classes", default=None,
                   help="comma-separated class labels (default: every class of a conditional model)")
    p.add_argument("--n", type=_positive, default=8, help="samples per class (or in all, unconditional)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--out", default="outputs/sample", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sample)

    p = _sub(sub, "calibrate", "fit a solver plan (step levels and coefficients) to a model for a budget of calls",
             "  diffkit calibrate --nfe 6 --out plan.json                 # shipped digits model, joint method\n"
             "  diffkit calibrate --nfe 6 --method evolution --budget 60 --out plan.json\n"
             "  diffkit calibrate --nfe 6 --noises 1024 --select 128 --out plan.json   # mine hard noises\n"
             "  diffkit calibrate --nfe 6 --batch-size 32 --out plan.json  # bound memory: 32 samples per call\n"
             "  diffkit sample --plan plan.json\n")
    p.add_argument("--model", default=str(SHIPPED), help="exported model folder or training checkpoint")
    p.add_argument("--nfe", type=_positive, required=True, help="budget of model calls of the plan")
    p.add_argument("--method", default="joint", help="calibration method (default: %(default)s)")
    p.add_argument("--solver", default=None, help="starting solver (default: the best of the starting candidates)")
    p.add_argument("--schedule", default=None, help="starting solver's schedule (default: the solver's)")
    _add_schedule_options(p, "option of the starting schedule, repeatable (as for sample)")
    p.add_argument("--noises", type=_positive, default=256, help="calibration noises (default: %(default)s)")
    p.add_argument("--heldout", type=int, default=256, help="held-out noises, only measured (default: %(default)s)")
    p.add_argument("--select", type=_positive, default=None,
                   help="teacher-label only this many of the --noises: the quarter the starting solver gets most "
                        "wrong and a weighted sample of the rest (rare hard noises dominate the error)")
    p.add_argument("--budget", type=float, default=90.0, help="optimiser wall time in seconds (default: %(default)s); "
                   "inf: each method runs to its own limit on loss evaluations, the same plan run after run")
    p.add_argument("--teacher-nfe", type=_positive, default=100,
                   help="model calls of the teacher's high-accuracy solve (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive, default=None,
                   help="most samples per model call (teacher, screening, losses and gradients run in chunks; "
                        "default: all at once)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--out", default="plan.json", help="plan file to write (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="quiet")
    p.set_defaults(func=_cmd_calibrate)

    from .train.__main__ import build_parser as train_parser

    p = _sub(sub, "train", "train a preset (the same code as python -m diffkit.train)",
             "  diffkit train --list\n"
             "  diffkit train --preset digits --out runs/digits --max-minutes 14 --threads 1   # the shipped model\n"
             "  diffkit train --preset moons --out runs/moons --steps 500\n",
             parents=[train_parser()], conflict_handler="resolve")
    p.set_defaults(func=_cmd_train)

    p = _sub(sub, "bench", "image quality of a digits model per solver and NFE into BENCHMARKS.md",
             "  diffkit bench                                   # the shipped model\n"
             "  diffkit bench --model runs/digits/model --solvers default,unipc --nfe 10,20\n"
             "  diffkit bench --quick --write ''                # smoke run, prints only\n")
    p.add_argument("--model", default=None, help="digits model folder or checkpoint (default: the shipped model)")
    p.add_argument("--solvers", default="default,dpmpp_2m", help="comma-separated; 'default' = library default")
    p.add_argument("--nfe", default="5,10,20,100", help="comma-separated budgets")
    p.add_argument("--per-class", type=int, default=30, help="samples per class (same noise for every row)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--write", default="BENCHMARKS.md", help="markdown file whose bench/digits.py block is replaced "
                   "('' to only print)")
    p.add_argument("--quick", action="store_true", help="smoke run: first solver and budget, 20 samples, no write")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench)

    p = _sub(sub, "info", "print a checkpoint's configuration (model, process, prediction, data, training)",
             "  diffkit info src/diffkit/assets/digits\n  diffkit info runs/digits/ckpt-00000800.json\n")
    p.add_argument("checkpoint", help="exported model folder, training checkpoint (.json) or run folder")
    p.set_defaults(func=_cmd_info)

    _sub(sub, "solvers", "list the solvers", "  diffkit solvers\n").set_defaults(func=_cmd_solvers)
    _sub(sub, "schedules", "list the step schedules", "  diffkit schedules\n").set_defaults(func=_cmd_schedules)
    return parser


def main(argv=None) -> int:
    """Entry point of the `diffkit` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":  # hand the arguments after 'train' to python -m diffkit.train unchanged
        args.train_argv = argv[argv.index("train") + 1:]
    if args.command == "bench":
        i = argv.index("bench") + 1
        args.shown = [a for a in argv[i:] if a not in ("--no-progress",)]
        if args.model is not None:
            args.shown = [a for a in args.shown if a not in ("--model", args.model)]
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, KeyError, RuntimeError, ImportError) as e:
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"diffkit: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
