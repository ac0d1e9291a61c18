"""The HTTP service: one FastAPI app per server process, over one Predictor and one InferenceBatcher.

    POST /v1/predict?topk=K   multipart field `images` (one or more files) -> {"predictions": [...], ...}
         &explain=1           ... each with `gradcam_png`: the Grad-CAM overlay of its top-1 brand (a PNG data URI)
    GET  /v1/model            brands, architecture, input size, the export's test metrics if known
    GET  /healthz             {"status": "ok", ...}
    GET  /                    the web page (page.html): drop or pick a photo, see the top brands as bars

Each prediction is Predictor's own `Prediction.to_dict()` (its calibration and `unknown`
answer included), only cut to the K brands asked for. Every refusal is a 4xx or 5xx with
{"error": {"code": ..., "message": ...}}; nothing a request sends is written to disk.
"""

from __future__ import annotations

import json
import os
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from carbrand.config import config_from_dict, safe_yaml_load
from carbrand.evaluation.report import default_out_dir
from carbrand.inference.calibration import CALIBRATION_FILE
from carbrand.inference.predict import Predictor
from carbrand.serve.batching import InferenceBatcher, InferenceTimeout, ServiceBusy
from carbrand.serve.decoding import decode_photos
from carbrand.serve.explanations import overlay_data_uris
from carbrand.serve.settings import RETRY_AFTER_S, ServeSettings, settings_from_environment
from carbrand.serve.upload_budget import Reservation, UploadBudget, covered_as_received
from carbrand.serve.uploads import RequestError, check_declared_length, read_uploads

# Bytes of an oversized body read and thrown away before the 413, so that a client still
# sending gets the answer instead of a reset connection; past this the connection is dropped.
DRAIN_FACTOR = 2
TEST_METRICS_KEYS = ("split", "samples", "accuracy", "top_k", "top_k_accuracy", "macro_f1", "expected_calibration_error")


def app_from_environment() -> FastAPI:
    """uvicorn's factory (`carbrand serve` names it): each worker process loads the model once, here."""

    settings = settings_from_environment()
    # A calibrated export answers "unknown" below its stored threshold, as `predict --min-confidence auto` does.
    calibrated = {"min_confidence": "auto"} if (Path(settings.checkpoint) / CALIBRATION_FILE).is_file() else {}
    predictor = Predictor.from_checkpoint(settings.checkpoint, device=settings.device, crops=settings.crops, **calibrated)
    return create_app(settings, predictor)


def create_app(settings: ServeSettings, predictor) -> FastAPI:
    def run_batch(crops, sources):  # every brand ranked once; each request keeps its own top K
        return predictor.predict_crops(crops, sources, topk=len(predictor.classes))

    batcher = InferenceBatcher(run_batch, settings.batching)
    upload_budget = UploadBudget(settings.max_uploads_in_flight_bytes)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="carbrand", summary="Which car brand is this photo?", lifespan=lifespan, docs_url=None, redoc_url=None)
    add_error_handlers(app)
    model = model_description(settings, predictor)
    page = resources.files("carbrand.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def web_page() -> str:
        return page

    @app.get("/healthz")
    async def health() -> dict:
        return {"status": "ok", "pid": os.getpid(), "waiting_requests": batcher.waiting(), "batches_run": batcher.batches_run}

    @app.get("/v1/model")
    async def model_info() -> dict:
        return model

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict:
        topk = requested_topk(request, settings.topk, len(predictor.classes))
        explain = requested_flag(request, "explain")
        with upload_budget.reservation() as reservation:  # the body's bytes count until this request is answered
            uploads = await receive_uploads(request, settings, reservation)
            return await predictions_of(uploads, topk, explain)

    async def predictions_of(uploads: list, topk: int, explain: bool) -> dict:
        photos = await run_in_threadpool(decode_photos, uploads, predictor.data.max_pixels)
        crops = await run_in_threadpool(lambda: [predictor.preprocess(photo) for photo in photos])
        try:
            result = await batcher.predict(crops, [upload.filename for upload in uploads])
        except ServiceBusy as error:
            raise RequestError(503, "busy", str(error), retry_after_s=RETRY_AFTER_S) from None
        except InferenceTimeout as error:
            raise RequestError(504, "timeout", str(error)) from None
        predictions = []
        for prediction in result.predictions:
            prediction.topk = prediction.topk[:topk]
            predictions.append(prediction.to_dict())
        if explain:  # Grad-CAM of each answer's top-1 brand, drawn on the photo sent
            overlays = await batcher.run_alone(overlay_data_uris, predictor, photos, [p.topk[0].brand for p in result.predictions])
            for prediction, overlay_uri in zip(predictions, overlays):
                prediction["gradcam_png"] = overlay_uri
        return {"predictions": predictions, "inference_batch_images": result.batch_images}

    return app


async def receive_uploads(request: Request, settings: ServeSettings, reservation: Reservation):
    """The files of field `images`, covered by the request's share of the upload budget; an oversized body, or one
    the budget has no room for, is refused as soon as that is known."""
    chunks = request.stream()
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) <= settings.max_upload_bytes:
        # Refused before a byte is read: uvicorn drops the unread body without holding it, and a client that waits
        # for 100-continue (curl, for large files) never sends it.
        reservation.cover(int(declared))
    try:
        check_declared_length(declared, settings.max_upload_bytes)
        return await read_uploads(covered_as_received(chunks, reservation), request.headers.get("content-type"),
                                  settings.max_upload_bytes, settings.max_images)
    except RequestError as error:
        if error.status in (413, 503):  # refused while it streams in: its rest is drained within bounds
            await discard(chunks, DRAIN_FACTOR * settings.max_upload_bytes)
        raise
    except ClientDisconnect:  # gone, or cut off as too slow (carbrand/serve/connections.py): nobody reads this answer
        raise RequestError(408, "request_timeout", "the client went away before its upload arrived") from None


async def discard(chunks, budget_bytes: int) -> None:
    async for chunk in chunks:
        budget_bytes -= len(chunk)
        if budget_bytes < 0:
            return


def requested_topk(request: Request, default: int, brands: int) -> int:
    raw = request.query_params.get("topk")
    if raw is None:
        return min(default, brands)
    if not raw.isdigit() or int(raw) < 1:
        raise RequestError(400, "invalid_parameter", f"topk must be a positive integer; got {raw!r}")
    return min(int(raw), brands)


def requested_flag(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "0").lower()
    if raw not in ("0", "1", "true", "false"):
        raise RequestError(400, "invalid_parameter", f"{name} must be 0, 1, true or false; got {raw!r}")
    return raw in ("1", "true")


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(_request: Request, error: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s is not None else None
        return JSONResponse({"error": {"code": error.code, "message": error.message}}, status_code=error.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:  # 404, 405: same JSON shape
        code = "not_found" if error.status_code == 404 else f"http_{error.status_code}"
        return JSONResponse({"error": {"code": code, "message": str(error.detail)}}, status_code=error.status_code,
                            headers=getattr(error, "headers", None))


def model_description(settings: ServeSettings, predictor) -> dict:
    checkpoint = Path(settings.checkpoint).resolve()
    return {
        "checkpoint": str(checkpoint),
        "architecture": predictor_architecture(checkpoint),
        "brands": list(predictor.classes),
        "image_size": predictor.image_size,
        "eval_crops": predictor.crops,  # crops along each photo's longer side, probabilities averaged (--crops)
        "device": str(predictor.device),
        "test_metrics": test_metrics(checkpoint),
        "calibration": calibration(checkpoint),
        "batching": {"enabled": settings.batching.enabled, "max_batch_images": settings.batching.max_batch_images,
                     "max_wait_ms": settings.batching.max_wait_s * 1000},
        "limits": {"max_upload_bytes": settings.max_upload_bytes, "max_images": settings.max_images,
                   "max_uploads_in_flight_bytes": settings.max_uploads_in_flight_bytes,
                   **asdict(settings.connections)},
    }


def predictor_architecture(checkpoint: Path) -> str:
    """From config.yaml alone (Predictor.from_checkpoint has already checked the whole export)."""

    return config_from_dict(safe_yaml_load((checkpoint / "config.yaml").read_text()) or {}).model.arch


def calibration(checkpoint: Path) -> dict | None:
    """best/calibration.json as written (temperature, unknown threshold), or None for an uncalibrated export."""
    try:
        return json.loads((checkpoint / CALIBRATION_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def test_metrics(checkpoint: Path) -> dict | None:
    """The evaluator's test metrics of this export (RUN/eval_test/metrics.json, its default output), if it ran."""

    path = default_out_dir(checkpoint, "test") / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if metrics.get("checkpoint") not in (None, str(checkpoint)):
        return None  # metrics of another export that once lived here
    return {key: metrics[key] for key in TEST_METRICS_KEYS if key in metrics} | {"file": str(path)}
