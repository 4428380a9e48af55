"""``/metrics``: Prometheus text with vLLM's metric names under the ``qcompiler:`` prefix. Gauges and
counters are read from the engine loop's last snapshot when scraped; latency histograms are
observed by the loop thread as tokens come."""
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Snapshot:
    def __init__(self, loop, model: str):
        self.loop, self.model = loop, model

    def collect(self):
        s, labels = self.loop.snapshot, ["model_name"]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"qcompiler:{name}", doc, labels=labels)
            g.add_metric([self.model], value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"qcompiler:{name}", doc, labels=labels)
            c.add_metric([self.model], value)
            return c

        yield gauge("num_requests_running", "Requests in the running batch.", s["running"])
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s["waiting"] + self.loop.pending)
        yield gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full); evictable cached blocks count "
                    "as free.", s["kv_cache_usage"])
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s["prompt_tokens"])
        yield counter("prefix_cache_hits", "Prompt tokens served from the prefix cache.", s["cached_tokens"])
        yield counter("num_preemptions", "Running requests preempted for lack of KV blocks.", s["preemptions"])
        yield counter("prompt_tokens", "Prompt tokens admitted (recomputed ones again).", s["prompt_tokens"])
        yield counter("generation_tokens", "Tokens generated.", s["generation_tokens"])
        done = CounterMetricFamily("qcompiler:request_success", "Requests finished, by finish reason.",
                                   labels=[*labels, "finished_reason"])
        for reason in sorted({"stop", "length", "abort", *s["finished"]}):
            done.add_metric([self.model, reason], s["finished"].get(reason, 0))
        yield done


class Metrics:
    def __init__(self, model: str):
        self.model = model
        self.registry = CollectorRegistry()

        def hist(name, doc):
            return Histogram(f"qcompiler:{name}", doc, labelnames=["model_name"], registry=self.registry,
                             buckets=LATENCY_BUCKETS).labels(model)

        self.ttft = hist("time_to_first_token_seconds", "Time from arrival to the first generated token.")
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive generated tokens of a request.")
        self.e2e = hist("e2e_request_latency_seconds", "Time from arrival to the last token.")
        self.queue_time = hist("request_queue_time_seconds", "Time from arrival to admission into the batch.")

    def attach(self, loop) -> None:
        self.registry.register(_Snapshot(loop, self.model))

    def render(self) -> bytes:
        return generate_latest(self.registry)
