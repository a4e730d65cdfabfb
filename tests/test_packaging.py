"""The wheel ships every package and the demo's resources."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_for_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "qlora_studio").rglob("__init__.py")
    }
    assert found - listed == set()


def test_demo_data_is_a_package_resource():
    from importlib import resources

    text = resources.files("qlora_studio.resources").joinpath("demo_qa.jsonl").read_text()
    assert len(text.splitlines()) == 60


def test_top_level_layout():
    """The repository's top level is exactly the project's own folders and files."""
    import shutil
    import subprocess

    import pytest

    if not shutil.which("git") or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    top = {f.split("/")[0] for f in files}
    allowed = {"pyproject.toml", "qlora_studio", "resources", "tests", "packaging", "README.md", ".ci", "docs", "bench",
               ".gitignore"}
    assert top <= allowed, top - allowed
