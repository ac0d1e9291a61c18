"""Grad-CAM overlays for `POST /v1/predict?explain=1`: the same picture `carbrand explain` writes, as a data URI.

Run on the inference thread (InferenceBatcher.run_alone), since Grad-CAM hooks the served model.
"""

from __future__ import annotations

import base64

from PIL import Image

from carbrand.inference.gradcam import overlay, png_bytes

OVERLAY_MAX_SIDE = 512  # enough for a web page; keeps the JSON answer small


def overlay_data_uri(predictor, photo: Image.Image, brand: str) -> str:
    """PNG data URI of the photo with the heat map of `brand` (the answer's top-1 brand) over the model's crop."""
    photo, explanation = predictor.explain(photo, brand)
    encoded = base64.b64encode(png_bytes(overlay(photo, explanation, max_side=OVERLAY_MAX_SIDE))).decode("ascii")
    return f"data:image/png;base64,{encoded}"


def overlay_data_uris(predictor, photos: list[Image.Image], brands: list[str]) -> list[str]:
    return [overlay_data_uri(predictor, photo, brand) for photo, brand in zip(photos, brands)]
