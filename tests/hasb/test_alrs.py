"""ALRS learning rates per group and bit, exactly as specified (method notes §2)."""

import math

import pytest

from hasb import alrs as A


def test_code_mode_factors_8642():
    assert A.alrs_factors([2, 8, 4, 6], "code") == {8: 1.0, 6: 0.1, 4: 0.1**2, 2: 0.1**3}


def test_code_mode_432_differs_from_paper():
    assert A.alrs_factors([4, 3, 2], "code") == {4: 1.0, 3: 0.1, 2: 0.1**2}
    assert A.alrs_factors([4, 3, 2], "paper") == {4: 1.0, 3: 0.5, 2: 0.1}


def test_paper_mode_eq7():
    # Δ = 0,2,4,6 → 10^(−Δ/2)
    f = A.alrs_factors([8, 6, 4, 2], "paper")
    for b, want in {8: 1.0, 6: 0.1, 4: 0.01, 2: 0.001}.items():
        assert f[b] == pytest.approx(want, rel=1e-15)
    # odd Δ: 5·10^(−(Δ+1)/2): Δ=1 → 0.5, Δ=3 → 0.05, Δ=5 → 0.005
    f = A.alrs_factors([8, 7, 5, 3], "paper")
    assert [f[b] for b in (8, 7, 5, 3)] == pytest.approx([1.0, 0.5, 0.05, 0.005], rel=1e-15)


def test_off_and_alpha():
    assert A.alrs_factors([8, 4], "off") == {8: 1.0, 4: 1.0}
    assert A.alrs_factors([8, 6, 4], "code", alpha=0.5) == {8: 1.0, 6: 0.5, 4: 0.25}
    with pytest.raises(ValueError, match="accepted: code, paper, off"):
        A.alrs_factors([8], "lars")


def test_group_lrs_only_scales_group_is_scaled():
    f = A.alrs_factors([8, 6, 4, 2], "code")
    base = {"weights": 1e-3, "scales": 1e-3, "no_decay": 1e-3}
    for b, eta in f.items():
        lrs = A.group_lrs(base, 0.5, b, f)
        assert lrs["weights"] == 0.5e-3
        assert lrs["no_decay"] == 0.5e-3
        assert lrs["scales"] == pytest.approx(0.5e-3 * eta, rel=1e-15)


def test_cosine():
    assert A.cosine_factor(0, 100) == 1.0
    assert A.cosine_factor(50, 100) == pytest.approx(0.5)
    assert A.cosine_factor(100, 100) == pytest.approx(0.0, abs=1e-15)
    assert A.cosine_factor(25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_trainer_applies_alrs_per_pass(tmp_path):
    """The lr each per-bit optimizer step actually used, recorded through an optimizer hook."""
    import torch

    from hasb.train import TrainConfig, train

    seen = []
    orig = torch.optim.Adam.step

    def spy(self, *a, **k):
        seen.append({g["name"]: g["lr"] for g in self.param_groups})
        return orig(self, *a, **k)

    torch.optim.Adam.step = spy
    try:
        train(
            TrainConfig(
                model="tiny_mlp",
                out=str(tmp_path / "r"),
                epochs=1,
                batch_size=64,
                train_limit=128,
                val_limit=64,
                lr=1e-3,
                alrs="paper",
                bits=[8, 6, 4, 2],
                distill="none",
                progress=False,
            )
        )
    finally:
        torch.optim.Adam.step = orig
    assert len(seen) == 2 * 4  # 2 steps × 4 bits, no extra step
    for step in range(2):
        sched = A.cosine_factor(step, 2)
        for k, eta in enumerate([1.0, 0.1, 0.01, 0.001]):
            lrs = seen[step * 4 + k]
            assert lrs["weights"] == pytest.approx(1e-3 * sched, rel=1e-12)
            assert lrs["scales"] == pytest.approx(1e-3 * sched * eta, rel=1e-12)


def test_trainer_takes_its_lrs_from_group_lrs(tmp_path, monkeypatch):
    """The running trainer sets every pass's lrs from hasb.alrs.group_lrs (no inline copy that could diverge):
    a group_lrs that returns marked values must be exactly what the optimizer steps with."""
    import torch

    from hasb.train import TrainConfig, train

    calls, seen = [], []
    real = A.group_lrs

    def marked(base_lrs, schedule, bit, factors, alrs_groups=("scales",)):
        lrs = {g: lr * (1.0 + 1e-3 * bit) for g, lr in real(base_lrs, schedule, bit, factors, alrs_groups).items()}
        calls.append((bit, lrs))
        return lrs

    orig = torch.optim.Adam.step

    def spy(self, *a, **k):
        seen.append({g["name"]: g["lr"] for g in self.param_groups})
        return orig(self, *a, **k)

    monkeypatch.setattr(A, "group_lrs", marked)
    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    train(
        TrainConfig(
            model="tiny_mlp",
            out=str(tmp_path / "r"),
            epochs=1,
            batch_size=64,
            train_limit=128,
            val_limit=64,
            lr=1e-3,
            alrs="code",
            bits=[8, 4],
            distill="none",
            progress=False,
        )
    )
    assert [b for b, _ in calls] == [8, 4, 8, 4]
    assert seen == [lrs for _, lrs in calls]
