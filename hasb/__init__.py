"""hasb: Hessian-aware mixed-precision quantization with Double Rounding supernets.

The verbs::

    model = hasb.quantize_model(build_model("resnet20"), bits=(8, 6, 4, 2))
    hasb.set_config(model, 4)                        # uniform W4A4
    hasb.set_config(model, hasb.BitConfig({...}))    # per-layer bits
    cost = hasb.CostModel.from_model(model)          # MACs, BitOPs, size, budgets
"""

from .config import BitConfig, ConfigError, atomic_write_bytes, atomic_write_text
from .cost import Budget, BudgetError, CostModel, layer_bitops
from .modules import QConv2d, QLinear, SwitchBatchNorm
from .quantize import (
    DEFAULT_BITS,
    QuantSpec,
    batchnorms,
    bits_as_data,
    candidate_bits,
    get_config,
    get_spec,
    init_quantizers,
    quantize_model,
    quantized_layers,
    restore_fixed,
    searchable_layers,
    set_config,
    set_fp,
    uniform_config,
    use_config,
)

__version__ = "0.1.0"

__all__ = [
    "BitConfig",
    "ConfigError",
    "atomic_write_bytes",
    "atomic_write_text",
    "Budget",
    "BudgetError",
    "CostModel",
    "layer_bitops",
    "QConv2d",
    "QLinear",
    "SwitchBatchNorm",
    "DEFAULT_BITS",
    "QuantSpec",
    "batchnorms",
    "candidate_bits",
    "get_config",
    "get_spec",
    "init_quantizers",
    "bits_as_data",
    "quantize_model",
    "quantized_layers",
    "restore_fixed",
    "searchable_layers",
    "set_config",
    "set_fp",
    "uniform_config",
    "use_config",
    "__version__",
]
