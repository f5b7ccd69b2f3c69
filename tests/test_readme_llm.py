"""README's "From images to LLM input and back" runs as written: its ```bash and ```python blocks, in
order, in one shell (a python block is run as `python - <<'EOF'`), against a server on the shipped
model, from a checkout-like folder whose `../shared/data` is the shared data; and every `quoted`
output its "It prints ..." sentences promise appears in what they printed ("…" stands for a part
that depends on the photo)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, ServerThread

SECTION = "### From images to LLM input and back"
DATA = REPO.parent / "shared" / "data"

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(not (DATA / "kodak").is_dir(), reason="the section reads ../shared/data/kodak"),
]


def section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = min(i for i in (text.find("\n### ", start + 1), text.find("\n## ", start + 1)) if i > 0)
    return text[start:end]


def script(text: str) -> str:
    """The section's code blocks as one bash script, in order."""
    parts = ["set -euo pipefail"]
    for lang, code in re.findall(r"```(bash|python)\n(.*?)```", text, re.S):
        parts.append(code if lang == "bash" else f"python - <<'VQTOK_README_PY'\n{code}VQTOK_README_PY\n")
    assert len(parts) > 6, "the section's code blocks were not found"
    return "\n".join(parts)


def promised(text: str) -> list[str]:
    """The `quoted` outputs of every "It prints ..." sentence, as fragments between "…"."""
    out = []
    for sentence in re.findall(r"It prints (.*?)\.(?:\s|$)", text, re.S):
        for quoted in re.findall(r"`([^`]+)`", sentence):
            out += [piece for piece in quoted.split("…") if piece]
    return out


@pytest.mark.slow
def test_readme_llm_section_runs_as_written(tmp_path: Path) -> None:
    from models.core.artefacts import pretrained_repo
    from service.settings import Settings

    text = section()
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (tmp_path / "shared").symlink_to(REPO.parent / "shared")
    settings = Settings(model_repo=pretrained_repo(), device="cpu", warmup_sizes=[256], log_format="text", request_timeout_s=300)
    server = ServerThread(settings).start(timeout=300)
    try:
        env = {k: v for k, v in os.environ.items() if k != "VQTOK_BASE_URL"}
        env |= {"VQTOK_BASE_URL": server.url, "PATH": f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(["bash", "-c", script(text)], cwd=checkout, env=env, capture_output=True, text=True, timeout=800)
    finally:
        server.stop()
    out = result.stdout
    assert result.returncode == 0, f"{out[-4000:]}\n{result.stderr[-4000:]}"
    missing = [p for p in promised(text) if p not in out]
    assert not missing, f"promised but not printed: {missing}\n--- printed:\n{out}"
    assert (checkout / "plain.png").stat().st_size > 1000 and (checkout / "lumina.png").stat().st_size > 1000
    assert (checkout / "captioned-tokens" / "__packed__" / "input_ids.idx").is_file()
