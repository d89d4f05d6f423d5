"""Layers fed one input tensor quantize it as one quantizer (``quantize_model(share_inputs=True)``, the default):
which layers are grouped, that the values and gradients are those of separate quantizers with the same steps,
that a forward quantizes the input once per bit (eager and traced), and the state around it (init, data mode's
gradient hooks, specs of older exports)."""

import copy

import pytest
import torch
import torch.nn as nn
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_module_simplified

import hasb
from hasb import kernels as K
from hasb.config import ConfigError
from hasb.models import build_model
from hasb.quantize import quantized_layers

LM_GROUPS = (("blocks.0.attn.k", "blocks.0.attn.v"), ("blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.attn.v"))


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add OpenMP barriers on a loaded 2-core machine
    yield
    torch.set_num_threads(n)


def _lm_pair():
    """(shared, separate) quantized lm_tiny with the same weights and steps, initialised, training mode; ids [4, 32]."""
    torch.manual_seed(0)
    f = build_model("lm_tiny", context=32)
    x = torch.randint(0, 256, (4, 32))
    shared = hasb.quantize_model(copy.deepcopy(f), example_input=x[:2])
    separate = hasb.quantize_model(copy.deepcopy(f), example_input=x[:2], share_inputs=False)
    hasb.init_quantizers(shared, x)
    separate.load_state_dict(shared.state_dict())  # every member's key holds the shared step: tied steps
    hasb.init_quantizers(separate, x)  # all initialised already: only the Python-side caches
    for m in (shared, separate):
        m.train()
    return shared, separate, x


def test_groups_are_the_layers_fed_one_tensor():
    shared, separate, _ = _lm_pair()
    assert shared.hasb_spec.shared_inputs == LM_GROUPS  # block 0's q is the fixed first layer: not in its group
    assert separate.hasb_spec.shared_inputs == ()
    layers = quantized_layers(shared)
    for group in LM_GROUPS:
        assert all(layers[n].act_scales is layers[group[0]].act_scales for n in group)
    assert layers["blocks.0.attn.q"].act_scales is not layers["blocks.0.attn.k"].act_scales
    assert list(shared.state_dict()) == list(separate.state_dict())  # the same keys
    assert len(list(separate.parameters())) - len(list(shared.parameters())) == 4 * (1 + 2)  # 4 bits, 3 aliases
    r18 = hasb.quantize_model(build_model("resnet18"), example_input=torch.randn(2, 1, 28, 28))
    assert r18.hasb_spec.shared_inputs == tuple((f"layer{i}.0.downsample.0", f"layer{i}.0.conv1") for i in (2, 3, 4))


def test_an_in_place_op_between_two_layers_keeps_their_quantizers_apart():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Linear(8, 8) for _ in range(4))

        def forward(self, x):
            h = torch.relu(self.a(x))
            y = self.b(h) + self.c(h)  # b and c: one input
            h.mul_(2.0)
            return self.d(torch.relu(y)) + self.d(h)  # d: the first input it took is its group of one

    q = hasb.quantize_model(Net(), example_input=torch.randn(2, 8), fixed="none")
    assert q.hasb_spec.shared_inputs == (("b", "c"),)


def _scale_grads(model, bit):
    return {n: m.act_scales[str(bit)].grad for n, m in quantized_layers(model).items() if m.a_bit is not None}


@pytest.mark.parametrize("mixed", [False, True])
def test_values_and_gradients_are_separate_quantizers_with_the_same_steps(mixed):
    shared, separate, x = _lm_pair()
    conf = {n: 4 for n in hasb.searchable_layers(shared)}
    if mixed:  # block 1: q and k at 4 share one x̂, v at 2 quantizes its own with the group's 2-bit step
        conf["blocks.1.attn.v"] = 2
    for m in (shared, separate):
        hasb.set_config(m, conf)
        m.zero_grad()
        m(x).float().pow(2).mean().backward()
    assert torch.equal(shared(x), separate(x))
    ls, lp = quantized_layers(shared), quantized_layers(separate)
    for n in ls:
        torch.testing.assert_close(ls[n].weight.grad, lp[n].weight.grad, rtol=1e-5, atol=1e-9)
    for bit in (4, 2):
        for group in LM_GROUPS:
            at_bit = [n for n in group if lp[n].a_bit == bit]
            if not at_bit:
                assert ls[group[0]].act_scales[str(bit)].grad is None
                continue
            want = sum(lp[n].act_scales[str(bit)].grad for n in at_bit)  # one step: its gradient is their sum
            torch.testing.assert_close(ls[group[0]].act_scales[str(bit)].grad, want, rtol=1e-5, atol=0)


def test_a_forward_quantizes_a_shared_input_once_per_bit(monkeypatch):
    shared, separate, x = _lm_pair()
    calls = []
    real = K.quantize_activation
    monkeypatch.setattr(K, "quantize_activation", lambda *a, **k: calls.append(a[2]) or real(*a, **k))

    def count(model, conf):
        hasb.set_config(model, conf)
        calls.clear()
        model(x)
        return len(calls)

    conf = {n: 4 for n in hasb.searchable_layers(shared)}
    saved = sum(len(g) - 1 for g in LM_GROUPS)
    assert count(shared, conf) == count(separate, conf) - saved
    conf["blocks.1.attn.v"] = 2
    assert count(shared, conf) == count(separate, conf) - saved + 1
    assert all(m._a_shared is None for m in quantized_layers(shared).values())  # nothing held after a forward


def _traced_rounds(model, x) -> tuple[int, int, torch.Tensor]:
    """(round ops in the forward graph AOT autograd traces of ``model``, outputs of dynamo's graph, the output)."""
    seen, outputs = [], []

    def forward_compiler(gm, _):
        seen.append(sum(1 for n in gm.graph.nodes if n.op == "call_function" and "round" in str(n.target)))
        return make_boxed_func(gm.forward)

    def backend(gm, inputs):
        outputs.append(len(next(n for n in gm.graph.nodes if n.op == "output").args[0]))
        return aot_module_simplified(gm, inputs, fw_compiler=forward_compiler, bw_compiler=make_boxed_func)

    torch._dynamo.reset()
    out = torch.compile(model, backend=backend)(x)
    return seen[0], outputs[0], out


def test_a_traced_forward_quantizes_a_shared_input_once():
    shared, separate, x = _lm_pair()
    for m in (shared, separate):
        hasb.set_config(m, 4)
    n_shared, outputs_shared, out = _traced_rounds(shared, x)
    n_separate, outputs_separate, _ = _traced_rounds(separate, x)
    assert n_separate - n_shared == sum(len(g) - 1 for g in LM_GROUPS)
    assert outputs_shared == outputs_separate  # no x̂ left in an attribute at the frame's end (an extra output)
    assert torch.equal(out, shared(x))
    assert all(m._a_shared is None for m in quantized_layers(shared).values())


def test_the_first_calibration_initialises_every_member():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, 32))
    q = hasb.quantize_model(build_model("lm_tiny", context=32), example_input=x[:2])
    layers = quantized_layers(q)
    hasb.set_config(q, 4)
    with torch.no_grad():
        q(x)  # the layers' lazy init: the group's first layer at 4 bits initialises the step for all
    i = layers["blocks.1.attn.q"].candidate_bits.index(4)
    for n in LM_GROUPS[1]:
        assert bool(layers[n].act_init[i]) and int(layers[n].act_signed) == int(layers[LM_GROUPS[1][0]].act_signed)
    assert layers["blocks.1.attn.k"].missing_act_bits([4]) == []


def test_data_mode_keeps_the_gradient_of_a_step_another_member_uses():
    shared, _, x = _lm_pair()
    hasb.bits_as_data(shared)
    conf = {n: 4 for n in hasb.searchable_layers(shared)}
    conf["blocks.1.attn.q"] = 2  # the group's first layer at 2, k and v at 4
    hasb.set_config(shared, conf)
    shared.zero_grad(set_to_none=True)
    shared(x).float().pow(2).mean().backward()
    steps = quantized_layers(shared)["blocks.1.attn.q"].act_scales
    assert steps["4"].grad is not None and steps["2"].grad is not None
    assert steps["8"].grad is None and steps["6"].grad is None  # no layer of the group used them


def test_specs_round_trip_and_older_specs_rebuild_separate_quantizers():
    shared, _, x = _lm_pair()
    spec = shared.hasb_spec.to_dict()
    again = hasb.quantize.quantize_like(build_model("lm_tiny", context=32), spec)
    again.load_state_dict(shared.state_dict())
    for m in (shared, again):
        hasb.set_config(m, 4)
    assert again.hasb_spec.shared_inputs == LM_GROUPS and torch.equal(again(x), shared(x))
    old = {k: v for k, v in spec.items() if k != "shared_inputs"}  # an export written before shared inputs
    rebuilt = hasb.quantize.quantize_like(build_model("lm_tiny", context=32), old)
    assert rebuilt.hasb_spec.shared_inputs == ()
    layers = quantized_layers(rebuilt)
    assert layers["blocks.1.attn.k"].act_scales is not layers["blocks.1.attn.q"].act_scales
    wrong = dict(spec, shared_inputs=[["blocks.1.attn.q", "blocks.1.attn.k"]])
    with pytest.raises(ConfigError, match="sharing an input"):
        hasb.quantize.quantize_like(build_model("lm_tiny", context=32), wrong)


def test_a_state_dict_with_a_step_per_layer_is_refused_where_the_layers_share_one():
    shared, separate, x = _lm_pair()
    with torch.no_grad():
        quantized_layers(separate)["blocks.1.attn.k"].act_scales["4"].mul_(1.5)  # its own step now
    for model in (shared, copy.deepcopy(shared)):  # a deep copy (as the trainer makes) keeps the check
        with pytest.raises(ConfigError, match=r"different 4-bit activation steps for blocks.1.attn.q, blocks.1.attn.k"):
            model.load_state_dict(separate.state_dict())
    separate.load_state_dict(shared.state_dict())  # the other way: every layer takes the shared step
    shared.load_state_dict(copy.deepcopy(shared).state_dict())


def test_the_last_layer_of_a_group_clears_the_slot_at_any_bit():
    """Called without the model's release hook (the attention block alone), the group's last layer leaves no x̂
    behind, also when it runs its input at full precision."""
    shared, _, _ = _lm_pair()
    hasb.set_config(shared, 4)
    layers = quantized_layers(shared)
    attn = shared.blocks[1].attn
    h = torch.randn(2, 32, 64)
    for v_bit in (4, None):
        layers["blocks.1.attn.v"].put_bits(4, v_bit)
        attn(h)
        assert layers["blocks.1.attn.q"]._a_shared is None, v_bit
