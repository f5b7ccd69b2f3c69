"""multipart/form-data bodies parsed in memory, by python-multipart.

Starlette's `request.form()` streams each file part into a SpooledTemporaryFile wrapped in an
UploadFile, which the encode route then reads back: ≈ 10 % of a front's CPU for a one-image request
(py-spy, tiny model, 2 cores). The body is already bounded by `BodyLimit`, and the route keeps every
image in memory anyway, so here the parts go straight into bytes. Same parser, same limits and
the same refusals as Starlette's (tested against it)."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header


class FormError(ValueError):
    """The body is not multipart/form-data this parser can read."""


class TooManyParts(FormError):
    """More file parts (or fields) than allowed."""


@dataclass
class Part:
    name: str
    filename: str | None  # None: a plain field
    data: bytearray = field(default_factory=bytearray)


@dataclass
class Form:
    parts: list[Part]
    encoding: str = "utf-8"

    def files(self, name: str) -> list[Part]:
        """Every part named `name`, in body order (file parts or not: the caller decides)."""
        return [p for p in self.parts if p.name == name]

    def field(self, name: str) -> str | None:
        """The first plain field named `name`, decoded; None when absent or a file part."""
        for p in self.parts:
            if p.name == name:
                return _decode(bytes(p.data), self.encoding) if p.filename is None else None
        return None


def _decode(data: bytes, encoding: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError:
        return data.decode("latin-1")


MAX_FIELD_BYTES = 1 << 20  # a plain field's limit, as Starlette's


def parse_form(body: bytes, content_type: str, *, max_files: int, max_fields: int) -> Form:
    """Parse a whole multipart/form-data body. Raises TooManyParts past `max_files` file parts or
    `max_fields` plain fields, FormError for anything malformed (no boundary, a part without a
    name, a body python-multipart refuses)."""
    _, params = parse_options_header(content_type)
    charset = params.get(b"charset", b"utf-8")
    try:
        encoding = codecs.lookup(charset.decode("latin-1")).name
    except LookupError:
        encoding = "latin-1"
    boundary = params.get(b"boundary")
    if not boundary:
        raise FormError("missing boundary in multipart")

    parts: list[Part] = []
    header_name, header_value = bytearray(), bytearray()
    disposition = b""
    counts = {"files": 0, "fields": 0}
    current: Part | None = None

    def on_part_begin() -> None:
        nonlocal disposition, current
        disposition, current = b"", None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        nonlocal disposition
        if bytes(header_name).lower() == b"content-disposition":
            disposition = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        nonlocal current
        _, options = parse_options_header(disposition)
        if b"name" not in options:
            raise FormError('the Content-Disposition header field "name" must be provided')
        name = _decode(options[b"name"], encoding)
        if b"filename" in options:
            counts["files"] += 1
            if counts["files"] > max_files:
                raise TooManyParts(f"too many files; the limit is {max_files}")
            current = Part(name, _decode(options[b"filename"], encoding))
        else:
            counts["fields"] += 1
            if counts["fields"] > max_fields:
                raise TooManyParts(f"too many fields; the limit is {max_fields}")
            current = Part(name, None)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        assert current is not None  # python-multipart calls on_headers_finished first
        current.data.extend(data[start:end])
        if current.filename is None and len(current.data) > MAX_FIELD_BYTES:
            raise FormError(f"a field exceeded {MAX_FIELD_BYTES // 1024} KB")

    def on_part_end() -> None:
        if current is not None:
            parts.append(current)

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise FormError(str(exc)) from None
    return Form(parts, encoding)
