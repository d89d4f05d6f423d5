"""benchmarks/inductor_knobs.py on the CPU (aot_eager: no code generation, so the knobs change nothing here): every
knob compiles its own graph, all are timed in interleaved rounds and divided by the default compile with an
interval; bad input is one line and exit 2."""

import re
import sys

import pytest

from benchmarks import inductor_knobs as IK


def test_cpu_smoke_every_knob_timed_against_the_default(monkeypatch, capsys):
    argv = ["inductor_knobs", "--device", "cpu", "--backend", "aot_eager", "--model", "small_cnn@28:b8"]
    argv += ["--setting", "w4_data_cg", "--knobs", "default,looped", "--iters", "1", "--warmup", "1", "--rounds", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    IK.main()
    out = capsys.readouterr().out
    assert re.search(r"^default: \{.*'graphs': 1", out, re.M) and re.search(r"^looped: \{.*'graphs': 1", out, re.M)
    m, lo, hi = map(
        float, re.search(r"\| looped \| [\d.]+ \| ([\d.]+)x ÷ default \| \[([\d.]+), ([\d.]+)\] \|", out).groups()
    )
    assert lo <= m <= hi


@pytest.mark.parametrize(
    "extra, says",
    [(["--knobs", "default,fastest"], "unknown knob(s) fastest"), (["--setting", "w4_kernels"], "not a compiled")],
)
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, extra, says):
    monkeypatch.setattr(sys, "argv", ["inductor_knobs", "--device", "cpu", *extra])
    with pytest.raises(SystemExit) as e:
        IK.main()
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_known_reads_nested_inductor_config():
    assert IK.known({"triton.persistent_reductions": False}) and not IK.known({"triton.no_such_knob": 1})


def test_dump_copies_the_named_kernels_each_once(tmp_path, monkeypatch):
    """--dump: a persistent or looped kernel whose name contains the part is copied, other kernels are not, and a
    file an earlier knob dumped is not copied again."""
    cache = tmp_path / "cache"
    (cache / "ab").mkdir(parents=True)
    (cache / "ab" / "red.py").write_text("def triton_red_fused_add_clamp_sum_where_3(in_ptr0):\n    pass\n")
    (cache / "ab" / "per.py").write_text("def triton_per_fused_add_clamp_sum_7(in_ptr0):\n    pass\n")
    (cache / "ab" / "poi.py").write_text("def triton_poi_fused_relu_1(in_ptr0):\n    pass\n")
    monkeypatch.setattr("torch._inductor.runtime.cache_dir_utils.cache_dir", lambda: str(cache))
    seen: set = set()
    assert IK.dump_kernels("fused_add_clamp_sum", tmp_path / "first", seen) == 2
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == ["per.py", "red.py"]
    assert IK.dump_kernels("fused_add_clamp_sum", tmp_path / "second", seen) == 0
