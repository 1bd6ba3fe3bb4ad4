"""Hostile data (issue 13): every bad input is skipped or refused in one line, memory stays flat.

- ``.npz`` files are checked from their headers before any image is read, and images are read a
  batch at a time: a 656 KB file declaring a 15000×15000 image, or a header declaring terabytes,
  costs nothing.
- File names that are not UTF-8 are skipped (with a printable path in ``skipped.csv``).
- Labels are dense codes 0..K-1 next to the user's own ``source_label``; the class list comes
  with ``identity`` (is code k the user's label k?).
- Symbolic links leading out of the image folder are not followed unless
  ``data.follow_symlinks: true``; loops end.
"""
import os
import struct
import tracemalloc
import zipfile

import numpy as np
import pandas as pd
import pytest
from numpy.lib import format as npy
from PIL import Image

from pipeline.inputs import images
from pipeline.config import DataConfig
from pipeline.inputs.dataset import build_dataset, pixel_loader
from pipeline.errors import UserError

SIZE = (8, 8)
MiB = 1 << 20


def png(path, colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def folder_dataset(root, **data):
    return build_dataset(DataConfig(images=str(root), **data), SIZE, 3, seed=0)


def npz_dataset(path, **data):
    return build_dataset(DataConfig(npz=str(path), **data), SIZE, 3, seed=0)


def peak_allocation(fn):
    """Peak bytes allocated by Python and numpy while ``fn`` runs, and what it returned or raised."""
    tracemalloc.start()
    try:
        try:
            result = fn()
        except UserError as error:
            result = error
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def npz_member(path, shape, dtype=np.uint8, data=b"", level=1):
    """An ``.npz`` whose ``x`` has a hand-written header declaring ``shape``, then ``data``.

    ``data`` may be bytes or an int: that many zero bytes, streamed (never held in memory).
    """
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            header = {"descr": npy.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
            npy.write_array_header_1_0(member, header)
            if isinstance(data, int):
                block = bytes(8 * MiB)
                for start in range(0, data, len(block)):
                    member.write(block[: min(len(block), data - start)])
            else:
                member.write(data)
    return path


# --------------------------------------------------------------------------- npz bombs


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """The issue's file: one 15000×15000×3 black image, 675 MB of pixels in a few MB of zip."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.npz"
    return npz_member(path, (1, 15000, 15000, 3), data=15000 * 15000 * 3)


def test_npz_image_over_the_pixel_limit_is_refused_from_its_header(bomb):
    assert os.path.getsize(bomb) < 4 * MiB
    peak, error = peak_allocation(lambda: npz_dataset(bomb))
    assert isinstance(error, UserError)
    message = str(error)
    assert "\n" not in message
    assert "15000×15000 pixels (225000000 > limit 89478485): possible decompression bomb" in message
    assert peak < 2 * MiB  # before: the whole 675 MB array, read twice (3.1 GB peak RSS)


def test_raising_max_pixels_opens_the_same_file_without_reading_it(bomb):
    peak, data = peak_allocation(lambda: images.open_npz(bomb, max_pixels=15000 * 15000))
    with data:
        assert data.shape == (1, 15000, 15000, 3) and data.y is None
    assert peak < 2 * MiB


def test_header_declaring_terabytes_is_one_line_error(tmp_path):
    path = npz_member(tmp_path / "tib.npz", (30_000_000_000, 10, 10, 1), data=bytes(1000))
    with pytest.raises(UserError, match=r"declares \(30000000000, 10, 10, 1\) uint8 \(2\.7 TiB\) but the "
                                        r"file holds 1000 bytes of data for it: truncated or crafted"):
        npz_dataset(path)


def test_zip_entry_claiming_more_than_deflate_can_hold_is_refused(tmp_path):
    path = npz_member(tmp_path / "claims.npz", (1000, 1000, 1000, 1))
    raw = bytearray(path.read_bytes())
    entry = raw.rindex(b"PK\x01\x02")  # central directory record of x.npy: uncompressed size at +24
    raw[entry + 24:entry + 28] = struct.pack("<L", 0xFFFFFFF0)
    path.write_bytes(raw)
    with pytest.raises(UserError, match=r"claims 4\.0 GiB from .* bytes of compressed data, more than "
                                        r"deflate can produce: crafted \.npz"):
        npz_dataset(path)


@pytest.mark.parametrize("labels, message", [
    ({"y": np.zeros((3, 10))}, r"y must be one integer label per image; got shape \(3, 10\) \(one-hot\?"),
    ({"y": np.zeros(3, dtype=np.complex128)}, r"y must hold integer labels; got dtype complex128"),
    ({"class_names": np.full(1_000_001, "a")}, r"class_names lists 1000001 names of up to 4 bytes; "
                                                r"at most 1000000 names and 64\.0 MiB are read"),
])
def test_labels_are_checked_from_their_header_before_being_read(tmp_path, labels, message):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 4, 4), np.uint8), **labels)
    with pytest.raises(UserError, match=message):
        npz_dataset(tmp_path / "d.npz")


# --------------------------------------------------------------------------- npz read lazily


@pytest.fixture(scope="module")
def float_images(tmp_path_factory):
    """3000 distinct 32×32 float RGB images in [0, 1] (37 MB), one of them holding a NaN."""
    n = 3000
    i = np.arange(n, dtype=np.float32)[:, None, None, None]
    ramp = np.linspace(0, 0.5, 32, dtype=np.float32)[None, None, :, None] * np.float32([1, 0.5, 0.25])
    x = np.broadcast_to((i * 7 % 256) / 510 + ramp, (n, 32, 32, 3)).copy()
    x[:, 0, 0, 0] = i[:, 0, 0, 0] // 256 / 255  # with the colour above, no two images alike
    x[17, 3, 3, 1] = np.nan
    path = tmp_path_factory.mktemp("float") / "x.npz"
    np.savez_compressed(path, x=x, y=np.arange(n) % 5)
    return path


def test_compressed_npz_is_read_in_batches_with_flat_memory(float_images):
    data_cfg = DataConfig(npz=str(float_images))
    x_bytes = 3000 * 32 * 32 * 3 * 4

    def every_batch():
        dataset, skipped, _ = build_dataset(data_cfg, SIZE, 3, seed=0)
        load = pixel_loader(data_cfg, dataset, SIZE, 3)
        return dataset, skipped, [load(np.arange(s, min(s + 64, len(dataset)))) for s in range(0, len(dataset), 64)]

    peak, (dataset, skipped, batches) = peak_allocation(every_batch)
    assert peak < x_bytes / 4  # the scan holds 1 MiB of x at a time, the loader one batch

    assert skipped.to_dict("records") == [{"path": f"{float_images}#17", "reason": "image array contains NaN or Inf"}]
    x = np.load(float_images)["x"]
    kept = dataset["source_index"].to_numpy()
    expected = images.convert_array_batch(x[kept], SIZE, 3, value_range=images.infer_value_range(x))
    np.testing.assert_array_equal(np.concatenate(batches), expected)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed, "fortran"])
def test_images_are_read_by_index_in_any_order(tmp_path, save):
    x = np.random.default_rng(0).integers(0, 256, (50, 6, 5, 3), dtype=np.uint8)
    if save == "fortran":
        np.savez(tmp_path / "x.npz", x=np.asfortranarray(x))
    else:
        save(tmp_path / "x.npz", x=x)
    order = [7, 8, 9, 3, 49, 0, 0, 12, 11]  # runs, jumps back, repeats
    with images.open_npz(tmp_path / "x.npz") as data:
        np.testing.assert_array_equal(data.read(order), x[order])
        np.testing.assert_array_equal(data.read(np.arange(50)), x)
        with pytest.raises(IndexError):
            data.read([50])


# --------------------------------------------------------------------------- labels


def test_npz_labels_become_dense_codes_when_they_are_not_0_to_k(tmp_path):
    y = np.array([3_000_000, 0, 1, 3_000_000, -1])
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 4, 4), np.uint8), y=y)
    dataset, _, classes = npz_dataset(tmp_path / "d.npz")
    assert classes == {"names": ["0", "1", "3000000"], "identity": False}
    assert dataset["label"].tolist() == [2, 0, 1, 2, -1]
    assert dataset["source_label"].tolist() == y.tolist()
    assert dataset["class_name"].tolist() == ["3000000", "0", "1", "3000000", None]


def test_npz_labels_0_to_k_and_named_classes_are_identity(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 4, 4), np.uint8), y=np.array([2, 0, 1]))
    dataset, _, classes = npz_dataset(tmp_path / "d.npz")
    assert classes == {"names": ["0", "1", "2"], "identity": True}
    assert (dataset["label"] == dataset["source_label"]).all()
    # Named classes are all declared, used or not.
    np.savez(tmp_path / "n.npz", x=np.zeros((2, 4, 4), np.uint8), y=np.array([2, 2]),
             class_names=np.array(["cat", "dog", "eel"]))
    dataset, _, classes = npz_dataset(tmp_path / "n.npz")
    assert classes == {"names": ["cat", "dog", "eel"], "identity": True}
    assert dataset["label"].tolist() == [2, 2] and dataset["class_name"].tolist() == ["eel", "eel"]


def test_npz_label_below_minus_one_is_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 4, 4), np.uint8), y=np.array([0, -5]))
    with pytest.raises(UserError, match=r"y has label -5; labels are 0, 1, 2, … \(-1 = unlabelled\)"):
        npz_dataset(tmp_path / "d.npz")


def test_empty_class_folder_is_a_class(tmp_path):
    png(tmp_path / "ant" / "a.png")
    (tmp_path / "bee").mkdir()
    png(tmp_path / "cat" / "c.png")
    dataset, _, classes = folder_dataset(tmp_path)
    assert classes == {"names": ["ant", "bee", "cat"], "identity": True}
    assert dataset["label"].tolist() == dataset["source_label"].tolist() == [0, 2]


# --------------------------------------------------------------------------- file names


def test_file_name_that_is_not_utf8_is_skipped_and_the_tables_stay_writable(tmp_path):
    root = tmp_path / "images"
    png(root / "cat" / "good.png")
    png(root / "cat" / os.fsdecode(b"bad\xff.png"))
    png(root / os.fsdecode(b"d\xe9j\xe0") / "x.png")  # a Latin-1 class folder name
    dataset, skipped, classes = folder_dataset(root)
    assert dataset["path"].tolist() == [str(root / "cat" / "good.png")]
    assert classes["names"] == ["cat", "d\\xe9j\\xe0"]
    assert skipped.to_dict("records") == [
        {"path": str(root / "cat" / "bad\\xff.png"), "reason": "file name is not valid UTF-8"},
        {"path": str(root / "d\\xe9j\\xe0" / "x.png"), "reason": "file name is not valid UTF-8"},
    ]
    dataset.to_parquet(tmp_path / "dataset.parquet")
    skipped.to_csv(tmp_path / "skipped.csv", index=False)
    assert pd.read_csv(tmp_path / "skipped.csv")["path"].tolist() == skipped["path"].tolist()


# --------------------------------------------------------------------------- symlinks


@pytest.fixture
def linked(tmp_path):
    """``images/`` with links leading out of it, to ``outside/``, and links inside it."""
    png(tmp_path / "outside" / "secret.png")
    png(tmp_path / "outside" / "deep" / "private.png")
    root = tmp_path / "images"
    png(root / "ant" / "a.png")
    (root / "ant" / "leak").symlink_to(tmp_path / "outside")                          # a folder
    (root / "ant" / "secret.png").symlink_to(tmp_path / "outside" / "secret.png")     # a file
    (root / "bee").symlink_to(tmp_path / "outside")                                   # a class folder
    png(root / "cat" / "c.png")
    return root


def test_symlinks_out_of_the_folder_are_skipped(linked):
    dataset, skipped, classes = folder_dataset(linked)
    assert classes["names"] == ["ant", "bee", "cat"]  # bee keeps its label: cat is still 2
    assert [os.path.relpath(p, linked) for p in dataset["path"]] == ["ant/a.png", "cat/c.png"]
    assert dataset["label"].tolist() == [0, 2]
    assert skipped.to_dict("records") == [
        {"path": str(linked / p), "reason": "symlink leads outside the image folder"}
        for p in ("ant/leak", "ant/secret.png", "bee")
    ]


def test_follow_symlinks_uses_the_images_outside(linked):
    (linked / "ant" / "leak").unlink()
    (linked / "ant" / "secret.png").unlink()
    (linked.parent / "outside" / "back").symlink_to(linked)  # a loop through the outside
    dataset, skipped, _ = folder_dataset(linked, follow_symlinks=True)
    assert [os.path.relpath(p, linked) for p in dataset["path"]] == [
        "ant/a.png", "bee/deep/private.png", "bee/secret.png", "cat/c.png"]
    assert dataset["label"].tolist() == [0, 1, 1, 2]
    assert skipped.to_dict("records") == [
        {"path": str(linked / "bee" / "back"), "reason": "symlink loop: leads back to a folder it is in"}]


def test_symlink_loops_inside_the_folder_end(tmp_path):
    png(tmp_path / "ant" / "a.png")
    png(tmp_path / ".stash" / "s.png")
    (tmp_path / "ant" / "self").symlink_to(".")
    (tmp_path / "ant" / "up").symlink_to("..")
    (tmp_path / "ant" / "more").symlink_to("../.stash")  # inside the folder: followed
    png(tmp_path / "bee" / "b.png")
    (tmp_path / "bee" / "ants").symlink_to("../ant")     # listed already, at its real place
    dataset, skipped, _ = folder_dataset(tmp_path)
    assert [os.path.relpath(p, tmp_path) for p in dataset["path"]] == ["ant/a.png", "ant/more/s.png", "bee/b.png"]
    assert skipped.to_dict("records") == [
        {"path": str(tmp_path / "ant" / "self"), "reason": "symlink loop: leads back to a folder it is in"},
        {"path": str(tmp_path / "ant" / "up"), "reason": "symlink loop: leads back to a folder it is in"},
        {"path": str(tmp_path / "bee" / "ants"),
         "reason": "symlink to a folder already listed (its images are listed once)"},
    ]


# --------------------------------------------------------------------------- the extract stage


def test_extract_records_the_classes_in_the_manifest(tmp_path):
    import zoo
    from pipeline import load_run
    from pipeline.cli import main

    png(tmp_path / "images" / "a" / "1.png")
    (tmp_path / "images" / "b").mkdir()
    png(tmp_path / "images" / "c" / "2.png")
    zoo.write_config(tmp_path, zoo.save(zoo.sequential(), tmp_path / "m", "keras"), tmp_path / "images",
                     layers=["out"], extract={"batch_size": 2})
    assert main(["run", str(tmp_path / "c.yaml"), "--only", "extract"]) == 0
    run = load_run(tmp_path / "run")
    assert run.manifest["stages"]["extract"]["summary"]["classes"] == {"names": ["a", "b", "c"], "identity": True}
    assert run.dataset[["label", "source_label"]].to_dict("list") == {"label": [0, 2], "source_label": [0, 2]}
