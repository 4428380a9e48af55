"""The qcompile command: round trips through the real entry point, and one clear line plus a
non-zero exit for every kind of bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qcompiler.cli import main
from tests_paths import EXAMPLES, FIXTURES, ROOT

QCOMPILE = str(Path(sys.executable).with_name("qcompile"))
LOAD_AND_RUN = ("import sys, torch, qcompiler; m = qcompiler.load(sys.argv[1]); "
                "ids = torch.randint(0, {v}, (1, 5)); pos = torch.arange(5)[None]; print(tuple(m(ids, pos).shape))")


def _run(*args, **kw):
    return subprocess.run([*args], capture_output=True, text=True, cwd=ROOT, timeout=600, **kw)


def test_tiny_llama_w4a16_roundtrip(tmp_path):
    out = tmp_path / "tiny-w4a16"
    r = _run(QCOMPILE, str(EXAMPLES / "tiny_llama.py"), "--target", "w4a16", "-q", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "bits/weight" in r.stdout and "seconds" in r.stdout
    man = json.loads((out / "manifest.json").read_text())
    head = man["layers"]["lm_head"]  # int8 where the calibration data shows it cheap (the w4a16 default)
    n = 15 if head["status"] == "quantized" else 14
    assert f"{n} quantized, {15 - n} kept float" in r.stdout
    assert f"lm_head      {'int8 per channel' if n == 15 else 'float'}: int8 costs" in r.stdout
    r = _run(sys.executable, "-c", LOAD_AND_RUN.format(v=1024), str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(1, 5, 1024)"


def test_plain_pytorch_model_w8a16_roundtrip(tmp_path):
    out = tmp_path / "plain-w8a16"
    r = _run(QCOMPILE, "compile", str(FIXTURES / "plain_lm.py"), "--target", "w8a16", "--asymmetric", "-q",
             "-o", str(out))
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "manifest.json").read_text())
    assert man["target"]["name"] == "w8a16" and man["model"]["source"] == "model.py"
    r = _run(sys.executable, "-c", LOAD_AND_RUN.format(v=96), str(out))
    assert r.returncode == 0 and r.stdout.strip() == "(1, 5, 96)", r.stderr


def test_hf_directory_input(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    import tiny_llama
    tiny_llama.build_model().save_pretrained(tmp_path / "hf")
    out = tmp_path / "hf-w8a16"
    assert main([str(tmp_path / "hf"), "--target", "w8a16", "-q", "-o", str(out)]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["model"]["source"] == "hf" and man["model"]["config"]["hidden_size"] == 128


def _one_error_line(capsys, code, expect: str):
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("qcompile: error:") and expect in err[0], err


@pytest.mark.parametrize("args,expect", [
    (["missing/model.py"], "model not found: missing/model.py"),
    ([str(FIXTURES / "plain_lm.py"), "--target", "w3a9"], "unknown target 'w3a9'; available: float, w4a16, w8a16, w8a8, fp8"),
    ([str(FIXTURES / "plain_lm.py"), "--method", "gptq"], "needs calibration data: define calibration_texts()"),
    ([str(FIXTURES / "plain_lm.py"), "--method", "smart"], "unknown method 'smart'; available: rtn, imatrix, gptq, awq, auto"),
    ([str(FIXTURES / "plain_lm.py"), "--act-order"], "act_order applies to method 'gptq', not 'auto'"),
    ([str(FIXTURES / "plain_lm.py"), "--target", "w8a8", "--method", "awq"], "available: rtn, gptq"),
    ([str(FIXTURES / "plain_lm.py"), "--target", "w8a8", "--observer", "max"], "unknown observer 'max'"),
    ([str(FIXTURES / "plain_lm.py"), "--target", "w8a8", "--smoothquant-alpha", "1.5"], "smoothquant_alpha must be in [0, 1]"),
    ([str(FIXTURES / "plain_lm.py"), "--target", "w8a8", "--smoothquant-alpha", "0.5", "--no-smoothquant"],
     "exclude each other"),
    ([str(FIXTURES / "plain_lm.py"), "--no-smoothquant"], "target 'w4a16' takes no option no_smoothquant"),
    ([str(FIXTURES / "plain_lm.py"), "--target", "fp8", "--group-size", "64"], "takes no option group_size"),
    ([str(EXAMPLES / "tiny_llama.py"), "--method", "gptq", "--calib-file", "missing.txt"], "--calib-file missing.txt: no such file"),
    ([str(EXAMPLES / "tiny_llama.py"), "--method", "gptq", "--calib-samples", "0"], "calibration samples must be an integer >= 1"),
    ([str(FIXTURES / "no_build_model.py")], "defines no build_model()"),
    ([str(FIXTURES / "plain_lm.py"), "--group-size", "48"], "group size must be a power of two >= 16 or 'auto', got 48"),
    ([str(FIXTURES / "plain_lm.py"), "--group-size", "8"], "got 8"),
    ([str(FIXTURES / "plain_lm.py"), "--target", "float", "--group-size", "64"], "takes no option group_size"),
    ([str(FIXTURES / "plain_lm.py"), "-o", "/proc/qc-artifact"], "cannot write the artifact to /proc/qc-artifact"),
    ([str(ROOT / "README.md")], "expected a .py file, a .gguf file or a Hugging Face model directory"),
    (["eval", str(FIXTURES)], "is not a qcompiler artifact"),
    ([str(FIXTURES / "plain_lm.py"), "--group-size", "channel"], "--group-size channel applies to w8a16 only"),
    ([str(FIXTURES / "import_error.py")], "import_error.py failed to import: ModuleNotFoundError"),
    ([str(FIXTURES / "data_dependent.py")], "torch.export could not capture the model"),
    ([str(FIXTURES / "plain_lm.py"), "--dtype", "float64"], "unknown dtype 'float64'"),
    ([str(FIXTURES / "plain_lm.py"), "-o", str(FIXTURES)], "is not empty and holds no qcompiler artifact"),
])
def test_bad_input_one_line(capsys, args, expect):
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    _one_error_line(capsys, code, expect)


def test_output_under_a_file_and_argparse_errors(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    _one_error_line(capsys, main([str(FIXTURES / "plain_lm.py"), "-o", str(f / "sub")]), "cannot write the artifact")
    _one_error_line(capsys, main([str(FIXTURES / "plain_lm.py"), "-o", str(f)]), "is a file, not a directory")
    with pytest.raises(SystemExit) as e:
        main([str(FIXTURES / "plain_lm.py"), "--group-size", "abc"])
    _one_error_line(capsys, e.value.code, "group size must be an integer, 'auto' or 'channel'")


def test_help_explains_targets():
    r = _run(QCOMPILE, "--help")
    assert r.returncode == 0
    for word in ("float", "w4a16", "w8a16", "--group-size", "eval"):
        assert word in r.stdout
