"""Both JSON APIs fuzzed from their own OpenAPI schemas with schemathesis, through uvicorn.

Every operation of `/api/v1/openapi.json` and `/v1/openapi.json` gets generated requests,
valid and invalid ones, sent with a maintainer's token to a real server on 127.0.0.1. No
response may be a 5xx, and a response whose status the schema documents must match the schema.
Half of the requests name the task, version, dataset and job that exist, so the fuzzer reaches
the code behind the 404s too.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from django.conf import settings

from adapters_app.models import AdapterVersion
from tests.integration.test_asgi_server import asgi_server  # noqa: F401 - the uvicorn fixture
from tests.unit.test_serving_adapters import save_lora_adapter

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

# Generated requests per operation and generation mode (valid, invalid): 30 per operation and
# about 540 for the 18 operations, 20 to 60 s on 2 shared cores (90 s is this test's budget).
EXAMPLES_PER_OPERATION = 15
# Longer completions would only cost time: the checks look at statuses and shapes, not text.
MAX_FUZZ_TOKENS = 4


@pytest.fixture
def known_objects(tiny_base_dir: Path, tmp_path: Path, user) -> dict[str, object]:
    """A task with a dataset, an active ready version and a finished job, for the path parameters."""
    from adapters_app.inference import get_engine, reset_engine
    from adapters_app.roles import SYSTEM
    from adapters_app.serving.adapters import ADAPTER_WEIGHTS_NAME, file_sha256
    from adapters_app.services import task_create, version_activate, version_allocate
    from training_app.dataset_services import dataset_upload
    from training_app.models import TrainingJob

    task = task_create(slug="poetry", name="Poetry", user=SYSTEM)
    rows = [json.dumps({"prompt": f"Say {index}", "completion": f"number {index}"}) for index in range(20)]
    dataset = dataset_upload(
        task, io.BytesIO(("\n".join(rows) + "\n").encode()), original_name="digits.jsonl", user=SYSTEM
    ).dataset

    version = version_allocate(task, parent=None, hyperparameters={"rank": 4})
    target = Path(settings.LORAWEB_ADAPTER_ROOT) / task.slug / f"v{version.number}"
    save_lora_adapter(tiny_base_dir, target, rank=4, target_modules=["c_attn"], seed=7)
    version.status = AdapterVersion.Status.READY
    version.storage_path = str(target.relative_to(settings.LORAWEB_ADAPTER_ROOT))
    version.sha256 = file_sha256(target / ADAPTER_WEIGHTS_NAME)
    version.base_weight_hash = get_engine().base.weight_hash
    reset_engine()  # the server process serves; this one only needed the base's hash
    version.save()
    version_activate(version, reason="fuzzing", user=SYSTEM)

    # A finished job, so that cancelling it is a refusal and never stops real training.
    job = TrainingJob.objects.create(task=task, version=version, state=TrainingJob.State.SUCCEEDED)
    job.datasets.add(dataset)
    return {"slug": task.slug, "number": version.number, "dataset_id": dataset.pk, "job_id": job.pk}


def _adjust_body(case, known: dict[str, object], use_known: bool) -> None:
    """Cap a completion's tokens and, when `use_known`, name the known task and version in the body.

    Every other generated value stays as it is. Dataset ids in a training request stay random,
    so the fuzzer never queues a real training job.
    """
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > MAX_FUZZ_TOKENS:
        body["max_tokens"] = MAX_FUZZ_TOKENS
    if use_known:
        for key, value in (("model", known["slug"]), ("version", known["number"])):
            if key in body:
                body[key] = value


def _fuzz_schema(port: int, token: str, schema_path: str, known: dict[str, object], log_path: Path) -> list[str]:
    """Send generated requests to every operation of one schema; return the failures found."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import response_schema_conformance

    headers = {"Authorization": f"Bearer {token}"}
    base_url = f"http://127.0.0.1:{port}"
    schema = schemathesis.openapi.from_url(f"{base_url}{schema_path}", headers=headers)
    failures: list[str] = []

    # Deletions go last: deleting the known task first would turn every later request into a 404.
    operations = sorted((result.ok() for result in schema.get_all_operations()), key=lambda op: op.method == "delete")
    for operation in operations:
        names = {parameter.name for parameter in operation.path_parameters}
        fixed = {name: value for name, value in known.items() if name in names}
        strategy = strategies.one_of(
            *(
                operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
                for path_parameters in ({}, fixed)
            )
        )

        @hypothesis_settings(
            max_examples=EXAMPLES_PER_OPERATION * 2,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy, use_known=strategies.booleans())
        def send(case, use_known: bool) -> None:
            _adjust_body(case, known, use_known)
            case.call_and_validate(
                base_url=base_url,
                headers=headers,
                checks=[not_a_server_error, response_schema_conformance],
                timeout=60,
            )

        try:
            send()
        # schemathesis raises its check failures as a BaseExceptionGroup, which `Exception` misses.
        except (Exception, BaseExceptionGroup) as error:  # noqa: BLE001 - all operations run, then all failures are reported
            failures.append(f"{operation.label}: {error}")

    if failures:
        failures.append("server log tail:\n" + log_path.read_text(errors="replace")[-4000:])
    return failures


def test_api_schema_fuzz(asgi_server, known_objects, user, tmp_path):  # noqa: F811 - fixture imported above
    from adapters_app.services import api_token_create

    _token, secret = api_token_create(user, name="fuzz", user=user)
    log_path = tmp_path / "uvicorn.log"

    failures = _fuzz_schema(asgi_server, secret, "/api/v1/openapi.json", known_objects, log_path)
    failures += _fuzz_schema(asgi_server, secret, "/v1/openapi.json", known_objects, log_path)

    assert not failures, "\n\n".join(failures)
