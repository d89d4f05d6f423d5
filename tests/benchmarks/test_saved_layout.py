"""benchmarks/saved_layout.py: what it counts as a permuted activation, and bad input (one line, exit 2).  Its
property itself (the compiled backward gets activations in NHWC memory order) is tested in
tests/hasb/test_quantizer.py on a small conv graph."""

import sys

import pytest
import torch

from benchmarks import saved_layout as SL


def test_permuted_saved_reads_inductors_size_asserts():
    code = """
        assert_size_stride(div, (4, 56, 56, 64), (200704, 1, 3584, 56), 'input')
        assert_size_stride(getitem_1, (4, 64, 56, 56), (200704, 1, 3584, 64), 'input')
        assert_size_stride(buf3, (4, 56, 56, 64), (200704, 1, 3584, 56), 'torch.ops.aten.convolution_backward.default')
        assert_size_stride(flat, (802816, ), (1, ), 'input')
    """
    assert SL.permuted_saved(code) == [("div", (4, 56, 56, 64))]  # inputs only; NCHW and 1-D are not permuted


def test_view_4d_is_the_nhwc_view_and_restores():
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    view, restore = SL.view_4d(x)
    assert view.shape == (2, 4, 5, 3) and view.is_contiguous() and torch.equal(restore(view), x)


@pytest.mark.parametrize("spec", ["resnet18", "resnet18@32", "resnet18@x:b4"])
def test_bad_model_is_one_line_and_exit_2(monkeypatch, capsys, spec):
    monkeypatch.setattr(sys, "argv", ["saved_layout", "--models", spec])
    with pytest.raises(SystemExit) as e:
        SL.main()
    assert e.value.code == 2 and "expected name@size:bBATCH" in capsys.readouterr().err
