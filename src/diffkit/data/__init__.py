"""Training data without downloads: 2-D toys, testbed mixtures, scikit-learn's bundled digits, image folders and
tensors / .npy / .npz / .pt files.

Every loader returns a `Dataset`: normalized float32 samples `x` (N, ...), optional integer `labels`, and the
affine `normalization` (x_norm = (x_raw - mean) / std) recorded in checkpoints so samples map back to data units.
`load_dataset(spec)` builds one from a short string ("moons", "digits16", "folder:path", "npz:file.npz", ...).
"""

from __future__ import annotations

from .datasets import (
                       TOYS,
                       Dataset,
                       checkerboard,
                       digits,
                       from_tensors,
                       image_folder,
                       load_dataset,
                       load_file,
                       mixture_dataset,
                       moons,
                       rings,
                       swiss_roll,
                       toy,
)

__all__ = ["Dataset", "TOYS", "toy", "moons", "swiss_roll", "checkerboard", "rings", "mixture_dataset", "digits",
           "image_folder", "from_tensors", "load_file", "load_dataset"]
