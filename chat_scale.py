"""chat_scale.py — what chat.py needs only to grow past one process.

Loaded by chat.py only when CHAT_REDIS_URL or CHAT_DATABASE_URL is set (the line requirements-scale.txt draws):
`python chat.py`, the two single-file artifacts and the defaults never import it, nor redis-py or psycopg.

What it owns, each behind an interface chat.py defines and implements in-process first:
  RedisStreams       the Streams interface over Redis (CHAT_REDIS_URL): its Lua scripts, the writer greenlet
                     that batches the log to Redis, readers fed over pub/sub, and the janitor that finishes
                     answers whose writer died.
  PostgresDatabase   the Database interface over psycopg (CHAT_DATABASE_URL), and PostgreSQL's scripts for the
                     named steps of chat.MIGRATIONS.
  run_workers        --workers N: copies of chat.py on one port (SO_REUSEPORT), which need CHAT_REDIS_URL.

What it must not touch: routes, rendering, the in-process registry, the journal. It reaches chat.py's shared
objects (settings, store, the templates' helpers) through the chat module at call time, never through copies,
so that they are always the ones chat.py uses now.
"""

import collections
import contextlib
import functools
import itertools
import logging
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import bottle
import gevent
import gevent.event
import gevent.local
import gevent.queue
from gevent.queue import Queue

import chat

log = logging.getLogger("chat")


# ---------------------------------------------------------------------------
# Streams shared through Redis (CHAT_REDIS_URL): any process reads, resumes or stops any answer
# ---------------------------------------------------------------------------
#
# Per answer, Redis holds its event log as a Redis Stream whose entry ids are our SSE ids
# (N-0, dense: a reader sees a gap or a repeat at once, and XADD refuses a stale writer),
# and a job record (owner, writing process, lease, stop flag). Readers fill from the log
# and get new events over one pub/sub connection per process. The relay never waits on
# Redis: one writer greenlet per process sends what has queued as one pipeline, and
# readers (here and elsewhere) get an event only once it is in the log, so a crash never
# takes back text anyone has seen.

RESERVE_LUA = """
-- KEYS: the owner's live answers (sorted by lease), the conversation's writer, the job
-- ARGV: stream id, now, lease until, limit, ttl ms, owner, instance, in a conversation (1/0)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if ARGV[8] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then return 409 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 429 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if ARGV[8] == '1' then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[5]) end
redis.call('HSET', KEYS[3], 'owner', ARGV[6], 'instance', ARGV[7], 'alive', ARGV[3], 'stop', 0, 'done', 0)
redis.call('PEXPIRE', KEYS[3], ARGV[5])
return 0
"""

APPEND_LUA = """
-- Append events to answers' logs and publish them. ARGV: (stream id, event id, kind, payload)
-- repeated; event id 0 is only published (the waiting clock). An event is published only once
-- it is in the log, and each answer's events of one call in one message ("id kind size payload"
-- each). Returns, for each event not written, its position (from 0) and 0 (the log is gone:
-- Redis lost it) or -1 (refused: an event at or after this id is there already).
local out, messages, order = {}, {}, {}
for i = 1, #ARGV, 4 do
  local sid, n, kind, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local reply = true
  if n ~= '0' then
    local key = 'chat:' .. sid .. ':log'
    if n == '1' then
      reply = redis.pcall('XADD', key, '1-0', 'k', kind, 'v', payload)
    else  -- NOMKSTREAM: a log Redis lost is written again whole, not started from its middle
      reply = redis.pcall('XADD', key, 'NOMKSTREAM', n .. '-0', 'k', kind, 'v', payload)
    end
  end
  if not reply then
    out[#out + 1] = (i - 1) / 4
    out[#out + 1] = 0
  elseif type(reply) == 'table' and reply.err then
    out[#out + 1] = (i - 1) / 4
    out[#out + 1] = -1
  else
    local parts = messages[sid]
    if not parts then
      parts = {}
      messages[sid] = parts
      order[#order + 1] = sid
    end
    parts[#parts + 1] = n .. ' ' .. kind .. ' ' .. #payload .. ' ' .. payload
  end
end
for _, sid in ipairs(order) do
  redis.call('PUBLISH', 'chat:' .. sid .. ':live', table.concat(messages[sid]))
end
return out
"""

RENEW_LUA = """
-- Renew the leases of the answers this process writes. ARGV: lease until, ttl ms, then
-- (stream id, owner, conversation id, message id) repeated. Returns one state per answer:
-- 0 fine, 1 Stop was asked for, 2 finished by another process, 3 its record is gone.
local alive, ttl, out = ARGV[1], ARGV[2], {}
for i = 3, #ARGV, 4 do
  local sid, owner, conv, msg = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local job, owned = 'chat:' .. sid .. ':job', 'chat:owner:' .. owner
  local state = redis.call('HMGET', job, 'owner', 'stop', 'done')
  if not state[1] then
    out[#out + 1] = 3
  elseif state[3] == '1' then
    out[#out + 1] = 2
  else
    redis.call('HSET', job, 'alive', alive)
    redis.call('ZADD', 'chat:leases', alive, sid)
    redis.call('ZADD', owned, alive, sid)
    redis.call('PEXPIRE', job, ttl)
    redis.call('PEXPIRE', owned, ttl)
    redis.call('PEXPIRE', 'chat:' .. sid .. ':log', ttl)
    if conv ~= '' then
      redis.call('SET', 'chat:conv:' .. conv, sid, 'PX', ttl)
      redis.call('SET', 'chat:msg:' .. conv .. ':' .. msg, sid, 'PX', ttl)
    end
    out[#out + 1] = state[2] == '1' and 1 or 0
  end
end
return out
"""

TOPS_LUA = """
-- The last event id of each answer's log (0: none). ARGV: stream ids.
local out = {}
for i = 1, #ARGV do
  local last = redis.call('XREVRANGE', 'chat:' .. ARGV[i] .. ':log', '+', '-', 'COUNT', 1)
  out[i] = #last > 0 and tonumber(string.match(last[1][1], '^(%d+)')) or 0
end
return out
"""

RELEASE_LUA = """
-- KEYS: log, job, all leases, the owner's live answers, the conversation's writer
-- ARGV: stream id, ttl ms, done (1: the answer finished; 0: it never started)
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if redis.call('GET', KEYS[5]) == ARGV[1] then redis.call('DEL', KEYS[5]) end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[2], 'done', 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
else
  redis.call('DEL', KEYS[2])
end
return 1
"""

FENCE_LUA = """
-- Finish an answer whose writer died: only if its lease ran out, it is not done, and the log
-- still ends at the event the caller read (so the done event follows everything seen).
-- KEYS: log, job, all leases, the owner's live answers, the conversation's writer
-- ARGV: last event id read, now, done frame, stream id, ttl ms, live channel
if redis.call('HGET', KEYS[2], 'done') == '1' then return 0 end
if tonumber(redis.call('HGET', KEYS[2], 'alive') or '0') > tonumber(ARGV[2]) then return 0 end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local top = 0
if #last > 0 then
  top = tonumber(string.match(last[1][1], '^(%d+)'))
  if last[1][2][2] == 'd' then  -- it did finish (its record was lost and made again)
    redis.call('HSET', KEYS[2], 'done', 1)
    redis.call('ZREM', KEYS[3], ARGV[4])
    return 0
  end
end
if top ~= tonumber(ARGV[1]) then return 0 end
local id = top + 1
redis.call('XADD', KEYS[1], id .. '-0', 'k', 'd', 'v', ARGV[3])
redis.call('HSET', KEYS[2], 'done', 1, 'instance', '')
redis.call('ZREM', KEYS[3], ARGV[4])
redis.call('ZREM', KEYS[4], ARGV[4])
if redis.call('GET', KEYS[5]) == ARGV[4] then redis.call('DEL', KEYS[5]) end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PUBLISH', ARGV[6], id .. ' d ' .. #ARGV[3] .. ' ' .. ARGV[3])
return 1
"""

FLUSH_EVERY = 0.003  # seconds: the writer's shortest interval between calls to Redis, under load
EVENTS_PER_CALL = 512  # at most, in one call to Redis: packing and running it stay well under a millisecond
OUTBOX_LIMIT = 4096   # events a relay may have waiting for the writer before it waits too
BUSY_CALLS = 1000     # calls to Redis in a second (~10 % of a core) above which the writer batches
KIND_CODES = {"message": "m", "reasoning": "r", "block": "b", "done": "d", "status": "s", "tail": "t"}
REREAD_LOG = -1  # put in a reader's queue: read the log again from your last id


class RemoteAnswer:
    """An answer another process is writing, as far as a page needs to know (its stream id)."""

    local = False
    finished = False

    def __init__(self, stream_id):
        self.id = stream_id


class Reader(chat.Outlet):
    """One /events response reading a shared answer: an Outlet that knows the last event id it sent."""

    __slots__ = ("last", "behind", "owner")

    def __init__(self, last, owner):
        super().__init__()
        self.last = last
        self.behind = True  # read the log before waiting for new events
        self.owner = owner


def event_frame(n, kind, payload):
    """The SSE frame of a logged event (kind code and payload as Redis keeps them)."""
    if kind in ("m", "r"):
        return chat.token_frame("message" if kind == "m" else "reasoning", payload.decode(), n)
    return payload


class SharedStream(chat.Stream):
    """A Stream whose events also go to Redis, with what the writer greenlet has not written there yet."""

    __slots__ = ("outbox", "flushed")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outbox = []  # (id, kind, payload) events not yet written to Redis
        self.flushed = 0  # the last event id written there; -1: write the log again


class RedisStreams(chat.Streams):
    """Streams shared by every chat.py process on one Redis: same methods, answers readable and stoppable anywhere."""

    stream_class = SharedStream

    def __init__(self, url):
        super().__init__()
        import redis  # only when configured; after monkey.patch_all(), so its sockets are gevent's
        self.errors = (redis.ConnectionError, redis.TimeoutError, OSError)
        # A few connections for every request and the writer, however many readers there are:
        # greenlets wait their turn for one. Pub/sub has its own connection.
        name = f"chat.py-{os.getpid()}"  # CLIENT LIST shows which process holds which connection
        self.redis = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
            url, max_connections=8, timeout=5, socket_timeout=5, socket_connect_timeout=3, client_name=name))
        # The writer greenlet's own connection, used directly: redis-py's per-command machinery (pool,
        # retries, reply callbacks) would cost as much as the call itself.
        self.writer = redis.ConnectionPool.from_url(url, socket_timeout=5, socket_connect_timeout=3,
                                                    client_name=name).make_connection()
        self.no_script = redis.exceptions.NoScriptError
        self.subscriber = redis.Redis.from_url(url, socket_connect_timeout=3, socket_keepalive=True, client_name=name,
                                               retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0))
        self.reserve_script = self.redis.register_script(RESERVE_LUA)
        self.append_script = self.redis.register_script(APPEND_LUA)
        self.renew_script = self.redis.register_script(RENEW_LUA)
        self.tops_script = self.redis.register_script(TOPS_LUA)
        self.release_script = self.redis.register_script(RELEASE_LUA)
        self.fence_script = self.redis.register_script(FENCE_LUA)
        self.instance = secrets.token_hex(8)
        self.control = f"chat:ctl:{self.instance}"
        self.feeds = {}          # stream id -> the Readers of it connected to this process
        self.owner_readers = collections.Counter()  # owner -> their Readers connected to this process
        self.dirty = {}          # stream id -> stream with events for the writer
        self.wake = gevent.event.Event()
        self.flushed = gevent.event.Event()
        self.pubsub = None
        self.subscribing = {}    # channel -> an Event set when Redis confirms the subscription
        self.lost = False        # the pub/sub connection broke: recover once it is back
        self.renewed = 0.0
        self.finishing = set()   # dead writers' answers being finished here
        self.greenlets = []

    def start(self):
        """Start the writer, the pub/sub listener and the janitor (once)."""
        if not self.greenlets:
            self.greenlets = [gevent.spawn(self.write_forever), gevent.spawn(self.listen_forever)]
            self.janitor = gevent.spawn(self.sweep_forever)

    def sweep_forever(self):
        """The janitor runs for good: other processes' answers need watching too."""
        while True:
            gevent.sleep(min(1.0, chat.settings.grace, chat.settings.ping_interval))
            try:
                self.sweep(time.monotonic())
            except Exception:  # noqa: BLE001 — the janitor must outlive any one bad pass
                log.exception("the janitor's pass failed")

    # -- keys ------------------------------------------------------------------------------

    @staticmethod
    def keys(stream_id, owner="", conversation_id=None):
        """The keys of an answer: log, job, all leases, the owner's answers, the conversation's writer."""
        return [f"chat:{stream_id}:log", f"chat:{stream_id}:job", "chat:leases", f"chat:owner:{owner}",
                f"chat:conv:{conversation_id or ''}"]

    @staticmethod
    def ttl_ms(seconds):
        """A key's lifetime in milliseconds."""
        return int(seconds * 1000)

    @classmethod
    def kept_ms(cls):
        """How long a live answer's records outlive its last renewal: its lease, then at least 30 s more, so that
        a process started again after a crash (or any other) still finds the text to finish the answer with."""
        return cls.ttl_ms(chat.settings.lease_seconds + max(chat.settings.lease_seconds, 30))

    # -- writing -----------------------------------------------------------------------------

    def reserve(self, owner, conversation_id=None):
        """Register a stream if this owner's answers in every process allow it: one Lua script checks and adds."""
        self.start()
        stream = self.register(owner, conversation_id)
        log_key, job, _, owned, writer = self.keys(stream.id, owner, conversation_id)
        now = time.time()
        try:
            verdict = self.reserve_script(
                keys=[owned, writer, job],
                args=[stream.id, now, now + chat.settings.lease_seconds, chat.settings.streams_per_owner,
                      self.kept_ms(), owner, self.instance, 1 if conversation_id else 0])
        except self.errors as exc:
            super().forget(stream)
            chat.log_limited("redis", "Redis is unreachable: %s", chat.redact_url(str(exc)))
            raise chat.Refused(503, "The server cannot reach its shared state just now; try again shortly.") from None
        if verdict:
            super().forget(stream)
            raise chat.Refused(409, chat.BUSY_CONVERSATION) if verdict == 409 else \
                chat.Refused(429, chat.too_many_streams())
        return stream

    def begin(self, stream, history, **fields):
        """Start the relay, and tell Redis which stored answer it writes (pages elsewhere link to it)."""
        super().begin(stream, history, **fields)
        try:
            self.establish(self.redis.pipeline(transaction=False), stream).execute()
        except self.errors as exc:  # the janitor's next renewal puts it there
            chat.log_limited("redis", "Redis is unreachable: %s", chat.redact_url(str(exc)))
        return stream

    def establish(self, pipe, stream):
        """Queue the commands that (re)create an answer's job record, leases and pointers."""
        log_key, job, leases, owned, writer = self.keys(stream.id, stream.owner, stream.conversation_id)
        until, ttl = time.time() + chat.settings.lease_seconds, self.kept_ms()
        pipe.hset(job, mapping={"owner": stream.owner, "instance": self.instance, "alive": until, "stop": 0,
                                "done": 0, "message": stream.message_id or "",
                                "conversation": stream.conversation_id or "", "model": stream.model or "",
                                "started": time.time() - (time.monotonic() - stream.started)})
        pipe.pexpire(job, ttl)
        pipe.zadd(leases, {stream.id: until})
        pipe.zadd(owned, {stream.id: until})
        pipe.pexpire(owned, ttl)
        if stream.conversation_id:
            pipe.set(writer, stream.id, px=ttl)
            pipe.set(f"chat:msg:{stream.conversation_id}:{stream.message_id}", stream.id, px=ttl)
        return pipe

    def anyone_reading(self, stream):
        """Every event is wanted: readers may be in any process."""
        return True

    def publish(self, stream, event_id, kind, payload):
        """Queue an event for the writer greenlet (pings are made by each reader itself)."""
        if stream.readers:
            super().publish(stream, event_id, kind, payload)  # a page without JavaScript, reading here
        if kind == "ping":
            return
        if isinstance(payload, str):
            payload = payload.encode()
        # A relay that gets ahead of Redis by this much waits (and with it its upstream), so an upstream
        # that floods cannot grow the outbox without bound. Never the done event (it may be written
        # as the relay is being stopped) or the waiting clock (the janitor's).
        while len(stream.outbox) >= OUTBOX_LIMIT and kind not in ("done", "status"):
            self.flushed.wait(1.0)
        stream.outbox.append((event_id or 0, KIND_CODES[kind], payload))
        self.dirty[stream.id] = stream
        self.wake.set()

    def write_forever(self):
        """The writer greenlet: whatever has queued, for every stream, goes to Redis in one script call."""
        backoff, last, second, calls, busy = 0.0, 0.0, 0.0, 0, False
        while True:
            self.wake.wait()
            # Under load (more than BUSY_CALLS calls in the last second), at most one call every
            # FLUSH_EVERY: events gather into fewer, larger calls (each costs ~100 µs of CPU here,
            # whatever its size). When it is quieter, an event goes at once.
            now = time.monotonic()
            if now - second >= 1.0:
                second, busy, calls = now, calls > BUSY_CALLS, 0
            if busy and last + FLUSH_EVERY > now:
                gevent.sleep(last + FLUSH_EVERY - now)
            last, calls = time.monotonic(), calls + 1
            self.wake.clear()
            batch, self.dirty = self.dirty, {}
            try:
                self.flush(list(batch.values()))
                backoff = 0.0
                self.flushed.set()  # relays waiting for room in their outbox go on
                self.flushed.clear()
                if self.dirty:
                    self.wake.set()
            except Exception as exc:  # noqa: BLE001 — Redis away, or a bug: the writer must go on either way
                if isinstance(exc, self.errors):
                    chat.log_limited("redis", "writing to Redis failed: %s; trying again", chat.redact_url(str(exc)))
                else:
                    log.exception("writing to Redis failed; trying again")
                for stream in batch.values():
                    self.dirty.setdefault(stream.id, stream)
                backoff = min(1.0, backoff * 2 or 0.05)
                gevent.sleep(backoff)
                self.wake.set()

    def flush(self, batch):
        """Write these streams' queued events and publish them (one script call for all), then hand them to this
        process's readers, and give back the places of the answers that finished."""
        parts, count, plan, finished, budget = [], 0, [], [], EVENTS_PER_CALL
        # Answers with few events first: a flooding one takes what is left of the call, never a
        # well-behaved answer's turn.
        for stream in sorted(batch, key=lambda s: len(s.outbox)):
            if budget <= 0:
                self.dirty[stream.id] = stream  # the next call takes it
                continue
            if stream.flushed < 0:
                self.rewrite(stream)
            chunk = stream.outbox[:budget]
            entries = [e for e in chunk if e[0] == 0 or e[0] > stream.flushed]
            # The script's arguments in Redis's own protocol, made here: redis-py's packer costs ~8 µs an event.
            sid = stream.id.encode()
            head = b"$%d\r\n%s\r\n" % (len(sid), sid)
            for n, kind, payload in entries:
                number = b"%d" % n
                parts.append(b"%s$%d\r\n%s\r\n$1\r\n%s\r\n$%d\r\n%s\r\n" % (
                    head, len(number), number, kind.encode(), len(payload), payload))
                if kind == "d":
                    finished.append(stream)
            budget -= len(chunk)
            count += len(entries)
            plan.append((stream, len(chunk), entries))
            if len(stream.outbox) > len(chunk):
                self.dirty[stream.id] = stream
        # A finished answer gives its places back before anyone sees its done event, as in one process:
        # whoever reads done may send again in that conversation at once.
        for stream in finished:
            self.release_script(keys=self.keys(stream.id, stream.owner, stream.conversation_id),
                                args=[stream.id, self.ttl_ms(max(chat.settings.grace, 30)), 1])
        # One script call, not a pipeline: redis-py's pipelines ask whether the scripts are loaded first,
        # a second round trip each time.
        reply = self.write(self.append_script, parts, count)
        # Events not written: position in args -> 0 (the log is gone: Redis lost it) or -1 (refused).
        failed = dict(zip(reply[::2], reply[1::2]))
        position = 0
        for stream, taken, entries in plan:
            del stream.outbox[:taken]
            stopped, fenced, written = False, None, []
            for index, (n, kind, payload) in enumerate(entries):
                problem, position = failed.get(position), position + 1
                if stopped:
                    continue
                if problem == -1 and fenced is None:
                    fenced = self.refused(stream)
                if problem == 0:
                    # The next flush writes the log again from what this process holds, then these
                    # events (the done event is not in the answer's log, so it must not be dropped).
                    stopped, stream.flushed = True, -1
                    stream.outbox[:0] = entries[index:]
                    self.dirty[stream.id] = stream
                    self.wake.set()
                elif problem == -1 and fenced:
                    stopped = True
                else:  # written (or, refused as a repeat, written by an earlier try whose reply was lost)
                    stream.flushed = max(stream.flushed, n)
                    if stream.id in self.feeds:
                        written.append((n, event_frame(n, kind, payload), kind == "d"))
            if written:
                self.deliver(stream.id, written)

    def write(self, script, parts, count):
        """Run a script on the writer's connection with count events of packed arguments (loading the script
        first if Redis does not know it)."""
        command = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n0\r\n%s" % (
            3 + 4 * count, script.sha.encode(), b"".join(parts))
        try:
            self.writer.send_packed_command([command])
            return self.writer.read_response()
        except self.no_script:
            self.writer.send_command("SCRIPT", "LOAD", script.script)
            self.writer.read_response()
            self.writer.send_packed_command([command])
            return self.writer.read_response()
        except self.errors:
            self.writer.disconnect()  # connects again at the next call
            raise

    def rewrite(self, stream):
        """Write a stream's whole log again (Redis lost it), as one transaction, from what this process holds."""
        log_key = f"chat:{stream.id}:log"
        pipe = self.establish(self.redis.pipeline(transaction=True), stream)  # the job record went with it
        pipe.delete(log_key)
        upto = len(stream.log.kinds)
        for n, kind, text, tail in stream.log.entries(0, upto):
            if kind == "block":
                payload = chat.block_frame(stream.id, chat.render_block(text), tail, n)
            else:
                payload = text.encode()
            pipe.xadd(log_key, {"k": KIND_CODES[kind], "v": payload}, id=f"{n}-0")
        pipe.pexpire(log_key, self.kept_ms())
        pipe.execute()
        stream.flushed = upto
        self.deliver(stream.id, [(REREAD_LOG, None, False)])  # readers here read what they missed from the log
        log.info("wrote the log of a live answer to Redis again (%d events)", upto)

    def refused(self, stream):
        """Redis refused an event: True if another process finished this answer (this one was taken for dead),
        which then stops here; False for a repeat (an earlier try was written, its reply lost)."""
        try:
            done = self.redis.hget(f"chat:{stream.id}:job", "done") == b"1"
        except self.errors:
            return False
        if done and not stream.finished:
            log.warning("another process finished an answer this one was still writing; it stops here")
            stream.outbox.clear()
            stream.finished_at = time.monotonic()  # its own done would come after the one readers got
            if stream.greenlet:
                stream.greenlet.kill(block=False)
            chat.Streams.forget(self, stream)
            return True
        return False

    def drain(self, timeout=3.0):
        """Wait (a little) until the writer has sent everything queued: at shutdown."""
        deadline = time.monotonic() + timeout
        while (self.dirty or any(s.outbox for s in self.by_id.values())) and time.monotonic() < deadline:
            gevent.sleep(0.02)

    def forget(self, stream):
        """Drop a stream; one that never started gives its place back in Redis at once."""
        super().forget(stream)
        if stream.greenlet is None:
            gevent.spawn(self.release_quietly, stream)

    def release_quietly(self, stream):
        """Release a never-started stream's lease and conversation lock (the lease runs out anyway)."""
        with contextlib.suppress(*self.errors):
            self.release_script(keys=self.keys(stream.id, stream.owner, stream.conversation_id),
                                args=[stream.id, 0, 0])

    # -- reading -----------------------------------------------------------------------------

    def events(self, stream_id, owner, last_id):
        """The response body of GET /events: the log after last_id, then new events as they are written."""
        self.start()
        try:
            job = self.redis.hgetall(f"chat:{stream_id}:job") if stream_id else {}
        except self.errors:
            return [chat.SSE_HELLO]  # Redis is down: the browser comes back after the retry interval
        if not job:
            return [chat.SSE_HELLO + chat.sse_frame("done", chat.render_missing(stream_id), 1)]
        if job.get(b"owner", b"").decode() != owner:
            bottle.abort(404, "No such answer.")
        done = job.get(b"done") == b"1"
        if done:
            # Finished: its done bubble, which replaces every token in the page, is all a reader needs.
            # Reading the log instead would cost each reconnect a parse of every token of the answer.
            try:
                last = self.redis.xrevrange(f"chat:{stream_id}:log", "+", "-", count=1)
            except self.errors:
                return [chat.SSE_HELLO]
            if last and last[0][1].get(b"k") == b"d":
                return [chat.SSE_HELLO + last[0][1][b"v"]]
        feed = self.feeds.get(stream_id, ())
        if not done and (len(feed) >= chat.settings.readers_per_stream
                         or self.owner_readers[owner] >= chat.settings.readers_per_owner):
            bottle.abort(429, chat.TOO_MANY_READERS)
        return self.read(stream_id, Reader(last_id, owner), bottle.request.environ)

    def read(self, stream_id, reader, environ=None):
        """Yield the log from the reader's last id, then events as they come: each once, in order (environ: the
        request's, for its connection)."""
        environ = environ or {}
        self.attach(stream_id, reader)
        try:
            yield chat.SSE_HELLO
            reader.connect(environ)
            while True:
                if reader.behind:
                    reader.behind = False
                    for frames, done in self.backfill(stream_id, reader):
                        yield frames
                        if done:
                            return
                try:
                    items = reader.wait(timeout=chat.settings.ping_interval)
                except gevent.queue.Empty:
                    yield chat.SSE_PING
                    continue
                out = []
                for n, frame, done in itertools.chain.from_iterable(items):
                    if n == REREAD_LOG:
                        reader.behind = True
                    elif n == 0:
                        out.append(frame)  # the waiting clock: not logged
                    elif n == reader.last + 1 and not reader.behind:
                        out.append(frame)
                        reader.last = n
                        if done:
                            yield chat.in_turn(b"".join(out))
                            return
                    elif n > reader.last:
                        reader.behind = True  # a gap (pub/sub dropped something): the log has it
                if out:
                    yield chat.in_turn(b"".join(out))
                reader.pause_if_behind()  # (also when woken with nothing new: a write the socket refused)
        finally:
            self.detach(stream_id, reader)

    def backfill(self, stream_id, reader, batch=512):
        """Yield (frames, done) from the log after the reader's last id, up to a gap or the end."""
        log_key = f"chat:{stream_id}:log"
        while True:
            try:
                entries = self.redis.xrange(log_key, f"{reader.last + 1}-0", "+", count=batch)
            except self.errors:
                return  # the janitor nudges the reader when Redis is back
            out = []
            for entry_id, fields in entries:
                n = int(entry_id.split(b"-")[0])
                if n != reader.last + 1:
                    break  # a hole: the writer is writing the log again; wait for it
                kind = fields[b"k"].decode()
                out.append(event_frame(n, kind, fields[b"v"]))
                reader.last = n
                if kind == "d":
                    yield b"".join(out), True
                    return
            else:
                if out:
                    yield b"".join(out), False
                if len(entries) == batch:
                    continue
                return
            if out:
                yield b"".join(out), False
            return

    def attach(self, stream_id, reader):
        """Add a reader to its stream's feed; the first reader of another process's answer subscribes."""
        feed = self.feeds.setdefault(stream_id, set())
        feed.add(reader)
        self.owner_readers[reader.owner] += 1
        if len(feed) == 1 and stream_id not in self.by_id and self.pubsub is not None:
            # Wait until Redis confirms: what is published from then on comes here, and what came
            # before is in the log the reader reads next (an event is published only once logged).
            channel = f"chat:{stream_id}:live"
            confirmed = self.subscribing.setdefault(channel, gevent.event.Event())
            with contextlib.suppress(*self.errors):
                self.pubsub.subscribe(channel)
                confirmed.wait(timeout=1.0)
            self.subscribing.pop(channel, None)

    def detach(self, stream_id, reader):
        """Remove a reader; the last one of a feed unsubscribes."""
        feed = self.feeds.get(stream_id)
        if feed is None or reader not in feed:
            return
        feed.discard(reader)
        self.owner_readers[reader.owner] -= 1
        if not self.owner_readers[reader.owner]:
            del self.owner_readers[reader.owner]
        if not feed:
            del self.feeds[stream_id]
            if self.pubsub is not None:
                with contextlib.suppress(*self.errors):
                    self.pubsub.unsubscribe(f"chat:{stream_id}:live")
        stream = self.by_id.get(stream_id)
        if stream is not None:
            stream.left_at = time.monotonic()

    def deliver(self, stream_id, events):
        """Hand events of a stream, [(id, frame, done)], to this process's readers of it: one queue item
        each, however many events."""
        if not events:
            return
        # Straight to the socket of a reader that is idle, if these are in order, without the end, and come
        # next for it: then they are joined once for all such readers.
        first, frames = events[0][0], None
        in_order = all(n == first + i and not done for i, (n, _, done) in enumerate(events))
        for reader in self.feeds.get(stream_id, ()):
            if in_order and reader.idle and not reader.behind and reader.last + 1 == first:
                frames = frames or b"".join(frame for _, frame, _ in events)
                if reader.send_now(frames):
                    reader.last += len(events)
                    continue
            reader.enqueue(events)

    def listen_forever(self):
        """The pub/sub greenlet: one connection per process, fanned out to the local readers' queues."""
        backoff = 0.0
        while True:
            pubsub = self.subscriber.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.control, *[f"chat:{i}:live" for i in self.feeds if i not in self.by_id])
                self.pubsub = pubsub
                if self.lost:
                    self.lost = False
                    self.recover()
                backoff = 0.0
                while True:  # parse_response, not listen(): no dict per message
                    reply = pubsub.parse_response(block=True)
                    if reply and reply[0] == b"message":
                        self.on_message(reply[1], reply[2])
                    elif reply and reply[0] == b"subscribe" and reply[1].decode() in self.subscribing:
                        self.subscribing[reply[1].decode()].set()
            except self.errors as exc:
                chat.log_limited("redis", "lost the connection to Redis: %s", chat.redact_url(str(exc)))
            self.pubsub, self.lost = None, True
            with contextlib.suppress(Exception):
                pubsub.close()
            backoff = min(1.0, backoff * 2 or 0.05)
            gevent.sleep(backoff)

    def on_message(self, channel, data):
        """A published event (for the readers here) or a Stop for an answer written here."""
        if channel == self.control.encode():
            self.stop(data.decode())
            return
        stream_id = channel.decode()[5:-5]  # chat:<id>:live
        if stream_id not in self.feeds:
            return
        position, events = 0, []
        while position < len(data):  # events, each "id kind size payload"
            head = data.index(b" ", data.index(b" ", data.index(b" ", position) + 1) + 1)
            n, kind, size = data[position:head].split(b" ")
            n, kind, end = int(n), kind.decode(), head + 1 + int(size)
            events.append((n, event_frame(n, kind, data[head + 1:end]), kind == "d"))
            position = end
        self.deliver(stream_id, events)

    def recover(self):
        """Back after a lost connection: every reader reads the log again, and every answer written here is
        checked at once (Redis may have restarted empty)."""
        log.info("connected to Redis again")
        for feed in self.feeds.values():
            for reader in feed:
                reader.enqueue([(REREAD_LOG, None, False)])
        self.renewed = 0.0

    # -- stopping and finding ----------------------------------------------------------------

    def stop_for(self, stream_id, owner):
        """Stop an answer wherever it is being written: here at once, elsewhere through its process's channel
        (and the job's stop flag, which that process's janitor also reads)."""
        if stream_id in self.by_id:
            return super().stop_for(stream_id, owner)
        try:
            job = self.redis.hgetall(f"chat:{stream_id}:job") if stream_id else {}
            if not job or job.get(b"owner", b"").decode() != owner:
                bottle.abort(404, "No such answer.")
            if job.get(b"done") != b"1":
                self.stop_remote(stream_id, job)
        except self.errors:
            bottle.abort(503, "The server cannot reach its shared state just now; try again shortly.")
        return job.get(b"conversation", b"").decode() or None

    def stop_remote(self, stream_id, job):
        """Raise an answer's stop flag (its process's janitor reads it) and tell that process at once."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(f"chat:{stream_id}:job", "stop", 1)
        pipe.publish(f"chat:ctl:{job.get(b'instance', b'').decode()}", stream_id)
        pipe.execute()

    def stop_conversation(self, conversation_id):
        """Stop the answer being written in a conversation, wherever it is."""
        super().stop_conversation(conversation_id)
        with contextlib.suppress(*self.errors):
            stream_id = (self.redis.get(f"chat:conv:{conversation_id}") or b"").decode()
            if stream_id and stream_id not in self.by_id:
                self.stop_remote(stream_id, self.redis.hgetall(f"chat:{stream_id}:job"))

    def open(self):
        """Fail at start, not at the first message, when Redis cannot be reached."""
        self.redis.ping()

    def for_message(self, message_id, conversation_id):
        """The stream writing this stored answer: here, or in another process (Redis says which)."""
        stream = super().for_message(message_id, conversation_id)
        if stream is not None:
            return stream
        try:
            stream_id = self.redis.get(f"chat:msg:{conversation_id}:{message_id}")
        except self.errors:
            return None
        return RemoteAnswer(stream_id.decode()) if stream_id else None

    # -- the janitor's share ----------------------------------------------------------------

    def tend_shared_answers(self, now):
        """Renew the leases of the answers written here (and obey stop flags), nudge readers that fell
        behind, and finish the answers of writers that died."""
        try:
            if now - self.renewed >= chat.settings.lease_seconds / 3:
                self.renewed = now
                self.renew()
            self.nudge()
            self.find_dead()
        except self.errors as exc:
            chat.log_limited("redis", "Redis is unreachable: %s", chat.redact_url(str(exc)))

    def renew(self):
        """One script call: every live answer's lease renewed, and what became of it (stopped, finished
        elsewhere, or lost with a Redis that restarted empty)."""
        live = [s for s in self.by_id.values() if s.finished_at is None and s.greenlet is not None]
        if not live:
            return
        args = [time.time() + chat.settings.lease_seconds, self.kept_ms()]
        for stream in live:
            args += (stream.id, stream.owner, stream.conversation_id or "", stream.message_id or "")
        lost = self.redis.pipeline(transaction=False)
        for stream, state in zip(live, self.renew_script(args=args)):
            if stream.finished_at is not None:
                continue  # it finished meanwhile, and gave its places back
            if state == 3:  # the record was gone: put it all back
                self.establish(lost, stream)
                stream.flushed = -1
                self.dirty[stream.id] = stream
                self.wake.set()
            elif state == 2:
                self.refused(stream)
            elif state == 1:
                self.stop(stream.id)
        if len(lost):
            lost.execute()
            log.info("Redis had lost live answers; their records and logs are written again")

    def nudge(self):
        """Readers of other processes' answers that are behind the log's end read it again (pub/sub may drop)."""
        remote = [i for i in self.feeds if i not in self.by_id]
        if not remote:
            return
        for stream_id, top in zip(remote, self.tops_script(args=remote)):
            for reader in self.feeds.get(stream_id, ()):
                if reader.last < top:
                    reader.enqueue([(REREAD_LOG, None, False)])

    def find_dead(self):
        """Answers whose lease ran out, written by a process that died: finish them as interrupted."""
        for stream_id in self.redis.zrangebyscore("chat:leases", "-inf", time.time(), start=0, num=16):
            stream_id = stream_id.decode()
            if stream_id not in self.by_id and stream_id not in self.finishing:
                self.finishing.add(stream_id)
                gevent.spawn(self.finish_dead, stream_id)

    def finish_dead(self, stream_id):
        """Read a dead writer's log, store the text everyone saw, and end the answer with an interrupted bubble."""
        try:
            log_key, job_key, *_ = self.keys(stream_id)
            job = {k.decode(): v.decode() for k, v in self.redis.hgetall(job_key).items()}
            if not job or job.get("done") == "1":
                self.redis.zrem("chat:leases", stream_id)
                return
            text = {"m": [], "r": []}
            top, after = 0, "-"
            while True:
                entries = self.redis.xrange(log_key, after, "+", count=1024)
                for entry_id, fields in entries:
                    top = int(entry_id.split(b"-")[0])
                    if fields[b"k"].decode() in text:
                        text[fields[b"k"].decode()].append(fields[b"v"].decode())
                if len(entries) < 1024:
                    break
                after = f"({entries[-1][0].decode()}"
            message_id = int(job["message"]) if job.get("message") else None
            conversation_id = job.get("conversation") or None
            answer = chat.make_answer(stream_id, conversation_id, "".join(text["m"]).lstrip("\r\n"),
                                      "".join(text["r"]).strip(), "interrupted", notes=[chat.NOTES["interrupted"]],
                                      model=job.get("model") or None, created=float(job.get("started") or 0) or None,
                                      elapsed=round(time.time() - float(job.get("started") or time.time()), 3))
            nav = ""
            if message_id is not None:
                with contextlib.suppress(*chat.store.errors):
                    nav = chat.sibling_nav(conversation_id, message_id)
            frame = chat.sse_frame("done", chat.render_answer(answer, True, nav), top + 1)
            keys = self.keys(stream_id, job.get("owner", ""), conversation_id)
            if self.fence_script(keys=keys, args=[top, time.time(), frame, stream_id,
                                                  self.ttl_ms(max(chat.settings.grace, 30)), f"chat:{stream_id}:live"]):
                log.warning("finished an answer whose process stopped renewing it (%d events)", top)
                if message_id is not None:
                    try:
                        chat.store.finish_answer(message_id, answer)
                    except chat.store.errors as exc:
                        log.error("saving an interrupted answer failed: %s", exc)
        except self.errors as exc:
            chat.log_limited("redis", "Redis is unreachable: %s", chat.redact_url(str(exc)))
        finally:
            self.finishing.discard(stream_id)




# ---------------------------------------------------------------------------
# PostgreSQL (CHAT_DATABASE_URL): the Database interface over psycopg, and its migrations
# ---------------------------------------------------------------------------





# PostgreSQL's script for each named step of chat.MIGRATIONS that it needs (one list of steps, two dialects):
# it started at the schema of "leases"; its schema_version counts the steps it has applied, in that order.
POSTGRESQL_STEPS = {
    "leases": """
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY, owner TEXT NOT NULL, title TEXT NOT NULL, system_prompt TEXT NOT NULL DEFAULT '',
        model TEXT, created DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL, leaf_id BIGINT,
        temperature DOUBLE PRECISION, top_p DOUBLE PRECISION, max_tokens INTEGER
    );
    CREATE INDEX conversations_by_owner ON conversations (owner, updated DESC);
    CREATE INDEX conversations_search ON conversations USING GIN (to_tsvector('simple', title));
    CREATE TABLE messages (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        parent_id BIGINT REFERENCES messages (id) ON DELETE CASCADE,
        role TEXT NOT NULL, content TEXT NOT NULL DEFAULT '', reasoning TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL DEFAULT 'done', error TEXT, notes TEXT NOT NULL DEFAULT '[]',
        footer TEXT NOT NULL DEFAULT '', finish_reason TEXT, usage TEXT, model TEXT,
        elapsed DOUBLE PRECISION, created DOUBLE PRECISION NOT NULL, lease_until DOUBLE PRECISION
    );
    CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
    CREATE INDEX messages_by_parent ON messages (parent_id);
    CREATE INDEX messages_streaming ON messages (lease_until) WHERE status = 'streaming';
    CREATE INDEX messages_search ON messages USING GIN (to_tsvector('simple', content));
    CREATE TABLE secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE sessions (token_hash TEXT PRIMARY KEY, password_tag TEXT NOT NULL, expires DOUBLE PRECISION NOT NULL);
    CREATE TABLE owner_settings (owner TEXT PRIMARY KEY, system_prompt TEXT NOT NULL DEFAULT '');
    """,
    "search by owner": """
    ALTER TABLE messages ADD COLUMN owner TEXT;
    UPDATE messages m SET owner = c.owner FROM conversations c WHERE c.id = m.conversation_id;
    CREATE FUNCTION message_owner() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        NEW.owner := (SELECT owner FROM conversations WHERE id = NEW.conversation_id);
        RETURN NEW;
    END $$;
    CREATE TRIGGER message_owner BEFORE INSERT ON messages FOR EACH ROW EXECUTE FUNCTION message_owner();
    -- COST: computing it row by row is what the index is for; the planner must never prefer that.
    CREATE FUNCTION search_terms(owner TEXT, body TEXT) RETURNS tsvector LANGUAGE sql IMMUTABLE PARALLEL SAFE
    COST 100000 AS $$
        SELECT array_to_tsvector(ARRAY(SELECT left(md5(coalesce(owner, '')), 8) || lexeme
                                       FROM unnest(to_tsvector('pg_catalog.simple', body))))
    $$;
    CREATE FUNCTION search_query(owner TEXT, words TEXT) RETURNS tsquery LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT string_agg('''' || replace(replace(left(md5(owner), 8) || lexeme, chr(92), chr(92) || chr(92)),
                                          '''', '''''') || ''':*', ' & ')::tsquery
        FROM unnest(to_tsvector('pg_catalog.simple', words))
    $$;
    -- fastupdate off: entries waiting in GIN's pending list are read by every search, every owner's.
    DROP INDEX messages_search;
    CREATE INDEX messages_search ON messages USING GIN (search_terms(owner, content)) WITH (fastupdate = off)
        WHERE status != 'streaming';
    DROP INDEX conversations_search;
    CREATE INDEX conversations_search ON conversations USING GIN (search_terms(owner, title)) WITH (fastupdate = off);
    """,
    "accounts and attachments": """
    CREATE TABLE users (name TEXT PRIMARY KEY, owner TEXT NOT NULL UNIQUE, password_hash TEXT,
                        created DOUBLE PRECISION NOT NULL);
    ALTER TABLE sessions ADD COLUMN user_name TEXT REFERENCES users (name) ON DELETE CASCADE,
        ADD COLUMN created DOUBLE PRECISION, ADD COLUMN seen DOUBLE PRECISION, ADD COLUMN agent TEXT;
    CREATE INDEX sessions_by_user ON sessions (user_name);
    CREATE TABLE attachments (
        id TEXT PRIMARY KEY, message_id BIGINT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        name TEXT NOT NULL, type TEXT NOT NULL, data BYTEA NOT NULL, created DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX attachments_by_message ON attachments (message_id);
    """,
    "shared links": """
    CREATE TABLE shares (token TEXT PRIMARY KEY, conversation_id TEXT NOT NULL REFERENCES conversations (id)
                         ON DELETE CASCADE, created DOUBLE PRECISION NOT NULL);
    CREATE INDEX shares_by_conversation ON shares (conversation_id);
    """,
    "pins, archive and trash": """
    ALTER TABLE conversations ADD COLUMN pinned DOUBLE PRECISION, ADD COLUMN archived DOUBLE PRECISION,
        ADD COLUMN deleted DOUBLE PRECISION;
    CREATE INDEX conversations_trash ON conversations (deleted) WHERE deleted IS NOT NULL;
    """,
    "presets": """
    CREATE TABLE presets (owner TEXT NOT NULL, name TEXT NOT NULL, model TEXT, system_prompt TEXT NOT NULL DEFAULT '',
                          temperature DOUBLE PRECISION, top_p DOUBLE PRECISION, max_tokens INTEGER,
                          created DOUBLE PRECISION NOT NULL, PRIMARY KEY (owner, name));
    """,
}


class Row(tuple):
    """A PostgreSQL row readable by column name or position, like sqlite3.Row."""

    columns = {}

    def __getitem__(self, key):
        return tuple.__getitem__(self, self.columns[key] if isinstance(key, str) else key)


@functools.lru_cache(maxsize=256)
def row_class(names):
    """A Row subclass for one set of column names."""
    return type("Row", (Row,), {"columns": {name: index for index, name in enumerate(names)}})


class PostgresDatabase:
    """A few PostgreSQL connections shared by the greenlets, one statement or transaction at a time on each.

    psycopg waits cooperatively only when it was imported after gevent patched select (it is:
    chat.py patches first and imports psycopg here); the check below refuses to run otherwise,
    since its C wait would block every greenlet.
    """

    name = "PostgreSQL"
    null_safe_equal = "IS NOT DISTINCT FROM"
    byte_length = "OCTET_LENGTH({})"
    owner_moved = ("UPDATE messages m SET owner = c.owner FROM conversations c "  # messages carry the owner here
                   "WHERE c.id = m.conversation_id AND m.conversation_id = ?")

    def __init__(self, url, size=4):
        try:  # optional: only with CHAT_DATABASE_URL
            import psycopg
            import psycopg.waiting
        except ImportError:
            raise RuntimeError("CHAT_DATABASE_URL names PostgreSQL, which needs psycopg: "
                               "pip install -r requirements-scale.txt") from None
        if psycopg.waiting.wait is getattr(psycopg.waiting, "wait_c", None):
            raise RuntimeError("psycopg would block every greenlet: it was imported before gevent patched select")
        self.psycopg = psycopg
        self.errors = (sqlite3.Error, psycopg.Error)  # what a failing statement raises, for `except store.errors`
        self.url = url
        self.pool = Queue()
        self.closed = False
        self.connections = [self.connect() for _ in range(size)]
        for connection in self.connections:
            self.pool.put(connection)
        self.local = gevent.local.local()  # the connection a greenlet's transaction holds
        self.migrate()

    def connect(self):
        """A new autocommit connection whose rows read like sqlite3.Row."""
        def rows(cursor):
            names = tuple(column.name for column in cursor.description or ())
            return row_class(names)
        return self.psycopg.connect(self.url, autocommit=True, row_factory=rows)

    def migrate(self):
        """Bring the schema up to date, one process at a time (an advisory lock), each step in a transaction."""
        with self.transaction():
            self.execute("SELECT pg_advisory_xact_lock(7415)")  # 7415: chat.py's migrations
            self.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = self.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            steps = [POSTGRESQL_STEPS[m.name] for m in chat.MIGRATIONS if m.name in POSTGRESQL_STEPS]
            for script in steps[version:]:
                self.execute(script)
            if not row:
                self.execute("INSERT INTO schema_version VALUES (?)", (len(steps),))
            elif version < len(steps):
                self.execute("UPDATE schema_version SET version = ?", (len(steps),))

    @contextlib.contextmanager
    def connection(self):
        """The greenlet's transaction connection, or one from the pool for a single statement."""
        pinned = getattr(self.local, "connection", None)
        if pinned is not None:
            yield pinned
            return
        connection = self.take()
        try:
            yield connection
        finally:
            self.pool.put(connection)

    def take(self):
        """A connection from the pool (waiting for one), or an error once the database is closed."""
        if self.closed:
            raise self.psycopg.OperationalError("the database was closed (chat.py is stopping)")
        return self.pool.get()

    def execute(self, sql, args=()):
        """Run one statement (written with ? placeholders); return its rows and rowcount."""
        with self.connection() as connection, connection.cursor() as cursor:
            cursor.execute(sql.replace("%", "%%").replace("?", "%s"), args)
            rows = cursor.fetchall() if cursor.description else []
            return chat.Result(rows, cursor.rowcount)

    def executemany(self, sql, rows):
        """Run one statement for each row."""
        with self.connection() as connection, connection.cursor() as cursor:
            cursor.executemany(sql.replace("%", "%%").replace("?", "%s"), rows)
            return cursor.rowcount

    @contextlib.contextmanager
    def transaction(self):
        """A transaction on one connection that this greenlet's statements use until it ends."""
        if getattr(self.local, "connection", None) is not None:
            yield  # already inside one
            return
        connection = self.take()
        self.local.connection = connection
        try:
            with connection.transaction():
                yield
        finally:
            self.local.connection = None
            self.pool.put(connection)

    def search(self, owner, words, limit):
        """This owner's titles and each conversation's best message matching every word (as a prefix), best first:
        tsvector."""
        query = " & ".join(f"{word}:*" if len(word) >= 3 else word for word in words)
        marks = "StartSel=\x01, StopSel=\x02, MaxWords=30, MinWords=10, HighlightAll=false"
        with self.transaction():
            self.execute(f"SET LOCAL statement_timeout = {int(chat.SEARCH_SECONDS * 1000)}")
            return self.search_rows(query, owner, limit, marks, " ".join(words))

    def search_rows(self, query, owner, limit, marks, words):
        """The search's two statements (inside search()'s transaction, with its time limit).

        The owner's keyed index finds the candidates (search_query, see the "search by owner" migration); the query as
        before picks the rows among them, ranks and highlights them.
        """
        titles = self.execute(
            "SELECT c.id AS conversation_id, c.title, c.archived, NULL::BIGINT AS message_id, NULL AS role, "
            "ts_headline('simple', c.title, q, 'HighlightAll=true, StartSel=\x01, StopSel=\x02') AS snippet "
            "FROM conversations c, to_tsquery('simple', ?) q "
            "WHERE c.owner = ? AND c.deleted IS NULL AND search_terms(c.owner, c.title) @@ search_query(?, ?) "
            "AND to_tsvector('simple', c.title) @@ q "
            "ORDER BY ts_rank(to_tsvector('simple', c.title), q) DESC LIMIT ?",
            (query, owner, owner, words, limit)).fetchall()
        messages = self.execute(  # a conversation's best message only, headlined alone
            "SELECT conversation_id, title, archived, message_id, role, "
            f"ts_headline('simple', content, to_tsquery('simple', ?), '{marks}') AS snippet FROM ("
            "SELECT DISTINCT ON (c.id) c.id AS conversation_id, c.title, c.archived, m.id AS message_id, m.role, "
            "m.content, ts_rank(to_tsvector('simple', m.content), q) AS score "
            "FROM messages m JOIN conversations c ON c.id = m.conversation_id, to_tsquery('simple', ?) q "
            "WHERE c.owner = ? AND c.deleted IS NULL AND m.status != 'streaming' "
            "AND search_terms(m.owner, m.content) @@ search_query(?, ?) "
            "AND to_tsvector('simple', m.content) @@ q "
            "ORDER BY c.id, score DESC, m.id) best ORDER BY score DESC LIMIT ?",
            (query, query, owner, owner, words, limit)).fetchall()
        return (titles + messages)[:limit]

    def size(self):
        """Bytes of chat.py's tables in their schema, indexes and TOAST included (not others sharing the database)."""
        return int(self.execute("SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                                "WHERE n.nspname = current_schema() AND c.relkind = 'r'").fetchone()[0])

    def close(self, timeout=5.0):
        """Close every connection once no statement uses it: closing one under a statement that another greenlet
        is waiting on frees what libpq still needs, and the process crashes. One still busy after the timeout is
        left to the garbage collector."""
        self.closed = True
        deadline = time.monotonic() + timeout
        for _ in self.connections:
            try:
                self.pool.get(timeout=max(0.0, deadline - time.monotonic())).close()
            except gevent.queue.Empty:
                log.warning("a PostgreSQL statement was still running at close; its connection is left open")
                return


# ---------------------------------------------------------------------------
# Workers (--workers N): copies of chat.py on one port, sharing their answers through Redis
# ---------------------------------------------------------------------------

def reuse_port_listener(host, port):
    """A listening socket that other workers bind too (SO_REUSEPORT)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.listen(1024)
    return sock


def run_workers(count):
    """--workers N: run N copies of this very command on the same port, start again one that dies, and end them
    all on SIGTERM or Ctrl-C. Each is a whole chat.py; Redis and the database are what they share."""
    # The same program: the script (or the .pyz) with its interpreter, or the one-file executable itself.
    command = [sys.executable, *([] if getattr(sys, "frozen", False) else [sys.argv[0]]), *sys.argv[1:]]
    # Every worker must accept the others' calls to the demo model: one key for all.
    env = {**os.environ, "CHAT_WORKER": "1", "CHAT_DEMO_KEY": chat.settings.demo_key}
    children = [subprocess.Popen(command, env=env) for _ in range(count)]
    log.info("chat.py with %d workers on http://%s:%d/", count, chat.settings.host, chat.settings.port)
    stopping = gevent.event.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, stopping.set)
    started = [time.monotonic()] * count
    while not stopping.wait(0.5):
        for index, child in enumerate(children):
            if child.poll() is not None and time.monotonic() - started[index] > 1:  # at most once a second
                log.warning("worker %d exited (%s); starting another", child.pid, child.returncode)
                children[index], started[index] = subprocess.Popen(command, env=env), time.monotonic()
    for child in children:
        with contextlib.suppress(OSError):
            child.terminate()
    deadline = time.monotonic() + 10
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
    return 0
