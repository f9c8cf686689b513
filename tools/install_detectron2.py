#!/usr/bin/env python
"""Install detectron2 into the current Python environment.

Two supported stacks (docs/install.md):

* **upstream main** at the tested commit ``PINNED_COMMIT``, built from source WITH its compiled
  C++ ops (``from detectron2 import _C`` works): ``--source git`` (the official repository at
  that commit), or the same sources from a tarball (``--source detectron2-02b5c4e2.tar.gz
  --sha256 ...``: CI and offline machines, ``../shared/vendor``), a folder, or any
  ``git+URL@COMMIT``;
* the **v0.6 fallback** (``--source pypi-v0.6``): the official v0.6 Python sources that PyPI's
  sdist ``pb1-detectron2==0.6`` holds byte for byte. That sdist lacks
  ``detectron2/layers/csrc``, so the compiled extension cannot be built: a stand-in
  ``detectron2/_C.py`` is added that raises a clear error for every compiled op (deformable
  conv, rotated boxes, the C++ COCO evaluator); Mask R-CNN never needs them. v0.6 predates
  numpy 2, Pillow 10 and setuptools without ``pkg_resources``: the sources are edited before
  they are installed, each edit anchored to the exact v0.6 text (a missing anchor stops the
  install) and mirroring the change detectron2 itself made later (``SOURCE_EDITS``). The model
  zoo's configs are installed with the package.

``--source auto`` (the default): the official repository at ``PINNED_COMMIT`` if it can be
reached, else the v0.6 fallback. If ``import detectron2`` already works, nothing is done
(``--force`` reinstalls).

Upstream main still imports ``pkg_resources`` (model_zoo.py), which setuptools >= 81 no longer
ships: every source tree built here gets the same anchored edit as the fallback
(``PKG_RESOURCES_EDITS``, as upstream PR #5510 proposes) while its sources still need it; no
constraint on setuptools.

Run it with the environment's interpreter, e.g. ``.venv/bin/python tools/install_detectron2.py
--source ../shared/vendor/detectron2-02b5c4e2.tar.gz``. torch must be installed first.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

OFFICIAL_GIT = "https://github.com/facebookresearch/detectron2.git"
# The upstream main commit this project is tested with (docs/install.md): `--source git`
# installs exactly this one. The same sources: ../shared/vendor/detectron2-02b5c4e2.tar.gz.
PINNED_COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"
PINNED_TARBALL_SHA256 = "a42c29a2376e7bcc0b704a173612dd6f75960d837ccf4d340a0d714ac92e36f0"
SDIST = "pb1-detectron2==0.6"
# sha256 of pb1-detectron2-0.6.tar.gz on PyPI: the edits below are anchored to exactly these
# sources (official v0.6, tag d1e04565d3bec8719335b88be9e9b961bf3ec464, byte for byte).
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
HERE = Path(__file__).resolve().parent
C_STANDIN = HERE / "detectron2_pure" / "_C.py"
UPSTREAM = "https://github.com/facebookresearch/detectron2"

# detectron2 v0.6's own install_requires that its Python sources use (not black, future,
# pydot: formatting and caffe2 only), plus setuptools to build them without isolation. No
# upper pins: the sources are made to work on numpy 2, Pillow >= 10 and a setuptools without
# pkg_resources by SOURCE_EDITS.
V06_REQUIREMENTS = [
    "setuptools",
    "numpy",
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
]


@dataclass(frozen=True)
class SourceEdit:
    """One compatibility edit of the v0.6 sources: ``old`` (exact v0.6 text, found exactly
    ``count`` times in ``path``) becomes ``new``, as detectron2 itself changed it later."""

    path: str
    old: str
    new: str
    upstream: str
    count: int = 1


_NP_BOOL = f"{UPSTREAM}/commit/857d5de2 (PR #4713, np.bool -> bool: numpy 1.24 removed np.bool)"
_NP_INT = f"{UPSTREAM}/commit/027099d3 (np.int -> int)"
_NP_FLOAT = f"{UPSTREAM}/commit/54dd614e (np.float -> float)"
_NP_STR = f"{UPSTREAM}/commit/654570a2 (np.str -> str)"
_LR_SCHEDULER = f"{UPSTREAM}/commit/21080971 (PR #4709, use torch.optim.lr_scheduler.LRScheduler)"

# setuptools >= 81 has no pkg_resources. Upstream has not changed this yet (issue #5494 open;
# still so at PINNED_COMMIT): the edit is the one of PR #5510, the configs are files next to
# model_zoo.py. Applied to the v0.6 fallback and, where its sources still import pkg_resources,
# to every other source tree this installer builds (upstream main included).
_PKG_RESOURCES = f"{UPSTREAM}/issues/5494, as proposed in PR #5510 (not merged upstream)"
PKG_RESOURCES_EDITS: tuple[SourceEdit, ...] = (
    SourceEdit("detectron2/model_zoo/model_zoo.py",
               "import pkg_resources\n", "", _PKG_RESOURCES),
    SourceEdit("detectron2/model_zoo/model_zoo.py",
               "    cfg_file = pkg_resources.resource_filename(\n"
               '        "detectron2.model_zoo", os.path.join("configs", config_path)\n'
               "    )\n",
               '    cfg_file = os.path.join(os.path.dirname(__file__), "configs", config_path)\n',
               _PKG_RESOURCES),
)

# The edits, applied in this order to the extracted sdist (fallback path only). Each one
# mirrors a later upstream change; README.md ("detectron2 v0.6 on today's stack") lists them.
SOURCE_EDITS: tuple[SourceEdit, ...] = (
    # numpy >= 1.24 removed the aliases np.bool, np.int, np.float, np.str.
    SourceEdit("detectron2/structures/masks.py",
               "        return np.zeros((height, width)).astype(np.bool)\n",
               "        return np.zeros((height, width)).astype(bool)\n", _NP_BOOL),
    SourceEdit("detectron2/structures/masks.py",
               "    return mask_util.decode(rle).astype(np.bool)\n",
               "    return mask_util.decode(rle).astype(bool)\n", _NP_BOOL),
    SourceEdit("detectron2/structures/masks.py",
               "        return torch.from_numpy(np.asarray(keep, dtype=np.bool))\n",
               "        return torch.from_numpy(np.asarray(keep, dtype=bool))\n", _NP_BOOL),
    SourceEdit("detectron2/utils/visualizer.py",
               "        return (self._seg != empty_ids[0]).numpy().astype(np.bool)\n",
               "        return (self._seg != empty_ids[0]).numpy().astype(bool)\n", _NP_BOOL),
    SourceEdit("detectron2/utils/visualizer.py",
               "            yield (self._seg == sid).numpy().astype(np.bool), sinfo\n",
               "            yield (self._seg == sid).numpy().astype(bool), sinfo\n", _NP_BOOL),
    SourceEdit("detectron2/utils/visualizer.py",
               "            mask = (self._seg == sid).numpy().astype(np.bool)\n",
               "            mask = (self._seg == sid).numpy().astype(bool)\n", _NP_BOOL),
    SourceEdit("detectron2/utils/video_visualizer.py",
               "        is_crowd = np.zeros((len(instances),), dtype=np.bool)\n",
               "        is_crowd = np.zeros((len(instances),), dtype=bool)\n", _NP_BOOL),
    SourceEdit("detectron2/evaluation/pascal_voc_evaluation.py",
               '        difficult = np.array([x["difficult"] for x in R]).astype(np.bool)\n'
               "        # difficult = np.array([False for x in R]).astype(np.bool)  # treat all "
               '"difficult" as GT\n',
               '        difficult = np.array([x["difficult"] for x in R]).astype(bool)\n'
               "        # difficult = np.array([False for x in R]).astype(bool)  # treat all "
               '"difficult" as GT\n',
               _NP_BOOL),
    SourceEdit("detectron2/data/build.py",
               "    histogram = np.zeros((num_classes,), dtype=np.int)\n",
               "    histogram = np.zeros((num_classes,), dtype=int)\n", _NP_INT),
    SourceEdit("detectron2/data/build.py",
               '            [x["category_id"] for x in annos if not x.get("iscrowd", 0)], '
               "dtype=np.int\n",
               '            [x["category_id"] for x in annos if not x.get("iscrowd", 0)], '
               "dtype=int\n", _NP_INT),
    SourceEdit("detectron2/evaluation/sem_seg_evaluation.py",
               "            pred = np.array(output, dtype=np.int)\n",
               "            pred = np.array(output, dtype=int)\n", _NP_INT),
    SourceEdit("detectron2/evaluation/sem_seg_evaluation.py",
               "                gt = np.array(Image.open(f), dtype=np.int)\n",
               "                gt = np.array(Image.open(f), dtype=int)\n", _NP_INT),
    SourceEdit("detectron2/evaluation/sem_seg_evaluation.py",
               "        acc = np.full(self._num_classes, np.nan, dtype=np.float)\n"
               "        iou = np.full(self._num_classes, np.nan, dtype=np.float)\n"
               "        tp = self._conf_matrix.diagonal()[:-1].astype(np.float)\n"
               "        pos_gt = np.sum(self._conf_matrix[:-1, :-1], axis=0).astype(np.float)\n",
               "        acc = np.full(self._num_classes, np.nan, dtype=float)\n"
               "        iou = np.full(self._num_classes, np.nan, dtype=float)\n"
               "        tp = self._conf_matrix.diagonal()[:-1].astype(float)\n"
               "        pos_gt = np.sum(self._conf_matrix[:-1, :-1], axis=0).astype(float)\n",
               _NP_FLOAT),
    SourceEdit("detectron2/evaluation/sem_seg_evaluation.py",
               "        pos_pred = np.sum(self._conf_matrix[:-1, :-1], axis=1).astype(np.float)\n",
               "        pos_pred = np.sum(self._conf_matrix[:-1, :-1], axis=1).astype(float)\n",
               _NP_FLOAT),
    SourceEdit("detectron2/data/datasets/pascal_voc.py",
               "        fileids = np.loadtxt(f, dtype=np.str)\n",
               "        fileids = np.loadtxt(f, dtype=str)\n", _NP_STR),
    # numpy 2: np.array(..., copy=False) raises where a copy is needed.
    SourceEdit("detectron2/layers/mask_ops.py",
               "    mask = np.array(mask, copy=False)\n",
               "    mask = np.asarray(mask)\n",
               f"{UPSTREAM}/commit/70f45430 (PR #5312, numpy 2.0 copy=False)"),
    # Pillow 10 removed Image.LINEAR (an alias of BILINEAR).
    SourceEdit("detectron2/data/transforms/transform.py",
               "    def __init__(self, src_rect, output_size, interp=Image.LINEAR, fill=0):\n",
               "    def __init__(self, src_rect, output_size, interp=Image.BILINEAR, fill=0):\n",
               f"{UPSTREAM}/commit/ff53992b (fix PIL.LINEAR warning)"),
    *PKG_RESOURCES_EDITS,
    # Python 3.11: random.sample no longer takes a set. MapDataset's retry after a failed
    # map_func (e.g. an image a mapper drops) raised TypeError.
    SourceEdit("detectron2/data/common.py",
               "            cur_idx = self._rng.sample(self._fallback_candidates, k=1)[0]\n",
               "            cur_idx = self._rng.sample(list(self._fallback_candidates), k=1)[0]\n",
               f"{UPSTREAM}/commit/400a49c1 (random sample from set)"),
    # PyTorch >= 2.0: schedulers derive from LRScheduler, not _LRScheduler, so the hook
    # neither saved nor restored torch's own schedulers (StepLR, ...) in checkpoints.
    SourceEdit("detectron2/solver/lr_scheduler.py",
               "\nlogger = logging.getLogger(__name__)\n",
               "\ntry:\n"
               "    from torch.optim.lr_scheduler import LRScheduler\n"
               "except ImportError:\n"
               "    from torch.optim.lr_scheduler import _LRScheduler as LRScheduler\n"
               "\nlogger = logging.getLogger(__name__)\n", _LR_SCHEDULER),
    SourceEdit("detectron2/solver/lr_scheduler.py",
               "(torch.optim.lr_scheduler._LRScheduler):\n", "(LRScheduler):\n", _LR_SCHEDULER,
               count=3),
    SourceEdit("detectron2/solver/__init__.py",
               "from .lr_scheduler import WarmupCosineLR, WarmupMultiStepLR, LRMultiplier, "
               "WarmupParamScheduler\n",
               "from .lr_scheduler import (\n"
               "    LRMultiplier,\n"
               "    LRScheduler,\n"
               "    WarmupCosineLR,\n"
               "    WarmupMultiStepLR,\n"
               "    WarmupParamScheduler,\n"
               ")\n", _LR_SCHEDULER),
    SourceEdit("detectron2/engine/hooks.py",
               "from detectron2.solver import LRMultiplier\n",
               "from detectron2.solver import LRMultiplier\n"
               "from detectron2.solver import LRScheduler as _LRScheduler\n", _LR_SCHEDULER),
    SourceEdit("detectron2/engine/hooks.py",
               "        if isinstance(self.scheduler, torch.optim.lr_scheduler._LRScheduler):\n",
               "        if isinstance(self.scheduler, _LRScheduler):\n", _LR_SCHEDULER, count=2),
    # PyTorch >= 1.13's nn.GroupNorm rejects channels not divisible by its 32 groups, which
    # RetinaNetHead's probe get_norm(norm, 1) hits for norm="GN" (LazyConfig FCOS, RetinaNet).
    SourceEdit("detectron2/modeling/meta_arch/retinanet.py",
               "            norm_name = str(type(get_norm(norm, 1)))\n",
               "            norm_name = str(type(get_norm(norm, 32)))\n",
               f"{UPSTREAM}/commit/330dd329 (PR #4470, get GN type in retinanet)"),
    # PyTorch no longer ships caffe2: its import made detectron2.export unimportable.
    SourceEdit("detectron2/export/__init__.py",
               "from .api import *\n",
               "try:\n"
               "    from caffe2.proto import caffe2_pb2 as _tmp\n"
               "\n"
               "    # caffe2 is optional\n"
               "except ImportError:\n"
               "    pass\n"
               "else:\n"
               "    from .api import *\n",
               f"{UPSTREAM}/commit/d29378aa (deprecate some more caffe2 stuff: caffe2 optional)"),
)


class SourceEditError(RuntimeError):
    """An edit's v0.6 text is not where it should be: these are not the expected sources."""


def apply_source_edits(root: Path, edits: Sequence[SourceEdit] = SOURCE_EDITS) -> list[str]:
    """Apply ``edits`` to the sources under ``root``; one line per edit for the log.

    Every anchor must occur exactly ``count`` times, else nothing is written and
    :class:`SourceEditError` names the file and the text; edits never apply silently.
    """
    texts: dict[str, str] = {}
    applied = []
    for edit in edits:
        text = texts.get(edit.path)
        if text is None:
            file = root / edit.path
            if not file.is_file():
                raise SourceEditError(f"{edit.path}: file not found under {root}")
            text = file.read_text(encoding="utf-8")
        found = text.count(edit.old)
        if found != edit.count:
            raise SourceEditError(
                f"{edit.path}: expected {edit.count} occurrence(s) of {edit.old!r}, found "
                f"{found}; these are not detectron2 v0.6's sources (edit for {edit.upstream})"
            )
        texts[edit.path] = text.replace(edit.old, edit.new)
        applied.append(f"{edit.path} (x{edit.count}): as {edit.upstream}")
    for path, text in texts.items():
        (root / path).write_text(text, encoding="utf-8")
    return applied


# The model zoo's configs (YAML and LazyConfig Python files): the sdist has them at
# detectron2/model_zoo/configs (official builds symlink the top-level configs/ there).
MODEL_ZOO_CONFIGS = "detectron2/model_zoo/configs"
# How many the sdist carries, by suffix; all are installed, and all load (tests).
MODEL_ZOO_CONFIG_COUNTS = {".yaml": 92, ".py": 36}

PURE_SETUP_PY = """\
from pathlib import Path

from setuptools import find_packages, setup

# Generated by mabn_d2/tools/install_detectron2.py: detectron2 v0.6 Python sources from the
# pb1-detectron2==0.6 sdist with compatibility edits mirroring later upstream changes, and
# without the compiled extension (see detectron2/_C.py).
zoo = Path("detectron2/model_zoo")
configs = sorted(str(p.relative_to(zoo)) for p in (zoo / "configs").rglob("*")
                 if p.suffix in (".yaml", ".py"))
# As v0.6's setup.py: three projects are installed as detectron2.projects.*.
projects = {
    "detectron2.projects.point_rend": "projects/PointRend/point_rend",
    "detectron2.projects.deeplab": "projects/DeepLab/deeplab",
    "detectron2.projects.panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}
setup(
    name="detectron2",
    version="0.6",
    description="detectron2 v0.6 pure-Python sources (no compiled ops), patched for today's stack",
    url="https://github.com/facebookresearch/detectron2",
    license="Apache-2.0",
    packages=find_packages(include=["detectron2", "detectron2.*"]) + list(projects),
    package_dir=projects,
    package_data={"detectron2.model_zoo": configs},
    python_requires=">=3.6",
)
"""


def pip(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, timeout=timeout, check=False)


def detectron2_importable() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import detectron2, detectron2.layers"], capture_output=True
    )
    return probe.returncode == 0


def git_reachable(url: str, timeout: float) -> bool:
    try:
        probe = subprocess.run(
            ["git", "ls-remote", "--heads", url], capture_output=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def prepare_pure_v06_source(workdir: Path) -> Path:
    """Download the v0.6 sdist into ``workdir`` and make it an installable pure-Python source
    tree (compiled ops replaced by the stand-in ``detectron2/_C.py``); returns the tree, ready
    for ``pip install`` or ``pip wheel`` (``dev/gpu_wheelhouse.py``). Exits on failure."""
    download = pip(
        "download", "--no-deps", "--no-build-isolation", SDIST, "-d", str(workdir)
    )
    archives = sorted(workdir.glob("pb1*detectron2-0.6*.tar.gz"))
    if download.returncode != 0 or not archives:
        sys.exit(
            f"install_detectron2: could not download {SDIST} from PyPI. Its metadata needs "
            "torch installed first, and pip >= 26 refuses it (its 'all' extra has a URL "
            "dependency): python -m pip install 'pip<26', then run this again."
        )
    digest = hashlib.sha256(archives[0].read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        sys.exit(f"install_detectron2: {archives[0].name} has sha256 {digest}, expected "
                 f"{SDIST_SHA256} (the sources SOURCE_EDITS are anchored to)")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(workdir, filter="data")
    (source,) = [p for p in workdir.iterdir() if p.is_dir() and (p / "detectron2").is_dir()]
    init_py = (source / "detectron2" / "__init__.py").read_text()
    if '__version__ = "0.6"' not in init_py:
        sys.exit(f"install_detectron2: {archives[0].name} does not hold detectron2 v0.6")
    if (source / "detectron2" / "layers" / "csrc").exists():
        sys.exit("install_detectron2: sdist unexpectedly has csrc; install it normally instead")
    counts = {suffix: len(list((source / MODEL_ZOO_CONFIGS).rglob(f"*{suffix}")))
              for suffix in MODEL_ZOO_CONFIG_COUNTS}
    if counts != MODEL_ZOO_CONFIG_COUNTS:
        sys.exit(f"install_detectron2: {archives[0].name} has {counts} model zoo configs under "
                 f"{MODEL_ZOO_CONFIGS}, expected {MODEL_ZOO_CONFIG_COUNTS}")
    try:
        applied = apply_source_edits(source)
    except SourceEditError as e:
        sys.exit(f"install_detectron2: {e}")
    for line in applied:
        print(f"install_detectron2: edited {line}", flush=True)
    shutil.copy(C_STANDIN, source / "detectron2" / "_C.py")
    (source / "setup.py").write_text(PURE_SETUP_PY)
    for stale in ("setup.cfg", "pyproject.toml"):
        (source / stale).unlink(missing_ok=True)
    return source


def install_pure_v06(workdir: Path) -> None:
    if pip("install", *V06_REQUIREMENTS).returncode != 0:
        sys.exit("install_detectron2: installing detectron2 v0.6's requirements failed")
    source = prepare_pure_v06_source(workdir)
    if pip("install", "--no-deps", "--no-build-isolation", str(source)).returncode != 0:
        sys.exit("install_detectron2: installing the v0.6 sources failed")
    print(
        "install_detectron2: installed detectron2 v0.6 from PyPI's pb1-detectron2 sdist "
        f"with {len(SOURCE_EDITS)} compatibility edits and the model zoo's configs, WITHOUT "
        "compiled ops (detectron2._C is a stand-in that raises a clear error).",
        flush=True,
    )


class SourceError(RuntimeError):
    """A detectron2 source (folder, tarball, git URL) that cannot be used: the message says why."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_root(folder: Path, what: str) -> Path:
    """``folder`` or its only subfolder (a tarball's prefix) holding ``setup.py`` and
    ``detectron2/``."""
    for candidate in (folder, *sorted(p for p in folder.iterdir() if p.is_dir())):
        if (candidate / "setup.py").is_file() and (candidate / "detectron2").is_dir():
            return candidate
    raise SourceError(f"{what}: no detectron2 source tree (setup.py beside detectron2/) in it")


def split_git_source(source: str) -> tuple[str, str]:
    """``git+URL@REV`` -> (URL, REV). The revision is required: an unpinned install would be
    whatever upstream HEAD is that day, never tested."""
    url = source.removeprefix("git+")
    url, sep, rev = url.rpartition("@")
    if not sep or not url or not rev or "/" in rev:
        raise SourceError(f"{source}: give the commit, e.g. git+{OFFICIAL_GIT}@{PINNED_COMMIT}")
    return url, rev


def fetch_git(url: str, rev: str, dest: Path) -> Path:
    """Check out ``rev`` (a commit, tag or branch) of the repository at ``url`` into ``dest``;
    returns ``dest``."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(dest), *args], capture_output=True, text=True,
                              timeout=1800, check=False)

    dest.mkdir(parents=True)
    git("init", "-q")
    target = "FETCH_HEAD"
    if git("fetch", "-q", "--depth", "1", url, rev).returncode != 0:
        # A server that does not serve a commit by name: the whole history, then the commit.
        fetched = git("fetch", "-q", url, "+refs/heads/*:refs/remotes/origin/*",
                      "+refs/tags/*:refs/tags/*")
        if fetched.returncode != 0:
            raise SourceError(f"git fetch {url}: {fetched.stderr.strip()}")
        target = rev
    checkout = git("checkout", "-q", target)
    if checkout.returncode != 0:
        raise SourceError(f"{url}: revision {rev} not found ({checkout.stderr.strip()})")
    head = git("rev-parse", "HEAD").stdout.strip()
    print(f"install_detectron2: {url} at {head}", flush=True)
    return dest


def prepare_source_tree(source: str, workdir: Path, sha256: str | None = None) -> Path:
    """A buildable copy, under ``workdir``, of the detectron2 sources ``source`` names: a
    folder (copied: the user's tree is not edited), a tarball (checked against ``sha256`` when
    given), or ``git+URL@REV``. ``PKG_RESOURCES_EDITS`` are applied while the sources still
    import ``pkg_resources``. Raises :class:`SourceError` or :class:`SourceEditError`."""
    if sha256 is not None and not Path(source).expanduser().is_file():
        raise SourceError("--sha256 checks a tarball; give it only with a tarball --source")
    if source.startswith("git+"):
        root = _source_root(fetch_git(*split_git_source(source), workdir / "git"), source)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            root = Path(shutil.copytree(_source_root(path, source), workdir / "tree",
                                        ignore=shutil.ignore_patterns(".git", "build", "*.so")))
        elif path.is_file():
            if sha256 is not None and (found := sha256_of(path)) != sha256.lower():
                raise SourceError(f"{path}: sha256 {found}, expected {sha256}")
            try:
                with tarfile.open(path) as tar:
                    tar.extractall(workdir / "tree", filter="data")
            except tarfile.TarError as error:
                raise SourceError(f"{path}: not a readable tarball ({error})") from error
            root = _source_root(workdir / "tree", source)
        else:
            raise SourceError(f"{source}: no such folder or file (nor git+URL@COMMIT)")
    model_zoo = root / PKG_RESOURCES_EDITS[0].path
    if model_zoo.is_file() and PKG_RESOURCES_EDITS[0].old in model_zoo.read_text("utf-8"):
        for line in apply_source_edits(root, PKG_RESOURCES_EDITS):
            print(f"install_detectron2: edited {line}", flush=True)
    return root


def install_source_tree(root: Path) -> None:
    """Build and install the sources at ``root`` with their compiled ops (needs torch and a
    C++ compiler; about 2 minutes on 2 cores)."""
    if pip("install", "--no-build-isolation", str(root)).returncode != 0:
        sys.exit(f"install_detectron2: building detectron2 from {root} failed (log above)")


def compiled_ops_available() -> bool:
    """``from detectron2 import _C`` gives the real extension (not the fallback's stand-in)."""
    code = "from detectron2 import _C; assert hasattr(_C, 'deform_conv_forward')"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True)
    return probe.returncode == 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="reinstall even if importable")
    parser.add_argument(
        "--source", default=os.environ.get("DETECTRON2_SOURCE") or "auto",
        help="auto (default): the official repository at the tested commit if reachable, else "
             "pypi-v0.6; git: the official repository at the tested commit "
             f"({PINNED_COMMIT[:8]}); pypi-v0.6: the v0.6 fallback; or a source folder, a "
             "source tarball, or git+URL@COMMIT (built with compiled ops)")
    parser.add_argument("--sha256", default=None,
                        help="expected sha256 of a tarball --source (checked before extracting)")
    args = parser.parse_args(argv)
    if not args.force and detectron2_importable():
        print("install_detectron2: detectron2 is already installed", flush=True)
        return
    source = args.source
    if source in ("auto", "git"):
        pinned = f"git+{OFFICIAL_GIT}@{PINNED_COMMIT}"
        if git_reachable(OFFICIAL_GIT, timeout=20):
            source = pinned
        elif source == "git":
            sys.exit(f"install_detectron2: {OFFICIAL_GIT} cannot be reached")
        else:
            print(f"install_detectron2: {OFFICIAL_GIT} not reachable; using {SDIST}", flush=True)
            source = "pypi-v0.6"
    with tempfile.TemporaryDirectory(prefix="detectron2-src-") as tmp:
        if source == "pypi-v0.6":
            install_pure_v06(Path(tmp))
        else:
            try:
                root = prepare_source_tree(source, Path(tmp), args.sha256)
            except (SourceError, SourceEditError) as error:
                sys.exit(f"install_detectron2: {error}")
            install_source_tree(root)
            ops = "WITH" if compiled_ops_available() else "WITHOUT"
            print(f"install_detectron2: installed detectron2 from {source} {ops} compiled ops",
                  flush=True)
    if not detectron2_importable():
        sys.exit("install_detectron2: detectron2 still does not import")


if __name__ == "__main__":
    main()
