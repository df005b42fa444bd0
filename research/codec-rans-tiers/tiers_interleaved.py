import json, statistics, tempfile, time
from importlib import resources
from pathlib import Path
from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.codec import get_codec
from chunkcache.store import LmdbStore, MemoryTier, TieredStore
data = json.loads(resources.files("chunkcache").joinpath("data/demo.json").read_text())
ex = data["examples"][0]
eng = ChunkCacheEngine(Settings(model="qwen2.5-0.5b"))
tmp = Path(tempfile.mkdtemp())
res = {}
for spec in ("int8", "cachegen-2"):
    codec = get_codec(spec)
    stores = {"cpu": TieredStore([MemoryTier("cpu", None)], codec), "disk": TieredStore([LmdbStore(tmp / spec, codec)], codec)}
    for name, st in stores.items():
        eng.store = st; eng.use_codec(spec); eng.precompute(list(ex["chunks"]))
        eng.answer(ex["question"], list(ex["chunks"]), strategy="cacheblend", max_new_tokens=1)
    for r in range(3):
        for name, st in stores.items():
            eng.store = st
            a = eng.answer(ex["question"] + " ok" * r, list(ex["chunks"]), strategy="cacheblend", max_new_tokens=1)
            res.setdefault((spec, name), []).append(a.ttft_s)
            print(spec, name, round(a.ttft_s, 3), {k: round(v, 3) for k, v in a.timings.items() if k.startswith(("stream", "store", "codec"))}, flush=True)
for k, v in res.items(): print(k, "median", round(statistics.median(v), 3))
