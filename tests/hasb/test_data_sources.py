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
    # closed here, not left to the finalizer: under Python 3.12 (the lent H200's) an unclosed GzipFile had not
    # yet written its trailer when the test read the file back
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)
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
    whole = torch.cat([s.train[0], s.val[0]])  # train ∪ val = the whole training file
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
        img.write_bytes(raw[: len(raw) // 2])
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


# ---------------------------------------------------------------- every --data spec
def check_splits(s, seed_sensitive=("calib",)):
    """Train/val/test pairwise disjoint, calib inside train."""
    tr, va, te = rows(s.train[0]), rows(s.val[0]), rows(s.test[0])
    assert tr and va and te
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert rows(s.calib[0]) <= tr


def check_seeds(load, same=(), differ=()):
    a, b, c = load(0), load(0), load(1)
    for k in ("train", "val", "calib", "test"):
        assert torch.equal(getattr(a, k)[0], getattr(b, k)[0]) and torch.equal(getattr(a, k)[1], getattr(b, k)[1])
    for k in same:
        assert torch.equal(getattr(a, k)[0], getattr(c, k)[0])
    for k in differ:
        assert not torch.equal(getattr(a, k)[0], getattr(c, k)[0])


def make_npz(path, n=120, shape=(3, 5), classes=4, **extra):
    x = np.arange(n * int(np.prod(shape)), dtype=np.float32).reshape(n, *shape)  # every example distinct
    np.savez(path, x=x, y=np.arange(n) % classes, **extra)
    return path


def test_npz_splits_disjoint_and_seeded(tmp_path):
    p = make_npz(tmp_path / "d.npz")
    s = load_dataset(f"npz:{p}", val_size=20)
    check_splits(s)
    assert s.input_shape == (3, 5) and s.image_size is None and s.num_classes == 4 and s.task == "classification"
    assert len(s.val[0]) == 20 and len(s.test[0]) == 20 and len(s.train[0]) == 80
    check_seeds(lambda seed: load_dataset(f"npz:{p}", val_size=20, seed=seed), differ=("val", "test", "calib"))


def test_npz_given_val_test_are_used(tmp_path):
    xv = np.full((7, 3, 5), -1.0, np.float32)
    xt = np.full((9, 3, 5), -2.0, np.float32)
    p = make_npz(tmp_path / "d.npz", x_val=xv, y_val=np.zeros(7, int), x_test=xt, y_test=np.ones(9, int))
    s = load_dataset(f"npz:{p}")
    assert torch.equal(s.val[0], torch.from_numpy(xv)) and torch.equal(s.test[0], torch.from_numpy(xt))
    assert len(s.train[0]) == 120


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing", "no such file"),
        ("no_y", "needs arrays 'x' and 'y'"),
        ("length", "as long as x"),
        ("shape", "x_val examples have shape"),
        ("range", "y_val out of range.*accepted 0..3"),
        ("float_labels", "must be integers"),
    ],
)
def test_npz_bad_input(tmp_path, case, match):
    p = tmp_path / "d.npz"
    x = np.zeros((20, 4), np.float32)
    y = np.arange(20) % 4
    arrays = {
        "missing": None,
        "no_y": {"x": x},
        "length": {"x": x, "y": y[:10]},
        "shape": {"x": x, "y": y, "x_val": np.zeros((3, 5)), "y_val": np.zeros(3, int)},
        "range": {"x": x, "y": y, "x_val": np.zeros((3, 4)), "y_val": np.array([0, 1, 9])},
        "float_labels": {"x": x, "y": y.astype(float)},
    }[case]
    if arrays is not None:
        np.savez(p, **arrays)
    with pytest.raises(DataError, match=match) as e:
        load_dataset(f"npz:{p}")
    assert "\n" not in str(e.value)


def make_folder(root, classes=3, per_class=6, size=6, mode="RGB"):
    from PIL import Image

    g = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            Image.fromarray(g.integers(0, 256, shape, dtype=np.uint8), mode).save(root / f"class{c}" / f"{i}.png")
    return root


def test_imagefolder_splits_resize_normalise(tmp_path):
    root = make_folder(tmp_path / "imgs")
    s = load_dataset(f"imagefolder:{root}", size=8)
    check_splits(s)
    assert s.input_shape == (3, 8, 8) and s.image_size == 8 and s.num_classes == 3
    assert sorted(s.test[1].tolist()) == [0, 1, 2] and sorted(s.val[1].tolist()) == [0, 1, 2]  # one per class
    m = s.train[0].mean(dim=(0, 2, 3))
    sd = s.train[0].permute(1, 0, 2, 3).flatten(1).std(1, unbiased=False)
    assert m.abs().max() < 1e-5 and (sd - 1).abs().max() < 1e-4  # normalised with the train split's stats
    # held-out images do not depend on the seed (hash split); calibration does
    check_seeds(
        lambda seed: load_dataset(f"imagefolder:{root}", size=8, seed=seed, calib_size=5),
        same=("val", "test"),
        differ=("calib",),
    )


def test_imagefolder_grayscale_and_given_stats(tmp_path):
    root = make_folder(tmp_path / "g", mode="L")
    s = load_dataset(f"imagefolder:{root}", size=4, mean=0.0, std=1.0)
    assert s.input_shape == (1, 4, 4) and 0 <= float(s.train[0].min()) and float(s.train[0].max()) <= 1


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing", "no such folder"),
        ("empty_class", "class folder 'class1' holds no images"),
        ("unreadable", "cannot .*image .*bad.png"),
        ("one_class", "need at least 2"),
    ],
)
def test_imagefolder_bad_input(tmp_path, case, match):
    root = tmp_path / "imgs"
    if case != "missing":
        make_folder(root, classes=1 if case == "one_class" else 3)
    if case == "empty_class":
        for f in (root / "class1").iterdir():
            f.unlink()
    if case == "unreadable":
        (root / "class0" / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=match) as e:
        load_dataset(f"imagefolder:{root}")
    assert "\n" not in str(e.value)


def make_corpus(root, n=40):
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"f{i:02d}.txt").write_bytes(f"file {i:02d}: ".encode() + bytes([128 + i]) * (300 + 7 * i))
    return root


def test_text_files_split_whole_and_seeded(tmp_path):
    root = make_corpus(tmp_path / "c")
    src = open_source(f"text:{root}/*.txt", context=16)
    a = src.assignment
    names = a["train"] + a["val"] + a["test"]
    assert sorted(names) == sorted(f"f{i:02d}.txt" for i in range(40)) and len(set(names)) == 40
    assert a["val"] and a["test"]
    s = src.splits(0)
    assert s.task == "lm" and s.input_shape == (16,) and s.num_classes == 256
    assert torch.equal(s.train[0][:, 1:], s.train[1][:, :-1])  # targets = inputs shifted by one byte
    # the val windows are exactly the val files' bytes, in hash order
    val_bytes = b"".join((root / f).read_bytes() for f in a["val"])
    got = bytes(s.val[0].flatten().numpy())
    assert val_bytes.startswith(got)
    # each file's own byte (128 + i) appears only in its split
    for k, files in a.items():
        seen = set(np.unique(getattr(s, k)[0].numpy()).tolist()) & {128 + i for i in range(40)}
        assert seen and seen <= {128 + int(f[1:3]) for f in files}
    check_seeds(
        lambda seed: open_source(f"text:{root}", context=16).splits(seed),
        same=("val", "test"),
        differ=("train", "calib"),
    )


@pytest.mark.parametrize(
    "case,match",
    [
        ("nothing", "no files found"),
        ("empty", "empty or too small"),
        ("one_file", "files are split whole"),
    ],
)
def test_text_bad_input(tmp_path, case, match):
    root = tmp_path / "c"
    root.mkdir()
    if case == "empty":
        for i in range(30):
            (root / f"{i}.txt").write_bytes(b"")
    if case == "one_file":
        (root / "only.txt").write_bytes(b"x" * 10000)
    with pytest.raises(DataError, match=match) as e:
        load_dataset(f"text:{root}/*.txt" if case == "nothing" else f"text:{root}", context=16)
    assert "\n" not in str(e.value)


def test_python_stdlib_bounded_and_versioned():
    import platform

    src = open_source("python-stdlib", context=32, limit=20_000)
    d = src.describe()
    assert d["python"] == platform.python_version() and d["task"] == "lm"
    assert all(n <= 20_000 for n in d["bytes"].values())
    assert not (set(src.assignment["train"]) & set(src.assignment["val"]))
    assert not (set(src.assignment["val"]) & set(src.assignment["test"]))
    s = src.splits(3)
    check_splits(s)
    assert s.train[0].dtype == torch.uint8 and s.train[0].shape[1] == 32
    assert s.describe()["python"] == platform.python_version()


def test_user_callable(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def make(n=30):\n"
        "    x = torch.arange(n * 4.).view(n, 4)\n"
        "    return {'train': TensorDataset(x, torch.arange(n) % 3), 'test': TensorDataset(-x[:6], torch.arange(6) % 3)}\n"
        "def wrong():\n    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    s = load_dataset("mydata:make", val_size=5, n=40)
    check_splits(s)
    assert s.num_classes == 3 and len(s.val[0]) == 5 and len(s.test[0]) == 6 and len(s.train[0]) == 35
    with pytest.raises(DataError, match="returned int; accepted: a DataSource"):
        load_dataset("mydata:wrong")
    with pytest.raises(DataError, match="cannot import data callable 'nosuchmod_xyz:f'.*PYTHONPATH"):
        load_dataset("nosuchmod_xyz:f")
    assert "nosuchmod_xyz" not in sys.modules


@pytest.mark.parametrize("spec", ["cifar10", "npz:", "text", "imagefolder"])
def test_unknown_spec_lists_accepted(spec):
    with pytest.raises(DataError, match="accepted: |missing the path") as e:
        open_source(spec)
    assert "\n" not in str(e.value)


def test_evaluate_metric_accuracy_and_bits(tmp_path):
    """Accuracy with its binomial SE; bits per byte = nats / ln 2 for a uniform byte model (8 bits exactly)."""
    from hasb.data import evaluate_metric

    x = torch.randn(50, 4)
    y = (x[:, 0] > 0).long()
    lin = torch.nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[1, 0] = 1.0
    r = evaluate_metric(lin, (x, y), "classification", batch_size=16)
    assert r["value"] == 1.0 and r["se"] == 0.0 and r["n"] == 50

    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, t):
            return self.p.expand(*t.shape, 256) * 0

    w = torch.randint(0, 256, (10, 8), dtype=torch.uint8)
    r = evaluate_metric(Uniform(), (w, w), "lm")
    # float32 cross-entropy: relative error ~1e-7
    assert abs(r["value"] - 8.0) < 1e-6 and abs(r["loss_nats"] - math.log(256)) < 1e-6


def test_parse_data_opts():
    from hasb.data import parse_data_opts

    assert parse_data_opts("size=64, mean=0.5/0.25/0, context=256,limit=none,name=abc") == {
        "size": 64,
        "mean": [0.5, 0.25, 0],
        "context": 256,
        "limit": None,
        "name": "abc",
    }
    assert parse_data_opts(None) == {} and parse_data_opts("") == {}
    with pytest.raises(DataError, match="key=value pairs"):
        parse_data_opts("size64")
    with pytest.raises(DataError, match="bad option"):
        load_dataset("python-stdlib", **parse_data_opts("colour=red"))


def test_bad_options_name_the_accepted_ones(tmp_path):
    root = make_folder(tmp_path / "imgs")
    with pytest.raises(DataError, match="bad option.*accepted: size, mean, std, val_frac, test_frac"):
        load_dataset(f"imagefolder:{root}", context=3)
    with pytest.raises(DataError, match="takes no options"):
        load_dataset("mnist", size=3)


def test_idx_splits_disjoint_and_seeded(tmp_path):
    d = str(idx_dir(tmp_path, n_train=80))
    s = load_dataset("mnist", d, val_size=16, calib_size=8)
    check_splits(s)
    assert len(s.val[0]) == 16 and len(s.train[0]) == 64 and len(s.test[0]) == 20
    check_seeds(
        lambda seed: load_dataset("mnist", d, val_size=16, calib_size=8, seed=seed),
        same=("test",),
        differ=("val", "calib"),
    )


def test_data_dir_only_for_idx(tmp_path):
    with pytest.raises(DataError, match="--data-dir applies to fashion-mnist and mnist only"):
        load_dataset("python-stdlib", str(tmp_path))
