"""The PedX-Ray Ray Serve application: view, bone-age and fracture prediction over HTTP.

``serve run deploy.app:app`` (settings from deploy/config.yaml or $PEDX_SERVE_CONFIG, overridden by
``key=value`` arguments, e.g. ``view_7=runs/NAME/best``), or ``serve deploy deploy/config.yaml`` on a
cluster. ``app`` is a Serve application builder; `build_app` is the same from Python.

Deployments: one ``ModelServer`` per checkpoint (named ``view_7``, ``view_30``, ``view_68``, ``bone_age``,
``fracture``), each batching requests with ``@serve.batch``, and the ``Gateway`` ingress (FastAPI): it
reads and checks the upload, preprocesses it exactly as training did (`deploy.inputs`) in a thread, and
awaits the model's batched prediction. Routes:

- ``POST /v1/view?granularity=7|30|68&top_k=3``, ``POST /v1/bone-age?sex=M|F``, ``POST /v1/fracture``:
  body ``application/dicom``, ``image/png``, ``image/jpeg`` or multipart (part ``file``, field ``sex``);
  ``explain=1`` adds the Grad-CAM overlay (base64 PNG in JSON, or the PNG itself with ``Accept: image/png``);
- ``GET /healthz``, ``GET /v1/models`` (checkpoints, configs, metrics, preprocessing),
  ``GET /openapi.json``, and the upload page at ``GET /``.

``/v1/bone-age`` and ``/v1/fracture`` first pass the view gate (``deploy.gate``: the finest served view
model must see the task's views, else 422 ``wrong_view``; ``gate=off`` skips it and the answer says so).
Bone age is the mean ± SD over ``bone_age_tta`` test-time views, declined (422 ``low_confidence``)
above ``bone_age_max_sd_months``. Checkpoints' ``calibration.json`` / ``recalibration.json`` apply.

Refused requests get a 4xx JSON ``{"error": code, "message": ...}`` (and what the gate or the spread
check saw); an unexpected failure gets a 500
with a request id and no stack trace. With an API key configured (the variable named by
``api_key_env``), prediction routes and /v1/models need ``Authorization: Bearer KEY``; only the key's
SHA-256 travels to the replicas and it is never logged. Overload: each deployment's
``max_queued_requests`` makes Serve answer 503 at once instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.serve import Application

from deploy.gate import accepted_classes, check_gate_views, gate_verdict
from deploy.inputs import (
    FEMALE,
    Decoded,
    InputError,
    Limits,
    Upload,
    check_length,
    decode,
    parse_body,
    parse_sex,
    prepare,
    too_large,
)
from deploy.metrics import GatewayMetrics, ModelMetrics
from deploy.models import ModelSpec, Predictor, encode_overlay, inspect_checkpoint
from deploy.settings import VIEW_MODELS, ServeSettings, SettingsError, resolve_checkpoint, resolve_settings
from ingest.dataset.taxonomy import load_taxonomy
from ingest.files import write_atomic
from ingest.imaging.jpeg2000 import set_decoder_threads

log = logging.getLogger("ray.serve")
PAGE = Path(__file__).with_name("static") / "index.html"
PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'"
)
UPLOAD_BODY = {
    "required": True,
    "description": "A radiograph: DICOM Part 10, PNG or JPEG; or multipart/form-data with the file in "
    "part `file` (and optionally a `sex` field).",
    "content": {
        "application/dicom": {"schema": {"type": "string", "format": "binary"}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}, "sex": {"type": "string"}},
                "required": ["file"],
            }
        },
    },
}
SUFFIX = {"dicom": ".dcm", "png": ".png", "jpeg": ".jpg"}
# Module level: FastAPI resolves the routes' (string) annotations in this module's namespace.
BEARER = HTTPBearer(auto_error=False, description="the API key, when the service has one")


def resolve_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device=cuda but this replica sees no GPU; give model replicas a GPU (num_gpus) "
            "or use device=auto"
        )
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def auto_batch_wait(single_forward_s: float) -> float:
    """The batch wait for ``batch_wait_timeout_s: auto``: twice a warm single-image forward, 5–250 ms.

    Waiting costs a lone request at most about two forwards' time, while a fuller batch costs far less
    per image than that many single forwards. A fixed short wait left CPU batches at 1–3 images: a
    forward there takes longer than requests take to arrive, the replica's threads then crowd out the
    proxy and gateway, and the batches stay small (bench/serve_load.py, docs/benchmarks.md).
    """
    return min(0.25, max(0.005, 2 * single_forward_s))


@serve.deployment(max_ongoing_requests=32, max_queued_requests=64, health_check_period_s=10)
class ModelServer:
    """One checkpoint; ``predict`` calls from all gateway replicas are batched dynamically."""

    def __init__(self, spec: ModelSpec, settings: ServeSettings) -> None:
        device = resolve_device(settings.device)
        on_cuda = device == "cuda"
        self.predictor = Predictor(
            spec,
            device=device,
            bf16=on_cuda and settings.bf16,
            channels_last=on_cuda and settings.channels_last,
            tta=settings.bone_age_tta,
        )
        self.metrics = ModelMetrics(spec.name)
        self.metrics.loaded(self.predictor.load_seconds)
        self.predict_batch.set_max_batch_size(settings.max_batch_size)
        wait = settings.batch_wait_timeout_s
        if wait == "auto":
            wait = auto_batch_wait(self.predictor.time_single_forward())
        self.predict_batch.set_batch_wait_timeout_s(wait)
        self.max_batch_size, self.batch_wait_timeout_s = settings.max_batch_size, wait
        log.info(
            "%s: loaded %s on %s in %.1f s; batches of up to %d, waiting up to %.0f ms",
            spec.name,
            spec.checkpoint,
            device,
            self.predictor.load_seconds,
            settings.max_batch_size,
            1000 * wait,
        )

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def predict_batch(self, items: list[tuple[np.ndarray, float]]) -> list[dict]:
        images = np.stack([image for image, _ in items])
        sex = np.array([s for _, s in items], np.float32)
        started = time.perf_counter()
        # In a thread, so the replica's event loop keeps collecting the next batch meanwhile.
        results = await asyncio.to_thread(self.predictor.predict, images, sex)
        self.metrics.batch(len(items), time.perf_counter() - started)
        return results

    async def predict(self, image: np.ndarray, sex: float = FEMALE) -> dict:
        return await self.predict_batch((image, sex))

    async def explain(self, image: np.ndarray, sex: float = FEMALE) -> tuple[dict, bytes]:
        result, bgr = await asyncio.to_thread(self.predictor.explain, image, sex)
        return result, encode_overlay(bgr)

    def info(self) -> dict:
        return self.predictor.info() | {
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
        }


@serve.deployment(max_ongoing_requests=64, max_queued_requests=128)
@serve.ingress()
class Gateway:
    """The HTTP layer: auth, upload checks, preprocessing, routing to the model deployments."""

    def __init__(
        self, settings: ServeSettings, specs: dict[str, ModelSpec], key_digest: str | None, **models: Any
    ) -> None:
        self.settings, self.specs, self.models = settings, specs, models
        self.key_digest = key_digest
        self.limits = Limits(settings.max_upload_bytes, settings.max_pixels)
        self.metrics = GatewayMetrics()
        self.page = PAGE.read_text()
        self.gate_model, self.accepted = gate_plan(settings, specs)
        set_decoder_threads(settings.decoder_threads or os.cpu_count() or 1)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    # -- request handling, shared by the routes --
    async def read_upload(self, request: Request) -> Upload:
        check_length(request.headers.get("content-length"), self.limits)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.limits.max_upload_bytes:  # chunked uploads have no Content-Length
                raise too_large(None, self.limits)
            chunks.append(chunk)
        upload = parse_body(b"".join(chunks), request.headers.get("content-type"))
        if self.settings.upload_dir:
            await asyncio.to_thread(self.keep_upload, upload)
        return upload

    def keep_upload(self, upload: Upload) -> None:
        """Write the upload under a random name (never anything from the request or the header)."""
        folder = Path(self.settings.upload_dir) / time.strftime("%Y-%m-%d")
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / f"{uuid.uuid4().hex}{SUFFIX[upload.kind]}", upload.data)

    async def model_input(self, upload: Upload, name: str) -> np.ndarray:
        decoded = await asyncio.to_thread(decode, upload, self.limits)
        return await asyncio.to_thread(prepare, decoded, self.specs[name].recipe)

    async def run(self, name: str, image: np.ndarray, sex: float, explain: bool) -> tuple[dict, bytes | None]:
        if explain:
            return await self.models[name].explain.remote(image, sex)
        return await self.models[name].predict.remote(image, sex), None

    async def check_view(self, decoded: Decoded, task: str, requested: bool) -> dict:
        """The view gate's verdict for an upload to ``task``; raises 422 ``wrong_view`` when it fails."""
        if not requested or not self.settings.gate or self.gate_model is None:
            reason = (
                "gate=off in the request"
                if not requested
                else "the gate is off in the settings"
                if not self.settings.gate
                else "no view model is served to check the view"
            )
            self.metrics.gate(task, "bypassed" if not requested else "unavailable")
            return {"applied": False, "reason": reason}
        image = await asyncio.to_thread(prepare, decoded, self.specs[self.gate_model].recipe)
        result = await self.models[self.gate_model].predict.remote(image, FEMALE)
        probabilities = dict(zip(self.specs[self.gate_model].classes, result["probabilities"], strict=True))
        verdict = gate_verdict(
            probabilities, self.accepted[task], self.settings.gate_min_probability, self.gate_model
        )
        self.metrics.gate(task, "accepted" if verdict.passed else "refused")
        if not verdict.passed:
            raise InputError(
                422,
                "wrong_view",
                f"{task} reads {', '.join(verdict.accepted)} radiographs; the view model "
                f"({self.gate_model}) sees {verdict.view} (p={verdict.probability:.2f}) and those views at "
                f"p={verdict.accepted_probability:.2f} < {self.settings.gate_min_probability}; "
                "pass gate=off to predict anyway (research use)",
                {k: v for k, v in verdict.to_dict().items() if k not in ("applied", "passed")},
            )
        return verdict.to_dict()

    async def gated_run(
        self, decoded: Decoded, task: str, sex: float, explain: bool, requested: bool
    ) -> tuple[dict, dict, bytes | None]:
        """(the gate's verdict, the task model's result, the overlay or None).

        Without ``explain`` the view model and the task model run at once, so the gate adds its work but
        hardly its latency; a refusal discards the task model's answer. Grad-CAM, the costly part of an
        explanation, runs only once the gate has passed."""
        image = await asyncio.to_thread(prepare, decoded, self.specs[task].recipe)
        if explain:
            verdict = await self.check_view(decoded, task, requested)
            return verdict, *await self.run(task, image, sex, True)
        verdict, answer = await asyncio.gather(
            self.check_view(decoded, task, requested),
            self.run(task, image, sex, False),
            return_exceptions=True,
        )
        for outcome in (verdict, answer):  # the gate's refusal first
            if isinstance(outcome, BaseException):
                raise outcome
        return verdict, *answer

    def model_for(self, name: str, what: str) -> str:
        if name not in self.models:
            served = ", ".join(self.models) or "none"
            raise InputError(404, "model_not_loaded", f"no {what} model is served here (served: {served})")
        return name


def gate_plan(settings: ServeSettings, specs: dict[str, ModelSpec]) -> tuple[str | None, dict]:
    """(the gate's view model, each gated task's accepted labels at its granularity).

    The finest served view model is the gate. Its class names must be the taxonomy's, or no upload
    could ever pass: that is a settings error, not a service that refuses everything."""
    views = [name for name in ("view_68", "view_30", "view_7") if name in specs]
    if not settings.gate or not views:
        return None, {}
    taxonomy = load_taxonomy()
    try:
        table = check_gate_views(settings.gate_views, taxonomy)
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc
    model = views[0]
    accepted = {task: accepted_classes(views, VIEW_MODELS[model], taxonomy) for task, views in table.items()}
    classes = set(specs[model].classes)
    unknown = sorted({label for labels in accepted.values() for label in labels} - classes)
    if unknown:
        raise SettingsError(
            f"gate: the view model {model} ({specs[model].checkpoint}) has no class {unknown}; its classes "
            f"are not the taxonomy's {VIEW_MODELS[model]}-class views. Serve a PedX-Ray view model, or set "
            "gate: false"
        )
    return model, accepted


def _answer(body: dict, overlay: bytes | None, accept: str) -> Response:
    if overlay is not None and "image/png" in accept:
        return Response(overlay, media_type="image/png", headers={"X-PedX-Result": json.dumps(body)})
    if overlay is not None:
        body["overlay_png"] = base64.b64encode(overlay).decode()
    return JSONResponse(body)


def build_api(gw: Gateway) -> FastAPI:
    api = FastAPI(
        title="PedX-Ray",
        version="1",
        description="Pediatric radiograph view, bone age and fracture prediction (PedXnet).",
        docs_url=None,  # Swagger UI loads its assets from a CDN; the spec is at /openapi.json
        redoc_url=None,
    )
    if gw.settings.cors_origins:
        api.add_middleware(
            CORSMiddleware,
            allow_origins=list(gw.settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @api.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as exc:  # a bug, not bad input: log it here, give the client no internals
            request_id = uuid.uuid4().hex[:12]
            log.error("request %s failed: %s: %s", request_id, type(exc).__name__, exc, exc_info=True)
            response = JSONResponse(
                {"error": "internal_error", "message": f"internal error (request id {request_id})"}, 500
            )
        route = request.scope.get("route")
        gw.metrics.record(
            getattr(route, "path", "unmatched"), response.status_code, time.perf_counter() - started
        )
        return response

    @api.exception_handler(InputError)
    async def refused(_: Request, exc: InputError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        body = {"error": exc.code, "message": exc.message} | exc.details
        return JSONResponse(body, exc.status, headers=headers)

    def authorize(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if gw.key_digest is None:
            return
        given = hashlib.sha256(credentials.credentials.encode()).hexdigest() if credentials else ""
        if not hmac.compare_digest(given, gw.key_digest):
            raise InputError(401, "unauthorized", "this service needs an API key: Authorization: Bearer KEY")

    predict_route = {"dependencies": [Depends(authorize)], "openapi_extra": {"requestBody": UPLOAD_BODY}}
    explain_query = Query(False, description="add the Grad-CAM overlay (PNG) of the prediction")
    gate_query = Query(
        "on",
        pattern="^(on|off)$",
        description="off: skip the view gate (research use; the answer records it)",
    )

    @api.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(gw.page, headers={"Content-Security-Policy": PAGE_POLICY})

    @api.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "models": list(gw.models)}

    @api.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        infos = await asyncio.gather(*(handle.info.remote() for handle in gw.models.values()))
        return {"models": infos}

    @api.post("/v1/view", **predict_route)
    async def view(
        request: Request,
        granularity: int | None = Query(None, description="7, 30 or 68 (default: the coarsest served)"),
        top_k: int = Query(3, ge=1, le=68),
        explain: bool = explain_query,
    ) -> Response:
        served = sorted(VIEW_MODELS[n] for n in gw.models if n in VIEW_MODELS)
        granularity = granularity or (served[0] if served else 7)
        name = gw.model_for(f"view_{granularity}", f"{granularity}-class view")
        upload = await gw.read_upload(request)
        result, overlay = await gw.run(name, await gw.model_input(upload, name), FEMALE, explain)
        classes = gw.specs[name].classes
        ranked = sorted(zip(classes, result["probabilities"], strict=True), key=lambda c: -c[1])
        body = {
            "model": name,
            "task": "view",
            "granularity": granularity,
            "label": result["label"],
            "probability": ranked[0][1],
            "top_k": [{"label": label, "probability": p} for label, p in ranked[:top_k]],
            "probabilities": dict(zip(classes, result["probabilities"], strict=True)),
        }
        return _answer(body, overlay, request.headers.get("accept", ""))

    @api.post("/v1/bone-age", **predict_route)
    async def bone_age(
        request: Request,
        sex: str | None = Query(None, description="M or F; default: the DICOM header's PatientSex"),
        explain: bool = explain_query,
        gate: str = gate_query,
    ) -> Response:
        name = gw.model_for("bone_age", "bone age")
        upload = await gw.read_upload(request)
        given = parse_sex(upload.fields.get("sex") or sex)
        decoded = await asyncio.to_thread(decode, upload, gw.limits)
        if given is None and decoded.header_sex is None:
            raise InputError(
                422,
                "sex_required",
                "bone age needs the patient's sex: pass sex=M or sex=F (query parameter or form field); "
                + (
                    "the DICOM header has no PatientSex M/F"
                    if decoded.kind == "dicom"
                    else "an image has none"
                ),
            )
        value = given if given is not None else decoded.header_sex
        verdict, result, overlay = await gw.gated_run(decoded, name, value, explain, gate == "on")
        months, sd = result["bone_age_months"], result["bone_age_sd_months"]
        limit = gw.settings.bone_age_max_sd_months
        if limit and sd is not None and sd > limit:
            gw.metrics.gate("bone_age", "low_confidence")
            raise InputError(
                422,
                "low_confidence",
                f"the model is unsure of this image: bone age {months:.0f} ± {sd:.1f} months over "
                f"{result['tta_views']} augmented views, above the service's limit of {limit} months",
                {"bone_age_months": months, "bone_age_sd_months": sd, "max_sd_months": limit},
            )
        body = {
            "model": name,
            "task": "bone_age",
            "bone_age_months": months,
            "bone_age_years": months / 12,
            "bone_age_sd_months": sd,
            "tta_views": result["tta_views"],
            "sex": "F" if value == FEMALE else "M",
            "sex_source": "request" if given is not None else "dicom",
            "gate": verdict,
        }
        return _answer(body, overlay, request.headers.get("accept", ""))

    @api.post("/v1/fracture", **predict_route)
    async def fracture(request: Request, explain: bool = explain_query, gate: str = gate_query) -> Response:
        name = gw.model_for("fracture", "fracture")
        upload = await gw.read_upload(request)
        decoded = await asyncio.to_thread(decode, upload, gw.limits)
        verdict, result, overlay = await gw.gated_run(decoded, name, FEMALE, explain, gate == "on")
        body = {
            "model": name,
            "task": "fracture",
            "probability": result["probability"],
            "label": "fracture" if result["fracture"] else "no_fracture",
            "threshold": result["threshold"],
            "gate": verdict,
        }
        return _answer(body, overlay, request.headers.get("accept", ""))

    return api


def _gpus_per_model(settings: ServeSettings, n_models: int) -> float:
    """``num_gpus: auto``: share the GPUs visible where the app is built between the models."""
    if settings.num_gpus != "auto":
        return float(settings.num_gpus)
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else torch.cuda.device_count()
    return 0.0 if not gpus else min(1.0, int(100 * gpus / n_models) / 100)


def build_app(settings: ServeSettings, deployment_options: dict[str, dict] | None = None) -> Application:
    """The application for ``settings``; checkpoints are validated here, before any replica starts.

    ``deployment_options`` maps a deployment name (``Gateway``, ``view_7``, ...) to Serve options that
    override the defaults (as a Serve config file's ``deployments:`` section does).
    """
    specs = {
        name: inspect_checkpoint(
            name,
            resolve_checkpoint(path, name),
            view_preprocessing=settings.view_preprocessing,
            fracture_threshold=settings.fracture_threshold,
        )
        for name, path in settings.models().items()
    }
    gate_plan(settings, specs)  # a gate that could never pass stops the app here
    options = deployment_options or {}
    gpus = _gpus_per_model(settings, len(specs))
    models = {}
    for name, spec in specs.items():
        defaults = {
            "name": name,
            # one batch running while the next one fills; more would only wait in the replica
            "max_ongoing_requests": max(2 * settings.max_batch_size, 4),
            "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": gpus},
        }
        models[name] = ModelServer.options(**(defaults | options.get(name, {}))).bind(spec, settings)
    key = os.environ.get(settings.api_key_env, "")
    digest = hashlib.sha256(key.encode()).hexdigest() if key else None
    return Gateway.options(**options.get("Gateway", {})).bind(settings, specs, digest, **models)


def app(args: dict[str, str] | None = None) -> Application:
    """Serve application builder: ``serve run deploy.app:app [config=FILE] [setting=value ...]``."""
    return build_app(resolve_settings(args))
