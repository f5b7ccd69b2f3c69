"""GET /playground in a real browser (headless chromium over the DevTools protocol, tests/browser.py)
against a real server on the tiny exported models: the numbers the page shows (tokens, grid, bits per
pixel, PSNR) against the same quantities computed here from the same public API; error display; the
API key field. And /docs, /redoc served from local assets only (no CDN), rendering offline.

The browser tests skip only where no chromium binary is found (install: `apt-get install -y chromium`).
`VQTOK_UPDATE_SCREENSHOTS=1` also copies the playground screenshot to docs/playground.png.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import httpx
import numpy as np
import pytest
from PIL import Image

from models.core import pixels
from tests.browser import INSTALL_HINT, Browser, Page, find_chromium
from tests.helpers import ServerThread

REPO = Path(__file__).resolve().parents[2]
PHOTO = "imagenet_820_n04310018_steam_locomotive.jpg"  # 256×256 JPEG: sides are multiples of f=4, so resize=none works
KEY = "playground-test-key"


# --- fixtures ---


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    binary = find_chromium()
    if binary is None:
        pytest.skip(INSTALL_HINT)
    with Browser.launch(tmp_path_factory.mktemp("chromium") / "profile", binary) as b:
        yield b


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    p = browser.new_page()
    p.resize(1280, 900)
    yield p
    browser.close_page(p)


@pytest.fixture(scope="module")
def photo(photos_val_dir: Path) -> Path:
    path = photos_val_dir / PHOTO
    assert path.exists(), path
    return path


# --- the same quantities, computed here from the public API ---


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def api_round_trip(url: str, data: bytes, name: str, model: str, resize: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """encode (multipart, as the page sends it) then decode (Accept: image/png), by the public routes."""
    with httpx.Client(base_url=url, timeout=60, headers=headers or {}) as c:
        enc = c.post("/v1/encode", files={"images": (name, data, "application/octet-stream")}, data={"model": model, "resize": resize})
        assert enc.status_code == 200, enc.text
        body = enc.json()
        item = body["images"][0]
        dec = c.post("/v1/decode", json={"tokens": item["tokens"], "model": body["model"]}, headers={"Accept": "image/png"})
        assert dec.status_code == 200, dec.text
        k = body["codebook_size"]
    recon = pixels.decode_png(dec.content)
    h, w = item["grid"]
    big_h, big_w = recon.shape[:2]
    return {"tokens": item["tokens"], "grid": (h, w), "K": k, "recon": recon, "bpp": h * w * math.log2(k) / (big_h * big_w)}


# --- driving the page ---


def open_playground(page: Page, server: ServerThread) -> None:
    page.goto(f"{server.url}/playground")
    page.wait_for(
        "document.querySelector('#model') && (!document.querySelector('#model').disabled || document.body.dataset.state === 'error')"
    )


def tokenize(page: Page, image: Path, model: str, resize: str) -> dict[str, str]:
    """Pick the file, choose model and resize, press Tokenize, wait; the shown numbers (or the error)."""
    page.set_files("#file", [image])
    page.wait_for("!document.querySelector('#go').disabled")
    page.set_value("#model", model)
    page.set_value("#resize", resize)
    page.click("#go")
    page.wait_for("['done', 'error'].includes(document.body.dataset.state)", timeout=60)
    if page.evaluate("document.body.dataset.state") == "error":
        return {"error": page.text("#error-title") + ": " + page.text("#error-detail")}
    return {k: page.text(f"#stat-{k}") for k in ("tokens", "grid", "bpp", "psnr", "k")} | {"note": page.text("#psnr-note")}


def number(text: str) -> float:
    found = re.search(r"-?\d+(\.\d+)?", text.replace(",", ""))
    assert found, text
    return float(found.group())


def assert_only_local(page: Page, server: ServerThread) -> None:
    """Every request the page made went to this server (or was a blob:/data: URL it made itself)."""
    urls = page.requested_urls()
    assert urls
    foreign = [u for u in urls if not (u.startswith(server.url + "/") or u.startswith(("blob:", "data:")))]
    assert not foreign, foreign


# --- the playground ---


def test_playground_numbers_match_the_api(page: Page, server: ServerThread, photo: Path, tmp_path: Path) -> None:
    """resize=none on a real 256×256 JPEG: token count, grid, bpp shown = computed; the tokens are the
    API's; PSNR within 0.5 dB of Python's over the same pixels (the browser decodes the JPEG itself)."""
    open_playground(page, server)
    assert page.evaluate("document.querySelector('#model').value") == "fsq4"  # the server's default
    shown = tokenize(page, photo, "fsq4", "none")
    assert "error" not in shown, shown

    data = photo.read_bytes()
    ref = api_round_trip(server.url, data, photo.name, "fsq4", "none")
    h, w = ref["grid"]
    assert (h, w) == (64, 64)
    assert int(number(shown["tokens"])) == h * w
    assert [int(v) for v in re.findall(r"\d+", shown["grid"])] == [h, w]
    assert int(number(shown["k"])) == ref["K"] == 1000
    assert number(shown["bpp"]) == pytest.approx(ref["bpp"], abs=6e-5)  # shown with 4 decimals
    assert page.evaluate("window.vqtokPlayground.state.last.tokens") == ref["tokens"]
    expected = psnr(pixels.decode_pixels(data), ref["recon"])
    print(f"none: shown {shown}; computed tokens {h * w}, grid {h}×{w}, bpp {ref['bpp']:.6f}, PSNR {expected:.4f} dB")
    assert abs(number(shown["psnr"]) - expected) < 0.5, (shown["psnr"], expected)
    assert "≈" not in shown["psnr"]
    assert "resize=none" in shown["note"]

    # Hovering a cell of the heat map names its row, column and id.
    r, c = 5, 41
    box = page.evaluate(
        "(() => { const b = document.querySelector('#grid-canvas').getBoundingClientRect(); return [b.x, b.y, b.width, b.height]; })()"
    )
    height = page.evaluate("Math.ceil(document.querySelector('main').getBoundingClientRect().bottom) + 24")
    page.resize(1280, int(height))  # the whole page in the viewport, so the hover survives the screenshot
    page.mouse_move(box[0] + (c + 0.5) * box[2] / w, box[1] + (r + 0.5) * box[3] / h)
    tip = page.wait_for("!document.querySelector('#tip').hidden && document.querySelector('#tip').textContent")
    assert tip == f"row {r}, column {c} · id {ref['tokens'][r][c]}"
    assert_only_local(page, server)

    shot = page.screenshot(tmp_path / "playground.png", full_page=False)
    with Image.open(shot) as im:
        assert im.size == (1280, height)


def test_playground_pad_and_crop(page: Page, server: ServerThread, photo: Path, tmp_path: Path) -> None:
    """pad on a lossless PNG whose sides are not multiples of f: PSNR over the original region equals
    Python's (the browser decodes PNG exactly). crop: shown as approximate, close to Pillow's crop."""
    with Image.open(photo) as im:
        region = np.asarray(im.convert("RGB"))[20:130, 10:161]  # 110×151 of a real photo
    png = tmp_path / "region.png"
    Image.fromarray(region).save(png)

    open_playground(page, server)
    shown = tokenize(page, png, "simvq4", "pad")
    assert "error" not in shown, shown
    ref = api_round_trip(server.url, png.read_bytes(), png.name, "simvq4", "pad")
    assert ref["grid"] == (28, 38)  # 112×152 after padding
    assert int(number(shown["tokens"])) == 28 * 38
    assert number(shown["bpp"]) == pytest.approx(ref["bpp"], abs=6e-5)
    assert ref["bpp"] == pytest.approx(28 * 38 * 10 / (112 * 152))  # K = 1024
    expected = psnr(region, ref["recon"][:110, :151])
    print(f"pad: shown {shown}; computed grid {ref['grid']}, bpp {ref['bpp']:.6f}, PSNR {expected:.4f} dB")
    assert abs(number(shown["psnr"]) - expected) <= 0.011, (shown["psnr"], expected)
    assert "original 151×110 region" in shown["note"]

    shown = tokenize(page, photo, "fsq4", "crop")
    assert "error" not in shown, shown
    data = photo.read_bytes()
    ref = api_round_trip(server.url, data, photo.name, "fsq4", "crop")
    assert ref["grid"] == (8, 8) and int(number(shown["tokens"])) == 64
    assert number(shown["bpp"]) == pytest.approx(ref["bpp"], abs=6e-5)
    prepared = pixels.prepare(data, downsample=4, resolution=32, resize="crop").pixels
    expected = psnr(prepared, ref["recon"])
    print(f"crop: shown {shown}; computed grid {ref['grid']}, bpp {ref['bpp']:.6f}, PSNR {expected:.4f} dB (Pillow's crop)")
    assert shown["psnr"].startswith("≈")
    assert abs(number(shown["psnr"]) - expected) < 1.0, (shown["psnr"], expected)  # the browser's scaler is not Pillow's
    assert "approximate" in shown["note"]


def test_playground_shows_problem_detail(page: Page, server: ServerThread, photo: Path, tmp_path: Path) -> None:
    """A refused request shows the problem+json status, title and detail."""
    png = tmp_path / "odd.png"
    with Image.open(photo) as im:
        im.convert("RGB").crop((0, 0, 30, 30)).save(png)
    open_playground(page, server)
    shown = tokenize(page, png, "fsq4", "none")
    assert "error" in shown, shown
    assert shown["error"].startswith("422 Unprocessable")
    assert "multiples of 4" in shown["error"]
    assert page.text("#error-type") == "urn:vqtok:problem:invalid-input"
    # The same image with pad works, and clears the error.
    shown = tokenize(page, png, "fsq4", "pad")
    assert "error" not in shown and int(number(shown["tokens"])) == 64
    assert page.evaluate("document.querySelector('#error').hidden")


def test_playground_api_key(page: Page, serve: Callable[..., ServerThread], photo: Path) -> None:
    """With API keys on, the page itself is open; its API calls need the key from the key field
    (sent as `Authorization: Bearer …`); without it the 401 detail is shown."""
    server = serve(api_keys=[KEY], default_model="simvq4")
    assert httpx.get(f"{server.url}/playground").status_code == 200
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    open_playground(page, server)
    assert page.text("#error-title") == "401 Unauthorized"
    assert "API key" in page.text("#error-detail")

    page.set_value("#apikey", KEY)
    page.wait_for("!document.querySelector('#model').disabled")
    assert page.evaluate("document.querySelector('#error').hidden")
    assert page.evaluate("document.querySelector('#model').value") == "simvq4"
    shown = tokenize(page, photo, "simvq4", "crop")
    assert "error" not in shown, shown
    assert int(number(shown["tokens"])) == 64 and int(number(shown["k"])) == 1024
    assert number(shown["bpp"]) == pytest.approx(64 * 10 / (32 * 32), abs=6e-5)

    page.set_value("#apikey", "a-wrong-key-1234")  # the model list is fetched again, and refused
    page.wait_for("!document.querySelector('#error').hidden")
    assert page.text("#error-title") == "401 Unauthorized"
    assert page.evaluate("document.querySelector('#go').disabled")


def photo_451x300(kodak_dir: Path, folder: Path) -> Path:
    """An ordinary photo size (sides not multiples of f): a Kodak photo resized to 451×300, as a JPEG."""
    path = folder / "ordinary-451x300.jpg"
    with Image.open(kodak_dir / "kodim05.png") as im:
        im.convert("RGB").resize((451, 300), Image.Resampling.BICUBIC).save(path, "JPEG", quality=90)
    return path


def test_playground_resize_control_defaults_to_crop(server: ServerThread, kodak_dir: Path, tmp_path: Path) -> None:
    """Issue 29: the page's resize control starts at crop (the server's default, which /v1/models names
    and the page follows), and the request the page sends for an ordinary 451×300 photo succeeds."""
    html = httpx.get(f"{server.url}/playground").text
    select = re.search(r'<select id="resize">(.*?)</select>', html, re.S)
    assert select, html
    options = re.findall(r'<option value="(\w+)"( selected)?>', select.group(1))
    assert options[0] == ("crop", " selected") and [v for v, _ in options] == ["crop", "pad", "none"]
    script = httpx.get(urljoin(f"{server.url}/playground", "playground/playground.js")).text
    assert "body.limits.default_resize" in script and 'form.append("resize", resize)' in script
    assert httpx.get(f"{server.url}/v1/models").json()["limits"]["default_resize"] == "crop"
    photo = photo_451x300(kodak_dir, tmp_path)
    ref = api_round_trip(server.url, photo.read_bytes(), photo.name, "fsq4", "crop")  # the page's request: images, model, resize
    assert ref["grid"] == (8, 8)


def test_playground_tokenizes_an_ordinary_photo_as_it_opens(
    page: Page, serve: Callable[..., ServerThread], kodak_dir: Path, tmp_path: Path
) -> None:
    """In the browser: the control shows the server's default resize, and an ordinary 451×300 photo
    tokenizes with nothing chosen; a server configured for pad gets pad preselected."""
    photo = photo_451x300(kodak_dir, tmp_path)
    for default, grid in (("crop", [8, 8]), ("pad", [75, 113])):  # pad: 451×300 -> 452×300 at f = 4
        server = serve(default_model="fsq4", default_resize=default)
        open_playground(page, server)
        assert page.evaluate("document.querySelector('#resize').value") == default
        page.set_files("#file", [photo])
        page.wait_for("!document.querySelector('#go').disabled")
        page.click("#go")
        page.wait_for("['done', 'error'].includes(document.body.dataset.state)", timeout=60)
        assert page.evaluate("document.body.dataset.state") == "done", page.text("#error-detail")
        assert [int(v) for v in re.findall(r"\d+", page.text("#stat-grid"))] == grid


def test_playground_assets(server: ServerThread) -> None:
    """The page, its script and style: served open, no external URL, not in the OpenAPI schema."""
    html = httpx.get(f"{server.url}/playground")
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in html.headers["content-security-policy"]
    for path, kind in (("playground/playground.js", "text/javascript"), ("playground/playground.css", "text/css")):
        r = httpx.get(urljoin(f"{server.url}/playground", path))
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
        assert not re.search(r"https?://", r.text), path
    assert not re.search(r"https?://", html.text)
    assert httpx.get(f"{server.url}/playground/other.js").status_code == 404
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert not any(p.startswith(("/playground", "/docs", "/redoc")) for p in paths)


# --- /docs and /redoc without a CDN ---


def asset_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)


@pytest.mark.parametrize("route", ["/docs", "/redoc"])
def test_docs_reference_only_local_assets(server: ServerThread, route: str) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        page = c.get(route)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert not re.search(r"https?://", page.text), "a URL to another host in " + route
        assert "img-src 'self'" in page.headers["content-security-policy"]  # ReDoc's CDN logo is never requested
        urls = asset_urls(page.text)
        assert any(u.endswith(".js") for u in urls), urls
        for url in urls:
            parsed = urlparse(url)
            assert not parsed.scheme and not parsed.netloc, url
            r = c.get(url)
            assert r.status_code == 200, (url, r.status_code)
            assert len(r.content) > 100 or url.endswith(".png"), url
        assert c.get("/openapi.json").status_code == 200


def test_openapi_refs_resolve(server: ServerThread) -> None:
    """Every `$ref` in /openapi.json names a component that exists (the JSON request bodies of encode
    and decode name theirs by hand); a dangling one breaks Swagger UI's operation and all of ReDoc."""
    document = httpx.get(f"{server.url}/openapi.json").json()
    refs = set(re.findall(r'"\$ref":\s*"#/components/schemas/([^"]+)"', json.dumps(document)))
    assert {"EncodeJSONRequest", "DecodeJSONRequest"} <= refs
    assert refs <= document["components"]["schemas"].keys(), refs - document["components"]["schemas"].keys()


def test_docs_render_offline(page: Page, server: ServerThread) -> None:
    """Swagger UI lists the operations (an expanded one resolves its body schema) and ReDoc renders,
    with every request going to this server."""
    page.goto(f"{server.url}/docs")
    count = page.wait_for("document.querySelectorAll('.opblock').length >= 5 && document.querySelectorAll('.opblock').length")
    text = page.evaluate("document.body.innerText")
    assert "/v1/encode" in text and "/v1/decode" in text and "/v1/models" in text, count
    assert "Images to token ids" in text
    page.click("#operations-decode-decode_v1_decode_post .opblock-summary-control")
    page.wait_for("document.querySelector('#operations-decode-decode_v1_decode_post .opblock-body') !== null")
    page.wait_for("document.body.innerText.includes('Request body')")
    assert "resolve" not in page.evaluate("document.body.innerText").lower()  # no "Could not resolve reference"
    page.goto(f"{server.url}/redoc")
    page.wait_for("document.body.innerText.includes('Images to token ids') && document.body.innerText.includes('Token ids to images')")
    assert "Something went wrong" not in page.evaluate("document.body.innerText")
    assert_only_local(page, server)
