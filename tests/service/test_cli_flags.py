"""`vqtok serve` flags are generated from `Settings`: one per field, typed from its annotation, with
its description as help; a flag given wins over the environment, a flag left out does not."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from models.core.errors import CLIError
from service.commands import _flag_type, settings_from_args
from service.settings import Settings
from vqtok.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


def serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = sub.choices["serve"]
    return parser


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_every_setting_has_a_flag_and_a_description() -> None:
    parser = serve_parser()
    parser.format_help()  # the flags are added on first use
    flags = {s: a.dest for a in parser._actions for s in a.option_strings}
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} has no description"
        flag = "--" + name.replace("_", "-")
        assert flags.get(flag) == name, f"no {flag} for Settings.{name}"
    assert set(flags.values()) - {"help"} == set(Settings.model_fields)


def test_help_lists_every_flag_with_env_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse("--help")
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in out
        assert f"env VQTOK_{name.upper()}" in out
    assert "images per inference call (env VQTOK_MAX_BATCH_SIZE; default 32; >= 1, <= 1024)" in out
    assert "--device {auto,cuda,cpu}" in out and "--default-resize {none,crop,pad}" in out


def test_flag_wins_over_environment_and_omitted_flags_do_not_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VQTOK_MAX_BATCH_SIZE", "9")
    monkeypatch.setenv("VQTOK_BATCH_WORKERS", "3")
    settings = settings_from_args(parse("--max-batch-size", "7"))
    assert settings.max_batch_size == 7
    assert settings.batch_workers == 3  # from the environment: no flag given
    assert settings.request_timeout_s == 30.0  # the default
    assert settings_from_args(parse()).max_batch_size == 9


def test_typed_flags_and_comma_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VQTOK_WARMUP_BATCH_SIZES", "1,2")
    args = parse(
        "--warmup-sizes",
        "32, 64",
        "--warmup-batch-sizes",
        "",  # given empty: wins over the environment's list
        "--api-keys",
        "secret-key-1,secret-key-2",
        "--max-batch-delay-ms",
        "0.5",
        "--model-repo",
        str(REPO),
        "--device",
        "cpu",
        "--retry-after-s",
        "4",
    )
    settings = settings_from_args(args)
    assert settings.warmup_sizes == [32, 64]
    assert settings.warmup_batch_sizes == []
    assert settings.api_keys == ["secret-key-1", "secret-key-2"] and settings.admin_keys == settings.api_keys
    assert settings.max_batch_delay_ms == 0.5
    assert settings.model_repo == REPO and isinstance(settings.model_repo, Path)
    assert settings.device == "cpu" and settings.retry_after_s == 4


@pytest.mark.parametrize(
    "argv",
    [("--max-batch-size", "many"), ("--device", "gpu"), ("--default-resize", "stretch"), ("--max-batch-delay-ms", "x")],
)
def test_argparse_refuses_a_wrong_type_or_choice(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2 and argv[0] in capsys.readouterr().err


def test_invalid_values_name_the_setting() -> None:
    with pytest.raises(CLIError, match="max_batch_size") as exc_info:
        settings_from_args(parse("--max-batch-size", "0"))
    assert exc_info.value.code == 2
    with pytest.raises(CLIError, match="warmup_sizes"):
        settings_from_args(parse("--warmup-sizes", "32,big"))


def test_a_setting_of_an_unknown_type_has_no_flag() -> None:
    with pytest.raises(TypeError, match="no command-line flag"):
        _flag_type("odd", dict[str, int])
    assert _flag_type("flag", bool) == {"action": argparse.BooleanOptionalAction}


def test_building_the_root_parser_imports_no_pydantic() -> None:
    """The serve flags are added when `serve` is parsed: `vqtok tokenize --help` stays light."""
    code = "import sys, vqtok.cli; vqtok.cli.build_parser(); assert 'pydantic' not in sys.modules, 'pydantic imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_serve_help_groups_the_flags_as_the_settings_are_grouped() -> None:
    """`vqtok serve --help` lists its flags under the settings' headings, each flag in its group."""
    import subprocess
    import sys

    from service.settings import GROUPS, Settings

    names = list(Settings.model_fields)
    firsts = [names.index(first) for first in GROUPS.values()]
    assert firsts == sorted(firsts) and firsts[0] == 0  # every field falls in exactly one group
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from vqtok.cli import main; sys.exit(main())", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    positions = [out.index(f"\n{title}:\n") for title in GROUPS]
    assert positions == sorted(positions)
    for (title, first), end in zip(GROUPS.items(), [*positions[1:], len(out)], strict=True):
        start = out.index(f"\n{title}:\n")
        lo = names.index(first)
        hi = firsts[firsts.index(lo) + 1] if lo != firsts[-1] else len(names)
        section = out[start:end]
        for name in names[lo:hi]:
            assert f"--{name.replace('_', '-')}" in section, (title, name)
