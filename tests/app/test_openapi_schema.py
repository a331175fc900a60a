"""Request bodies against the published OpenAPI schemas, as the schema fuzzer found them.

A body that matched a schema could still get a 400 (an empty slug, a blank activation reason, no
dataset ids, two prompts, a negative seed), so a client built from the schema could not know what
to send. Each rejected body here must also be invalid under the schema, and a valid neighbour must
pass both. One dataset id overflowed SQLite and returned 500.
"""

from __future__ import annotations

import jsonschema_rs
import pytest

pytestmark = pytest.mark.django_db

# Schema path, component, request path, rejected body, accepted body.
CASES = [
    ("/api/v1/openapi.json", "TaskIn", "/api/v1/tasks", {"slug": ""}, {"slug": "poetry-2"}),
    ("/api/v1/openapi.json", "TaskIn", "/api/v1/tasks", {"slug": "Poetry Two"}, {"slug": "poetry-two"}),
    ("/api/v1/openapi.json", "TaskIn", "/api/v1/tasks", {"slug": "a" * 65}, {"slug": "a" * 64}),
    ("/api/v1/openapi.json", "TaskIn", "/api/v1/tasks", {"slug": "prose", "name": "n" * 201}, {"slug": "prose"}),
    ("/api/v1/openapi.json", "ActivateIn", "/api/v1/tasks/poetry/activate", {"version": 1, "reason": "  "}, None),
    ("/api/v1/openapi.json", "TrainIn", "/api/v1/tasks/poetry/versions", {"dataset_ids": []}, None),
    ("/v1/openapi.json", "CompletionIn", "/v1/completions", {"model": "poetry", "prompt": ["a", "b"]}, None),
    ("/v1/openapi.json", "CompletionIn", "/v1/completions", {"model": "poetry", "prompt": []}, None),
    ("/v1/openapi.json", "CompletionIn", "/v1/completions", {"model": "poetry", "prompt": " "}, None),
    ("/v1/openapi.json", "CompletionIn", "/v1/completions", {"model": "poetry", "prompt": [""]}, None),
    ("/v1/openapi.json", "CompletionIn", "/v1/completions", {"model": "poetry", "prompt": "a", "seed": -1}, None),
]


def body_validator(api_client, schema_path: str, component: str):
    document = api_client.get(schema_path).json()
    return jsonschema_rs.validator_for(
        {"$ref": f"#/components/schemas/{component}", "components": document["components"]}
    )


@pytest.mark.parametrize(("schema_path", "component", "path", "rejected", "accepted"), CASES)
def test_schema_rejects_what_server_rejects(api_client, task, schema_path, component, path, rejected, accepted):
    from adapters_app.services import version_allocate

    version_allocate(task, parent=None, hyperparameters={})  # version 1 exists, so activation reaches the reason
    validator = body_validator(api_client, schema_path, component)

    response = api_client.post(path, rejected, content_type="application/json")

    assert response.status_code == 400, response.content
    assert not validator.is_valid(rejected), f"the schema accepts {rejected}, which the server rejects"
    if accepted is not None:
        assert validator.is_valid(accepted)
        assert api_client.post(path, accepted, content_type="application/json").status_code == 201


def test_train_with_huge_dataset_id_is_400(api_client, task):
    # Such an id overflowed SQLite's integer in the lookup and returned 500.
    huge = 2**64

    response = api_client.post(
        "/api/v1/tasks/poetry/versions", {"dataset_ids": [huge]}, content_type="application/json"
    )

    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == "unknown_dataset"
    assert str(huge) in response.json()["errors"][0]["message"]
