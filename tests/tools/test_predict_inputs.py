"""tools/predict.py at the edges: inputs of one stem in several folders get distinct pictures
(the count printed is the count written), and weights files that are not checkpoints are one
message with exit code 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import TINY, import_script

# ---- predict ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> Path:
    """The tiny config's model, untrained, saved by mabn_d2's checkpointer."""
    from mabn_d2.engine import MABNTrainer
    from mabn_d2.engine.atomic_checkpointer import AtomicCheckpointer
    from mabn_d2.validation import load_yacs_cfg

    out = tmp_path_factory.mktemp("weights")
    cfg = load_yacs_cfg(str(TINY), ["MODEL.DEVICE", "cpu"])
    AtomicCheckpointer(MABNTrainer.build_model(cfg), str(out)).save("model")
    return out / "model.pth"


def test_same_stem_inputs_get_distinct_pictures_and_the_count_is_true(random_weights, tmp_path,
                                                                       capsys):
    predict = import_script("tools/predict.py")

    inputs = []
    for folder, name in [("a", "x_2.png"), ("b", "x.png"), ("c", "x.png")]:
        (tmp_path / folder).mkdir()
        Image.fromarray(np.full((64, 80, 3), 40 * len(inputs), np.uint8)).save(
            tmp_path / folder / name)
        inputs.append(str(tmp_path / folder / name))
    out = tmp_path / "pictures"
    code = predict.main(["--config-file", str(TINY), "--input", *inputs, "--output", str(out),
                         "--opts", "MODEL.WEIGHTS", str(random_weights), "MODEL.DEVICE", "cpu"])
    assert code == 0
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 3, written
    assert f"predict: {len(written)} pictures in {out}" in capsys.readouterr().out


def test_predict_output_names_never_collide():
    output_names = import_script("tools/predict.py").output_names

    paths = [Path(p) for p in ["a/x_2.png", "b/x.png", "c/x.png", "d/x.png", "e/x_3.jpg"]]
    names = output_names(paths)
    assert len(set(names)) == len(paths)
    assert names[0] == "x_2" and names[1] == "x" and names[4] == "x_3"


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"), (b"hello\n", "is a text file"), (b"\x80\x02}q\x00(X", "cannot be read")])
def test_predict_refuses_bad_weights_files_with_exit_code_2(tmp_path, capsys, content, message):
    predict = import_script("tools/predict.py")

    weights = tmp_path / "w.pkl"
    weights.write_bytes(content)
    image = tmp_path / "i.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    code = predict.main(["--config-file", str(TINY), "--input", str(image),
                         "--opts", "MODEL.WEIGHTS", str(weights), "MODEL.DEVICE", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_memory_does_not_grow_with_the_number_of_inputs(random_weights, tmp_path, capsys):
    """Images are read one at a time: the peak of Python-traced memory (NumPy arrays) with
    four large inputs is that of one, not four."""
    import tracemalloc

    predict = import_script("tools/predict.py")

    images = []
    for i in range(4):
        images.append(tmp_path / f"big_{i}.png")
        Image.fromarray(np.full((1200, 1600, 3), 60 * i, np.uint8)).save(images[-1])
    one_image = 1200 * 1600 * 3

    def peak(inputs) -> int:
        tracemalloc.start()
        try:
            assert predict.main(["--config-file", str(TINY), "--input", *map(str, inputs),
                                 "--opts", "MODEL.WEIGHTS", str(random_weights),
                                 "MODEL.DEVICE", "cpu"]) == 0
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    single, four = peak(images[:1]), peak(images)
    capsys.readouterr()
    assert four - single < one_image, (single, four)


def test_an_output_folder_that_is_a_file_is_refused_before_the_model(tmp_path, capsys):
    predict = import_script("tools/predict.py")

    image = tmp_path / "i.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    (tmp_path / "out").write_text("")
    code = predict.main(["--config-file", str(TINY), "--input", str(image), "--output",
                         str(tmp_path / "out"), "--opts", "MODEL.WEIGHTS", "/no/such.pth"])
    err = capsys.readouterr().err
    assert code == 2 and "--output" in err and "is a file, not a folder" in err
