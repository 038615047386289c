"""Datasets: bundled digits, generated MNIST-1D, and MNIST from local files (written here)."""

from __future__ import annotations

import gzip
import socket
import struct

import numpy as np
import pytest

from safetylab.data import load_dataset, load_digits, load_mnist, make_mnist1d, read_idx


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a data loader tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_digits_split_is_fixed_and_scaled():
    a, b = load_digits(), load_digits()
    assert a.x_train.shape == (1348, 64) and a.x_test.shape == (449, 64)
    assert a.x_train.dtype == np.float32 and 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert a.n_classes == 10


def test_mnist1d_recipe():
    d = make_mnist1d(1000, rng=np.random.default_rng(1))
    assert d.x_train.shape == (800, 40) and d.x_test.shape == (200, 40)
    assert np.bincount(np.concatenate([d.y_train, d.y_test])).tolist() == [100] * 10  # balanced
    again = make_mnist1d(1000, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(d.x_train, again.x_train)
    other = make_mnist1d(1000, rng=np.random.default_rng(2))
    assert not np.allclose(d.x_train[:50], other.x_train[:50])
    # learnable but not trivial: a nearest-neighbour classifier beats chance (0.1) clearly
    from sklearn.neighbors import KNeighborsClassifier

    acc = KNeighborsClassifier(5).fit(d.x_train, d.y_train).score(d.x_test, d.y_test)
    assert 0.25 < acc < 0.999
    with pytest.raises(ValueError, match="n_samples=5 must be >= 20"):
        make_mnist1d(5)


def _write_idx(path, arr, gz=False):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def _tiny_mnist(rng):
    return (
        rng.integers(0, 256, size=(12, 28, 28)),
        rng.integers(0, 10, size=12),
        rng.integers(0, 256, size=(5, 28, 28)),
        rng.integers(0, 10, size=5),
    )


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_idx_files(tmp_path, gz):
    xtr, ytr, xte, yte = _tiny_mnist(np.random.default_rng(0))
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", xtr, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", ytr, gz)
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", xte, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", yte, gz)
    d = load_mnist(tmp_path)
    np.testing.assert_allclose(d.x_train, xtr.reshape(12, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(d.y_test, yte)
    assert d.x_train.shape == (12, 784)
    loaded = load_dataset("mnist", tmp_path)
    np.testing.assert_array_equal(loaded.y_train, ytr)


def test_mnist_from_npz(tmp_path):
    xtr, ytr, xte, yte = _tiny_mnist(np.random.default_rng(1))
    np.savez(tmp_path / "mnist.npz", x_train=xtr.astype(np.uint8), y_train=ytr, x_test=xte.astype(np.uint8), y_test=yte)
    d = load_mnist(tmp_path / "mnist.npz")
    np.testing.assert_allclose(d.x_test, xte.reshape(5, -1) / 255.0, rtol=1e-6)
    np.savez(tmp_path / "bad.npz", x_train=xtr)
    with pytest.raises(ValueError, match=r"lacks arrays \['y_train', 'x_test', 'y_test'\]"):
        load_mnist(tmp_path / "bad.npz")


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_mnist_from_hugging_face_folder(tmp_path, layout):
    import datasets  # needed for HF dataset folders (a declared dependency)
    from PIL import Image

    xtr, ytr, xte, yte = _tiny_mnist(np.random.default_rng(2))
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})

    def split(x, y):
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(a.astype(np.uint8)) for a in x], "label": y.tolist()}, features=feats
        )

    dd = datasets.DatasetDict({"train": split(xtr, ytr), "test": split(xte, yte)})
    folder = tmp_path / "mnist"
    if layout == "save_to_disk":
        dd.save_to_disk(str(folder))
    else:  # the hub snapshot layout: mnist/train-00000-of-00001.parquet
        (folder / "mnist").mkdir(parents=True)
        dd["train"].to_parquet(str(folder / "mnist" / "train-00000-of-00001.parquet"))
        dd["test"].to_parquet(str(folder / "mnist" / "test-00000-of-00001.parquet"))
    d = load_mnist(folder)
    np.testing.assert_allclose(d.x_train, xtr.reshape(12, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(d.y_test, yte)


def test_bad_paths_and_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_mnist(tmp_path / "nope")
    with pytest.raises(ValueError, match="no MNIST found"):
        load_mnist(tmp_path)
    (tmp_path / "x.idx").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "x.idx")
    _write_idx(tmp_path / "t.idx", np.zeros((3, 2, 2)))
    (tmp_path / "t.idx").write_bytes((tmp_path / "t.idx").read_bytes()[:-2])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "t.idx")
    with pytest.raises(ValueError, match="dataset 'mnist' needs a local path"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")
