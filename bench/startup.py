"""Start-up: seconds from process start to the first generated token, ours and its anchors in one run.

    .venv/bin/python bench/startup.py [--threads 1] [--rounds 2]

Each candidate is a fresh process, timed from spawn to exit, generating one token after "Hello":

- ``qcompile generate ART "Hello" --max-tokens 1`` on the SmolLM2 W4A16 artifact (``build/``,
  compiled when missing or stale), the default path (compiled ahead of time):
  - *cached*: the library built for this machine (as ``qcompile`` leaves it, or an earlier start);
  - *never seen*: empty qcompiler and Inductor caches, as on a machine that has never run it;
- the alternatives: ``--compile jit`` (torch.compile) with Inductor's cache warm and empty, and
  ``--eager``;
- llama.cpp (``llama-cpp-python``): ``Llama(Q4_0 GGUF)`` + one token;
- transformers: ``from_pretrained`` (the bundled GGUF, dequantized) + ``generate`` of one token.

Candidates alternate in rounds; median (min–max).
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples"))

from serving import artifact, cpu_name, med  # noqa: E402

LLAMA = """
import sys
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_threads={t}, n_threads_batch={t}, n_ctx=512, verbose=False)
llm("Hello", max_tokens=1)
"""
TRANSFORMERS = """
import torch
torch.set_num_threads({t})
import smollm2
tok, model = smollm2.build_tokenizer(), smollm2.build_model().eval()
ids = tok("Hello", return_tensors="pt")
with torch.no_grad():
    model.generate(**ids, max_new_tokens=1, do_sample=False)
"""


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{r.stderr[-2000:]}")
    return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    art = artifact("w4a16")
    base = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    base.pop("QCOMPILER_COMPILE", None)
    py = sys.executable
    gen = [py, "-m", "qcompiler.cli", "generate", art, "Hello", "--max-tokens", "1"]
    fresh = Path(tempfile.mkdtemp(prefix="qc-startup-"))

    def empty_caches(kind: str) -> dict:
        """An environment whose qcompiler AOT and Inductor caches start empty."""
        d = fresh / f"{kind}-{time.monotonic_ns()}"
        return {**base, "QCOMPILER_AOT_CACHE": str(d / "aot"), "TORCHINDUCTOR_CACHE_DIR": str(d / "inductor")}

    cands = {
        "qcompiler W4A16, default, library cached": lambda: timed(gen, base),
        "qcompiler W4A16, default, never seen (empty caches)": lambda: timed(gen, empty_caches("aot")),
        "qcompiler W4A16, --compile jit, Inductor cache warm": lambda: timed(gen + ["--compile", "jit"], base),
        "qcompiler W4A16, --compile jit, empty caches": lambda: timed(gen + ["--compile", "jit"], empty_caches("jit")),
        "qcompiler W4A16, --eager": lambda: timed(gen + ["--eager"], base),
    }
    q4_0 = ROOT / "build/smollm2-q4_0.gguf"
    try:
        import llama_cpp  # noqa: F401
        if q4_0.exists():
            cands["llama.cpp Q4_0: load + 1 token"] = lambda: timed([py, "-c", LLAMA.format(t=a.threads), str(q4_0)], base)
        else:
            print("no build/smollm2-q4_0.gguf (bench/serving.py writes it): no llama.cpp anchor")
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp anchor (make bench-deps)")
    tf_env = {**base, "PYTHONPATH": str(ROOT / "examples")}
    cands["transformers fp32: from_pretrained + generate 1 token"] = lambda: timed(
        [py, "-c", TRANSFORMERS.format(t=a.threads)], tf_env)
    # the cached rows need the library and Inductor's graphs once, untimed
    timed(gen, base), timed(gen + ["--compile", "jit"], base)
    res = {k: [] for k in cands}
    for r in range(a.rounds):
        for k in (list(cands) if r % 2 == 0 else list(reversed(cands))):
            res[k].append(cands[k]())
        print(f"  round {r + 1}/{a.rounds} done", flush=True)
    shutil.rmtree(fresh, ignore_errors=True)
    anchor = "llama.cpp Q4_0: load + 1 token"
    print(f"\n### Start-up to the first token, {cpu_name()}, {a.threads} thread(s), {a.rounds} rounds: "
          f"median (min–max)\n")
    print("| system | seconds | × llama.cpp |")
    print("|---|---|---|")
    for k, v in res.items():
        ratio = f"{statistics.median(v) / statistics.median(res[anchor]):.1f}" if anchor in res else "–"
        print(f"| {k} | {med(v)} | {ratio} |")


if __name__ == "__main__":
    main()
