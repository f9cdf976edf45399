"""What a regular (non-editable) install ships: every subpackage of the source tree, the patches and the presets.

The README installs in editable mode, which imports subpackages straight from the source tree whether
pyproject.toml lists them or not; a wheel holds only the listed ones. Until this test, six subpackages
(``hf_tokred.methods.lm``, ``.nlp``, ``.ssm``, ``.vlm``, ``hf_tokred.recipes``, ``hf_tokred.vlm``) were missing
from the list, so ``pip install .`` gave a package whose ``import hf_tokred`` failed.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _setuptools_table() -> dict:
    return _pyproject()["tool"]["setuptools"]


def test_every_source_package_is_listed():
    table = _setuptools_table()
    listed = set(table["packages"])
    on_disk = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "hf_tokred").rglob("__init__.py")}
    for top in ("model_patches", "hub_configs"):  # installed under hf_tokred (DESIGN.md: never a global name)
        assert table["package-dir"][f"hf_tokred.{top}"] == top
        on_disk |= {"hf_tokred." + ".".join(init.parent.relative_to(ROOT).parts)
                    for init in (ROOT / top).rglob("__init__.py")}
    assert on_disk - listed == set(), "subpackages a wheel would leave out: add them to [tool.setuptools] packages"
    assert listed - on_disk == set(), "packages listed in pyproject.toml that do not exist"


def test_the_python_floor_is_the_dependencies_floor():
    # a floor below what the pinned dependencies need lets pip on an older Python fail with a resolver error about
    # transformers instead of saying that hf-tokred needs a newer Python (it said >=3.10; transformers 5.23 needs 3.11)
    def floor(spec: str) -> tuple[int, ...]:
        assert spec.startswith(">="), spec
        return tuple(int(x) for x in spec[2:].split(".")[:2])

    ours = floor(_pyproject()["project"]["requires-python"])
    for name in ("transformers", "diffusers", "peft", "accelerate", "huggingface-hub", "safetensors", "torch"):
        needed = floor(importlib.metadata.metadata(name)["Requires-Python"])
        assert ours >= needed, f"requires-python allows {ours}, but {name} needs {needed}"


def test_every_preset_file_is_package_data():
    patterns = _setuptools_table()["package-data"]["hf_tokred.hub_configs"]
    presets = {p.relative_to(ROOT / "hub_configs") for p in (ROOT / "hub_configs").rglob("*") if p.is_file()
               and p.name != "__init__.py" and "__pycache__" not in p.parts}
    assert presets, "hub_configs/ holds no presets"
    shipped = {p for p in presets if any(p.match(pattern) or p.match(pattern.removeprefix("**/"))
                                         for pattern in patterns)}
    assert presets - shipped == set(), "preset files no package-data pattern ships"
