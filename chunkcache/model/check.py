"""The model-level half of ``chunkcache check-model``: the built-in sample, the reference check (the
layer executor's logits against the Hugging Face forward), the re-rotation check (keys cached at
one position and turned to another against keys computed there), the verdict type and its cache
of small JSON files, one per model fingerprint.

The fusion-level check (``cacheblend:1.0`` against full prefill) needs the engine and lives in
`chunkcache.jobs.check_model`, which runs both and gates ``serve``."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from chunkcache.atomic import write_json_atomic
from chunkcache.errors import CorruptCacheError, InvalidInputError
from chunkcache.model.executor import LayerExecutor, rotate
from chunkcache.model.loader import LoadedModel

log = logging.getLogger(__name__)

# Bumped whenever what the checks measure or their tolerances change: a verdict of another
# version is not reused.
CHECK_VERSION = 1

SAMPLE_CHUNKS: tuple[str, ...] = (
    "The old mill on the river Tarn was built in 1820 by the Duval family, who ground wheat there.",
    "After the great flood of 1875 the mill was rebuilt in stone, with a wider wheel and a new dam.",
    "Today the mill is a small museum; its wheel still turns on summer weekends for visitors.",
)
SAMPLE_QUESTION = "When was the mill rebuilt in stone, and why?"

# Check 1 tolerance: the worst |re-rotated - in place| over every layer's keys, relative to that
# layer's largest |key|. Float32 rounds at ~6e-8; a chunk computed at two far-apart positions
# takes different rounding in every rotation and softmax, and the difference grows through the
# layers to a few 1e-6 (SmolLM2-135M 2.9e-6, Qwen2.5-0.5B 2.3e-6). A broken premise (angles not
# linear in position, as dynamic NTK's; anything else that sees absolute positions) is off by
# 1e-2..1 (angles ~ position^1.01 on a tiny model: over 1e-2); 1e-4 sits far from both.
REROTATION_TOLERANCE = 1e-4

# Check 0 tolerance: max |logit difference|, the executor's prefill against the Hugging Face
# forward. Same weights and math in other kernels (HF's sdpa, its float32 rotary tables where the
# executor makes them in float64): 4e-5 (SmolLM2-135M), 1e-5 (Qwen2.5-0.5B) on logits spanning
# tens. A missing piece of the model
# moves them by 1e-1 and more.
REFERENCE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Measurement:
    """One numeric check: what was measured, its value, the bound it must stay within."""

    name: str
    value: float
    tolerance: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.value <= self.tolerance  # NaN compares False: a NaN fails

    def line(self) -> str:
        mark = "PASS" if self.passed else "FAIL"
        extra = f" ({self.detail})" if self.detail else ""
        return f"{mark}  {self.name}: {self.value:.3g} (tolerance {self.tolerance:.0e}){extra}"


@dataclass(frozen=True)
class Verdict:
    """What ``check-model`` found for one model: ``pass``, ``fail`` or ``unsupported`` (then
    ``reason`` says why and there are no measurements)."""

    status: str
    model: str
    fingerprint: str = ""
    reason: str = ""
    measurements: tuple[Measurement, ...] = ()
    check_version: int = CHECK_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def summary(self) -> str:
        if self.status == "unsupported":
            return f"UNSUPPORTED {self.model}: {self.reason}"
        numbers = ", ".join(f"{m.name} {m.value:.2g}" for m in self.measurements)
        return f"{self.status.upper()} {self.model}: {numbers}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["measurements"] = [asdict(m) | {"passed": m.passed} for m in self.measurements]
        out["passed"] = self.passed
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Verdict":
        try:
            measurements = tuple(
                Measurement(str(m["name"]), float(m["value"]), float(m["tolerance"]), str(m.get("detail", "")))
                for m in data.get("measurements", ())
            )
            verdict = cls(str(data["status"]), str(data["model"]), str(data.get("fingerprint", "")),
                          str(data.get("reason", "")), measurements, int(data["check_version"]),
                          dict(data.get("extra", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCacheError(f"not a model-check verdict: {exc!r}") from None
        if verdict.status not in ("pass", "fail", "unsupported"):
            raise CorruptCacheError(f"not a model-check verdict: status {verdict.status!r}")
        return verdict


def verdict_of(model: str, fingerprint: str, measurements: list[Measurement], **extra: Any) -> Verdict:
    status = "pass" if all(m.passed for m in measurements) else "fail"
    return Verdict(status, model, fingerprint, "", tuple(measurements), CHECK_VERSION, extra)


# --- check 1: re-rotation -------------------------------------------------------------------
def sample_ids(loaded: LoadedModel) -> tuple[int, ...]:
    """The sample chunks' tokens, one after another, as chunks are tokenized for caching."""
    return tuple(i for chunk in SAMPLE_CHUNKS for i in loaded.template.chunk_ids(chunk))


@torch.inference_mode()
def prefill(executor: LayerExecutor, token_ids: tuple[int, ...], start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_ids`` prefilled alone at positions ``start``.. with the executor (as a chunk is
    computed for caching): every layer's rotated keys [layers, kv_heads, n, d] and the last
    token's next-token logits."""
    n = len(token_ids)
    buf = executor.empty_kv(n)
    hidden = executor.embed(torch.tensor(token_ids, dtype=torch.long))
    rows = executor.span_rows(range(0, n), torch.arange(start, start + n, device=executor.device))
    for layer in range(executor.num_layers):
        hidden = executor.run_layer(layer, hidden, rows, buf[layer, 0], buf[layer, 1])
    return buf[:, 0].clone(), executor.logits(hidden[-1:])[0]


def rerotated(executor: LayerExecutor, keys: torch.Tensor, shift: int) -> torch.Tensor:
    """``keys`` [..., n, d] turned by ``shift`` positions exactly as fusion places a stored cache
    (`chunkcache.blend.layout`: per-token tables from `LayerExecutor.rotation` of the shifts, then
    `rotate` in float32)."""
    shifts = torch.full((keys.shape[-2],), shift, dtype=torch.long, device=executor.device)
    return rotate(keys.float(), executor.rotation(shifts)).to(keys.dtype)


def target_positions(executor: LayerExecutor, source: int, n: int) -> list[int]:
    """Where the cached keys are moved to: just after their source, and the end of the context
    (4096 when the config names no context length), where float32 rounding is largest."""
    context = executor.max_positions or 4096
    last = context - n
    if last <= source:
        raise InvalidInputError(f"the model's context ({context} positions) is too short for the check's sample")
    return sorted({min(source + 7, last), last})


def rerotation_check(loaded: LoadedModel) -> Measurement:
    """Check 1: the sample prefilled at the position a cached chunk starts at (right after the
    prompt head), re-rotated to far positions, against the same prefilled in place there."""
    executor = loaded.executor
    ids = sample_ids(loaded)
    source = len(loaded.template.head_ids())
    cached = prefill(executor, ids, source)[0]
    worst, where = 0.0, ""
    for target in target_positions(executor, source, len(ids)):
        moved = rerotated(executor, cached, target - source).float()
        fresh = prefill(executor, ids, target)[0].float()
        for layer in range(executor.num_layers):
            scale = float(fresh[layer].abs().max())
            err = float((moved[layer] - fresh[layer]).abs().max()) / max(scale, 1e-30)
            if not err <= worst:  # NaN wins too
                worst, where = err, f"layer {layer}, {source} -> {target}"
    detail = f"worst at {where}; {len(ids)} tokens" if where else f"{len(ids)} tokens"
    return Measurement("rerotation_rel_err", worst, REROTATION_TOLERANCE, detail)


# --- check 0: the executor computes the model --------------------------------------------
def sample_prompt_ids(loaded: LoadedModel) -> tuple[int, ...]:
    """The whole sample prompt (head, chunks, question) as a full prefill reads it."""
    pieces = loaded.template.pieces(SAMPLE_QUESTION, list(SAMPLE_CHUNKS))
    return pieces.head + tuple(i for chunk in pieces.chunks for i in chunk) + pieces.question


@torch.inference_mode()
def reference_check(loaded: LoadedModel) -> Measurement:
    """The sample prompt's next-token logits from the layer executor (which fusion drives and
    which reads only the weights) against the Hugging Face model's own forward: a model quirk the
    executor does not implement (another attention scale, a norm on q/k, another rotary layout)
    shows here."""
    ids = sample_prompt_ids(loaded)
    ours = prefill(loaded.executor, ids, 0)[1]
    theirs = loaded.model(input_ids=torch.tensor([ids], device=loaded.executor.device)).logits[0, -1].float()
    diff = float((ours - theirs).abs().max())
    return Measurement("executor_vs_hf_logit_max_abs_diff", diff, REFERENCE_TOLERANCE,
                       f"{len(ids)} tokens; logits span {float(theirs.abs().max()):.3g}")


# --- the verdict cache ----------------------------------------------------------------------
def default_checks_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chunkcache" / "checks"


def _verdict_path(checks_dir: Path, fingerprint: str) -> Path:
    if not fingerprint or not all(c in "0123456789abcdef" for c in fingerprint):
        raise InvalidInputError(f"a model fingerprint is a hex digest, got {fingerprint!r}")
    return checks_dir / f"{fingerprint}.json"


def read_verdict(checks_dir: Path, fingerprint: str) -> Verdict | None:
    """The stored verdict for ``fingerprint``, or None when there is none, it cannot be read, or
    it was made by another version of the checks (then it is run again)."""
    path = _verdict_path(checks_dir, fingerprint)
    try:
        verdict = Verdict.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, CorruptCacheError, AttributeError) as exc:
        log.warning("ignoring unreadable model-check verdict %s: %s", path, exc)
        return None
    if verdict.check_version != CHECK_VERSION or verdict.fingerprint != fingerprint:
        return None
    return verdict


def write_verdict(checks_dir: Path, verdict: Verdict) -> Path:
    """Store ``verdict`` under its fingerprint: a temporary file renamed into place, so a reader
    sees the old file or the whole new one."""
    path = _verdict_path(checks_dir, verdict.fingerprint)
    checks_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, verdict.to_dict())
    return path
