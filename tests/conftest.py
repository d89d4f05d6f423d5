import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FMNIST = "/usr/share/datasets/fashion-mnist"


def have_fmnist() -> bool:
    from hasb.data import find_data_dir

    try:
        find_data_dir("fashion-mnist")
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def fmnist_small():
    """A small deterministic slice of real Fashion-MNIST (the README's setup installs it)."""
    from hasb.data import load_dataset

    return load_dataset("fashion-mnist", train_limit=2048, val_limit=512)
