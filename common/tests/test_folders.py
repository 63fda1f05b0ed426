"""Image folders with unreadable files: skipped with one warning naming them, or one strict error."""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data import load_dataset
from common.data.folders import BadImageError, load_image_folder


def _png_bytes(seed: int) -> bytes:
    rgb = np.random.RandomState(seed).randint(0, 256, size=(6, 5, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _folder_with_bad_files(root: Path) -> list[str]:
    """train/cat: 2 good PNGs, a corrupt PNG, a text file named .jpg; train/dog: 1 good, 1 truncated PNG."""
    (root / "train" / "cat").mkdir(parents=True)
    (root / "train" / "dog").mkdir(parents=True)
    (root / "test" / "dog").mkdir(parents=True)
    (root / "train" / "cat" / "a.png").write_bytes(_png_bytes(0))
    (root / "train" / "cat" / "b.png").write_bytes(_png_bytes(1))
    (root / "train" / "cat" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    (root / "train" / "cat" / "notes.jpg").write_text("this is text, not a JPEG")
    (root / "train" / "dog" / "c.png").write_bytes(_png_bytes(2))
    (root / "train" / "dog" / "truncated.png").write_bytes(_png_bytes(3)[:-40])
    (root / "test" / "dog" / "t.png").write_bytes(_png_bytes(4))
    return ["corrupt.png", "notes.jpg", "truncated.png"]


def _assert_names(text: str, names: list[str]) -> None:
    for name in names:
        assert name in text, (name, text)


def test_bad_files_are_skipped_with_one_warning_naming_and_counting_them(tmp_path: Path) -> None:
    bad = _folder_with_bad_files(tmp_path / "user")
    with pytest.warns(UserWarning, match="skipped 3 of 6 image files") as caught:
        images, classes = load_image_folder(tmp_path / "user" / "train", cache_dir=None)
    _assert_names(str(caught[0].message), bad)
    assert classes == ["cat", "dog"]
    assert len(images) == 3 and images.labels.tolist() == [0, 0, 1]  # labels follow the kept files
    good = np.asarray(Image.open(io.BytesIO(_png_bytes(2))).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(images.images[2].numpy(), good)


def test_a_cached_folder_repeats_the_warning_and_keeps_labels(tmp_path: Path) -> None:
    bad = _folder_with_bad_files(tmp_path / "user")
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning):
        first = load_dataset(f"imagefolder:{tmp_path / 'user'}", val_fraction=0, cache_dir=cache)
    with pytest.warns(UserWarning, match="skipped 3 of 6") as caught:
        again = load_dataset(f"imagefolder:{tmp_path / 'user'}", val_fraction=0, cache_dir=cache)
    _assert_names(str(caught[0].message), bad)
    # load_dataset deals the split class-interleaved; the kept files are still two cats and one dog
    assert again.train.labels.tolist() == first.train.labels.tolist()
    assert sorted(again.train.labels.tolist()) == [0, 0, 1]
    assert np.array_equal(again.train.images.numpy(), first.train.images.numpy())


def test_strict_mode_is_one_error_naming_every_bad_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = _folder_with_bad_files(tmp_path / "user")
    with pytest.raises(BadImageError, match="3 of 6 image files cannot be decoded") as info:
        load_image_folder(tmp_path / "user" / "train", cache_dir=None, strict=True)
    _assert_names(str(info.value), bad)
    monkeypatch.setenv("ICNN_STRICT_IMAGES", "1")  # the switch for callers that go through load_dataset
    with pytest.raises(BadImageError) as info:
        load_dataset(f"imagefolder:{tmp_path / 'user'}", val_fraction=0, cache_dir=tmp_path / "cache")
    _assert_names(str(info.value), bad)


def test_a_folder_of_good_files_warns_nothing(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.png").write_bytes(_png_bytes(5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images, _ = load_image_folder(tmp_path / "train", cache_dir=tmp_path / "cache")
    assert len(images) == 1


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_cache_files_get_the_same_mode_as_run_files(tmp_path: Path, umask: int) -> None:
    from common.run import atomic_write_json

    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.png").write_bytes(_png_bytes(6))
    old = os.umask(umask)
    try:
        load_image_folder(tmp_path / "train", cache_dir=tmp_path / "cache")
        atomic_write_json({"a": 1}, tmp_path / "run" / "metrics.json")
    finally:
        os.umask(old)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "cache").iterdir()}
    assert modes == {stat.S_IMODE((tmp_path / "run" / "metrics.json").stat().st_mode)} == {0o666 & ~umask}


def test_an_odd_sized_file_is_skipped_like_a_bad_one_and_mixed_sizes_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "train" / "a" / f"{i}.png").write_bytes(_png_bytes(i))  # 5x6 pixels
    Image.new("RGB", (9, 7)).save(tmp_path / "train" / "a" / "0-odd.png")  # sorts first
    with pytest.warns(UserWarning, match=r"skipped 1 of 4 .*0-odd.png \(is 9x7 pixels; the folder's images are 5x6"):
        images, _ = load_image_folder(tmp_path / "train", cache_dir=None)
    assert len(images) == 3 and tuple(images.images.shape[2:]) == (6, 5)
    with pytest.raises(BadImageError, match=r"0-odd\.png"):
        load_image_folder(tmp_path / "train", cache_dir=None, strict=True)
    for i in range(3, 5):  # now 3 files of each size
        Image.new("RGB", (9, 7)).save(tmp_path / "train" / "a" / f"{i}-odd.png")
    with pytest.raises(ValueError, match="of 2 sizes and none is the majority"):
        load_image_folder(tmp_path / "train", cache_dir=None)


def test_cache_dir_none_means_the_default_cache_in_load_dataset_and_no_cache_in_load_image_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for split in ("train", "test"):
        for i, name in enumerate(("a", "b")):
            (tmp_path / "user" / split / name).mkdir(parents=True)
            (tmp_path / "user" / split / name / "x.png").write_bytes(_png_bytes(7 + i))
    monkeypatch.setenv("ICNN_CACHE", str(tmp_path / "default-cache"))
    load_image_folder(tmp_path / "user" / "train", cache_dir=None)
    assert not (tmp_path / "default-cache").exists()  # None here: decode without caching
    load_dataset(f"imagefolder:{tmp_path / 'user'}", val_fraction=0, cache_dir=None)
    assert len(list((tmp_path / "default-cache").glob("*.images.npy"))) == 2  # None there: $ICNN_CACHE


# --- the cache follows the content; classes a classifier can learn; printable names (issue 26) -------------


def _two_class_folder(root: Path) -> None:
    for split in ("train", "test"):
        for k, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                (root / split / name / f"{i}.png").write_bytes(_png_bytes(10 * k + i))


def test_a_file_swapped_between_classes_rebuilds_the_cache(tmp_path: Path) -> None:
    """Same names, counts and byte totals in each class: only the contents say that cat/0 and dog/0 swapped."""
    root, cache = tmp_path / "user", tmp_path / "cache"
    _two_class_folder(root)
    before, _ = load_image_folder(root / "train", cache_dir=cache)
    cat, dog = root / "train" / "cat" / "0.png", root / "train" / "dog" / "0.png"
    cat_bytes, dog_bytes = cat.read_bytes(), dog.read_bytes()
    assert len(cat_bytes) == len(dog_bytes)  # the sizes match too: only the bytes differ
    stats = cat.stat(), dog.stat()
    cat.write_bytes(dog_bytes)
    dog.write_bytes(cat_bytes)
    os.utime(cat, ns=(stats[0].st_atime_ns, stats[0].st_mtime_ns))  # even the modification times stay
    os.utime(dog, ns=(stats[1].st_atime_ns, stats[1].st_mtime_ns))
    after, _ = load_image_folder(root / "train", cache_dir=cache)
    assert after.labels.tolist() == before.labels.tolist() == [0, 0, 1, 1]
    assert np.array_equal(after.images[0].numpy(), before.images[2].numpy())  # cat/0 now holds dog/0's pixels
    assert np.array_equal(after.images[2].numpy(), before.images[0].numpy())
    assert len(list(cache.glob("*.json"))) == 2  # a second entry, keyed by the new content
    again, _ = load_image_folder(root / "train", cache_dir=cache)  # and served from it afterwards
    assert np.array_equal(again.images.numpy(), after.images.numpy())


def test_one_class_or_an_empty_class_is_one_clear_error(tmp_path: Path) -> None:
    one = tmp_path / "one"
    for split in ("train", "test"):
        (one / split / "cat").mkdir(parents=True)
        (one / split / "cat" / "a.png").write_bytes(_png_bytes(0))
    with pytest.raises(ValueError, match=r"holds 1 class folder \(cat\); a classifier needs at least 2"):
        load_dataset(f"imagefolder:{one}", val_fraction=0, cache_dir=None)
    empty = tmp_path / "empty"
    _two_class_folder(empty)
    (empty / "train" / "bird").mkdir()
    (empty / "train" / "bird" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"class folder\(s\) bird hold no readable training image") as info:
        load_dataset(f"imagefolder:{empty}", val_fraction=0, cache_dir=None)
    assert "\n" not in str(info.value)


def test_non_utf8_class_names_are_shown_with_replacement_characters(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = tmp_path / "user"
    _two_class_folder(root)
    latin1 = os.fsdecode(b"caf\xe9")  # a Latin-1 name: not UTF-8
    for split in ("train", "test"):
        try:
            (root / split / "cat").rename(root / split / latin1)
        except (OSError, UnicodeEncodeError):
            pytest.skip("this file system does not take non-UTF-8 names")
    data = load_dataset(f"imagefolder:{root}", val_fraction=0, cache_dir=tmp_path / "cache")
    assert data.classes == ["caf\ufffd", "dog"]
    for name in data.classes:
        name.encode("utf-8")  # printable, JSON- and figure-safe
    fig, ax = plt.subplots()
    ax.set_title(f"label: {data.classes[0]}")
    fig.savefig(tmp_path / "figure.png")
    plt.close(fig)
