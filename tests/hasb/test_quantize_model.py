"""quantize_model on every zoo model; BitConfig validation and JSON; export/load round trip; data errors."""

import copy
import json
import random

import pytest
import torch
import torch.nn as nn

import hasb
import hasb.export
from hasb.config import ConfigError, parse_bit
from hasb.models import MODELS, UnknownModelError, build_model
from hasb.modules import QuantMixin


def _mixed(model, rng):
    bits = hasb.candidate_bits(model)
    return hasb.BitConfig({n: rng.choice(bits) for n in hasb.searchable_layers(model)})


# image models here; the byte-level LMs (token inputs) get the same checks in tests/hasb/test_lm.py
@pytest.mark.parametrize("name", sorted(n for n in MODELS if not n.startswith("lm_")))
def test_zoo_forward_backward_every_bit(name):
    torch.manual_seed(0)
    model = build_model(name)
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    ref = model(x)
    hasb.quantize_model(model)
    hasb.set_fp(model)
    assert torch.equal(model(x), ref), "fp config must equal the float model"
    hasb.restore_fixed(model)
    model.train()
    hasb.init_quantizers(model, x)
    outs = {}
    rng = random.Random(0)
    for cfg in [8, 6, 4, 2, _mixed(model, rng)]:
        hasb.set_config(model, cfg)
        model.zero_grad()
        y = model(x)
        y.square().mean().backward()
        grads = [p.grad for n, p in model.named_parameters() if n.endswith("w_scale") and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        outs[str(cfg)] = y.detach()
    assert not torch.allclose(outs["8"], outs["2"]), "outputs must change with bits"


def test_every_conv_and_linear_swapped_with_module_paths():
    model = hasb.quantize_model(build_model("mobilenet_v2"))
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(isinstance(model.get_submodule(n), (hasb.QConv2d, hasb.QLinear)) for n in convs)
    dw = model.get_submodule("features.2.conv.1.0")
    assert dw.groups == dw.in_channels > 1
    assert hasb.get_spec(model).fixed == ("features.0.0", "classifier.1")


def test_torchvision_state_dict_names_kept():
    m = build_model("resnet18")
    names = set(dict(m.named_parameters()))
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight", "fc.weight", "fc.bias"} <= names


def test_fixed_layers_8bit_option_and_config_validation():
    model = hasb.quantize_model(build_model("small_cnn"), bits=(4, 3, 2), fixed_bits=8)
    assert model.conv1.w_bit == 8 and model.fc.a_bit == 8
    names = hasb.searchable_layers(model)
    with pytest.raises(ConfigError, match="bit 8 is not a candidate; accepted: 2, 3, 4"):
        hasb.set_config(model, {n: 8 for n in names})
    with pytest.raises(ConfigError, match="unknown layer 'nope'"):
        hasb.set_config(model, {**{n: 4 for n in names}, "nope": 4})
    with pytest.raises(ConfigError, match="misses"):
        hasb.set_config(model, {names[0]: 4})
    with pytest.raises(ConfigError, match="fixed at 8"):
        hasb.set_config(model, {**{n: 4 for n in names}, "conv1": 4})
    with pytest.raises(ConfigError, match="bad bit 'x'"):
        hasb.BitConfig({"conv2": "x"})
    with pytest.raises(ConfigError, match="candidate bits must be integers in 1..8"):
        hasb.quantize_model(build_model("small_cnn"), bits=(16, 4))


def test_parse_bit_accepts_exactly_1_to_16_fp_and_their_strings():
    """The int fast path of ``parse_bit`` (a config is parsed at every bit switch) keeps the accepted set: ints
    1..16 as themselves, 32/"fp"/None as full precision; bools, 0 and 17 rejected, naming the layer."""
    assert [parse_bit(b) for b in (1, 16, "8", " 4 ", 32, "32", "fp", "FP32", None)] == [1, 16, 8, 4] + [None] * 5
    for bad in (0, 17, -4, True, False, 4.0, "x", "", "4.5"):
        with pytest.raises(ConfigError, match=r"bad bit .* for layer 'fc': accepted an integer 1\.\.16 or 'fp'"):
            parse_bit(bad, "fc")


def test_bitconfig_json_round_trip(tmp_path):
    cfg = hasb.BitConfig({"a": (8, 4), "b": "fp", "c": 2})
    assert hasb.BitConfig.from_json(cfg.to_json()) == cfg
    p = cfg.save(tmp_path / "c.json")
    assert hasb.BitConfig.load(p) == cfg
    assert json.loads(p.read_text())["layers"]["b"] == {"w_bits": "fp", "a_bits": "fp"}
    with pytest.raises(ConfigError, match="not valid JSON"):
        hasb.BitConfig.from_json("{nope")
    with pytest.raises(ConfigError, match="'layers'"):
        hasb.BitConfig.from_json("[1, 2]")


def test_use_config_switches_without_copying_weights():
    model = hasb.quantize_model(build_model("small_cnn"))
    ptr = model.conv2.weight.data_ptr()
    with hasb.use_config(model, 2):
        assert model.conv2.w_bit == 2 and model.conv2.weight.data_ptr() == ptr
    assert model.conv2.w_bit == 8


def test_batchnorm_follows_its_producer_bit():
    model = hasb.quantize_model(build_model("small_cnn"))
    names = hasb.searchable_layers(model)
    hasb.set_config(model, {n: (4 if n == "conv3" else 8) for n in names})
    assert model.bn3.key == "4" and model.bn2.key == "8" and model.bn1.key == "fp"


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2", "vit_tiny"])
def test_export_load_round_trip_bit_exact(tmp_path, name):
    from hasb.export import (
        export_deployment,
        load_quantized,
        read_checkpoint,
        save_quantized,
    )

    torch.manual_seed(1)
    model = hasb.quantize_model(build_model(name))
    x = torch.randn(3, 1, 28, 28)
    model.train()
    hasb.init_quantizers(model, x)
    for b in (8, 4):  # move BN statistics away from their init
        hasb.set_config(model, b)
        model(x)
    model.eval()
    mixed = _mixed(model, random.Random(3))
    hasb.set_config(model, mixed)
    path = save_quantized(model, tmp_path / "m.pt", extra={"note": "x"})
    obj = torch.load(path, weights_only=True)
    assert next(iter(obj["layers"].values()))["weight"].dtype == torch.float32  # fp first layer kept float
    assert any(e.get("w_int") is not None and e["w_int"].dtype == torch.int8 for e in obj["layers"].values())
    loaded, extra = load_quantized(path)
    assert extra == {"note": "x"} and hasb.get_config(loaded) == mixed
    for cfg in (8, 6, 4, 2, mixed):
        hasb.set_config(model, cfg)
        hasb.set_config(loaded, cfg)
        assert torch.equal(model(x), loaded(x)), f"outputs differ at {cfg}"
    dep = read_checkpoint(export_deployment(model, 2, tmp_path / "d.pt"))
    name0 = hasb.searchable_layers(model)[0]
    assert torch.equal(dep["layers"][name0]["w_int"], model.get_submodule(name0).int_weight(2))
    assert dep["layers"][name0]["w_int"].abs().max() <= 2


def test_corrupt_checkpoint_clear_error(tmp_path):
    from hasb.export import CheckpointError, load_quantized

    p = tmp_path / "bad.pt"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_quantized(p)
    with pytest.raises(CheckpointError, match="not found"):
        load_quantized(tmp_path / "missing.pt")


def test_unknown_model_and_user_callable():
    with pytest.raises(UnknownModelError, match="accepted: resnet20"):
        build_model("resnet999")
    m = build_model("hasb.models.small:small_cnn", in_channels=3, image_size=32)
    assert m.conv1.in_channels == 3
    assert hasb.quantize_model(m).example_input_shape == (3, 32, 32)


def test_missing_data_dir_error(tmp_path):
    from hasb.data import DataError, load_dataset

    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


def test_real_fashion_mnist_splits(fmnist_small):
    d = fmnist_small
    assert d.train[0].shape[1:] == (1, 28, 28) and len(d.val[0]) == 512 and len(d.test[0]) == 10000
    assert d.train[1].min() == 0 and d.train[1].max() == 9
    from hasb.data import load_dataset

    again = load_dataset("fashion-mnist", train_limit=2048, val_limit=512)
    assert torch.equal(again.val[0], d.val[0])
    other = load_dataset("fashion-mnist", train_limit=2048, val_limit=512, seed=1)
    assert not torch.equal(other.val[0], d.val[0])


@pytest.mark.parametrize("bits", [[4, 3, 2], [8, 6, 4, 2]])
def test_activation_init_sees_training_statistics(bits):
    """Activation scales are set on train-mode (batch-normalised) activations at every bit.

    With eval-mode BN the float model's running statistics do not fit the quantized weights (half-up ties shift
    channel means, most at Δ = 1), activations drift layer by layer and a {4,3,2} ResNet-20's 3- and 2-bit scales
    came out ×4 larger per layer (10⁹ at the last block): every activation then quantizes to 0, for good.
    """
    from hasb.train import _float_bn_stats

    torch.manual_seed(0)
    model = build_model("resnet20")
    x = torch.randn(256, 1, 28, 28)
    _float_bn_stats(model, x)
    hasb.quantize_model(model, bits)
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    hasb.init_quantizers(model, x[:128])
    scales = {
        k: float(v)
        for k, v in model.state_dict().items()
        if ".act_scales." in k and not k.startswith(("conv1.", "fc."))
    }
    # post-BN-ReLU inputs have unit scale: MSE-optimal steps lie well below 1 at 2..8 bits
    worst = max(scales, key=scales.get)
    assert scales[worst] < 2.0, f"{worst} = {scales[worst]:.3g}"
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in bn_before.items()), "init must not change BN statistics"


def test_weight_only_mode_keeps_activations_and_round_trips(tmp_path):
    """Weight-only: every config's activations stay at the spec's act bit (fp here), so the output equals a
    model whose weights alone are quantized; the mode survives export/load bit-exactly; BitOPs use fp activations."""
    torch.manual_seed(0)
    m = hasb.quantize_model(build_model("lm_tiny"), bits=(8, 4, 2), weight_only=True, act_bits="fp")
    x = m.example_input(3)
    hasb.set_config(m, 2)
    assert {a for _, a in hasb.get_config(m).layers.values()} == {None}
    m.eval()
    with torch.no_grad():
        y = m(x)
        for layer in hasb.quantize.quantized_layers(m).values():
            assert layer.a_bit is None or layer.fixed
    path = hasb.export.save_quantized(m, tmp_path / "m.pt")
    m2, _ = hasb.export.load_quantized(path, trusted_model="lm_tiny")
    assert hasb.get_spec(m2).weight_only and hasb.get_spec(m2).act_bit is None
    hasb.set_config(m2, 2)
    with torch.no_grad():
        assert torch.equal(m2(x), y)
    cost = hasb.CostModel.from_model(m)
    cfg = hasb.get_config(m)
    w_and_a = hasb.quantize_model(build_model("lm_tiny"), bits=(8, 4, 2))
    hasb.set_config(w_and_a, 2)
    wa_cost = hasb.CostModel.from_model(w_and_a)
    searchable = cost.bitops(cfg) - cost.fixed_bitops()  # fixed first/last layers are fp in both
    assert searchable == 16 * (wa_cost.bitops(hasb.get_config(w_and_a)) - wa_cost.fixed_bitops())  # A: 32 vs 2 bits
    with pytest.raises(ConfigError, match="act_bits"):
        hasb.quantize_model(build_model("lm_tiny"), bits=(8, 4, 2), weight_only=True, act_bits=6)


@pytest.mark.parametrize("rounding", ["msb", "half_even"])
def test_rounding_modes_export_load_and_deploy_bit_exact(tmp_path, rounding):
    """Every rounding mode round-trips bit for bit: the INT-h export at every bit and a mixed config, and the
    single-config deployment at every bit (its integers = the INT-h integers shifted by integer ops only)."""
    from hasb.export import derive_from_export, export_deployment, load_deployment, load_quantized, save_quantized

    torch.manual_seed(2)
    model = hasb.quantize_model(build_model("small_cnn"), rounding=rounding)
    x = torch.randn(8, 1, 28, 28)
    model.train()
    hasb.init_quantizers(model, x)
    for b in (8, 6, 4, 2):  # every per-bit BN entry away from its init
        hasb.set_config(model, b)
        model(x)
    model.eval()
    loaded, _ = load_quantized(save_quantized(model, tmp_path / "m.pt"))
    assert hasb.get_spec(loaded).rounding == rounding
    for cfg in (8, 6, 4, 2, _mixed(model, random.Random(0))):
        hasb.set_config(model, cfg)
        hasb.set_config(loaded, cfg)
        assert torch.equal(model(x), loaded(x)), f"outputs differ at {cfg}"
    name0 = hasb.searchable_layers(model)[0]
    w8 = model.get_submodule(name0).int_weight()
    for b in (8, 6, 4, 2):
        path = export_deployment(model, b, tmp_path / f"d{b}.pt")
        w_b = hasb.export.read_checkpoint(path)["layers"][name0]["w_int"]
        assert torch.equal(w_b, derive_from_export(w8, b, 8, rounding))
        with hasb.use_config(model, b):
            assert torch.equal(load_deployment(path)(x), model(x)), f"deployment differs at w{b}"
    if rounding == "msb":  # the deployed integers are the top bits: W_2 = W_8 >> 6
        assert torch.equal(derive_from_export(w8, 2, 8, "msb"), (w8.to(torch.int32) >> 6).to(torch.int8))


def _no_backward_op(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, QuantMixin) and not m.act_backward_op}


def test_activation_backward_op_only_after_batch_norms():
    """quantize_model marks the layers whose input comes from a batch norm (directly or through a pointwise
    activation) for the compiled activation backward op; the others (after a max pool, a residual add, a
    LayerNorm, an attention product or a Linear-GELU) leave that backward to inductor; so does a group of linears
    sharing an input, where a group of convolutions sharing one takes the op."""
    r18 = build_model("resnet18", num_classes=10, in_channels=3, image_size=224)
    shared = hasb.quantize_model(copy.deepcopy(r18))
    r18 = hasb.quantize_model(r18, share_inputs=False)
    want = {f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)}  # after the max pool or add-ReLU
    want |= {f"layer{i}.0.downsample.0" for i in range(2, 5)} | {"fc"}  # after add-ReLU; after the average pool
    assert _no_backward_op(r18) == want
    # a downsampling block's conv1 and 1x1 shortcut share their input: a group of convolutions takes the op
    groups = {n for g in shared.hasb_spec.shared_inputs for n in g}
    assert groups == {f"layer{i}.0.{n}" for i in range(2, 5) for n in ("conv1", "downsample.0")}
    assert _no_backward_op(shared) == want - groups
    mbv2 = hasb.quantize_model(build_model("mobilenet_v2", num_classes=10, in_channels=3, image_size=224))
    feats, paths = list(mbv2.features), dict(mbv2.named_modules())
    # a block's expand conv reads the block before it: a residual add's output where that block has one
    after_add = {f"features.{i}.conv.0.0" for i in range(1, len(feats)) if getattr(feats[i - 1], "use_res", False)}
    assert after_add and after_add <= paths.keys()
    assert _no_backward_op(mbv2) == after_add | {"classifier.1"}
    lm = hasb.quantize_model(build_model("lm_tiny"))  # q, k, v, fc1 and the head read a LayerNorm's output
    assert _no_backward_op(lm) == {n for n, m in lm.named_modules() if isinstance(m, QuantMixin)}
    assert len(_no_backward_op(lm)) == 2 * 6 + 1


def test_layer_lookup_by_path_matches_get_submodule_and_keeps_its_error():
    """set_config resolves each layer through ``_modules`` (fast); the same objects as ``get_submodule``, and a path
    that is not there fails as ``get_submodule`` does (an AttributeError naming the missing part)."""
    from hasb.quantize import _quant_layer, get_spec

    q = hasb.quantize_model(build_model("resnet18", num_classes=10, in_channels=3, image_size=32))
    names = get_spec(q).order
    assert any("." in n for n in names)
    assert all(_quant_layer(q, n) is q.get_submodule(n) for n in names)
    with pytest.raises(AttributeError, match="nope"):
        _quant_layer(q, "layer1.nope.conv1")


def test_set_config_switches_every_searchable_layer_and_keeps_fixed_ones():
    """set_config writes both bits of every searchable layer (weight and activation, through the layers' setters)
    and leaves the fixed layers at theirs, config after config."""
    q = hasb.quantize_model(build_model("resnet20"), bits=(8, 4, 2), fixed_bits=8)
    layers = hasb.quantized_layers(q)
    fixed = hasb.get_spec(q).fixed
    assert fixed and len(layers) > len(fixed)
    for bit in (2, 4, 8, 2):
        hasb.set_config(q, bit)
        assert {(m.w_bit, m.a_bit) for n, m in layers.items() if n not in fixed} == {(bit, bit)}
        assert {(layers[n].w_bit, layers[n].a_bit) for n in fixed} == {(8, 8)}
        by_int = {n: (m.w_bit, m.a_bit) for n, m in layers.items()}
        hasb.set_config(q, hasb.BitConfig.uniform(hasb.searchable_layers(q), bit))  # the general path: the same
        assert {n: (m.w_bit, m.a_bit) for n, m in layers.items()} == by_int
    # an int that is not a candidate takes the general path's error and leaves every bit as it was
    with pytest.raises(ConfigError, match="bit 6 is not a candidate; accepted: 2, 4, 8"):
        hasb.set_config(q, 6)
    assert {n: (m.w_bit, m.a_bit) for n, m in layers.items()} == by_int


def test_a_loaded_state_dict_marks_its_initialised_steps_ready_so_a_compiled_forward_is_one_graph():
    """After ``load_state_dict`` the steps the buffers mark initialised are ready at once, with the loaded sign;
    the others still initialise lazily from their first input.  Before, a load emptied that cache and the first
    compiled forward stopped at ``_lazy_init`` (``torch.compiler.disable``) in every layer: a graph each."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    src = hasb.quantize_model(build_model("small_cnn"))
    hasb.set_config(src, 8)
    with torch.no_grad():
        src(x)  # only bit 8's steps are initialised
    dst = hasb.quantize_model(build_model("small_cnn"))
    dst.load_state_dict(src.state_dict())
    for name in hasb.searchable_layers(src):
        s, d = src.get_submodule(name), dst.get_submodule(name)
        assert d._ready == s._ready == {8: bool(s.act_signed)}
    hasb.set_config(dst, 4)
    hasb.set_config(src, 4)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))  # bit 4: initialised lazily on both, from the same input
    hasb.set_config(dst, 8)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    torch.compile(dst, backend=counter)(x).sum().backward()
    torch._dynamo.reset()
    assert counter.frame_count == 1
