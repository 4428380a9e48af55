import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "inductor"))

import sys  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, os.cpu_count() or 1))
warnings.filterwarnings("ignore", category=FutureWarning)
# NOTE: no shrink phase: each example captures a model (seconds); a failure prints its example as drawn.
settings.register_profile("qc", deadline=None, max_examples=12, derandomize=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate],
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("qc")
