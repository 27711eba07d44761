"""Checkpoints: exact resume (in process and after SIGKILL), atomic files, exported models, clear errors."""

import json
import os
import random
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from helpers import single_threaded  # noqa: F401

import diffkit
from diffkit import checkpoint as ckpt
from diffkit.checkpoint import CheckpointError
from diffkit.models import MLP, UNet

RUN = textwrap.dedent('''
    """A tiny resumable training run: python run.py OUT STEPS [slow]."""
    import sys
    import time

    import torch

    import diffkit
    from diffkit.data import toy
    from diffkit.models import MLP
    from diffkit.train import DiffusionLoss, TrainConfig, Trainer


    def make(out, steps):
        torch.manual_seed(0)
        data = toy("moons", 300)
        model = MLP(dim=2, hidden=32, depth=2, dropout=0.1, num_classes=2, time_scale=1000)
        loss = DiffusionLoss(diffkit.Flow(), "flow", noise_levels="logit_normal", immiscible=True,
                             label_dropout=0.2)
        cfg = TrainConfig(steps=steps, batch_size=16, lr=1e-3, log_every=1, checkpoint_every=5, progress=False,
                          ema_decay=0.9, warmup_steps=3)
        return Trainer(model, loss, data, cfg, out_dir=out)


    if __name__ == "__main__":
        torch.set_num_threads(1)
        trainer = make(sys.argv[1], int(sys.argv[2]))
        trainer.resume()
        if "slow" in sys.argv:
            trainer.callbacks.append(lambda tr, step, loss: time.sleep(0.05))
        trainer.train()
''')


def _losses(log_path):
    out = {}
    for line in open(log_path):
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture
def run_module(tmp_path):
    path = tmp_path / "run.py"
    path.write_text(RUN)
    sys.path.insert(0, str(tmp_path))
    import importlib

    import run as module

    importlib.reload(module)
    yield path, module
    sys.path.remove(str(tmp_path))


def test_resume_in_process_is_exact(tmp_path, run_module):
    _, run = run_module
    ref = run.make(tmp_path / "ref", 20)
    ref_losses = [r["loss"] for r in ref.train() if "loss" in r]
    first = run.make(tmp_path / "a", 10)
    first.train()
    second = run.make(tmp_path / "a", 20)
    assert second.resume() and second.step == 10
    resumed = [r["loss"] for r in second.train() if "loss" in r]
    assert resumed == ref_losses[10:]
    for a, b in zip(second.model.parameters(), ref.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(second.ema.module.parameters(), ref.ema.module.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path, run_module):
    path, run = run_module
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(path), str(out), "40", "slow"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            log = out / "log.jsonl"
            if log.exists() and max(_losses(log), default=0) >= 17:
                break
            if proc.poll() is not None:
                pytest.fail(f"training subprocess exited early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        else:
            pytest.fail("training subprocess made no progress")
        proc.kill()  # SIGKILL: no cleanup, no final checkpoint
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -9
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    saved = int(json.loads(latest.read_text())["step"])
    logged = max(_losses(out / "log.jsonl"))
    assert saved % 5 == 0 and 15 <= saved <= logged < 40 and logged - saved < 5 + 3  # lost < one interval
    resumed = run.make(out, 40)
    assert resumed.resume() and resumed.step == saved
    after = {r["step"]: r["loss"] for r in resumed.train() if "loss" in r}
    ref = {r["step"]: r["loss"] for r in run.make(tmp_path / "ref", 40).train() if "loss" in r}
    assert after == {s: ref[s] for s in range(saved + 1, 41)}
    killed = _losses(out / "log.jsonl")  # the steps re-done after the crash repeat the killed run's losses
    assert all(killed[s] == ref[s] for s in range(1, logged + 1) if s in killed)


def _save_small(tmp_path, steps=1, keep=None):
    model = MLP(dim=2, hidden=8, depth=1)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 2), torch.rand(4)).sum().backward()
    opt.step()
    paths = [ckpt.save_checkpoint(tmp_path, s, model=model, optimizer=opt, keep=keep,
                                  config={"model": {"type": "mlp", "dim": 2, "hidden": 8, "depth": 1}})
             for s in range(1, steps + 1)]
    return model, opt, paths[-1]


def test_atomic_files_and_keep(tmp_path):
    _, _, last = _save_small(tmp_path, steps=5, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt-00000004.json", "ckpt-00000004.safetensors", "ckpt-00000005.json",
                     "ckpt-00000005.safetensors"]  # no temporary files left, older ones pruned
    assert ckpt.latest_checkpoint(tmp_path) == last
    (tmp_path / ".ckpt-00000006.safetensors.tmp-1").write_bytes(b"partial")  # a write killed mid-way
    assert ckpt.latest_checkpoint(tmp_path) == last


def test_rng_and_optimizer_round_trip(tmp_path):
    model, opt, path = _save_small(tmp_path)
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    t, m = ckpt.rng_state()
    expect = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(t, m)
    assert torch.equal(torch.rand(3), expect[0]) and np.array_equal(np.random.rand(3), expect[1])
    assert random.random() == expect[2]
    clone = MLP(dim=2, hidden=8, depth=1)
    opt2 = torch.optim.AdamW(clone.parameters())
    ckpt.restore_checkpoint(path, model=clone, optimizer=opt2)
    for a, b in zip(clone.parameters(), model.parameters()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"]) for i in s1)


def test_exported_model_and_denoiser(tmp_path):
    torch.manual_seed(0)
    model = UNet(image_size=8, channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                 num_heads=2, groups=4, num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    process = diffkit.EDM()
    ckpt.save_model(tmp_path / "m", model, process=process, prediction="edm", data={"normalization": {"mean": 8}})
    den = ckpt.load_denoiser(tmp_path / "m")
    x, label = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    ref = diffkit.Denoiser(model.eval(), process, "edm")(x, 1.5, label=label)
    torch.testing.assert_close(den(x, 1.5, label=label), ref)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["process"]["type"] == "EDM" and cfg["prediction"] == "edm" and cfg["data"]["normalization"]


def test_corrupt_and_truncated_checkpoints(tmp_path):
    _, _, path = _save_small(tmp_path)
    tensors = path.with_suffix(".safetensors")
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="ckpt-00000001.safetensors.*truncated"):
        ckpt.load_checkpoint(path)
    tensors.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="corrupt: its SHA-256"):
        ckpt.load_checkpoint(path)
    tensors.unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        ckpt.load_checkpoint(path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="ckpt-00000001.json.*truncated or corrupt"):
        ckpt.load_checkpoint(tmp_path)
    path.write_text(json.dumps({"weights": 1}))
    with pytest.raises(CheckpointError, match="not a diffkit checkpoint"):
        ckpt.load_checkpoint(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ckpt.load_checkpoint(tmp_path / "empty")
    # a tensor file that is not safetensors at all, with a matching recorded size
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        ckpt.load_tensors(bad, size=64)


def test_other_architecture_and_unknown_model(tmp_path):
    _, _, path = _save_small(tmp_path)
    with pytest.raises(CheckpointError, match="different architecture.*shape mismatch"):
        ckpt.restore_checkpoint(path, model=MLP(dim=2, hidden=16, depth=1))
    with pytest.raises(CheckpointError, match="different architecture.*missing"):
        ckpt.restore_checkpoint(path, model=MLP(dim=2, hidden=8, depth=2))
    meta = json.loads(path.read_text())
    meta["config"]["model"]["type"] = "resnet"
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown model type 'resnet'"):
        ckpt.load_model(path)


def test_shipped_digits_model_draws_its_labels():
    """The digits model trained by `python -m diffkit.train --preset digits` (src/diffkit/assets/digits) loads as
    a Denoiser and its class-conditional samples are classified as their labels."""
    from pathlib import Path

    from diffkit.train.presets import digits_label_accuracy

    folder = Path(diffkit.__file__).parent / "assets" / "digits"
    den = ckpt.load_denoiser(folder)
    cfg = json.loads((folder / "config.json").read_text())
    labels = torch.arange(30) % 10
    noise = diffkit.noise.randn((30, 1, 16, 16), seeds=range(30))
    with torch.no_grad():
        x = diffkit.sample(den, noise, solver="heun", nfe=17, cond={"label": labels})
    norm = cfg["data"]["normalization"]
    assert digits_label_accuracy(x * norm["std"] + norm["mean"], labels) >= 0.8
