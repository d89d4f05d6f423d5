"""CLI: --help, and bad input → one clear line on stderr, exit code 2, nothing in the out dir touched."""

import os
import subprocess
import sys

import pytest
import torch

import hasb

PY = sys.executable


def run(*args, cwd=None):
    return subprocess.run(
        [PY, "-m", "hasb.train", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_help_lists_every_option():
    r = run("--help")
    assert r.returncode == 0
    for flag in (
        "--stage",
        "--model",
        "--data",
        "--epochs",
        "--out",
        "--bits",
        "--batch-size",
        "--lr",
        "--wd",
        "--alrs",
        "--sampler",
        "--sensitivity",
        "--sigma",
        "--warmup-epochs",
        "--init",
        "--distill",
        "--train-limit",
        "--val-limit",
        "--seed",
        "--device",
        "--bf16",
        "--compile",
        "--checkpoint-every",
        "--resume",
        "--data-dir",
    ):
        assert flag in r.stdout, flag


def _assert_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture()
def existing_out(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_config.json").write_text("precious")
    (out / "metrics.csv").write_text("precious")
    return out


def _untouched(out):
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "train_config.json"]
    assert (out / "train_config.json").read_text() == "precious"


def test_unknown_model(existing_out, tmp_path):
    """Reported from the name alone: with no data where --data-dir points, the model's line still comes first."""
    _assert_error(
        run(
            "--model", "resnet21", "--out", str(existing_out), "--train-limit", "64", "--data-dir", str(tmp_path / "no")
        ),
        "unknown model 'resnet21'",
        "accepted:",
    )
    _untouched(existing_out)


def test_bits_not_candidates(existing_out):
    _assert_error(
        run("--model", "tiny_mlp", "--bits", "8,12", "--out", str(existing_out), "--train-limit", "64"),
        "--bits must be integers in 1..8",
    )
    _untouched(existing_out)


def test_corrupt_checkpoint_and_resume(existing_out, tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x80\x02garbage, not a torch file")
    _assert_error(
        run(
            "--stage",
            "supernet",
            "--init",
            str(bad),
            "--sampler",
            "uniform",
            "--out",
            str(existing_out),
            "--train-limit",
            "64",
        ),
        "cannot read checkpoint",
    )
    _untouched(existing_out)
    (existing_out / "checkpoint.pt").write_bytes(b"truncated")
    _assert_error(
        run("--model", "tiny_mlp", "--resume", "--out", str(existing_out), "--train-limit", "64"),
        "cannot read checkpoint",
    )
    assert (existing_out / "checkpoint.pt").read_bytes() == b"truncated"


def test_sensitivity_for_another_model(tmp_path, existing_out):
    import json

    # a real (tiny) multi-precision run to start the supernet from
    first = tmp_path / "multi"
    r = run(
        "--model",
        "tiny_mlp",
        "--out",
        str(first),
        "--train-limit",
        "128",
        "--val-limit",
        "64",
        "--batch-size",
        "64",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    sens = tmp_path / "sens.json"
    sens.write_text(
        json.dumps(
            {
                "version": 1,
                "model": "resnet20",
                "fingerprint": "x",
                "bits": [8, 6, 4, 2],
                "layers": [
                    {
                        "layer": "fc2",
                        "n_params": 1,
                        "trace": 1.0,
                        "trace_per_param": 1.0,
                        "stderr": 0.0,
                        "n_hvp": 1,
                        "searchable": True,
                    }
                ],
                "omega": {"fc2": {"8": 0.0, "6": 0.0, "4": 0.0, "2": 0.0}},
                "negative_traces": [],
            }
        )
    )
    _assert_error(
        run(
            "--stage",
            "supernet",
            "--init",
            str(first),
            "--sensitivity",
            str(sens),
            "--out",
            str(existing_out),
            "--train-limit",
            "128",
        ),
        "for model 'resnet20'",
    )
    _untouched(existing_out)
    # bits outside the init model's candidates
    _assert_error(
        run(
            "--stage",
            "supernet",
            "--init",
            str(first),
            "--sampler",
            "uniform",
            "--bits",
            "8,5",
            "--out",
            str(existing_out),
            "--train-limit",
            "128",
        ),
        "not in the candidate set",
    )
    # an existing run is not overwritten without --resume/--overwrite
    before = (first / "model.pt").read_bytes()
    _assert_error(run("--model", "tiny_mlp", "--out", str(first), "--train-limit", "128"), "already holds")
    assert (first / "model.pt").read_bytes() == before


def test_recipe_reuses_only_a_matching_finished_stage(tmp_path):
    """A finished stage is reused by a recipe with the same settings and refused (not retrained over) otherwise."""
    from hasb.recipes import _done, cpu_small
    from hasb.train import TrainError, train

    out = tmp_path / "multi"
    cfg = cpu_small("multi", str(out), epochs=1, train_limit=256, val_limit=64, progress=False)
    assert not _done(out, cfg)
    train(cfg)
    stamp = (out / "model.pt").stat().st_mtime_ns
    assert _done(out, cpu_small("multi", str(out), epochs=1, train_limit=256, val_limit=64, progress=True))
    with pytest.raises(TrainError, match=r"bits=\[8, 6, 4, 2\], now \[4, 3, 2\].*--overwrite"):
        _done(out, cpu_small("multi", str(out), epochs=1, train_limit=256, val_limit=64, bits=[4, 3, 2]))
    assert (out / "model.pt").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--lr", "inf"], "--lr must be a finite number"),
        (["--kd-weight", "nan"], "--kd-weight must be a finite number in [0, 1]"),
        (["--sigma", "1.5"], "--sigma must be a finite number in [0, 1]"),
        (["--val-limit", "0"], "--val-limit must be an integer ≥ 1"),
        (["--train-limit", "-1"], "--train-limit must be an integer ≥ 1"),
        (["--max-steps", "-1"], "--max-steps must be an integer ≥ 1"),
        (["--checkpoint-every", "-3"], "--checkpoint-every must be an integer ≥ 0"),
        (["--warmup-epochs", "-1"], "--warmup-epochs must be an integer ≥ 0"),
        (["--threads", "0"], "--threads must be an integer ≥ 1"),
        (["--bits", "8,8"], "lists a bit twice"),
        (["--bits", "8,x"], "comma-separated integers"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--fixed-bits", "9"], "--fixed-bits"),
    ],
)
def test_bad_argument_rejected_before_any_work(tmp_path, capsys, argv, needle):
    from hasb.train import main

    out = tmp_path / "run"
    rc = main(["--model", "tiny_mlp", "--out", str(out), "--train-limit", "64", "--quiet", *argv])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0] and "Traceback" not in err, lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_common_flags_and_aliases():
    from hasb.train import build_parser

    p = build_parser()
    a = p.parse_args(["--out", "o", "--overwrite", "--no-progress", "--no-tbn"])
    b = p.parse_args(["--out", "o", "--force", "--quiet", "--no-tbn"])
    assert vars(a) == vars(b) and a.overwrite and not a.progress and not a.tbn
    assert p.parse_args(["--out", "o"]).device == "auto"


def test_one_bit_trains(tmp_path):
    """--bits 1 (documented as valid) trains: 1-bit weights are signed [-1, 0], LSQ's scale gradient finite."""
    from hasb.train import main

    out = tmp_path / "run"
    rc = main(
        [
            "--model",
            "tiny_mlp",
            "--bits",
            "2,1",
            "--out",
            str(out),
            "--train-limit",
            "128",
            "--val-limit",
            "64",
            "--batch-size",
            "64",
            "--quiet",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    from hasb.export import read_checkpoint

    ck = read_checkpoint(out / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_rounding_option_reaches_the_model_and_the_supernet_keeps_it(tmp_path, capsys):
    from hasb.export import load_quantized
    from hasb.train import main

    out = tmp_path / "run"
    common = ["--train-limit", "128", "--val-limit", "64", "--batch-size", "64", "--quiet", "--threads", "1"]
    assert main(["--model", "tiny_mlp", "--rounding", "msb", "--out", str(out), *common]) == 0
    model, extra = load_quantized(out / "model.pt")
    assert hasb.get_spec(model).rounding == "msb" and extra["train_config"]["rounding"] == "msb"
    sup = ["--stage", "supernet", "--init", str(out), "--sampler", "uniform", *common]
    assert main([*sup, "--rounding", "half_up", "--out", str(tmp_path / "s1")]) == 2
    assert "--rounding half_up differs from --init's msb" in capsys.readouterr().err
    assert main([*sup, "--out", str(tmp_path / "s2")]) == 0
    assert hasb.get_spec(load_quantized(tmp_path / "s2" / "model.pt")[0]).rounding == "msb"


def test_a_second_run_on_the_same_out_fails_with_one_line(tmp_path, capsys):
    """While one run holds the run folder (hasb.cli.out_lock), a second training run on it exits 2 with one line
    and writes nothing there (before the lock, two runs interleaved checkpoints and metrics)."""
    from hasb.cli import out_lock
    from hasb.train import main

    out = tmp_path / "run"
    with out_lock(out):
        rc = main(["--model", "tiny_mlp", "--out", str(out), "--train-limit", "128", "--val-limit", "32", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "in use by another hasb run" in err and len(err.strip().splitlines()) == 1, err
    assert {p.name for p in out.iterdir()} == {".hasb.lock"}
