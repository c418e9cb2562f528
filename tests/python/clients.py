"""Drive a server with the official `openai` and `ollama` Python clients, used
exactly as their documentation shows, and check what comes back.

Environment: LQ_OPENAI_BASE_URL (http://HOST:PORT/v1), LQ_OLLAMA_HOST
(http://HOST:PORT), LQ_API_KEY, LQ_MODEL. Prints one line per check; exits 1
if any check failed, 2 if the environment is incomplete.

The expected texts are those of the test upstream (tests/it/mock.rs): every
completion starts "Hello alpha bravo", every tool call is get_weather(city=Tokyo).
"""

import json
import os
import sys
import traceback

import ollama
import openai

EXPECTED_PREFIX = "Hello alpha bravo"
EXPECTED_ARGUMENTS = {"city": "Tokyo"}
MESSAGES = [{"role": "user", "content": "Say hello"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}
TIMEOUT_SECONDS = 30


class CheckFailed(Exception):
    pass


def expect(condition, message):
    if not condition:
        raise CheckFailed(message)


def env(name):
    value = os.environ.get(name)
    if not value:
        print(f"environment variable {name} is not set", file=sys.stderr)
        sys.exit(2)
    return value


OPENAI_BASE_URL = env("LQ_OPENAI_BASE_URL")
OLLAMA_HOST = env("LQ_OLLAMA_HOST")
API_KEY = env("LQ_API_KEY")
MODEL = env("LQ_MODEL")

oa = openai.OpenAI(base_url=OPENAI_BASE_URL, api_key=API_KEY, max_retries=0, timeout=TIMEOUT_SECONDS)
ol = ollama.Client(host=OLLAMA_HOST, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=TIMEOUT_SECONDS)

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def model_matches(name):
    return name in (MODEL, f"{MODEL}:latest")


def expect_text(text, what):
    expect(isinstance(text, str) and text.startswith(EXPECTED_PREFIX), f"{what}: expected text starting {EXPECTED_PREFIX!r}, got {text!r}")


def expect_usage(usage, what):
    expect(usage is not None, f"{what}: no usage")
    expect(usage.prompt_tokens > 0, f"{what}: prompt_tokens = {usage.prompt_tokens}")
    expect(usage.completion_tokens > 0, f"{what}: completion_tokens = {usage.completion_tokens}")
    expect(
        usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
        f"{what}: total_tokens {usage.total_tokens} != {usage.prompt_tokens} + {usage.completion_tokens}",
    )


def expect_final_stats(resp, what, done_reason="stop"):
    expect(resp.done is True, f"{what}: done = {resp.done!r}")
    expect(resp.done_reason == done_reason, f"{what}: done_reason = {resp.done_reason!r}, expected {done_reason!r}")
    expect((resp.prompt_eval_count or 0) > 0, f"{what}: prompt_eval_count = {resp.prompt_eval_count!r}")
    expect((resp.eval_count or 0) > 0, f"{what}: eval_count = {resp.eval_count!r}")
    expect((resp.total_duration or 0) > 0, f"{what}: total_duration = {resp.total_duration!r}")


# ------------------------------------------------------------------ openai


@check
def openai_chat():
    r = oa.chat.completions.create(model=MODEL, messages=MESSAGES)
    expect(r.object == "chat.completion", f"object = {r.object!r}")
    choice = r.choices[0]
    expect(choice.message.role == "assistant", f"role = {choice.message.role!r}")
    expect_text(choice.message.content, "content")
    expect(choice.finish_reason == "stop", f"finish_reason = {choice.finish_reason!r}")
    expect_usage(r.usage, "usage")


@check
def openai_chat_max_tokens():
    r = oa.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    choice = r.choices[0]
    expect(choice.message.content == EXPECTED_PREFIX, f"content = {choice.message.content!r}")
    expect(choice.finish_reason == "length", f"finish_reason = {choice.finish_reason!r}")


def collect_stream(**kwargs):
    chunks = list(oa.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **kwargs))
    expect(chunks, "no chunks")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return chunks, text, finish


@check
def openai_chat_stream():
    chunks, text, finish = collect_stream()
    expect_text(text, "streamed content")
    expect(finish == ["stop"], f"finish reasons = {finish!r}")
    with_usage = [c.usage for c in chunks if c.usage is not None]
    expect(not with_usage, f"usage arrived although not asked for: {with_usage!r}")


@check
def openai_chat_stream_include_usage():
    chunks, text, finish = collect_stream(stream_options={"include_usage": True})
    expect_text(text, "streamed content")
    expect(finish == ["stop"], f"finish reasons = {finish!r}")
    last = chunks[-1]
    expect(last.choices == [], f"usage chunk has choices {last.choices!r}")
    expect_usage(last.usage, "usage chunk")
    early = [c for c in chunks[:-1] if c.usage is not None]
    expect(not early, "usage before the last chunk")


@check
def openai_tool_call():
    r = oa.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL])
    choice = r.choices[0]
    expect(choice.finish_reason == "tool_calls", f"finish_reason = {choice.finish_reason!r}")
    calls = choice.message.tool_calls
    expect(calls, f"no tool_calls in {choice.message!r}")
    expect(calls[0].id.startswith("call_"), f"tool call id = {calls[0].id!r}")
    expect(calls[0].function.name == "get_weather", f"name = {calls[0].function.name!r}")
    arguments = json.loads(calls[0].function.arguments)
    expect(arguments == EXPECTED_ARGUMENTS, f"arguments = {arguments!r}")
    expect_usage(r.usage, "usage")


@check
def openai_tool_call_stream():
    chunks = list(oa.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL], stream=True))
    name, arguments, finish = "", "", None
    for c in chunks:
        if not c.choices:
            continue
        for call in c.choices[0].delta.tool_calls or []:
            expect(call.index == 0, f"tool call index = {call.index!r}")
            name += call.function.name or ""
            arguments += call.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    expect(name == "get_weather", f"name = {name!r}")
    expect(json.loads(arguments) == EXPECTED_ARGUMENTS, f"joined arguments = {arguments!r}")
    expect(finish == "tool_calls", f"finish_reason = {finish!r}")


@check
def openai_models_list():
    ids = [m.id for m in oa.models.list()]
    expect(any(model_matches(i) for i in ids), f"{MODEL!r} not among {ids!r}")


# ------------------------------------------------------------------ ollama


@check
def ollama_chat():
    r = ol.chat(model=MODEL, messages=MESSAGES)
    expect(r.message.role == "assistant", f"role = {r.message.role!r}")
    expect_text(r.message.content, "content")
    expect_final_stats(r, "chat")


@check
def ollama_chat_stream():
    parts = list(ol.chat(model=MODEL, messages=MESSAGES, stream=True))
    expect(len(parts) > 1, f"only {len(parts)} chunk(s)")
    expect(all(p.done is False for p in parts[:-1]), "done before the last chunk")
    expect_text("".join(p.message.content or "" for p in parts), "streamed content")
    expect_final_stats(parts[-1], "final chunk")


@check
def ollama_chat_num_predict():
    r = ol.chat(model=MODEL, messages=MESSAGES, options={"num_predict": 3})
    expect(r.message.content == EXPECTED_PREFIX, f"content = {r.message.content!r}")
    expect_final_stats(r, "chat", done_reason="length")


@check
def ollama_chat_tools():
    r = ol.chat(model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL])
    calls = r.message.tool_calls
    expect(calls, f"no tool_calls in {r.message!r}")
    expect(calls[0].function.name == "get_weather", f"name = {calls[0].function.name!r}")
    arguments = calls[0].function.arguments
    expect(isinstance(arguments, dict), f"arguments is a {type(arguments).__name__}, not a dict")
    expect(arguments == EXPECTED_ARGUMENTS, f"arguments = {arguments!r}")
    expect_final_stats(r, "chat")


@check
def ollama_generate():
    r = ol.generate(model=MODEL, prompt="Why is the sky blue?")
    expect_text(r.response, "response")
    expect(r.context, f"context = {r.context!r}")
    expect_final_stats(r, "generate")


@check
def ollama_generate_stream():
    parts = list(ol.generate(model=MODEL, prompt="Why is the sky blue?", stream=True))
    expect(len(parts) > 1, f"only {len(parts)} chunk(s)")
    expect(all(p.done is False for p in parts[:-1]), "done before the last chunk")
    expect_text("".join(p.response or "" for p in parts), "streamed response")
    expect_final_stats(parts[-1], "final chunk")


@check
def ollama_list():
    models = ol.list().models
    names = [m.model for m in models]
    expect(any(model_matches(n) for n in names), f"{MODEL!r} not among {names!r}")
    expect(all(m.details and m.details.family for m in models), "a model lacks details.family")


def main():
    failed = 0
    for fn in CHECKS:
        try:
            fn()
        except CheckFailed as e:
            failed += 1
            print(f"FAIL {fn.__name__}: {e}")
        except Exception as e:  # a client error is a failed check too
            failed += 1
            print(f"FAIL {fn.__name__}: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stderr)
        else:
            print(f"ok   {fn.__name__}")
    print(f"{len(CHECKS) - failed}/{len(CHECKS)} checks passed (openai {openai.__version__}, ollama {ollama_version()})")
    return 1 if failed else 0


def ollama_version():
    try:
        from importlib.metadata import version

        return version("ollama")
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
