"""``qcompile report``: an artifact drawn as one picture, and the same facts as text.

Reads only the manifest and the header of ``weights.safetensors`` (no program is loaded):
per layer along the depth, the weight SQNR and, where calibration recorded it, the output error
on calibration tokens; each pass's check on probe inputs; the size by component, float against
the artifact, with bits per weight."""
import json
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .artifact import WEIGHTS, read_manifest

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}
COMPONENTS = ("linears", "embeddings", "lm_head", "embeddings + lm_head (tied)", "other")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class LayerRow:
    name: str
    depth: Optional[int]        # the block index in the name, None outside the blocks
    kind: str                   # q_proj, gate_proj, ... (the name's last part)
    quantized: bool
    weight_sqnr_db: Optional[float]
    output_mse: Optional[float]       # on calibration tokens, where the method recorded it
    rtn_output_mse: Optional[float]   # RTN's on the same tokens, beside it


@dataclass(frozen=True)
class SizeRow:
    component: str
    weights: int                # number of values
    float_bytes: int            # as the source model's dtype would store them
    artifact_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.artifact_bytes / self.weights if self.weights else 0.0


@dataclass(frozen=True)
class Report:
    path: Path
    manifest: dict
    layers: list[LayerRow]
    sizes: list[SizeRow]


def safetensors_header(path: Path) -> dict:
    """Tensor name -> {"dtype", "shape", "data_offsets"}, read from the file's JSON header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _layer_rows(layers: dict) -> list[LayerRow]:
    rows = []
    for name, rec in layers.items():
        m = _LAYER_INDEX.search(f".{name}.")
        rows.append(LayerRow(name, int(m.group(1)) if m else None, name.rsplit(".", 1)[-1],
                             rec.get("status") == "quantized", rec.get("weight_sqnr_db"), rec.get("output_mse"),
                             rec.get("rtn_output_mse")))
    return rows


def _owner(tensor: str, layers: dict) -> Optional[str]:
    base = tensor.rsplit(".", 1)[0]
    for cut in range(base.count(".") + 1):  # names may carry extra leading parts ("model.")
        cand = base.split(".", cut)[-1]
        if cand in layers:
            return cand
    return None


def _is_codes(name: str, layer: Optional[str], layers: dict) -> bool:
    """A quantized linear's codes, scales or zero points (not its bias, nor a float ``.weight`` left
    beside them because something else reads it: a tied embedding table)."""
    return layer is not None and layers[layer].get("status") == "quantized" and not name.endswith((".bias", ".weight"))


def _component(name: str, t: dict, layer: Optional[str], layers: dict) -> str:
    if layer is not None and not (layers[layer].get("status") == "quantized" and name.endswith(".weight")):
        if name.endswith(".bias"):
            return "other"
        return "lm_head" if layers[layer].get("role") == "lm_head" or layer.endswith("lm_head") else "linears"
    if len(t["shape"]) != 2:
        return "other"
    if layers:  # every constant linear has a record: a matrix none owns is an embedding table
        return "embeddings"
    base = name.rsplit(".", 1)[0]  # a float artifact records no layers: go by the usual names
    return "embeddings" if "embed" in base else "lm_head" if base.endswith("lm_head") else "linears"


def _sizes(header: dict, manifest: dict) -> list[SizeRow]:
    """Weights, float bytes and artifact bytes per component. A quantized weight counts as the
    float weight it replaces; an output projection tied to the embedding table is one float
    table (the source model's own float size says whether they are tied)."""
    layers = manifest.get("layers", {})
    float_bytes = DTYPE_BYTES.get({"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
                                  .get(manifest["model"]["dtype"], "F32"), 4)
    acc = {c: [0, 0, 0] for c in COMPONENTS}  # weights, float bytes, artifact bytes
    counted = set()
    for name, t in header.items():
        nbytes = t["data_offsets"][1] - t["data_offsets"][0]
        numel = nbytes // DTYPE_BYTES.get(t["dtype"], 1)
        layer = _owner(name, layers)
        a = acc[_component(name, t, layer, layers)]
        a[2] += nbytes
        if _is_codes(name, layer, layers):
            if layer not in counted:  # a quantized weight's codes, scales and zero points are one float weight
                counted.add(layer)
                N, K = layers[layer]["shape"]
                a[0] += N * K
                a[1] += N * K * float_bytes
        else:
            a[0] += numel
            a[1] += nbytes
    source = manifest["model"].get("float_bytes")
    head, emb = acc["lm_head"], acc["embeddings"]
    if not emb[2] and manifest["model"].get("config", {}).get("tie_word_embeddings"):
        acc["embeddings + lm_head (tied)"], acc["lm_head"] = head, [0, 0, 0]  # one table, stored once
    elif source and emb[2] and head[1] and sum(a[1] for a in acc.values()) - head[1] == source:
        head[1] = 0  # tied: the float model holds the table once, under the embeddings
    return [SizeRow(c, *acc[c]) for c in COMPONENTS if acc[c][2]]


def build_report(path: str | Path) -> Report:
    path = Path(path)
    manifest = read_manifest(path, verify=False)
    return Report(path, manifest, _layer_rows(manifest.get("layers", {})),
                  _sizes(safetensors_header(path / WEIGHTS), manifest))


def _db(x: Optional[float]) -> str:
    return "-" if x is None else ("exact" if x >= 300 else f"{x:.1f} dB")


def pass_checks(manifest: dict) -> list[str]:
    """The per-pass table: each pass's seconds and its check on probe inputs (``qcompiler.verify``)."""
    ver = manifest.get("verification") or {}
    if not ver.get("enabled"):
        return ["passes: " + ", ".join(rec["name"] for rec in manifest["passes"]) + " (not checked: --no-verify)"]
    n = len(ver["sequences"])
    lines = [f"checks on {ver['tokens']} probe tokens ({n} sequence{'s' if n > 1 else ''}"
             + (f", one past the {ver['past_window']}-token attention window" if ver.get("past_window") else "")
             + f"), {ver['seconds']:.1f} s:",
             f"  {'pass':<18} {'kind':<6} {'seconds':>7} {'max |Δ|':>9} {'SQNR vs before':>15} {'vs float':>10}"]
    for rec in manifest["passes"]:
        c = rec["check"]
        lines.append(f"  {rec['name']:<18} {'exact' if rec.get('exact') else 'lossy':<6} {rec['seconds']:>7.1f} "
                     f"{c['max_abs_err']:>9.2e} {_db(c['sqnr_db']):>15} {_db(c['sqnr_db_vs_float']):>10}")
    return lines


def report_text(r: Report) -> str:
    m = r.manifest
    t = m["target"]
    lines = [f"{r.path}: {t['name']} ({', '.join(f'{k}={v}' for k, v in t.items() if k != 'name')})"]
    q = [row for row in r.layers if row.quantized]
    kept = [row for row in r.layers if not row.quantized]
    lines.append(f"layers: {len(q)} quantized, {len(kept)} kept float"
                 + (f" ({', '.join(row.name for row in kept[:4])}{' …' if len(kept) > 4 else ''})" if kept else ""))
    if q:
        sq = [row.weight_sqnr_db for row in q if row.weight_sqnr_db is not None]
        if sq:
            worst = min(q, key=lambda row: row.weight_sqnr_db if row.weight_sqnr_db is not None else 1e9)
            lines.append(f"weight SQNR: mean {sum(sq) / len(sq):.1f} dB, worst {worst.weight_sqnr_db:.1f} dB "
                         f"({worst.name})")
        mse = [row for row in q if row.output_mse is not None]
        if mse:
            better = sum(1 for row in mse if row.rtn_output_mse is not None and row.output_mse < row.rtn_output_mse)
            lines.append(f"output error on calibration tokens: recorded for {len(mse)} layers; lower than RTN's on "
                         f"{better}")
    lines += pass_checks(m)
    lines.append("size by component:")
    lines.append(f"  {'component':<28} {'float MiB':>10} {'artifact MiB':>13} {'bits/weight':>12}")
    for s in r.sizes:
        lines.append(f"  {s.component:<28} {s.float_bytes / 2**20:>10.2f} {s.artifact_bytes / 2**20:>13.2f} "
                     f"{s.bits_per_weight:>12.2f}")
    fb, ab = sum(s.float_bytes for s in r.sizes), sum(s.artifact_bytes for s in r.sizes)
    lines.append(f"  {'total':<28} {fb / 2**20:>10.2f} {ab / 2**20:>13.2f} {'':>12} ({ab / fb:.2f}x)")
    return "\n".join(lines)


def draw_report(r: Report, out: str | Path) -> Path:
    """Writes the report as one PNG: layers along the depth, output error, pass checks, size."""
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font cache notices are not the user's
    from matplotlib.figure import Figure  # no pyplot: no state kept between calls
    fig = Figure(figsize=(14, 9), layout="constrained")
    (a, b), (c, d) = fig.subplots(2, 2)
    t = r.manifest["target"]
    fig.suptitle(f"{r.path.name}: {t['name']}  ·  {r.manifest['model'].get('config', {}).get('model_type', '')}")
    _draw_layers(a, r)
    _draw_output_error(b, r)
    _draw_passes(c, r)
    _draw_sizes(d, r)
    out = Path(out)
    fig.savefig(out, dpi=90)
    return out


def _by_kind(rows: list[LayerRow]) -> dict[str, list[LayerRow]]:
    kinds: dict[str, list[LayerRow]] = {}
    for row in rows:
        kinds.setdefault(row.kind, []).append(row)
    return kinds


def _x(row: LayerRow, last: int) -> int:
    return row.depth if row.depth is not None else last + 1


def _draw_layers(ax, r: Report) -> None:
    last = max((row.depth for row in r.layers if row.depth is not None), default=0)
    q = [row for row in r.layers if row.quantized and row.weight_sqnr_db is not None]
    for kind, rows in _by_kind(q).items():
        ax.plot([_x(row, last) for row in rows], [row.weight_sqnr_db for row in rows], "o-", ms=3, label=kind)
    kept = [row for row in r.layers if not row.quantized]
    if kept:
        y = min((row.weight_sqnr_db for row in q), default=0)
        ax.plot([_x(row, last) for row in kept], [y] * len(kept), "kx", ms=7, label="kept float")
    if not r.layers:
        ax.text(0.5, 0.5, "no quantized layers (float target)", ha="center", transform=ax.transAxes)
    ax.set(title="weight SQNR per layer", xlabel=f"block (head at {last + 1})", ylabel="dB")
    ax.grid(alpha=0.3)
    if r.layers:
        ax.legend(fontsize=7, ncol=2)


def _draw_output_error(ax, r: Report) -> None:
    rows = [row for row in r.layers if row.output_mse is not None]
    last = max((row.depth for row in r.layers if row.depth is not None), default=0)
    for i, (kind, ks) in enumerate(_by_kind(rows).items()):
        color = f"C{i}"
        ax.semilogy([_x(row, last) for row in ks], [row.output_mse for row in ks], "o-", ms=3, color=color, label=kind)
        rtn = [row for row in ks if row.rtn_output_mse is not None]
        if rtn:
            ax.semilogy([_x(row, last) for row in rtn], [row.rtn_output_mse for row in rtn], "--", lw=0.8,
                        color=color, alpha=0.6)
    if rows:
        ax.legend(fontsize=7, ncol=2, title="solid: this method, dashed: RTN", title_fontsize=7)
    else:
        ax.text(0.5, 0.5, "no output error recorded\n(the calibrated methods record it)", ha="center",
                transform=ax.transAxes)
        ax.set_axis_off()
    ax.set(title="output error on calibration tokens (MSE)", xlabel="block", ylabel="MSE")
    ax.grid(alpha=0.3)


def _draw_passes(ax, r: Report) -> None:
    passes = r.manifest["passes"]
    names = [p["name"] for p in passes]
    checks = [p.get("check") for p in passes]
    if not all(checks):
        ax.text(0.5, 0.5, "passes not checked (--no-verify)", ha="center", transform=ax.transAxes)
        ax.set(title="passes")
        return
    cap = 140.0
    vals = [min(ch["sqnr_db_vs_float"], cap) for ch in checks]
    colors = ["tab:green" if p.get("exact") else "tab:orange" for p in passes]
    ys = range(len(names))[::-1]
    ax.barh(list(ys), vals, color=colors)
    for y, p, ch in zip(ys, passes, checks):
        ax.text(1, y, f" {p['seconds']:.1f} s · max |Δ| {ch['max_abs_err']:.1e} · vs before {_db(ch['sqnr_db'])}",
                va="center", fontsize=7)
    ax.set_yticks(list(ys), names, fontsize=8)
    ax.set(title="after each pass: SQNR vs float on probes (green exact, orange lossy)", xlabel="dB", xlim=(0, cap))


def _draw_sizes(ax, r: Report) -> None:
    xs = range(len(r.sizes))
    fl = [s.float_bytes / 2**20 for s in r.sizes]
    ar = [s.artifact_bytes / 2**20 for s in r.sizes]
    ax.bar([x - 0.2 for x in xs], fl, 0.4, label="float", color="tab:gray")
    ax.bar([x + 0.2 for x in xs], ar, 0.4, label="artifact", color="tab:blue")
    for x, s, h in zip(xs, r.sizes, ar):
        ax.text(x + 0.2, h, f"{s.bits_per_weight:.2f} b/w", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [s.component for s in r.sizes], fontsize=7)
    fb, ab = sum(fl), sum(ar)
    ax.set(title=f"size: float {fb:.1f} MiB -> artifact {ab:.1f} MiB ({ab / fb:.2f}x)", ylabel="MiB")
    ax.legend(fontsize=7)
