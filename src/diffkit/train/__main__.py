"""``python -m diffkit.train --preset digits --out runs/digits [--max-minutes 14]``: train a preset, resuming from
the newest checkpoint in --out when there is one; then export the EMA model to --out/model and save a sample
grid (and, for the digits presets, the classifier agreement of class-conditional samples). Works under torchrun.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    from .presets import presets

    p = argparse.ArgumentParser(prog="python -m diffkit.train", description="Train a diffusion/flow model preset.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="digits", help=f"one of: {', '.join(presets)}")
    p.add_argument("--out", default=None, help="run folder (checkpoints, samples, log.jsonl, model/)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this wall time")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if --out has checkpoints")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    return p


def main(argv=None) -> int:
    import torch

    from .distributed import is_main
    from .presets import build, digits_label_accuracy, presets

    args = build_parser().parse_args(argv)
    if args.list:
        for name, p in presets.items():
            print(f"{name:14s} data={p['data']:12s} model={p['model']['type']:5s} process={p['process']['type']:5s} "
                  f"prediction={p['prediction']}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or f"runs/{args.preset}"
    overrides = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                                   "seed": args.seed}.items() if v is not None}
    if args.no_progress:
        overrides["progress"] = False
    trainer = build(args.preset, out_dir=out, overrides=overrides)
    if not args.no_resume and trainer.resume():
        print(f"resumed from step {trainer.step}", file=sys.stderr)
    t0 = time.time()
    trainer.train(max_minutes=args.max_minutes)
    minutes = (time.time() - t0) / 60
    folder = trainer.export()
    samples = trainer.sample_grid(trainer.out_dir / "samples" / "final.png")
    losses = [r["loss_smooth"] for r in trainer.history if "loss_smooth" in r]
    summary = {"preset": args.preset, "step": trainer.step, "minutes": round(minutes, 2),
               "final_loss": losses[-1] if losses else None, "model": str(folder)}
    if args.preset.startswith("digits"):
        labels = torch.arange(len(samples)) % 10
        summary["classifier_agreement"] = digits_label_accuracy(samples, labels)
    if is_main():
        print(json.dumps(summary))
        with open(trainer.out_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
