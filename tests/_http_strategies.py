"""HTTP requests thrown at ``imagerec serve``: ``tests/test_serve_fuzz.py`` runs them briefly,
``benchmarks/fuzz_serve.py`` at length.

What is here, shared by both:

* Hypothesis strategies of requests as a client can send them: methods, paths (the app's routes
  from its OpenAPI document, their variants, traversal attempts, unicode, very long), query
  strings (``top_k`` and ``tta`` with odd values, unknown parameters, raw percent bytes), headers
  (Host, Content-Type, Content-Length, Authorization, bytes 0x80-0xFF), and bodies (random bytes,
  tiny images of every accepted format and several modes, broken, thin or too large ones,
  multipart forms with many, empty, truncated or oddly named parts);
* :class:`AsgiClient`, which drives the app in-process with exactly the ASGI messages uvicorn
  would send (raw bytes in headers and paths, a body in chunks, a client that disconnects);
* :func:`raw_http`, the same request as bytes on a socket, for a real uvicorn server;
* :func:`problems`, the properties every answer must have: no 5xx but an intentional 503 (server
  full, warming up) or 504 (--timeout), every error a JSON ``{"error": "..."}`` with a 4xx, no
  traceback or Python exception text in any body (unless the client sent that text itself).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import json
import logging
import os
import random
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from ._mutate import mutate

TOKEN = "fuzz-token-0123"
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
MODES = ("RGB", "L", "RGBA", "P", "1", "I;16", "CMYK", "LA")
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT", "PROPFIND", "get", "X-Y")
# uvicorn answers these itself (h11 refuses the request before the app sees it): allowed as is
SERVER_LAYER_400 = (b"Invalid HTTP request received.",)
INTENTIONAL_5XX = {503: ("server full", "warming up"), 504: ("--timeout",)}
# in any body: a traceback, a source line, an object's repr; in an error: an exception's class name
LEAK = re.compile(rb"Traceback \(most recent call last\)|File \"[^\"]*\", line \d+|<[\w.]+ object at 0x[0-9a-fA-F]+>")
EXCEPTION_NAME = re.compile(rb"\b[A-Z][A-Za-z0-9]*(?:Error|Exception|Interrupt|Exit)\b")  # OSError, HTTPException
NON_JSON_OK = ("/docs", "/redoc", "/docs/oauth2-redirect", "/metrics")  # HTML and Prometheus text


# -- images -------------------------------------------------------------------------------------


def image_bytes(fmt: str, size: tuple[int, int], mode: str = "RGB", seed: int = 0, orientation: int | None = None) -> bytes:
    """A real image file made here: random pixels, ``fmt``, ``mode`` (RGB if the writer refuses it)."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    kwargs = {}
    if orientation is not None and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    for candidate in (mode, "RGB"):
        buf = io.BytesIO()
        try:
            converted = img.convert("L").convert("I;16") if candidate == "I;16" else img.convert(candidate)
            converted.save(buf, format=fmt, **kwargs)
            return buf.getvalue()
        except (OSError, ValueError, KeyError):
            continue
    raise AssertionError(f"cannot write {fmt}")


TINY_PNG = image_bytes("PNG", (8, 6))
TINY_JPEG = image_bytes("JPEG", (9, 7), seed=1)


def valid_images(max_side: int = 48):
    """A tiny valid image of any accepted format and mode (sides 1 to ``max_side``)."""
    return st.builds(
        image_bytes, st.sampled_from(FORMATS), st.tuples(st.integers(1, max_side), st.integers(1, max_side)),
        st.sampled_from(MODES), st.integers(0, 255),
    )


@st.composite
def images(draw, max_side: int = 48) -> bytes:
    """An image file: tiny and valid (any format, mode, EXIF orientation, 1 px sides, thin), or
    the same truncated, with bytes mutated, too many pixels for a 100x100 limit, or not an image."""
    kind = draw(st.sampled_from(["valid"] * 4 + ["thin", "truncated", "mutated", "random", "empty", "big"]))
    if kind == "random":
        return draw(st.binary(max_size=600))
    if kind == "empty":
        return b""
    fmt = draw(st.sampled_from(FORMATS))
    if kind == "thin":
        long_side, short_side = draw(st.integers(40, 400)), draw(st.integers(1, 3))
        size = (long_side, short_side) if draw(st.booleans()) else (short_side, long_side)
    elif kind == "big":
        size = (draw(st.integers(101, 160)), draw(st.integers(101, 140)))
    else:
        size = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    orientation = draw(st.one_of(st.none(), st.sampled_from([0, 1, 3, 6, 8, 9, 255, 65535])))
    data = image_bytes(fmt, size, draw(st.sampled_from(MODES)), draw(st.integers(0, 255)), orientation)
    if kind == "truncated":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "mutated":
        return mutate(data, random.Random(draw(st.integers(0, 2**32 - 1))))
    return data


# -- multipart bodies ----------------------------------------------------------------------------


@dataclass
class Multipart:
    """A multipart body as sent, and what an intact one holds."""

    content_type: bytes
    body: bytes
    intact: bool  # well formed: the server must read exactly these parts
    files: list[bytes] = field(default_factory=list)  # data of the parts with a filename, in order
    fields: int = 0  # parts without a filename
    names: list[str | None] = field(default_factory=list)  # each file's name in the answer (None: not predicted here)


MULTIPART_HEADER_MAX = 4096 + 128  # python-multipart's longest header line in a part
FILENAMES = st.one_of(
    st.none(),  # a field, not a file
    st.just(b""),
    st.just(b"cat.png"),
    st.text(st.characters(codec="utf-8", exclude_characters='"\\\r\n'), max_size=30).map(lambda s: s.encode()),
    st.binary(max_size=30).map(lambda b: bytes(c for c in b if c not in b'"\\\r\n')),  # non-UTF-8 bytes
    st.integers(300, 20_000).map(lambda n: b"a" * n + b".png"),  # a huge name
    st.sampled_from([b"../../etc/passwd", b"..\\..\\boot.ini", b"C:\\x\\y.png", b"/tmp/evil.png", b"%2e%2e%2fx", b"a\x00b"]),
)


@st.composite
def multiparts(draw, max_parts: int = 10) -> Multipart:
    """A multipart/form-data body: 0 to ``max_parts`` parts (images, text, empty), names of every
    kind, odd boundaries; sometimes broken (truncated, no closing boundary, LF line ends, junk)."""
    boundary = draw(st.one_of(
        st.just(b"fuzz-b0undary"),
        st.text("abcXYZ0123456789'()+_,-./:=?", min_size=1, max_size=70).map(str.encode),
        st.binary(min_size=1, max_size=90).map(lambda b: bytes(c for c in b if c not in b"\r\n\x00;\" ") or b"x"),
    ))
    parts, files, fields, intact, names = [], [], 0, True, []
    for _ in range(draw(st.integers(0, max_parts))):
        odd_name = st.binary(max_size=12).map(lambda b: bytes(c for c in b if c not in b'"\\\r\n'))
        name = draw(st.one_of(st.just(b"file"), st.just(b"file"), odd_name))
        filename = draw(FILENAMES)
        data = draw(st.one_of(valid_images(), images(), st.binary(max_size=64), st.just(b"")))
        disposition = b'Content-Disposition: form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        if len(disposition) > MULTIPART_HEADER_MAX:
            intact = False  # python-multipart refuses a part header line this long (400)
        headers = [disposition]
        if draw(st.booleans()):
            types = [b"image/png", b"image/jpeg", b"application/octet-stream", b"text/plain", b"\xff\xfe"]
            headers.append(b"Content-Type: " + draw(st.sampled_from(types)))
        parts.append(b"\r\n".join(headers) + b"\r\n\r\n" + data)
        if filename is None:
            fields += 1
        else:
            files.append(data)
            plain = rb"[A-Za-z0-9_.-]+"  # a name no parser rewrites
            shown = filename if filename else name
            names.append(shown.decode() if re.fullmatch(plain, shown) and re.fullmatch(plain, name) else None)
    body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts) + b"--" + boundary + b"--\r\n"
    breakage = draw(st.sampled_from(["none"] * 5 + ["truncate", "no_end", "lf", "junk", "preamble"]))
    if breakage == "truncate":
        body, intact = body[: draw(st.integers(0, len(body)))], False
    elif breakage == "no_end":
        body, intact = body[: -len(b"--" + boundary + b"--\r\n")], False
    elif breakage == "lf":
        body, intact = body.replace(b"\r\n", b"\n"), False
    elif breakage == "junk":
        at = draw(st.integers(0, len(body)))
        body, intact = body[:at] + draw(st.binary(min_size=1, max_size=40)) + body[at:], False
    elif breakage == "preamble":  # RFC 2046 allows it; python-multipart refuses it (400)
        body, intact = b"a preamble to ignore\r\n" + body, False
    quoted = draw(st.booleans()) and b'"' not in boundary and b"\\" not in boundary
    param = b'"' + boundary + b'"' if quoted else boundary
    media = draw(st.sampled_from([b"multipart/form-data", b"Multipart/Form-Data", b"MULTIPART/FORM-DATA"]))
    content_type = media + b"; boundary=" + param + draw(st.sampled_from([b"", b"; charset=utf-8", b"; charset=nonsense"]))
    if not re.fullmatch(rb"[0-9A-Za-z'()+_,\-./:=?]{1,70}", boundary):
        intact = False  # outside RFC 2046's boundary characters: may be refused
    return Multipart(content_type, body, intact, files, fields, names)


# -- paths, queries, headers ----------------------------------------------------------------------


TRAVERSAL = [
    "/../../etc/passwd", "/..%2f..%2fetc%2fpasswd", "/%2e%2e/%2e%2e/etc/passwd", "/docs/../openapi.json",
    "/static/..%5c..%5cwindows%5cwin.ini", "/predict/..;/model", "/.%00./", "/%c0%ae%c0%ae/", "//etc/passwd",
    "/./predict", "/predict%00", "/predict%2f", "/model?../../x", "/\\..\\..\\x",
]


def quote_path(text: str) -> str:
    """``text`` as a request target: unreserved ASCII as is, everything else percent-encoded."""
    return urllib.parse.quote(text, safe="/%;:@&=+$,!~*'()[]")


def paths(routes: list[str]):
    """Raw request targets (ASCII, as h11 accepts them): routes, their variants, traversal,
    unicode, random and very long paths."""
    route = st.sampled_from(sorted(routes))
    return st.one_of(
        route,
        route.flatmap(lambda r: st.sampled_from([r + "/", r + "//", "/" + r, r.upper(), r + "/..", r + "%20", r + ".json", r + "/x/y"])),
        st.sampled_from(TRAVERSAL),
        st.text(max_size=40).map(lambda s: quote_path("/" + s)),
        st.binary(max_size=30).map(lambda b: "/" + "".join(f"%{c:02X}" for c in b)),  # any bytes, non-UTF-8 too
        st.integers(1_000, 12_000).map(lambda n: "/" + "a/" * (n // 2)),
    )


def _qvalue():
    return st.one_of(
        st.integers(-(10**30), 10**30).map(str),
        st.sampled_from(["", "0", "-1", "1", "2", "3", "1000000", "1e3", "2.0", "2.5", " 3 ", "1_0", "0x10", "٣", "NaN",
                         "inf", "true", "false", "True", "on", "off", "yes", "no", "1", "maybe", "\x00", "%", "%ff", "9" * 5000]),
        st.text(max_size=20),
    )


@st.composite
def queries(draw) -> bytes:
    """A raw query string: top_k and tta with odd values, unknown and repeated parameters,
    broken percent escapes, bytes that are not UTF-8."""
    names = st.sampled_from(["top_k", "tta", "top_k", "tta", "x", "", "TOP_K", "top_k[]", "file"])
    pairs = draw(st.lists(st.tuples(names, _qvalue()), max_size=5))
    raw = "&".join(urllib.parse.quote(k, safe="[]") + "=" + urllib.parse.quote(v, safe="") for k, v in pairs)
    junk = draw(st.sampled_from(["", "", "", "&&", "=", "&=&", ";", "%", "%zz", "%ff%fe", "a=%00", "+++"]))
    return (raw + junk).encode("ascii")


def header_value(max_size: int = 40):
    """Bytes a header value may hold after h11 parsed it: no NUL, CR or LF, no outer blanks."""
    return st.binary(max_size=max_size).map(lambda b: bytes(c for c in b if c not in b"\x00\r\n").strip(b" \t"))


CONTENT_TYPES = [
    b"image/png", b"image/jpeg", b"IMAGE/PNG", b"Image/Jpeg", b"image/png; charset=utf-8", b"image/*", b"image/",
    b"application/octet-stream", b"Application/Octet-Stream", b"text/plain", b"application/json",
    b"application/x-www-form-urlencoded", b"multipart/form-data", b"multipart/form-data; boundary=",
    b"multipart/mixed; boundary=x", b"", b";", b"image", b"imagex/png", b"\xff\xfe/\x80",
]


@st.composite
def header_lists(draw, token: str | None = None) -> list[tuple[bytes, bytes]]:
    """Header lists as uvicorn hands them to the app (names lowercased): Host, Content-Type,
    Content-Length, Authorization (right, wrong, missing), odd names and bytes, duplicates."""
    headers = []
    if draw(st.integers(0, 4)):
        odd = st.sampled_from([b"[bad", b"a b", b"\xe9\xff", b"x" * 3000, b"::1", b"evil.example:99999"])
        headers.append((b"host", draw(st.one_of(st.just(b"127.0.0.1:8000"), odd, header_value()))))
    if draw(st.booleans()):
        headers.append((b"content-type", draw(st.one_of(st.sampled_from(CONTENT_TYPES), header_value()))))
    if draw(st.integers(0, 3)) == 0:
        odd = st.sampled_from([b"-1", b"abc", b"", b"1e3", b"99999999999999999999999"])
        headers.append((b"content-length", draw(st.one_of(st.integers(0, 10**12).map(lambda n: str(n).encode()), odd))))
    if draw(st.integers(0, 3)) if token else draw(st.booleans()):
        right = f"Bearer {token or TOKEN}".encode()
        near = [right[:-1], right + b"x", right + b" ", right.lower(), right[:-1] + bytes([right[-1] ^ 1]), b"Bearer " + right[7:].upper()]
        headers.append((b"authorization", draw(st.one_of(
            st.sampled_from([right, b"Bearer", b"Bearer ", b"Basic dXNlcjpwYXNz"]),
            st.sampled_from(near),
            st.sampled_from(near),
            header_value().map(lambda v: b"Bearer " + v),
            header_value(),
        ))))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.text("abcdefghijklmnopqrstuvwxyz0123456789-_!#$%&'*+.^`|~", min_size=1, max_size=20)).encode()
        headers.append((name, draw(header_value(80))))
    if headers and draw(st.integers(0, 9)) == 0:  # a header twice
        headers.append(draw(st.sampled_from(headers)))
    return headers


@dataclass
class Request:
    """One HTTP request, as bytes (``target`` is the raw path, already percent-encoded)."""

    method: str
    target: str
    query: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    disconnect: bool = False  # the client goes away before the end of its body

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def sent(self) -> bytes:
        """Everything the client sent, to tell an echo of its own text from a leak."""
        return b" ".join([self.method.encode(), self.target.encode(), self.query, *(k + b": " + v for k, v in self.headers), self.body])


def split_chunks(draw, body: bytes) -> list[bytes]:
    """``body`` in 1 to 4 chunks, as a socket may deliver it."""
    if not body:
        return []
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
    edges = [0, *cuts, len(body)]
    return [body[a:b] for a, b in zip(edges, edges[1:]) if b > a]


@st.composite
def bodies(draw, big: int = 0) -> tuple[bytes, bytes | None]:
    """(body, the Content-Type that goes with it or None): random bytes, an image, a multipart
    form, or (``big`` > 0) a body of about ``big`` bytes, over or under the server's limit."""
    kind = draw(st.sampled_from(["empty", "random", "image", "image", "multipart", "multipart"] + (["big"] if big else [])))
    if kind == "empty":
        return b"", None
    if kind == "random":
        return draw(st.binary(max_size=300)), None
    if kind == "image":
        return draw(images()), draw(st.sampled_from([b"image/png", b"image/jpeg", b"application/octet-stream", b"IMAGE/PNG"]))
    if kind == "multipart":
        form = draw(multiparts())
        return form.body, form.content_type
    size = draw(st.sampled_from([big - 1, big, big + 1, 2 * big, big // 2, big - 300]))
    data = TINY_PNG + bytes(max(0, size - len(TINY_PNG) - 300))  # trailing bytes: still a valid PNG
    if draw(st.booleans()):  # as a form: a file part over 1 MB spools to the temp folder
        b = b"big-b0undary"
        head = b"--" + b + b'\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
        return head + data + b"\r\n--" + b + b"--\r\n", b"multipart/form-data; boundary=" + b
    return data, b"image/png"


@st.composite
def requests(draw, routes: dict[str, list[str]], token: str | None = None, big: int = 0) -> Request:
    """Any request: half aimed at a route of the OpenAPI document with one of its methods, half
    anywhere (:func:`paths`, any method); a query, headers and a body; a client that sometimes
    goes away before its body ends."""
    if draw(st.booleans()):
        target = draw(st.sampled_from(sorted(routes)))
        method = draw(st.sampled_from(routes[target]))
    else:
        method = draw(st.sampled_from(["POST"] * 4 + ["GET"] * 3 + list(METHODS)))
        target = draw(paths(list(routes)))
    headers = draw(header_lists(token))
    body, ctype = draw(bodies(big))
    if ctype is not None and draw(st.integers(0, 4)):
        headers = [(k, v) for k, v in headers if k != b"content-type"] + [(b"content-type", ctype)]
    query = draw(st.one_of(st.just(b""), queries()))
    return Request(method, target, query, headers, split_chunks(draw, body), disconnect=draw(st.integers(0, 3)) == 0 and bool(body))


# -- the properties -------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    raised: str | None = None  # the exception the app let out, if any

    def json(self):
        return json.loads(self.body)

    def error(self) -> str:
        """The message of a JSON error body ("" if it is not one)."""
        with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
            return self.json()["error"]
        return ""


def problems(request: Request, response: Response, *, server_layer: bool = False) -> list[str]:
    """What is wrong with ``response`` to ``request`` ([] when nothing): the properties.

    Args:
        server_layer: the answer came over a socket, so uvicorn's own 400 for a request it
            could not parse (plain text, before the app) is allowed.
    """
    found = []
    if response.raised:
        found.append(f"the app raised {response.raised}")
    status, body = response.status, response.body
    allowed = INTENTIONAL_5XX.get(status)
    if status >= 500 and not (allowed and any(text in response.error() for text in allowed)):
        found.append(f"status {status}")
    if not 100 <= status <= 599:
        found.append(f"status {status} is not an HTTP status")
    if status >= 400 and request.method.upper() != "HEAD":
        if server_layer and status == 400 and body in SERVER_LAYER_400:
            pass
        elif not response.headers.get(b"content-type", b"").startswith(b"application/json"):
            found.append(f"error {status} is not JSON: content-type {response.headers.get(b'content-type')!r}")
        else:
            try:
                parsed = json.loads(body)
            except ValueError:
                found.append(f"error {status} body is not JSON: {body[:200]!r}")
            else:
                if not (isinstance(parsed, dict) and set(parsed) == {"error"} and isinstance(parsed["error"], str) and parsed["error"]):
                    found.append(f"error {status} body is not {{'error': message}}: {body[:200]!r}")
    sent = request.sent()
    for pattern in (LEAK, EXCEPTION_NAME) if status >= 400 else (LEAK,):
        leaked = [m.group(0) for m in pattern.finditer(body) if m.group(0) not in sent]
        if leaked:
            found.append(f"Python internals in the body: {leaked[0]!r} in {body[:300]!r}")
    path = urllib.parse.unquote(request.target.partition("?")[0])
    if 200 <= status < 300 and request.method.upper() != "HEAD" and path not in NON_JSON_OK:
        try:
            json.loads(body)
        except ValueError:
            found.append(f"{status} body is not JSON: {body[:200]!r}")
    return found


# -- driving the app ------------------------------------------------------------------------------


class ErrorLog(logging.Handler):
    """Collects the ERROR records of a logger (the app logs each unexpected exception)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(record.getMessage())

    def take(self) -> list[str]:
        out, self.records = self.records, []
        return out


class AsgiClient:
    """Drives an ASGI app in-process with uvicorn's messages, on an event loop of its own.

    ``with AsgiClient(app) as client: client.send(Request(...))``: the lifespan runs once
    (startup on enter, shutdown on exit); each request gets the scope uvicorn builds for the same
    bytes (``path`` percent-decoded from the raw target, headers as given), its body in the
    request's chunks, then either the end of the body or, with ``disconnect``, the client gone.
    """

    def __init__(self, app, timeout: float = 60.0):
        self.app, self.timeout = app, timeout
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="asgi-client")
        self._lifespan: asyncio.Queue | None = None

    def __enter__(self) -> AsgiClient:
        self._thread.start()
        self._run(self._startup())
        return self

    def __exit__(self, *exc) -> None:
        self._run(self._shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.timeout + 5)

    async def _startup(self):
        self._lifespan, self._events = asyncio.Queue(), asyncio.Queue()
        await self._lifespan.put({"type": "lifespan.startup"})
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._lifespan_task = asyncio.ensure_future(self.app(scope, self._lifespan.get, self._events.put))
        message = await self._events.get()
        assert message["type"] == "lifespan.startup.complete", message

    async def _shutdown(self):
        await self._lifespan.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(self._lifespan_task, 30)

    def send(self, request: Request) -> Response:
        return self._run(self._request(request))

    async def _request(self, request: Request) -> Response:
        full = request.target + ("?" + request.query.decode("ascii") if request.query else "")
        raw_path, _, query = full.encode("ascii").partition(b"?")  # as uvicorn splits the target
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000), "scheme": "http",
            "method": request.method, "root_path": "", "path": urllib.parse.unquote(raw_path.decode("ascii")),
            "raw_path": raw_path, "query_string": query, "headers": list(request.headers), "state": {},
        }
        messages = [{"type": "http.request", "body": c, "more_body": True} for c in request.chunks]
        if request.disconnect:
            messages.append({"type": "http.disconnect"})
        else:
            messages.append({"type": "http.request", "body": b"", "more_body": False})
        done = asyncio.Event()
        start, body = {}, []

        async def receive():
            if messages:
                return messages.pop(0)
            await done.wait()  # uvicorn: after the response, or when the client is gone
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                assert not start, "two response starts"
                start.update(message)
            elif message["type"] == "http.response.body":
                assert start, "a body before the response start"
                body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    done.set()

        raised = None
        try:
            await asyncio.wait_for(self.app(scope, receive, send), self.timeout)
        except Exception as e:  # noqa: BLE001 - uvicorn would log it and answer 500 if nothing was sent
            raised = repr(e)[:300]
        if not start:
            return Response(500, {}, b"Internal Server Error", raised or "no response")
        return Response(start["status"], dict(start.get("headers", [])), b"".join(body), raised)


def raw_http(port: int, request: Request, timeout: float = 20.0, garbage: bytes | None = None) -> Response | None:
    """``request`` as bytes to a server on 127.0.0.1:``port`` (or ``garbage`` instead); its
    answer, or None when it closed the connection without one (a body that never ended)."""
    if garbage is not None:
        data = garbage
    else:
        target = request.target + ("?" + request.query.decode("ascii") if request.query else "")
        lines = [f"{request.method} {target} HTTP/1.1".encode("ascii")]
        names = {k for k, _ in request.headers}
        headers = list(request.headers)
        if b"host" not in names:
            headers.insert(0, (b"host", b"127.0.0.1"))
        if b"content-length" not in names and (request.body or request.method in ("POST", "PUT", "PATCH")):
            headers.append((b"content-length", str(len(request.body)).encode()))
        headers.append((b"connection", b"close"))
        lines += [k + b": " + v for k, v in headers]
        data = b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if request.disconnect else request.body)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may answer (413) and close before all is sent
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # no more: a body shorter than its Content-Length ends here
        received = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                received += chunk
    if not received:
        return None
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    parts = status_line.split(b" ", 2)
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = _dechunk(body)
    return Response(int(parts[1]), headers, body)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + rest[:size], rest[size + 2 :]
    return out


def openapi_routes(client: AsgiClient) -> dict[str, list[str]]:
    """{path: [METHOD, ...]} of the app's OpenAPI document, plus the document and docs pages."""
    response = client.send(Request("GET", "/openapi.json"))
    assert response.status == 200, response
    routes = {path: sorted(op.upper() for op in ops) for path, ops in response.json()["paths"].items()}
    for page in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"):
        routes.setdefault(page, ["GET"])
    return routes


# -- the app under test and the properties ---------------------------------------------------------


BIG = 1_500_000  # the fuzzed apps' body limit (bytes): file parts over 1 MB spool to disk first
CLASSES = ["blue", "green", "red"]
BOOL_WORDS = {"0", "off", "f", "false", "n", "no", "1", "on", "t", "true", "y", "yes"}  # pydantic's


def make_run(root) -> object:
    """A seed_cnn run folder with random weights, made as tests/test_serve.py makes its model."""
    import torch  # noqa: PLC0415

    from imagerec import create_backbone  # noqa: PLC0415
    from imagerec.checkpoint import Checkpoint, save_checkpoint  # noqa: PLC0415

    torch.manual_seed(0)
    net = create_backbone("seed_cnn", num_classes=len(CLASSES))
    with torch.no_grad():
        net.fc3.weight.mul_(20)
    meta = {"backbone": "seed_cnn", "classes": CLASSES, "preprocessing": net.preprocessing.to_dict()}
    save_checkpoint(root / "run" / "best.safetensors", Checkpoint(net.state_dict(), meta))
    return root / "run"


def _listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


class Harness:
    """Everything the properties need: the model (its ONNX export in ``ROOT/home``), an open app
    and a token-guarded one on the run folder (reloadable) driven in-process, a third under a real uvicorn on a free 127.0.0.1
    port, the working directory (``ROOT/cwd``) and temp folder (``ROOT/tmp``) moved to empty
    folders watched for files left behind, and the error logs watched for unexpected exceptions.
    Counts every request sent and every status answered.
    """

    def __init__(self, root, max_pixels: int = 100 * 100):
        from imagerec.serve import ServeConfig  # noqa: PLC0415

        self.root = root
        self.config = ServeConfig(max_body_mb=BIG / 1e6, max_images=8, max_pixels=max_pixels, decode_threads=2)
        self.sent = 0
        self.statuses: collections.Counter = collections.Counter()

    def __enter__(self) -> Harness:
        import tempfile  # noqa: PLC0415

        from imagerec.serve import create_app, load_engine  # noqa: PLC0415

        from .test_serve import running, wait_ready  # noqa: PLC0415 - the same uvicorn-in-a-thread

        self._stack = contextlib.ExitStack()
        for name in ("home", "cwd", "tmp", "scratch"):
            (self.root / name).mkdir()
        self.home, self.cwd, self.tmp, self.scratch = (self.root / n for n in ("home", "cwd", "tmp", "scratch"))
        saved_env, saved_cwd, saved_tmp = os.environ.get("IMAGEREC_HOME"), os.getcwd(), tempfile.tempdir
        os.environ["IMAGEREC_HOME"] = str(self.home)
        os.chdir(self.cwd)
        tempfile.tempdir = str(self.tmp)

        def restore():
            os.chdir(saved_cwd)
            tempfile.tempdir = saved_tmp
            if saved_env is None:
                os.environ.pop("IMAGEREC_HOME", None)
            else:
                os.environ["IMAGEREC_HOME"] = saved_env

        self._stack.callback(restore)
        run = make_run(self.scratch)
        engine = load_engine(run)
        self.engine = engine
        self.open = self._stack.enter_context(AsgiClient(create_app(engine, config=self.config)))
        # on the run folder, so that POST /admin/reload with the token has a source to look at
        self.guarded = self._stack.enter_context(AsgiClient(create_app(run, token=TOKEN, config=self.config)))
        self.url = self._stack.enter_context(running(create_app(engine, config=self.config)))
        self.port = int(self.url.rsplit(":", 1)[1])
        wait_ready(self.url)
        for client in (self.open, self.guarded):
            self._wait_ready(client)
        self.routes = openapi_routes(self.open)
        self.log = ErrorLog()
        for name in ("imagerec.serve", "uvicorn.error", "uvicorn.asgi"):
            logging.getLogger(name).addHandler(self.log)
            self._stack.callback(logging.getLogger(name).removeHandler, self.log)
        self.home_files = _listing(self.home)
        self.counted_5xx = self.server_5xx()
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @staticmethod
    def _wait_ready(client: AsgiClient) -> None:
        for _ in range(600):
            if client.send(Request("GET", "/ready", headers=[(b"authorization", f"Bearer {TOKEN}".encode())])).status == 200:
                return
            time.sleep(0.05)
        raise AssertionError("the app never became ready")

    def send(self, request: Request, client: AsgiClient | None = None) -> Response:
        response = (client or self.open).send(request)
        self.sent += 1
        self.statuses[response.status] += 1
        return response

    def send_raw(self, request: Request, garbage: bytes | None = None) -> Response | None:
        response = raw_http(self.port, request, garbage=garbage)
        self.sent += 1
        self.statuses[response.status if response else "closed"] += 1
        return response

    def server_5xx(self) -> dict[tuple[str, str], float]:
        """{(endpoint, status): count} of the real server's 5xx but 503 and 504, from /metrics."""
        metrics = raw_http(self.port, Request("GET", "/metrics"))
        counted = {}
        for line in metrics.body.decode().splitlines():
            m = re.match(r'imagerec_http_requests_total\{endpoint="([^"]*)",status="(5\d\d)"\} (\S+)', line)
            if m and m.group(2) not in ("503", "504") and float(m.group(3)) > 0:
                counted[m.group(1), m.group(2)] = float(m.group(3))
        return counted

    def after(self) -> list[str]:
        """Files left in the working directory, the temp folder or the cache; errors logged."""
        found = [f"the app logged an error: {m[:300]}" for m in self.log.take()]
        if left := _listing(self.cwd):
            found.append(f"files written to the working directory: {left[:5]}")
        if left := _listing(self.tmp):
            found.append(f"files left in the temp folder: {left[:5]}")
        if _listing(self.home) != self.home_files:
            found.append(f"the cache folder changed: {_listing(self.home)[:5]}")
        return found

    def decodes(self, data: bytes) -> bool:
        """imagerec's own verdict on these bytes as a file (imagerec predict's decoder)."""
        from imagerec._decode import DecodeError, load_rgb  # noqa: PLC0415

        path = self.scratch / "case.img"
        path.write_bytes(data)
        try:
            load_rgb(path, self.config.max_pixels)
        except DecodeError:
            return False
        return True


def last_value(query: bytes, name: str) -> str | None:
    """The value the app reads for ``name`` (Starlette keeps the last of repeated parameters)."""
    values = [v for k, v in urllib.parse.parse_qsl(query.decode("latin-1"), keep_blank_values=True) if k == name]
    return values[-1] if values else None


def media_type(ctype: bytes) -> str:
    """The media type of a Content-Type: before any parameter, without blanks (SP, HTAB), lowercase."""
    return ctype.split(b";")[0].strip(b" \t").lower().decode("latin-1")


def prop_any_request(h: Harness, request: Request) -> list[str]:
    """Any request to the open app: the common properties (:func:`problems`)."""
    return problems(request, h.send(request)) + h.after()


def prop_token(h: Harness, request: Request) -> list[str]:
    """With a token, every path but /health answers 401 unless the exact bearer token came."""
    response = h.send(request, h.guarded)
    found = problems(request, response)
    path = urllib.parse.unquote(request.target.partition("?")[0])
    given = dict(request.headers).get(b"authorization")  # the header as the app reads it
    if path != "/health" and given != f"Bearer {TOKEN}".encode() and response.status != 401:
        found.append(f"{request.method} {path[:80]!r} with authorization {given!r} answered {response.status}, not 401")
    if response.status == 401 and response.headers.get(b"www-authenticate") != b"Bearer":
        found.append("a 401 without WWW-Authenticate: Bearer")
    if path == "/health" and response.status == 401:
        found.append("/health asked for the token")
    return found + h.after()


def prop_image_verdict(h: Harness, data: bytes, as_form: bool, target: str = "/predict") -> list[str]:
    """One image: 200 when imagerec's decoder reads it (as `imagerec predict` would), else a 400
    naming the file and the problem; the same for a raw body and a form's file."""
    name = "upload.png"
    if as_form:
        b = b"verdict-b0undary"
        head = b'Content-Disposition: form-data; name="file"; filename="' + name.encode() + b'"'
        body = b"--" + b + b"\r\n" + head + b"\r\n\r\n" + data + b"\r\n--" + b + b"--\r\n"
        request = Request("POST", target, headers=[(b"content-type", b"multipart/form-data; boundary=" + b)], chunks=[body])
    else:
        name = "body"
        request = Request("POST", target, headers=[(b"content-type", b"image/png")], chunks=[data] if data else [])
    response = h.send(request)
    found = problems(request, response)
    if h.decodes(data):
        if response.status != 200:
            found.append(f"an image imagerec predict reads answered {response.status}: {response.body[:200]!r}")
        else:
            items = response.json()["predictions" if target == "/predict" else "embeddings"]
            if [i["file"] for i in items] != [name]:
                found.append(f"the answer is not for {name!r}: {response.body[:200]!r}")
    elif response.status != 400 or (data and not response.error().startswith(f"{name}: ")):
        found.append(f"bytes imagerec predict skips answered {response.status}, not a 400 naming {name!r}: {response.body[:200]!r}")
    return found + h.after()


def prop_form(h: Harness, form: Multipart, target: str = "/predict") -> list[str]:
    """A multipart form: an intact one is answered for exactly its files, in order; any one gets
    a JSON error or an answer."""
    request = Request("POST", target, headers=[(b"content-type", form.content_type)], chunks=[form.body])
    response = h.send(request)
    found = problems(request, response)
    if form.intact and response.status == 200:
        items = response.json()["predictions" if target == "/predict" else "embeddings"]
        if len(items) != len(form.files):
            found.append(f"{len(form.files)} files sent, {len(items)} answered")
        elif any(want is not None and item["file"] != want for item, want in zip(items, form.names)):
            found.append(f"files {form.names} answered as {[i['file'] for i in items]}")
    if form.intact and len(form.files) <= 8 and form.fields <= 8:
        if not form.files and response.status != 400:
            found.append(f"a form without files answered {response.status}")
        if form.files and all(h.decodes(d) for d in form.files) and response.status != 200:
            found.append(f"a form of {len(form.files)} readable images answered {response.status}: {response.body[:200]!r}")
    return found + h.after()


def prop_query(h: Harness, query: bytes) -> list[str]:
    """top_k and tta: a whole number >= 1 gives that many classes (at most all), a number below 1
    or a word is a 422 naming the parameter; tta takes pydantic's boolean words only."""
    request = Request("POST", "/predict", query, [(b"content-type", b"image/png")], [TINY_PNG])
    response = h.send(request)
    found = problems(request, response)
    top_k, tta = last_value(query, "top_k"), last_value(query, "tta")
    good_k = top_k is None or re.fullmatch(r"[0-9]{1,100}", top_k) is not None and int(top_k) >= 1
    bad_k = top_k is not None and re.fullmatch(r"-[0-9]+|0+|[A-Za-z]*", top_k) is not None
    good_tta = tta is None or tta.lower() in BOOL_WORDS
    bad_tta = not good_tta and re.fullmatch(r"[A-Za-z]*", tta) is not None
    named = re.match(r"query\.(top_k|tta): ", response.error())
    if bad_k or bad_tta:
        want = "top_k" if bad_k and good_tta else "tta" if bad_tta and good_k else None  # else either
        if response.status != 422 or not named or (want and named.group(1) != want):
            found.append(
                f"top_k={top_k!r} tta={tta!r} answered {response.status}, not a 422 naming {want or 'one'}: {response.body[:200]!r}"
            )
    elif good_k and good_tta:
        if response.status != 200:
            found.append(f"top_k={top_k!r} tta={tta!r} answered {response.status}: {response.body[:200]!r}")
        elif len(response.json()["predictions"][0]["top"]) != min(int(top_k or 5), len(CLASSES)):
            found.append(f"top_k={top_k!r} did not give {min(int(top_k or 5), len(CLASSES))} classes")
    return found + h.after()


def content_types():
    """Content-Type values for one PNG: image/* and octet-stream in any letter case and with
    parameters, the other types, junk."""
    accepted = st.sampled_from(["image/png", "image/jpeg", "image/webp", "image/x-anything", "application/octet-stream"])
    cased = st.tuples(accepted, st.lists(st.booleans(), min_size=30, max_size=30)).map(
        lambda t: "".join(c.upper() if up else c for c, up in zip(t[0], t[1])))
    params = st.sampled_from(["", "; charset=utf-8", ";q=1", " ; name=x.png", ";"])
    return st.one_of(
        st.tuples(cased, params).map(lambda t: (t[0] + t[1]).encode()),
        st.sampled_from(CONTENT_TYPES),
        header_value(),
    )


def prop_content_type(h: Harness, ctype: bytes) -> list[str]:
    """A valid PNG is read whatever the letter case of its media type (RFC 9110: case-insensitive):
    image/* and application/octet-stream (or none) give 200, multipart/form-data a 400 (no form
    in it), any other type a 415."""
    request = Request("POST", "/predict", headers=[(b"content-type", ctype)] if ctype else [], chunks=[TINY_PNG])
    response = h.send(request)
    found = problems(request, response)
    media = media_type(ctype)
    raw = media in ("", "application/octet-stream") or media.startswith("image/")
    want = 200 if raw else 400 if media == "multipart/form-data" else 415
    if response.status != want:
        found.append(f"Content-Type {ctype!r} answered {response.status}, not {want}: {response.body[:200]!r}")
    return found + h.after()


@st.composite
def admin_requests(draw) -> Request:
    """Requests to ``/admin/reload``: any method, the token right, near or missing, any body and query."""
    method = draw(st.sampled_from(["POST"] * 6 + list(METHODS)))
    target = draw(st.sampled_from(["/admin/reload"] * 4 + ["/admin/reload/", "/admin", "/ADMIN/reload", "/admin/reload%00"]))
    body, ctype = draw(bodies())
    headers = draw(header_lists(TOKEN))
    if ctype is not None and draw(st.booleans()):
        headers.append((b"content-type", ctype))
    query = draw(st.one_of(st.just(b""), queries()))
    return Request(method, target, query, headers, split_chunks(draw, body))


def prop_admin_reload(h: Harness, request: Request) -> list[str]:
    """``POST /admin/reload``: with no token configured, 403 whatever is sent; with one, 401 unless
    the exact bearer token came, else 200 "unchanged" (the checkpoint is the one serving); other
    methods 405, a declared body over the limit 413, other paths never 200; no file written (the cache is watched by :meth:`Harness.after`)."""
    found = []
    path = urllib.parse.unquote(request.target.partition("?")[0])
    exact = path == "/admin/reload"
    post = request.method == "POST"
    given = dict(request.headers).get(b"authorization")
    declared = dict(request.headers).get(b"content-length", b"")
    too_big = declared.isdigit() and int(declared) > BIG  # refused by the body limit before any route
    for client, guarded in ((h.open, False), (h.guarded, True)):
        response = h.send(request, client)
        found += problems(request, response)
        if guarded and given != f"Bearer {TOKEN}".encode():
            want = 401
        elif too_big:
            want = 413
        elif not exact:  # not found, or a redirect to the route without its trailing slash
            if response.status == 200:
                found.append(f"{request.method} {path!r} answered 200")
            continue
        elif not post:
            want = 405
        else:
            want = 200 if guarded else 403
        if response.status != want:
            found.append(f"{request.method} {path!r} (token app: {guarded}, authorization {given!r}) answered {response.status}, not {want}")
        elif want == 200 and response.json().get("status") != "unchanged":
            found.append(f"a reload of the checkpoint serving answered {response.body[:200]!r}, not unchanged")
        elif want == 403 and "--token" not in response.error():
            found.append(f"the 403 does not say how to get a token: {response.body[:200]!r}")
    return found + h.after()


def prop_socket(h: Harness, request: Request, garbage: bytes | None) -> list[str]:
    """The same requests as bytes to a real uvicorn (or garbage bytes): the common properties,
    then /health still answers and /metrics counts no 5xx (a request whose answer the client
    never saw, such as one whose body never ended, is counted there)."""
    response = h.send_raw(request, garbage)
    found = problems(request, response, server_layer=True) if response is not None else []
    health = raw_http(h.port, Request("GET", "/health"))
    if health is None or health.status != 200:
        found.append(f"/health no longer answers 200: {health}")
    counted = h.server_5xx()
    if counted != h.counted_5xx:
        found.append(f"the server counted answers 5xx it did not mean: {counted}")
        h.counted_5xx = counted
    return found + h.after()
