"""Reading source files into `Document`s: .txt and .md as they are, .html as its visible text
(stdlib `html.parser`, block elements become paragraphs), .jsonl one document per line (text and
id fields configurable). Document ids are the resolved file path (relative to ``root`` when one is
given), or the jsonl id field, or ``PATH#LINE`` for jsonl lines without one."""

from __future__ import annotations

import hashlib

import json
import re
from collections.abc import Iterable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from chunkcache.retriever.chunking import Document
from chunkcache.retriever.errors import DocumentReadError

FORMATS: dict[str, str] = {
    ".txt": "text", ".md": "markdown", ".markdown": "markdown",
    ".html": "html", ".htm": "html", ".jsonl": "jsonl",
}

_BLOCK_TAGS = frozenset(
    "address article aside blockquote dd div dl dt figcaption figure footer h1 h2 h3 h4 h5 h6 "
    "header hr li main nav ol p pre section table tbody td th thead tr ul".split()
)
_SKIP_TAGS = frozenset({"script", "style", "noscript", "template", "svg"})


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title_parts: list[str] = []
        self._skip = 0
        self._in_title = False
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag == "br":
            self.parts.append("\n")
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")
            self._pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self._skip = max(0, self._skip - 1)
        elif tag == "title":
            self._in_title = False
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")
            self._pre = max(0, self._pre - (tag == "pre"))

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._in_title:
            self.title_parts.append(data)
        elif self._pre:
            self.parts.append(re.sub(r"[ \t]+", " ", data))
        else:
            self.parts.append(re.sub(r"\s+", " ", data))


def _normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n[ \t]+", "\n", text)
    text = re.sub(r"[ \t]{2,}", " ", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def html_to_text(html: str) -> tuple[str, str]:
    """(visible text with paragraphs separated by blank lines, page title)."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return _normalise("".join(parser.parts)), " ".join("".join(parser.title_parts).split())


def document_id(path: str | Path, root: str | Path | None = None) -> str:
    """A file's document id: its path below ``root``; without one, its name tagged with a digest
    of where it is (``guide.md@1a2b3c4d5e``): stable for re-ingesting (and deleting) the same
    file, distinct for files of one name in other folders, and never an absolute server path
    (ids are shown to HTTP clients)."""
    resolved = Path(path).resolve()
    if root is None:
        return f"{resolved.name}@{hashlib.sha256(resolved.as_posix().encode()).hexdigest()[:10]}"
    try:
        return resolved.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        raise DocumentReadError(f"{path} is not inside the root folder {root}") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentReadError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                "convert it to UTF-8 first") from None
    except OSError as exc:
        raise DocumentReadError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_file(path: str | Path, text_field: str = "text", id_field: str = "id",
              root: str | Path | None = None) -> list[Document]:
    """The documents of one file (one, or one per jsonl line); ids as `document_id` says."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DocumentReadError(
            f"{path}: unsupported file type {path.suffix or '(none)'}; supported: {', '.join(FORMATS)}"
        )
    base_id = document_id(path, root)
    raw = _read_text(path)
    meta: dict[str, Any] = {"source": str(path), "format": kind}
    if kind == "jsonl":
        return _read_jsonl(path, raw, text_field, id_field, base_id, meta)
    if kind == "html":
        text, title = html_to_text(raw)
        if title:
            meta["title"] = title
        return [Document(base_id, text, meta)]
    return [Document(base_id, _normalise(raw), meta)]


def _read_jsonl(path: Path, raw: str, text_field: str, id_field: str, base_id: str,
                meta: dict[str, Any]) -> list[Document]:
    docs = []
    for line_no, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DocumentReadError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DocumentReadError(f"{path}:{line_no}: a JSON object per line is expected")
        text = record.get(text_field)
        if not isinstance(text, str):
            fields = ", ".join(sorted(record)) or "none"
            raise DocumentReadError(
                f"{path}:{line_no}: no text field {text_field!r} (fields: {fields}); "
                "name the field holding the text with text_field / --text-field"
            )
        doc_id = record.get(id_field)
        extra = {k: v for k, v in record.items() if k not in (text_field, id_field)}
        docs.append(Document(
            str(doc_id) if doc_id is not None else f"{base_id}#{line_no}",
            _normalise(text),
            {**meta, "line": line_no, **extra},
        ))
    return docs


def read_documents(paths: str | Path | Iterable[str | Path], text_field: str = "text",
                   id_field: str = "id", root: str | Path | None = None) -> Iterator[Document]:
    """Documents of files and folders (folders recursively, supported types only, hidden
    files skipped, in sorted order); ids as `document_id` says."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    for item in items:
        for file in _files(Path(item)):
            yield from read_file(file, text_field, id_field, root)


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in FORMATS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    if path.is_file():
        return [path]
    raise DocumentReadError(f"{path}: no such file or folder")
