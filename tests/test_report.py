"""``qcompile report``: a valid PNG for every target, and text that says what the manifest and
the weights file say."""
import json

import pytest
from matplotlib.image import imread

from qcompiler.artifact import MANIFEST, WEIGHTS
from qcompiler.cli import main
from qcompiler.report import build_report, report_text, safetensors_header
from conftest import TARGETS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("key", TARGETS)
def test_report_draws_every_target(tiny_artifacts, key, tmp_path, capsys):
    _, reports = tiny_artifacts
    art = reports[key].out
    png = tmp_path / f"{key}.png"
    assert main(["report", str(art), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    h, w, _ = imread(png).shape
    assert h > 400 and w > 600
    out = capsys.readouterr().out
    manifest = json.loads((art / MANIFEST).read_text())
    for rec in manifest["passes"]:  # every pass with its recorded figures
        c = rec["check"]
        row = next(line for line in out.splitlines() if line.strip().startswith(rec["name"] + " "))
        assert f"{c['max_abs_err']:.2e}" in row and f"{rec['seconds']:.1f}" in row


@pytest.mark.parametrize("key", ["float", "w4a16-rtn", "w8a8-smoothquant"])
def test_report_facts_match_the_manifest_and_weights(tiny_artifacts, key):
    _, reports = tiny_artifacts
    art = reports[key].out
    manifest = json.loads((art / MANIFEST).read_text())
    rep = build_report(art)
    quantized = {k for k, v in manifest["layers"].items() if v["status"] == "quantized"}
    assert {row.name for row in rep.layers if row.quantized} == quantized
    header = safetensors_header(art / WEIGHTS)
    stored = sum(t["data_offsets"][1] - t["data_offsets"][0] for t in header.values())
    assert sum(s.artifact_bytes for s in rep.sizes) == stored
    # float size: the source model's own parameters (tiny Llama: fp32, untied embeddings)
    assert sum(s.float_bytes for s in rep.sizes) == pytest.approx(reports[key].float_bytes, rel=0.001)
    linears = next((s for s in rep.sizes if s.component == "linears"), None)
    if key == "w4a16-rtn":  # int4 codes plus an fp32 scale per 32 weights: 5 bits per weight
        assert linears.bits_per_weight == pytest.approx(5.0)
    elif key == "float":
        assert linears.bits_per_weight == 32.0
    text = report_text(rep)
    assert f"{len(quantized)} quantized" in text and manifest["target"]["name"] in text


def test_report_of_a_missing_artifact_is_one_line(capsys, tmp_path):
    assert main(["report", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such artifact directory" in err[0]


def test_a_tied_output_projection_is_one_float_table(tmp_path):
    """A model whose lm_head shares the embedding table, lm_head quantized on its own (int8): the
    float column counts the table once, as the source model holds it."""
    from qcompiler.compiler import compile_model
    from qcompiler.models import ModelSource
    from qcompiler.targets import W4A16
    from tiny_models import Args, build
    model = build(Args(vocab=96, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden=128, tie=True))
    rep = compile_model(ModelSource(model=model, kind="model.py", path="tied"), W4A16(lm_head_bits=8),
                        tmp_path / "tied")
    sizes = {s.component: s for s in build_report(rep.out).sizes}
    assert sum(s.float_bytes for s in sizes.values()) == rep.float_bytes
    assert sizes["lm_head"].bits_per_weight == pytest.approx(8 + 32 / 64)  # int8 codes, an fp32 scale per row
    assert sizes["embeddings"].bits_per_weight == 32.0 and sizes["linears"].bits_per_weight < 6
