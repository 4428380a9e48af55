"""The attention pass: for random sequences packed into random steps (prefill, chunked
prefill, decode, mixed) and random block sizes, every token's logits equal the original
program's on its whole sequence; the cache holds KV heads only; the model's mask is gone.
Models attend through SDPA or eagerly (transformers' eager attention; a hand-written one with
``masked_fill``, a sliding window and tanh soft-capped scores)."""
import copy

import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from qcompiler.capture import capture
from qcompiler.codegen.fx import call_nodes
from qcompiler.passes import normalize, paged_attention
from qcompiler.runtime.step_inputs import step_inputs
from tiny_models import Args, build

aten, qc = torch.ops.aten, torch.ops.qc


def hf_llama(n_heads, n_kv, seed, attn="sdpa"):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=16 * n_heads, intermediate_size=64, num_hidden_layers=2, num_attention_heads=n_heads,
                      num_key_value_heads=n_kv, vocab_size=64, max_position_embeddings=128,
                      attn_implementation=attn, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


class EagerAttention(torch.nn.Module):
    """Two layers of hand-written attention: ``masked_fill`` of a causal window of ``window`` keys
    (0: causal), scores soft-capped at ``softcap`` (0: none), KV heads repeated by indexing."""

    def __init__(self, n_heads, n_kv, window, softcap, seed, vocab=64, D=16):
        super().__init__()
        torch.manual_seed(seed)
        self.h, self.kv, self.D, self.window, self.softcap = n_heads, n_kv, D, window, softcap
        dim = n_heads * D
        self.emb = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, (n_heads + 2 * n_kv) * D) for _ in range(2))
        self.out = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, position_ids):
        x = self.emb(input_ids)
        T = input_ids.shape[1]
        i, j = position_ids[0][:, None], torch.arange(T)[None, :]
        hidden = (j > i) | ((i - j >= self.window) if self.window else torch.zeros_like(j > i))
        for qkv in self.qkv:
            q, k, v = qkv(x).view(1, T, -1, self.D).transpose(1, 2).split([self.h, self.kv, self.kv], 1)
            k, v = (t.repeat_interleave(self.h // self.kv, 1) for t in (k, v))
            att = q @ k.transpose(-2, -1) * 4.0 / self.D ** 0.5  # scores large enough for the cap to act
            if self.softcap:
                att = torch.tanh(att / self.softcap) * self.softcap
            att = att.masked_fill(hidden, float("-inf")).softmax(-1)
            x = x + (att @ v).transpose(1, 2).reshape(1, T, -1)
        return self.out(x)


@st.composite
def models(draw):
    n_kv = draw(st.sampled_from([1, 2]))
    n_heads = n_kv * draw(st.sampled_from([1, 3]))
    seed = draw(st.integers(0, 100))
    kind = draw(st.sampled_from(["hf-sdpa", "hf-eager", "eager", "tiny"]))
    if kind.startswith("hf"):
        return hf_llama(n_heads, n_kv, seed, kind[3:]), 64
    if kind == "eager":
        return EagerAttention(n_heads, n_kv, draw(st.sampled_from([0, 5])), draw(st.sampled_from([0.0, 1.5])), seed), 64
    return build(Args(vocab=64, dim=16 * n_heads, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv, hidden=64), seed), 64


@given(models(), st.data())
def test_paged_program_equals_original_for_any_packing(m, data):
    model, vocab = m
    gm_ref = normalize(capture(model, max_tokens=128))
    gm = paged_attention(copy.deepcopy(gm_ref))  # the pass rewrites in place
    assert not call_nodes(gm, aten.scaled_dot_product_attention.default)
    assert not call_nodes(gm, aten._softmax.default)  # eager attention is rewritten too
    assert len(call_nodes(gm, qc.paged_attention.default)) == 2
    # repeat_kv's [1, H_kv, rep, T, D] expansion is no longer computed: the cache holds KV heads only
    assert not [n for n in call_nodes(gm, aten.expand.default) if n.meta["val"].dim() == 5]
    assert not call_nodes(gm, aten.bitwise_and.Tensor)  # the model's causal mask is dead
    n_kv, D = gm.meta["qc_paged"]["num_kv_heads"], gm.meta["qc_paged"]["head_dim"]

    bs = data.draw(st.sampled_from([1, 2, 4, 16]), label="block_size")
    S = data.draw(st.integers(1, 3), label="sequences")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    seqs = [torch.randint(0, vocab, (data.draw(st.integers(1, 24)),), generator=g).tolist() for _ in range(S)]
    num_blocks = sum(-(-len(s) // bs) for s in seqs) + 2
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, k = [], 0
    for s in seqs:
        n = -(-len(s) // bs)
        tables.append(perm[k:k + n])
        k += n
    kv = torch.zeros(2, 2, num_blocks, bs, n_kv, D)
    done = [0] * S
    logits = [[None] * len(s) for s in seqs]
    with torch.no_grad():
        while any(d < len(s) for d, s in zip(done, seqs)):
            # each unfinished sequence advances by a random chunk (1 token = decode)
            chunk = [min(len(s) - d, data.draw(st.integers(1, 8))) if d < len(s) and data.draw(st.booleans()) else 0
                     for d, s in zip(done, seqs)]
            if not any(chunk):
                i = next(i for i, (d, s) in enumerate(zip(done, seqs)) if d < len(s))
                chunk[i] = 1
            act = [i for i in range(S) if chunk[i]]
            inp = step_inputs([tables[i] for i in act], [done[i] for i in act],
                              [seqs[i][done[i]:done[i] + chunk[i]] for i in act], bs)
            last = gm(*inp.args(kv))  # the engine's call: each sequence's last row
            kv_before = kv.clone()
            out = gm(*inp._replace(logits_indices=torch.arange(len(inp.input_ids))).args(kv))  # every row
            torch.testing.assert_close(kv, kv_before)  # rewriting the same slots with the same values
            torch.testing.assert_close(last, out[inp.logits_indices])
            for j, i in enumerate(act):
                rows = out[int(inp.query_start_loc[j]):int(inp.query_start_loc[j + 1])]
                for r, p in enumerate(range(done[i], done[i] + chunk[i])):
                    logits[i][p] = rows[r]
                done[i] += chunk[i]
        for s, seq in enumerate(seqs):
            ref = gm_ref(torch.tensor(seq), torch.arange(len(seq)))
            torch.testing.assert_close(torch.stack(logits[s]), ref, rtol=1e-4, atol=1e-4)


def test_eager_attention_is_read_op_by_op():
    """The window from the ``masked_fill`` mask, the scale and soft-cap from the scalar ops around ``tanh``."""
    gm = paged_attention(normalize(capture(EagerAttention(4, 2, 5, 1.5, seed=0), max_tokens=128)))
    assert gm.meta["qc_paged"] == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "windows": [5, 5],
                                   "softcaps": [1.5, 1.5]}
    scales = {n.args[6] for n in call_nodes(gm, qc.paged_attention.default)}
    assert scales == {4.0 / 16 ** 0.5}
