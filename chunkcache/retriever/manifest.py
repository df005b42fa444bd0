"""manifest.json (what an index was built with, its counts and generation; written atomically),
the check that refuses another embedder, and the small result types `Hit` and `IngestReport`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chunkcache.atomic import write_json_atomic
from chunkcache.retriever.embedder import DEFAULT_EMBEDDER, Embedder, MiniLMEmbedder
from chunkcache.retriever.errors import EmbedderMismatchError, IndexCorruptError, IndexNotFoundError

FAISS_FILE = "index.faiss"
DOCSTORE_DIR = "docstore"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = "write.lock"  # inside the docstore folder
FORMAT = "chunkcache-index"
VERSION = 1
METRIC = "inner_product"  # on L2-normalised vectors: cosine similarity


@dataclass(frozen=True)
class Hit:
    """One search result. ``score``: the cosine similarity to the query (dense search), the BM25
    score (lexical) or the fused score (hybrid); ``ranks``: the 1-based rank of the chunk in each
    retriever's list that found it ({"dense": 3, "lexical": 1})."""

    chunk_id: str
    doc_id: str
    score: float
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)


@dataclass
class IngestReport:
    """What one `ChunkIndex.ingest_documents` call did."""

    added: int = 0  # new documents
    updated: int = 0  # documents whose text (or chunker) changed: chunks replaced
    unchanged: int = 0  # skipped
    chunks_added: int = 0  # new chunk vectors embedded
    chunks_removed: int = 0  # vectors of chunks no document uses any more

    def count(self, added: int, removed: int) -> None:
        self.chunks_added += added
        self.chunks_removed += removed


def make_manifest(embedder: Embedder, factory: str) -> dict[str, Any]:
    path = getattr(embedder, "path", None)
    return {
        "format": FORMAT,
        "version": VERSION,
        "embedder": {
            "name": embedder.name,
            "dim": int(embedder.dim),
            "fingerprint": str(getattr(embedder, "fingerprint", "") or ""),
            "path": str(Path(path).resolve()) if path is not None else None,
        },
        "metric": METRIC,
        "normalized": True,
        "factory": factory,
        "counts": {"chunks": 0, "documents": 0, "vectors": 0},
        "generation": 0,
    }


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise IndexNotFoundError(f"{directory} holds no chunk index ({MANIFEST_FILE} is missing); "
                                 "create one with ChunkIndex.build or `chunkcache ingest`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexCorruptError(f"cannot read {path} ({exc}); rebuild the index") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexCorruptError(f"{path} is not a chunkcache index manifest")
    if manifest.get("version") != VERSION:
        raise IndexCorruptError(f"{path} has index format version {manifest.get('version')!r}; this "
                                f"chunkcache reads version {VERSION}: rebuild the index")
    if not isinstance(manifest.get("embedder"), dict) or not isinstance(manifest.get("factory"), str):
        raise IndexCorruptError(f"{path} lacks the embedder or factory entry; rebuild the index")
    return manifest


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(directory / MANIFEST_FILE, manifest, sort_keys=True)


def embedder_for(manifest: dict[str, Any], directory: Path) -> Embedder:
    """The embedder a manifest names: the packaged default, or the local folder it was built from."""
    spec = manifest["embedder"]
    if spec.get("name") == DEFAULT_EMBEDDER:
        try:
            return MiniLMEmbedder()
        except ValueError:
            pass  # fall back to the recorded folder
    path = spec.get("path")
    if path and (Path(path) / "config.json").is_file():
        return MiniLMEmbedder(path, name=spec.get("name"))
    raise EmbedderMismatchError(
        f"{directory} was built with embedder {spec.get('name')!r}"
        + (f" from {path}" if path else "")
        + ", which cannot be found here; open it with ChunkIndex.load(dir, embedder=...) passing that embedder"
    )


def check_embedder(manifest: dict[str, Any], embedder: Embedder, directory: Path) -> None:
    """Refuse an embedder other than the one the index was built with."""
    spec = manifest["embedder"]
    built = f"{spec.get('name')!r} (dimension {spec.get('dim')})"
    given = f"{embedder.name!r} (dimension {embedder.dim})"
    fix = (f"open it with the embedder it was built with, or rebuild it for this one: "
           f"ChunkIndex.build({str(directory)!r}, embedder, overwrite=True) and ingest again")
    if spec.get("name") != embedder.name or int(spec.get("dim", -1)) != int(embedder.dim):
        raise EmbedderMismatchError(f"{directory} was built with embedder {built}, not {given}; {fix}")
    theirs, ours = spec.get("fingerprint") or "", str(getattr(embedder, "fingerprint", "") or "")
    if theirs and ours and theirs != ours:
        raise EmbedderMismatchError(
            f"{directory} was built with other weights of embedder {built} (fingerprint "
            f"{theirs[:12]} vs {ours[:12]}); {fix}"
        )
