"""OUT/report.html: one self-contained page (every image inline, no network) to look at an evaluation.

It shows the headline metrics (calibration before and after, the "unknown" threshold, the open
set when measured), the per-brand table, the confusion matrix, the reliability diagram, the
most-confused pairs, and for each brand a gallery of its worst mistakes: the photo's thumbnail
beside the Grad-CAM overlay of the brand the model wrongly answered (what it took for evidence).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from carbrand.data.images import load_rgb
from carbrand.data.shard_reader import MemberBytes, ShardFiles
from carbrand.inference.gradcam import Explanation, overlay

Explainer = Callable[[Image.Image, int], Explanation]  # (photo, brand label) -> its Grad-CAM

THUMBNAIL_SIDE = 220
MOST_CONFUSED = 10


@dataclass
class GalleryItem:
    path: str
    true_brand: str
    predicted_brand: str
    confidence: float
    calibrated_confidence: float
    thumbnail: bytes | None = None  # JPEG
    overlay: bytes | None = None  # JPEG: Grad-CAM of the predicted brand on the photo
    error: str | None = None  # why the photo could not be shown


@dataclass
class GalleryBrand:
    brand: str
    mistakes: int  # all of this brand's mistakes; `items` holds the most confident few
    items: list[GalleryItem] = field(default_factory=list)


def jpeg(image: Image.Image, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def build_gallery(mistakes: list, classes: list[str], per_brand: int,
                  explain: Explainer | None, max_pixels: int = 0) -> list[GalleryBrand]:
    """Each true brand's most confident mistakes (ScoredSample, the most confident first), with thumbnails and
    Grad-CAM overlays.

    `explain(photo, label)` returns a gradcam.Explanation (None: thumbnails only).
    """

    by_brand: dict[str, list] = {}
    for sample in mistakes:
        by_brand.setdefault(sample.true_brand, []).append(sample)
    gallery, shards = [], ShardFiles()
    for brand in sorted(by_brand, key=lambda b: (-len(by_brand[b]), b)):
        entry = GalleryBrand(brand, len(by_brand[brand]))
        for sample in by_brand[brand][:per_brand]:
            r = sample.record
            item = GalleryItem(sample.path, brand, classes[r.predicted], r.confidence, r.calibrated_confidence)
            try:
                # a sharded dataset's photo is read from its shard: the source files need not be on this host
                photo = load_rgb(MemberBytes(shards.read(sample.member), sample.member) if sample.member else Path(sample.path),
                                 max_pixels)
                if explain is not None:
                    item.overlay = jpeg(overlay(photo, explain(photo, r.predicted), max_side=THUMBNAIL_SIDE))
                photo.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
                item.thumbnail = jpeg(photo)
            except Exception as error:  # a photo gone since: say so in the page, never a broken image
                item.error = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            entry.items.append(item)
        gallery.append(entry)
    shards.close()
    return gallery


def wandb_gallery_rows(gallery: list[GalleryBrand]) -> list[list[Any]]:
    import wandb

    rows = []
    for entry in gallery:
        for item in entry.items:
            if item.thumbnail is None:
                continue
            pictures = [wandb.Image(Image.open(io.BytesIO(data))) if data else None for data in (item.thumbnail, item.overlay)]
            rows.append([*pictures, item.path, item.true_brand, item.predicted_brand, item.confidence, item.calibrated_confidence])
    return rows


# ----------------------------------------------------------------------------- the page


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else _e(value)


def headline_cards(metrics: dict[str, Any]) -> str:
    k = metrics["top_k"]
    cards = [("accuracy", _number(metrics["accuracy"])), (f"top-{k} accuracy", _number(metrics["top_k_accuracy"])),
             ("macro F1", _number(metrics["macro_f1"])), ("images", _e(metrics["samples"]))]
    if metrics.get("calibrated"):
        cards += [("ECE before → after", f"{_number(metrics['expected_calibration_error'])} → {_number(metrics['expected_calibration_error_calibrated'])}"),
                  ("NLL before → after", f"{_number(metrics['nll'])} → {_number(metrics['nll_calibrated'])}"),
                  ("temperature", _number(metrics["temperature"], 3)),
                  ("ECE a calibrated model shows here",
                   f"{_number(metrics['expected_calibration_error_of_a_calibrated_model'])} ± "
                   f"{_number(metrics['expected_calibration_error_of_a_calibrated_model_sd'])}")]
    else:
        cards.append(("ECE (uncalibrated)", _number(metrics["expected_calibration_error"])))
    if metrics.get("min_confidence") is not None:
        cards.append((f"known answered unknown (&lt; {metrics['min_confidence']:.3f})", f"{metrics['rejected_share']:.1%}"))
    open_set = metrics.get("open_set")
    if open_set:
        cards.append(("open-set AUROC", _number(open_set["auroc"])))
        if open_set.get("unknown_rejected_share") is not None:
            cards.append(("unknown brands rejected", f"{open_set['unknown_rejected_share']:.1%}"))
    return "".join(f'<div class="card"><div class="label">{label}</div><div class="value">{value}</div></div>' for label, value in cards)


def per_brand_table(metrics: dict[str, Any]) -> str:
    rows = []
    for brand, v in metrics["per_class"].items():
        rows.append(f"<tr><td>{_e(brand)}</td><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td>"
                    f'<td><span class="bar" style="width:{round(60 * v["f1"])}px"></span>{v["f1"]:.3f}</td>'
                    f"<td>{v['support']}</td><td>{v['predicted']}</td></tr>")
    return ("<table><tr><th>brand</th><th>precision</th><th>recall</th><th>F1</th><th>support</th><th>predicted</th></tr>"
            + "".join(rows) + "</table>")


def most_confused_pairs(metrics: dict[str, Any], limit: int = MOST_CONFUSED) -> list[tuple[str, str, int, float]]:
    """(true brand, predicted brand, count, share of the true brand's images), the largest counts first."""
    matrix = metrics["confusion_matrix"]
    brands, counts = matrix["brands"], matrix["counts"]
    pairs = []
    for i, row in enumerate(counts):
        support = sum(row)
        pairs += [(brands[i], brands[j], n, n / support) for j, n in enumerate(row) if i != j and n > 0]
    return sorted(pairs, key=lambda p: (-p[2], -p[3], p[0], p[1]))[:limit]


def confused_table(metrics: dict[str, Any]) -> str:
    pairs = most_confused_pairs(metrics)
    if not pairs:
        return "<p>No confusions: every known-brand image was answered right.</p>"
    rows = "".join(f"<tr><td>{_e(t)}</td><td>{_e(p)}</td><td>{n}</td><td>{share:.1%}</td></tr>" for t, p, n, share in pairs)
    return f"<table><tr><th>true brand</th><th>taken for</th><th>images</th><th>share of the true brand</th></tr>{rows}</table>"


def gallery_html(gallery: list[GalleryBrand]) -> str:
    if not gallery:
        return "<p>No mistakes to show.</p>"
    parts = []
    for entry in gallery:
        shown = len(entry.items)
        parts.append(f'<h3>{_e(entry.brand)} <span class="muted">{entry.mistakes} mistake(s), the {shown} most confident</span></h3><div class="gallery">')
        for item in entry.items:
            caption = (f"taken for <b>{_e(item.predicted_brand)}</b> {item.confidence:.2f}"
                       f" (calibrated {_number(item.calibrated_confidence, 2)})<br><span class='path'>{_e(item.path)}</span>")
            pictures = "".join(f'<img src="{data_uri(data, "image/jpeg")}" alt="{_e(alt)}" title="{_e(alt)}">'
                               for data, alt in ((item.thumbnail, "photo"), (item.overlay, f"Grad-CAM: {item.predicted_brand}")) if data)
            if item.error:
                pictures = f'<div class="error">photo not shown: {_e(item.error)}</div>'
            parts.append(f'<figure><div class="pair">{pictures}</div><figcaption>{caption}</figcaption></figure>')
        parts.append("</div>")
    return "".join(parts)


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{margin-bottom:4px}.muted{color:#777;font-size:.8em;font-weight:normal}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:16px 0}
.card{border:1px solid #ddd;border-radius:8px;padding:10px 14px;min-width:140px;background:#fafafa}
.card .label{font-size:.8em;color:#666}.card .value{font-size:1.35em;font-weight:600}
table{border-collapse:collapse;margin:8px 0}td,th{border-bottom:1px solid #eee;padding:4px 10px;text-align:left}
.bar{display:inline-block;height:10px;background:#4c78a8;margin-right:6px;vertical-align:middle}
.pictures img{max-width:100%;border:1px solid #eee}.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.gallery{display:flex;flex-wrap:wrap;gap:18px}figure{margin:0;max-width:560px}
.pair{display:flex;gap:4px}.pair img{height:130px;width:auto;border:1px solid #ddd}figcaption{font-size:.8em;max-width:420px}
.path{color:#888;word-break:break-all}.error{color:#b00;font-size:.85em}
"""


def write_report(path: Path, metrics: dict[str, Any], images_dir: Path, gallery: list[GalleryBrand]) -> None:
    """report.html from metrics.json's numbers and the PNGs already written into `images_dir`."""
    def picture(name: str, alt: str) -> str:
        data = (images_dir / name).read_bytes()
        return f'<img src="{data_uri(data, "image/png")}" alt="{_e(alt)}">'

    title = f"carbrand evaluation: {metrics.get('split', '')} split"
    sections = [
        f"<h1>{_e(title)}</h1><div class='muted'>{_e(metrics.get('checkpoint', ''))} on {_e(metrics.get('data', ''))} · "
        f"{_e(metrics.get('arch', ''))} at {_e(metrics.get('image_size', ''))} px · {_e(metrics.get('world_size', 1))} process(es)</div>",
        f"<div class='cards'>{headline_cards(metrics)}</div>",
        "<h2>Per brand</h2>" + per_brand_table(metrics),
        "<div class='row'><div class='pictures'><h2>Confusion matrix</h2>" + picture("confusion_matrix.png", "confusion matrix")
        + "</div><div class='pictures'><h2>Reliability</h2>" + picture("reliability.png", "reliability diagram") + "</div></div>",
        "<h2>Most confused</h2>" + confused_table(metrics),
        "<h2>Worst mistakes per brand</h2><p class='muted'>Each mistake: the photo, then the Grad-CAM heat map of the brand "
        "the model answered (red: the evidence it used; the outlined square is what it sees, the rest is dimmed).</p>"
        + gallery_html(gallery),
    ]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n")
    path.write_text(page, encoding="utf-8")
