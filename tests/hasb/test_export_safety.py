"""A checkpoint never chooses code to import: user-code models load only when the user names them."""

from __future__ import annotations

import sys

import pytest
import torch

import hasb
from hasb.export import CheckpointError, load_quantized, save_quantized
from hasb.models import build_model

USER_MODEL = """
import pathlib
pathlib.Path(__file__).with_name("imported.flag").write_text("side effect")   # any import-time effect
from hasb.models.small import SmallCNN

def make(num_classes=10, in_channels=1):
    return SmallCNN(num_classes, in_channels)
"""


def test_user_code_named_in_a_file_is_not_imported_unless_the_user_names_it(tmp_path, monkeypatch):
    (tmp_path / "hasb_user_model_x.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    name = "hasb_user_model_x:make"
    model = hasb.quantize_model(build_model(name), bits=(8, 4))
    path = save_quantized(model, tmp_path / "model.pt")
    (tmp_path / "imported.flag").unlink()
    sys.modules.pop("hasb_user_model_x", None)
    with pytest.raises(CheckpointError, match="pass --model hasb_user_model_x:make"):
        load_quantized(path)
    with pytest.raises(CheckpointError, match="user code"):
        load_quantized(path, trusted_model="small_cnn")
    assert not (tmp_path / "imported.flag").exists() and "hasb_user_model_x" not in sys.modules
    loaded, _ = load_quantized(path, trusted_model=name)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x))
