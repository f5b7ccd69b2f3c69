"""The service image holds every package the distribution installs: the console script lives in `vqtok`,
so an image without it cannot start (no docker here: the Dockerfile is read as text)."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the checks read pyproject.toml

REPO = Path(__file__).resolve().parents[1]


def test_the_image_copies_every_package_and_checks_the_entry_point() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    entry = project["project"]["scripts"]["vqtok"]
    dockerfile = (REPO / "Dockerfile").read_text()
    for package in packages:
        assert f"COPY {package} ./{package}" in dockerfile, package
        assert f"{package}/__init__.py" in dockerfile, package  # the dependency layer's placeholder
    assert entry.split(":")[0] in dockerfile and 'CMD ["vqtok", "serve"]' in dockerfile
