"""The real app fuzzed against its own OpenAPI document (schemathesis's pytest integration).

Every operation gets schema-driven requests, valid and invalid: schemathesis's coverage phase
(boundary values, missing fields, wrong types, other methods) and its fuzzing phase (EXAMPLES
cases), derandomized. Each response must be documented (status code, content type, body schema;
schemathesis's checks) and never a 5xx, and a request that fits the schema must get its exact
status (`bench/api_fuzz.py expected_status`): 200 when its uploads are real images (most of them in
the fuzzing phase), else the 413/415/422 that the DESIGN names for the reason.

The API key variant fuzzes the operations behind the key with the key configured; schemathesis's
`ignored_auth` check resends requests without it and with a wrong one, and both must be 401.

The apps run their lifespan: schemathesis's ASGI client starts it with the first request and its
pytest plugin ends it after each test (a `/ready` other than 200 would fail `expected_status`).
The document is loaded at import, from an app without models, because schemathesis's fixture
loader (`schemathesis.pytest.from_fixture`) fails under pytest 9.2 (`Function._nodeid` is gone).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from api.app import create_app
from bench.api_fuzz import (
    KEY,
    KEYED_EXCLUDED,
    KEYED_HEADERS,
    OPEN_EXCLUDED,
    fuzz_settings,
    load_schema,
    problems,
)
from tests.api_fixtures import save_tiny_captioner, save_tiny_vqa

EXAMPLES = 25  # per operation in the fuzzing phase; the coverage phase adds its own cases
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

SCHEMA = load_schema(EXAMPLES)
# The keyed variant sends the right key itself and generates no credentials of its own: a wrong
# generated one next to it would be outvoted (one right key is enough for `require_api_key`).
KEYED_SCHEMA = load_schema(EXAMPLES, with_security_parameters=False).include(
    lambda ctx: bool(ctx.operation.definition.raw.get("security"))
)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "caption_model": save_tiny_captioner(root / "cap"),
        "vqa_model": save_tiny_vqa(root / "vqa"),
    }


@pytest.fixture(scope="module")
def open_app(model_dirs):
    return create_app(fuzz_settings(model_dirs))


@pytest.fixture(scope="module")
def keyed_app(model_dirs):
    return create_app(fuzz_settings(model_dirs, api_key=KEY))


@SCHEMA.parametrize()
@FUZZ
def test_open_api(case, open_app):
    response = case.call_and_validate(app=open_app, excluded_checks=OPEN_EXCLUDED)
    assert not problems(case, response)


@KEYED_SCHEMA.parametrize()
@FUZZ
def test_api_with_key(case, keyed_app):
    response = case.call_and_validate(
        app=keyed_app, headers=KEYED_HEADERS, excluded_checks=KEYED_EXCLUDED
    )
    assert not problems(case, response)
