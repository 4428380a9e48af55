"""``LLM``: offline generation from a compiled artifact, vLLM's shape.

    llm = LLM("build/smollm2-w4a16")
    outs = llm.generate(["Once upon a time"], SamplingParams(max_tokens=64, temperature=0.0))
"""
from dataclasses import dataclass
from typing import Optional, Sequence as Seq, Union

import torch

from qcompiler.codegen.attention import row_width
from qcompiler.codegen.workspace import SplitKWorkspace
from qcompiler.runtime.beam_search import BeamSearchParams, BeamSequence
from qcompiler.runtime.engine import Engine, ModelRunner
from qcompiler.runtime.memory import kv_cache_bytes, profile_step
from qcompiler.runtime.sampling import SamplingParams

from .loader import CompiledModel, load
from .lowering import A16_TARGETS

Prompt = Union[str, list[int]]
KV_CACHE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                   "int8": torch.int8, "fp8": torch.float8_e4m3fn}


def check_kv_cache_dtype(name: str) -> None:
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {name!r}; available: {', '.join(KV_CACHE_DTYPES)}")


def kv_cache_dtype_of(manifest: dict, name: str) -> torch.dtype:
    """The KV cache dtype ``name`` means for an artifact: "auto" is bfloat16 for weight-only targets
    (their programs run 16-bit activations), the model's dtype otherwise."""
    check_kv_cache_dtype(name)
    if name in ("int8", "fp8") and manifest.get("format_version", 3) < 3:
        raise ValueError(f"an {name} KV cache needs an artifact of format 3 or later; this one is format "
                         f"{manifest['format_version']} (its program fixes the cache's row width): recompile the model")
    if KV_CACHE_DTYPES[name] is not None:
        return KV_CACHE_DTYPES[name]
    return torch.bfloat16 if manifest["target"]["name"] in A16_TARGETS else getattr(torch, manifest["model"]["dtype"])


@dataclass
class GenerationOutput:
    prompt: Optional[str]
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str           # "stop" | "length" | "error"
    num_cached_tokens: int       # prompt tokens served from the prefix cache
    error: Optional[str] = None
    samples: Optional[list["GenerationOutput"]] = None  # all n completions when n > 1 (this is the first)
    # SamplingParams(logprobs=k): per generated token (its log-prob, [(token id, log-prob)] top k)
    logprobs: Optional[list] = None
    # SamplingParams(prompt_logprobs=k): the same per prompt token, None for the first
    prompt_logprobs: Optional[list] = None


@dataclass
class BeamSearchOutput:
    prompt: Optional[str]
    prompt_token_ids: list[int]
    sequences: list[BeamSequence]  # beam_width finished hypotheses, best score first
    num_cached_tokens: int         # prompt tokens served from the prefix cache
    error: Optional[str] = None


class LLM:
    """Args:
        path: an artifact directory written by ``qcompile`` (or a ``CompiledModel`` already loaded).
        kv_cache_memory: bytes for the KV cache (sets the number of blocks), unless ``num_blocks``
            or ``gpu_memory_utilization``.
        gpu_memory_utilization: on CUDA, the fraction of the GPU's memory this engine may hold, as
            in vLLM: the KV pool takes what is left of it after the weights, the activations of a
            profiling step of ``max_num_batched_tokens`` tokens, and memory outside torch's
            allocator (``runtime.memory``). ``num_blocks``, when given, wins.
        block_size: tokens per KV block.
        prefix_cache: reuse KV blocks of earlier requests' shared prefixes (radix cache).
        max_num_seqs / max_num_batched_tokens: continuous batching limits per step (the token
            budget is what chunks long prompts).
        compile: "auto" (default: on CPU the program compiled ahead of time for this machine,
            built on first use and cached, ``qcompiler.aot``; on CUDA the program replayed from
            CUDA graphs), "jit" (``torch.compile``), "eager" or False (for debugging).
        kv_cache_dtype: "auto" (bfloat16 for weight-only artifacts, whose program runs 16-bit
            activations; the model's dtype otherwise), "float32", "bfloat16" or "float16"; or
            quantized, about half a bf16 cache's bytes a token: "int8" (symmetric, a scale per
            token and KV head) or "fp8" (e4m3, a scale per token and KV head), written quantized
            and read back into the query's dtype (layout: ``codegen.attention``).
            Attention runs in the cache's dtype when it is the narrower one, except CPU decode
            steps with our kernel (``qc_cpu::paged_decode``), which read a bf16 cache into fp32.
        device: "cpu" or "cuda" (Triton kernels for the ``qc::`` ops).
        cuda_graphs: on CUDA, replay decode steps of up to ``max_num_seqs`` sequences from CUDA graphs.
    """

    def __init__(self, path: Union[str, CompiledModel], *, kv_cache_memory: int = 256 << 20, num_blocks: Optional[int] = None,
                 block_size: int = 16, prefix_cache: bool = True, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, compile: Union[bool, str] = "auto", kv_cache_dtype: str = "auto",
                 device: str = "cpu", cuda_graphs: bool = True, gpu_memory_utilization: Optional[float] = None):
        if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if block_size < 1 or max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"block_size, max_num_seqs and max_num_batched_tokens must be >= 1, got "
                             f"{block_size}, {max_num_seqs}, {max_num_batched_tokens}")
        check_kv_cache_dtype(kv_cache_dtype)
        self.model = path if isinstance(path, CompiledModel) else load(path, compile=compile, device=device)
        if gpu_memory_utilization is not None and self.model.device.type != "cuda":
            raise ValueError("gpu_memory_utilization sizes the KV cache on a GPU (device='cuda'); "
                             "on the CPU give kv_cache_memory (bytes) or num_blocks")
        man = self.model.manifest
        paged = man["program"]["paged"]
        dtype = kv_cache_dtype_of(man, kv_cache_dtype)
        per_block = (paged["num_layers"] * 2 * block_size * paged["num_kv_heads"] * row_width(paged["head_dim"], dtype)
                     * dtype.itemsize)
        max_len = man["program"]["max_tokens"]
        workspace = SplitKWorkspace()  # the engine's: the profiling step grows it as serving will
        if num_blocks is None and gpu_memory_utilization is not None:
            with workspace:
                num_blocks = self._blocks_for_utilization(gpu_memory_utilization, paged, dtype, per_block,
                                                          block_size, min(max_num_batched_tokens, max_len),
                                                          max_num_seqs)
        num_blocks = num_blocks or max(1, kv_cache_memory // per_block)
        self.tokenizer = self.model.tokenizer if man.get("tokenizer") else None
        self.vocab_size: Optional[int] = man["program"].get("vocab_size") or man["model"]["config"].get("vocab_size")
        eos = man["model"]["config"].get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        runner = ModelRunner(self.model.program_for(dtype), paged, dtype, num_blocks, block_size, self.model.device,
                             max_num_seqs if cuda_graphs else 0, min(num_blocks, -(-max_len // block_size)),
                             workspace)
        self.engine = Engine(runner, num_blocks, block_size,
                             self.tokenizer, tuple(eos), prefix_cache, max_num_seqs, max_num_batched_tokens,
                             man["program"]["max_tokens"])

    def _blocks_for_utilization(self, utilization: float, paged: dict, dtype: torch.dtype, per_block: int,
                                block_size: int, step_tokens: int, max_num_seqs: int) -> int:
        prof = profile_step(self.model.program, paged, dtype, self.model.device, step_tokens,
                            min(max_num_seqs, step_tokens), block_size)
        budget = kv_cache_bytes(prof, utilization)
        if budget < per_block:
            gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
            raise ValueError(f"gpu_memory_utilization={utilization} leaves {gib(max(budget, 0))} for the KV cache, less "
                             f"than one block ({per_block} bytes): of {gib(prof.total)}, weights and a "
                             f"{step_tokens}-token step take {gib(prof.peak - prof.step_kv)}, memory outside torch "
                             f"{gib(prof.others)}; raise it, or lower max_num_batched_tokens")
        return budget // per_block

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this artifact has no tokenizer: pass prompts as lists of token ids")
            return self.tokenizer(prompt)["input_ids"]
        ids = [int(t) for t in prompt]
        vocab = self.vocab_size
        bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary [0, {vocab})")
        return ids

    def generate(self, prompts: Union[Prompt, Seq[Prompt]],
                 params: Union[SamplingParams, Seq[SamplingParams], None] = None) -> list[GenerationOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameters")
        reqs = [self.engine.add_request(self._encode(p), sp) for p, sp in zip(prompts, params)]
        while not all(r.done for r in reqs):
            self.engine.step()
        return [self._output(p, r) for p, r in zip(prompts, reqs)]

    def beam_search(self, prompts: Union[Prompt, Seq[Prompt]],
                    params: Optional[BeamSearchParams] = None) -> list[BeamSearchOutput]:
        """Beam search per prompt, as transformers' ``generate(num_beams=k, do_sample=False)``
        (``runtime.beam_search``). Searches run together and beside any other requests, their
        beams sharing KV blocks; ``stats()`` reports the blocks sharing saves."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or BeamSearchParams()
        groups = [self.engine.add_beam_search(self._encode(p), params) for p in prompts]
        while not all(g.done for g in groups):
            self.engine.step()
        return [BeamSearchOutput(p if isinstance(p, str) else None, g.prompt_ids, g.sequences, g.num_cached_tokens,
                                 g.error) for p, g in zip(prompts, groups)]

    def stream(self, prompt: Prompt, params: Optional[SamplingParams] = None):
        """Yields the text of one request as it is generated, then returns its output. A piece is
        released once no later token can change it: not inside a multi-byte character, not a
        possible start of a stop string (``runtime.detokenizer``)."""
        if self.tokenizer is None:
            raise ValueError("streaming text needs a tokenizer; this artifact has none")
        req = self.engine.add_request(self._encode(prompt), params or SamplingParams(), detokenize=True)
        sent, done = 0, False
        while not done:
            done = any(r is req for r in self.engine.step())
            text = req.text if done else req.detok.stable
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)
        return self._output(prompt, req)

    def _output(self, prompt, req) -> GenerationOutput:
        out = self._one(prompt, req)
        if req.children:
            out.samples = [out] + [self._one(prompt, c) for c in req.children]
        return out

    def _one(self, prompt, req) -> GenerationOutput:
        seq = req.seq
        ids = seq.token_ids[seq.num_prompt_tokens:]
        text = req.text
        if req.detok is None and self.tokenizer is not None:
            text = self.engine.detokenize(ids)
        p = req.params
        return GenerationOutput(prompt if isinstance(prompt, str) else None, seq.token_ids[:seq.num_prompt_tokens],
                                text, ids, req.finish_reason, req.num_cached_tokens, req.error,
                                logprobs=req.logprobs if p.logprobs is not None else None,
                                prompt_logprobs=req.prompt_logprobs if p.prompt_logprobs is not None else None)

    def stats(self) -> dict:
        return self.engine.stats()
