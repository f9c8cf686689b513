"""tools/predict.py and tools/plot_training_curves.py: pictures and detections of a trained
model, as a user runs them, and their errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from PIL import Image

from mabn_d2.engine import get_mabn_cfg

from helpers import CONFIGS, REPO, TINY, import_script

plot_training_curves = import_script("tools/plot_training_curves.py")
predict = import_script("tools/predict.py")

# Two coco_mini val images of different sizes (640x427 and 333x500).
IMAGES = ("000000397133.jpg", "000000011813.jpg")
HEADER = re.compile(r"^(.+) \((\d+)x(\d+)\): (\d+) detections with score >= ")
LINE = re.compile(r"^  (.+) (\d+\.\d+) \[(-?[\d.]+), (-?[\d.]+), (-?[\d.]+), (-?[\d.]+)\]$")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """The tiny MABN Mask R-CNN trained 2 iterations by tools/train_net.py (no evaluation)."""
    from helpers import require_coco_mini

    coco = require_coco_mini()
    out = tmp_path_factory.mktemp("tiny_run")
    env = {**os.environ, "DETECTRON2_DATASETS": str(coco), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(TINY),
         "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out / "model_final.pth"


def val_images() -> list[Path]:
    from helpers import require_coco_mini

    root = require_coco_mini() / "coco" / "val2017"
    paths = [root / name for name in IMAGES]
    sizes = {Image.open(p).size for p in paths}
    assert len(sizes) == 2, sizes  # the test needs two sizes
    return paths


def parse_printed(text: str) -> dict[str, list[tuple[str, float, list[float]]]]:
    """``{image path: [(label, score, box)]}`` from the tool's printed detections."""
    found: dict[str, list] = {}
    current = None
    for line in text.splitlines():
        if header := HEADER.match(line):
            current = header.group(1)
            found[current] = []
        elif (match := LINE.match(line)) and current is not None:
            label, score, *box = match.groups()
            found[current].append((label, float(score), [float(v) for v in box]))
    return found


def own_outputs(weights: Path, image_path: Path, threshold: float):
    """The model's own detections on one image, without the tool: build_model, the
    checkpointer, detectron2's test-time resize, model.inference."""
    cfg = get_mabn_cfg()
    cfg.merge_from_file(str(TINY))
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(str(weights))
    image = read_image(str(image_path), format="BGR")
    height, width = image.shape[:2]
    resized = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST
                                   ).get_transform(image).apply_image(image)
    tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
    with torch.no_grad():
        instances = model([{"image": tensor, "height": height, "width": width}])[0]["instances"]
    keep = instances[instances.scores >= threshold]
    order = torch.argsort(keep.scores, descending=True)
    return keep.scores[order].tolist(), keep.pred_boxes.tensor[order].tolist()


@pytest.mark.e2e  # tiny_weights: a training run of tools/train_net.py
def test_pictures_have_the_inputs_size_and_printed_detections_are_the_models(
        tiny_weights, tmp_path, capsys):
    images = val_images()
    out = tmp_path / "pictures"
    code = predict.main(["--config-file", str(TINY), "--input", *map(str, images),
                         "--output", str(out), "--confidence-threshold", "0",
                         "--opts", "MODEL.WEIGHTS", str(tiny_weights)])
    assert code == 0
    printed = parse_printed(capsys.readouterr().out)
    assert set(printed) == {str(p) for p in images}
    for path in images:
        picture = Image.open(out / f"{path.stem}.png")
        assert picture.size == Image.open(path).size
        pixels = np.asarray(picture.convert("RGB")).astype(int)
        original = read_image(str(path), format="RGB").astype(int)
        assert np.abs(pixels - original).mean() > 0.5  # something was drawn
        scores, boxes = own_outputs(tiny_weights, path, 0.0)
        assert len(printed[str(path)]) == len(scores) > 0
        for (_, score, box), want_score, want_box in zip(printed[str(path)], scores, boxes):
            assert score == pytest.approx(want_score, abs=1e-4)
            assert box == pytest.approx(want_box, abs=1e-2)


@pytest.mark.e2e  # tiny_weights: a training run of tools/train_net.py
def test_without_output_it_prints_the_same_detections_and_fused_agrees(tiny_weights, capsys,
                                                                        tmp_path):
    image = str(val_images()[0])
    run_dir = tmp_path / "a_training_run"
    args = ["--config-file", str(TINY), "--input", image, "--confidence-threshold", "0",
            "--opts", "MODEL.WEIGHTS", str(tiny_weights), "OUTPUT_DIR", str(run_dir)]
    assert predict.main(args) == 0
    captured = capsys.readouterr()
    plain = parse_printed(captured.out)[image]
    # stdout holds the detections only (log lines go to stderr), and a prediction writes
    # nothing into the config's OUTPUT_DIR (a training run's log.txt)
    assert all(line.startswith((image, "  ")) for line in captured.out.splitlines()), captured.out
    assert "mabn_d2" in captured.err and not run_dir.exists()
    assert predict.main(["--fuse", *args]) == 0
    fused = parse_printed(capsys.readouterr().out)[image]
    assert len(fused) == len(plain) > 0
    for (_, s1, b1), (_, s2, b2) in zip(plain, fused):
        assert s1 == pytest.approx(s2, abs=1e-3) and b1 == pytest.approx(b2, abs=0.1)


@pytest.mark.e2e  # tiny_weights: a training run of tools/train_net.py
def test_a_lazyconfig_predicts_what_the_yaml_config_does(tiny_weights, capsys):
    """The LazyConfig twin of the tiny config (same model; 10 detections per image, not 20)
    with the YAML-trained weights: the same best detections."""
    image = str(val_images()[1])
    assert predict.main(["--config-file", str(TINY), "--input", image,
                         "--confidence-threshold", "0",
                         "--opts", "MODEL.WEIGHTS", str(tiny_weights)]) == 0
    yaml = parse_printed(capsys.readouterr().out)[image]
    lazy_cfg = CONFIGS / "lazy" / "tiny" / "mask_rcnn_R_18_FPN_tiny_mabn_coco.py"
    assert predict.main(["--config-file", str(lazy_cfg), "--input", image,
                         "--confidence-threshold", "0",
                         "--opts", f"train.init_checkpoint={tiny_weights}"]) == 0
    lazy = parse_printed(capsys.readouterr().out)[image]
    assert len(lazy) == 10 and len(yaml) == 20
    for (l1, s1, b1), (l2, s2, b2) in zip(lazy, yaml[:10]):
        assert l1 == l2 and s1 == pytest.approx(s2, abs=1e-4) and b1 == pytest.approx(b2, abs=1e-2)


@pytest.mark.e2e  # tiny_weights: a training run of tools/train_net.py
def test_dataset_mode_draws_ground_truth_beside_predictions(tiny_weights, tmp_path):
    out = tmp_path / "gt"
    assert predict.main(["--config-file", str(TINY), "--dataset", "coco_2017_val",
                         "--num-images", "2", "--output", str(out),
                         "--opts", "MODEL.WEIGHTS", str(tiny_weights)]) == 0
    pictures = sorted(out.glob("*.png"))
    assert len(pictures) == 2
    for picture in pictures:
        width, height = Image.open(picture).size
        source = Image.open(val_images()[0].parent / f"{picture.stem}.jpg")
        assert (width, height) == (2 * source.size[0], source.size[1])


@pytest.mark.e2e  # tiny_weights: a training run of tools/train_net.py
def test_missing_unreadable_image_and_mismatched_weights_fail_naming_them(tiny_weights,
                                                                          tmp_path, capsys):
    base = ["--config-file", str(TINY), "--opts", "MODEL.WEIGHTS", str(tiny_weights)]
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    for inputs, message in [([str(tmp_path / "no_such.jpg")], "no_such.jpg' is not a file"),
                            ([str(tmp_path / "*.png")], "matches no file"),
                            ([str(broken)], r"broken.jpg: cannot read it as an image")]:
        assert predict.main(["--input", *inputs, *base]) == 2
        assert re.search(message, capsys.readouterr().err)
    demo_cfg = CONFIGS / "demo" / "mask_rcnn_R_18_FPN_demo_mabn.yaml"  # 4 classes, not 80
    code = predict.main(["--config-file", str(demo_cfg), "--input", str(val_images()[0]),
                         "--opts", "MODEL.WEIGHTS", str(tiny_weights)])
    assert code == 2
    err = capsys.readouterr().err
    assert "do not fit the model" in err and "roi_heads.box_predictor.cls_score.weight" in err


def test_training_curves_from_metrics_json(tmp_path):
    metrics = tmp_path / "metrics.json"
    rows = [{"iteration": i, "lr": 0.01 * (i + 1) / 20, "total_loss": 3.0 / (i + 1),
             "loss_cls": 1.0 / (i + 1), "loss_mask": 0.5} for i in range(0, 100, 20)]
    rows.insert(2, {"iteration": 99, "bbox/AP": 1.0})  # an evaluation record: not plotted
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"iteration": 1')
    records = plot_training_curves.read_metrics(metrics)
    assert [r["iteration"] for r in records] == [0, 20, 40, 60, 80]
    out = tmp_path / "curves.png"
    assert plot_training_curves.main([str(metrics), "--out", str(out)]) == 0
    assert Image.open(out).size == (800, 600)
    metrics.write_text('{"iteration": 0, "total_loss": 1.0}\nnot json\n{"iteration": 1}')
    assert plot_training_curves.main([str(metrics)]) == 2
