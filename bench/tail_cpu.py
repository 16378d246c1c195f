"""CPU per token through Stream.token, one reader, no network: what rendering the unfinished block costs.

    python3 bench/tail_cpu.py        (from the repository root; about 20 s)

10,000 tokens of about 4 characters at a simulated pace (the clock advances by the pace plus the real time spent,
so the tail's rate limit sees real render costs); the render cache is off (a real answer repeats no block). Texts:
an LLM-like answer, these docs' own Markdown, and the bench's ` t<ns>` tokens. Compare with `git stash`.
"""
from gevent import monkey; monkey.patch_all()  # noqa: E702
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.getcwd())
import chat  # noqa: E402

ANSWER = 'Here\'s a quick overview of **Python decorators** and how they work in practice.\n\n## What is a decorator?\n\nA decorator is a function that takes another function and extends its behaviour without modifying it explicitly. In Python, decorators are applied with the `@` syntax, which is just syntactic sugar for `func = decorator(func)`. They are widely used for logging, timing, caching (see `functools.lru_cache`) and access control.\n\n### Key points\n\n- **Functions are first-class objects**: they can be passed around, stored and returned.\n- Decorators often use `functools.wraps` to preserve the wrapped function\'s name and docstring.\n- They can take arguments, which requires an *extra* level of nesting.\n- Class-based decorators implement `__call__` instead.\n\n```python\nimport functools\nimport time\n\ndef timer(func):\n    @functools.wraps(func)\n    def wrapper(*args, **kwargs):\n        start = time.perf_counter()\n        result = func(*args, **kwargs)\n        print(f"{func.__name__} took {time.perf_counter() - start:.3f} s")\n        return result\n    return wrapper\n```\n\nThat\'s the basic pattern: the wrapper runs code before and after the call, and returns the result unchanged. For more detail, see the [Python glossary](https://docs.python.org/3/glossary.html#term-decorator) and **PEP 318**, which introduced the syntax.\n\n1. Write the wrapper.\n2. Return it from the decorator.\n3. Apply it with `@timer`.\n\n> Note: stacking decorators applies them bottom-up, so order matters.\n\nIn short, decorators let you *separate concerns* cleanly — keep the core logic in the function and put cross-cutting behaviour in the decorator.\n\n'


class Reader:
    """A connected reader that counts what it is handed."""

    def __init__(self):
        self.bytes = self.tails = 0

    def put(self, frame, direct=True):
        """Count a frame."""
        self.bytes += len(frame)
        self.tails += frame.startswith(b"event: tail")


def run(tokens, pace):
    """(CPU µs a token, reader) for tokens relayed `pace` seconds apart."""
    chat.settings.max_tokens_per_second, chat.settings.max_answer_chars = 0, 10**9
    stream, reader, real = chat.Stream("bench", []), Reader(), time.monotonic
    stream.readers.add(reader)
    offset = [0.0]
    time.monotonic = lambda: offset[0] + real()
    try:
        start = time.process_time()
        for token in tokens:
            offset[0] += pace
            stream.token("message", token)
        return (time.process_time() - start) / len(tokens) * 1e6, reader
    finally:
        time.monotonic = real


uncached = chat.safe_markdown.__wrapped__
uncached.__wrapped__ = uncached
chat.safe_markdown = uncached
split = re.compile(r"\s*\S{1,4}|\s+").findall
docs = "".join(open(p).read() for p in ("README.md", "docs/architecture.md", "docs/security.md"))
for name, tokens in (("LLM-like answer", (split(ANSWER) * 40)[:10000]), ("docs' Markdown", split(docs)[:10000]),
                     ("bench ' t<ns>'", [f" t{time.monotonic_ns()}" for _ in range(10000)])):
    for pace in (0.02, 0.05):
        us = min(run(tokens, pace)[0] for _ in range(3))
        reader = run(tokens, pace)[1]
        print(f"{name:16} {1 / pace:3.0f} tokens/s: {us:5.1f} µs a token, {reader.tails:5d} tail events, "
              f"{reader.bytes / len(tokens):4.0f} bytes a token")
