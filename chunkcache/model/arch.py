"""Which model families and RoPE modes the layer executor can fuse, read from the model's config."""

from __future__ import annotations

from typing import Any

from chunkcache.errors import UnsupportedModelError

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
# Static frequency tables: a rotation by p then by q - p equals a rotation by q.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config: Any) -> dict[str, Any]:
    """RoPE settings across transformers versions (``rope_parameters`` in 5.x, ``rope_scaling`` before)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if isinstance(legacy, dict):
        params = {**legacy, **params}
    if "rope_theta" not in params and hasattr(config, "rope_theta"):
        params["rope_theta"] = config.rope_theta
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def check_supported(config: Any) -> None:
    """Raise `UnsupportedModelError` naming the first feature that would break KV fusion."""
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"model architecture {family!r} is not supported; chunkcache fuses "
            f"{', '.join(SUPPORTED_FAMILIES)} models"
        )
    rope = rope_parameters(config)
    rope_type = rope["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        what = "dynamic NTK RoPE scaling" if rope_type == "dynamic" else f"RoPE type {rope_type!r}"
        raise UnsupportedModelError(
            f"{what} is not supported: its rotation angles depend on sequence length, so cached "
            f"keys cannot be re-rotated to new positions (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedModelError(
            f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported"
        )
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", window is not None)
    max_pos = getattr(config, "max_position_embeddings", None)
    if "sliding_attention" in layer_types or (
        uses_window and window is not None and (max_pos is None or window < max_pos)
    ):
        raise UnsupportedModelError(
            f"sliding-window attention (window={window}) is not supported: a fused cache "
            "assumes every token attends to the whole context"
        )
