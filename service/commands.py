"""`vqtok serve` (argparse only at import time).

Every field of `service.settings.Settings` is a flag, generated from the field: `max_batch_size` is
`--max-batch-size` and `VQTOK_MAX_BATCH_SIZE`; the field's type gives the flag's (a Literal gives
choices, a list is comma-separated) and its description the help. A flag given on the command line
wins over the environment; a flag left out does not override it. With no `--model-repo` (and no
`VQTOK_MODEL_REPO`) the repository shipped in `models/pretrained/` is served.

The flags are added when the `serve` subcommand is parsed or its help printed, not when the root
parser is built: they need `Settings` (pydantic, numpy and Pillow, a few hundred ms to import), which
`vqtok tokenize --help` and the other subcommands should not pay for.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from models.core.errors import CLIError

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

    from .settings import Settings


class _ServeParser(argparse.ArgumentParser):
    """The `serve` subparser: the setting flags are added on first use (parse, help or usage)."""

    _setting_flags_added = False

    def _add_setting_flags(self) -> None:
        if not self._setting_flags_added:
            self._setting_flags_added = True
            add_setting_flags(self)

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:  # the subparsers action calls this; typeshed overloads it
        self._add_setting_flags()
        return super().parse_known_args(*args, **kwargs)

    def format_usage(self) -> str:
        self._add_setting_flags()
        return super().format_usage()

    def format_help(self) -> str:
        self._add_setting_flags()
        return super().format_help()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve models over HTTP (FastAPI on ONNX Runtime)",
        description="Serve a model repository over HTTP. Every flag is a setting that can also be set as VQTOK_<SETTING> "
        "in the environment; a flag given wins.",
    )
    p.__class__ = _ServeParser  # the subparsers action builds its own class; this one only adds flags lazily
    p.set_defaults(handler=_serve)


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One `--field-name` flag per `Settings` field (default None: a flag left out overrides nothing), in the
    groups of `settings.GROUPS`."""
    from .settings import GROUPS, Settings

    prefix = str(Settings.model_config.get("env_prefix", ""))
    starts = {first: title for title, first in GROUPS.items()}
    group: Any = parser
    for name, field in Settings.model_fields.items():
        if name in starts:
            group = parser.add_argument_group(starts[name])
        if not field.description:
            raise TypeError(f"Settings.{name} has no description: it is the help of --{name.replace('_', '-')}")
        notes = [f"env {prefix.upper()}{name.upper()}", f"default {_default_text(field)}", *_bounds(field)]
        help_text = f"{field.description} ({'; '.join(notes)})".replace("%", "%%")
        group.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=help_text, **_flag_type(name, field.annotation))


def _flag_type(name: str, annotation: object) -> dict[str, Any]:
    """argparse keywords for a field's annotation; lists are comma-separated strings that the
    settings' own validators split."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):  # X | None: the flag takes an X
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _flag_type(name, rest[0])
    elif origin is Literal and all(isinstance(a, str) for a in args):
        return {"type": str, "choices": list(args)}
    elif origin is list and args in ((int,), (str,)):
        return {"type": str, "metavar": "N[,N...]" if args == (int,) else "KEY[,KEY...]"}
    elif annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    elif annotation in (int, float, str, Path):
        return {"type": annotation}
    raise TypeError(f"Settings.{name}: no command-line flag for a setting of type {annotation!r}")


def _default_text(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "empty"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _bounds(field: FieldInfo) -> list[str]:
    """The field's numeric constraints (`Field(ge=1, le=1024)` -> ">= 1, <= 1024")."""
    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    found = [f"{sign} {getattr(c, attr)}" for c in field.metadata for attr, sign in signs.items() if getattr(c, attr, None) is not None]
    return [", ".join(found)] if found else []


def settings_from_args(args: argparse.Namespace) -> Settings:
    """`Settings` from the flags given, over the environment, over the defaults; CLIError naming
    each invalid setting."""
    from pydantic import ValidationError

    from .settings import Settings

    overrides = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise CLIError("invalid settings:\n" + "\n".join(f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from . import logs
    from .app import create_app, uvicorn_config

    settings = settings_from_args(args)
    logs.configure(settings.log_format, "debug" if args.verbose else settings.log_level)
    if not settings.model_repo.is_dir():
        raise CLIError(f"model repository {settings.model_repo} is not a directory")
    if not _has_models(settings.model_repo):
        raise CLIError(f"model repository {settings.model_repo} holds no exported model directory (manifest.json): pass --model-repo DIR")
    if settings.front_workers > 0:
        from .multiproc.server import serve

        return serve(settings)
    uvicorn.Server(uvicorn_config(create_app(settings), settings)).run()
    return 0


def _has_models(repo: Path) -> bool:
    return repo.is_dir() and (
        (repo / "manifest.json").exists() or any((d / "manifest.json").exists() for d in repo.iterdir() if d.is_dir())
    )
