"""A static HTML report of a result table: one folder (index.html, plots/, images/) that opens from disk.

No server, no internet: the CSS is inline and every picture is a PNG file beside the HTML. The result
table is streamed once (gradcon_core.results.scan); of the image set, only the `id` columns are read in
full, and the images only from the row groups that hold a row shown. With a detector that reconstructs,
each shown image sits beside its reconstruction and a per-pixel squared-error heat map (at the model's
input size, one colour scale for the whole report).
"""
from __future__ import annotations

import html
import io
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from gradcon_core.data.images import ImageError, channels_of, decode_image, decode_images, encode_png
from gradcon_core.data.imageset import IMAGE, image_bytes, list_parquet_files
from gradcon_core.detectors.contract import Detector
from gradcon_core.files import resolve, write_bytes
from gradcon_core.metrics import f1_at
from gradcon_core.results.plots import pyplot
from gradcon_core.results.scan import ResultScan, scan_results

log = logging.getLogger("gradcon")
HEAT_COLORMAP = "inferno"
CURVE_POINTS = 4000  # a ROC of 10M rows has millions of vertices; this many draw the same picture
MISSING_SHOWN = 10  # ids named when some are not in the image set


@dataclass
class Card:
    """One gallery entry: a result row and the PNG files (relative to the report folder) that show it."""

    row: dict
    files: dict[str, str]  # "input" / "reconstruction" / "error" -> path
    problem: str | None = None  # why there is no picture


@dataclass
class ReportResult:
    index: str  # path of index.html
    scan: ResultScan
    metrics: dict[str, float]
    top: list[Card]
    normal: list[Card]
    missing_ids: list[str]
    files: list[str]  # every file written, relative to the report folder


# --- images by id ---------------------------------------------------------------------------------
def read_images(uri: str, ids: list[str], filesystem: pafs.FileSystem | None = None) -> dict[str, bytes | None]:
    """Encoded bytes of the rows with these ids (result-table ids: strings) found in the image set at uri.

    Per file, the `id` column alone is read and matched; the image column is read only from the row
    groups that hold a match. Files without an `id` column have the ids the score job gave their
    rows, "<file name>:<row>".
    """
    fs, files = list_parquet_files(uri, filesystem)
    wanted = set(ids)
    found: dict[str, bytes | None] = {}
    for path in files:
        if len(found) == len(wanted):
            break
        reader = pq.ParquetFile(path, filesystem=fs)
        if "id" in reader.schema_arrow.names:
            file_ids = reader.read(columns=["id"]).column("id")
            matches = pc.is_in(file_ids, value_set=_keys(wanted, file_ids.type))
            rows = np.flatnonzero(matches.to_numpy(zero_copy_only=False))
            names = [str(i) for i in file_ids.take(pa.array(rows, pa.int64())).to_pylist()]
        else:
            prefix = os.path.basename(path) + ":"
            numbers = {int(i[len(prefix):]) for i in wanted if i.startswith(prefix) and i[len(prefix):].isdigit()}
            rows = np.array(sorted(r for r in numbers if r < reader.metadata.num_rows), np.int64)
            names = [f"{prefix}{r}" for r in rows]
        if len(rows):
            found.update(zip(names, _take_images(reader, rows)))
    return found


def _keys(wanted: set[str], id_type: pa.DataType) -> pa.Array:
    """The wanted ids in the type of an image set's id column (int64 ids match their decimal strings)."""
    if pa.types.is_integer(id_type):
        return pa.array(sorted(int(i) for i in wanted if i.lstrip("-").isdigit()), id_type)
    return pa.array(sorted(wanted)).cast(id_type)


def _take_images(reader: pq.ParquetFile, rows: np.ndarray) -> list[bytes | None]:
    """The images of these (sorted) row numbers of a file, reading only the row groups that hold them."""
    starts = np.cumsum([0] + [reader.metadata.row_group(g).num_rows for g in range(reader.num_row_groups)])
    groups = np.unique(np.searchsorted(starts, rows, side="right") - 1)
    table = reader.read_row_groups(groups.tolist(), columns=[IMAGE])
    offsets = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in groups])
    return image_bytes(table.column(IMAGE).take(pa.array(np.searchsorted(offsets, rows), pa.int64())))


# --- pictures -------------------------------------------------------------------------------------
def _png_of(pixels: np.ndarray) -> bytes:
    """uint8 [H,W,C] (C = 1 or 3) -> PNG."""
    return encode_png(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def _native(blob: bytes) -> np.ndarray:
    """An image at its own size and channels (no model to decode it for)."""
    if not blob:
        raise ImageError("empty image bytes")
    channels = channels_of(blob)  # raises ImageError for bytes Pillow cannot read
    width, height = Image.open(io.BytesIO(blob)).size
    return decode_image(blob, channels, (height, width))


@dataclass
class Picture:
    pixels: np.ndarray | None = None  # uint8 [H,W,C]: the model's input size with a detector, else the image's own
    reconstruction: np.ndarray | None = None  # float32 [C,H,W]
    problem: str | None = None  # why there is no picture


def pictures(blobs: dict[str, bytes | None], detector: Detector | None) -> dict[str, Picture]:
    """Decode the images (for the detector when there is one) and reconstruct them in one batch."""
    ids = list(blobs)
    if detector is None:
        out = {}
        for i in ids:
            try:
                out[i] = Picture(_native(blobs[i]))
            except ImageError as e:
                out[i] = Picture(problem=str(e))
        return out
    pixels, errors = decode_images([blobs[i] for i in ids], detector.channels, detector.input_size)
    out = {i: Picture(pixels[k]) if e is None else Picture(problem=e) for k, (i, e) in enumerate(zip(ids, errors))}
    ok = [k for k, e in enumerate(errors) if e is None]
    recon = detector.reconstruct(pixels[ok]) if ok else None
    if recon is not None:
        for k, r in zip(ok, recon):
            out[ids[k]].reconstruction = r
    return out


def _squared_error(picture: Picture) -> np.ndarray:
    """[H,W]: the squared error of each pixel, averaged over channels."""
    x = picture.pixels.transpose(2, 0, 1).astype(np.float32) / 255
    return ((picture.reconstruction - x) ** 2).mean(axis=0)


def heat_map(error: np.ndarray, vmax: float) -> np.ndarray:
    """[H,W] errors -> RGB uint8 [H,W,3] on the colour scale [0, vmax]."""
    import matplotlib

    colours = matplotlib.colormaps[HEAT_COLORMAP](np.clip(error / vmax, 0, 1))[..., :3]
    return (colours * 255).round().astype(np.uint8)


def _gallery(rows: pa.Table, name: str, shown: dict[str, Picture] | None, scale: float | None, write) -> list[Card]:
    """Cards for rows; write(relative path, bytes) stores a file. shown: None when no image set was given."""
    cards = []
    for rank, row in enumerate(rows.to_pylist(), 1):
        card = Card(row, {})
        cards.append(card)
        if shown is None:
            continue
        picture = shown.get(row["id"], Picture(problem="not in the image set"))
        card.problem = picture.problem
        if picture.pixels is None:
            continue
        stem = f"images/{name}-{rank:03d}"
        card.files["input"] = f"{stem}-input.png"
        write(card.files["input"], _png_of(picture.pixels))
        if picture.reconstruction is not None:
            card.files["reconstruction"] = f"{stem}-reconstruction.png"
            recon = (np.clip(picture.reconstruction, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
            write(card.files["reconstruction"], _png_of(recon))
            card.files["error"] = f"{stem}-error.png"
            write(card.files["error"], encode_png(heat_map(_squared_error(picture), scale)))
    return cards


# --- plots ----------------------------------------------------------------------------------------
def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def _thin(*curves: np.ndarray) -> list[np.ndarray]:
    """At most CURVE_POINTS evenly spaced points of each (same) curve, both ends kept."""
    n = len(curves[0])
    if n <= CURVE_POINTS:
        return list(curves)
    keep = np.unique(np.linspace(0, n - 1, CURVE_POINTS).round().astype(np.int64))
    return [c[keep] for c in curves]


def histogram_png(scores: np.ndarray, labels: np.ndarray | None, threshold: float | None) -> bytes:
    """Score histogram (normal / anomalous by ground truth when labels are given) with the threshold.
    The range ends at the 99.9th percentile (or the threshold): the few higher scores fall in the last bin."""
    lo, hi = float(scores.min()), float(np.percentile(scores, 99.9))
    if threshold is not None:
        hi = max(hi, threshold)
    if hi <= lo:
        hi = lo + 1e-6
    bins = np.linspace(lo, hi, 61)
    clipped = np.clip(scores, lo, hi)
    fig, ax = pyplot().subplots(figsize=(7, 3.6))
    if labels is None:
        ax.hist(clipped, bins=bins, color="#4c72b0", label="all scored rows")
    else:
        ax.hist(clipped[labels == 0], bins=bins, alpha=0.6, color="#4c72b0", label="normal (ground truth)")
        ax.hist(clipped[labels == 1], bins=bins, alpha=0.6, color="#dd5555", label="anomaly (ground truth)")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.4g}")
    ax.set(xlabel="score (higher = more anomalous)", ylabel="rows", yscale="log")
    ax.legend(fontsize=8)
    return _figure_png(fig)


def curves(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> tuple[dict[str, float], dict]:
    """(metrics, curves) from one ROC and one PR curve: the same numbers as gradcon_core.metrics.evaluate
    (AUROC = area under roc_curve, AUPR = average precision, FPR at 95% TPR, F1 at the threshold), with two
    sorts of the scores instead of evaluate's three plus the plots' two (that matters at 10M rows)."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    metrics = {"auroc": float(auc(fpr, tpr)), "aupr": float(-np.sum(np.diff(recall) * precision[:-1])),
               "fpr95": float(fpr[np.searchsorted(tpr, 0.95, side="left")])}
    if threshold is not None:
        metrics["f1"] = f1_at(scores, labels, threshold)
    return metrics, {"roc": (fpr, tpr), "pr": (recall, precision)}


def roc_png(fpr: np.ndarray, tpr: np.ndarray, auroc: float) -> bytes:
    fpr, tpr = _thin(fpr, tpr)
    fig, ax = pyplot().subplots(figsize=(4.2, 4.2))
    ax.plot(fpr, tpr, lw=1.4, label=f"AUROC {auroc:.4f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (anomaly = positive)")
    ax.legend(loc="lower right", fontsize=8)
    return _figure_png(fig)


def pr_png(recall: np.ndarray, precision: np.ndarray, aupr: float, chance: float) -> bytes:
    recall, precision = _thin(recall, precision)
    fig, ax = pyplot().subplots(figsize=(4.2, 4.2))
    ax.plot(recall, precision, lw=1.4, label=f"AUPR {aupr:.4f}")
    ax.axhline(chance, color="k", ls=":", lw=0.8, label=f"chance {chance:.3f}")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall", ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=8)
    return _figure_png(fig)


# --- the report -----------------------------------------------------------------------------------
def build_report(
    results: str,
    out: str,
    *,
    images: str | None = None,
    detector: Detector | None = None,
    checkpoint: str | None = None,
    top_k: int = 24,
    normal_sample: int = 12,
    seed: int = 0,
    results_filesystem: pafs.FileSystem | None = None,
    images_filesystem: pafs.FileSystem | None = None,
    out_filesystem: pafs.FileSystem | None = None,
) -> ReportResult:
    """Write the report for the result table at `results` into the folder `out`; checkpoint names the detector."""
    if top_k < 0 or normal_sample < 0:
        raise ValueError(f"top_k and normal_sample must be >= 0, got {top_k} and {normal_sample}")
    scan = scan_results(results, top_k, normal_sample, seed, filesystem=results_filesystem)
    out_fs, root = resolve(out, out_filesystem)
    out_fs.create_dir(root, recursive=True)
    for folder in ("images", "plots"):  # a report written here before may have shown other rows
        out_fs.delete_dir_contents(f"{root}/{folder}", missing_dir_ok=True)
    written: list[str] = []

    def write(relative: str, data: bytes) -> None:
        write_bytes(out_fs, f"{root}/{relative}", data)
        written.append(relative)

    metrics, plots, notes = _plots(scan, write)
    wanted = list(dict.fromkeys([*scan.top.column("id").to_pylist(), *scan.normal.column("id").to_pylist()]))
    shown, missing, scale = None, [], None
    if images is not None:
        blobs = read_images(images, wanted, images_filesystem) if wanted else {}
        missing = [i for i in wanted if i not in blobs]
        if missing:
            log.warning("report: %d of the %d ids shown are not in %s (first: %s)", len(missing), len(wanted),
                        images, ", ".join(missing[:MISSING_SHOWN]))
        shown = pictures(blobs, detector)
        errors = [_squared_error(p).max() for p in shown.values() if p.reconstruction is not None]
        scale = max(float(max(errors)), 1e-12) if errors else None  # one colour scale for every heat map
    top = _gallery(scan.top, "top", shown, scale, write)
    normal = _gallery(scan.normal, "normal", shown, scale, write)
    page = _page(scan, metrics, plots, notes, top, normal, missing, scale,
                 {"results": results, "images": images, "checkpoint": checkpoint}, images is not None)
    write("index.html", page.encode())
    return ReportResult(f"{root}/index.html", scan, metrics, top, normal, missing, written)


def _plots(scan: ResultScan, write) -> tuple[dict[str, float], list[str], list[str]]:
    """Histogram, ROC and PR files: (metrics, names of the plots written, notes on what was not drawn and why)."""
    if len(scan.scores) == 0:
        return {}, [], ["No scored rows: no histogram, no curves."]
    known = scan.labels >= 0
    classes = set(np.unique(scan.labels[known]).tolist())
    write("plots/histogram.png", histogram_png(scan.scores, scan.labels if known.any() else None, scan.threshold))
    if not known.any():
        return {}, ["histogram"], ["The table has no ground truth (is_anomaly_true): no ROC, PR, AUROC or AUPR."]
    if classes != {0, 1}:
        which = "anomalous" if classes == {1} else "normal"
        return {}, ["histogram"], [f"Every labelled row is {which}: ROC and PR need both classes."]
    notes = []
    if not known.all():
        notes.append(f"{int((~known).sum())} scored rows have no ground truth and are left out of the curves.")
    scores, labels = scan.scores[known], scan.labels[known]
    metrics, drawn = curves(scores, labels, scan.threshold)
    write("plots/roc.png", roc_png(*drawn["roc"], metrics["auroc"]))
    write("plots/pr.png", pr_png(*drawn["pr"], metrics["aupr"], float(labels.mean())))
    return metrics, ["histogram", "roc", "pr"], notes


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222;
padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.2em;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 10px;text-align:left}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:.9em;word-break:break-all}.src td{border:none;padding:2px 10px 2px 0}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plots img{height:300px;max-width:100%;object-fit:contain}
.gallery{display:flex;flex-wrap:wrap;gap:12px}
figure.card{margin:0;border:1px solid #ddd;border-radius:6px;padding:8px;width:max-content;max-width:400px}
figure.card img{width:112px;height:112px;image-rendering:pixelated;object-fit:contain;background:#000;
margin-right:4px}
figcaption{font-size:.82em;line-height:1.45;margin-top:4px}
.bad{color:#a00}.note{background:#fff7e0;border-left:4px solid #e0b000;padding:6px 10px}
.scale{display:inline-block;width:180px;height:12px;vertical-align:middle;border:1px solid #999}
"""


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _card_html(card: Card, rank: int) -> str:
    r = card.row
    pictures = "".join(f'<img src="{html.escape(path)}" alt="{kind}" title="{kind}">'
                       for kind, path in card.files.items())
    if card.problem:
        pictures += f'<div class="bad">image: {html.escape(card.problem)}</div>'
    parts = [f"score <b>{_fmt(r['score'])}</b>"]
    parts += [f"{name} {_fmt(r[key])}" for key, name in (("recon_error", "recon"), ("grad_score", "grad"))
              if r[key] is not None]
    truth = []
    if r["label"] is not None:
        truth.append(f"label {r['label']}")
    if r["is_anomaly_true"] is not None:
        truth.append("anomaly (ground truth)" if r["is_anomaly_true"] else "normal (ground truth)")
    return (f'<figure class="card">{pictures}<figcaption>#{rank} <code>{html.escape(str(r["id"]))}</code><br>'
            f'{" · ".join(parts)}{"<br>" + " · ".join(truth) if truth else ""}</figcaption></figure>')


def _gallery_html(cards: list[Card]) -> str:
    if not cards:
        return "<p>No rows.</p>"
    return '<div class="gallery">' + "".join(_card_html(c, i + 1) for i, c in enumerate(cards)) + "</div>"


def _page(scan: ResultScan, metrics: dict[str, float], plots: list[str], notes: list[str], top: list[Card],
          normal: list[Card], missing: list[str], scale: float | None, sources: dict[str, str | None],
          has_images: bool) -> str:
    esc = html.escape
    src = "".join(f"<tr><td>{k}</td><td><code>{esc(v)}</code></td></tr>" for k, v in sources.items() if v)
    counts = [("rows", scan.rows), ("scored", len(scan.scores)), ("errors", scan.error_count),
              ("above the threshold (is_anomaly)", scan.anomalies)]
    if (scan.labels >= 0).any():
        counts.append(("anomalies by ground truth", scan.true_anomalies))
    threshold = scan.threshold
    if threshold is not None:
        counts.append(("threshold", threshold))
    elif len(scan.thresholds) > 1:
        notes.append(f"The table holds {len(scan.thresholds)} different thresholds; none is drawn.")
    if len(scan.model_ids) > 1:
        notes.append(f"The table mixes {len(scan.model_ids)} models: {', '.join(sorted(scan.model_ids))}.")
    names = {"auroc": "AUROC", "aupr": "AUPR", "fpr95": "FPR at 95% TPR", "f1": "F1 at the threshold"}
    counts += [(names[k], v) for k, v in metrics.items()]
    count_rows = "".join(f'<tr><th>{esc(k)}</th><td class="n">{esc(_fmt(v))}</td></tr>' for k, v in counts)
    if missing:
        notes.append(f"{len(missing)} of the ids shown are not in the image set (first: "
                     f"{', '.join(missing[:MISSING_SHOWN])}); they are listed without a picture.")
    if not has_images:
        notes.append("No image set given (--images): the galleries list rows without pictures.")
    plot_html = "".join(f'<img src="plots/{name}.png" alt="{name}">' for name in plots)
    errors = ""
    if scan.errors:
        kinds = "".join(f'<tr><td>{esc(k)}</td><td class="n">{n}</td></tr>' for k, n in scan.errors.most_common())
        listed = "".join(f"<tr><td><code>{esc(str(i))}</code></td><td>{esc(e)}</td></tr>" for i, e in scan.error_rows)
        more = scan.error_count - len(scan.error_rows)
        errors = (f"<h2>Errors</h2><table><tr><th>kind</th><th>rows</th></tr>{kinds}</table>"
                  f"<table><tr><th>id</th><th>error</th></tr>{listed}</table>"
                  + (f"<p>and {more} more error rows.</p>" if more > 0 else ""))
    legend = ""
    if scale is not None:
        import matplotlib

        stops = ",".join(matplotlib.colors.to_hex(matplotlib.colormaps[HEAT_COLORMAP](t)) for t in np.linspace(0, 1, 6))
        legend = (f'<p>Each image: input (as the model sees it), reconstruction, per-pixel squared error '
                  f'<span class="scale" style="background:linear-gradient(to right,{stops})"></span> '
                  f'0 to {scale:.4g} (one scale for every heat map).</p>')
    normal_title = ("A random sample of rows below the threshold" if scan.normal_by_threshold
                    else "A random sample of scored rows (the table has no threshold)")
    note_html = "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gradcon report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body><h1>gradcon report</h1><p>Written {made}.</p><table class="src">{src}</table>{note_html}
<h2>Counts</h2><table>{count_rows}</table>
<h2>Scores</h2><div class="plots">{plot_html or "<p>Nothing to plot.</p>"}</div>{errors}
<h2>The {len(top)} most anomalous rows</h2>{legend}{_gallery_html(top)}
<h2>{normal_title} ({len(normal)})</h2>{_gallery_html(normal)}
</body></html>
"""
