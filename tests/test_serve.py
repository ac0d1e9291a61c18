"""`carbrand serve` over real HTTP on 127.0.0.1: predictions, model description, bad input, batching.

One server (the session fixture cars5_server: the fitted cars5 export, 3 MB upload limit, 4 images
per request, 100 ms batching wait) answers every test here.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from carbrand.bench.http_client import FilePart, ServiceClient
from carbrand.cli import main
from tests.helpers import image_factory

MEGABYTE = 1024 * 1024


@pytest.fixture(scope="module")
def photos(cars5_dir: Path) -> list[Path]:
    return sorted((cars5_dir / "test").glob("*/*.jpg"))[::20]  # one of each brand


def part(path: Path, **options) -> FilePart:
    return FilePart(path.name, path.read_bytes(), **options)


def assert_good_request_succeeds(client: ServiceClient, photo: Path) -> None:
    answer = client.predict([part(photo)])
    assert answer.status == 200, answer.body
    assert answer.json()["predictions"][0]["path"] == photo.name


def test_predictions_are_the_predictors_own(cars5_server, photos, fitted_cars5_export):
    from carbrand.inference.predict import Predictor

    client = cars5_server.client()
    answer = client.predict([part(p) for p in photos[:3]], topk=2)
    assert answer.status == 200, answer.body
    predictions = answer.json()["predictions"]
    expected = Predictor.from_checkpoint(fitted_cars5_export, device="cpu").predict(photos[:3], topk=2)
    assert [p["path"] for p in predictions] == [p.name for p in photos[:3]]
    for served, local in zip(predictions, expected):
        assert [b["brand"] for b in served["topk"]] == [b.brand for b in local.topk]
        assert served["topk"][0]["probability"] == pytest.approx(local.probability, abs=1e-5)
    assert len(client.predict([part(photos[0])]).json()["predictions"][0]["topk"]) == 5, "default --topk 5"


def test_health_model_and_page(cars5_server):
    client = cars5_server.client()
    health = client.get("/healthz")
    assert health.status == 200 and health.json()["status"] == "ok"
    model = client.get("/v1/model").json()
    assert model["brands"] == ["audi", "bmw", "ferrari", "lamborghini", "mercedes"]
    assert model["architecture"] == "resnet18" and model["image_size"] == 32 and model["eval_crops"] == 1
    assert model["test_metrics"]["accuracy"] == 0.61 and model["test_metrics"]["samples"] == 100
    page = client.get("/")
    assert page.status == 200 and b'id="file-input"' in page.body


def bad_uploads(tmp: Path, photo: Path) -> dict[str, tuple[dict, int, str, str]]:
    """name -> (ServiceClient.predict / request arguments, status, error code, text the message must contain)."""
    big = FilePart("big.jpg", photo.read_bytes() + bytes(int(3.5 * MEGABYTE)))
    return {
        "not an image": ({"parts": [part(image_factory.write_text(tmp / "notes.jpg"))]}, 422, "not_an_image", "notes.jpg"),
        "truncated jpeg": ({"parts": [part(image_factory.write_truncated_jpeg(tmp / "cut.jpg", seed=1))]},
                           422, "cannot_decode", "cut.jpg"),
        "empty file": ({"parts": [part(image_factory.write_zero_bytes(tmp / "empty.jpg"))]}, 422, "empty_file", "empty.jpg"),
        "decompression bomb": ({"parts": [part(image_factory.write_huge_header_png(tmp / "bomb.png"), content_type="image/png")]},
                               413, "too_many_pixels", "bomb.png"),
        "over the limit": ({"parts": [big]}, 413, "upload_too_large", "limit of 3145728 bytes"),
        "over the limit, chunked": ({"parts": [big], "chunked": True}, 413, "upload_too_large", "limit of 3145728 bytes"),
        "wrong part type": ({"parts": [part(photo, content_type="text/plain")]}, 415, "wrong_content_type", "text/plain"),
        "missing field": ({"parts": [part(photo, field="photo")]}, 400, "missing_field", "'images'"),
        "too many images": ({"parts": [part(photo)] * 5}, 413, "too_many_images", "4 images"),
        "bad topk": ({"parts": [part(photo)], "topk": 0}, 400, "invalid_parameter", "topk"),
    }


@pytest.mark.parametrize("case", ["not an image", "truncated jpeg", "empty file", "decompression bomb", "over the limit",
                                  "over the limit, chunked", "wrong part type", "missing field", "too many images", "bad topk"])
def test_bad_upload_gets_its_4xx_and_the_service_keeps_answering(case, cars5_server, photos, tmp_path):
    arguments, status, code, named = bad_uploads(tmp_path, photos[0])[case]
    client = cars5_server.client()
    answer = client.predict(**arguments)
    assert answer.status == status, answer.body
    error = answer.json()["error"]
    assert error["code"] == code and named in error["message"], error
    assert_good_request_succeeds(client, photos[1])
    assert cars5_server.process.poll() is None


def test_wrong_request_content_type_and_text_field(cars5_server, photos):
    client = cars5_server.client()
    answer = client.request("POST", "/v1/predict", photos[0].read_bytes(), {"Content-Type": "image/jpeg"})
    assert answer.status == 415 and answer.json()["error"]["code"] == "wrong_content_type"
    boundary = "xyz"
    text_field = (f'--{boundary}\r\nContent-Disposition: form-data; name="images"\r\n\r\nhello\r\n--{boundary}--\r\n').encode()
    answer = client.request("POST", "/v1/predict", text_field, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert answer.status == 400 and answer.json()["error"]["code"] == "not_a_file"
    unfinished = f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n\r\nabc'.encode()
    answer = client.request("POST", "/v1/predict", unfinished, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert answer.status == 400 and answer.json()["error"]["code"] == "malformed_multipart"
    assert_good_request_succeeds(client, photos[2])


def test_nothing_uploaded_is_written_to_disk(cars5_server, photos):
    """A 2.5 MB upload (Starlette's form parser would spool it to a temporary file, even an unnamed one)
    adds almost nothing to the bytes the server process has written (/proc/PID/io wchar: files and sockets)."""
    client = cars5_server.client()
    upload = FilePart("big.jpg", photos[0].read_bytes() + bytes(int(2.5 * MEGABYTE)))
    before = cars5_server.bytes_written()
    assert client.predict([upload]).status == 200
    assert client.predict([upload, upload]).status == 413  # refused while streaming: 5 MB over the 3 MB limit
    written = cars5_server.bytes_written() - before
    assert written < 64 * 1024, f"the server wrote {written} bytes while receiving 7.5 MB of uploads"
    assert list(cars5_server.tmpdir.iterdir()) == []


def test_concurrent_requests_share_forward_passes(cars5_server, photos):
    def one_request(number: int) -> dict:
        client = ServiceClient(cars5_server.url)
        try:
            answer = client.predict([part(photos[number % len(photos)])])
            assert answer.status == 200, answer.body
            return answer.json()
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(one_request, range(8)))
    assert max(answer["inference_batch_images"] for answer in answers) > 1, "no two concurrent requests shared a pass"


@pytest.mark.parametrize("arguments, code, text", [
    (["--checkpoint", "{tmp}/missing", "--workers", "2"], 1, "checkpoint not found"),  # before any worker starts
    (["--checkpoint", "{tmp}", "--port", "0"], 2, "--port must be positive"),
    (["--checkpoint", "{tmp}", "--max-upload-mb", "0"], 2, "--max-upload-mb must be positive"),
    (["--checkpoint", "{tmp}", "--max-uploads-in-flight-mb", "10"], 2, "must be at least --max-upload-mb (20)"),
    (["--checkpoint", "{tmp}", "--client-timeout-s", "0"], 2, "--client-timeout-s must be positive"),
    (["--checkpoint", "{tmp}", "--min-upload-kb-per-s", "-1"], 2, "--min-upload-kb-per-s must be >= 0"),
    (["--checkpoint", "{tmp}", "--crops", "0"], 2, "--crops must be in 1..8; got 0"),
])
def test_serve_refuses_bad_arguments_in_one_line(arguments, code, text, tmp_path, capsys):
    assert main(["serve", *[a.format(tmp=tmp_path) for a in arguments]]) == code
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and text in error, error


def test_serve_crops_reach_the_service_model(fitted_cars5_export, monkeypatch):
    """`serve --crops 3`: every worker process (built from the settings in its environment) scores 3 crops a photo."""
    import argparse
    import asyncio

    from carbrand.serve.app import app_from_environment
    from carbrand.serve.command import add_arguments, settings_from_arguments
    from carbrand.serve.settings import SETTINGS_VARIABLE

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = settings_from_arguments(parser.parse_args(["--checkpoint", str(fitted_cars5_export), "--crops", "3"]))
    monkeypatch.setenv(SETTINGS_VARIABLE, settings.to_json())
    app = app_from_environment()
    model_info = next(route.endpoint for route in app.routes if getattr(route, "path", None) == "/v1/model")
    assert asyncio.run(model_info())["eval_crops"] == 3


def test_default_upload_limit_is_20_mb():
    import argparse

    from carbrand.serve.command import add_arguments, settings_from_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert settings_from_arguments(parser.parse_args(["--checkpoint", "x"])).max_upload_bytes == 20 * MEGABYTE


def test_small_load_with_bad_uploads_mixed_in(cars5_server, cars5_dir):
    """`carbrand bench serve`'s load loop, bounded: 3 clients x 6 requests, every third one a bad upload."""
    from carbrand.bench.serve_load import measure, photo_bytes

    figures = measure(cars5_server.url, photo_bytes(cars5_dir / "test"), clients=3, requests=6, bad_every=3)
    assert figures["good_requests"] == 12 and figures["bad_requests"] == 6
    assert figures["failed_good_requests"] == 0
    assert figures["bad_requests_without_4xx"] == 0
    assert figures["latency_p50_ms"] <= figures["latency_p99_ms"]


def decoded_data_uri(uri: str):
    import base64
    import io

    import numpy as np
    from PIL import Image

    assert uri.startswith("data:image/png;base64,"), uri[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"), dtype=np.int16)


def test_explain_answers_with_the_grad_cam_overlay_carbrand_explain_draws(cars5_server, photos, fitted_cars5_export):
    import numpy as np

    from carbrand.inference.gradcam import overlay
    from carbrand.inference.predict import Predictor
    from carbrand.serve.explanations import OVERLAY_MAX_SIDE

    client = cars5_server.client()
    answer = client.predict([part(p) for p in photos[:2]], topk=2, explain=True)
    assert answer.status == 200, answer.body
    served = answer.json()["predictions"]
    predictor = Predictor.from_checkpoint(fitted_cars5_export, device="cpu")
    for prediction, photo in zip(served, photos[:2]):
        image, explanation = predictor.explain(photo)  # the top-1 brand's map, drawn as carbrand explain draws it
        assert predictor.classes[explanation.label] == prediction["topk"][0]["brand"]
        expected = np.asarray(overlay(image, explanation, max_side=OVERLAY_MAX_SIDE), dtype=np.int16)
        shown = decoded_data_uri(prediction["gradcam_png"])
        assert shown.shape == expected.shape and np.abs(shown - expected).max() <= 2
    assert "gradcam_png" not in client.predict([part(photos[0])]).json()["predictions"][0], "only when asked"
    refused = client.request("POST", "/v1/predict?explain=maybe", b"", {"Content-Type": "multipart/form-data; boundary=x"})
    assert refused.status == 400 and "explain must be" in refused.json()["error"]["message"]


def test_a_calibrated_export_is_served_calibrated_with_its_unknown_answer(fitted_cars5_export, prepared_cars5, photos, tmp_path):
    import shutil

    from carbrand.evaluation.calibrate import main as calibrate
    from carbrand.inference.predict import Predictor
    from tests.helpers.serving import serving

    best = tmp_path / "run" / "best"
    shutil.copytree(fitted_cars5_export, best)
    assert calibrate(["--checkpoint", str(best), "--data", str(prepared_cars5), "--loader", "torchvision"]) == 0
    expected = Predictor.from_checkpoint(best, device="cpu", min_confidence="auto").predict(photos, topk=5)
    with serving(best, tmp_path) as server:
        answer = server.client().predict([part(p) for p in photos], topk=5)
    assert answer.status == 200, answer.body
    for served, local in zip(answer.json()["predictions"], expected, strict=True):
        assert served["temperature"] == pytest.approx(local.temperature) and local.temperature != 1.0
        assert served["unknown"] == local.unknown and served["min_confidence"] == pytest.approx(local.min_confidence)
        assert [b["probability"] for b in served["topk"]] == pytest.approx([b.probability for b in local.topk], abs=1e-5)
