"""The peer: chat.py's relay written the way a FastAPI/Starlette user would.

Kept for comparison only (bench/run.py runs it beside chat.py on the same workload).
Starlette + sse-starlette + httpx on uvicorn, one worker, uvicorn's defaults (uvloop and
httptools when installed, as `uvicorn[standard]` / `fastapi[standard]` install them).

The same HTTP contract and the same stream semantics as chat.py:
- POST /streaming (form field `prompt`) -> HTML fragment with sse-connect="/events?stream=ID"
- GET /events?stream=ID -> `event: message` frames `<span>TOKEN</span>`, then `done`
  carrying the finished bubble (Markdown rendered with markdown-it-py); always 200
- POST /stop?stream=ID, GET /healthz (`streams: N`)
- one background task per answer reads the upstream with httpx and publishes every event
  to the stream's log and to each reader's asyncio.Queue; generation goes on when the
  browser disconnects; a finished stream is dropped CHAT_STREAM_GRACE s after it ended.

Run: OPENAI_BASE_URL=http://127.0.0.1:UPORT/v1 python bench/peer.py --port 8001
"""

import argparse
import asyncio
import contextlib
import html
import json
import os
import secrets
import time

import httpx
import uvicorn
from markdown_it import MarkdownIt
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

BASE_URL = (os.environ.get("OPENAI_BASE_URL") or "").rstrip("/")
API_KEY = os.environ.get("OPENAI_API_KEY")
MODEL = os.environ.get("CHAT_MODEL") or None
GRACE = float(os.environ.get("CHAT_STREAM_GRACE") or 10)
PING = float(os.environ.get("CHAT_PING_INTERVAL") or 10)
MAX_STREAMS = int(os.environ.get("CHAT_MAX_STREAMS") or 25_000)
MAX_PROMPT = int(os.environ.get("CHAT_MAX_PROMPT") or 32_000)

md = MarkdownIt("commonmark", {"html": False})
client: httpx.AsyncClient = None  # created in the lifespan
streams = {}


class Stream:
    def __init__(self, messages):
        self.id = secrets.token_urlsafe(18)
        self.messages = messages
        self.log = []          # every event dict; event id N is log[N-1]
        self.readers = set()   # one asyncio.Queue per connected /events response
        self.text = []
        self.finished_at = None
        self.started = time.monotonic()
        self.task = None

    def publish(self, event, data):
        item = {"id": str(len(self.log) + 1), "event": event, "data": data}
        self.log.append(item)
        for queue in self.readers:
            queue.put_nowait(item)

    def finish(self, error=None, note=None):
        if self.finished_at is not None:
            return
        answer = md.render("".join(self.text))
        parts = [f'<div class="msg assistant" id="answer-{self.id}"><div class="bubble" hx-disable>{answer}']
        if error:
            parts.append(f'<p class="error" role="alert">{html.escape(error)}</p>')
        if note:
            parts.append(f'<p class="note">{html.escape(note)}</p>')
        parts.append(f'</div><footer>{len(self.text)} tokens</footer></div>')
        self.publish("done", "".join(parts))
        self.finished_at = time.monotonic()


async def relay(stream):
    """Read the upstream answer and publish it token by token."""
    body = {"messages": stream.messages, "stream": True, "stream_options": {"include_usage": True}}
    if MODEL:
        body["model"] = MODEL
    headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
    try:
        async with client.stream("POST", f"{BASE_URL}/chat/completions", json=body, headers=headers) as r:
            if r.status_code >= 300:
                text = (await r.aread()).decode("utf-8", "replace")[:300]
                stream.finish(error=f"The model server answered {r.status_code}: {text}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    stream.finish(error=str(chunk["error"]))
                    return
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        stream.text.append(text)
                        stream.publish("message", f"<span>{html.escape(text, quote=False)}</span>")
        stream.finish()
    except asyncio.CancelledError:
        stream.finish(note="Stopped.")
    except (httpx.HTTPError, ValueError) as exc:
        stream.finish(error=f"The connection to the model server broke off ({type(exc).__name__}).")
    except Exception:  # the bubble must end whatever went wrong
        stream.finish(error="Internal error while relaying this answer.")
        raise


async def start_streaming(request):
    form = await request.form()
    prompt = str(form.get("prompt") or "")
    if not prompt.strip():
        return HTMLResponse('<p class="form-error">Type a message first: the prompt is empty.</p>', 400)
    if len(prompt) > MAX_PROMPT:
        return HTMLResponse('<p class="form-error">Your message is too long.</p>', 413)
    if len(streams) >= MAX_STREAMS:
        return HTMLResponse('<p class="form-error">The server is at its limit of open answers.</p>', 503)
    stream = Stream([{"role": "user", "content": prompt}])
    streams[stream.id] = stream
    stream.task = asyncio.create_task(relay(stream))
    return HTMLResponse(
        f'<div class="msg user"><div class="bubble">{html.escape(prompt)}</div></div>\n'
        f'<div class="msg assistant streaming" id="answer-{stream.id}" hx-ext="sse" '
        f'sse-connect="/events?stream={stream.id}" sse-swap="done" hx-swap="outerHTML">'
        f'<div class="tokens" sse-swap="message" hx-swap="beforeend"></div></div>\n')


async def events(request):
    stream_id = request.query_params.get("stream", "")
    try:
        last_id = int(request.headers.get("last-event-id") or 0)
    except ValueError:
        last_id = 0
    stream = streams.get(stream_id)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

    async def missing():
        yield {"id": "1", "event": "done", "data": '<div class="msg assistant"><p role="alert">'
               'This answer is no longer available.</p></div>'}

    async def live():
        backlog = stream.log[max(0, last_id):]
        if stream.finished_at is not None:
            for item in backlog or stream.log[-1:]:
                yield item
            return
        queue = asyncio.Queue()
        stream.readers.add(queue)
        try:
            for item in backlog:
                yield item
            while True:
                item = await queue.get()
                yield item
                if item["event"] == "done":
                    return
        finally:
            stream.readers.discard(queue)

    return EventSourceResponse(missing() if stream is None else live(), headers=headers, ping=PING)


async def stop(request):
    stream = streams.get(request.query_params.get("stream", ""))
    if stream is None:
        return PlainTextResponse("No such answer.", 404)
    if stream.finished_at is None and stream.task:
        stream.task.cancel()
    return Response(status_code=204)


async def healthz(request):
    return PlainTextResponse(f"ok\nupstream: {BASE_URL}\nstreams: {len(streams)}\n")


async def janitor():
    """Drop finished streams after the grace period (no reader left)."""
    while True:
        await asyncio.sleep(1)
        now = time.monotonic()
        for stream_id, stream in list(streams.items()):
            if stream.finished_at is not None and now - stream.finished_at >= GRACE and not stream.readers:
                del streams[stream_id]


@contextlib.asynccontextmanager
async def lifespan(app):
    global client
    client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=120.0),
                               limits=httpx.Limits(max_connections=None, max_keepalive_connections=1024))
    task = asyncio.create_task(janitor())
    try:
        yield
    finally:
        task.cancel()
        await client.aclose()


app = Starlette(routes=[
    Route("/streaming", start_streaming, methods=["POST"]),
    Route("/events", events),
    Route("/stop", stop, methods=["POST"]),
    Route("/healthz", healthz),
], lifespan=lifespan)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the benchmark's peer relay (Starlette + sse-starlette + httpx)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, workers=1)
