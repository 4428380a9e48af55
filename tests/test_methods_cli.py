"""Every calibrated method and activation-quantized target end to end on the tiny Llama: the CLI
compiles it, the artifact loads, its logits stay near the float model's, the manifest records
the method, the calibration data and per-layer errors, and the engine generates from it."""
import json
import sys

import pytest
import torch

from qcompiler import LLM, SamplingParams, load
from qcompiler.cli import main
from qcompiler.codegen.quant import sqnr_db
from tests_paths import EXAMPLES

sys.path.insert(0, str(EXAMPLES))
import tiny_llama  # noqa: E402

CASES = {  # args -> logits SQNR bound vs float (dB) on the random tiny model
    "gptq-act-order": (["--target", "w4a16", "--group-size", "32", "--method", "gptq", "--act-order"], 12.0),
    "awq-asym": (["--target", "w4a16", "--group-size", "32", "--asymmetric", "--method", "awq"], 12.0),
    "w8a8-smoothquant": (["--target", "w8a8"], 25.0),
    "w8a8-gptq-static-mse": (["--target", "w8a8", "--no-smoothquant", "--method", "gptq", "--observer", "mse"], 20.0),
    "fp8": (["--target", "fp8"], 20.0),
    "fp8-gptq": (["--target", "fp8", "--method", "gptq"], 20.0),
    "gptq-asym-no-clip": (["--target", "w4a16", "--group-size", "32", "--asymmetric", "--method", "gptq",
                           "--no-clip"], 12.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_method_artifact_loads_evaluates_and_serves(tmp_path, case):
    args, bound = CASES[case]
    out = tmp_path / case
    assert main([str(EXAMPLES / "tiny_llama.py"), *args, "--calib-samples", "4", "--calib-seq-len", "64", "-q",
                 "-o", str(out)]) == 0
    man = json.loads((out / "manifest.json").read_text())
    quantized = {k: v for k, v in man["layers"].items() if v["status"] == "quantized" and k != "lm_head"}
    assert len(quantized) == 14 and all("weight_sqnr_db" in v for v in quantized.values())
    head = man["layers"]["lm_head"]
    if man["target"]["name"] == "w4a16":  # int8 where the calibration data shows it cheap, else float
        assert (head["status"] == "quantized") == (head["perplexity_increase"] <= 0.005), head
        assert head["status"] == "float" or head["bits"] == 8
    else:
        assert head["status"] == "float"
    if "--method" in args or case == "w8a8-smoothquant":
        cal = man["calibration"]
        assert cal["source"] == "calibration_data()" and cal["samples"] == 4 and len(cal["sha256"]) == 64
    if "gptq" in case:
        assert all(v["method"] == "gptq" and v["output_mse"] <= v["rtn_output_mse"] for v in quantized.values())
    if case.startswith("fp8"):
        assert all(v["format"] == "float8_e4m3fn" for v in quantized.values())
    if man["target"]["name"] == "w4a16":
        assert man["target"]["clip"] == ("--no-clip" not in args)
    if case == "w8a8-smoothquant":
        assert sum("smoothquant" in v for v in quantized.values()) == 10  # q, k, v, gate, up per layer
    ids = torch.randint(0, 1024, (24,), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(24)
    with torch.no_grad():
        ref = tiny_llama.build_model().eval()(input_ids=ids[None], position_ids=pos[None]).logits[0]
        for fast in (True, False):
            got = load(out, fast=fast).flat(ids, pos)
            assert sqnr_db(ref, got) > bound, (case, fast, sqnr_db(ref, got))
    llm = LLM(str(out), num_blocks=16)
    o = llm.generate([ids[:10].tolist()], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
    assert len(o.token_ids) == 4 and llm.stats()["blocks_free"] == 16 - llm.stats()["blocks_cached"]
