"""The clients' typed overloads: one image in gives one grid out, a list gives a list, for `Client`,
`AsyncClient` and `LocalBackend`; `LocalBackend` takes only the devices and precisions that exist.

mypy checks a small program of right and wrong uses (it is never run): the right ones must pass, and
each wrong one (marked `# E`) must be an error on its own line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MYPY = Path(sys.executable).with_name("mypy")
tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PROGRAM = textwrap.dedent(
    """
    from __future__ import annotations

    from collections.abc import Sequence
    from pathlib import Path
    from typing import Any

    import numpy as np
    from PIL import Image

    from clients.client import AsyncClient, Client
    from clients.local import LocalBackend


    def right(client: Client, local: LocalBackend, pixels: np.ndarray, paths: Sequence[Path], anything: list[Any]) -> None:
        one: np.ndarray = client.encode("a.jpg")
        also_one: np.ndarray = client.encode(Path("a.jpg"), resize="crop")
        from_bytes: np.ndarray = client.encode(b"...")
        from_pil: np.ndarray = client.encode(Image.new("RGB", (8, 8)))
        grids: list[np.ndarray] = client.encode([Path("a.jpg"), Path("b.jpg")])
        from_tuple: list[np.ndarray] = client.encode(("a.jpg", b"..."))
        from_sequence: list[np.ndarray] = client.encode(paths)
        from_arrays: list[np.ndarray] = client.encode([pixels, pixels])
        images: list[Image.Image] = client.decode(grids)
        arrays: list[np.ndarray] = client.decode(grids, output="numpy")
        # an array is one image (grid) or a batch, and nested lists one grid: those are not checked
        either: list[np.ndarray] = client.encode(pixels)
        image: Image.Image = client.decode(one)
        from_lists: np.ndarray = client.decode([[1, 2], [3, 4]], output="numpy")
        from_any: Image.Image = client.decode(anything)
        local_one: np.ndarray = local.encode("a.jpg")
        local_images: list[Image.Image] = local.decode(local.encode(["a.jpg"]))
        local_arrays: list[np.ndarray] = local.decode(grids, output="numpy")
        LocalBackend("model", device="cpu", precision="fp16")


    async def right_async(client: AsyncClient) -> None:
        one: np.ndarray = await client.encode("a.jpg")
        grids: list[np.ndarray] = await client.encode(["a.jpg", "b.jpg"])
        images: list[Image.Image] = await client.decode(grids)
        arrays: list[np.ndarray] = await client.decode(grids, output="numpy")


    def wrong(client: Client, local: LocalBackend, pixels: np.ndarray) -> None:
        a: list[np.ndarray] = client.encode("a.jpg")  # E
        b: np.ndarray = client.encode(["a.jpg"])  # E
        c: np.ndarray = client.encode([pixels])  # E
        grids = client.encode([Path("a.jpg")])
        d: Image.Image = client.decode(grids)  # E
        e: list[Image.Image] = client.decode(grids, output="numpy")  # E
        f: list[np.ndarray] = local.encode(b"...")  # E
        g: Image.Image = local.decode(grids)  # E
        LocalBackend("model", device="gpu")  # E
        LocalBackend("model", precision="int8")  # E


    async def wrong_async(client: AsyncClient) -> None:
        a: list[np.ndarray] = await client.encode("a.jpg")  # E
        grids = await client.encode(["a.jpg"])
        b: Image.Image = await client.decode(grids)  # E
    """
)


def mypy_config(path: Path) -> Path:
    """The project's mypy settings without its `packages` (mypy checks one program text instead)."""
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    overrides = options.pop("overrides", [])
    options.pop("packages", None)

    def section(name: str, values: dict[str, object]) -> str:
        lines = [f"{k} = {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in values.items()]
        return f"[{name}]\n" + "\n".join(lines) + "\n"

    text = section("mypy", options)
    for override in overrides:
        modules = override.pop("module")
        text += section("mypy-" + (",".join(modules) if isinstance(modules, list) else modules), override)
    path.write_text(text)
    return path


def test_overloads_accept_right_uses_and_reject_wrong_ones(tmp_path: Path) -> None:
    expected = {n for n, line in enumerate(PROGRAM.splitlines(), 1) if line.endswith("# E")}
    # The program goes in as text (-c): mypy caches no module for it, so no stale result can answer; the
    # packages it imports come from this checkout, checked against the project's cache in .mypy_cache.
    command = [str(MYPY), "--config-file", str(mypy_config(tmp_path / "mypy.ini")), "--no-error-summary", "--hide-error-context"]
    env = {**os.environ, "MYPYPATH": str(REPO)}
    result = subprocess.run([*command, "-c", PROGRAM], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [int(n) for n in re.findall(r"^<string>:(\d+): error: ", result.stdout, flags=re.MULTILINE)]
    assert sorted(lines) == sorted(expected), (
        f"mypy errors on lines {sorted(lines)}, expected {sorted(expected)}:\n{result.stdout}{result.stderr}"
    )
    assert result.returncode == 1 and result.stdout.count(": error: ") == len(expected), result.stdout + result.stderr
