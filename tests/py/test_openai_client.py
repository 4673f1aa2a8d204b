"""The official `openai` Python client against `megabyte serve`, unchanged but for base_url.

Uses the server of test_playground.py (a tiny checkpoint): the client lists the model,
completes and streams with a seed, and gets OpenAI's exception for a bad request; the text
it returns is the server's own answer to the same request (whose bytes the Rust tests hold
equal to `megabyte generate`).
"""

import base64
import json
import urllib.request

import pytest

from test_playground import server  # noqa: F401 (the fixture)

openai = pytest.importorskip("openai", reason="the openai client is not installed: pip install openai")


def raw_completion(url, **request):
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(request).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.load(resp)["choices"][0]


def test_the_openai_client_works_unchanged(server):  # noqa: F811
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    models = [m.id for m in client.models.list()]
    assert models == ["playground-run"]
    request = dict(model=models[0], prompt="The ", max_tokens=40, temperature=1.0, top_p=0.9, seed=11)
    want = raw_completion(server, **request)
    assert want["text"] == base64.b64decode(want["bytes"]).decode("utf-8", errors="replace")

    done = client.completions.create(**request)
    assert done.choices[0].text == want["text"]
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (4, 40)

    chunks = list(client.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want["text"]
    assert chunks[-1].usage.completion_tokens == 40

    with pytest.raises(openai.BadRequestError, match="`n` must be 1"):
        client.completions.create(model=models[0], prompt="x", n=2)
