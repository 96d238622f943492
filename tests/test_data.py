"""Real images: the bundled digits, ImageFolder trees with awkward image modes, and the store a run
prepares of a dataset that is not one yet."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onlinemix.core.config import DataConfig
from onlinemix.data import DataError, load_real_images, split_ids
from onlinemix.data.decode import LabelledImages, load_image_source
from onlinemix.data.store import ImageStore

N_DIGITS = 1797  # documented size of the UCI handwritten digits set
R = 16


# ----------------------------------------------------------------------------- digits


@pytest.mark.parametrize("resolution", [32, 16])
def test_digits_shape_dtype_and_labels(resolution: int) -> None:
    real = load_real_images(DataConfig(resolution=resolution))
    assert len(real) == N_DIGITS
    assert real.images.dtype == torch.uint8
    assert real.images.shape == (N_DIGITS, 3, resolution, resolution)
    assert real.labels.shape == (N_DIGITS,)
    assert real.labels.dtype == torch.int64
    assert set(real.labels.tolist()) == set(range(10))
    assert real.classes == [str(d) for d in range(10)]
    # Grey digits: the three channels are equal, and the images are not blank.
    assert torch.equal(real.images[:, 0], real.images[:, 1])
    assert torch.equal(real.images[:, 0], real.images[:, 2])
    assert real.images.max() > 200 and real.images.min() == 0


def test_digits_split_is_disjoint_covering_and_sized() -> None:
    cfg = DataConfig(holdout_fraction=0.2)
    real = load_real_images(cfg)
    train, hold = set(real.train_ids.tolist()), set(real.holdout_ids.tolist())
    assert train.isdisjoint(hold)
    assert train | hold == set(range(N_DIGITS))
    assert len(train) + len(hold) == N_DIGITS  # no duplicates
    assert abs(len(hold) - 0.2 * N_DIGITS) <= 1


def test_digits_split_is_reproducible() -> None:
    a = load_real_images(DataConfig())
    b = load_real_images(DataConfig())
    assert torch.equal(a.train_ids, b.train_ids)
    assert torch.equal(a.holdout_ids, b.holdout_ids)
    assert torch.equal(a.images, b.images)


def test_split_depends_on_seed() -> None:
    train0, hold0 = split_ids(N_DIGITS, 0.2, seed=0)
    train0b, hold0b = split_ids(N_DIGITS, 0.2, seed=0)
    _, hold1 = split_ids(N_DIGITS, 0.2, seed=1)
    assert torch.equal(hold0, hold0b) and torch.equal(train0, train0b)
    assert not torch.equal(hold0, hold1)


# ----------------------------------------------------------------------------- ImageFolder helpers


def save_grey(path: Path, value: int = 200) -> None:
    Image.fromarray(np.full((20, 20), value, dtype=np.uint8), mode="L").save(path)


def save_rgba(path: Path, rgb: tuple[int, int, int] = (10, 120, 230)) -> None:
    Image.new("RGBA", (24, 24), (*rgb, 255)).save(path)


def save_palette(path: Path, rgb: tuple[int, int, int] = (250, 40, 90)) -> None:
    img = Image.new("RGB", (18, 18), rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert img.mode == "P"
    img.save(path)


def save_16bit(path: Path, array: np.ndarray) -> None:
    img = Image.fromarray(array.astype(np.uint16))
    assert img.mode == "I;16"
    img.save(path)


def save_wide_jpeg(path: Path, rgb: tuple[int, int, int] = (30, 160, 90)) -> None:
    Image.new("RGB", (48, 20), rgb).save(path, quality=95)


def make_tree(root: Path) -> None:
    """cat: grey, RGBA, palette PNGs; dog: a 16-bit PNG and a non-square JPEG."""
    cat, dog = root / "cat", root / "dog"
    cat.mkdir(parents=True)
    dog.mkdir(parents=True)
    save_grey(cat / "a_grey.png")
    save_rgba(cat / "b_rgba.png")
    save_palette(cat / "c_palette.png")
    save_16bit(dog / "a_16bit.png", np.linspace(0, 65535, 22 * 22).reshape(22, 22))
    save_wide_jpeg(dog / "b_wide.jpg")


def assert_colour(image: torch.Tensor, rgb: tuple[int, int, int], tol: int) -> None:
    expected = torch.tensor(rgb, dtype=torch.int16).view(3, 1, 1)
    assert (image.to(torch.int16) - expected).abs().max() <= tol


# ----------------------------------------------------------------------------- ImageFolder


def decode(root: Path) -> LabelledImages:
    """An ImageFolder decoded in memory (what evaluation sets use, and what a store's RAW pixels equal)."""
    return load_image_source(root, R)


def test_image_folder_decodes_every_mode(tmp_path: Path) -> None:
    make_tree(tmp_path)
    real = decode(tmp_path)
    assert real.classes == ["cat", "dog"]
    assert real.images.dtype == torch.uint8
    assert real.images.shape == (5, 3, R, R)
    assert real.labels.tolist() == [0, 0, 0, 1, 1]  # files are read in sorted order per class
    grey, rgba, palette, _, jpeg = real.images
    assert_colour(grey, (200, 200, 200), tol=1)
    assert_colour(rgba, (10, 120, 230), tol=1)
    assert_colour(palette, (250, 40, 90), tol=1)
    assert_colour(jpeg, (30, 160, 90), tol=4)  # JPEG is lossy


def test_image_folder_16bit_keeps_its_dynamic_range(tmp_path: Path) -> None:
    """A full-range 16-bit gradient must not be clipped to white by a naive conversion."""
    make_tree(tmp_path)
    real = decode(tmp_path)
    sixteen = real.images[3].float()
    assert sixteen.min() < 40 and sixteen.max() > 215
    assert 100 < sixteen.mean() < 155


def test_image_folder_16bit_matches_8bit_picture(tmp_path: Path) -> None:
    """The same picture stored as 8-bit and as 16-bit PNG loads to the same pixels.

    16-bit samples span 0..65535, so 8-bit value v is stored as v * 257.
    """
    picture = np.tile(np.linspace(0, 160, 16).round().astype(np.uint8), (16, 1))
    (tmp_path / "eight").mkdir()
    (tmp_path / "sixteen").mkdir()
    Image.fromarray(picture, mode="L").save(tmp_path / "eight" / "p.png")
    save_16bit(tmp_path / "sixteen" / "p.png", picture.astype(np.uint16) * 257)
    real = decode(tmp_path)
    eight, sixteen = real.images.to(torch.int16)
    diff = int((eight - sixteen).abs().max())
    assert diff <= 1, (f"16-bit PNG decoded to different pixels than the 8-bit PNG of the same picture "
                       f"(max difference {diff}): first row 8-bit {eight[0, 0].tolist()}, "
                       f"16-bit {sixteen[0, 0].tolist()}")


def test_non_square_image_is_centre_cropped_not_squashed(tmp_path: Path) -> None:
    """A wide image with a red left third, green middle and blue right third keeps only the middle."""
    (tmp_path / "c").mkdir()
    arr = np.zeros((30, 90, 3), dtype=np.uint8)
    arr[:, :30] = (255, 0, 0)
    arr[:, 30:60] = (0, 255, 0)
    arr[:, 60:] = (0, 0, 255)
    Image.fromarray(arr).save(tmp_path / "c" / "wide.png")
    real = decode(tmp_path)
    img = real.images[0].int()
    assert img.shape == (3, R, R)
    centre = img[:, :, 2:-2]  # away from the bicubic ringing at the colour edges
    assert (centre[1] > 200).all() and (centre[0] < 60).all() and (centre[2] < 60).all()


def test_corrupt_file_is_skipped_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_tree(tmp_path)
    corrupt = tmp_path / "dog" / "x.png"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with caplog.at_level(logging.WARNING, logger="onlinemix.data"):
        real = decode(tmp_path)
    assert real.images.shape == (5, 3, R, R)
    assert real.labels.tolist() == [0, 0, 0, 1, 1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(corrupt) in w for w in warnings), warnings


def test_non_image_files_are_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_tree(tmp_path)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="onlinemix.data"):
        real = decode(tmp_path)
    assert len(real.images) == 5
    assert not any("notes.txt" in r.getMessage() for r in caplog.records)


def test_directory_without_class_folders(tmp_path: Path) -> None:
    save_grey(tmp_path / "loose.png")
    with pytest.raises(DataError, match="class"):
        decode(tmp_path)


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(DataError, match="does not exist") as exc:
        decode(missing)
    assert str(missing) in str(exc.value)


def test_only_corrupt_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "cls").mkdir()
    bad = tmp_path / "cls" / "x.png"
    bad.write_bytes(b"\x00\x01 definitely not a png" * 20)
    with caplog.at_level(logging.WARNING, logger="onlinemix.data"):
        with pytest.raises(DataError, match="no readable images") as exc:
            decode(tmp_path)
    assert str(tmp_path) in str(exc.value)
    assert any(str(bad) in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- a run's store


def test_a_run_prepares_a_store_of_an_image_folder_once_and_reads_it_by_id(tmp_path: Path) -> None:
    make_tree(tmp_path / "tree")
    cfg = DataConfig(dataset=str(tmp_path / "tree"), resolution=R)
    with pytest.raises(DataError, match="not a prepared image store"):
        load_real_images(cfg)  # no place to prepare it: say how to
    real = load_real_images(cfg, tmp_path / "stores")
    assert isinstance(real.images, ImageStore) and real.size == R and real.images.shape == (5, 3, R, R)
    assert real.classes == ["cat", "dog"] and real.labels.tolist() == [0, 0, 0, 1, 1]
    assert torch.equal(real.images[torch.arange(5)], decode(tmp_path / "tree").images)
    assert torch.equal(real.images[3], decode(tmp_path / "tree").images[3])
    stores = list((tmp_path / "stores").iterdir())
    assert len(stores) == 1
    header = (stores[0] / "store.json").stat().st_mtime_ns
    again = load_real_images(cfg, tmp_path / "stores")  # the second run maps the same store, prepares nothing
    assert again.images.root == stores[0] and (stores[0] / "store.json").stat().st_mtime_ns == header
    direct = load_real_images(DataConfig(dataset=str(stores[0]), resolution=R))  # a store given as the dataset
    assert torch.equal(direct.images[torch.arange(5)], real.images[torch.arange(5)])


def test_stored_size_keeps_images_larger_than_the_views(tmp_path: Path) -> None:
    make_tree(tmp_path / "tree")
    real = load_real_images(DataConfig(dataset=str(tmp_path / "tree"), resolution=R, stored_size=2 * R),
                            tmp_path / "stores")
    assert real.size == 2 * R and real.images[0].shape == (3, 2 * R, 2 * R)
    digits = load_real_images(DataConfig(resolution=R, stored_size=2 * R))
    assert digits.size == 2 * R


def test_a_store_smaller_than_the_views_is_refused(tmp_path: Path) -> None:
    make_tree(tmp_path / "tree")
    load_real_images(DataConfig(dataset=str(tmp_path / "tree"), resolution=R), tmp_path / "stores")
    store = next((tmp_path / "stores").iterdir())
    with pytest.raises(DataError, match=f"holds images at {R} px, smaller than the training resolution {2 * R}"):
        load_real_images(DataConfig(dataset=str(store), resolution=2 * R))
