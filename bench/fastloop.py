"""What the benchmark's own processes share: as many file descriptors as allowed, and the fastest event loop."""
import asyncio
import resource


def new_loop():
    """Raise RLIMIT_NOFILE to its hard limit and install a uvloop (or plain asyncio) loop."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop
