"""Ray Serve deployment: settings, checkpoint checks, training-equal preprocessing, every endpoint over HTTP,
every bad input, API key and CORS, overload, Prometheus metrics, the view gate, calibrated and recalibrated
checkpoints, bone-age uncertainty, and the web page in headless Chromium.

Serve runs once per module on the session's local Ray (`ray_session`) with tiny_cnn checkpoints at 32 px
(view 7 and 30 classes from a 64 px shard recipe, bone age with CLAHE, fracture; the view gate off, as
these untrained view models cannot recognise anything), plus a small application with an API key, CORS
and upload keeping switched on, and a gated one whose view model is built to tell bright images
(Upper_Extremity) from dark ones (Chest).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import requests
import torch
import yaml
from factories import gradient_8bit, radiograph
from waiting import wait_until

from deploy.app import auto_batch_wait
from deploy.gate import accepted_classes, check_gate_views, gate_verdict
from deploy.inputs import InputError, Limits, Upload, decode, is_colour, parse_body, parse_multipart, prepare
from deploy.models import Predictor, inspect_checkpoint
from deploy.settings import ServeSettings, SettingsError, resolve_checkpoint, resolve_settings
from ingest.dataset.taxonomy import load_taxonomy
from ingest.imaging.png import encode_png
from ingest.imaging.preprocess import PreprocessParams, preprocess_file
from pedx_ray.config import PretrainConfig
from pedx_ray.finetune import FinetuneConfig
from pedx_ray.models import CheckpointError, build_model, load_checkpoint, save_checkpoint
from pedx_ray.tasks import build_task_model

VIEW_CLASSES = ("Abdomen", "Chest", "Head", "Lower_Extremity", "Pelvis", "Spine", "Upper_Extremity")
SHARD_PARAMS = PreprocessParams(size=64)
API_KEY = "test-key-7f3a"  # only for the secured app below
SECRET = "Secret4711"  # a patient name / file name that must never reach a log or a file name


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Contract-4 checkpoints of untrained tiny models (serving does not care how good they are)."""
    root = tmp_path_factory.mktemp("checkpoints")
    shards = root / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"preprocessing": SHARD_PARAMS.to_dict()}))
    torch.manual_seed(0)
    out = {}
    for granularity in (7, 30):
        classes = VIEW_CLASSES if granularity == 7 else tuple(f"class_{i}" for i in range(30))
        config = PretrainConfig(
            arch="tiny_cnn", granularity=granularity, image_size=32, classes=classes, shards=str(shards)
        )
        out[f"view_{granularity}"] = save_checkpoint(
            root / f"view{granularity}" / "best", build_model(config), config, {"val_f1": 0.5}
        )
    for task, enhance in (("bone_age", "clahe"), ("fracture", "none")):
        config = FinetuneConfig(
            task=task, backbone="tiny_cnn", image_size=32, enhance=enhance, target_mean=100.0, target_std=50.0
        )
        out[task] = save_checkpoint(
            root / task / "best", build_task_model(config), config, {"val_score": 0.1}
        )
    return out


def brightness_view_model(config: PretrainConfig) -> torch.nn.Module:
    """A 7-class tiny_cnn that reads an image's mean brightness b: every conv averages channel 0 into
    channel 0, and the head says Upper_Extremity for b > 0.3, Chest below (others at logit 0)."""
    model = build_model(config)
    with torch.no_grad():
        for module in model.features:
            if isinstance(module, torch.nn.Conv2d):
                module.weight.zero_()
                module.weight[0, 0] = 1.0 / module.kernel_size[0] ** 2
                if module.bias is not None:
                    module.bias.zero_()
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        for name, sign in (("Upper_Extremity", 1.0), ("Chest", -1.0)):
            model.fc.weight[config.classes.index(name), 0] = 40.0 * sign
            model.fc.bias[config.classes.index(name)] = -12.0 * sign
    return model


def framed(bright: bool) -> bytes:
    """A PNG mostly bright (the gate model's Upper_Extremity) or mostly dark (its Chest), with a square
    of the other value, so that preprocessing keeps the full range."""
    image = np.full((200, 160), 235 if bright else 20, np.uint8)
    image[80:120, 60:100] = 20 if bright else 235
    return png_bytes(image)


GATE_TEMPERATURE = 2.0
RECALIBRATION = {"slope": 1.1, "intercept": 6.0}


@pytest.fixture(scope="module")
def gated_checkpoints(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """The brightness view model with a fitted temperature, a recalibrated bone-age model, the fracture
    model as is."""
    root = tmp_path_factory.mktemp("gated")
    view_config = PretrainConfig.from_dict(json.loads((checkpoints["view_7"] / "config.json").read_text()))
    view = save_checkpoint(root / "view7", brightness_view_model(view_config), view_config, {})
    (view / "calibration.json").write_text(json.dumps({"temperature": GATE_TEMPERATURE}))
    bone_age = root / "bone_age"
    shutil.copytree(checkpoints["bone_age"], bone_age)
    (bone_age / "recalibration.json").write_text(json.dumps(RECALIBRATION))
    return {"view_7": view, "bone_age": bone_age, "fracture": checkpoints["fracture"]}


def dicom_bytes(sex: str | None = "M", shape=(96, 80), name: str = "Test^P1") -> bytes:
    ds = radiograph(patient_id="P1", study_key=f"serve-{sex}-{shape}", shape=shape, sex=sex or "")
    ds.PatientName = name
    if sex is None:
        del ds.PatientSex
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", image)
    assert ok
    return buffer.tobytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY = dict(num_cpus=0.01, max_batch_size=8, batch_wait_timeout_s=0.02, max_upload_bytes=2 * 1024 * 1024)
MAX_SD = 1e-6  # the gated app declines every bone age: any test-time spread is above it
LIGHT = {"ray_actor_options": {"num_cpus": 0.01}}


@pytest.fixture(scope="module")
def served(ray_session, checkpoints, gated_checkpoints, tmp_path_factory):
    """Three Serve apps on 127.0.0.1: ``open`` (all models, no key, no gate), ``secured`` (key, CORS,
    upload_dir) and ``gated`` (the view gate on, bone age declined above MAX_SD)."""
    from ray import serve

    from deploy.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings(**{k: str(v) for k, v in checkpoints.items()}, gate=False, **TINY)
    # view_30 accepts one request at a time and queues one more: the overload test's target.
    options = {"Gateway": LIGHT, "view_30": LIGHT | {"max_ongoing_requests": 1, "max_queued_requests": 1}}
    serve.run(build_app(settings, options), name="open", route_prefix="/")
    upload_dir = tmp_path_factory.mktemp("uploads")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEDX_TEST_KEY", API_KEY)
        secured = ServeSettings(
            view_7=str(checkpoints["view_7"]),
            api_key_env="PEDX_TEST_KEY",
            cors_origins=("http://viewer.example",),
            upload_dir=str(upload_dir),
            **TINY,
        )
        serve.run(build_app(secured, {"Gateway": LIGHT}), name="secured", route_prefix="/secured")
    gated = ServeSettings(
        **{k: str(v) for k, v in gated_checkpoints.items()}, bone_age_max_sd_months=MAX_SD, **TINY
    )
    serve.run(build_app(gated, {"Gateway": LIGHT}), name="gated", route_prefix="/gated")
    yield {"base": f"http://127.0.0.1:{port}", "uploads": upload_dir}
    serve.shutdown()


@pytest.fixture(scope="module")
def base(served) -> str:
    return served["base"]


def post(url: str, data, content_type: str = "application/dicom", headers: dict | None = None):
    headers = {"Content-Type": content_type} | (headers or {})
    return requests.post(url, data=data, headers=headers, timeout=60)


def assert_refused(
    response: requests.Response, status: int, code: str | None = None, details: tuple[str, ...] = ()
) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "message", *details} and body["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    if code:
        assert body["error"] == code, body
    return body


# ---------------------------------------------------------------- settings and checkpoints (no Serve)


def test_settings_come_from_the_serve_config_and_arguments_override_them(tmp_path, checkpoints):
    config = {
        "applications": [
            {"name": "x", "import_path": "deploy.app:app", "args": {"view_7": "a", "max_batch_size": 4}}
        ]
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = resolve_settings(
        {"config": str(path), "max_batch_size": "8", "cors_origins": "http://a, http://b"}
    )
    assert (settings.view_7, settings.max_batch_size) == ("a", 8)
    assert settings.cors_origins == ("http://a", "http://b")
    assert settings.batch_wait_timeout_s == "auto"
    assert resolve_settings({"view_7": "a", "batch_wait_timeout_s": "0.02"}).batch_wait_timeout_s == 0.02
    with pytest.raises(SettingsError, match="batch_wait_timeout_s must be 'auto' or >= 0"):
        ServeSettings(view_7="a", batch_wait_timeout_s="soon")
    assert resolve_settings({"view_7": "a", "decoder_threads": "4"}).decoder_threads == 4
    with pytest.raises(SettingsError, match="decoder_threads must be >= 0"):
        ServeSettings(view_7="a", decoder_threads=-1)
    with pytest.raises(SettingsError, match="unknown setting.*batch"):
        resolve_settings({"config": str(path), "batch": "8"})
    with pytest.raises(SettingsError, match="no model to serve"):
        ServeSettings()
    # the shipped config parses and names the demo checkpoint by glob
    assert resolve_settings({}).view_7 == "demo/runs/smoke-7c-*/best"


def test_a_checkpoint_glob_picks_the_newest_run(tmp_path):
    for i, name in enumerate(("run-a", "run-b")):
        (tmp_path / name / "best").mkdir(parents=True)
        os.utime(tmp_path / name / "best", (1000 + i, 1000 + i))
    assert resolve_checkpoint(str(tmp_path / "run-*" / "best"), "view_7") == (tmp_path / "run-b" / "best")
    with pytest.raises(SettingsError, match="no checkpoint directory matches"):
        resolve_checkpoint(str(tmp_path / "none-*"), "view_7")
    with pytest.raises(SettingsError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "missing"), "view_7")


def test_missing_or_broken_checkpoints_fail_before_any_replica_starts(tmp_path, checkpoints):
    from deploy.app import build_app

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["view_7"], broken)
    (broken / "model.pt").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="model.pt is not a readable PyTorch state_dict"):
        build_app(ServeSettings(view_7=str(broken)))
    (broken / "model.pt").unlink()
    with pytest.raises(CheckpointError, match="missing model.pt"):
        inspect_checkpoint("view_7", broken)
    # weights of another model: every mismatch is named
    shutil.copy(checkpoints["view_30"] / "model.pt", broken / "model.pt")
    with pytest.raises(CheckpointError, match=r"does not match the model.*fc.weight: \(30, 2048\)"):
        inspect_checkpoint("view_7", broken)
    with pytest.raises(CheckpointError, match="serve it as view_7"):
        inspect_checkpoint("view_30", checkpoints["view_7"])
    with pytest.raises(CheckpointError, match="serve it as bone_age"):
        inspect_checkpoint("fracture", checkpoints["bone_age"])
    with pytest.raises(CheckpointError, match="not a fine-tuning config"):
        inspect_checkpoint("bone_age", checkpoints["view_7"])


def test_view_model_needs_its_shard_preprocessing(tmp_path, checkpoints):
    moved = tmp_path / "moved"
    shutil.copytree(checkpoints["view_7"], moved)
    config = json.loads((moved / "config.json").read_text()) | {"shards": str(tmp_path / "gone")}
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="set view_preprocessing"):
        inspect_checkpoint("view_7", moved)
    spec = inspect_checkpoint("view_7", moved, view_preprocessing={"size": 64})
    assert spec.recipe.params == SHARD_PARAMS and spec.input_size == 32


# ---------------------------------------------------------------- preprocessing = training's


def test_served_preprocessing_equals_fine_tuning_preprocessing(tmp_path, checkpoints):
    """One DICOM and one PNG through pedx_ray.datasets' cache (what fine-tuning read) and the service."""
    from pedx_ray.datasets import cache_images, read_images

    dicom = tmp_path / "image.dcm"
    dicom.write_bytes(dicom_bytes())
    png = tmp_path / "image.png"
    png.write_bytes(png_bytes(gradient_8bit()))
    for task in ("bone_age", "fracture"):  # CLAHE and no enhancement
        spec = inspect_checkpoint(task, checkpoints[task])
        config = FinetuneConfig.from_dict(spec.config)
        table = pd.DataFrame({"path": [str(dicom), str(png)]})
        cached = cache_images(
            table,
            image_size=config.image_size,
            enhance=config.enhance,
            cache_dir=tmp_path / task,
            progress=False,
        )
        trained = read_images(cached["image"])
        for i, (path, kind) in enumerate(((dicom, "application/dicom"), (png, "image/png"))):
            served = prepare(decode(parse_body(path.read_bytes(), kind), Limits()), spec.recipe)
            np.testing.assert_array_equal(served, trained[i], err_msg=f"{task} {kind}")


def test_served_preprocessing_equals_pretraining_shard_decoding(tmp_path, checkpoints):
    """Shards hold preprocess_file at the manifest's size as PNG; the loader resizes to image_size."""
    from pedx_ray.data import SampleDecoder

    path = tmp_path / "image.dcm"
    path.write_bytes(dicom_bytes(shape=(120, 70)))
    spec = inspect_checkpoint("view_7", checkpoints["view_7"])
    sample = {
        "__key__": "k",
        "png": encode_png(preprocess_file(path, SHARD_PARAMS)),
        "json": json.dumps({"label_7": VIEW_CLASSES[0]}),
    }
    trained = SampleDecoder(VIEW_CLASSES, 7, 32)(sample)["image"]
    served = prepare(decode(parse_body(path.read_bytes(), "application/dicom"), Limits()), spec.recipe)
    assert served.shape == (32, 32)
    np.testing.assert_array_equal(served, trained)


def test_cuda_path_bf16_channels_last_runs_on_cpu_and_agrees_with_float32(checkpoints):
    spec = inspect_checkpoint("view_7", checkpoints["view_7"])
    images = np.stack([np.roll(gradient_8bit((32, 32)), i, axis=1) for i in range(4)])
    exact = Predictor(spec).predict(images)
    fast = Predictor(spec, bf16=True, channels_last=True).predict(images)
    np.testing.assert_allclose(
        [r["probabilities"] for r in fast], [r["probabilities"] for r in exact], atol=0.05
    )


def test_auto_batch_wait_follows_the_measured_forward_time(checkpoints):
    # a GPU-fast model waits 5 ms, a CPU model twice its forward, a very slow one at most 250 ms
    assert [auto_batch_wait(s) for s in (0.0005, 0.04, 3.0)] == [0.005, 0.08, 0.25]
    single = Predictor(inspect_checkpoint("view_7", checkpoints["view_7"])).time_single_forward()
    assert 0 < single < 5


def test_multipart_parsing_and_colour_detection():
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="sex"\r\n\r\nF\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="Doe^Jane.dcm"\r\n'
        b"Content-Type: application/dicom\r\n\r\n\x00--XyZ\r\nbinary\r\n--XyZ--\r\n"
    )
    data, part_type, fields = parse_multipart(body, "XyZ")
    assert (data, part_type, fields) == (b"\x00--XyZ\r\nbinary", "application/dicom", {"sex": "F"})
    with pytest.raises(InputError, match="no closing boundary"):
        parse_multipart(body[:-10], "XyZ")
    gray = np.repeat(gradient_8bit()[:, :, None], 3, axis=2)
    assert not is_colour(gray)
    colour = gray.copy()
    colour[:, :, 2] = 255 - colour[:, :, 2]
    assert is_colour(colour)
    assert decode(Upload(png_bytes(gray), "png"), Limits()).array.shape == gray.shape


# ---------------------------------------------------------------- endpoints over HTTP


def test_health_openapi_and_models(base, checkpoints):
    assert requests.get(f"{base}/healthz", timeout=30).json()["status"] == "ok"
    spec = requests.get(f"{base}/openapi.json", timeout=30).json()
    assert {"/v1/view", "/v1/bone-age", "/v1/fracture", "/v1/models", "/healthz"} <= set(spec["paths"])
    assert "application/dicom" in spec["paths"]["/v1/view"]["post"]["requestBody"]["content"]
    models = {m["name"]: m for m in requests.get(f"{base}/v1/models", timeout=30).json()["models"]}
    assert set(models) == {"view_7", "view_30", "bone_age", "fracture"}
    for name, info in models.items():
        assert info["checkpoint"] == str(checkpoints[name].resolve())
        assert info["config"] == json.loads((checkpoints[name] / "config.json").read_text())
        assert info["metrics"] == json.loads((checkpoints[name] / "metrics.json").read_text())
        assert info["device"] == "cpu" and info["load_seconds"] > 0
        assert info["batch_wait_timeout_s"] == TINY["batch_wait_timeout_s"]
    assert models["view_30"]["granularity"] == 30 and models["view_7"]["classes"] == list(VIEW_CLASSES)
    assert models["bone_age"]["recipe"]["preprocessing"]["clahe"] is True
    assert models["view_7"]["recipe"]["preprocessing"]["size"] == 64


@pytest.mark.parametrize("how", ["dicom", "multipart", "png", "jpeg", "octet-stream"])
def test_view_prediction_equals_the_model_called_directly(base, checkpoints, how):
    data = dicom_bytes() if how in ("dicom", "multipart", "octet-stream") else None
    if how == "png":
        data = png_bytes(gradient_8bit())
    if how == "jpeg":
        data = cv2.imencode(".jpg", gradient_8bit())[1].tobytes()
    kind = {"dicom": "application/dicom", "png": "image/png", "jpeg": "image/jpeg"}.get(how, how)
    if how == "multipart":
        response = requests.post(
            f"{base}/v1/view?top_k=2", files={"file": ("x.dcm", data, "application/dicom")}, timeout=60
        )
    else:
        response = post(
            f"{base}/v1/view?top_k=2", data, "application/octet-stream" if how == "octet-stream" else kind
        )
    assert response.status_code == 200, response.text
    body = response.json()
    spec = inspect_checkpoint("view_7", checkpoints["view_7"])
    image = prepare(decode(parse_body(data, "application/octet-stream"), Limits()), spec.recipe)
    expected = Predictor(spec).predict(image[None])[0]
    assert body["label"] == expected["label"] and body["granularity"] == 7
    np.testing.assert_allclose(list(body["probabilities"].values()), expected["probabilities"], atol=1e-5)
    assert [c["label"] for c in body["top_k"]] == sorted(
        VIEW_CLASSES, key=lambda c: -body["probabilities"][c]
    )[:2]
    assert body["probability"] == body["top_k"][0]["probability"]


def test_several_granularities_are_served_at_once(base):
    body = post(f"{base}/v1/view?granularity=30&top_k=5", dicom_bytes()).json()
    assert body["model"] == "view_30" and len(body["probabilities"]) == 30 and len(body["top_k"]) == 5
    assert sum(body["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert_refused(post(f"{base}/v1/view?granularity=68", dicom_bytes()), 404, "model_not_loaded")


def test_bone_age_takes_sex_from_the_request_or_the_dicom_header(base, checkpoints):
    spec = inspect_checkpoint("bone_age", checkpoints["bone_age"])
    predictor = Predictor(spec, tta=ServeSettings.bone_age_tta)  # as served: the mean over TTA views
    data = dicom_bytes(sex="M")
    image = prepare(decode(parse_body(data, "application/dicom"), Limits()), spec.recipe)
    expected = {
        s: predictor.predict(image[None], np.array([v], np.float32))[0] for s, v in (("M", 1), ("F", 0))
    }

    header = post(f"{base}/v1/bone-age", data).json()
    assert (header["sex"], header["sex_source"]) == ("M", "dicom")
    assert header["bone_age_months"] == pytest.approx(expected["M"]["bone_age_months"], abs=1e-3)
    assert header["bone_age_years"] == pytest.approx(header["bone_age_months"] / 12)
    assert header["tta_views"] == 4 and header["bone_age_sd_months"] > 0
    assert header["bone_age_sd_months"] == pytest.approx(expected["M"]["bone_age_sd_months"], abs=1e-3)
    assert header["gate"] == {"applied": False, "reason": "the gate is off in the settings"}
    query = post(f"{base}/v1/bone-age?sex=female", data).json()
    assert (query["sex"], query["sex_source"]) == ("F", "request")
    assert query["bone_age_months"] == pytest.approx(expected["F"]["bone_age_months"], abs=1e-3)
    form = requests.post(
        f"{base}/v1/bone-age", files={"file": ("x.dcm", data)}, data={"sex": "F"}, timeout=60
    ).json()
    assert (form["sex"], form["sex_source"]) == ("F", "request")

    no_sex = assert_refused(post(f"{base}/v1/bone-age", dicom_bytes(sex=None)), 422, "sex_required")
    assert "sex=M" in no_sex["message"] and "PatientSex" in no_sex["message"]
    assert_refused(post(f"{base}/v1/bone-age", png_bytes(gradient_8bit()), "image/png"), 422, "sex_required")
    assert post(f"{base}/v1/bone-age?sex=M", png_bytes(gradient_8bit()), "image/png").status_code == 200
    assert_refused(post(f"{base}/v1/bone-age?sex=X", data), 422, "invalid_sex")


def test_fracture_gives_a_probability_and_a_thresholded_label(base):
    body = post(f"{base}/v1/fracture", dicom_bytes()).json()
    assert 0 <= body["probability"] <= 1 and body["threshold"] == 0.5
    assert body["label"] == ("fracture" if body["probability"] >= 0.5 else "no_fracture")


@pytest.mark.parametrize("route", ["/v1/view", "/v1/bone-age", "/v1/fracture"])
def test_explain_returns_the_grad_cam_overlay(base, route):
    data = dicom_bytes()
    body = post(f"{base}{route}?explain=1", data).json()
    overlay = cv2.imdecode(
        np.frombuffer(base64.b64decode(body.pop("overlay_png")), np.uint8), cv2.IMREAD_COLOR
    )
    assert overlay.shape == (32, 32, 3)
    assert body == post(f"{base}{route}", data).json()  # the same prediction as without explain
    raw = requests.post(
        f"{base}{route}?explain=1",
        data=data,
        headers={"Content-Type": "application/dicom", "Accept": "image/png"},
        timeout=60,
    )
    assert raw.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(
        cv2.imdecode(np.frombuffer(raw.content, np.uint8), cv2.IMREAD_COLOR), overlay
    )
    assert json.loads(raw.headers["X-PedX-Result"]) == body


# ---------------------------------------------------------------- the view gate, calibration, uncertainty


def test_the_gate_table_accepts_exactly_the_tasks_views_among_every_phantom_view():
    """One-hot view-model answers for every view the phantoms draw, at each granularity."""
    from ingest.phantoms.spec import REGISTRY

    taxonomy = load_taxonomy()
    table = check_gate_views(ServeSettings(view_7="x").gate_views, taxonomy)
    assert set(REGISTRY) == set(taxonomy.classes(68))
    expected = {
        (68, "bone_age"): {"Hand_PA"},
        (68, "fracture"): {"Wrist_AP", "Wrist_Oblique", "Forearm_Oblique"},
        (30, "bone_age"): {"Hand_PA", "Hand_Lateral", "Hand_Oblique"},
        (30, "fracture"): {"Wrist_AP", "Wrist_Oblique", "Forearm_Oblique"},
    }
    for granularity in (7, 30, 68):
        for task, views in table.items():
            accepted = accepted_classes(views, granularity, taxonomy)
            passed = set()
            for view in sorted(REGISTRY):
                label = taxonomy.coarsen(view, granularity)
                verdict = gate_verdict({label: 0.93, "other": 0.07}, accepted, 0.5, f"view_{granularity}")
                assert (verdict.view, verdict.probability) == (label, 0.93)
                if verdict.passed:
                    passed.add(view)
            # a 7-class gate can only tell the upper extremity from the rest
            want = expected.get((granularity, task)) or {
                v for v in REGISTRY if taxonomy.coarsen(v, 7) == "Upper_Extremity"
            }
            assert passed == want, (granularity, task)
    assert not gate_verdict({"Hand": 0.45, "Wrist": 0.3}, ("Hand",), 0.5, "view_30").passed
    with pytest.raises(ValueError, match="not in the taxonomy: \\['Hand_Front'\\]"):
        check_gate_views({"bone_age": ["Hand_Front"]}, taxonomy)
    with pytest.raises(ValueError, match="unknown task 'view'"):
        check_gate_views({"view": ["Hand_PA"]}, taxonomy)


def test_a_gate_that_could_never_pass_stops_the_app(checkpoints):
    from deploy.app import build_app

    # view_30's class names are placeholders, not the taxonomy's: no upload could pass
    with pytest.raises(
        SettingsError, match=r"gate: the view model view_30 .* has no class \['Forearm', 'Hand'"
    ):
        build_app(ServeSettings(view_30=str(checkpoints["view_30"]), bone_age=str(checkpoints["bone_age"])))
    with pytest.raises(SettingsError, match="gate_views.*not in the taxonomy"):
        build_app(ServeSettings(view_7=str(checkpoints["view_7"]), gate_views={"fracture": ["Wrists"]}))
    with pytest.raises(SettingsError, match="bone_age_tta must be 1 \\(off\\) to 8"):
        ServeSettings(view_7="x", bone_age_tta=9)
    settings = resolve_settings({"view_7": "a", "gate_views": "{bone_age: [Hand_PA, Hand_Oblique]}"})
    assert settings.gate_views["bone_age"] == ["Hand_PA", "Hand_Oblique"]
    assert settings.gate_views["fracture"] == ("Wrist_AP", "Wrist_Oblique", "Forearm_Oblique")  # kept


def test_calibration_and_recalibration_files_change_what_the_predictor_answers(
    checkpoints, gated_checkpoints
):
    images = np.stack([np.roll(gradient_8bit((32, 32)), 7 * i, axis=1) for i in range(3)])
    sex = np.array([1.0, 0.0, 1.0], np.float32)
    calibrated = Predictor(inspect_checkpoint("view_7", gated_checkpoints["view_7"]))
    raw_model, _ = load_checkpoint(gated_checkpoints["view_7"])
    with torch.no_grad():
        logits = raw_model.eval()(torch.from_numpy(images).float()[:, None] / 255)
    np.testing.assert_allclose(
        [r["probabilities"] for r in calibrated.predict(images)],
        torch.softmax(logits / GATE_TEMPERATURE, dim=1).numpy(),
        atol=1e-5,
    )
    assert calibrated.info()["temperature"] == GATE_TEMPERATURE
    # bone age: the recalibrated checkpoint is the original's answer, corrected linearly
    original = Predictor(inspect_checkpoint("bone_age", checkpoints["bone_age"]), tta=3)
    recalibrated = Predictor(inspect_checkpoint("bone_age", gated_checkpoints["bone_age"]), tta=3)
    for before, after in zip(original.predict(images, sex), recalibrated.predict(images, sex), strict=True):
        assert after["tta_views"] == 3
        assert after["bone_age_months"] == pytest.approx(
            RECALIBRATION["slope"] * before["bone_age_months"] + RECALIBRATION["intercept"]
        )
        assert after["bone_age_sd_months"] == pytest.approx(
            RECALIBRATION["slope"] * before["bone_age_sd_months"]
        )
    # without TTA there is no spread to report
    single = Predictor(inspect_checkpoint("bone_age", checkpoints["bone_age"]))
    single = single.predict(images[:1], sex[:1])[0]
    assert single["tta_views"] == 1 and single["bone_age_sd_months"] is None


def test_old_checkpoints_serve_uncalibrated_and_new_ones_calibrated(base, checkpoints):
    open_models = {m["name"]: m for m in requests.get(f"{base}/v1/models", timeout=30).json()["models"]}
    assert not any((checkpoints[name] / "calibration.json").exists() for name in checkpoints)
    assert open_models["view_7"]["temperature"] == 1.0 and open_models["fracture"]["temperature"] == 1.0
    assert open_models["bone_age"]["recalibration"] == {"slope": 1.0, "intercept": 0.0}
    gated = {m["name"]: m for m in requests.get(f"{base}/gated/v1/models", timeout=30).json()["models"]}
    assert gated["view_7"]["temperature"] == GATE_TEMPERATURE
    assert gated["bone_age"]["recalibration"] == RECALIBRATION and gated["bone_age"]["tta_views"] == 4


def test_the_gate_refuses_the_wrong_view_with_what_it_saw(base):
    for route in ("/v1/fracture", "/v1/bone-age?sex=M"):
        response = post(f"{base}/gated{route}", framed(bright=False), "image/png")
        details = ("view", "probability", "model", "accepted_views", "accepted_probability")
        body = assert_refused(response, 422, "wrong_view", details)
        assert (body["view"], body["model"], body["accepted_views"]) == (
            "Chest",
            "view_7",
            ["Upper_Extremity"],
        )
        assert body["probability"] > 0.9 and body["accepted_probability"] < 0.01
        assert "Chest" in body["message"] and "gate=off" in body["message"]


def test_the_gate_passes_the_right_view_and_gate_off_bypasses_it(base):
    accepted = post(f"{base}/gated/v1/fracture", framed(bright=True), "image/png")
    assert accepted.status_code == 200, accepted.text
    gate = accepted.json()["gate"]
    assert gate["applied"] and gate["passed"] and gate["view"] == "Upper_Extremity"
    assert gate["accepted_probability"] == gate["probability"] > 0.5
    bypassed = post(f"{base}/gated/v1/fracture?gate=off", framed(bright=False), "image/png")
    assert bypassed.status_code == 200, bypassed.text
    assert bypassed.json()["gate"] == {"applied": False, "reason": "gate=off in the request"}
    assert post(f"{base}/gated/v1/fracture?gate=maybe", framed(bright=True), "image/png").status_code == 422


def test_an_uncertain_bone_age_is_declined_with_its_spread(base, gated_checkpoints):
    data = framed(bright=True)  # passes the gate
    spec = inspect_checkpoint("bone_age", gated_checkpoints["bone_age"])
    image = prepare(decode(parse_body(data, "image/png"), Limits()), spec.recipe)
    expected = Predictor(spec, tta=4).predict(image[None], np.array([1.0], np.float32))[0]
    response = post(f"{base}/gated/v1/bone-age?sex=M", data, "image/png")
    body = assert_refused(
        response, 422, "low_confidence", ("bone_age_months", "bone_age_sd_months", "max_sd_months")
    )
    assert body["bone_age_months"] == pytest.approx(expected["bone_age_months"], abs=1e-3)
    assert body["bone_age_sd_months"] == pytest.approx(expected["bone_age_sd_months"], abs=1e-3)
    assert body["max_sd_months"] == MAX_SD and "4 augmented views" in body["message"]


def test_gate_decisions_are_counted_in_prometheus(base, ray_session):
    post(f"{base}/gated/v1/fracture", framed(bright=False), "image/png")
    post(f"{base}/gated/v1/fracture", framed(bright=True), "image/png")
    post(f"{base}/gated/v1/fracture?gate=off", framed(bright=True), "image/png")
    port = ray_session.nodes()[0]["MetricsExportPort"]
    wanted = {("fracture", "refused"), ("fracture", "accepted"), ("fracture", "bypassed")}

    def counted() -> bool:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        lines = [line for line in text.splitlines() if line.startswith("ray_pedx_serve_gate_total{")]
        return all(any(f'task="{t}"' in x and f'decision="{d}"' in x for x in lines) for t, d in wanted)

    wait_until(counted, 60, f"ray_pedx_serve_gate_total lacks one of {wanted}", interval=1)


# ---------------------------------------------------------------- bad input


def _truncated() -> bytes:
    data = dicom_bytes()
    return data[: len(data) - 5000]


def _no_pixels() -> bytes:
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(dicom_bytes()))
    del ds.PixelData, ds.Rows, ds.Columns
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _colour_png() -> bytes:
    image = np.dstack([gradient_8bit(), 255 - gradient_8bit(), np.full((90, 70), 30, np.uint8)])
    return png_bytes(image)


BAD_INPUTS = {
    "empty body": (lambda: b"", "application/dicom", 400, "empty_body"),
    "random bytes as DICOM": (lambda: os.urandom(4096), "application/dicom", 422, "not_dicom"),
    "random bytes, unknown type": (
        lambda: os.urandom(4096),
        "application/octet-stream",
        415,
        "unknown_format",
    ),
    "random bytes as PNG": (lambda: os.urandom(4096), "image/png", 422, "not_an_image"),
    "truncated DICOM": (_truncated, "application/dicom", 422, None),
    "DICOM without pixels": (_no_pixels, "application/dicom", 422, "no_pixel_data"),
    "colour PNG": (_colour_png, "image/png", 422, "colour_image"),
    "truncated PNG": (lambda: png_bytes(gradient_8bit())[:200], "image/png", 422, "not_an_image"),
    "10,000 x 10,000 PNG": (
        lambda: png_bytes(np.zeros((10_000, 10_000), np.uint8)),
        "image/png",
        413,
        "image_too_large",
    ),
    "huge upload": (lambda: os.urandom(3 * 1024 * 1024), "application/dicom", 413, "upload_too_large"),
    "wrong content type": (lambda: b'{"image": "x"}', "application/json", 415, "unsupported_media_type"),
    "PNG sent as DICOM": (
        lambda: png_bytes(gradient_8bit()),
        "application/dicom",
        415,
        "content_type_mismatch",
    ),
    "multipart without boundary": (lambda: b"--x\r\n", "multipart/form-data", 400, "bad_multipart"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_4xx_with_a_message(base, case):
    make, content_type, status, code = BAD_INPUTS[case]
    assert_refused(post(f"{base}/v1/view", make(), content_type), status, code)


def test_rgb_dicom_and_a_chunked_huge_upload_are_refused(base, pydicom_testfiles):
    rgb = next(p for p in pydicom_testfiles if p.name == "SC_rgb_rle.dcm")
    assert_refused(post(f"{base}/v1/fracture", rgb.read_bytes()), 422, "unsupported_photometric")
    chunks = (os.urandom(256 * 1024) for _ in range(12))  # no Content-Length: the limit applies while reading
    response = requests.post(
        f"{base}/v1/view", data=chunks, headers={"Content-Type": "application/dicom"}, timeout=60
    )
    assert_refused(response, 413, "upload_too_large")
    # a grayscale radiograph saved as RGB is what training accepted
    gray_rgb = np.repeat(gradient_8bit()[:, :, None], 3, axis=2)
    assert post(f"{base}/v1/view", png_bytes(gray_rgb), "image/png").status_code == 200


MALFORMED = (
    "MR_truncated.dcm",  # pixel data shorter than the header says
    "rtplan_truncated.dcm",
    "badVR.dcm",
    "meta_missing_tsyntax.dcm",
    "no_meta.dcm",  # no preamble / file meta
    "ExplVR_BigEndNoMeta.dcm",
    "no_meta_group_length.dcm",
    "JPEG2000-embedded-sequence-delimiter.dcm",  # corrupt codestream
    "reportsi_with_empty_number_tags.dcm",
    "test-SR.dcm",
    "waveform_ecg.dcm",
    "examples_palette.dcm",
    "GDCMJ2K_TextGBR.dcm",
    "UN_sequence.dcm",
    "empty_charset_LEI.dcm",
)


def test_pydicoms_malformed_files_get_4xx_and_the_service_survives(base):
    from pydicom.data import get_testdata_file

    for name in MALFORMED:
        response = post(f"{base}/v1/view", Path(get_testdata_file(name)).read_bytes())
        assert 400 <= response.status_code < 500, (name, response.text)
        body = assert_refused(response, response.status_code)
        assert "SOP instance" not in body["message"], body  # no identifiers echoed back
    assert post(f"{base}/v1/view", dicom_bytes()).status_code == 200


def test_overload_answers_503_quickly(base):
    """view_30 takes one request and queues one; the rest are refused at once, not queued."""
    data = dicom_bytes()

    def call(_):
        started = time.perf_counter()
        response = post(f"{base}/v1/view?granularity=30&explain=1", data)
        return response.status_code, time.perf_counter() - started

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(16)))
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    assert max(t for s, t in results if s == 503) < 10
    assert post(f"{base}/v1/view?granularity=30", data).status_code == 200


# ---------------------------------------------------------------- access


def test_api_key_is_required_on_prediction_routes_when_set(served):
    secured = served["base"] + "/secured"
    data = dicom_bytes()
    for route in ("/v1/view", "/v1/bone-age", "/v1/fracture"):
        response = post(secured + route, data)
        assert_refused(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
    assert_refused(post(secured + "/v1/view", data, headers={"Authorization": "Bearer wrong"}), 401)
    assert requests.get(secured + "/v1/models", timeout=30).status_code == 401
    ok = post(secured + "/v1/view", data, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and ok.json()["model"] == "view_7"
    assert requests.get(secured + "/healthz", timeout=30).status_code == 200
    assert requests.get(secured + "/", timeout=30).status_code == 200
    # the open app needs no key
    assert post(served["base"] + "/v1/view", data).status_code == 200


def test_cors_is_off_by_default_and_on_when_configured(served):
    origin = {"Origin": "http://viewer.example"}
    assert (
        "access-control-allow-origin" not in requests.get(f"{served['base']}/healthz", headers=origin).headers
    )
    secured = requests.get(f"{served['base']}/secured/healthz", headers=origin, timeout=30)
    assert secured.headers["access-control-allow-origin"] == "http://viewer.example"


def test_uploads_are_kept_only_when_configured_and_never_under_identifying_names(served):
    data = dicom_bytes(name=f"Doe^{SECRET}")
    before = set(served["uploads"].rglob("*"))
    response = requests.post(
        f"{served['base']}/secured/v1/view",
        files={"file": (f"{SECRET}.dcm", data, "application/dicom")},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert response.status_code == 200
    kept = [p for p in set(served["uploads"].rglob("*.dcm")) - before]
    assert len(kept) == 1 and kept[0].read_bytes() == data
    assert len(kept[0].stem) == 32 and SECRET not in str(kept[0])
    # the open app has no upload_dir: nothing is written for its requests
    post(f"{served['base']}/v1/view", data)
    assert set(served["uploads"].rglob("*.dcm")) - before == set(kept)


def test_logs_hold_neither_the_api_key_nor_patient_identifiers(served, ray_session):
    # Serve's access line ("<X-Request-ID> -- POST <route> <status>") is the last a replica logs for a
    # request: once both are in the replica logs, whatever handling the requests logged is there too.
    request_ids = [uuid.uuid4().hex, uuid.uuid4().hex]
    requests.post(
        f"{served['base']}/v1/view",
        files={"file": (f"{SECRET}.dcm", dicom_bytes(name=f"Doe^{SECRET}"), "application/dicom")},
        headers={"X-Request-ID": request_ids[0]},
        timeout=60,
    )
    post(
        f"{served['base']}/secured/v1/view",
        b"junk",
        headers={"Authorization": f"Bearer {API_KEY}-x", "X-Request-ID": request_ids[1]},
    )
    logs = Path(ray_session._private.worker._global_node.get_logs_dir_path())

    def replicas_logged_both() -> bool:
        text = b"".join(path.read_bytes() for path in logs.rglob("replica_*.log"))
        return all(f"{rid} -- POST ".encode() in text for rid in request_ids)

    wait_until(replicas_logged_both, 30, f"no replica logged the requests {request_ids}")
    for path in logs.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            text = path.read_bytes()
            assert API_KEY.encode() not in text, path
            assert SECRET.encode() not in text, path


# ---------------------------------------------------------------- metrics


def test_prometheus_metrics_count_requests_batches_and_load_time(base, ray_session):
    data = dicom_bytes()
    assert post(f"{base}/v1/view", b"{}", "application/json").status_code == 415
    with ThreadPoolExecutor(8) as pool:  # concurrent requests form batches of more than one
        assert {r.status_code for r in pool.map(lambda _: post(f"{base}/v1/fracture", data), range(16))} == {
            200
        }
    port = ray_session.nodes()[0]["MetricsExportPort"]
    wanted = (
        "ray_pedx_serve_requests_total{",
        "ray_pedx_serve_request_latency_seconds_bucket{",
        "ray_pedx_serve_batch_size_bucket{",
        "ray_pedx_serve_batch_latency_seconds_bucket{",
        "ray_pedx_serve_model_load_seconds_count{",
    )
    deadline = time.monotonic() + 60
    while True:  # Ray exports metrics every few seconds
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        lines = [line for line in text.splitlines() if line.startswith("ray_pedx_serve")]
        present = [w for w in wanted if any(line.startswith(w) for line in lines)]
        batches, singles = _fracture_batches(lines)
        # Each replica exports on its own schedule: wait until the gateway's counters are in as well.
        counted = [
            any(f'endpoint="{endpoint}"' in line and f'status="{status}"' in line for line in lines)
            for endpoint, status in (("/v1/fracture", 200), ("/v1/view", 415))
        ]
        if len(present) == len(wanted) and batches > singles and all(counted):
            break
        assert time.monotonic() < deadline, (
            f"after 60 s only {present}; fracture batches {batches}, {singles} of 1; "
            f"fracture 200 / view 415 counted: {counted}"
        )
        time.sleep(2)
    loads = [line for line in lines if line.startswith("ray_pedx_serve_model_load_seconds_count{")]
    assert {
        m for m in ("view_7", "view_30", "bone_age", "fracture") if any(f'model="{m}"' in x for x in loads)
    } == {
        "view_7",
        "view_30",
        "bone_age",
        "fracture",
    }


def _fracture_batches(lines: list[str]) -> tuple[float, float]:
    """(batches the fracture model ran, those of one image) from the exact bucket counts."""

    def value(prefix: str, extra: str = "") -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in lines
            if line.startswith(prefix) and 'model="fracture"' in line and extra in line
        )

    return value("ray_pedx_serve_batch_size_count{"), value("ray_pedx_serve_batch_size_bucket{", 'le="1.5"')


# ---------------------------------------------------------------- the web page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (scripts/setup.sh installs them)",
)
def test_web_page_shows_prediction_heat_map_gate_verdict_and_interval(base, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never try a download
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1100,800",
    ):
        options.add_argument(flag)
    image = tmp_path / "hand.png"
    image.write_bytes(png_bytes(gradient_8bit((200, 160))))
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(base + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#task option")) == 4)
        Select(driver.find_element(By.ID, "task")).select_by_value("view_7")
        driver.find_element(By.ID, "file").send_keys(str(image))
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text == "Done.")
        prediction = driver.find_element(By.ID, "prediction").text
        assert any(prediction.startswith(c) for c in VIEW_CLASSES), prediction
        overlay = driver.find_element(By.ID, "overlay")
        assert driver.execute_script("return arguments[0].naturalWidth", overlay) == 32
        shot = cv2.imdecode(np.frombuffer(driver.get_screenshot_as_png(), np.uint8), cv2.IMREAD_COLOR)
        (tmp_path / "page.png").write_bytes(driver.get_screenshot_as_png())
        rect = overlay.rect
        scale = shot.shape[1] / driver.execute_script("return window.innerWidth")
        region = shot[
            int(rect["y"] * scale) : int((rect["y"] + rect["height"]) * scale),
            int(rect["x"] * scale) : int((rect["x"] + rect["width"]) * scale),
        ]
        assert region.size and region.std() > 5, "the heat map is not visible"
        assert shot.std() > 10, "the page rendered blank"
        # bone age without sex on a PNG: the page shows the service's message
        Select(driver.find_element(By.ID, "task")).select_by_value("bone_age")
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("422"))
        assert "sex" in driver.find_element(By.ID, "status").text
        # with the sex: the estimate ± its spread, the interval and the (switched off) gate
        Select(driver.find_element(By.ID, "sex")).select_by_value("M")
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text == "Done.")
        assert " ± " in driver.find_element(By.ID, "prediction").text
        assert "over 4 test-time views" in driver.find_element(By.ID, "interval").text
        assert "not applied: the gate is off" in driver.find_element(By.ID, "gate-verdict").text
        # the gated app's page (relative URLs): a dark image is refused, a bright one passes
        driver.get(base + "/gated/")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#task option")) == 3)
        Select(driver.find_element(By.ID, "task")).select_by_value("fracture")
        for bright, status, verdict in ((False, "422", "refused: Chest"), (True, "Done.", "passed: Upper")):
            upload = tmp_path / f"{'bright' if bright else 'dark'}.png"
            upload.write_bytes(framed(bright))
            driver.find_element(By.ID, "file").send_keys(str(upload))
            driver.find_element(By.ID, "submit").click()
            wait.until(lambda d, s=status: d.find_element(By.ID, "status").text.startswith(s))
            assert driver.find_element(By.ID, "gate-verdict").text.startswith(f"view gate {verdict}")
    finally:
        driver.quit()


def test_checkpoints_on_object_storage_are_inspected_and_loaded(tmp_path, checkpoints, s3_bucket):
    from ingest import storage

    remote = f"{s3_bucket}/{tmp_path.name}"
    # The view model's config.json names a shard set on object storage too (its preprocessing).
    storage.write_json_atomic(f"{remote}/shards/manifest.json", {"preprocessing": SHARD_PARAMS.to_dict()})
    view_config = json.loads((checkpoints["view_7"] / "config.json").read_text())
    storage.copy_tree(checkpoints["view_7"], f"{remote}/view_7/best")
    view_config["shards"] = f"{remote}/shards"
    storage.write_json_atomic(f"{remote}/view_7/best/config.json", view_config)
    storage.copy_tree(checkpoints["bone_age"], f"{remote}/bone_age/best")

    assert resolve_checkpoint(f"{remote}/view_7/best/", "view_7") == f"{remote}/view_7/best"
    with pytest.raises(SettingsError, match="holds no files"):
        resolve_checkpoint(f"{remote}/missing", "view_7")
    with pytest.raises(CheckpointError, match=r"s3://.*missing model\.pt"):
        inspect_checkpoint("view_7", f"{remote}/shards")
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    for task in ("view_7", "bone_age"):
        spec = inspect_checkpoint(task, f"{remote}/{task}/best")
        assert spec.checkpoint == f"{remote}/{task}/best"
        local = Predictor(inspect_checkpoint(task, checkpoints[task]))
        sex = np.array([1.0, 0.0, 1.0])
        assert Predictor(spec).predict(images, sex) == local.predict(images, sex)
    recipe = inspect_checkpoint("view_7", f"{remote}/view_7/best").recipe
    assert recipe.source == f"{remote}/shards/manifest.json"
