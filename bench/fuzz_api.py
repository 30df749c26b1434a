"""A long schema fuzz of the API: schemathesis cases for every operation of the real app, in-process.

The same generation and checks as tests/test_api_schema_fuzz.py (bench/api_fuzz.py), with many more
examples: for each operation, `--examples` positive cases (fitting the schema; uploads are real
images two times in three) and as many negative ones (violating it), sent through schemathesis's
ASGI transport to an app with the demo models (models/, what `make serve` serves), or with tiny
untrained ones written to a temporary folder (`--models tiny`, or when the demo models are
missing); then the operations behind the API key, with a key configured (`--no-key-variant`).

Each response goes through schemathesis's checks (documented status code, content type, headers
and body schema; negative data rejected; the key enforced) and `expected_status` (the exact status
of a request that fits the schema). Every failing check is counted, not only the first one.

    python bench/fuzz_api.py [--examples 200] [--models demo|tiny] [--seed 0]

Prints requests and status codes per operation (including the extra requests the checks send,
such as the same request without the key) and the first few failures with a curl line, then one
JSON line: {"operations", "requests", "unexpected_5xx", "schema_violations", "other_failures", ...}.

Seen on the shared 2-core CPU with --examples 200 (seed 0): 14 operations, 4730 requests, no 5xx,
no schema violation, no other failure; 84 s with the demo models, 277 s with the tiny ones (an
untrained decoder writes max_length words in every beam, and each new beam shape is slow at first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api_fuzz import (  # noqa: E402
    KEY,
    KEYED_EXCLUDED,
    KEYED_HEADERS,
    OPEN_EXCLUDED,
    fuzz_settings,
    load_schema,
    problems,
    save_untrained_models,
)
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.core.failures import FailureGroup, MalformedJson, ServerError  # noqa: E402
from schemathesis.openapi.checks import (  # noqa: E402
    ContentDeserializationError,
    JsonSchemaError,
    MalformedMediaType,
    MissingContentType,
    MissingHeaders,
    UndefinedContentType,
    UndefinedStatusCode,
)
from schemathesis.python import asgi  # noqa: E402

from api.app import create_app  # noqa: E402
from captioner.paths import DEFAULT_CAPTION_MODEL, DEFAULT_VQA_MODEL  # noqa: E402

# schemathesis failures that mean "the response is not what the schema documents"
CONFORMANCE = (
    UndefinedStatusCode,
    UndefinedContentType,
    MissingContentType,
    MalformedMediaType,
    JsonSchemaError,
    MissingHeaders,
    MalformedJson,
    ContentDeserializationError,
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--examples", type=int, default=200, help="cases per operation and mode")
    p.add_argument("--models", choices=("demo", "tiny"), default="demo")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed (runs are reproducible)")
    p.add_argument("--no-key-variant", action="store_true", help="skip the API key variant")
    p.add_argument("--show", type=int, default=5, help="failures to print in full")
    return p


def served(app) -> Counter:
    """Requests the app has answered, by status code: its own Prometheus counter, so the extra
    requests that schemathesis's checks send (without the key, other methods, ...) count too."""
    counts: Counter = Counter()
    for family in app.state.metrics.requests.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                counts[int(sample.labels["status"])] += int(sample.value)
    return counts


class Tally:
    def __init__(self) -> None:
        self.cases: Counter = Counter()
        self.schema_violations = 0
        self.other_failures = 0
        self.shown: list[str] = []
        self.kinds: Counter = Counter()

    def failure(self, label: str, title: str, text: str, curl: str, show: int, kind: str) -> None:
        """`kind`: "schema" (not as documented), "server" (a 5xx, counted from the app's own
        counter instead) or "other" (a failed check: negative data accepted, the key ignored,
        not the exact expected status, ...)."""
        self.kinds[(label, title)] += 1
        if kind == "schema":
            self.schema_violations += 1
        elif kind == "other":
            self.other_failures += 1
        if len(self.shown) < show:
            self.shown.append(f"{label}: {title}\n{text}\n    {curl}")


def fuzz_operation(operation, app, tally: Tally, args, variant: str) -> None:
    headers = KEYED_HEADERS if variant == "keyed" else None
    excluded = KEYED_EXCLUDED if variant == "keyed" else OPEN_EXCLUDED

    def send(case) -> None:
        tally.cases[operation.label] += 1
        label, curl = operation.label, case.as_curl_command(headers)
        try:
            response = case.call_and_validate(app=app, headers=headers, excluded_checks=excluded)
        except FailureGroup as group:
            for failure in group.exceptions:
                kind = (
                    "schema"
                    if isinstance(failure, CONFORMANCE)
                    else "server"
                    if isinstance(failure, ServerError)
                    else "other"
                )
                tally.failure(label, failure.title, failure.message, curl, args.show, kind)
            return
        except Exception as exc:  # the app raised: its 500 is in its counter; a server logs it
            tally.failure(label, "exception", repr(exc), curl, args.show, "server")
            return
        for problem in problems(case, response):
            if not problem.startswith("server error"):
                tally.failure(label, "expected_status", problem, curl, args.show, "other")

    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        strategy = operation.as_strategy(generation_mode=mode)
        run = settings(
            max_examples=args.examples,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )(given(case=strategy)(send))
        with contextlib.suppress(Unsatisfiable):  # nothing to negate: no parameters, no body
            seed(args.seed)(run)()


def model_dirs(kind: str, tmp: Path) -> tuple[str, dict[str, Path]]:
    """The kind actually used and its folders: the demo models when asked for and present."""
    if kind == "demo" and DEFAULT_CAPTION_MODEL.is_dir() and DEFAULT_VQA_MODEL.is_dir():
        return kind, {"caption_model": DEFAULT_CAPTION_MODEL, "vqa_model": DEFAULT_VQA_MODEL}
    return "tiny", save_untrained_models(tmp)


def main(args: argparse.Namespace) -> dict:
    # python-multipart logs a warning for each malformed part header; the 400s are counted below.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    tally = Tally()
    requests, unexpected_5xx, operations = 0, 0, 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        used, models = model_dirs(args.models, Path(tmp))
        variants = [("open", create_app(fuzz_settings(models)), load_schema(args.examples))]
        if not args.no_key_variant:
            keyed = load_schema(args.examples, with_security_parameters=False).include(
                lambda ctx: bool(ctx.operation.definition.raw.get("security"))
            )
            variants.append(("keyed", create_app(fuzz_settings(models, api_key=KEY)), keyed))
        for variant, app, schema in variants:
            for result in schema.get_all_operations():
                operation = result.ok()
                before, clock = served(app), time.perf_counter()
                fuzz_operation(operation, app, tally, args, variant)
                codes = served(app) - before
                operations += 1
                requests += codes.total()
                unexpected_5xx += sum(n for code, n in codes.items() if code >= 500)
                label = f"{variant:5} {operation.label}"
                print(
                    f"{label:32} cases {tally.cases[operation.label]:5}  "
                    f"requests {codes.total():5}  {time.perf_counter() - clock:6.1f} s  "
                    + " ".join(f"{code}:{n}" for code, n in sorted(codes.items())),
                    flush=True,
                )
                tally.cases.pop(operation.label)  # the key variant counts on its own
        asgi.shutdown_lifespans()  # the apps' lifespans, started by schemathesis's ASGI client
    for (label, title), n in sorted(tally.kinds.items()):
        print(f"failures: {label}: {title}: {n}")
    for text in tally.shown:
        print(text)
    summary = {
        "operations": operations,
        "requests": requests,
        "unexpected_5xx": unexpected_5xx,
        "schema_violations": tally.schema_violations,
        "other_failures": tally.other_failures,
        "examples": args.examples,
        "models": used,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
