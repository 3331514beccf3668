"""The local backend's readiness probe, in the words a start failure gives.

Ready is what a Kubernetes httpGet probe calls ready: an answer of 200-399, redirects
not followed. Anything else (the 404 of an app that ignored its prefix, a 500, no
connection) is not, and its answer is kept for the failure message.
"""

import os
import signal

import aiohttp

from dispatcher.backends.launch import no_answer, status_answer

PROBE_TIMEOUT_S = 2.0  # one readiness request, at most


async def probe(http: aiohttp.ClientSession, url: str, limit_s: float) -> tuple[bool, str]:
    """Whether `url` answers 200-399 within `limit_s` (redirects not followed), and its
    answer in words: `404 Not Found`, `no answer within 2 s`, `connection refused`."""
    try:
        timeout = aiohttp.ClientTimeout(total=limit_s)
        async with http.get(url, allow_redirects=False, timeout=timeout) as resp:
            return 200 <= resp.status < 400, status_answer(resp.status, resp.reason or "")
    except TimeoutError:
        return False, no_answer(limit_s)
    except aiohttp.ClientConnectorError as exc:
        errno = getattr(exc.os_error, "errno", None)
        return False, os.strerror(errno).lower() if errno else "no connection"
    except aiohttp.ClientError as exc:
        return False, type(exc).__name__


def exit_message(code: int | None) -> str:
    """Why a start failed when the app's process ended first, from its exit code."""
    if code is None:
        what = "the app exited"
    elif code < 0:
        what = f"the app was killed by {signal.Signals(-code).name}"
    else:
        what = f"the app exited with code {code}"
    return f"{what} before it was ready"
