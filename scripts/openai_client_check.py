"""The `openai` Python package against `apr serve`: completions, n > 1, stop strings,
streaming, and errors. Usage: python openai_client_check.py BASE_URL MODEL PROMPT.
Exits non-zero (with the reason) on the first check that fails."""
import sys

import openai

base, model, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)

models = [m.id for m in client.models.list().data]
assert model in models, models

r = client.completions.create(model=model, prompt=prompt, max_tokens=200, temperature=0)
text = r.choices[0].text
assert len(text) > 50 and r.choices[0].finish_reason in ("stop", "length"), r
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage

r = client.completions.create(model=model, prompt=[prompt, prompt], max_tokens=40,
                              temperature=1.0, n=3, seed=7)
assert len(r.choices) == 6 and [c.index for c in r.choices] == list(range(6)), r
again = client.completions.create(model=model, prompt=[prompt, prompt], max_tokens=40,
                                  temperature=1.0, n=3, seed=7)
assert [c.text for c in r.choices] == [c.text for c in again.choices], "seeded sampling repeats"

word = "Exploring"
r = client.completions.create(model=model, prompt=prompt, max_tokens=200, temperature=0,
                              stop=[word])
assert r.choices[0].text == text[: text.index(word)], (r.choices[0].text, text)
assert r.choices[0].finish_reason == "stop"

streamed = "".join(
    chunk.choices[0].text
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=200,
                                           temperature=0, stream=True)
    if chunk.choices
)
assert streamed == text, (streamed, text)

for bad, kind in [
    (dict(model="nope", prompt=prompt), openai.NotFoundError),
    (dict(model=model, prompt=prompt, max_tokens=10**6), openai.BadRequestError),
    (dict(model=model, prompt=prompt, n=0), openai.BadRequestError),
    (dict(model=model, prompt="hello"), openai.BadRequestError),
]:
    try:
        client.completions.create(**bad)
    except kind as e:
        assert e.body and "message" in e.body, e.body
    else:
        raise AssertionError(f"{bad} was accepted")
print("openai client: models, completions, n > 1 with seeds, stop, stream, 4 errors: ok")
