"""LLM.generate against the un-paged eager model's greedy continuation, token for token:
single requests, mixed-length batches, chunked prefill, prefix caching on and off, and a pool
so small that preemption happens. After every run the pool holds total minus cached free."""
import pytest
import torch

from qcompiler import LLM, SamplingParams
from qcompiler.compiler import compile_model
from qcompiler.models import load_source
from qcompiler.targets import Float
from tests_paths import FIXTURES

VOCAB = 96


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    src = load_source(str(FIXTURES / "plain_lm.py"))
    out = tmp_path_factory.mktemp("engine") / "plain-float"
    compile_model(src, Float(), out)
    return out, src.model


def greedy_ref(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor(ids)[None]
            ids.append(int(model(input_ids=x, position_ids=torch.arange(len(ids))[None])[0, -1].argmax()))
    return ids[len(prompt):]


def prompts(n, seed, lo=1, hi=30, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(0, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),),
                                         generator=g).tolist() for _ in range(n)]


def check_pool(llm):
    st = llm.stats()
    assert st["blocks_free"] == st["blocks_total"] - st["blocks_cached"], st
    assert st["running"] == st["waiting"] == 0


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("kw", [
    dict(),                                                   # one step prefills everything
    dict(max_num_batched_tokens=7),                           # prompts chunked over steps
    dict(prefix_cache=False),
    dict(num_blocks=6, block_size=4, max_num_batched_tokens=16),  # preemption by recompute
])
def test_greedy_equals_eager(artifact, kw):
    out, model = artifact
    llm = LLM(out, **kw)
    ps = prompts(5, seed=1, hi=14 if "num_blocks" in kw else 30)
    outs = llm.generate(ps, GREEDY)
    for p, o in zip(ps, outs):
        assert o.finish_reason == "length" and o.token_ids == greedy_ref(model, p, 12), (p, o)
    if "num_blocks" in kw:
        assert llm.stats()["num_preemptions"] > 0
    check_pool(llm)


def test_compiled_program_greedy_equals_eager(artifact):
    """``torch.compile`` of the program (decode attention and the KV write traced into the graph,
    prompt attention as an opaque op): same tokens as the eager model, graphs reused across steps."""
    out, model = artifact
    llm = LLM(out, compile="jit", kv_cache_dtype="float32")
    ps = prompts(4, seed=5)
    outs = llm.generate(ps, GREEDY)
    for p, o in zip(ps, outs):
        assert o.token_ids == greedy_ref(model, p, 12), (p, o)
    check_pool(llm)


def test_prefix_cache_hits_and_same_output(artifact):
    out, model = artifact
    llm = LLM(out, block_size=4)
    shared = list(range(1, 33))
    first = llm.generate(prompts(3, seed=2, prefix=shared), GREEDY)
    second_ps = prompts(3, seed=3, prefix=shared)
    second = llm.generate(second_ps, GREEDY)
    assert all(o.num_cached_tokens == 0 for o in first[:1])
    assert all(o.num_cached_tokens >= 32 for o in second)
    for p, o in zip(second_ps, second):
        assert o.token_ids == greedy_ref(model, p, 12)
    assert llm.stats()["prefix_cache_hit_rate"] > 0.3
    check_pool(llm)


def test_stop_tokens_seeds_and_a_request_that_never_fits(artifact):
    out, model = artifact
    llm = LLM(out, num_blocks=4, block_size=4)
    p = prompts(1, seed=4, lo=5, hi=6)[0]
    ref = greedy_ref(model, p, 6)
    stop = llm.generate([p], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(ref[3],)))[0]
    assert stop.finish_reason == "stop" and stop.token_ids == ref[:ref.index(ref[3]) + 1]
    sampled = [llm.generate([p], SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=7))[0].token_ids
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # the same seed, the same tokens
    with pytest.raises(ValueError, match="token id -1 outside the vocabulary"):
        llm.generate([[3, -1]])
    big, ok = llm.generate([list(range(40)), p], SamplingParams(max_tokens=2, temperature=0.0))
    assert big.finish_reason == "error" and "KV blocks" in big.error and ok.finish_reason == "length"
    check_pool(llm)


def test_n_samples_share_the_prompt_and_draw_from_its_distribution(artifact):
    out, model = artifact
    llm = LLM(out, block_size=4)
    p = prompts(1, seed=5, lo=9, hi=10)[0]  # 9 tokens: the children share a partly filled block
    greedy = llm.generate([p], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, n=3))[0]
    ref = greedy_ref(model, p, 6)
    # forks read the shared prompt blocks right; divergent writes into a shared block (copy-on-write)
    # are checked by the block-manager model test, where a missing copy fails
    assert len(greedy.samples) == 3 and all(s.token_ids == ref for s in greedy.samples)
    check_pool(llm)
    # the n first tokens are n draws from the prompt's next-token distribution, as separate requests would be
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=11, n=8)
    firsts = [s.token_ids[0] for s in llm.generate([p], params)[0].samples]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(p)[None], position_ids=torch.arange(len(p))[None])[0, -1]
    g = torch.Generator().manual_seed(11)
    from qcompiler.runtime.sampling import sample
    assert firsts == [sample(logits, params, g) for _ in range(8)]
    check_pool(llm)


@pytest.mark.parametrize("budget", [512, 20])
def test_prompts_sharing_a_prefix_in_one_batch_compute_it_once(artifact, budget):
    """Four prompts with a common 32-token prefix submitted together: the first computes the
    prefix, the others wait until its blocks are cached (whole prompt, or chunk by chunk) and
    reuse them, with the same greedy output."""
    out, model = artifact
    llm = LLM(out, block_size=4, max_num_batched_tokens=budget)
    ps = prompts(4, seed=4, lo=3, hi=9, prefix=list(range(1, 33)))
    outs = llm.generate(ps, GREEDY)
    assert outs[0].num_cached_tokens == 0 and all(o.num_cached_tokens == 32 for o in outs[1:])
    for p, o in zip(ps, outs):
        assert o.token_ids == greedy_ref(model, p, 12)
    check_pool(llm)


def test_kv_cache_dtype(artifact):
    out, model = artifact
    assert LLM(out, num_blocks=4).engine.runner.kv_cache.dtype == torch.float32  # auto: a float artifact's dtype
    llm = LLM(out, num_blocks=8, kv_cache_dtype="bfloat16")
    assert llm.engine.runner.kv_cache.dtype == torch.bfloat16
    assert len(llm.generate([[1, 2, 3]], GREEDY)[0].token_ids) == 12
    with pytest.raises(ValueError, match="unknown kv_cache_dtype 'int3'"):
        LLM(out, kv_cache_dtype="int3")


class _TorchWith:
    """``torch`` for a module under test, with ``cuda`` standing in for ``torch.cuda`` and pinned
    buffers made plain (the CPU build has no pinned allocator)."""

    def __init__(self, cuda):
        self.cuda = cuda

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*a, pin_memory=False, **k):
        return torch.zeros(*a, **k)


class _CudaOnCpu:
    """The part of ``torch.cuda`` that ``runtime.cuda_graphs`` uses, on the CPU: a captured graph
    is the program's call recorded with its buffers, and a replay runs it again and writes the
    logits into the tensor the capture returned, as a CUDA graph does. Streams and events are
    no-ops (the CPU runs in order); pinned buffers are plain ones."""

    class CUDAGraph:
        def replay(self):
            self.fn()

    class _Noop:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __getattr__(self, name):
            return lambda *a, **k: None

    Stream = Event = stream = _Noop

    def __init__(self):
        self.capturing = None
        self.captures = self.replays = 0

    def graph_pool_handle(self):
        return None

    def current_stream(self):
        return self._Noop()

    def graph(self, g, pool=None):
        cuda = self

        class _Capture:
            def __enter__(self):
                cuda.capturing = g

            def __exit__(self, *exc):
                cuda.capturing = None
                cuda.captures += 1

        return _Capture()

    def recording(self, program):
        def run(*args):
            out = program(*args)
            if self.capturing is not None:
                def replay(out=out):
                    self.replays += 1
                    out.copy_(program(*args))
                self.capturing.fn = replay
            return out
        return run


def test_cuda_graph_decode_logic_on_cpu(artifact, monkeypatch):
    """``DecodeGraphs`` driven by the engine, with the CUDA graph API stood in for on the CPU: one
    graph per padded batch size, real rows then padding rows that write no KV, a batch that
    shrinks as requests of different lengths finish (stale block tables in the padding rows), and
    the logits of the real rows only. The tokens equal the eager model's greedy continuation."""
    from qcompiler.runtime import cuda_graphs

    cuda = _CudaOnCpu()

    monkeypatch.setattr(cuda_graphs, "torch", _TorchWith(cuda))
    out, model = artifact
    llm = LLM(out, kv_cache_dtype="float32", max_num_seqs=8)
    runner = llm.engine.runner
    runner.graphs = cuda_graphs.DecodeGraphs(cuda.recording(runner.program), runner.kv_cache, 8,
                                             runner.kv_cache.shape[2])
    lengths = (16, 12, 9, 6, 4, 2)  # the first request, in block 0, decodes through every padded step
    ps = prompts(len(lengths), seed=7)
    outs = llm.generate(ps, [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths])
    for p, o, n in zip(ps, outs, lengths):
        assert o.token_ids == greedy_ref(model, p, n), (p, o)
    eager = LLM(out, kv_cache_dtype="float32", max_num_seqs=8)
    eager.generate(ps, [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths])
    # padding rows wrote nothing: the cache holds what the same steps run without graphs left
    torch.testing.assert_close(runner.kv_cache, eager.engine.runner.kv_cache, rtol=1e-5, atol=1e-5)
    assert sorted(runner.graphs.graphs) == [1, 2, 4, 8]  # 6 and 5 rows pad to 8, 3 to 4
    assert cuda.captures == 4 and cuda.replays == max(lengths) - 1  # every decode step replayed
    check_pool(llm)


def test_gpu_memory_utilization_is_checked(artifact):
    out, _ = artifact
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        LLM(out, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="device='cuda'"):
        LLM(out, gpu_memory_utilization=0.5)


def test_kv_budget_from_a_profiled_step(artifact, monkeypatch):
    """``runtime.memory`` with torch.cuda's memory queries stood in for on the CPU: the profiling
    step runs the program on a prompt of the step's token budget with logits for as many rows as
    a step samples, and the pool gets ``utilization x total`` less memory outside torch and the
    peak less the profiling step's own KV blocks."""
    from qcompiler import load
    from qcompiler.runtime import memory

    GiB = 1 << 30
    queries = []

    class _Cuda:
        def __getattr__(self, name):  # synchronize, empty_cache, reset_peak_memory_stats
            return lambda *a: queries.append(name)

        max_memory_allocated = staticmethod(lambda d: 3 * GiB)
        mem_get_info = staticmethod(lambda d: (10 * GiB, 16 * GiB))  # (free, total)
        memory_reserved = staticmethod(lambda d: 5 * GiB)

    monkeypatch.setattr(memory, "torch", _TorchWith(_Cuda()))
    out, _ = artifact
    m = load(out)
    paged = m.manifest["program"]["paged"]
    rows = []
    program = lambda *args: rows.append(m.program(*args).shape)  # noqa: E731
    prof = memory.profile_step(program, paged, torch.float32, torch.device("cpu"), 40, 8, 16)
    assert rows == [(8, VOCAB)]
    step_kv = paged["num_layers"] * 2 * 48 * paged["num_kv_heads"] * paged["head_dim"] * 4  # 3 blocks of 16
    assert prof == memory.MemoryProfile(total=16 * GiB, others=GiB, peak=3 * GiB, step_kv=step_kv)
    assert memory.kv_cache_bytes(prof, 0.5) == 8 * GiB - GiB - (3 * GiB - step_kv)
    assert {"synchronize", "empty_cache", "reset_peak_memory_stats"} <= set(queries)
