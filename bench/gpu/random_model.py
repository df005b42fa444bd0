"""Device check helper: build a Llama-3.1-8B-shaped causal LM with random weights (or a tiny
2-layer version of the same config with --tiny) directly on the target device, and save it as a
local Hugging Face folder (safetensors + config + a tokenizer copied from a folder that holds only
tokenizer files) that `chunkcache --model <folder>` loads. Real weights cannot travel to the GPU
machine; the shapes, dtype and RoPE settings are what the timings and numerics depend on."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

# Llama-3.1-8B(-Instruct)'s config.json, less the ids of its own tokenizer (the copied one's are used)
LLAMA31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
    max_position_embeddings=131072, rms_norm_eps=1e-5, initializer_range=0.02,
    rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    },
    attention_bias=False, mlp_bias=False, tie_word_embeddings=False, pretraining_tp=1,
)
# --tiny: the same config with 2 layers and a small hidden size (vocab and RoPE kept)
TINY = dict(hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=16)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
)


def build(out: Path, tokenizer_dir: Path, tiny: bool, device: str, dtype: str, layers: int | None, std: float,
          seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    params = {**LLAMA31_8B, **(TINY if tiny else {}), "initializer_range": std}
    if layers:
        params["num_hidden_layers"] = layers
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    params.update({k: v for k, v in ids.items() if v is not None})
    config = AutoConfig.for_model("llama", **params)
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    # from_config's init is the model's own (normal(0, initializer_range), RMSNorm weights 1);
    # re-draw every matrix explicitly so that the std does not depend on the transformers version.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            else:
                p.fill_(1.0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    n = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    t1 = time.perf_counter()
    print(f"random_model: built {n / 1e9:.3f} B params ({nbytes / 2**30:.2f} GiB {dtype}) on {device} "
          f"in {t1 - t0:.1f} s", flush=True)

    # a forward pass on a few tokens: the logits must be finite and not degenerate
    sample = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        logits = model(sample).logits.float()
    finite = bool(torch.isfinite(logits).all())
    print(f"random_model: forward on {sample.shape[1]} tokens: logits finite={finite}, "
          f"std={logits.std().item():.3f}, max|.|={logits.abs().max().item():.2f}", flush=True)
    if not finite:
        raise SystemExit("random_model: non-finite logits; lower --std")

    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    copied = []
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
            copied.append(name)
    t2 = time.perf_counter()
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"random_model: saved {out} ({size / 2**30:.2f} GiB, {len(list(out.iterdir()))} files, "
          f"tokenizer files {copied}) in {t2 - t1:.1f} s", flush=True)
    print("random_model: config " + json.dumps({k: params[k] for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
        "vocab_size", "rope_parameters")}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder to write (replaced if it exists)")
    p.add_argument("--tokenizer", required=True, type=Path, help="folder holding the tokenizer files to copy")
    p.add_argument("--tiny", action="store_true", help="2 layers, hidden 64: a CPU stand-in of the same config")
    p.add_argument("--layers", type=int, default=None, help="override the layer count")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cuda, cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--std", type=float, default=0.02, help="std of the random weight matrices")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    build(args.out, args.tokenizer, args.tiny, args.device, args.dtype, args.layers, args.std, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
