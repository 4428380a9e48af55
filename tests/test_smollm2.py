"""The bundled SmolLM2-135M, straight from its GGUF file through the CLI: W4A16 g64 asymmetric
within a stated bound of float on a short perplexity slice of the evaluation text."""
import json
import sys

import pytest
import torch

import qcompiler
from qcompiler.capture import FlatTokenModule
from qcompiler.cli import main
from qcompiler.data import britannica_text
from qcompiler.evaluate import eval_tokens, perplexity
from qcompiler.models import load_source
from tests_paths import EXAMPLES

pytestmark = pytest.mark.slow
WINDOWS, WINDOW_LEN = 2, 512
# Full protocol (bench/RESULTS.md): float 22.62, W4A16 g64 asym 28.88 (+28%).
MAX_RATIO = 1.40


def test_smollm2_w4a16_perplexity_near_float(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    import smollm2
    out = tmp_path / "smollm2-w4a16"
    assert main([str(smollm2.gguf_path()), "--target", "w4a16", "--group-size", "64", "--asymmetric", "-q",
                 "-o", str(out)]) == 0
    man = json.loads((out / "manifest.json").read_text())
    quantized = [v for v in man["layers"].values() if v["status"] == "quantized"]
    assert len(quantized) == 30 * 7 and man["model"]["source"] == "gguf"
    assert all(v["weight_sqnr_db"] > 15 for v in quantized)

    m = qcompiler.load(out)
    tokens = eval_tokens(m.tokenizer, britannica_text(), WINDOWS * WINDOW_LEN)
    src = load_source(man["model"]["path"])
    torch.set_num_threads(2)
    ppl_float = perplexity(FlatTokenModule(src.model), tokens, WINDOW_LEN)
    ppl_w4 = perplexity(m.flat, tokens, WINDOW_LEN)
    assert 5 < ppl_float < 40, ppl_float
    assert 1.01 * ppl_float < ppl_w4 < MAX_RATIO * ppl_float, (ppl_float, ppl_w4)
