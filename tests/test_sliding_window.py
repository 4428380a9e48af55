"""Sliding-window attention through the paged rewrite: the ``window`` of ``qc::paged_attention`` in
every implementation (the ATen path, the native decode kernel, the Triton kernels under the
interpreter) against ``paged_attention_ref``; the rewrite recognizing masks by what they compute
(causal, windowed, per layer) and refusing any other; and transformers' windowed models compiled
to artifacts whose engine output equals transformers' past the window."""
import pytest
import torch
from torch import nn

from qcompiler import LLM, SamplingParams
from qcompiler.capture import capture
from qcompiler.codegen import cpu_native
from qcompiler.codegen.attention import paged_attention_impl, paged_attention_ref
from qcompiler.codegen.triton_attention import paged_attention_triton
from qcompiler.compiler import compile_model
from qcompiler.models import ModelSource
from qcompiler.passes import normalize, paged_attention
from qcompiler.targets import Float
from test_triton_attention import TOL, make_step

f32 = torch.float32

# (seq_lens, q_lens): decode, whole prompts, chunks after cached tokens, mixed
STEPS = {"decode": ([1, 9, 40, 70], [1, 1, 1, 1]), "prompts": ([30, 7], [30, 7]),
         "chunks": ([50, 64], [13, 30]), "mixed": ([40, 9, 33], [1, 9, 17])}


@pytest.mark.parametrize("softcap", [0.0, 1.0], ids=["uncapped", "capped"])
@pytest.mark.parametrize("window", [0, 1, 5, 16, 100])
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("native", [True, False], ids=["native", "aten"])
def test_cpu_paths_equal_reference(monkeypatch, step, window, native, softcap):
    if native and not cpu_native.available():
        pytest.skip("our CPU kernels need AVX-512 and g++")
    if not native:
        monkeypatch.setattr(cpu_native, "decode_supported", lambda *a: False)
    seq_lens, q_lens = STEPS[step]
    args = list(make_step("cpu", 2, 2, 16, 4, seq_lens, q_lens, seed=window))
    kv = args[1]  # slots no sequence wrote: finite garbage (the ATen path masks scores, not loads)
    args[1] = torch.where(kv.isnan(), torch.randn(kv.shape, generator=torch.Generator().manual_seed(1)), kv)
    ref = paged_attention_ref(*args, window, softcap)
    torch.testing.assert_close(paged_attention_impl(*args, window, softcap), ref, atol=1e-5, rtol=1e-5)
    if 0 < window < max(seq_lens):  # the window changes the result: the test can tell
        assert not torch.allclose(paged_attention_ref(*args, 0, softcap), ref, atol=1e-3)
    if softcap and window != 1:  # so does the cap (one key a query: nothing to reweigh)
        assert not torch.allclose(paged_attention_ref(*args, window), ref, atol=1e-3)


@pytest.mark.parametrize("window", [1, 7, 16, 37])
@pytest.mark.parametrize("step,kw", [("decode", {}), ("decode", dict(num_splits=3, block_n=16)),
                                     ("prompts", dict(block_n=16)), ("chunks", dict(block_n=16)),
                                     ("mixed", dict(block_n=16))], ids=["decode", "decode-split3", "prompts",
                                                                        "chunks", "mixed"])
def test_triton_kernels_equal_reference(kernel_device, step, kw, window):
    seq_lens, q_lens = STEPS[step]
    args = make_step(kernel_device, 2, 3, 16, 5, seq_lens, q_lens, seed=window)
    out = paged_attention_triton(*args, window, **kw)
    ref = paged_attention_ref(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args), window)
    torch.testing.assert_close(out.cpu(), ref, atol=TOL[f32][0], rtol=TOL[f32][1])


@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("step,kw", [("decode", dict(num_splits=3, block_n=16)), ("prompts", dict(block_n=16)),
                                     ("mixed", dict(block_n=16))], ids=["decode-split3", "prompts", "mixed"])
def test_triton_kernels_soft_cap_scores(kernel_device, step, kw, window):
    seq_lens, q_lens = STEPS[step]
    args = make_step(kernel_device, 2, 3, 16, 5, seq_lens, q_lens, seed=11 + window)
    out = paged_attention_triton(*args, window, 1.0, **kw)
    ref = paged_attention_ref(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args), window, 1.0)
    torch.testing.assert_close(out.cpu(), ref, atol=TOL[f32][0], rtol=TOL[f32][1])


class MaskedAttention(nn.Module):
    """One attention layer over embeddings whose mask is any function of (query, key) positions."""

    def __init__(self, allowed, vocab=32, dim=16):
        super().__init__()
        self.allowed, self.emb, self.qkv, self.out = allowed, nn.Embedding(vocab, dim), nn.Linear(dim, 3 * dim), \
            nn.Linear(dim, vocab)

    def forward(self, input_ids, position_ids):
        x = self.emb(input_ids)
        q, k, v = (t.view(1, -1, 2, 8).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        i = position_ids[0][:, None]
        j = torch.arange(input_ids.shape[1])[None, :]
        o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed(i, j)[None, None])
        return self.out(o.transpose(1, 2).reshape(1, -1, 16))


def _paged(model):
    return paged_attention(normalize(capture(model, max_tokens=128)))


def test_masks_are_recognized_by_what_they_compute():
    assert _paged(MaskedAttention(lambda i, j: j <= i)).meta["qc_paged"].get("windows") is None
    assert _paged(MaskedAttention(lambda i, j: (j <= i) & (i - j < 9))).meta["qc_paged"]["windows"] == [9]
    # the same window written another way, as an additive float mask
    additive = lambda i, j: torch.where((j <= i) & (j >= i - 8), 0.0, float("-inf"))  # noqa: E731
    assert _paged(MaskedAttention(additive)).meta["qc_paged"]["windows"] == [9]
    for allowed in (lambda i, j: j >= 0,                                   # bidirectional
                    lambda i, j: (j <= i) & ((i - j) % 2 == 0),            # strided
                    lambda i, j: (j <= i) & (i // 8 == j // 8)):           # chunked
        with pytest.raises(ValueError, match="layer 0 .*neither causal nor a causal sliding window"):
            _paged(MaskedAttention(allowed))
    alibi = lambda i, j: torch.where(j <= i, -0.5 * (i - j).float(), float("-inf"))  # noqa: E731
    with pytest.raises(ValueError, match="layer 0 .*adds a bias to the scores"):
        _paged(MaskedAttention(alibi))


def _mistral(window: int, layers: int = 2):
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=window, attn_implementation="sdpa", use_cache=False)
    return MistralForCausalLM(cfg).eval()


def _qwen2_mixed():
    """Qwen2 with windowed and full layers interleaved (``layer_types``), QKV bias."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      use_sliding_window=True, sliding_window=12, max_window_layers=0,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                      attn_implementation="sdpa", use_cache=False)
    return Qwen2ForCausalLM(cfg).eval()


def _hf_greedy(model, prompt, n):
    """transformers' greedy continuation, the whole sequence through the model at every step (its own
    masks), EOS a token like any other (the engine's ``ignore_eos``)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module", params=["mistral", "qwen2-mixed"])
def windowed(request, tmp_path_factory):
    model = _mistral(20) if request.param == "mistral" else _qwen2_mixed()
    out = tmp_path_factory.mktemp("swa") / request.param
    rep = compile_model(ModelSource(model=model, kind="hf", path=request.param, config=model.config.to_dict()),
                        Float(), out)
    return request.param, model, out, rep


def test_windows_are_recorded_and_checked(windowed):
    name, _, _, rep = windowed
    paged = rep.manifest["program"]["paged"]
    assert paged["windows"] == ([20, 20] if name == "mistral" else [12, 0, 12])
    ver = rep.manifest["verification"]
    assert ver["past_window"] and max(ver["sequences"]) > max(paged["windows"])


@pytest.mark.parametrize("kw", [dict(), dict(max_num_batched_tokens=7, block_size=4)])
def test_engine_greedy_equals_transformers_past_the_window(windowed, kw):
    _, model, out, _ = windowed
    llm = LLM(out, kv_cache_dtype="float32", **kw)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 30, 47)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == _hf_greedy(model, p, 16), (len(p), o.token_ids)
