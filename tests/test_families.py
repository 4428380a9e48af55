"""Model families beyond Llama 2, built tiny from their transformers configs and compiled with
every pass checked: the engine's greedy tokens equal transformers' (its own masks and caches off),
past any sliding window, prompts chunked. Llama 3: RoPE scaling (``llama3``). Qwen3: QK-norm.
Gemma 3: QK-norm, a custom softmax scale (``query_pre_attn_scalar``), windowed and full layers
with their own RoPE bases, (1 + w) norms, scaled embeddings. Phi-3: fused QKV and gate/up
projections, a window on every layer. Gemma 2: eager attention (read op by op), scores and logits
soft-capped, windowed and full layers; built with SDPA, which ignores the soft-cap, it is captured
eagerly all the same. Attention sinks are refused with one line."""
import pytest
import torch

from qcompiler import LLM, SamplingParams
from qcompiler.compiler import compile_model
from qcompiler.models import ModelSource
from qcompiler.targets import Float

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, use_cache=False)


def llama3():
    """Llama 3.1's RoPE scaling: low frequencies stretched 8x past 64 original positions."""
    from transformers import LlamaConfig, LlamaForCausalLM
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, rope_parameters=rope, attn_implementation="sdpa", **COMMON))


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
    """Queries and keys scaled up and caps set low: the caps change the tiny model's outputs."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    model = Gemma2ForCausalLM(Gemma2Config(num_hidden_layers=2, head_dim=16, sliding_window=12, query_pre_attn_scalar=24,
                                           attn_logit_softcapping=0.5, final_logit_softcapping=2.0,
                                           attn_implementation="sdpa", **COMMON))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
    return model


FAMILIES = {"llama3": (llama3, None), "qwen3": (qwen3, None), "gemma3": (gemma3, [12, 12, 0]), "phi3": (phi3, [20, 20]),
            "gemma2": (gemma2, [12, 0])}


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


def test_soft_caps_are_kept(family):
    model, out, rep, _ = family
    caps = rep.manifest["program"]["paged"].get("softcaps")
    assert caps == ([0.5, 0.5] if model.config.model_type == "gemma2" else None)
    if caps:  # built with SDPA, captured eagerly; the greedy test's reference is its eager attention
        assert model.config._attn_implementation == "eager"
        sdpa = gemma2().eval()
        sdpa.load_state_dict(model.state_dict())
        ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():  # the cap changes the output: the greedy test can tell
            assert not torch.allclose(sdpa(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-3)


def test_attention_sinks_are_refused(tmp_path):
    from transformers import GptOssConfig, GptOssForCausalLM
    torch.manual_seed(0)
    cfg = GptOssConfig(num_hidden_layers=2, head_dim=16, sliding_window=12, num_local_experts=4, num_experts_per_tok=2,
                       layer_types=["sliding_attention", "full_attention"], attn_implementation="eager", **COMMON)
    with pytest.raises(ValueError, match=r"layer 0 .*aten\.cat: attention sinks") as e:
        compile_model(source(GptOssForCausalLM(cfg).eval(), "gpt-oss"), Float(), tmp_path / "oss", progress=False)
    assert len(str(e.value).strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["gemma3", "phi3", "gemma2"])  # linears laid out their own way
def test_w4a16_artifact_is_the_source_quantized_alike(name, tmp_path):
    """The W4A16 artifact (RTN, g32) computes what fake-quantizing the source model's linears the
    same way computes: its SQNR against float is the source's, and its logits are that model's."""
    import copy

    import qcompiler
    from qcompiler.codegen.quant import sqnr_db
    from qcompiler.passes.quantization.rounding import fake_quantize
    from qcompiler.targets import W4A16
    torch.manual_seed(0)
    model = FAMILIES[name][0]().eval()
    compile_model(source(model, model.config.model_type), W4A16(group_size=32, method="rtn", lm_head_bits=None),
                  tmp_path / "w4", progress=False)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in ref.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                m.weight.copy_(fake_quantize(m.weight, 4, 32, symmetric=False))
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(40)[None]
    with torch.no_grad():
        want, fp = ref(input_ids=ids).logits, model(input_ids=ids).logits
        got = qcompiler.load(tmp_path / "w4")(ids, pos)
    assert abs(sqnr_db(fp, got) - sqnr_db(fp, want)) < 0.5
    assert sqnr_db(want, got) > 30  # the same model, up to the int4 kernels' 16-bit activations


# other targets on the families whose linears meet them their own way: (1 + w) norms that
# SmoothQuant folds into, fused projections
ROTATION = {"gemma3": "w8a8", "phi3": "w8a16"}


@pytest.mark.parametrize("name", list(ROTATION))
def test_other_targets_compile_and_serve(name, tmp_path):
    from qcompiler.targets import make_target
    build, windows = FAMILIES[name]
    torch.manual_seed(0)
    src = source(build().eval(), name)
    src.calibration_data = lambda: [torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(i))
                                    for i in range(4)]  # SmoothQuant's activation ranges
    rep = compile_model(src, make_target(ROTATION[name]), tmp_path / "q", progress=False)
    checks = [p["check"] for p in rep.manifest["passes"] if p.get("check")]
    assert checks[-1]["sqnr_db_vs_float"] > 15, checks[-1]  # a broken pass gives a few dB
    assert rep.manifest["program"]["paged"].get("windows") == windows
    outs = LLM(tmp_path / "q", kv_cache_dtype="float32").generate([[1, 2, 3, 4, 5]], SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True))
    assert len(outs[0].token_ids) == 8
