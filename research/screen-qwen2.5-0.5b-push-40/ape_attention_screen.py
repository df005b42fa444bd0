"""Screen: reuse on the sequential layout with APE's attention change for the question (env APE_TS="T,S").

  APE_TS=1.0,0.8 .venv/bin/python research/screen-qwen2.5-0.5b-push-40/ape_attention_screen.py \
    research/screen-qwen2.5-0.5b-push-40/first_token_screen.py \
    --data ../shared/data/hotpotqa_distractor_train100.jsonl --store /tmp/scr/ev/hp-store --tag hp --dir DIR reuse
"""
import os, runpy, sys
import torch
from chunkcache.blend import strategies as st
from chunkcache.blend.layout import sequential_layout
from chunkcache.model.executor import ApeAttention

T, S = (float(x) for x in os.environ["APE_TS"].split(","))

def fuse(self, executor, inp):
    layout = sequential_layout(inp.pieces)
    buf = st.reused_buffer(executor, layout, inp)
    context = torch.zeros(buf.shape[3], dtype=torch.bool)
    for r in layout.chunks:
        context[r.start:r.stop] = True
    return st.finish(executor, layout, buf, st.question_index(layout), ape=ApeAttention(context, T, S))

st.Reuse.fuse = fuse
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
