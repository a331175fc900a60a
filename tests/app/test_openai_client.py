"""The official `openai` package as a client of /v1/ on Django's live test server."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def openai_client(live_server, token):
    from openai import OpenAI

    return OpenAI(base_url=f"{live_server.url}/v1", api_key=token, max_retries=0, timeout=60)


def test_openai_completion(openai_client, task):
    completion = openai_client.completions.create(model="poetry", prompt="Roses are red", max_tokens=5, temperature=0)

    assert completion.object == "text_completion"
    assert completion.model == "poetry"
    assert completion.usage.completion_tokens <= 5
    assert completion.choices[0].finish_reason in {"length", "stop"}


# The live test server is WSGI, so Django collects the async stream before sending it. The
# ASGI server streams it piece by piece (tests/integration/test_asgi_server.py).
@pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume asynchronous iterators")
def test_openai_stream_matches_plain(openai_client, task):
    plain = openai_client.completions.create(model="poetry", prompt="Roses are red", max_tokens=6, temperature=0)

    chunks = list(
        openai_client.completions.create(model="poetry", prompt="Roses are red", max_tokens=6, temperature=0, stream=True)
    )

    assert "".join(chunk.choices[0].text for chunk in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_openai_models_and_bad_token(openai_client, live_server, task):
    from openai import AuthenticationError, OpenAI

    assert [model.id for model in openai_client.models.list()] == ["poetry"]
    stranger = OpenAI(base_url=f"{live_server.url}/v1", api_key="lw_wrong", max_retries=0)
    with pytest.raises(AuthenticationError):
        stranger.models.list()
