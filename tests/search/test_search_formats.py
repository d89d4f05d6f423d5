"""search.formats: the outputs parsed the way HAWQ (quant_train.py) and NNCF (manual precision init) parse them."""

import json
import re

import numpy as np
import pytest

import hasb
from hasb.config import BitConfig
from hasb.models import build_model
from hasb.quantize import searchable_layers, uniform_config
from search import formats


@pytest.fixture(scope="module")
def r18():
    """hasb's torchvision-style ResNet-18, stem and head fixed at 8 bits (HAWQ's configs keep them at 8)."""
    return hasb.quantize_model(build_model("resnet18", num_classes=10), fixed_bits=8)


@pytest.fixture(scope="module")
def r20():
    return hasb.quantize_model(build_model("resnet20"))  # stem and head full precision


def random_config(model, seed):
    rng = np.random.default_rng(seed)
    return BitConfig({n: (int(rng.choice([8, 6, 4, 2])),) * 2 for n in searchable_layers(model)})


# ----------------------------------------------------------------------------------------------------------
# HAWQ: quant_train.py walks model.named_modules(); a name in bit_config gets its int (or a tuple's first item),
# as activation_bit when the module is a QuantAct, else as weight_bit; it logs whether every key matched.
def hawq_q_resnet_modules(stages, units, identity_units, bottleneck=False):
    """Quantizer names of HAWQ's Q_ResNet18/50 (utils/models/q_resnet.py), as named_modules() lists them:
    name -> 'act' (QuantAct) or 'weight' (QuantBnConv2d / QuantLinear)."""
    mods = {
        "quant_input": "act",
        ("quant_init_convbn" if bottleneck else "quant_init_block_convbn"): "weight",
        "quant_act_int32": "act",
    }
    convs = 3 if bottleneck else 2
    for s in range(1, stages + 1):
        for u in range(1, units[s - 1] + 1):
            p = f"stage{s}.unit{u}."
            mods[p + "quant_act"] = "act"
            for k in range(1, convs + 1):
                mods[p + f"quant_convbn{k}"] = "weight"
                if k < convs:
                    mods[p + f"quant_act{k}"] = "act"
            if (s, u) in identity_units:
                mods[p + "quant_identity_convbn"] = "weight"
            mods[p + "quant_act_int32"] = "act"
    mods.update({"quant_act_output": "act", "quant_output": "weight"})
    return mods


def hawq_apply(modules, bit_config):
    """quant_train.py's loop: returns ({name: (kind, bits)}, all keys of bit_config matched)."""
    applied, matched = {}, 0
    for name, kind in modules.items():
        if name in bit_config:
            matched += 1
            v = bit_config[name]
            bw = v[0] if type(v) is tuple else v
            assert type(bw) is int, f"{name}: HAWQ expects an int, got {v!r}"
            applied[name] = (kind, bw)
    return applied, matched == len(bit_config)


def test_hawq_resnet18_uniform4_is_hawqs_own_config(r18):
    """hasb's resnet18 at uniform 4 bits, stem and head fixed at 8: the same dict as HAWQ's
    bit_config_resnet18_uniform4 (every activation and weight 4 inside the stages, 8 at the ends, sums 16)."""
    m = r18
    bc = formats.hawq_bit_config(m, uniform_config(m, 4))
    modules = hawq_q_resnet_modules(4, [2, 2, 2, 2], {(2, 1), (3, 1), (4, 1)})
    applied, all_matched = hawq_apply(modules, bc)
    assert all_matched and set(applied) == set(modules)
    expected = {n: (16 if n.endswith("quant_act_int32") else 8 if not n.startswith("stage") else 4) for n in modules}
    assert bc == expected


@pytest.mark.parametrize("seed", range(2))
def test_hawq_resnet20_per_quantizer_bits(seed, r20):
    m = r20
    cfg = random_config(m, seed)
    cfg = cfg.with_layers({"layer2.0.shortcut": cfg["layer2.0.conv1"], "layer3.0.shortcut": cfg["layer3.0.conv1"]})
    bc = formats.hawq_bit_config(m, cfg)
    json.loads(json.dumps(bc))  # plain JSON: str -> int
    modules = hawq_q_resnet_modules(3, [3, 3, 3], {(2, 1), (3, 1)})
    applied, all_matched = hawq_apply(modules, bc)
    assert all_matched
    for s in range(1, 4):
        for u in range(3):
            w1, a1 = cfg[f"layer{s}.{u}.conv1"]
            w2, a2 = cfg[f"layer{s}.{u}.conv2"]
            p = f"stage{s}.unit{u + 1}."
            assert applied[p + "quant_act"] == ("act", a1) and applied[p + "quant_convbn1"] == ("weight", w1)
            assert applied[p + "quant_act1"] == ("act", a2) and applied[p + "quant_convbn2"] == ("weight", w2)
    assert applied["stage2.unit1.quant_identity_convbn"] == ("weight", cfg["layer2.0.shortcut"][0])
    # fp stem/head: no entry, so HAWQ keeps its own bits there
    assert not {"quant_input", "quant_init_block_convbn", "quant_output", "quant_act_output"} & set(bc)


def test_hawq_shared_input_quantizer_must_agree(r20):
    m = r20
    cfg = uniform_config(m, 4).with_layers({"layer2.0.shortcut": (4, 8)})
    with pytest.raises(formats.FormatError, match="stage2.unit1.quant_act"):
        formats.hawq_bit_config(m, cfg)


def test_hawq_small_cnn_convention():
    m = hasb.quantize_model(build_model("small_cnn"))
    cfg = random_config(m, 3)
    bc = formats.hawq_bit_config(m, cfg)
    assert bc == {k: v for n, (w, a) in cfg.layers.items() for k, v in ((f"quant_{n}", w), (f"quant_act_{n}", a))}


# ----------------------------------------------------------------------------------------------------------
# NNCF: each [bits, scope] pair must be a 2-list of (int, str); the scope must equal a quantizer id (no "{re}"
# here) or NNCF raises "Invalid scope name"; weight quantizer ids have the form below.
NNCF_WEIGHT_ID = re.compile(
    r"(?P<model>\w+)(?P<path>(/\w+\[\w+\])*)/NNCF(Conv2d|Linear)\[(?P<leaf>\w+)\]"
    r"/(conv2d|linear)_(?P<call>\d+)\|WEIGHT"
)


def nncf_weight_ids(model):
    """NNCF's weight quantizer ids of a float model, built from its module tree (independently of search.formats):
    the model class, then Class[attr] per level, Conv2d/Linear renamed to NNCF's wrappers, op with call 0."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (hasb.modules.QConv2d, hasb.modules.QLinear)):
            parts, cur = [type(model).__name__], model
            for attr in name.split("."):
                cur = cur._modules[attr]
                cls = type(cur).__name__
                cls = {"QConv2d": "NNCFConv2d", "QLinear": "NNCFLinear"}.get(cls, cls)
                parts.append(f"{cls}[{attr}]")
            op = "conv2d" if isinstance(mod, hasb.modules.QConv2d) else "linear"
            out["/".join(parts) + f"/{op}_0|WEIGHT"] = name
    return out


def nncf_manual_init(cfg_json, quantizer_ids):
    """NNCF's ManualPrecisionInitializer.apply_init over the quantizer ids: {id: bits}; raises like NNCF."""
    prec = cfg_json["compression"]["initializer"]["precision"]
    assert prec["type"] == "manual" and cfg_json["compression"]["algorithm"] == "quantization"
    assigned = {}
    for pair in prec["bitwidth_per_scope"]:
        if len(pair) != 2:
            raise ValueError("Invalid format of bitwidth per scope: [int, str] is expected")
        bits, scope = pair
        assert type(bits) is int and isinstance(scope, str)
        hits = [q for q in quantizer_ids if q == scope]
        if not hits:
            raise ValueError(f"Invalid scope name `{scope}`, failed to assign bitwidth {bits} to it")
        assigned.update({q: bits for q in hits})
    return assigned


@pytest.mark.parametrize("arch", ["resnet20", "small_cnn"])
def test_nncf_manual_config_assigns_every_weight(arch):
    m = hasb.quantize_model(build_model(arch))
    cfg = random_config(m, 1)
    doc = json.loads(json.dumps(formats.nncf_config(m, cfg, m.example_input_shape)))
    assert doc["input_info"]["sample_size"] == [1, *m.example_input_shape]
    ids = nncf_weight_ids(m)
    assigned = nncf_manual_init(doc, ids)
    assert {ids[q]: b for q, b in assigned.items()} == {n: w for n, (w, a) in cfg.layers.items()}
    for q in assigned:
        assert NNCF_WEIGHT_ID.fullmatch(q) and NNCF_WEIGHT_ID.fullmatch(q)["model"] == type(m).__name__
    # fixed fp layers (stem, head) are ignored by module scope, a prefix of their weight id
    fixed = [ids_q.rsplit("/", 1)[0] for ids_q, n in ids.items() if n not in cfg.layers]
    assert sorted(doc["compression"]["ignored_scopes"]) == sorted(fixed) and len(fixed) == 2
    # execution order, as NNCF lists weight quantizers
    assert [ids[s] for _, s in doc["compression"]["initializer"]["precision"]["bitwidth_per_scope"]] == [
        n for n in hasb.quantize.get_spec(m).order if n in cfg.layers
    ]


def test_nncf_scope_matches_nncf_documented_resnet18_ids(r18):
    """The ids NNCF itself prints for torchvision's ResNet-18 (e.g. in its precision-init docs and tests)."""
    m = r18
    scopes = [
        s
        for _, s in formats.nncf_config(m, uniform_config(m, 4), m.example_input_shape)["compression"]["initializer"][
            "precision"
        ]["bitwidth_per_scope"]
    ]
    assert "ResNet/NNCFConv2d[conv1]/conv2d_0|WEIGHT" in scopes
    assert "ResNet/Sequential[layer1]/BasicBlock[0]/NNCFConv2d[conv1]/conv2d_0|WEIGHT" in scopes
    assert "ResNet/NNCFLinear[fc]/linear_0|WEIGHT" in scopes


def test_nncf_trace_leaves_model_untouched():
    m = hasb.quantize_model(build_model("small_cnn"))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    formats.nncf_config(m, uniform_config(m, 4), m.example_input_shape)
    after = m.state_dict()
    assert all(before[k].equal(after[k]) for k in before)
    with pytest.raises(formats.FormatError, match="does not run on an input of shape"):
        formats.nncf_config(m, uniform_config(m, 4), (3, 32, 32))
