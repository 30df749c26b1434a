"""Micro-batching: the batcher on its own, then concurrent HTTP requests through the real app."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from api.app import create_app
from api.batching import BatcherClosedError, MicroBatcher, QueueFullError
from captioner.caption.captioner import Captioner
from tests.api_fixtures import (
    TestClient,
    assert_error,
    gate_captioner,
    png,
    save_tiny_captioner,
    settings,
    upload,
)

# -- the batcher on its own (a plain function as the "model") ----------------------------------


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def recording_batcher(**kwargs):
    batches: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        if any(i < 0 for i in items):
            raise ValueError(f"negative item in {items}")
        return [2 * i for i in items]

    args = {"max_batch_size": 4, "max_delay_s": 0.05, "max_queue": 16}
    args.update(kwargs)
    return MicroBatcher("test", double, **args), batches


def test_concurrent_items_share_a_batch_and_keep_their_results():
    async def main():
        batcher, batches = recording_batcher(max_batch_size=4, max_delay_s=0.2)
        await batcher.start()
        outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        await batcher.close()
        return outcomes, batches

    outcomes, batches = run(main())
    assert [result for result, _ in outcomes] == [2 * i for i in range(10)]
    assert [len(b) for b in batches] == [4, 4, 2]
    assert [size for _, size in outcomes] == [4] * 8 + [2] * 2


def test_batch_size_one_turns_batching_off():
    async def main():
        batcher, batches = recording_batcher(max_batch_size=1, max_delay_s=0.5)
        await batcher.start()
        outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(5)))
        await batcher.close()
        return outcomes, batches

    outcomes, batches = run(main())
    assert batches == [[0], [1], [2], [3], [4]]
    assert [size for _, size in outcomes] == [1] * 5


def test_waits_at_most_the_delay_for_more_items():
    async def main():
        batcher, batches = recording_batcher(max_batch_size=8, max_delay_s=0.1)
        await batcher.start()
        started = time.perf_counter()
        [(result, size)] = [await batcher.submit(1)]
        waited = time.perf_counter() - started
        await batcher.close()
        return result, size, waited

    result, size, waited = run(main())
    assert (result, size) == (2, 1)
    assert 0.09 <= waited < 5


def test_late_arrivals_within_the_delay_join_the_batch():
    async def main():
        batcher, batches = recording_batcher(max_batch_size=8, max_delay_s=0.3)
        await batcher.start()

        async def later(i):
            await asyncio.sleep(0.05)
            return await batcher.submit(i)

        await asyncio.gather(batcher.submit(0), later(1), later(2))
        await batcher.close()
        return batches

    assert run(main()) == [[0, 1, 2]]


def test_full_queue_refuses_and_submit_many_is_all_or_none():
    async def main():
        batcher, batches = recording_batcher(max_batch_size=8, max_delay_s=5.0, max_queue=3)
        await batcher.start()
        waiting = asyncio.ensure_future(batcher.submit_many([1, 2]))
        await asyncio.sleep(0)
        assert batcher.depth == 2
        with pytest.raises(QueueFullError, match="queue is full"):
            await batcher.submit_many([3, 4])
        assert batcher.depth == 2  # nothing of the refused request was queued
        third = asyncio.ensure_future(batcher.submit(5))
        await asyncio.sleep(0)
        assert batcher.depth == 3
        await batcher.close()
        for future in (waiting, third):
            with pytest.raises(BatcherClosedError):
                await future
        return batches

    assert run(main()) == []  # the 5 s delay never ran out: nothing reached the model


def test_callers_that_give_up_are_dropped_before_the_model():
    async def main():
        batcher, batches = recording_batcher(max_batch_size=8, max_delay_s=0.2)
        await batcher.start()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.submit(1), 0.01)
        result = await batcher.submit(2)
        await batcher.close()
        return result, batches

    result, batches = run(main())
    assert result == (4, 1)
    assert batches == [[2]]


def test_a_failing_item_fails_only_its_own_request():
    async def main():
        batcher, batches = recording_batcher(max_batch_size=4, max_delay_s=0.2)
        await batcher.start()
        outcomes = await asyncio.gather(
            batcher.submit(1), batcher.submit(-1), batcher.submit(3), return_exceptions=True
        )
        await batcher.close()
        return outcomes, batches

    outcomes, batches = run(main())
    assert outcomes[0] == (2, 3) and outcomes[2] == (6, 3)
    assert isinstance(outcomes[1], ValueError)
    assert batches[0] == [1, -1, 3]  # the whole batch first, then one by one
    assert batches[1:] == [[1], [-1], [3]]


def test_submit_before_start_is_refused():
    batcher, _ = recording_batcher()
    with pytest.raises(BatcherClosedError):
        run(batcher.submit(1))


@pytest.mark.parametrize("kwargs", [{"max_batch_size": 0}, {"max_delay_s": -1.0}, {"max_queue": 0}])
def test_bad_batcher_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        recording_batcher(**kwargs)


# -- through HTTP -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_captioner(tmp_path_factory.mktemp("models") / "cap")


@pytest.fixture(scope="module")
def captioner(model_dir):
    return Captioner.load(model_dir)


def post_all(client, requests):
    """Send (query, image bytes) pairs concurrently from threads; responses in order."""
    responses = [None] * len(requests)

    def send(i, query, data):
        responses[i] = client.post(f"/caption{query}", files=upload(data))

    threads = [threading.Thread(target=send, args=(i, *r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    return threads, responses


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def batch_sizes(client) -> list[int]:
    return client.app.state.services["captioner"].batcher.stats.sizes


def test_concurrent_requests_run_as_one_batch(model_dir, captioner):
    app = create_app(settings(caption_model=model_dir, max_batch_size=8, max_batch_delay_ms=0))
    with TestClient(app) as client:
        gated = gate_captioner(client)
        first, _ = post_all(client, [("", png(100))])
        gated.entered.wait(10)  # the first request holds the model ...
        images = [png(seed) for seed in range(101, 108)]
        queries = ["?beam_size=1", "?beam_size=2", "?beam_size=2&max_length=4", ""] * 2
        requests = list(zip(queries, images))
        threads, responses = post_all(client, requests)
        batcher = client.app.state.services["captioner"].batcher
        wait_for(lambda: batcher.depth == 7)  # ... while seven more queue up
        gated.gate.set()
        for t in [*first, *threads]:
            t.join(20)
        assert batch_sizes(client) == [1, 7]
        metrics = client.get("/metrics").text
        assert 'captioner_batch_size_count{model="captioner"} 2.0' in metrics
        assert 'captioner_batch_size_sum{model="captioner"} 8.0' in metrics
    for (query, data), response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        params = dict(p.split("=") for p in query[1:].split("&") if p)
        [expected] = captioner.caption(
            [data],
            beam_size=int(params.get("beam_size", 3)),
            max_length=int(params.get("max_length", 20)),
        )
        body = response.json()
        assert body["tokens"] == expected.tokens
        np.testing.assert_allclose(body["token_logprobs"], expected.token_logprobs, atol=1e-5)


def test_requests_within_the_delay_are_gathered(model_dir):
    app = create_app(settings(caption_model=model_dir, max_batch_size=8, max_batch_delay_ms=400))
    with TestClient(app) as client:
        threads, responses = post_all(client, [("", png(s)) for s in range(4)])
        for t in threads:
            t.join(20)
        assert all(r.status_code == 200 for r in responses)
        assert max(batch_sizes(client)) > 1


def test_full_queue_is_503_with_retry_after(model_dir):
    app = create_app(
        settings(caption_model=model_dir, max_batch_size=1, max_queue=1, max_batch_images=1)
    )
    with TestClient(app) as client:
        gated = gate_captioner(client)
        running, running_responses = post_all(client, [("", png(1))])
        gated.entered.wait(10)
        queued, queued_responses = post_all(client, [("", png(2))])
        batcher = client.app.state.services["captioner"].batcher
        wait_for(lambda: batcher.depth == 1)
        refused = client.post("/caption", files=upload(png(3)))
        detail = assert_error(refused, 503)
        assert "queue is full" in detail
        assert int(refused.headers["Retry-After"]) > 0
        gated.gate.set()
        for t in [*running, *queued]:
            t.join(20)
        assert [r.status_code for r in running_responses + queued_responses] == [200, 200]
        assert client.post("/caption", files=upload(png(3))).status_code == 200


def test_timeout_is_504_and_abandoned_requests_skip_the_model(model_dir):
    app = create_app(settings(caption_model=model_dir, max_batch_size=1, request_timeout_s=0.3))
    with TestClient(app) as client:
        gated = gate_captioner(client)
        threads, responses = post_all(client, [("", png(1))])
        gated.entered.wait(10)
        late = client.post("/caption", files=upload(png(2)))  # queued behind the held model
        assert "0.3 s" in assert_error(late, 504)
        for t in threads:
            t.join(20)
        assert_error(responses[0], 504)
        gated.gate.set()
        wait_for(lambda: client.app.state.services["captioner"].batcher.depth == 0)
        assert client.post("/caption", files=upload(png(3))).status_code == 200
        assert gated.calls == 2  # the held request and the last one; the timed-out one never ran
