"""The `diffkit` command: each subcommand's happy path, --help with defaults and examples, and bad input that exits
with status 2 and one line on stderr (a traceback only with --debug)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from diffkit.benchmark import write_block
from diffkit.cli import SHIPPED, main

SUBCOMMANDS = ("demo", "sample", "calibrate", "train", "bench", "info", "solvers", "schedules")


def one_line_error(capsys, argv, match):
    code = _run(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and "error" in err[0] and match in err[0], err


def _run(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse errors
        return e.code


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_shows_defaults_and_examples(command, capsys):
    assert _run([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"diffkit {command}" in out
    if command in ("demo", "sample", "bench"):
        assert "(default:" in out


def test_sample_writes_a_labelled_grid_and_tensors(tmp_path, capsys):
    assert main(["sample", "--class", "3,7", "--n", "2", "--nfe", "5", "--solver", "dpmpp_2m", "--out",
                 str(tmp_path), "--no-progress", "--seed", "4"]) == 0
    z = np.load(tmp_path / "samples.npz")
    assert z["x"].shape == (4, 1, 16, 16) and z["labels"].tolist() == [3, 3, 7, 7]
    assert np.allclose(z["data_units"], z["x"] * 8 + 8)
    meta = json.loads((tmp_path / "sample.json").read_text())
    assert meta["solver"] == "dpmpp_2m" and meta["nfe"] <= 5 and meta["classes"] == [3, 7]
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert str(tmp_path / "grid.png") in capsys.readouterr().out


def test_sample_takes_schedule_options(tmp_path):
    """--schedule-option reaches the schedule: the grid is get_sigmas' with that option, and the meta records it."""
    from diffkit.checkpoint import load_model
    from diffkit.processes import process_from_config
    from diffkit.schedules import get_sigmas

    assert main(["sample", "--n", "1", "--class", "0", "--nfe", "6", "--solver", "dpmpp_2m", "--schedule", "karras",
                 "--schedule-option", "rho=3", "--out", str(tmp_path), "--no-progress"]) == 0
    meta = json.loads((tmp_path / "sample.json").read_text())
    process = process_from_config(load_model(SHIPPED)[1]["process"])
    assert np.allclose(meta["sigmas"], get_sigmas("karras", 6, process=process, rho=3.0).tolist())
    assert not np.allclose(meta["sigmas"], get_sigmas("karras", 6, process=process).tolist())  # rho 7 differs
    assert meta["schedule_options"] == {"rho": 3.0}
    assert main(["sample", "--n", "1", "--class", "0", "--nfe", "6", "--solver", "unipc", "--schedule", "tuned",
                 "--schedule-option", "focus=1,3", "--out", str(tmp_path), "--no-progress"]) == 0
    assert json.loads((tmp_path / "sample.json").read_text())["schedule_options"] == {"focus": [1.0, 3.0]}


@pytest.mark.parametrize("argv, match", [
    (["sample", "--model", "/no/such/model"], "does not exist"),
    (["sample", "--solver", "nosuch"], "unknown solver 'nosuch'"),
    (["sample", "--nfe", "-3"], "positive integer"),
    (["sample", "--nfe", "0"], "positive integer"),
    (["sample", "--class", "10"], "out of range"),
    (["sample", "--class", "-1"], "out of range"),
    (["sample", "--schedule", "nosuch"], "nosuch"),
    (["sample", "--schedule-option", "rho"], "KEY=NUMBER"),
    (["sample", "--schedule-option", "rho=seven"], "KEY=NUMBER"),
    (["sample", "--schedule", "karras", "--schedule-option", "focus=1,3"], "unexpected options: focus"),
    (["sample", "--schedule", "tuned", "--schedule-option", "focus=0,3"], "focus"),
    (["sample", "--plan", "plan.json", "--schedule-option", "rho=3"], "--plan fixes"),
    (["sample", "--device", "nosuchdevice"], "unknown device"),
    (["info", "/no/such/checkpoint"], "does not exist"),
    (["bench", "--solvers", "nosuch", "--write", ""], "unknown solver"),
    (["bench", "--nfe", "-5", "--write", ""], "positive"),
    (["bench", "--model", "/no/such/model", "--write", ""], "does not exist"),
    (["train", "--preset", "nosuch", "--out", "/tmp/diffkit-nosuch"], "unknown preset"),
    (["demo", "--budgets", "0"], "positive"),
    (["nosuch"], "invalid choice"),
])
def test_bad_input_is_one_line_and_status_2(argv, match, capsys):
    one_line_error(capsys, argv, match)


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="out of range"):
        main(["--debug", "sample", "--class", "11"])


def test_info_prints_the_config(capsys):
    assert main(["info", str(SHIPPED)]) == 0
    out = capsys.readouterr().out
    assert "1,192,641 parameters" in out
    cfg = json.loads(out[out.index("{"):])
    assert cfg["model"]["num_classes"] == 10 and cfg["prediction"] == "edm" and cfg["process"]["type"] == "EDM"


def test_train_is_python_m_diffkit_train(tmp_path, capsys):
    assert main(["train", "--list"]) == 0
    assert "digits" in capsys.readouterr().out
    assert main(["train", "--preset", "moons", "--steps", "3", "--out", str(tmp_path), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 3 and (tmp_path / "model" / "config.json").exists()
    capsys.readouterr()
    assert main(["info", str(tmp_path / "model")]) == 0
    assert main(["info", str(tmp_path)]) == 0                             # a run folder: its exported model
    ckpt = sorted((tmp_path / "checkpoints").glob("ckpt-*.json"))[-1]
    assert main(["info", str(ckpt)]) == 0                                 # a training checkpoint
    out = capsys.readouterr().out
    assert '"step": 3' in out and "MLP" in out


def test_bench_quick_and_its_block(tmp_path, capsys):
    assert main(["bench", "--quick", "--no-progress", "--write", ""]) == 0
    out = capsys.readouterr().out
    assert "| default (" in out and "| 5 |" in out and "precision" in out
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n\nother text\n")
    write_block(md, "first")
    write_block(md, "second")
    text = md.read_text()
    assert "other text" in text and "second" in text and "first" not in text
    assert text.count("<!-- bench/digits.py:start -->") == 1


def test_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "diffkit.cli", "sample", "--class", "99"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.strip() == "diffkit: error: class 99 out of range: the model has classes 0..9"
    assert "Traceback" not in r.stderr


def test_calibrate_then_sample_with_the_plan(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["calibrate", "--nfe", "4", "--method", "solver", "--noises", "8", "--heldout", "0",
                 "--teacher-nfe", "6", "--out", str(plan), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and plan.exists()
    start = json.loads(plan.read_text())["metrics"]["start"]["candidate"]  # the chosen starting candidate, printed
    assert f"({start} start)" in out
    assert main(["sample", "--plan", str(plan), "--class", "1", "--n", "2", "--out", str(tmp_path / "s"),
                 "--no-progress"]) == 0
    meta = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert meta["nfe"] == 4 and meta["solver"] == "plan:solver" and meta["plan"] == str(plan)


def test_calibrate_from_a_named_schedule_with_options(tmp_path):
    from diffkit.checkpoint import load_model
    from diffkit.processes import process_from_config
    from diffkit.schedules import get_sigmas

    plan = tmp_path / "plan.json"
    assert main(["calibrate", "--nfe", "5", "--method", "solver", "--solver", "unipc", "--schedule", "tuned",
                 "--schedule-option", "focus=1,3", "--noises", "4", "--heldout", "0", "--teacher-nfe", "6",
                 "--out", str(plan), "--no-progress"]) == 0
    process = process_from_config(load_model(SHIPPED)[1]["process"])
    sigmas = json.loads(plan.read_text())["sigmas"]  # UniPC with 5 calls: 5 steps on tuned x focus, then 0
    assert np.allclose(sigmas, get_sigmas("tuned", 5, process=process, focus=(1.0, 3.0))[:5].tolist())
    assert not np.allclose(sigmas, get_sigmas("tuned", 5, process=process)[:5].tolist())


def test_calibrate_with_selected_noises(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["calibrate", "--nfe", "4", "--method", "solver", "--noises", "12", "--select", "4",
                 "--heldout", "0", "--teacher-nfe", "6", "--out", str(plan), "--no-progress"]) == 0
    assert "on 4 calibration noises" in capsys.readouterr().out
    m = json.loads(plan.read_text())["metrics"]
    assert m["screened_noises"] == 12 and m["hard_noises"] == 1


def test_calibrate_in_batches(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["calibrate", "--nfe", "4", "--method", "linear_subspace", "--noises", "10", "--heldout", "0",
                 "--teacher-nfe", "6", "--batch-size", "3", "--out", str(plan), "--no-progress"]) == 0
    assert json.loads(plan.read_text())["metrics"]["batch_size"] == 3


@pytest.mark.parametrize("argv, match", [
    (["sample", "--plan", "/no/such/plan.json"], "plan.json"),
    (["sample", "--plan", "PLAN", "--solver", "heun"], "--plan fixes"),
    (["calibrate", "--nfe", "4", "--method", "nosuch"], "unknown calibration method"),
    (["calibrate", "--nfe", "4", "--noises", "8", "--select", "16"], "more than the 8"),
    (["calibrate", "--nfe", "4", "--batch-size", "0"], "--batch-size"),
])
def test_plan_bad_input(tmp_path, argv, match, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    argv = [str(tmp_path / "bad.json") if a == "PLAN" else a for a in argv]
    one_line_error(capsys, argv, match)


def test_malformed_plan_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    one_line_error(capsys, ["sample", "--plan", str(bad)], "malformed JSON")
