"""tools/install_detectron2.py's sources other than the v0.6 fallback: a source tarball (with
its sha256), a folder, a git URL at a commit; the git path pinned to the tested commit; the
``pkg_resources`` edit applied to any tree that still needs it. Nothing is built here (the
build with compiled ops is what CI's upstream-main venv does)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import REPO, import_script, require_vendored_detectron2

installer = import_script("tools/install_detectron2.py")

MODEL_ZOO = "detectron2/model_zoo/model_zoo.py"
V06_MODEL_ZOO = (
    "import os\n"
    "import pkg_resources\n"
    "\n"
    "def get_config_file(config_path):\n"
    "    cfg_file = pkg_resources.resource_filename(\n"
    '        "detectron2.model_zoo", os.path.join("configs", config_path)\n'
    "    )\n"
    "    return cfg_file\n"
)


def _tree(root: Path, model_zoo: str = V06_MODEL_ZOO) -> Path:
    (root / "detectron2" / "model_zoo").mkdir(parents=True)
    (root / "setup.py").write_text("from setuptools import setup\nsetup(name='detectron2')\n")
    (root / MODEL_ZOO).write_text(model_zoo)
    return root


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_the_vendored_tarball_is_the_pinned_commit_and_is_edited_for_pkg_resources(tmp_path):
    tarball = require_vendored_detectron2()
    readme = (tarball.parent / "README.md").read_text()
    assert installer.PINNED_COMMIT in readme and installer.PINNED_TARBALL_SHA256 in readme
    root = installer.prepare_source_tree(str(tarball), tmp_path,
                                         sha256=installer.PINNED_TARBALL_SHA256)
    assert (root / "detectron2" / "layers" / "csrc").is_dir()  # compiled ops can be built
    zoo = (root / MODEL_ZOO).read_text()
    assert "pkg_resources" not in zoo
    assert installer.PKG_RESOURCES_EDITS[1].new in zoo


def test_a_tarball_with_another_sha256_is_refused_before_extraction(tmp_path):
    tarball = require_vendored_detectron2()
    with pytest.raises(installer.SourceError, match="sha256 a42c29a2.*, expected 0000"):
        installer.prepare_source_tree(str(tarball), tmp_path / "x", sha256="0" * 64)
    assert not (tmp_path / "x" / "tree").exists()


def test_a_folder_is_copied_and_edited_the_original_untouched(tmp_path):
    source = _tree(tmp_path / "src")
    root = installer.prepare_source_tree(str(source), tmp_path / "work")
    assert "pkg_resources" not in (root / MODEL_ZOO).read_text()
    assert (source / MODEL_ZOO).read_text() == V06_MODEL_ZOO
    with pytest.raises(installer.SourceError, match="give it only with a tarball"):
        installer.prepare_source_tree(str(source), tmp_path / "work2", sha256="0" * 64)


def test_sources_without_pkg_resources_are_left_as_they_are_and_half_edited_ones_refused(
        tmp_path):
    fixed = V06_MODEL_ZOO.replace("import pkg_resources\n", "").replace(
        installer.PKG_RESOURCES_EDITS[1].old, installer.PKG_RESOURCES_EDITS[1].new)
    root = installer.prepare_source_tree(str(_tree(tmp_path / "fixed", fixed)), tmp_path / "w1")
    assert (root / MODEL_ZOO).read_text() == fixed
    half = V06_MODEL_ZOO.replace(installer.PKG_RESOURCES_EDITS[1].old, "    cfg_file = x\n")
    with pytest.raises(installer.SourceEditError, match="model_zoo.py: expected 1"):
        installer.prepare_source_tree(str(_tree(tmp_path / "half", half)), tmp_path / "w2")


def test_not_a_source_tree_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(installer.SourceError, match="no detectron2 source tree"):
        installer.prepare_source_tree(str(tmp_path / "empty"), tmp_path / "w")
    with pytest.raises(installer.SourceError, match="no such folder or file"):
        installer.prepare_source_tree(str(tmp_path / "nothing"), tmp_path / "w")


def test_a_git_url_is_checked_out_at_the_given_commit(tmp_path):
    repo = _tree(tmp_path / "repo")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v0.6 tree")
    first = _git(repo, "rev-parse", "HEAD")
    (repo / MODEL_ZOO).write_text("# later\n")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "later")
    root = installer.prepare_source_tree(f"git+file://{repo}@{first}", tmp_path / "w")
    zoo = (root / MODEL_ZOO).read_text()
    assert "later" not in zoo and "pkg_resources" not in zoo  # that commit, edited
    with pytest.raises(installer.SourceError, match="not found"):
        installer.prepare_source_tree(f"git+file://{repo}@{'1' * 40}", tmp_path / "w2")


def test_a_git_url_without_a_commit_is_refused():
    with pytest.raises(installer.SourceError, match=installer.PINNED_COMMIT):
        installer.split_git_source(f"git+{installer.OFFICIAL_GIT}")
    assert installer.split_git_source(f"git+{installer.OFFICIAL_GIT}@{installer.PINNED_COMMIT}") \
        == (installer.OFFICIAL_GIT, installer.PINNED_COMMIT)


def test_the_makefile_passes_the_source_to_the_installer():
    makefile = (REPO / "Makefile").read_text()
    assert "DETECTRON2_SOURCE ?= auto" in makefile
    assert 'tools/install_detectron2.py --source "$(DETECTRON2_SOURCE)"' in makefile
