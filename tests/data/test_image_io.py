"""One image reader (mabn_d2.data.image_io) for every Pillow mode: 16-bit and float images
scaled to 8 bits, not clipped to white or black; values without a known scale refused; and
DATASETS.REGISTER_COCO images checked at registration (missing on disk, wrong width)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mabn_d2.data.image_io import ImageReadError, read_image

# ---- the image reader ------------------------------------------------------------------------

def _ramp(dtype, high) -> np.ndarray:
    return np.linspace(0, high, 32 * 48).reshape(32, 48).astype(dtype)


@pytest.mark.parametrize("mode, array, expected_mean", [
    ("I;16", _ramp(np.uint16, 65535), 127.5),
    ("F", _ramp(np.float32, 1.0), 127.5),
    ("F", _ramp(np.float32, 255.0), 127.5),
    ("I", _ramp(np.int32, 65535), 127.5),
    ("I", _ramp(np.int32, 255), 127.5),
])
def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path, mode, array, expected_mean):
    path = tmp_path / ("x.png" if mode == "I;16" else "x.tiff")
    Image.fromarray(array).save(path)
    assert Image.open(path).mode == mode
    bgr = read_image(path)
    assert bgr.dtype == np.uint8 and bgr.shape == (32, 48, 3)
    assert abs(float(bgr.mean()) - expected_mean) < 1.5
    assert bgr.min() == 0 and bgr.max() == 255


@pytest.mark.parametrize("mode", ["1", "L", "P", "LA", "RGBA", "CMYK", "RGB"])
def test_eight_bit_modes_become_rgb(tmp_path, mode):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, :4] = (255, 0, 0)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    Image.fromarray(rgb).convert(mode).save(path)
    out = read_image(path, format="RGB")
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    if mode not in ("1", "L", "LA", "CMYK"):
        assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(read_image(path)[0, 0]) == tuple(out[0, 0][::-1])  # BGR


def test_values_without_a_known_scale_are_refused(tmp_path):
    path = tmp_path / "x.tiff"
    Image.fromarray(_ramp(np.float32, 1000.0) - 500).save(path)
    with pytest.raises(ImageReadError, match="no known scale to 8 bits"):
        read_image(path)
    nan = _ramp(np.float32, 1.0)
    nan[0, 0] = np.nan
    Image.fromarray(nan).save(path)
    with pytest.raises(ImageReadError, match="NaN"):
        read_image(path)


# ---- REGISTER_COCO images --------------------------------------------------------------------

def _user_dataset(tmp_path):
    from mabn_d2.data import ShapesSpec, write_split

    write_split(ShapesSpec(num_images=3, seed=5), tmp_path / "images", tmp_path / "a.json")
    return tmp_path / "a.json", tmp_path / "images"


def _register(name, json_file, image_root):
    from mabn_d2.data import register_coco_from_cfg
    from mabn_d2.engine import get_mabn_cfg

    cfg = get_mabn_cfg()
    cfg.merge_from_list(["DATASETS.REGISTER_COCO", repr([[name, str(json_file),
                                                           str(image_root)]])])
    return register_coco_from_cfg(cfg)


def test_register_coco_refuses_a_missing_image(tmp_path):
    json_file, images = _user_dataset(tmp_path)
    (images / "000002.png").unlink()
    with pytest.raises(ValueError, match="'000002.png': missing on disk"):
        _register(f"missing_{tmp_path.name}", json_file, images)


def test_register_coco_refuses_a_wrong_width(tmp_path):
    json_file, images = _user_dataset(tmp_path)
    coco = json.loads(json_file.read_text())
    coco["images"][0]["width"] += 7
    json_file.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="the JSON says .* the file is"):
        _register(f"width_{tmp_path.name}", json_file, images)
