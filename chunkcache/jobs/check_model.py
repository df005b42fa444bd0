"""``chunkcache check-model`` and the gate ``serve`` passes first: a model's architecture and RoPE
mode against the rules of `chunkcache.model.arch`, then two numeric checks in float32 on a
built-in sample (re-rotated keys, `chunkcache.model.check`; ``cacheblend:1.0`` against full
prefill through the engine, here), a verdict cached per model fingerprint."""

from __future__ import annotations

import dataclasses
import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.errors import UnsupportedModelError
from chunkcache.model.arch import check_supported
from chunkcache.model.check import (
    SAMPLE_CHUNKS, SAMPLE_QUESTION, Measurement, Verdict, default_checks_dir, read_verdict, reference_check,
    rerotation_check, verdict_of, write_verdict,
)
from chunkcache.model.loader import LoadedModel, load_model, model_fingerprint
from chunkcache.model.registry import resolve_model_dir

log = logging.getLogger(__name__)

CHECK_DTYPE = "float32"
# Check 2 tolerance: max |logit difference| of the first token, cacheblend:1.0 against full. Both
# compute every token afresh from the same weights; they differ only in the order of float32
# operations: on the CPU none (0 on SmolLM2-135M and Qwen2.5-0.5B, whose logits span tens); a
# GPU's kernels may pick other reduction orders for the two shapes, ~1e-5. Fusion bugs (a wrong
# mask, a stale or wrongly placed key) move logits by 1e-1 and more; 1e-3 keeps a margin for
# larger models.
IDENTITY_TOLERANCE = 1e-3
ALLOW_HINT = "pass --allow-unchecked-model (setting allow_unchecked_model) to serve it anyway"


def identity_check(engine: ChunkCacheEngine) -> Measurement:
    """Check 2: the sample answered by ``cacheblend:1.0`` over the chunks' stored caches (cached
    at their own positions, placed by the fusion) against full prefill: first-token logits."""
    engine.precompute(list(SAMPLE_CHUNKS))
    chunks = list(SAMPLE_CHUNKS)
    full = engine.answer(SAMPLE_QUESTION, chunks, strategy="full", max_new_tokens=1, keep_logits=True)
    blend = engine.answer(SAMPLE_QUESTION, chunks, strategy="cacheblend:1.0", max_new_tokens=1, keep_logits=True)
    diff = float((blend.first_token_logits.float() - full.first_token_logits.float()).abs().max())
    detail = (f"{full.prompt_tokens} prompt tokens, {blend.cache_hits} cached chunks, "
              f"{blend.recomputed_tokens} recomputed; logits span {float(full.first_token_logits.abs().max()):.3g}")
    if blend.cache_misses or blend.recomputed_tokens != full.prompt_tokens:  # the fused path was not taken
        diff = float("inf")
        detail += f"; expected all {len(chunks)} chunks from the store and every token recomputed"
    return Measurement("cacheblend1_logit_max_abs_diff", diff, IDENTITY_TOLERANCE, detail)


def _check_settings(settings: Settings, model: str) -> Settings:
    """``settings`` for the check: float32, chunk caches lossless and in memory only (the user's
    store is never written)."""
    return dataclasses.replace(settings, model=model, dtype=CHECK_DTYPE, codec="raw", store_tiers="cpu",
                               cpu_budget="", craft_variants=False)


def run_checks(loaded: LoadedModel, settings: Settings) -> Verdict:
    """Both checks on a model loaded in float32 (``settings``: prompt template, primer, device)."""
    if loaded.dtype != torch.float32:
        raise UnsupportedModelError(f"the model check runs in float32; {loaded.name} is loaded as {loaded.dtype}")
    measurements = [reference_check(loaded), rerotation_check(loaded)]
    engine = ChunkCacheEngine(_check_settings(settings, loaded.name), model=loaded)
    try:
        measurements.append(identity_check(engine))
    finally:
        engine.close()
    return verdict_of(loaded.name, loaded.fingerprint, measurements, path=str(loaded.path),
                      device=str(loaded.executor.device))


def unsupported_reason(model: str, settings: Settings) -> tuple[Path, str | None]:
    """The model's folder, and why chunkcache cannot fuse it (None when its config is supported).
    Read from config.json alone: nothing heavy is loaded."""
    from transformers import AutoConfig

    path = resolve_model_dir(model, settings.models_dir)
    try:
        check_supported(AutoConfig.from_pretrained(path))
    except UnsupportedModelError as exc:
        return path, str(exc)
    return path, None


def check_model(model: str, settings: Settings, checks_dir: Path | None = None, save: bool = True) -> Verdict:
    """Run the checks on ``model`` (a packaged name or a Hugging Face folder) and, when ``save``,
    store the verdict under its float32 fingerprint for `serve_gate`."""
    _, reason = unsupported_reason(model, settings)
    if reason is not None:
        return Verdict("unsupported", model, reason=reason)
    loaded = load_model(model, settings.models_dir, CHECK_DTYPE, settings.device, settings.system_prompt,
                        settings.question_template)
    try:
        verdict = run_checks(loaded, settings)
    finally:
        del loaded
        _release_memory()
    if save:
        write_verdict(checks_dir or default_checks_dir(), verdict)
    return verdict


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class GateResult:
    """What `serve_gate` decided: the verdict it went by (None when skipped) and the line to print."""

    verdict: Verdict | None
    message: str
    reused: bool = False


def serve_gate(settings: Settings, allow_unchecked: bool | None = None, checks_dir: Path | None = None) -> GateResult:
    """Before ``serve`` loads its model: refuse (`UnsupportedModelError`) an unsupported one, or
    one whose check fails, unless ``allow_unchecked`` (default: the ``allow_unchecked_model``
    setting). A verdict stored for the model's float32 fingerprint is reused; without one the
    check runs once (and is stored)."""
    allow = settings.allow_unchecked_model if allow_unchecked is None else allow_unchecked
    checks_dir = checks_dir or default_checks_dir()
    if allow:
        return GateResult(None, f"model check skipped for {settings.model} (allow_unchecked_model)")
    path, reason = unsupported_reason(settings.model, settings)
    if reason is not None:
        raise UnsupportedModelError(f"refusing to serve {settings.model}: {reason}")
    from transformers import AutoConfig

    fingerprint = model_fingerprint(path, AutoConfig.from_pretrained(path), CHECK_DTYPE)
    verdict = read_verdict(checks_dir, fingerprint)
    reused = verdict is not None
    if verdict is None:
        log.info("checking model %s once (its verdict is kept in %s)", settings.model, checks_dir)
        verdict = check_model(settings.model, settings, checks_dir)
    if not verdict.passed:
        raise UnsupportedModelError(
            f"refusing to serve {settings.model}: it failed chunkcache's model check ({verdict.summary()}); "
            f"see `chunkcache check-model {settings.model}` (verdict in {checks_dir}), or {ALLOW_HINT}"
        )
    how = "verdict reused" if reused else "checked now"
    return GateResult(verdict, f"model check {how}: {verdict.summary()}", reused)
