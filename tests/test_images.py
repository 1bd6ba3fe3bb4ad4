"""How user images are found, decoded, converted and sampled (pipeline/inputs/images.py)."""

import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.errors import SkipInput, UserError
from pipeline.inputs.images import (
    convert_array_batch,
    infer_value_range,
    list_classes,
    list_image_folder,
    load_image,
    load_images,
    load_npz,
    scan_images,
    stratified_sample,
)

RED = (255, 0, 0)
GREEN = (0, 255, 0)


def save(image, path, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def solid(path, colour=RED, size=(4, 4), mode="RGB"):
    return save(Image.new(mode, size, colour), path)


def noise(size=(64, 64), seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def skip_reason(path, **kwargs):
    kwargs = {"size": (4, 4), "channels": 3, **kwargs}
    with pytest.raises(SkipInput) as caught:
        load_image(path, **kwargs)
    return caught.value.reason


def png_declaring_size(path, width, height):
    """A tiny PNG whose header claims width×height: a decompression bomb costs nothing to build."""
    buffer = io.BytesIO()
    Image.new("1", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    # IHDR starts after the 8-byte signature: length(4) type(4) width(4) height(4) ... crc(4)
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


# --------------------------------------------------------------------------- bad files


def test_zero_byte_file_is_skipped(tmp_path):
    (tmp_path / "empty.png").touch()
    assert skip_reason(tmp_path / "empty.png") == "empty file (0 bytes)"


def test_text_file_named_png_is_skipped(tmp_path):
    (tmp_path / "notes.png").write_text("not pixels")
    assert skip_reason(tmp_path / "notes.png") == "not a readable image (PIL cannot identify it)"


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_truncated_image_is_skipped(tmp_path, fmt, suffix):
    path = save(noise(), tmp_path / f"cut{suffix}", format=fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert skip_reason(path).startswith("truncated or corrupt image data: ")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_image_over_max_pixels_is_refused_before_decoding(tmp_path):
    path = png_declaring_size(tmp_path / "bomb.png", 5000, 5000)
    reason = skip_reason(path, max_pixels=10_000_000)
    assert reason == "image too large (5000×5000 pixels > limit 10000000): possible decompression bomb"


def test_image_over_pillows_hard_limit_is_refused(tmp_path):
    # Above 2 × Image.MAX_IMAGE_PIXELS Pillow refuses inside Image.open: no width × height.
    path = png_declaring_size(tmp_path / "bomb.png", 20000, 20000)
    reason = skip_reason(path, max_pixels=10_000_000)
    assert reason == "image too large (400000000 pixels > limit 10000000): possible decompression bomb"


def test_default_pixel_limit_is_pillows_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    # Between 1× and 2× Pillow's limit Pillow only warns; we refuse, and stay quiet.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reason = skip_reason(png_declaring_size(tmp_path / "warned.png", 40, 40))
    assert reason == "image too large (40×40 pixels > limit 1000): possible decompression bomb"
    # Beyond 2× Pillow refuses by itself, before the size is visible.
    reason = skip_reason(png_declaring_size(tmp_path / "huge.png", 100, 100))
    assert reason == "image too large (10000 pixels > limit 1000): possible decompression bomb"


def test_broken_symlink_is_skipped(tmp_path):
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    assert skip_reason(tmp_path / "gone.png") == "cannot read file: No such file or directory"


def test_directory_named_like_an_image_is_skipped(tmp_path):
    (tmp_path / "x.png").mkdir()
    assert skip_reason(tmp_path / "x.png") == "cannot read file: Is a directory"


# --------------------------------------------------------------------------- pixel formats


def load_both(path, size=(4, 4)):
    """The image as (grey, rgb) arrays, checking shape and dtype on the way."""
    grey = load_image(path, size, channels=1)
    rgb = load_image(path, size, channels=3)
    assert grey.shape == (*size, 1) and grey.dtype == np.uint8
    assert rgb.shape == (*size, 3) and rgb.dtype == np.uint8
    return grey, rgb


def test_cmyk_jpeg_becomes_rgb_and_grey(tmp_path):
    path = solid(tmp_path / "cmyk.jpg", colour=(0, 255, 255, 0), mode="CMYK")  # pure red ink
    grey, rgb = load_both(path)
    assert np.abs(rgb.astype(int) - RED).max() <= 8
    assert abs(int(grey.mean()) - 76) <= 8  # luma of red: 0.299 × 255


def test_palette_transparency_is_composited_onto_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([*GREEN, *RED])  # index 0: green, the colour hidden under transparency
    image.paste(1, (0, 0, 2, 4))  # left half red
    path = save(image, tmp_path / "p.png", transparency=0)
    grey, rgb = load_both(path)
    assert (rgb[:, :2] == RED).all() and (rgb[:, 2:] == 255).all()
    assert (grey[:, 2:] == 255).all()


def test_rgba_alpha_is_composited_not_dropped(tmp_path):
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)
    pixels[:, :2] = (*GREEN, 0)  # invisible green
    pixels[:, 2:] = (0, 0, 0, 255)  # opaque black
    grey, rgb = load_both(save(Image.fromarray(pixels), tmp_path / "rgba.png"))
    assert (rgb[:, :2] == 255).all() and (rgb[:, 2:] == 0).all()
    assert (grey[:, :2] == 255).all() and (grey[:, 2:] == 0).all()


def test_grey_with_alpha_is_composited(tmp_path):
    pixels = np.array([[[0, 0], [0, 255]]] * 2, dtype=np.uint8)  # black: transparent, opaque
    grey, rgb = load_both(save(Image.fromarray(pixels, "LA"), tmp_path / "la.png"), size=(2, 2))
    assert grey[:, :, 0].tolist() == [[255, 0], [255, 0]]
    assert (rgb[:, 0] == 255).all() and (rgb[:, 1] == 0).all()


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 25700], [65535, 32896]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode == "I;16"
    grey, rgb = load_both(path, size=(2, 2))
    assert grey[:, :, 0].tolist() == [[0, 100], [255, 128]]
    assert (rgb == grey).all()


def test_float_image_in_unit_range_is_scaled(tmp_path):
    values = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)
    grey, _ = load_both(save(Image.fromarray(values), tmp_path / "float.tif"), size=(2, 2))
    assert grey[:, :, 0].tolist() == [[0, 128], [255, 64]]


def test_one_bit_image_becomes_black_and_white(tmp_path):
    image = Image.new("1", (4, 4), 0)
    image.paste(1, (0, 0, 4, 2))  # top half white
    grey, rgb = load_both(save(image, tmp_path / "bits.png"))
    assert (grey[:2] == 255).all() and (grey[2:] == 0).all()
    assert (rgb[:2] == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (4, 2), (0, 0, 0))  # stored 4 wide, 2 tall
    image.putpixel((0, 0), RED)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = save(image, tmp_path / "rotated.png", exif=exif)
    rgb = load_image(path, size=(4, 2), channels=3)  # (height, width) after rotation
    assert tuple(rgb[0, 1]) == RED  # the stored top-left corner is now top-right
    assert rgb[:, :, 0].sum() == 255


def test_resize_takes_height_then_width(tmp_path):
    path = save(noise((30, 20)), tmp_path / "wide.png")
    assert load_image(path, size=(10, 15), channels=3).shape == (10, 15, 3)


def test_first_frame_of_animated_gif(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in (RED, GREEN)]
    path = save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert (load_image(path, (4, 4), 3) == RED).all()


# --------------------------------------------------------------------------- many files


def test_load_images_keeps_order_and_reports_the_bad_one(tmp_path):
    paths = [solid(tmp_path / "a.png", RED), tmp_path / "b.png", solid(tmp_path / "c.png", GREEN)]
    paths[1].touch()
    images, positions, failures = load_images(paths, (4, 4), 3, workers=2)
    assert images.shape == (2, 4, 4, 3)
    assert positions == [0, 2]
    assert failures == [(1, "empty file (0 bytes)")]
    assert (images[0] == RED).all() and (images[1] == GREEN).all()


def test_scan_agrees_with_load_and_counts_progress(tmp_path):
    paths = [solid(tmp_path / f"{i}.png") for i in range(10)]
    paths[3].write_text("oops")
    done = []
    assert scan_images(paths, (4, 4), 1, workers=2, progress=done.append) == (
        [0, 1, 2, 4, 5, 6, 7, 8, 9],
        [(3, "not a readable image (PIL cannot identify it)")],
    )
    assert sum(done) == 10
    assert load_images(paths, (4, 4), 1, workers=2)[1:] == scan_images(paths, (4, 4), 1)


def test_loading_leaves_warning_filters_alone(tmp_path):
    before = list(warnings.filters)
    load_images([solid(tmp_path / "a.png")], (4, 4), 3)
    assert warnings.filters == before


# --------------------------------------------------------------------------- folders


def test_class_subfolders_are_labels(tmp_path):
    solid(tmp_path / "dog" / "puppies" / "b.png")
    solid(tmp_path / "dog" / "a.png")
    solid(tmp_path / "cat" / "z.jpg")
    solid(tmp_path / "cat" / ".hidden.png")
    solid(tmp_path / "cat" / ".cache" / "c.png")
    (tmp_path / "cat" / "notes.txt").write_text("")
    candidates, skipped = list_image_folder(tmp_path)
    rel = [os.path.relpath(p, tmp_path) for p in candidates.path]
    assert rel == ["cat/z.jpg", "dog/a.png", "dog/puppies/b.png"]
    assert candidates.label.tolist() == [0, 1, 1]
    assert candidates.class_name.tolist() == ["cat", "dog", "dog"]
    assert all(os.path.isabs(p) for p in candidates.path)
    assert skipped.to_dict("records") == [
        {"path": str(tmp_path / "cat" / "notes.txt"), "reason": "not an image file (extension .txt)"}
    ]


def test_empty_class_folder_still_takes_a_label(tmp_path):
    (tmp_path / "a_empty").mkdir()
    solid(tmp_path / "b" / "x.png")
    assert list_classes(tmp_path) == ["a_empty", "b"]
    assert list_image_folder(tmp_path)[0].label.tolist() == [1]


def test_flat_folder_is_unlabelled(tmp_path):
    solid(tmp_path / "2.png")
    solid(tmp_path / "1.png")
    candidates, skipped = list_image_folder(tmp_path)
    assert [os.path.basename(p) for p in candidates.path] == ["1.png", "2.png"]
    assert candidates.label.tolist() == [-1, -1]
    assert candidates.class_name.isna().all()
    assert list(skipped.columns) == ["path", "reason"] and skipped.empty


def test_top_level_files_beside_class_folders_are_unlabelled(tmp_path):
    solid(tmp_path / "loose.png")
    solid(tmp_path / "cat" / "a.png")
    candidates, _ = list_image_folder(tmp_path)
    assert candidates.label.tolist() == [-1, 0]
    assert candidates.class_name.tolist() == [None, "cat"]


def test_broken_symlink_is_listed_so_it_can_be_reported(tmp_path):
    solid(tmp_path / "a.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "missing.png")
    assert len(list_image_folder(tmp_path)[0]) == 2


def test_folder_without_images_is_a_user_error(tmp_path):
    (tmp_path / "readme.txt").write_text("")
    with pytest.raises(UserError, match=r"no image files in .*; found 1 other file"):
        list_image_folder(tmp_path)


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="image folder not found: .*nowhere"):
        list_image_folder(tmp_path / "nowhere")
    with pytest.raises(UserError, match="not a folder"):
        list_image_folder(solid(tmp_path / "a.png"))


# --------------------------------------------------------------------------- sampling


def test_sample_keeps_class_proportions():
    labels = np.array([0] * 80 + [1] * 15 + [2] * 5)
    chosen = stratified_sample(labels, 20, seed=0)
    assert np.bincount(labels[chosen]).tolist() == [16, 3, 1]
    assert (np.diff(chosen) > 0).all()  # sorted, no repeats


def test_sample_keeps_every_class():
    labels = np.array([0] * 97 + [1] * 2 + [2] * 1)
    chosen = stratified_sample(labels, 3, seed=0)
    assert np.bincount(labels[chosen]).tolist() == [1, 1, 1]


def test_sample_depends_only_on_the_seed():
    labels = np.repeat(np.arange(4), 25)
    assert (stratified_sample(labels, 10, seed=1) == stratified_sample(labels, 10, seed=1)).all()
    assert not (stratified_sample(labels, 10, seed=1) == stratified_sample(labels, 10, seed=2)).all()


def test_sample_without_limit_or_labels():
    assert stratified_sample([0, 1, 1], None, seed=0).tolist() == [0, 1, 2]
    assert stratified_sample([0, 1, 1], 5, seed=0).tolist() == [0, 1, 2]
    chosen = stratified_sample(np.full(50, -1), 7, seed=0)
    assert len(set(chosen)) == 7 and chosen.max() < 50


# --------------------------------------------------------------------------- npz


def npz(tmp_path, **arrays):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def test_npz_round_trip(tmp_path):
    x = np.zeros((3, 5, 5), dtype=np.uint8)
    path = npz(tmp_path, x=x, y=np.array([0, 1, 1]), class_names=np.array(["cat", "dog"]))
    got_x, y, names = load_npz(path)
    assert got_x.shape == (3, 5, 5) and y.tolist() == [0, 1, 1] and names == ["cat", "dog"]
    assert load_npz(npz(tmp_path, x=x))[1:] == (None, None)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((2, 4, 4))}, r"no array named 'x' \(found: images\)"),
        ({"x": np.array([1, "a"], dtype=object)}, r"array 'x' holds Python objects"),
        ({"x": np.zeros((4, 4))}, r"x must have shape \(N, H, W\) or \(N, H, W, C\).*got \(4, 4\)"),
        ({"x": np.zeros((2, 4, 4, 2))}, r"C in 1, 3, 4; got \(2, 4, 4, 2\)"),
        ({"x": np.zeros((2, 4, 4)), "y": np.array([0, 1, 2])}, r"y has 3 labels but x has 2 images"),
    ],
)
def test_npz_problems_are_one_line_user_errors(tmp_path, arrays, message):
    with pytest.raises(UserError, match=message):
        load_npz(npz(tmp_path, **arrays))


def test_npz_that_is_not_one(tmp_path):
    with pytest.raises(UserError, match="npz file not found"):
        load_npz(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(UserError, match=r"not a valid \.npz file"):
        load_npz(tmp_path / "text.npz")


def test_array_images_go_through_the_same_conversions():
    rgba = np.zeros((1, 2, 2, 4), dtype=np.uint8)
    rgba[0, :, 1, 3] = 255  # left column transparent, right column opaque black
    assert convert_array_batch(rgba, (2, 2), 1)[0, :, :, 0].tolist() == [[255, 0], [255, 0]]
    unit_floats = np.array([[[0.0, 0.5], [1.0, 0.25]]], dtype=np.float32)
    assert convert_array_batch(unit_floats, (2, 2), 1)[0, :, :, 0].tolist() == [[0, 128], [255, 64]]
    byte_floats = unit_floats * 255
    as_bytes = convert_array_batch(byte_floats, (2, 2), 3)
    assert (as_bytes == convert_array_batch(unit_floats, (2, 2), 3)).all()
    assert convert_array_batch(np.zeros((5, 28, 28, 1)), (8, 6), 3).shape == (5, 8, 6, 3)


def test_value_range_is_inferred_once_for_the_whole_array():
    assert infer_value_range(np.array([0.0, 0.2, np.nan])) == 1.0  # NaN: the caller skips it
    assert infer_value_range(np.array([0.0, 0.2, 200.0])) == 255.0
    assert infer_value_range(np.array([0, 200], dtype=np.int64)) == 255.0
    assert infer_value_range(np.array([0, 4000], dtype=np.uint16)) == 65535.0
    dark_batch = np.full((1, 2, 2), 0.8, dtype=np.float32)  # 0.8 of 255, not 80 %
    assert convert_array_batch(dark_batch, (2, 2), 1, value_range=255.0).max() == 1


def test_negative_array_values_are_refused():
    with pytest.raises(UserError, match=r"negative values \(min -1\)"):
        convert_array_batch(np.full((1, 2, 2), -1.0), (2, 2), 1)
