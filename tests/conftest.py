"""Test-session settings: the suite's tensors are tiny, so one intra-op thread per process is fastest and keeps
parallel jobs (and CI's 2 cores) from oversubscribing."""

import torch

torch.set_num_threads(1)
