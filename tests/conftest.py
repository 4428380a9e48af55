import os

import torch

# NOTE: importing torch does not import triton. Without a GPU, Triton kernels run in the
# interpreter on CPU tensors; this must be set before anything imports triton.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "inductor"))
# NOTE: programs run uncompiled unless a test asks for a mode: an ahead-of-time build takes tens of
# seconds a model and KV dtype (tests/test_aot.py covers the default path); servers inherit this
os.environ.setdefault("QCOMPILER_COMPILE", "eager")

import sys  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
# NOTE: under pytest-xdist (`make test` runs two workers) the cores are shared out: a worker that
# spins more threads than its share slows every other worker's torch by orders of magnitude
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))
warnings.filterwarnings("ignore", category=FutureWarning)
# NOTE: no shrink phase: each example captures a model (seconds); a failure prints its example as drawn.
settings.register_profile("qc", deadline=None, max_examples=12, derandomize=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate],
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("qc")


def pytest_collection_modifyitems(config, items):
    # the bundled model's tests first: xdist hands files out in this order, and the longest file
    # handed out last would run alone on one worker
    items.sort(key=lambda item: "slow" not in item.keywords)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernel_device() -> str:
    """Where Triton kernel tests run: the GPU when there is one, else the interpreter on CPU tensors."""
    return "cuda" if HAS_CUDA else "cpu"



# the tiny Llama compiled for every target and method family, once per session (tiny_artifacts)
from qcompiler.calibration import CalibrationConfig  # noqa: E402  (after TRITON_INTERPRET is set)
from qcompiler.targets import FP8, W4A16, W8A8, W8A16, Float  # noqa: E402

CALIB = CalibrationConfig(samples=4, seq_len=64)
TARGETS = {
    "float": Float(),
    "w4a16": W4A16(),  # the headline defaults: imatrix on the model file's calibration data
    "w4a16-rtn": W4A16(group_size=32, symmetric=True),
    "w4a16-gptq": W4A16(group_size=32, symmetric=False, method="gptq"),
    "w4a16-awq": W4A16(method="awq"),  # groups per layer ("auto")
    "w8a16": W8A16(),
    "w8a8-smoothquant": W8A8(),
    "w8a8": W8A8(smoothquant_alpha=None),
    "fp8": FP8(),
}


@pytest.fixture
def cpu_isa(monkeypatch):
    """``cpu_isa(name)``: our CPU kernels at that level ("vnni", "avx512", "avx2") for the rest of the
    test, as on a CPU whose best it is (``qc_cpu::set_isa``, and ``pack_native`` packs for it)."""
    from qcompiler.codegen import cpu_native
    before = []

    def choose(name: str) -> None:
        before.append(torch.ops.qc_cpu.set_isa(cpu_native.LEVELS[name]))
        monkeypatch.setattr(cpu_native, "ISA", name)
    yield choose
    if before:
        torch.ops.qc_cpu.set_isa(before[0])


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    """(source, {key: CompileReport}) for every entry of ``TARGETS``."""
    from qcompiler.compiler import compile_model
    from qcompiler.models import load_source
    from tests_paths import EXAMPLES
    src = load_source(str(EXAMPLES / "tiny_llama.py"))
    root = tmp_path_factory.mktemp("targets")
    return src, {k: compile_model(src, t, root / k, calibration=CALIB) for k, t in TARGETS.items()}
