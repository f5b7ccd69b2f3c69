"""multipart/form-data bodies parsed as they arrive, into bytes, by python-multipart.

Starlette's `request.form()` streams each file part into a SpooledTemporaryFile wrapped in an
UploadFile, which the encode route then reads back: a visible share of a front's CPU profile for a
one-image request. The route keeps every image in memory anyway, so here each part is
collected as the chunks of the body arrive and joined once when it ends: one copy of the body in
memory, and the event loop is given back between chunks. Same parser, limits and refusals as
Starlette's, and the same reading of repeated fields (the last one counts); tested against it."""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header


class FormError(ValueError):
    """The body is not multipart/form-data this parser can read."""


class TooManyFiles(FormError):
    """More file parts than allowed (the service answers 413: the request asks for too much, it is not malformed)."""


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None  # None: a plain field
    data: bytes


@dataclass(frozen=True)
class Form:
    parts: list[Part]
    encoding: str = "utf-8"

    def files(self, name: str) -> list[Part]:
        """Every part named `name`, in body order (file parts or not: the caller decides)."""
        return [p for p in self.parts if p.name == name]

    def field(self, name: str) -> str | None:
        """The last part named `name` when it is a plain field, decoded (as Starlette's `form.get`);
        None when there is none or it is a file part."""
        last = next((p for p in reversed(self.parts) if p.name == name), None)
        return None if last is None or last.filename is not None else _decode(last.data, self.encoding)


def _decode(data: bytes, encoding: str) -> str:
    try:
        return data.decode(encoding)
    except (UnicodeError, LookupError):  # LookupError: a bytes-to-bytes codec (rot13, hex, zlib) named as charset
        return data.decode("latin-1")


def _charset(params: dict[bytes, bytes]) -> str:
    """The body's declared charset, latin-1 when no codec has that name (as Starlette's); one that is
    no text encoding (rot13, hex) falls back in `_decode`."""
    try:
        return codecs.lookup(params.get(b"charset", b"utf-8").decode("latin-1")).name
    except LookupError:
        return "latin-1"


MAX_FIELD_BYTES = 1 << 20  # a plain field's limit, as Starlette's


class FormParser:
    """Feed the body with `write` as it arrives, then `finish`. Raises TooManyFiles past `max_files`
    file parts, FormError past `max_fields` plain fields and for anything malformed (no boundary, a
    part without a name, a field over MAX_FIELD_BYTES, a body python-multipart refuses)."""

    def __init__(self, content_type: str, *, max_files: int, max_fields: int) -> None:
        _, params = parse_options_header(content_type)
        self.encoding = _charset(params)
        boundary = params.get(b"boundary")
        if not boundary:
            raise FormError("missing boundary in multipart")
        self.max_files, self.max_fields = max_files, max_fields
        self.parts: list[Part] = []
        self._files = self._fields = 0
        self._header_name, self._header_value = bytearray(), bytearray()
        self._disposition = b""
        self._name: str | None = None
        self._filename: str | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        callbacks = {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
        }
        self._parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]

    def write(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise FormError(str(exc)) from None

    def finish(self) -> Form:
        try:
            self._parser.finalize()
        except MultipartParseError as exc:
            raise FormError(str(exc)) from None
        return Form(self.parts, self.encoding)

    def _on_part_begin(self) -> None:
        self._disposition, self._name, self._filename = b"", None, None
        self._chunks, self._size = [], 0

    def _on_header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise FormError('the Content-Disposition header field "name" must be provided')
        self._name = _decode(options[b"name"], self.encoding)
        if b"filename" in options:
            self._files += 1
            if self._files > self.max_files:
                raise TooManyFiles(f"too many files; the limit is {self.max_files}")
            self._filename = _decode(options[b"filename"], self.encoding)
        else:
            self._fields += 1
            if self._fields > self.max_fields:
                raise FormError(f"too many fields; the limit is {self.max_fields}")

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._chunks.append(data[start:end])
        self._size += end - start
        if self._filename is None and self._size > MAX_FIELD_BYTES:
            raise FormError(f"a field exceeded {MAX_FIELD_BYTES // 1024} KB")

    def _on_part_end(self) -> None:
        if self._name is not None:
            data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
            self.parts.append(Part(self._name, self._filename, data))
        self._chunks = []


def parse_form(body: bytes, content_type: str, *, max_files: int, max_fields: int) -> Form:
    """A whole body at once (see FormParser)."""
    parser = FormParser(content_type, max_files=max_files, max_fields=max_fields)
    parser.write(body)
    return parser.finish()
