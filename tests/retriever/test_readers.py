"""Readers turn .txt, .md, .html and .jsonl files into documents with stable ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chunkcache.retriever import DocumentReadError, read_documents, read_file
from chunkcache.retriever.readers import document_id

PAGE = """<!doctype html><html><head><title>The  Harbour &amp; Lighthouse</title>
<style>p { color: red; }</style><script>var hidden = "do not index";</script></head>
<body><h1>Harbour</h1><p>The lighthouse was built in 1851
   by the <b>harbour</b> board &mdash; of granite.</p>
<div>Second block<br>with a line break.</div><ul><li>first item</li><li>second item</li></ul>
</body></html>"""


def test_html_keeps_visible_text_as_paragraphs(tmp_path: Path) -> None:
    (tmp_path / "page.html").write_text(PAGE, encoding="utf-8")
    [doc] = read_file(tmp_path / "page.html")
    assert doc.text == ("Harbour\n\nThe lighthouse was built in 1851 by the harbour board \u2014 of granite."
                        "\n\nSecond block\nwith a line break.\n\nfirst item\n\nsecond item")
    assert doc.metadata["title"] == "The Harbour & Lighthouse"
    assert doc.metadata["format"] == "html"
    assert doc.doc_id.startswith("page.html@") and str(tmp_path) not in doc.doc_id  # never a server path


def test_jsonl_text_and_id_fields(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    rows = [{"id": 7, "text": "first", "lang": "en"}, {"text": "second"}, {"body": "x", "id": "b"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n", encoding="utf-8")
    first, second = read_file(path)
    assert (first.doc_id, first.text, first.metadata["lang"], first.metadata["line"]) == ("7", "first", "en", 1)
    assert second.doc_id == f"{document_id(path)}#2"
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(rows[2]) + "\n", encoding="utf-8")
    [doc] = read_file(other, text_field="body")
    assert (doc.doc_id, doc.text) == ("b", "x")
    with pytest.raises(DocumentReadError, match=r"other.jsonl:1: no text field 'text' \(fields: body, id\)"):
        read_file(other)


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(DocumentReadError, match="bad.jsonl:2: not valid JSON"):
        read_file(path)


def test_folders_are_read_recursively_with_relative_ids(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "a.txt").write_text("alpha\r\n\r\n\r\nbeta  gamma\n", encoding="utf-8")
    (tmp_path / "sub" / "b.md").write_text("# Title\n\nBody.", encoding="utf-8")
    (tmp_path / "sub" / "c.pdf").write_bytes(b"%PDF")
    (tmp_path / ".git" / "d.txt").write_text("hidden", encoding="utf-8")
    docs = list(read_documents(tmp_path, root=tmp_path))
    assert [d.doc_id for d in docs] == ["a.txt", "sub/b.md"]
    assert docs[0].text == "alpha\n\nbeta gamma"
    assert docs[1].text == "# Title\n\nBody." and docs[1].metadata["format"] == "markdown"


def test_unreadable_inputs_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(DocumentReadError, match="no such file"):
        list(read_documents(tmp_path / "missing.txt"))
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(DocumentReadError, match="unsupported file type .pdf"):
        read_file(tmp_path / "x.pdf")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DocumentReadError, match="not UTF-8"):
        read_file(tmp_path / "latin.txt")


def test_ids_of_ingested_folders_hide_server_paths_and_stay_apart(tmp_path: Path) -> None:
    for folder in ("a/docs", "b/docs"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "guide.md").write_text(f"# Guide of {folder}\n\ntext")
    ids = [d.doc_id for d in read_documents([tmp_path / "a/docs", tmp_path / "b/docs"])]
    assert all(i.startswith("guide.md@") and str(tmp_path) not in i for i in ids)
    assert len(set(ids)) == 2  # one name, two places: two documents
    again = [d.doc_id for d in read_documents([tmp_path / "a/docs/guide.md"])]
    assert again == ids[:1] == [document_id(tmp_path / "a/docs/guide.md")]  # the same file, the same id
    [rooted] = read_documents(tmp_path / "a/docs/guide.md", root=tmp_path / "a")
    assert rooted.doc_id == "docs/guide.md"
