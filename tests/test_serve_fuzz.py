"""Property-based HTTP fuzz of ``imagerec serve`` (Hypothesis): random methods, paths, queries,
headers and bodies against :func:`imagerec.serve.create_app`, in-process with uvicorn's ASGI
messages and over sockets to a real uvicorn on 127.0.0.1.

Whatever is sent: never a 5xx but an intentional 503 (server full) or 504 (--timeout), never a
traceback or Python exception text, every error a JSON ``{"error": ...}`` with a 4xx, no file
left in the working directory or the temp folder, no unexpected error in the log. And the
answers are the right ones: a token guards every path but /health, an image gets the verdict of
imagerec's own decoder (`imagerec predict`), a form is answered for exactly its files, top_k and
tta give what they ask or a 422, a media type is read in any letter case.

Brief and deterministic here (``derandomize``); ``benchmarks/fuzz_serve.py`` runs the same
properties (``tests/_http_strategies.py``) at length.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from . import _http_strategies as fz

CI = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    with fz.Harness(tmp_path_factory.mktemp("serve_fuzz")) as h:
        yield h


def test_routes_come_from_the_openapi_document(harness):
    assert {"/predict", "/embed", "/model", "/health", "/ready", "/metrics", "/admin/reload"} <= set(harness.routes)
    assert harness.routes["/predict"] == harness.routes["/admin/reload"] == ["POST"]


@settings(max_examples=150, **CI)
@given(data=st.data())
def test_any_request_is_answered_or_refused_in_json(harness, data):
    request = data.draw(fz.requests(harness.routes, big=fz.BIG), label="request")
    assert not fz.prop_any_request(harness, request)


@settings(max_examples=80, **CI)
@given(data=st.data())
def test_the_token_guards_every_path_but_health(harness, data):
    request = data.draw(fz.requests(harness.routes, token=fz.TOKEN), label="request")
    assert not fz.prop_token(harness, request)


@settings(max_examples=100, **CI)
@given(image=fz.images(), as_form=st.booleans(), target=st.sampled_from(["/predict", "/embed"]))
def test_an_image_gets_the_verdict_of_imagerec_predict(harness, image, as_form, target):
    assert not fz.prop_image_verdict(harness, image, as_form, target)


@settings(max_examples=80, **CI)
@given(form=fz.multiparts(), target=st.sampled_from(["/predict", "/embed"]))
def test_a_form_is_answered_for_exactly_its_files(harness, form, target):
    assert not fz.prop_form(harness, form, target)


@settings(max_examples=60, **CI)
@given(query=fz.queries())
def test_query_values_give_what_they_ask_or_a_422(harness, query):
    assert not fz.prop_query(harness, query)


@settings(max_examples=40, **CI)
@given(ctype=fz.content_types())
def test_media_types_are_read_in_any_letter_case(harness, ctype):
    assert not fz.prop_content_type(harness, ctype)


@settings(max_examples=60, **CI)
@given(request=fz.admin_requests())
def test_reload_is_closed_without_a_token_and_guarded_by_it(harness, request):
    assert not fz.prop_admin_reload(harness, request)


@settings(max_examples=40, **CI)
@given(data=st.data())
def test_a_real_server_answers_bytes_on_a_socket(harness, data):
    request = data.draw(fz.requests(harness.routes, big=fz.BIG), label="request")
    garbage = data.draw(st.one_of(st.none(), st.none(), st.binary(max_size=200)), label="garbage")
    assert not fz.prop_socket(harness, request, garbage)


# -- the bugs the fuzz found, pinned --------------------------------------------------------------


def post(target: str, ctype: bytes, body: bytes, disconnect: bool = False) -> fz.Request:
    return fz.Request("POST", target, headers=[(b"content-type", ctype)], chunks=[body], disconnect=disconnect)


def test_a_client_gone_before_the_end_of_its_body_is_a_400_not_a_500(harness):
    # was a 500, logged as an unexpected error with a traceback and counted as 500 in /metrics
    cut_image = post("/predict", b"image/png", fz.TINY_PNG[:20], disconnect=True)
    cut_form = post("/embed", b"multipart/form-data; boundary=b", b"--b\r\n", disconnect=True)
    for request in (cut_image, cut_form):
        response = harness.send(request)
        assert response.status == 400 and "disconnected" in response.error() and not response.raised
    assert not harness.after()
    # on a socket: a Content-Length that promises more than comes, then the client stops
    assert not fz.prop_socket(harness, fz.Request("POST", "/predict", headers=[(b"content-length", b"100")]), None)


def test_an_image_over_50_to_1_is_refused_as_imagerec_predict_skips_it(harness):
    # was answered; a 23 KB 8,000,000 x 1 PNG allocated a 1 GB resize matrix
    thin, fine = fz.image_bytes("PNG", (51, 1)), fz.image_bytes("PNG", (50, 1))
    assert not harness.decodes(thin) and harness.decodes(fine)
    response = harness.send(post("/predict", b"image/png", thin))
    assert response.status == 400 and "too thin" in response.error() and "51 x 1" in response.error()
    assert harness.send(post("/predict", b"image/png", fine)).status == 200


def test_media_types_ignore_letter_case_and_parameters(harness):
    # IMAGE/PNG, Application/Octet-Stream and MULTIPART/FORM-DATA were 415
    for ctype in (b"IMAGE/PNG", b"Image/Jpeg; charset=x", b"Application/Octet-Stream", b" image/png ;q=1"):
        assert harness.send(post("/predict", ctype, fz.TINY_PNG)).status == 200, ctype
    form = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + fz.TINY_PNG + b"\r\n--B--\r\n"
    response = harness.send(post("/predict", b"MULTIPART/FORM-DATA; boundary=B", form))
    assert response.status == 200 and [p["file"] for p in response.json()["predictions"]] == ["a.png"]
    # blanks around it are SP and HTAB only: control characters are not an empty Content-Type
    for ctype in (b"application/octet-streamx", b"\x1d\x85", b"\x85image/png"):
        assert harness.send(post("/predict", ctype, fz.TINY_PNG)).status == 415, ctype
