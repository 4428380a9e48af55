"""Online serving, in the manner of ``vllm bench serve``: our ``qcompile serve`` and llama.cpp's
OpenAI server (``llama_cpp.server`` on the Q4_0 requantization of the bundled GGUF) in one run.

    .venv/bin/python bench/serve.py [--threads 1 2] [--concurrency 1 4 16 64] [--soak 2000]

For each system, thread count and concurrency: a fixed mix of streamed completions (ShareGPT-shaped
lengths, ``bench/serving.py``'s draw, new tokens capped by ``--max-new``; EOS blocked by
``logit_bias`` on both servers so every request generates its count), ``concurrency`` of them in
flight at a time. Reported: request throughput, output tok/s, TTFT, TPOT and ITL (median and p99),
errors. Then the soak: ``--soak`` short requests (at most 32 new tokens) at concurrency 64 against our
server, a tenth of them abandoned mid-stream at random; errors, blocks still held afterwards, and
the server's resident memory growth. Needs ``make bench-deps`` for the llama.cpp anchor."""
import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "bench"))
import smollm2  # noqa: E402
from serving import artifact, cpu_name, sharegpt_lengths  # noqa: E402

from qcompiler.data import britannica_text  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A server subprocess on 127.0.0.1, healthy before use, stopped with SIGTERM."""

    def __init__(self, cmd: list[str], threads: int, health: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.log = tempfile.TemporaryFile(mode="w+")  # not a pipe: a chatty server would block on a full one
        self.proc = subprocess.Popen([*cmd, "--port", str(self.port)], env=env, stdout=self.log, stderr=self.log,
                                     text=True)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{cmd[:4]} exited: {self.log.read()[-2000:]}")
            try:
                if httpx.get(self.url + health, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.5)

    def rss_mib(self) -> float:
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def ours(threads: int, compile_: str) -> Process:
    cmd = [sys.executable, "-m", "qcompiler.cli", "serve", artifact("w4a16"), "--threads", str(threads),
           "--served-model-name", "smollm2", "--max-num-seqs", "64", "--kv-cache-memory", "512M"]
    return Process(cmd + ["--compile", compile_], threads, "/health")


def llama(threads: int) -> Process:
    q4_0 = ROOT / "build/smollm2-q4_0.gguf"
    if not q4_0.exists():
        import llama_cpp
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype, p.allow_requantize, p.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, True, threads
        assert llama_cpp.llama_model_quantize(str(smollm2.gguf_path()).encode(), str(q4_0).encode(), p) == 0
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(q4_0), "--model_alias", "smollm2",
           "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "2048", "--host", "127.0.0.1",
           "--interrupt_requests", "False"]  # queue concurrent requests (the default cancels the running one)
    return Process(cmd, threads, "/v1/models")


def workload(tokenizer, n: int, max_new: int, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` (prompt text, new tokens): ShareGPT-shaped lengths, prompts cut from the Britannica text."""
    rng = random.Random(seed)
    ids = tokenizer(britannica_text()[:400_000])["input_ids"]
    out = []
    for _ in range(n):
        p, new = sharegpt_lengths(rng)
        p = min(p, 512)
        start = rng.randrange(len(ids) - p)
        out.append((tokenizer.decode(ids[start:start + p]), min(new, max_new)))
    return out


async def one(client: httpx.AsyncClient, url: str, prompt: str, new: int, eos: int, abandon_after=None) -> dict:
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": new, "temperature": 0.0, "stream": True,
            "logit_bias": {str(eos): -100}}
    t0 = time.perf_counter()
    stamps, status = [], None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            status = r.status_code
            if status != 200:
                await r.aread()
                return {"ok": False, "status": status}
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]" and '"text"' in line:
                    stamps.append(time.perf_counter())
                    if abandon_after is not None and len(stamps) >= abandon_after:
                        return {"ok": True, "abandoned": True}
    except httpx.HTTPError as e:
        return {"ok": False, "status": f"{type(e).__name__}"}
    if not stamps:
        return {"ok": False, "status": "no tokens"}
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    e2e = stamps[-1] - t0
    return {"ok": True, "ttft": stamps[0] - t0, "itl": gaps, "tokens": len(stamps), "e2e": e2e,
            "tpot": (e2e - (stamps[0] - t0)) / max(1, len(stamps) - 1)}


async def run_level(url: str, reqs, concurrency: int, eos: int, abandon: float = 0.0, seed: int = 0):
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def task(prompt, new):
            async with sem:
                cut = rng.randint(1, max(1, new - 1)) if rng.random() < abandon else None
                return await one(client, url, prompt, new, eos, cut)
        t0 = time.perf_counter()
        results = await asyncio.gather(*[task(p, n) for p, n in reqs])
        return results, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summarize(results: list[dict], wall: float) -> dict:
    done = [r for r in results if r["ok"] and "ttft" in r]
    ms = lambda xs, q: 1000 * (statistics.median(xs) if q == 0.5 else pct(xs, q)) if xs else float("nan")  # noqa: E731
    ttft, tpot, itl = [r["ttft"] for r in done], [r["tpot"] for r in done], [g for r in done for g in r["itl"]]
    return {"req_s": len(done) / wall, "tok_s": sum(r["tokens"] for r in done) / wall,
            "ttft": (ms(ttft, 0.5), ms(ttft, 0.99)), "tpot": (ms(tpot, 0.5), ms(tpot, 0.99)),
            "itl": (ms(itl, 0.5), ms(itl, 0.99)), "errors": sum(not r["ok"] for r in results)}


def offline_step_ms(threads: int, compile_: str, tok) -> float:
    """Our batch-1 decode step through ``LLM`` in this process (no server): ms per generated token,
    from the difference between 129 and 1 new tokens after a 32-token prompt."""
    import torch

    from qcompiler import LLM, SamplingParams
    torch.set_num_threads(threads)
    llm = LLM(artifact("w4a16"), compile=compile_)
    prompt = tok(britannica_text()[:2000])["input_ids"][:32]
    times = {}
    for _ in range(2):  # the first round warms up
        for n in (1, 129):
            t0 = time.perf_counter()
            llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            times[n] = time.perf_counter() - t0
    return 1000 * (times[129] - times[1]) / 128


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default max(8, 2 x concurrency))")
    ap.add_argument("--max-new", type=int, default=128, help="cap on new tokens per request (default 128)")
    ap.add_argument("--soak", type=int, default=2000, help="soak requests (0: none)")
    ap.add_argument("--systems", nargs="+", default=["qcompiler", "llama.cpp"])
    ap.add_argument("--compile", default="auto", choices=("auto", "aot", "jit", "eager"),
                    help="how our server runs the program (default auto: compiled ahead of time on CPU)")
    a = ap.parse_args()
    import qcompiler
    tok = qcompiler.load(artifact("w4a16")).tokenizer
    eos = tok.eos_token_id
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; max new tokens {a.max_new}; "
          f"our server with --compile {a.compile} on W4A16 g64 (int8 lm_head)", flush=True)
    rows, step = [], {}
    for threads in a.threads:
        if "qcompiler" in a.systems:
            step[threads] = offline_step_ms(threads, a.compile, tok)
            print(f"offline decode step, {threads} thread(s): {step[threads]:.2f} ms", flush=True)
        for system in a.systems:
            srv = ours(threads, a.compile) if system == "qcompiler" else llama(threads)
            try:
                for c in a.concurrency:
                    n = a.requests or max(8, 2 * c)
                    reqs = workload(tok, n, a.max_new, seed=c)
                    asyncio.run(run_level(srv.url, reqs[:min(2, n)], min(c, 2), eos))  # warm-up
                    s = summarize(*asyncio.run(run_level(srv.url, reqs, c, eos)))
                    rows.append((system, threads, c, n, s))
                    print(f"{system} t{threads} c{c}: {s}", flush=True)
            finally:
                srv.stop()
    print("\n| system | threads | concurrency | requests | req/s | output tok/s | TTFT ms p50 / p99 | "
          "TPOT ms p50 / p99 | ITL ms p50 / p99 | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for system, t, c, n, s in rows:
        f = lambda p: f"{p[0]:.0f} / {p[1]:.0f}"  # noqa: E731
        print(f"| {system} | {t} | {c} | {n} | {s['req_s']:.2f} | {s['tok_s']:.1f} | {f(s['ttft'])} | "
              f"{f(s['tpot'])} | {f(s['itl'])} | {s['errors']} |")
    base = {(t, c): s["tok_s"] for system, t, c, _, s in rows if system == "llama.cpp"}
    ttft = {(t, c): s["ttft"][0] for system, t, c, _, s in rows if system == "llama.cpp"}
    for system, t, c, _, s in rows:
        if system != "qcompiler":
            continue
        line = f"threads {t}, concurrency {c}:"
        if (t, c) in base:
            line += f" output tok/s {s['tok_s'] / base[(t, c)]:.2f}x llama.cpp's server,"
            line += f" median TTFT {s['ttft'][0] / ttft[(t, c)]:.2f}x llama.cpp's,"
        print(f"{line} median ITL {s['itl'][0] / step[t]:.2f}x our offline decode step ({step[t]:.2f} ms)")
    if a.soak:
        soak(tok, eos, a.soak, a.threads[0], a.compile)


def soak(tok, eos: int, n: int, threads: int, compile_: str) -> None:
    srv = ours(threads, compile_)
    try:
        rng = random.Random(7)
        ids = tok(britannica_text()[:100_000])["input_ids"]
        reqs = []
        for _ in range(n):
            p, start = rng.randint(8, 200), rng.randrange(len(ids) - 200)
            reqs.append((tok.decode(ids[start:start + p]), rng.randint(4, 32)))
        asyncio.run(run_level(srv.url, reqs[:64], 64, eos))  # warm-up: allocator and caches settle
        rss0 = srv.rss_mib()
        results, wall, rss = [], 0.0, []
        for i in range(0, n, 500):  # in quarters of 500: does resident memory keep growing?
            r, w = asyncio.run(run_level(srv.url, reqs[i:i + 500], 64, eos, abandon=0.1, seed=i))
            results, wall = results + r, wall + w
            rss.append(srv.rss_mib())
        time.sleep(1.0)
        m = {}
        for line in httpx.get(srv.url + "/metrics").text.splitlines():
            if line.startswith("qcompiler:") and "{" in line:
                m[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
        rss1 = srv.rss_mib()
        errors = sum(not r["ok"] for r in results)
        abandoned = sum(bool(r.get("abandoned")) for r in results)
        print(f"\nsoak: {n} requests (≤ 32 new tokens) at concurrency 64, {abandoned} abandoned mid-stream, "
              f"{wall:.0f} s: errors {errors}; after: running {m['qcompiler:num_requests_running']:.0f}, waiting "
              f"{m['qcompiler:num_requests_waiting']:.0f}, KV usage {m['qcompiler:kv_cache_usage_perc']:.3f}; "
              f"RSS {rss0:.0f} -> {rss1:.0f} MiB ({100 * (rss1 / rss0 - 1):+.1f}%); after each 500: "
              + ", ".join(f"{x:.0f}" for x in rss))
    finally:
        print(f"server exit status {srv.stop()}")


if __name__ == "__main__":
    main()
