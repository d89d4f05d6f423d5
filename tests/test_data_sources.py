"""Data sources: the user's own IDX files checked, every --data spec, splits disjoint and seed-deterministic."""
import gzip
import math
import sys

import numpy as np
import pytest
import torch

from hasb.data import DataError, load_dataset, open_source
from hasb.models import build_model


def write_idx(path, arr, gz=True):
    arr = np.asarray(arr, dtype=np.uint8)
    raw = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
    (gzip.open if gz else open)(path, "wb").write(raw)
    return path


def idx_dir(d, n_train=60, n_test=20, size=28, classes=10, seed=0):
    g = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(d / f"{stem}-images-idx3-ubyte.gz", g.integers(0, 256, (n, size, size)))
        write_idx(d / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % classes)
    return d


def rows(t):
    """Each example's bytes, to compare splits as sets."""
    return {bytes(r.contiguous().view(torch.uint8).numpy().tobytes()) for r in t}


# ---------------------------------------------------------------- issue 10 finding 7: own IDX data is checked
def test_idx_twelve_classes_record_count_and_train(tmp_path):
    """12 classes: recorded from the labels, so the model gets a 12-way head (was a raw IndexError)."""
    s = load_dataset("mnist", str(idx_dir(tmp_path, classes=12)), val_size=12)
    assert s.num_classes == 12
    model = build_model("tiny_mlp", num_classes=s.num_classes, in_channels=s.in_channels, image_size=s.image_size)
    loss = torch.nn.functional.cross_entropy(model(s.train[0]), s.train[1])
    assert torch.isfinite(loss)


def test_idx_three_classes_recorded(tmp_path):
    s = load_dataset("mnist", str(idx_dir(tmp_path, classes=3)), val_size=12)
    assert s.num_classes == 3 and s.describe()["num_classes"] == 3


def test_idx_32px_records_real_shape(tmp_path):
    s = load_dataset("mnist", str(idx_dir(tmp_path, size=32)), val_size=12)
    assert s.image_size == 32 and s.input_shape == (1, 32, 32) and s.train[0].shape[1:] == (1, 32, 32)


def test_idx_normalisation_from_the_files_not_the_name(tmp_path):
    """--data mnist --data-dir mine: mean/std are the files' own (uniform bytes: ~0.5/0.29, not MNIST's)."""
    s = load_dataset("mnist", str(idx_dir(tmp_path, n_train=200)), val_size=40)
    whole = torch.cat([s.train[0], s.val[0]])          # train ∪ val = the whole training file
    assert abs(float(whole.mean())) < 1e-4 and abs(float(whole.std(unbiased=False)) - 1) < 1e-4
    norm = s.describe()["normalisation"]
    assert abs(norm["mean"] - 0.5) < 0.02 and abs(norm["mean"] - 0.1307) > 0.3


@pytest.mark.parametrize("damage", ["gzip_cut", "random_bytes", "payload_cut", "labels_short", "not_idx"])
def test_idx_corrupt_files_name_the_file(tmp_path, damage):
    d = idx_dir(tmp_path)
    img, lab = d / "train-images-idx3-ubyte.gz", d / "train-labels-idx1-ubyte.gz"
    bad = img
    if damage == "gzip_cut":
        raw = img.read_bytes()
        img.write_bytes(raw[:len(raw) // 2])
    elif damage == "random_bytes":
        img.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif damage == "payload_cut":
        raw = gzip.decompress(img.read_bytes())
        img.write_bytes(gzip.compress(raw[:-100]))
    elif damage == "labels_short":
        write_idx(lab, np.arange(50) % 10)
        bad = lab
    else:
        img.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + bytes(100)))
    with pytest.raises(DataError) as e:
        load_dataset("mnist", str(d), val_size=12)
    msg = str(e.value)
    assert bad.name in msg and "\n" not in msg


def test_idx_test_labels_out_of_range(tmp_path):
    d = idx_dir(tmp_path, classes=3)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.full(20, 7))
    with pytest.raises(DataError, match="t10k-labels.*out of range.*0..2"):
        load_dataset("mnist", str(d), val_size=12)
