"""Take docs/playground.png: the playground on the shipped model, a real photo, a hovered token.

.venv/bin/python scripts/playground_screenshot.py [PHOTO]      (needs Debian's chromium)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.settings import Settings  # noqa: E402
from tests.browser import Browser  # noqa: E402
from tests.helpers import ServerThread  # noqa: E402

PHOTO = REPO.parent / "shared" / "data" / "kodak" / "kodim23.png"


def main() -> None:
    photo = Path(sys.argv[1]) if len(sys.argv) > 1 else PHOTO
    settings = Settings(device="cpu", warmup_sizes=[256], log_format="text")  # the shipped repository
    server = ServerThread(settings).start()
    tmp = tempfile.TemporaryDirectory()
    with tmp, Browser.launch(Path(tmp.name) / "profile") as browser:
        page = browser.new_page()
        page.resize(1280, 900)
        page.goto(f"{server.url}/playground")
        page.wait_for("document.querySelector('#model') && !document.querySelector('#model').disabled")
        page.set_files("#file", [photo])
        page.wait_for("!document.querySelector('#go').disabled")
        page.set_value("#resize", "crop")
        page.click("#go")
        page.wait_for("document.body.dataset.state === 'done'", timeout=120)
        height = page.evaluate("Math.ceil(document.querySelector('main').getBoundingClientRect().bottom) + 24")
        page.resize(1280, int(height))
        box = page.evaluate(
            "(() => { const b = document.querySelector('#grid-canvas').getBoundingClientRect(); return [b.x, b.y, b.width, b.height]; })()"
        )
        page.mouse_move(box[0] + 0.62 * box[2], box[1] + 0.28 * box[3])
        page.wait_for("!document.querySelector('#tip').hidden")
        out = page.screenshot(REPO / "docs" / "playground.png", full_page=False)
        print(out, {k: page.text(f"#stat-{k}") for k in ("tokens", "grid", "bpp", "psnr")})
    server.stop()


if __name__ == "__main__":
    main()
