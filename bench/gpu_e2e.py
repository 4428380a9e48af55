"""End to end on the runtime: decode tok/s at batch 1 and 32 for a Llama-2-7B-shaped model
with random weights, bf16 vs W4A16 (RTN, group 128, asymmetric), through the same path an
artifact takes (capture -> passes -> paged export -> load-time lowering -> ``LLM``), kept in
memory instead of written to disk. The float program also runs against transformers' eager
greedy output as a correctness check.

    python bench/gpu_e2e.py                      # on a CUDA machine; JSON to $OUT/e2e.json
    python bench/gpu_e2e.py --tiny --device cpu  # a 2-layer smoke run of the same code

After each program's timing, ``torch.profiler`` looks at a few batch-1 decode steps (kernels by
device time, host ops by self time) and prints the tables (``--profile-steps 0``: none).
"""
import argparse
import json
import os
import sys
import time
import traceback

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qcompiler import LLM, SamplingParams
from qcompiler.capture import capture, export_paged
from qcompiler.pipeline import run_pipeline
from qcompiler.loader import prepare
from qcompiler.targets import W4A16, Float

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def build(shape: dict, device: str, dtype: torch.dtype, max_len: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(**shape, max_position_embeddings=max_len, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)


def compiled(ep, target, model_cfg: dict, max_len: int, device: str, compile: bool):
    t0 = time.perf_counter()
    with torch.no_grad():
        result = run_pipeline(ep, target)
        paged = result.gm.meta["qc_paged"]
        final = export_paged(result.gm, max_len, paged, torch.bfloat16)
    manifest = {"target": target.to_dict(), "model": {"config": model_cfg, "dtype": "bfloat16"},
                "program": {"max_tokens": max_len, "paged": paged}, "tokenizer": None}
    cm = prepare(final, manifest, device=device, compile=compile)
    return cm, time.perf_counter() - t0


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_rate(llm: LLM, prompts: list[list[int]], new_tokens: int, device: str) -> dict:
    """Steps until every request has its first token (prefill), then times the decode steps."""
    eng = llm.engine
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    reqs = [eng.add_request(p, params) for p in prompts]
    while any(r.seq.num_completion_tokens == 0 for r in reqs):
        eng.step()
    sync(device)
    start = sum(r.seq.num_completion_tokens for r in reqs)
    t0 = time.perf_counter()
    steps = 0
    while not all(r.done for r in reqs):
        eng.step()
        steps += 1
    sync(device)
    dt = time.perf_counter() - t0
    made = sum(r.seq.num_completion_tokens for r in reqs) - start
    return {"batch": len(prompts), "tok_s": made / dt, "ms_per_step": 1e3 * dt / max(steps, 1), "steps": steps}


def profile_decode(llm: LLM, prompt: list[int], steps: int, device: str, rows: int = 12) -> str:
    """Where a batch-1 decode step's time goes: ``torch.profiler`` over ``steps`` decode steps, the
    kernels by device time and the host ops by self time, per step."""
    from torch.profiler import ProfilerActivity, profile
    eng = llm.engine
    req = eng.add_request(prompt, SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True))
    while req.seq.num_completion_tokens == 0:  # prefill, outside the profile
        eng.step()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        while not req.done:
            eng.step()
        sync(device)
    ev = prof.key_averages()
    out = []
    if device.startswith("cuda"):
        out.append(ev.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))
    out.append(ev.table(sort_by="self_cpu_time_total", row_limit=rows // 2, max_name_column_width=60))
    return f"({steps} decode steps, batch 1; totals over all steps)\n" + "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="2 small layers: a smoke run of the same path")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--compile", action="store_true", help="also torch.compile the program")
    ap.add_argument("--profile-steps", type=int, default=8,
                    help="after timing, profile this many batch-1 decode steps per program (0: none)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/gpu_e2e.py needs a CUDA device (or --device cpu --tiny)", file=sys.stderr)
        return 2
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "out")
    os.makedirs(out_dir, exist_ok=True)
    shape = TINY if args.tiny else LLAMA2_7B
    max_len, prompt_len = 1024, 32
    batches = [int(b) for b in args.batches.split(",")]
    res = {"shape": shape, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "new_tokens": args.new_tokens, "prompt_len": prompt_len, "rows": []}
    save = lambda: json.dump(res, open(os.path.join(out_dir, "e2e.json"), "w"), indent=1)  # noqa: E731

    t0 = time.perf_counter()
    model = build(shape, args.device, torch.bfloat16, max_len)
    ep = capture(model, max_len)
    res["capture_s"] = round(time.perf_counter() - t0, 1)
    print(f"built and captured in {res['capture_s']} s", flush=True)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, shape["vocab_size"], (max(batches), prompt_len), generator=g).tolist()

    # reference: transformers eager greedy (use_cache off: the model was built for capture)
    with torch.no_grad():
        ids = torch.tensor(prompts[:1], device=args.device)
        ref = []
        for _ in range(16):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            ref.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]], device=args.device)], 1)
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()

    blocks = (max(batches) * (prompt_len + args.new_tokens) // 16 + 8) * 2
    bf16, w4 = ("bf16", Float()), ("w4a16 g128", W4A16(group_size=128, symmetric=False))
    # the compiled W4A16 program before the compiled bf16 one: when time runs short, the goal's row first
    runs = [(bf16, False), (w4, False)] + ([(w4, True), (bf16, True)] if args.compile else [])
    for (name, target), compile in runs:
        label = name + (" compiled" if compile else "")
        try:
            cm, secs = compiled(ep, target, shape, max_len, args.device, compile)
            print(f"[{label}] passes + export + load {secs:.1f} s", flush=True)
            llm = LLM(cm, num_blocks=blocks, max_num_seqs=max(batches), max_num_batched_tokens=2048,
                      kv_cache_dtype="bfloat16")
            out = llm.generate([prompts[0]], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
            match = sum(a == b for a, b in zip(out[0].token_ids, ref))
            print(f"[{label}] greedy vs transformers eager: {match}/16 tokens equal", flush=True)
            for b in batches:  # warm-up at each batch size: CUDA graphs are captured here
                decode_rate(llm, prompts[:b], 4, args.device)
            for b in batches:
                r = decode_rate(llm, prompts[:b], args.new_tokens, args.device)
                r.update(label=label, greedy_match_16=match, load_s=round(secs, 1))
                res["rows"].append(r)
                print(f"[{label}] batch {b:3d}: {r['tok_s']:8.1f} tok/s  {r['ms_per_step']:.2f} ms/step", flush=True)
                save()
            if args.profile_steps:
                try:
                    print(f"[{label}] profile: " + profile_decode(llm, prompts[0], args.profile_steps, args.device),
                          flush=True)
                except Exception as e:  # a profile is extra: its failure costs nothing else
                    print(f"[{label}] profile failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            del llm, cm
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        except Exception as e:  # report and go on: the other rows still count
            print(f"[{label}] failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
            traceback.print_exc(limit=6)
    by = {(r["label"], r["batch"]): r["tok_s"] for r in res["rows"]}
    pairs = [(f"w4a16 g128{m}", f"bf16{m}") for m in ("", " compiled")] + [("w4a16 g128 compiled", "bf16")]
    for b in batches:
        for w, f in pairs:
            if (w, b) in by and (f, b) in by:
                print(f"batch {b}: {w} / {f} = {by[(w, b)] / by[(f, b)]:.2f}x", flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
