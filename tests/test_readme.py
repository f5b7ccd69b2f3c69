"""README's "Use it" sections run as written: the ```bash and ```python blocks of "HTTP", "Python" and
"Tokenize a dataset", in order, in one shell (a python block as `python - <<'EOF'`), from a checkout-like
folder whose `../shared/data` is the shared data, against a real server on the shipped models. The one
change made to the text is the port: the README's server is `scripts/serve.sh` on 8000, the test's on a
free port. What the blocks say they print (`# (32, 32) ...` comments after a print) is checked too.
(The walkthrough and "From images to LLM input and back" have tests of their own.)"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, ServerThread

SECTIONS = ("### HTTP", "### Python", "### Tokenize a dataset")
DATA = REPO.parent / "shared" / "data"

pytestmark = [
    pytest.mark.timeout(1200),
    pytest.mark.skipif(not (DATA / "kodak").is_dir(), reason="the sections read ../shared/data"),
]


def sections() -> str:
    text = (REPO / "README.md").read_text()
    parts = []
    for title in SECTIONS:
        start = text.index(title + "\n")
        end = min(i for i in (text.find("\n### ", start + 1), text.find("\n## ", start + 1)) if i > 0)
        parts.append(text[start:end])
    return "\n".join(parts)


def script(text: str, port: int) -> str:
    parts = ["set -euo pipefail"]
    for lang, code in re.findall(r"```(bash|python)\n(.*?)```", text, re.S):
        code = code.replace("localhost:8000", f"localhost:{port}").replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        parts.append(code if lang == "bash" else f"python - <<'VQTOK_README_PY'\n{code}VQTOK_README_PY\n")
    assert len(parts) >= 6, "the sections' code blocks were not found"
    return "\n".join(parts)


def promised(text: str) -> list[str]:
    """What `print(...)  # ...` lines say they print."""
    return [m.strip() for m in re.findall(r"^print\(.*\)  # ([^:\n]+?)(?::.*)?$", text, re.M)]


@pytest.mark.slow
def test_readme_use_it_sections_run_as_written(tmp_path: Path) -> None:
    from models.core.artefacts import pretrained_repo
    from service.settings import Settings

    text = sections()
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (tmp_path / "shared").symlink_to(REPO.parent / "shared")
    settings = Settings(model_repo=pretrained_repo(), device="cpu", warmup_sizes=[256], log_format="text", request_timeout_s=300)
    server = ServerThread(settings).start(timeout=600)
    try:
        env = dict(os.environ) | {"PATH": f"{REPO / '.venv' / 'bin'}:{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(
            ["bash", "-c", script(text, server.port)], cwd=checkout, env=env, capture_output=True, text=True, timeout=1100
        )
    finally:
        server.stop()
    out = result.stdout
    assert result.returncode == 0, f"{out[-4000:]}\n{result.stderr[-4000:]}"
    missing = [p for p in promised(text) if p not in out]
    assert promised(text) and not missing, f"promised but not printed: {missing}\n--- printed:\n{out}"
    assert (checkout / "out" / "reconstruction.png").read_bytes()[:4] == b"\x89PNG"
    assert (checkout / "out" / "kodim23-tokens.png").stat().st_size > 1000
    for job in ("kodak", "cifar-tokens", "kodak-ray", "kodak-served"):
        assert (checkout / "out" / job / "__vqtok__" / "job.json").is_file(), job
