"""``import mabn_d2`` changes exactly what mabn_d2.integration.patch and the README list."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO

# A fresh interpreter imports every detectron2 module it can, records the identity of every
# module-level value and of every attribute of detectron2's classes and registries, imports
# mabn_d2, and prints what changed.
PROBE = textwrap.dedent(
    """
    import importlib, json, pkgutil, warnings
    warnings.simplefilter("ignore")
    import detectron2

    modules = {}
    for info in pkgutil.walk_packages(detectron2.__path__, "detectron2."):
        try:
            modules[info.name] = importlib.import_module(info.name)
        except Exception:  # caffe2 export, optional dependencies: not importable here
            pass

    def snapshot():
        seen = {}
        for name, module in list(modules.items()):
            for attr, value in list(vars(module).items()):
                seen[f"{name}:{attr}"] = id(value)
                owner = getattr(value, "__module__", None)
                if isinstance(value, type) and owner == name:
                    for key, member in list(vars(value).items()):
                        seen[f"{name}:{attr}.{key}"] = id(member)
                elif type(value).__name__ == "Registry":
                    for key, member in list(vars(value).items()):
                        seen[f"{name}:{attr}.{key}"] = id(member)
        return seen

    before = snapshot()
    import mabn_d2  # noqa: F401
    after = snapshot()
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    added = sorted(k for k in after.keys() - before.keys() if not k.endswith(".__wrapped__"))
    print(json.dumps({"changed": changed, "added": added}))
    """
)


def run_probe() -> dict[str, list[str]]:
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.e2e  # a fresh interpreter imports detectron2's modules twice
def test_import_changes_only_the_listed_detectron2_functions():
    report = run_probe()
    changed = set(report["changed"])
    get_norm_bindings = {k for k in changed if k.endswith(":get_norm")}
    assert "detectron2.layers.batch_norm:get_norm" in get_norm_bindings
    assert "detectron2.modeling.backbone.resnet:get_norm" in get_norm_bindings
    registry_gets = {k for k in report["added"] if k.endswith("_REGISTRY.get")}
    registry_marks = {k for k in report["added"] if k.endswith("_REGISTRY._mabn_d2_wrapped")}
    assert "detectron2.modeling.meta_arch.build:META_ARCH_REGISTRY.get" in registry_gets
    assert {k.rsplit(".", 1)[0] for k in registry_gets} == \
        {k.rsplit(".", 1)[0] for k in registry_marks}
    expected_methods = {"detectron2.layers.wrappers:Conv2d.__init__",
                        "detectron2.checkpoint.detection_checkpoint:"
                        "DetectionCheckpointer._load_model"}
    assert changed - get_norm_bindings == expected_methods, changed
    assert set(report["added"]) == registry_gets | registry_marks, report["added"]
    # Items of other purposes are not changed by the import.
    assert not any("create_ddp_model" in k for k in changed)


def test_the_readme_table_lists_every_change():
    from mabn_d2.integration import patch

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## How mabn_d2 changes detectron2"):]
    for owner, attribute in patch.PATCHED:
        name = getattr(owner, "__name__", "").rpartition(".")[2]
        assert f"{name}.{attribute}" in table or f"`{attribute}`" in table, (owner, attribute)
    for registry in patch.MODEL_REGISTRIES:
        assert registry._name in table, registry._name
    assert "create_ddp_model" in table  # where it is changed instead (the launcher)
