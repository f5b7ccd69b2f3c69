"""Shared fixtures: paths to the real image sets in ../shared/data (read in place, never copied)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DATA


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"real test data not found at {path}; set VQTOK_DATA to the shared data folder")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _need(DATA)


@pytest.fixture(scope="session")
def kodak_dir() -> Path:
    return _need(DATA / "kodak")


@pytest.fixture(scope="session")
def photos_val_dir() -> Path:
    return _need(DATA / "photos256" / "val")


@pytest.fixture(scope="session")
def photos_train_dir() -> Path:
    return _need(DATA / "photos256" / "train")


@pytest.fixture(scope="session")
def cifar_test_parquet() -> Path:
    return _need(DATA / "cifar10" / "test-00000-of-00001.parquet")


# --- parallel runs (pytest-xdist: `scripts/test.sh` passes -n N --dist loadscope) ---

# Modules whose tests take longest (measured on the shared 2-core machine), longest first: they are
# handed to the workers first, so that no worker starts one of them while the other has nothing left.
# Only the order changes; a module missing here runs after these, in the usual order.
SLOW_FIRST = [
    "tests/test_walkthrough.py",
    "tests/service/test_memory.py",
    "tests/models/test_export.py",
    "tests/training/test_rate_distortion.py",
    "tests/training/test_evaluate.py",
    "tests/clients/test_tokenize.py",
    "tests/clients/test_typing.py",
    "tests/models/test_names.py",
]
_SCOPES_ENV = "VQTOK_XDIST_SCOPES"  # the folder where workers leave each test's scope for the scheduler


def xdist_scope(item: pytest.Item) -> str:
    """The unit of work an xdist worker takes whole: the tests of one xdist_group mark or that start
    Ray ("ray": one local Ray at a time), the tests of a module that has a module-scoped fixture (an
    exported model, a server, a browser: set up once, not once per worker), else the test alone."""
    groups = sorted(str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group"))
    if groups:
        return "_".join(groups)
    if "ray_local" in item.fixturenames:
        return "ray"
    info = getattr(item, "_fixtureinfo", None)  # pytest.Function's; other items have no fixtures
    defs = info.name2fixturedefs.values() if info is not None else ()
    if any(d.scope not in ("function", "session") for ds in defs for d in ds):
        return item.nodeid.split("::")[0]
    return item.nodeid


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> Iterator[None]:
    """After the other hooks (pytest's grouping by fixture included): the modules of SLOW_FIRST first,
    stably (the order within a module is kept). On an xdist worker, each test's `xdist_scope` is left
    for the scheduler, which sees only test ids."""
    yield
    rank = {module: i for i, module in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
    folder, worker = os.environ.get(_SCOPES_ENV), os.environ.get("PYTEST_XDIST_WORKER")
    if folder and worker:
        tmp = Path(folder) / f".{worker}.json"
        tmp.write_text(json.dumps({item.nodeid: xdist_scope(item) for item in items}))
        tmp.replace(Path(folder) / f"{worker}.json")


def pytest_configure(config: pytest.Config) -> None:
    if config.pluginmanager.hasplugin("xdist") and not os.environ.get("PYTEST_XDIST_WORKER"):
        config.pluginmanager.register(_ScopeScheduler(), "vqtok-xdist-scopes")


class _ScopeScheduler:
    """Replaces --dist loadscope's grouping (by module) with `xdist_scope`'s. (loadgroup cannot do it:
    under pytest ≥ 9.2 its xdist_group marks no longer reach the scheduler, pytest-xdist issue 1386.)"""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="vqtok-xdist-scopes-"))
        os.environ[_SCOPES_ENV] = str(self.folder)  # the workers, started after this, inherit it

    def pytest_unconfigure(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        os.environ.pop(_SCOPES_ENV, None)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        if config.getoption("dist") != "loadscope":
            return None
        from xdist.scheduler import LoadScopeScheduling

        folder = self.folder

        class ScopeScheduling(LoadScopeScheduling):  # type: ignore[misc]
            """The work queue in collection order (SLOW_FIRST), each unit a scope of `xdist_scope`."""

            def __init__(self, config: pytest.Config, log: Any = None) -> None:
                super().__init__(config, log)
                config.option.loadscopereorder = False
                self.scopes: dict[str, str] | None = None

            def _split_scope(self, nodeid: str) -> str:
                if self.scopes is None:
                    found = sorted(folder.glob("gw*.json"))  # every worker collected the same tests
                    self.scopes = json.loads(found[0].read_text()) if found else {}
                return self.scopes.get(nodeid) or nodeid.split("::")[0]

        return ScopeScheduling(config, log)
