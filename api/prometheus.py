"""Prometheus metrics, one registry per app (so tests that build many apps do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from captioner.vqa.feature_cache import FeatureCache

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "captioner_http_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "captioner_http_request_duration_seconds",
            "Time from request start to the end of the response, by route template",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "captioner_batch_size",
            "Images per model batch (1 means no two requests were batched together)",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "captioner_batch_duration_seconds",
            "Model time per batch (encoder and decoding)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "captioner_queue_depth", "Images waiting for a model batch", ["model"], registry=r
        )
        self.model_loaded = Gauge(
            "captioner_model_loaded", "1 when the model loaded, else 0", ["model"], registry=r
        )
        self.model_load_seconds = Gauge(
            "captioner_model_load_seconds", "Time taken to load the model", ["model"], registry=r
        )
        self.streams = Counter(
            "captioner_caption_streams",
            "Streamed captions (POST /caption/stream) by how they ended once streaming: "
            "completed, disconnected (the client left: its search stopped), timeout or error",
            ["outcome"],
            registry=r,
        )
        self._caches: dict[str, FeatureCache] = {}
        r.register(_CacheCollector(self._caches))

    def watch_cache(self, model: str, cache: FeatureCache) -> None:
        """Report `cache`'s hits and misses (the answerer's own counts) as `model`'s."""
        self._caches[model] = cache

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector:
    """The feature caches' own hit and miss counts, read at each scrape."""

    def __init__(self, caches: dict[str, FeatureCache]):
        self.caches = caches

    def collect(self):
        hits = CounterMetricFamily(
            "captioner_feature_cache_hits",
            "Images whose encoder features came from the feature cache",
            labels=["model"],
        )
        misses = CounterMetricFamily(
            "captioner_feature_cache_misses", "Images that needed an encoder pass", labels=["model"]
        )
        for model, cache in self.caches.items():
            hits.add_metric([model], cache.hits)
            misses.add_metric([model], cache.misses)
        yield hits
        yield misses
