"""`make demo` end to end in a temporary folder (fewer samples and one budget to stay fast), and the ring testbed."""

import numpy as np
from PIL import Image

from diffkit import demo


def test_digits_demo_writes_its_files(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--per-class", "2", "--budgets", "5", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for name in ("grid.png", "quality_vs_nfe.png", "quality_vs_nfe.md", "samples.npz"):
        assert (out / name).stat().st_size > 0
        assert str(out / name) in printed
    assert Image.open(out / "grid.png").size[0] > 200
    z = np.load(out / "samples.npz")
    assert z["labels"].tolist() == list(range(10)) * 2
    assert z["default_nfe5"].shape == (20, 1, 16, 16)
    assert "dpmpp_2m" in (out / "quality_vs_nfe.md").read_text()


def test_ring_demo_and_bad_input(tmp_path, capsys):
    assert demo.main(["--testbed", "ring", "--out", str(tmp_path), "--n", "200"]) == 0
    assert (tmp_path / "ring_samples.png").exists() and (tmp_path / "error_vs_nfe.md").exists()
    assert demo.main(["--out", str(tmp_path), "--budgets", "0"]) == 2
    assert demo.main(["--out", str(tmp_path), "--per-class", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("diffkit demo: error:") for line in err)
