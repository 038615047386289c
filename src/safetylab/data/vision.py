"""Small vision datasets that need no download, and real MNIST from local files.

* :func:`load_digits` — scikit-learn's 8×8 digits (1,797 images, bundled with sklearn).
* :func:`make_mnist1d` — MNIST-1D generated locally, following the recipe of
  Greydanus & Kobak (2020), "Scaling down deep learning with MNIST-1D": ten 1-D
  templates, zero padding, random scaling, shear, circular translation,
  correlated + i.i.d. noise, resampled to a fixed length. Our templates and code
  are our own; the transformation parameters are the paper's defaults.
* :func:`load_mnist` — MNIST from a local path: the four IDX files (optionally
  ``.gz``), a ``.npz`` with ``x_train/y_train/x_test/y_test`` (Keras layout), or a
  Hugging Face dataset folder (``save_to_disk`` output or a hub snapshot with
  parquet files). Never touches the network.

All loaders return a :class:`VisionData` with float32 features in [0, 1]
(MNIST-1D: standardised signals) and int64 labels.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["VisionData", "load_digits", "load_mnist", "make_mnist1d", "read_idx"]


@dataclass(frozen=True)
class VisionData:
    """A train/test split of a classification dataset."""

    name: str
    x_train: np.ndarray
    """``(n_train, n_features)`` float32."""
    y_train: np.ndarray
    """``(n_train,)`` int64 labels in ``0..n_classes-1``."""
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    def subsample_train(self, n: int, rng: np.random.Generator) -> "VisionData":
        """A copy keeping ``n`` random training examples (all if ``n`` ≥ the size)."""
        if n >= len(self.y_train):
            return self
        idx = np.sort(rng.choice(len(self.y_train), size=n, replace=False))
        return VisionData(self.name, self.x_train[idx], self.y_train[idx], self.x_test, self.y_test, self.n_classes)


def _split(name: str, x: np.ndarray, y: np.ndarray, test_fraction: float, rng: np.random.Generator) -> VisionData:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1), e.g. 0.25")
    perm = rng.permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    return VisionData(name, x[tr], y[tr], x[te], y[te], int(y.max()) + 1)


def load_digits(*, test_fraction: float = 0.25, rng: np.random.Generator | None = None) -> VisionData:
    """scikit-learn's 8×8 handwritten digits, pixels scaled to [0, 1], a random split.

    Args:
        test_fraction: share of the 1,797 images held out for testing.
        rng: generator for the split (default: seed 0, so the split is fixed).
    """
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x = (bunch.data / 16.0).astype(np.float32)  # (1797, 64), pixel values 0..16
    y = bunch.target.astype(np.int64)
    return _split("digits", x, y, test_fraction, rng if rng is not None else np.random.default_rng(0))


# --------------------------------------------------------------------------- MNIST-1D

_TEMPLATE_LEN = 12


def _templates() -> np.ndarray:
    """Ten hand-designed 12-point 1-D patterns, one per class (our own shapes)."""
    t = np.linspace(0.0, 1.0, _TEMPLATE_LEN)
    pats = [
        np.sin(np.pi * t) * 1.5,  # 0: one hump
        np.where(t < 0.5, 0.0, 2.0) - 0.5,  # 1: a step up
        np.sin(2 * np.pi * t),  # 2: up then down
        -np.sin(2 * np.pi * t),  # 3: down then up
        2.0 * t - 1.0,  # 4: ramp up
        1.0 - 2.0 * t,  # 5: ramp down
        np.sin(3 * np.pi * t),  # 6: three lobes
        np.abs(np.sin(2 * np.pi * t)) * 1.5 - 0.5,  # 7: two humps
        np.where((t > 0.3) & (t < 0.7), -1.5, 0.5),  # 8: a notch
        np.cos(4 * np.pi * t) * t * 1.5,  # 9: growing oscillation
    ]
    out = np.stack(pats)
    return out - out.mean(axis=1, keepdims=True)  # (10, 12)


def _resample(signal: np.ndarray, length: int) -> np.ndarray:
    old = np.linspace(0.0, 1.0, signal.shape[-1])
    new = np.linspace(0.0, 1.0, length)
    return np.interp(new, old, signal)


def make_mnist1d(
    n_samples: int = 5000,
    *,
    rng: np.random.Generator | None = None,
    test_fraction: float = 0.2,
    padding: tuple[int, int] = (36, 60),
    scale_coeff: float = 0.4,
    max_translation: int = 48,
    corr_noise_scale: float = 0.25,
    iid_noise_scale: float = 2e-2,
    shear_scale: float = 0.75,
    final_seq_length: int = 40,
) -> VisionData:
    """Generate MNIST-1D locally (Greydanus & Kobak 2020, Sec. 2; their default parameters).

    Recipe per sample: take the class template (length 12); zero-pad to a random
    total length in ``padding`` with the template at a random offset; stretch by a
    random factor ``1 ± scale_coeff``; add a linear shear of slope up to
    ``shear_scale``; circularly translate by up to ``max_translation`` positions;
    add Gaussian noise smoothed over neighbouring positions (correlated) and i.i.d.
    noise; resample to ``final_seq_length`` points. The classes are balanced.

    Args:
        n_samples: total number of sequences, ≥ 20.
        rng: generator (default seed 0).
        test_fraction: share held out for testing.

    Returns:
        :class:`VisionData` with ``(n, final_seq_length)`` float32 signals.
    """
    if n_samples < 20:
        raise ValueError(f"n_samples={n_samples} must be >= 20 (at least two per class)")
    if not (0 < padding[0] <= padding[1]):
        raise ValueError(f"padding={padding} must be (low, high) with 0 < low <= high")
    rng = rng if rng is not None else np.random.default_rng(0)
    templates = _templates()
    y = np.arange(n_samples) % 10
    rng.shuffle(y)
    work_len = 80  # intermediate resolution before the final resampling
    xs = np.empty((n_samples, final_seq_length))
    smooth = np.array([0.25, 0.5, 0.25])
    for i, label in enumerate(y):
        pad_total = int(rng.integers(padding[0], padding[1] + 1))
        left = int(rng.integers(0, pad_total + 1))
        seq = np.concatenate([np.zeros(left), templates[label], np.zeros(pad_total - left)])
        stretch = 1.0 + scale_coeff * rng.uniform(-1.0, 1.0)
        seq = _resample(seq, max(_TEMPLATE_LEN, int(round(len(seq) * stretch))))
        seq = _resample(seq, work_len)
        seq = seq + shear_scale * rng.uniform(-1.0, 1.0) * np.linspace(-0.5, 0.5, work_len)
        seq = np.roll(seq, int(rng.integers(-max_translation, max_translation + 1)) * work_len // 80)
        corr = np.convolve(rng.normal(size=work_len + 2), smooth, mode="valid")  # (work_len,)
        seq = seq + corr_noise_scale * corr
        seq = _resample(seq, final_seq_length) + iid_noise_scale * rng.normal(size=final_seq_length)
        xs[i] = seq
    xs = (xs - xs.mean()) / xs.std()
    return _split("mnist1d", xs.astype(np.float32), y.astype(np.int64), test_fraction, rng)


# --------------------------------------------------------------------------- real MNIST

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (LeCun's MNIST format), optionally gzip-compressed.

    Format: two zero bytes, a type byte, a dimension count, then big-endian
    32-bit sizes and the data.

    Raises:
        ValueError: if the file is not IDX or is truncated.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number); pass the MNIST idx3/idx1 files")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    need = int(np.prod(shape)) * dtype.itemsize
    data = raw[4 + 4 * ndim :]
    if len(data) != need:
        raise ValueError(f"{path}: header says shape {shape} ({need} bytes) but file has {len(data)} data bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for cand in (stem, stem.replace("-idx", ".idx"), stem + ".gz", stem.replace("-idx", ".idx") + ".gz"):
        p = folder / cand
        if p.exists():
            return p
    return None


def _finish(name: str, xtr, ytr, xte, yte) -> VisionData:
    def prep(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x).reshape(len(x), -1).astype(np.float32)
        return x / 255.0 if x.max() > 1.0 else x

    ytr, yte = np.asarray(ytr, dtype=np.int64).ravel(), np.asarray(yte, dtype=np.int64).ravel()
    if len(ytr) != len(xtr) or len(yte) != len(xte):
        raise ValueError(f"{name}: image and label counts differ ({len(xtr)} vs {len(ytr)} train, {len(xte)} vs {len(yte)} test)")
    return VisionData(name, prep(xtr), ytr, prep(xte), yte, int(max(ytr.max(), yte.max())) + 1)


def _load_hf_folder(folder: Path) -> VisionData:
    try:
        import datasets as hfd
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ValueError(
            f"{folder} looks like a Hugging Face dataset folder, which needs the 'datasets' package. "
            "Install with: pip install datasets"
        ) from exc
    if (folder / "dataset_dict.json").exists():
        dd = hfd.load_from_disk(str(folder))
    else:
        files = sorted(folder.rglob("*.parquet"))
        splits = {s: [str(f) for f in files if f.name.startswith(s) or f.parent.name == s] for s in ("train", "test")}
        if not splits["train"] or not splits["test"]:
            raise ValueError(
                f"{folder}: found no train*/test* parquet files and no dataset_dict.json; pass a folder "
                "saved with DatasetDict.save_to_disk or a hub snapshot of an MNIST dataset"
            )
        import pyarrow as pa
        import pyarrow.parquet as pq

        # read shards in memory: Dataset.from_parquet would write a cache under ~/.cache
        dd = {s: hfd.Dataset(pa.concat_tables([pq.read_table(f) for f in fs])) for s, fs in splits.items()}
    if "train" not in dd or "test" not in dd:
        raise ValueError(f"{folder}: dataset needs 'train' and 'test' splits, has {list(dd)}")

    def arrays(split) -> tuple[np.ndarray, np.ndarray]:
        cols = split.column_names
        img_col = "image" if "image" in cols else ("img" if "img" in cols else None)
        if img_col is None or "label" not in cols:
            raise ValueError(f"{folder}: need columns 'image' (or 'img') and 'label', found {cols}")
        split = split.cast_column(img_col, hfd.Image()) if not isinstance(split.features[img_col], hfd.Image) else split
        imgs = np.stack([np.asarray(im, dtype=np.float32) for im in split[img_col]])
        return imgs, np.asarray(split["label"])

    xtr, ytr = arrays(dd["train"])
    xte, yte = arrays(dd["test"])
    return _finish("mnist", xtr, ytr, xte, yte)


def load_mnist(path: str | Path) -> VisionData:
    """MNIST (or any MNIST-format dataset) from a local path; no network.

    Accepts: a ``.npz`` file with ``x_train, y_train, x_test, y_test`` (Keras
    ``mnist.npz``); a folder with the four IDX files (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
    each optionally ``.gz``); or a Hugging Face dataset folder (``save_to_disk``
    output, or a snapshot with ``train*/test*`` parquet files) with ``image`` and
    ``label`` columns. Images are flattened and scaled to [0, 1].

    Raises:
        ValueError: naming the path and what was expected, if nothing loadable is found.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"mnist path {p} does not exist; pass a .npz file, an IDX folder or a Hugging Face dataset folder")
    if p.is_file():
        if p.suffix != ".npz":
            raise ValueError(f"{p}: a file path must be a .npz with x_train/y_train/x_test/y_test; for IDX files pass their folder")
        with np.load(p, allow_pickle=False) as z:  # no pickle: user files are untrusted
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise ValueError(f"{p} lacks arrays {missing}; it has {z.files}")
            return _finish("mnist", z["x_train"], z["y_train"], z["x_test"], z["y_test"])
    idx = [_find(p, s) for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    if all(f is not None for f in idx):
        return _finish("mnist", *(read_idx(f) for f in idx))  # type: ignore[arg-type]
    if (p / "dataset_dict.json").exists() or any(p.rglob("*.parquet")):
        return _load_hf_folder(p)
    raise ValueError(
        f"{p}: no MNIST found. Expected the four IDX files (train-images-idx3-ubyte[.gz], ...), "
        "a Hugging Face dataset folder, or pass the path of a .npz file"
    )
