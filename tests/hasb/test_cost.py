"""Cost model exact on hand-computed nets: MACs, params, BitOPs, size, average-bit equivalent, budgets."""

import math

import pytest
import torch
import torch.nn as nn

import hasb
from hasb.cost import BudgetError, parse_budget_text


class Hand(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)  # 8x8 -> 4x4
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.dw(self.grouped(self.stem(x)))
        return self.head(x.mean((2, 3)))


MACS = {"stem": 8 * 16 * 27, "grouped": 16 * 16 * 18, "dw": 16 * 16 * 9, "head": 16 * 10}


def hand_model(**kw):
    return hasb.quantize_model(Hand(), example_input=torch.randn(2, 3, 8, 8), **kw)


def test_macs_and_params_exact():
    m = hand_model()
    cm = hasb.CostModel.from_model(m, torch.randn(5, 3, 8, 8))  # batch size must not matter
    got = {l.name: l.macs for l in cm.layers}
    assert got == MACS
    params = {l.name: (l.weight_params, l.bias_params) for l in cm.layers}
    assert params == {"stem": (216, 0), "grouped": (288, 0), "dw": (144, 0), "head": (160, 10)}
    assert cm.names == ["grouped", "dw"]


def test_bitops_size_avg_bits_exact():
    m = hand_model()
    cm = hasb.CostModel.from_model(m)
    cfg = hasb.BitConfig({"grouped": 4, "dw": (2, 8)})
    fixed = (MACS["stem"] + MACS["head"]) * 32 * 32
    assert cm.bitops(cfg) == fixed + MACS["grouped"] * 16 + MACS["dw"] * 16
    assert cm.size_bytes(cfg) == 216 * 4 + 160 * 4 + 10 * 4 + 288 * 4 / 8 + 144 * 2 / 8
    expect_avg = math.sqrt((MACS["grouped"] * 16 + MACS["dw"] * 16) / (MACS["grouped"] + MACS["dw"]))
    assert cm.avg_bit_equivalent(cfg) == pytest.approx(expect_avg, rel=1e-12)
    assert cm.plain_avg_bits(cfg) == 3.0
    assert cm.avg_bit_equivalent(hasb.BitConfig.uniform(cm.names, 6)) == pytest.approx(6.0)


def test_fixed_layers_at_8_bits_counted_at_8():
    m = hand_model(fixed_bits=8)
    cm = hasb.CostModel.from_model(m)
    cfg = hasb.BitConfig.uniform(cm.names, 2)
    assert cm.bitops(cfg) == (MACS["stem"] + MACS["head"]) * 64 + (MACS["grouped"] + MACS["dw"]) * 4


def test_attention_linear_layers_counted_per_token():
    from hasb.models import build_model

    m = hasb.quantize_model(build_model("vit_tiny"))
    cm = hasb.CostModel.from_model(m)
    macs = {l.name: l.macs for l in cm.layers}
    tokens = (28 // 7) ** 2 + 1
    assert macs["blocks.0.attn.qkv"] == tokens * 64 * 192
    assert macs["blocks.0.attn.proj"] == tokens * 64 * 64
    assert macs["blocks.0.fc1"] == tokens * 64 * 128
    assert macs["head"] == 64 * 10
    assert macs["patch_embed"] == 16 * 64 * 49


@pytest.mark.parametrize(
    "text,kind,limit",
    [
        ("3.5", "avg_bits", None),
        ("25.1GBOPs", "bitops", 25.1e9),
        ("2.51e10", "bitops", 2.51e10),
        ("4.2MB", "size", 4.2e6),
        ("300KiB", "size", 300 * 1024),
        ("7 MBOPs", "bitops", 7e6),
    ],
)
def test_budget_syntax(text, kind, limit):
    b = parse_budget_text(text)
    assert b.kind == kind
    if limit is not None:
        assert b.limit == pytest.approx(limit)


@pytest.mark.parametrize("text", ["-3", "nan", "NaN", "abc", "3.5furlongs", "0", "inf", ""])
def test_bad_budget_text_errors(text):
    with pytest.raises(BudgetError) as e:
        parse_budget_text(text)
    assert "accepted" in str(e.value)


def test_infeasible_budget_states_range():
    cm = hasb.CostModel.from_model(hand_model())
    with pytest.raises(BudgetError, match=r"infeasible.*feasible average bits range is 2–8"):
        cm.parse_budget("1.5")
    lo = cm.uniform_bitops(2)
    with pytest.raises(BudgetError, match="feasible BitOPs range"):
        cm.parse_budget(f"{lo * 0.9:.6e}")
    b = cm.parse_budget("3.5")
    assert b.limit == pytest.approx(cm.uniform_bitops(3.5))
    with pytest.raises(BudgetError, match="BitOPs"):  # a bare number above 32 is read as BitOPs
        cm.parse_budget("100")
    big = cm.parse_budget("9999GBOPs")  # above the largest config: accepted, does not bind
    assert cm.within(hasb.BitConfig.uniform(cm.names, 8), big)


class Twice(nn.Module):
    """One 1×1 conv (4→4 channels) applied twice in a row, optionally the second time at half resolution."""

    def __init__(self, downsample=False):
        super().__init__()
        self.stem = nn.Conv2d(4, 4, 1, bias=False)
        self.shared = nn.Conv2d(4, 4, 1, bias=False)
        self.head = nn.Linear(4, 10)
        self.downsample = downsample

    def forward(self, x):
        x = self.shared(self.stem(x))
        if self.downsample:
            x = x[:, :, ::2, ::2]
        x = self.shared(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("downsample,hw", [(False, [8 * 8, 8 * 8]), (True, [8 * 8, 4 * 4])])
def test_module_called_twice_counts_every_call(downsample, hw):
    # 1×1 conv, 4→4: 16 MACs per output pixel; called on 8×8 then 8×8 (or 4×4): the work of both calls
    m = hasb.quantize_model(Twice(downsample), example_input=torch.randn(2, 4, 8, 8))
    cm = hasb.CostModel.from_model(m, torch.randn(3, 4, 8, 8))
    shared = next(l for l in cm.layers if l.name == "shared")
    assert shared.macs == sum(16 * n for n in hw)  # 2,048 (twice at 8×8) or 1,280 (8×8 then 4×4)
    assert shared.weight_params == 16  # parameters once
    assert [l.name for l in cm.layers].count("shared") == 1
    assert cm.names == ["shared"]  # stem and head are the fixed first/last layers
    c8, c4 = hasb.BitConfig({"shared": 8}), hasb.BitConfig({"shared": 4})
    assert cm.size_bytes(c8) - cm.size_bytes(c4) == 16 * (8 - 4) / 8  # its 16 weights, once
    assert cm.bitops(c8) - cm.bitops(c4) == shared.macs * (64 - 16)


def test_effective_bits_exact_and_equal_to_a_size_budget():
    """Effective bits = parameter-weighted mean weight bit of the searchable layers (grouped 288, dw 144 weights);
    an effective-bits budget is the size budget uniform_size(e): the fixed layers and biases are the same in every
    config."""
    cm = hasb.CostModel.from_model(hand_model())
    cfg = hasb.BitConfig({"grouped": 4, "dw": (2, 8)})
    assert cm.effective_bits(cfg) == pytest.approx((288 * 4 + 144 * 2) / (288 + 144), rel=1e-12)
    assert cm.summary(cfg)["effective_bits"] == cm.effective_bits(cfg)
    assert cm.size_to_eff_bits(cm.size_bytes(cfg)) == pytest.approx(cm.effective_bits(cfg), rel=1e-12)
    b = cm.parse_budget("3.5ebits")
    assert (b.kind, b.value, b.limit) == ("eff_bits", 3.5, pytest.approx(cm.uniform_size(3.5), rel=1e-12))
    assert cm.parse_budget("3.5", "eff_bits").limit == b.limit  # the explicit kind reads a bare number
    cheap = hasb.BitConfig({"grouped": 4, "dw": 2})  # (288·4 + 144·2)/432 = 3.33 ≤ 3.5
    dear = hasb.BitConfig({"grouped": 4, "dw": 4})  # 4 > 3.5
    assert cm.within(cheap, b) and not cm.within(dear, b)
    assert "effective bits ≤ 3.5" in b.describe()
    assert cm.feasible_range("eff_bits") == (2.0, 8.0)
    with pytest.raises(BudgetError, match=r"infeasible.*feasible effective bits range is 2–8"):
        cm.parse_budget("1.5ebits")
    with pytest.raises(BudgetError, match="size but an? effective-bits budget"):  # a size is not effective bits
        cm.parse_budget("3MB", "eff_bits")
    with pytest.raises(BudgetError, match=r"accepted: .*3\.5ebits"):  # the error lists every accepted unit
        parse_budget_text("3.5bpw")
