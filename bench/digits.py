#!/usr/bin/env python
"""Image quality of the shipped digits model (or --model CKPT) per solver and NFE: classifier accuracy, Fréchet
distance, precision and recall in the digits classifier's feature space (`diffkit.benchmark`). Writes its block of
BENCHMARKS.md; the same as `diffkit bench --model CKPT`.

    python bench/digits.py                       # default and dpmpp_2m at NFE 5, 10, 20, 100; 300 samples
    python bench/digits.py --quick               # smoke run, prints only
"""

import sys

from diffkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
