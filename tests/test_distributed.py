"""Data parallelism: torchrun with 2 gloo processes follows one process on the same global batch, and sharded
sampling with per-sample seeds gives the same samples for any number of ranks."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import single_threaded  # noqa: F401

from diffkit.train.distributed import sample_sharded, shard_range

SCRIPT = textwrap.dedent('''
    import json
    import os
    import sys

    import torch

    import diffkit
    from diffkit.data import toy
    from diffkit.models import MLP
    from diffkit.train import DiffusionLoss, TrainConfig, Trainer, sample_sharded
    from diffkit.train.distributed import barrier, world

    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = toy("moons", 256)
    model = MLP(dim=2, hidden=32, depth=2, num_classes=2, time_scale=1000)
    loss = DiffusionLoss(diffkit.EDM(), "edm", noise_levels="lognormal", immiscible=True, label_dropout=0.2)
    cfg = TrainConfig(steps=8, batch_size=32, lr=3e-3, log_every=1, checkpoint_every=4, progress=False,
                      ema_decay=0.9)
    trainer = Trainer(model, loss, data, cfg, out_dir=sys.argv[2], device="cpu")  # gloo on the CPU, GPU or not
    losses = [r["loss"] for r in trainer.train() if "loss" in r]
    labels = torch.arange(10) % 2
    samples = sample_sharded(trainer.denoiser(), 10, (2,), seeds=range(100, 110), cond={"label": labels},
                             solver="euler_ancestral", steps=6, batch_size=3)
    rank, size = world()
    if rank == 0:
        params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()]).tolist()
        with open(sys.argv[1], "w") as f:
            json.dump({"world": size, "losses": losses, "params": params, "samples": samples.tolist()}, f)
    # every rank waits until rank 0 has written, then leaves without C++ teardown: on a loaded machine a gloo rank
    # sometimes aborts in interpreter teardown ("terminate called without an active exception", after all its work
    # is done, explicit destroy_process_group or not), and torchrun then kills the other ranks
    barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
''')


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path),
           "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    _run([sys.executable, str(script), str(tmp_path / "one.json"), str(tmp_path / "run1")], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
          str(tmp_path / "two.json"), str(tmp_path / "run2")], tmp_path)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["world"] == 1 and two["world"] == 2
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(two["params"]), torch.tensor(one["params"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(two["samples"]), torch.tensor(one["samples"]), rtol=1e-4, atol=1e-5)
    assert (tmp_path / "run2" / "checkpoints" / "ckpt-00000008.json").exists()  # written once, by rank 0


def test_shard_range_covers_everything():
    for n in range(0, 12):
        for ws in range(1, 5):
            blocks = [shard_range(n, r, ws) for r in range(ws)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
            assert max(b - a for a, b in blocks) - min(b - a for a, b in blocks) <= 1


def test_sharded_sampling_single_process_is_batch_invariant():
    import diffkit
    from diffkit.testbeds import GaussianMixture

    den = GaussianMixture.ring().denoiser(diffkit.EDM(), "eps")
    a = sample_sharded(den, 7, (2,), seeds=range(7), solver="euler_ancestral", steps=5, batch_size=7,
                       dtype=torch.float64)
    b = sample_sharded(den, 7, (2,), seeds=range(7), solver="euler_ancestral", steps=5, batch_size=2,
                       dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="got 3 seeds for 7 samples"):
        sample_sharded(den, 7, (2,), seeds=range(3))
