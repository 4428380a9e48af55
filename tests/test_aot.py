"""The default CPU path: the paged program compiled ahead of time for this machine
(``qcompiler.aot``), cached, and serving what the uncompiled program serves."""
import logging

import pytest
import torch

from qcompiler import LLM, SamplingParams, aot
from qcompiler.cli import main
from qcompiler.codegen import cpu_native
from qcompiler.llm import kv_cache_dtype_of
from qcompiler.loader import load, resolve_mode
from qcompiler.runtime.step_inputs import step_inputs
from tests_paths import EXAMPLES

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = [[5], [3, 1, 4, 1, 5, 9, 2, 6], list(range(40, 100)), [7, 7, 7], list(range(900, 1000, 3)), [11, 12]]


@pytest.fixture
def aot_cache(tmp_path_factory, monkeypatch):
    """One build cache for the module's tests (as one machine's), the default mode unforced."""
    monkeypatch.setenv("QCOMPILER_AOT_CACHE", str(tmp_path_factory.getbasetemp() / "aot-cache"))
    monkeypatch.delenv("QCOMPILER_COMPILE", raising=False)


@pytest.fixture
def fp32_activations(cpu_isa):
    """Our linear kernel with fp32 activations where the CPU would quantize them (VNNI): int8
    activations turn the bf16 roundings Inductor fuses away into different int8 roundings, and a
    random tiny model's near-ties then pick other tokens; exact token equality needs fp32."""
    if cpu_native.available() and cpu_native.ISA == "vnni":
        cpu_isa("avx512")


def check_pool(llm):
    st = llm.stats()
    assert st["blocks_free"] == st["blocks_total"] - st["blocks_cached"] and st["running"] == st["waiting"] == 0, st


def test_modes(monkeypatch):
    monkeypatch.delenv("QCOMPILER_COMPILE", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_mode("auto", cpu) == resolve_mode(True, cpu) == "aot"
    assert resolve_mode("auto", cuda) == "eager" and resolve_mode(True, cuda) == "jit"
    assert resolve_mode(False, cpu) == "eager"
    monkeypatch.setenv("QCOMPILER_COMPILE", "jit")
    assert resolve_mode("auto", cpu) == "jit" and resolve_mode("eager", cpu) == "eager"
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        resolve_mode("fast", cpu)
    with pytest.raises(ValueError, match="builds CPU programs"):
        resolve_mode("aot", cuda)


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_compiled_library_serves_what_the_graph_serves(tiny_artifacts, aot_cache, fp32_activations, kv):
    """Same logits (within bf16 rounding: Inductor fuses what the graph rounds op by op) on
    prefill, chunked and batched-decode steps; the same greedy tokens through the engine, prompts
    chunked and decoded together; then a second start loads the cached library without reading
    the exported program. (The VNNI kernel's own results: tests/test_ops.py, tests/test_isa.py.)"""
    art = tiny_artifacts[1]["w4a16"].out
    eager = LLM(art, compile="eager", max_num_batched_tokens=32, kv_cache_dtype=kv)
    llm = LLM(art, max_num_batched_tokens=32, kv_cache_dtype=kv)
    m = llm.model
    assert m.mode == "aot" and m.lowerings[-1]["name"] == "aot" and not m.lowerings[-1]["params"]["cached"]
    dtype = kv_cache_dtype_of(m.manifest, kv)
    program, graph = m.program_for(dtype), m.program  # the library, and the graph it was built from
    paged = m.manifest["program"]["paged"]
    tables = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    kv0 = torch.zeros(paged["num_layers"], 2, 16, 16, paged["num_kv_heads"],
                      eager.engine.runner.kv_cache.shape[-1], dtype=eager.engine.runner.kv_cache.dtype)
    caches = [kv0.clone(), kv0.clone()]
    steps = [step_inputs(tables, [0, 0, 0], [list(range(1, 40)), [3] * 17, [9]], 16),     # prompts
             step_inputs(tables, [39, 17, 1], [[4], list(range(20, 30)), [8]], 16),       # a chunk among decodes
             step_inputs(tables, [40, 27, 2], [[6], [7], [2]], 16)]                       # decode
    for s in steps:
        a, b = (f(*s.args(c)) for f, c in zip((program, graph), caches))
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item())
    written = (kv0 != caches[1]).any(-1)
    assert torch.equal(written, (kv0 != caches[0]).any(-1)) and written.any()  # same slots written, in place
    outs, ref = llm.generate(PROMPTS, GREEDY), eager.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    check_pool(llm)

    again = LLM(art, max_num_batched_tokens=32, kv_cache_dtype=kv)
    assert again.model._program is None and again.model.lowerings == [
        {"name": "aot", "params": {**m.lowerings[-1]["params"], "cached": True},
         "seconds": again.model.lowerings[0]["seconds"]}]
    assert [o.token_ids for o in again.generate(PROMPTS, GREEDY)] == [o.token_ids for o in ref]


def test_unloadable_library_is_dropped_and_a_failed_build_falls_back(tiny_artifacts, aot_cache, monkeypatch, caplog):
    art = tiny_artifacts[1]["w4a16"].out
    m = load(art)
    path = aot.package_path(m.manifest, torch.float16)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a package")
    built = []

    def no_compiler(*args):
        built.append(args)
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(aot, "build", no_compiler)
    with caplog.at_level(logging.INFO):
        llm = LLM(m, kv_cache_dtype="float16")
    assert not path.parent.exists() and len(built) == 1
    assert "compiling ahead of time failed (RuntimeError: no C++ compiler)" in caplog.text
    ref = LLM(art, compile="eager", kv_cache_dtype="float16").generate(PROMPTS[:3], GREEDY)
    assert [o.token_ids for o in llm.generate(PROMPTS[:3], GREEDY)] == [o.token_ids for o in ref]


def test_cache_key_names_what_the_library_depends_on(tiny_artifacts):
    man = tiny_artifacts[1]["w4a16"].out
    m = load(man)
    keys = {aot.cache_key(m.manifest, d) for d in (torch.bfloat16, torch.float32, torch.int8)}
    other = {**m.manifest, "files": {**m.manifest["files"], "weights.safetensors": {"sha256": "0" * 64}}}
    assert len(keys) == 3 and aot.cache_key(other, torch.bfloat16) not in keys


def test_qcompile_builds_for_this_cpu_so_the_first_start_is_quick(tmp_path, aot_cache, capsys):
    out = tmp_path / "tiny"
    assert main([str(EXAMPLES / "tiny_llama.py"), "--target", "w8a8", "-o", str(out), "-q"]) == 0
    assert "compiled ahead of time for this CPU" in capsys.readouterr().out
    llm = LLM(out)
    assert llm.model.lowerings[-1]["params"]["cached"] and llm.model._program is None
    assert main([str(EXAMPLES / "tiny_llama.py"), "--target", "w8a8", "-o", str(tmp_path / "b"), "-q", "--no-aot"]) == 0
    assert "ahead of time" not in capsys.readouterr().out
