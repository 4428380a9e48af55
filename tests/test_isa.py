"""Our CPU kernels on any x86-64 machine: the instruction sets a CPU may lack switched off with
``QCOMPILER_NATIVE``, each program run in a process of its own as on such a machine. ``vnni``:
everything of ours, int8 activations in the linears; ``avx512``:
no VNNI, so fp32 activations in our linear kernel; ``avx2``: the AVX2 form of that kernel,
attention and sampling in PyTorch; ``0``: torch's packed int4/int8 kernels, nothing of ours."""
import os
import subprocess
import sys

import pytest
import torch

from qcompiler import load
from qcompiler.codegen import cpu_native
from qcompiler.codegen.quant import sqnr_db

RUN = """
import sys, torch
from qcompiler import LLM, SamplingParams, load
from qcompiler.codegen import cpu_native
m = load(sys.argv[1])
ids = torch.arange(3, 27)
logits = m.flat(ids, torch.arange(24))
llm = LLM(m)
outs = llm.generate([ids.tolist(), [5, 6]], SamplingParams(max_tokens=6, temperature=0.8, seed=0, ignore_eos=True))
st = llm.stats()
ops = sorted({getattr(n.target, "__name__", str(n.target)) for n in m.program.graph.nodes if n.op == "call_function"})
torch.save({"isa": cpu_native.ISA, "logits": logits, "lengths": [len(o.token_ids) for o in outs], "ops": ops,
            "blocks_back": st["blocks_free"] == st["blocks_total"] - st["blocks_cached"]}, sys.argv[2])
"""


@pytest.mark.parametrize("mode", ["vnni", "avx512", "avx2", "0"])
def test_each_level_of_our_cpu_kernels(tiny_artifacts, tmp_path, mode):
    if mode != "0" and cpu_native.LEVELS[mode] > cpu_native.LEVELS.get(cpu_native._isa(), 0):
        pytest.skip(f"this CPU has no {mode}")
    art = tiny_artifacts[1]["w4a16"].out
    env = {**os.environ, "QCOMPILER_NATIVE": mode}
    r = subprocess.run([sys.executable, "-c", RUN, str(art), str(tmp_path / "out.pt")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["isa"] == (None if mode == "0" else mode), got
    assert any("wq_linear_native" in op for op in got["ops"]) == (mode != "0"), got["ops"]
    ids = torch.arange(3, 27)
    ref = load(art, fast=False).flat(ids, torch.arange(24))  # the canonical ops
    assert sqnr_db(ref, got["logits"]) > 35, sqnr_db(ref, got["logits"])
    assert got["lengths"] == [6, 6] and got["blocks_back"]
