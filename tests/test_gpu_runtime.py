"""The runtime on a GPU (skipped without one): the engine's greedy output equals the eager model's
with the Triton kernels behind every ``qc::`` op, with and without CUDA graphs for decode, and
with the program compiled by Inductor under them; a W4A16 program lowered for CUDA (merged
siblings, N-contiguous scales), eager or compiled, computes what the canonical program computes
on the CPU; quantized decode steps replayed from CUDA graphs equal the same steps run eagerly;
the KV pool sized from ``gpu_memory_utilization``."""
import gc

import pytest
import torch

from qcompiler import LLM, SamplingParams, load
from qcompiler.compiler import compile_model
from qcompiler.codegen.quant import sqnr_db
from qcompiler.models import load_source
from qcompiler.targets import W4A16, Float
from test_engine import GREEDY, check_pool, greedy_ref, prompts
from tests_paths import FIXTURES

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def source():
    return load_source(str(FIXTURES / "plain_lm.py"))


@pytest.mark.parametrize("cuda_graphs,compile", [(False, False), (True, False), (True, True)],
                         ids=["eager", "graphs", "inductor+graphs"])
def test_greedy_equals_eager_on_gpu(source, tmp_path, cuda_graphs, compile):
    compile_model(source, Float(), tmp_path / "float")
    llm = LLM(tmp_path / "float", device="cuda", cuda_graphs=cuda_graphs, compile=compile, kv_cache_dtype="float32",
              max_num_seqs=8)
    ps = prompts(6, seed=3)
    outs = llm.generate(ps, GREEDY)
    for p, o in zip(ps, outs):
        assert o.finish_reason == "length" and o.token_ids == greedy_ref(source.model, p, 12), (p, o)
    check_pool(llm)
    if cuda_graphs:
        assert llm.engine.runner.graphs.graphs, "decode steps should have replayed a CUDA graph"


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "inductor"])
def test_w4a16_on_gpu_matches_canonical_cpu(source, tmp_path, compile):
    compile_model(source, W4A16(group_size=32, symmetric=False), tmp_path / "w4")
    ids = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(20)
    ref = load(tmp_path / "w4", fast=False).flat(ids, pos)
    out = load(tmp_path / "w4", device="cuda", compile=compile).flat(ids, pos)
    assert out.is_cuda
    assert sqnr_db(ref, out.float().cpu()) > 30  # bf16 lm_head and activations vs fp32 reference ops


def test_w4a16_decode_graphs_match_eager_steps(source, tmp_path):
    """Quantized decode under CUDA graphs: W4A16 linears (the GEMV and tensor-core forms, split
    over K inside the graph), a bf16 KV cache, and a batch that shrinks as requests of different
    lengths finish, so later steps pad rows whose block tables hold stale ids. Every replayed step
    is checked against the same step run eagerly on a copy of the cache: its logits and the KV
    it wrote."""
    compile_model(source, W4A16(group_size=32, symmetric=False), tmp_path / "w4")
    llm = LLM(tmp_path / "w4", device="cuda", max_num_seqs=8)
    runner = llm.engine.runner
    assert runner.kv_cache.dtype == torch.bfloat16
    replay, sizes = runner.graphs.run, []

    def checked(inp):
        kv = runner.kv_cache.clone()
        with torch.no_grad():
            ref = runner.program(*inp.args(kv)).float()
        out = replay(inp).float()
        assert sqnr_db(ref, out) > 40, inp.seq_lens
        torch.testing.assert_close(runner.kv_cache.float(), kv.float(), rtol=2e-2, atol=2e-2)
        sizes.append(inp.seq_lens.shape[0])
        return out

    runner.graphs.run = checked
    lengths = (2, 4, 6, 9, 12, 16)
    ps = prompts(len(lengths), seed=5)
    outs = llm.generate(ps, [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths])
    assert [len(o.token_ids) for o in outs] == list(lengths)
    assert {6, 5, 4, 3, 2, 1} <= set(sizes), sizes  # every batch size as requests finish
    check_pool(llm)


def test_kv_pool_from_gpu_memory_utilization(source, tmp_path):
    """``gpu_memory_utilization`` gives the pool what is left of that fraction of the card after
    what is in use: asked for 1 GiB beyond the memory in use now, a model of a few MB gets more
    than half of that GiB (the weights, a profiling step and CUDA's own growth take the rest),
    never more, and serves from it."""
    compile_model(source, Float(), tmp_path / "float")
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    slack = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()  # in use now, free to torch
    utilization = (total - free + (1 << 30)) / total
    llm = LLM(tmp_path / "float", device="cuda", gpu_memory_utilization=utilization, kv_cache_dtype="float32")
    kv = llm.engine.runner.kv_cache
    assert (1 << 29) < kv.numel() * kv.element_size() <= (1 << 30) + slack
    outs = llm.generate(prompts(3, seed=2), GREEDY)
    assert all(o.finish_reason == "length" for o in outs)
    check_pool(llm)
