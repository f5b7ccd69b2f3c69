"""The one name → directory rule (`models.core.artefacts.resolve_model_dir`) wherever a model is named:
`Tokenizer.from_pretrained`, `LocalBackend`, `vqtok eval --model`, `vqtok codebook retrain --model`;
shipped names from any working directory; Hugging Face hub ids through a local hub cache, offline."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.core.artefacts import DEFAULT_MODEL, hub_id, model_name, open_exported, pretrained_repo, resolve_model_dir
from models.core.errors import ModelNotFound
from tests.helpers import exported_model_repo
from vqtok.cli import main

REPO = Path(__file__).resolve().parents[2]
SHIPPED = pretrained_repo() / DEFAULT_MODEL
COMMIT = "0123456789abcdef0123456789abcdef01234567"
NOT_FOUND = "no such directory, and no shipped model"
HAS_HUB = importlib.util.find_spec("huggingface_hub") is not None
needs_hub = pytest.mark.skipif(not HAS_HUB, reason="huggingface_hub is not installed (pip install 'vqtok[hub]')")


def python(code: str, *, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter: huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE at import."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=base | (env or {}), capture_output=True, text=True, timeout=300)


# --- the rule ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("org/name", ("org/name", None)),
        ("my-org/photo-f8.v2", ("my-org/photo-f8.v2", None)),
        ("org/name@v1.0", ("org/name", "v1.0")),
        (f"org/name@{COMMIT}", ("org/name", COMMIT)),
        ("name", None),  # a bare NAME is a shipped model, never a hub lookup
        ("./name", None),
        ("../org/name", None),
        ("/abs/name", None),
        ("runs/a/model", None),
        ("org/../name", None),
        ("org--x/name", None),
        ("org/name-", None),
        ("org\\name", None),
    ],
)
def test_hub_id_syntax(text: str, expected: tuple[str, str | None] | None) -> None:
    assert hub_id(text) == expected


def test_paths_and_shipped_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model_dir(None) == SHIPPED
    assert resolve_model_dir(DEFAULT_MODEL) == SHIPPED
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir(DEFAULT_MODEL) == SHIPPED  # from any working directory
    (tmp_path / DEFAULT_MODEL).mkdir()
    assert resolve_model_dir(DEFAULT_MODEL) == Path(DEFAULT_MODEL)  # an existing directory is itself
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelNotFound, match="is a file, not a model directory"):
        resolve_model_dir("file")
    with pytest.raises(ModelNotFound, match=f"no-such-model: {NOT_FOUND} of that name \\(shipped: .*{DEFAULT_MODEL}"):
        resolve_model_dir("no-such-model")
    with pytest.raises(ModelNotFound, match=NOT_FOUND):
        resolve_model_dir(tmp_path / "a" / "b")  # an absolute path is never a hub id


def test_model_name() -> None:
    assert model_name(SHIPPED) == DEFAULT_MODEL
    assert model_name(Path("/cache/models--org--photo-f8/snapshots") / COMMIT) == "photo-f8"
    assert model_name(Path("/runs/x/snapshots/abc")) == "abc"


def test_names_from_another_working_directory(tmp_path: Path) -> None:
    code = (
        "import vqtok; from models.core.artefacts import resolve_model_dir\n"
        f"tok = vqtok.Tokenizer.from_pretrained({DEFAULT_MODEL!r})\n"
        f"print(tok.codebook_size, tok.downsample, resolve_model_dir({DEFAULT_MODEL!r}))"
    )
    result = python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["16384", "8", str(SHIPPED)]


def test_a_name_without_huggingface_hub_says_what_to_install(tmp_path: Path) -> None:
    """ORG/NAME that is no directory, with huggingface_hub missing: one line naming the pip fix."""
    code = (
        "import sys; sys.modules['huggingface_hub'] = None\n"
        "from models.core.artefacts import resolve_model_dir\n"
        "from models.core.errors import ModelNotFound\n"
        "try:\n    resolve_model_dir('org/name')\nexcept ModelNotFound as exc:\n    print(exc)"
    )
    result = python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    message = result.stdout.strip()
    assert "\n" not in message and NOT_FOUND in message and "pip install huggingface_hub" in message


# --- Hugging Face hub ids, from a hub cache built here (no network) ---


def hub_cache(root: Path, repo_id: str, model_dir: Path) -> Path:
    """`model_dir` laid out as huggingface_hub caches a download of `repo_id` at `main`:
    blobs/<hash>, snapshots/<commit>/<file> -> ../../blobs/<hash>, refs/main = <commit>."""
    import hashlib

    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(model_dir.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def hub(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hub cache holding `acme/tiny-fsq`: a tiny untrained tokenizer, `create_tokenizer("cifar-fsq",
    base_channels=8, norm_groups=4, num_res_blocks=1).save_pretrained(...)` then exported to ONNX
    (`tests.helpers.exported_model_repo`), so both torch and ONNX Runtime can load it, plus its hub card."""
    from models.tokenizer import Tokenizer

    saved = exported_model_repo(request, tmp_path_factory, {"tiny-fsq": "cifar-fsq"}) / "tiny-fsq"
    card = Tokenizer.from_pretrained(saved).save_pretrained(tmp_path_factory.mktemp("card") / "tiny-fsq", model_card=True)
    (saved / "README.md").write_bytes((card / "README.md").read_bytes())
    root = tmp_path_factory.mktemp("hf") / "hub"
    hub_cache(root, "acme/tiny-fsq", saved)
    return root


@needs_hub
def test_hub_id_from_the_local_cache_offline(hub: Path, tmp_path: Path) -> None:
    snapshot = hub / "models--acme--tiny-fsq" / "snapshots" / COMMIT
    code = (
        "import json, numpy, torch, vqtok\n"
        "from models.core.artefacts import model_name, resolve_model_dir\n"
        "tok = vqtok.Tokenizer.from_pretrained('acme/tiny-fsq')\n"
        "ids = tok.encode(torch.zeros(1, 3, 32, 32))\n"
        "d = resolve_model_dir('acme/tiny-fsq')\n"
        f"pinned = resolve_model_dir('acme/tiny-fsq@{COMMIT}')\n"
        "from clients.local import LocalBackend\n"
        "with LocalBackend('acme/tiny-fsq', device='cpu') as backend:\n"
        "    local = backend.encode(numpy.zeros((32, 32, 3), numpy.uint8))\n"
        "    served = backend.info.name\n"
        "print(json.dumps({'dir': str(d), 'pinned': str(pinned), 'name': model_name(d), 'served': served,\n"
        "                  'K': tok.codebook_size, 'grid': list(ids.shape), 'local': list(local.shape)}))"
    )
    result = python(code, cwd=tmp_path, env={"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert Path(got["dir"]).resolve() == Path(got["pinned"]).resolve() == snapshot.resolve()
    assert got["name"] == got["served"] == "tiny-fsq" and got["K"] == 1000 and got["grid"] == [1, 8, 8] and got["local"] == [8, 8]
    assert (snapshot / "README.md").is_file() and (snapshot / "manifest.json").is_file()


@needs_hub
def test_hub_id_not_in_the_cache_offline_is_one_clear_line(hub: Path, tmp_path: Path) -> None:
    code = (
        "from models.core.artefacts import resolve_model_dir\n"
        "from models.core.errors import ModelNotFound\n"
        "try:\n    resolve_model_dir('acme/not-cached')\nexcept ModelNotFound as exc:\n    print(exc)"
    )
    result = python(code, cwd=tmp_path, env={"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    message = result.stdout.strip()
    assert message.startswith(f"acme/not-cached: {NOT_FOUND}") and "as a Hugging Face hub id" in message and "\n" not in message


@needs_hub
def test_hub_id_on_the_command_line(hub: Path, tmp_path: Path) -> None:
    """`vqtok eval --model ORG/NAME` resolves through the cache; --data is checked next."""
    code = "import sys; from vqtok.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "PATH": ""}
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    for model, message in (("acme/tiny-fsq", "--data"), ("acme/other", f"--model: acme/other: {NOT_FOUND}")):
        args = [sys.executable, "-c", code, "eval", "--model", model, "--data", str(tmp_path / "missing")]
        result = subprocess.run(args, cwd=tmp_path, env=base | env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr


# --- the model card ---


def test_save_pretrained_writes_a_hub_card_and_keeps_one(tmp_path: Path) -> None:
    from models.presets import create_tokenizer
    from models.tokenizer import CheckpointError, Tokenizer

    tok = create_tokenizer("cifar-fsq", base_channels=8, norm_groups=4, num_res_blocks=1)
    assert sorted(p.name for p in tok.save_pretrained(tmp_path / "bare", model_card=False).iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    out = tok.save_pretrained(tmp_path / "tiny", model_card=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    for line in ("library_name: vqtok", "license: other", "pipeline_tag: image-feature-extraction", "- fsq"):
        assert line in front.splitlines()
    assert "K = 1,000" in card and "f = 4" in card and 'from_pretrained("ORG/tiny")' in card
    (out / "README.md").write_text("mine\n")
    tok.save_pretrained(out, model_card=True, license="apache-2.0")
    assert (out / "README.md").read_text() == "mine\n"  # an existing card is never overwritten
    assert Tokenizer.from_pretrained(out).codebook_size == 1000
    with pytest.raises(CheckpointError, match=f"model directory missing: no-such-model: {NOT_FOUND}") as info:
        Tokenizer.from_pretrained("no-such-model")
    assert isinstance(info.value.__cause__, ModelNotFound)


def test_the_shipped_model_has_a_hub_card_and_still_verifies() -> None:
    import yaml

    card = (SHIPPED / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "vqtok" and meta["pipeline_tag"] == "image-feature-extraction" and meta["license"]
    assert "K = 16,384" in card and "f = 8" in card and "MODEL_CARD.md" in card
    assert (SHIPPED / "MODEL_CARD.md").is_file()
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    assert not {"README.md", "MODEL_CARD.md"} & set(manifest["files"])  # cards are not hashed artefacts
    assert open_exported(SHIPPED, verify=True).info.codebook_size == 16384
    if HAS_HUB:
        from huggingface_hub import ModelCard

        assert ModelCard.load(SHIPPED / "README.md").data.library_name == "vqtok"


# --- LocalBackend and the commands by name ---


def test_local_backend_by_name(kodak_dir: Path) -> None:
    pytest.importorskip("onnxruntime")
    from clients.local import LocalBackend

    image = sorted(kodak_dir.glob("*.png"))[0]
    with LocalBackend(DEFAULT_MODEL, device="cpu", precision="fp32") as by_name, LocalBackend(device="cpu", precision="fp32") as default:
        assert by_name.info.name == default.info.name == DEFAULT_MODEL
        grid = by_name.encode(image, resize="crop")
        assert grid.shape == (32, 32) and grid.min() >= 0 and grid.max() < 16384
        assert (default.encode(image, resize="crop") == grid).all()
    with pytest.raises(ModelNotFound, match=NOT_FOUND):
        LocalBackend("no-such-model", device="cpu")


@pytest.mark.parametrize("command", [["eval"], ["codebook", "retrain", "--out", "OUT"]])
def test_model_names_on_the_command_line(command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A shipped NAME resolves (the command goes on to check --data); a wrong one is exit 2, one line."""
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    missing = str(tmp_path / "missing")
    assert main([*argv, "--model", DEFAULT_MODEL, "--data", missing]) == 2
    assert f"--data {missing} does not exist" in capsys.readouterr().err
    assert main([*argv, "--model", "no-such-model", "--data", missing]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--model: no-such-model: {NOT_FOUND} of that name (shipped: " in err
    assert DEFAULT_MODEL in err.split("(shipped: ")[1]


def test_eval_by_name(photos_val_dir: Path, tmp_path: Path) -> None:
    """`vqtok eval --model photo-f8-simvq-16k` from a directory outside the checkout."""
    code = "import sys; from vqtok.cli import main; sys.exit(main(sys.argv[1:]))"
    out = tmp_path / "report.json"
    args = [
        "eval",
        "--model",
        DEFAULT_MODEL,
        "--data",
        str(photos_val_dir),
        "--limit",
        "2",
        "--no-fid",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert result.returncode == 0, result.stderr
    assert DEFAULT_MODEL in result.stdout
    report = json.loads(out.read_text())
    assert report["model"] == DEFAULT_MODEL and report["tokenizer"]["psnr"] > 20
