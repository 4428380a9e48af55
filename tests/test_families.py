"""Model families beyond Llama, built tiny from their transformers configs and compiled with every
pass checked: the engine's greedy tokens equal transformers' (its own masks and caches off), past
any sliding window, prompts chunked. Qwen3: QK-norm. Gemma 3: QK-norm, a custom softmax
scale (``query_pre_attn_scalar``), windowed and full layers with their own RoPE bases, (1 + w)
norms, scaled embeddings. Phi-3: fused QKV and gate/up projections, a window on every layer.
Gemma 2's eager attention soft-caps its scores, which the paged rewrite cannot reproduce yet: the
compile refuses it with one line."""
import pytest
import torch

from qcompiler import LLM, SamplingParams
from qcompiler.compiler import compile_model
from qcompiler.models import ModelSource
from qcompiler.targets import Float

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, use_cache=False)


def qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    return Qwen3ForCausalLM(Qwen3Config(num_hidden_layers=2, head_dim=32, attn_implementation="sdpa", **COMMON))


def gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    return Gemma3ForCausalLM(Gemma3TextConfig(
        num_hidden_layers=3, head_dim=16, sliding_window=12, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], attn_implementation="sdpa", **COMMON))


def phi3():
    from transformers import Phi3Config, Phi3ForCausalLM
    return Phi3ForCausalLM(Phi3Config(num_hidden_layers=2, sliding_window=20, pad_token_id=0,
                                      attn_implementation="sdpa", **COMMON))


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    return Gemma2ForCausalLM(Gemma2Config(num_hidden_layers=2, head_dim=16, sliding_window=12, query_pre_attn_scalar=24,
                                          attn_implementation="eager", **COMMON))


FAMILIES = {"qwen3": (qwen3, None), "gemma3": (gemma3, [12, 12, 0]), "phi3": (phi3, [20, 20])}


def source(model, name):
    return ModelSource(model=model, kind="hf", path=name, config=model.config.to_dict())


def hf_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    build, windows = FAMILIES[request.param]
    torch.manual_seed(0)
    model = build().eval()
    out = tmp_path_factory.mktemp("family") / request.param
    rep = compile_model(source(model, request.param), Float(), out, progress=False)
    return model, out, rep, windows


def test_greedy_equals_transformers(family):
    model, out, rep, windows = family
    assert rep.manifest["program"]["paged"].get("windows") == windows
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 30)]
    want = [hf_greedy(model, p, 12) for p in prompts]
    llm = LLM(out, kv_cache_dtype="float32", max_num_batched_tokens=7, block_size=4)  # the long prompt chunked
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in outs] == want


def test_soft_capped_scores_are_refused(tmp_path):
    torch.manual_seed(0)
    model = gemma2().eval()
    with pytest.raises(Exception, match="scaled_dot_product_attention") as e:
        compile_model(source(model, "gemma2"), Float(), tmp_path / "g2", progress=False)
    assert len(str(e.value).strip().splitlines()) == 1
