"""Compile time per stage, SmolLM2-135M → W4A16, and what checking every pass costs.

Compiles the bundled model with the checks on and off (``--no-verify``), alternating, in one
process each round so both see the same caches; prints each stage's median (min–max) and the
checks' cost as a share of the compile without them.

    .venv/bin/python bench/compile_time.py [--rounds 3] [--threads 2] [--group-size 64] [--symmetric] [--method rtn]
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--group-size", default="64", help="a power of two or 'auto' (default 64)")
    p.add_argument("--method", default="rtn", help="rtn (default), auto (the w4a16 default), imatrix, gptq, awq")
    p.add_argument("--symmetric", action="store_true", help="symmetric scales (default: integer zero points)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from qcompiler.compiler import compile_model
    from qcompiler.models import load_source
    from qcompiler.targets import W4A16
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serving import cpu_name
    src = load_source(str(Path(__file__).resolve().parents[1] / "examples" / "smollm2.py"))
    target = W4A16(group_size=a.group_size if a.group_size == "auto" else int(a.group_size), symmetric=a.symmetric,
                   method=a.method)
    runs: dict[bool, list[dict]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        compile_model(src, target, Path(tmp) / "warm", verify=False)  # first-call costs out of the figures
        for r in range(a.rounds):
            for verify in (True, False) if r % 2 == 0 else (False, True):
                t0 = time.perf_counter()
                rep = compile_model(src, target, Path(tmp) / f"v{int(verify)}", verify=verify)
                stages = {**rep.stages, "total": time.perf_counter() - t0}
                runs[verify].append(stages)
                print(f"round {r} verify={verify}: " + " · ".join(f"{k.removeprefix('pass:')} {v:.1f}"
                                                                for k, v in stages.items()), flush=True)
    print(f"\n{cpu_name()}, {a.threads} threads, torch {torch.__version__}, {a.rounds} rounds, "
          f"SmolLM2 → {target.scheme}; median (min–max) seconds")
    names = list(runs[True][0])
    print("| stage | " + " | ".join(n.removeprefix("pass:") for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for verify in (True, False):
        row = [med([s.get(n, 0.0) for s in runs[verify]]) for n in names]
        print(f"| {'checked' if verify else '--no-verify'} | " + " | ".join(row) + " |")
    checks = [s["verify"] for s in runs[True]]
    base = [s["total"] for s in runs[False]]
    share = [c / b for c, b in zip(checks, base)]
    print(f"\nchecks: {med(checks)} s = {100 * statistics.median(share):.1f}% "
          f"({100 * min(share):.1f}–{100 * max(share):.1f}%) of the compile without them, "
          f"{med(base)} s; wall with them: {med([s['total'] for s in runs[True]])} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
