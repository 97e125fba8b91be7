"""Prometheus metrics, in a registry of the app's own (two apps in one process never mix).

Latency histograms are observed by the request streams (`RequestObserver`); gauges and engine
counters are read at scrape time from the snapshot the engine thread refreshes after each step.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kiln.runtime.async_engine import AsyncLLMEngine
from kiln.runtime.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                    1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
FINISH_REASONS = ("stop", "length", "abort", "error")


class _EngineCollector(Collector):
    """Gauges and counters from the engine's last stats snapshot."""

    def __init__(self, engine: AsyncLLMEngine):
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        s = self._engine.stats
        yield GaugeMetricFamily("kiln_num_requests_running", "Sequences in the running batch.", s["running"])
        yield GaugeMetricFamily("kiln_num_requests_waiting", "Sequences waiting to be scheduled.", s["waiting"])
        yield GaugeMetricFamily("kiln_kv_cache_usage_ratio", "Fraction of KV blocks held by running sequences.",
                                s["kv_cache_usage"])
        yield GaugeMetricFamily("kiln_kv_cache_free_blocks", "KV blocks not held by any sequence.",
                                s["num_free_kv_blocks"])
        yield GaugeMetricFamily("kiln_prefix_cache_hit_rate", "Fraction of queried prompt blocks found cached.",
                                s["prefix_cache_hit_rate"])
        yield CounterMetricFamily("kiln_generation_tokens", "Tokens generated.", s["generated_tokens"])
        yield CounterMetricFamily("kiln_num_preemptions", "Sequences preempted for lack of KV blocks.",
                                  s["preemptions"])
        fin = CounterMetricFamily("kiln_request_success", "Finished sequences by finish reason.",
                                  labels=["finish_reason"])
        counts = s["finish_counts"]
        for reason in sorted(set(FINISH_REASONS) | set(counts)):
            fin.add_metric([reason], counts.get(reason, 0))
        yield fin
        if "lora" in s:  # vLLM's vllm:lora_requests_info: the adapters in use, as labels
            lora = s["lora"]
            info = GaugeMetricFamily("kiln_lora_requests_info", "LoRA adapters of the running and waiting requests.",
                                     labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
            info.add_metric([str(lora["max_lora"]), ",".join(lora["running"]), ",".join(lora["waiting"])], 1)
            yield info


class ServerMetrics:
    """The app's metrics; also the async engine's `RequestObserver`."""

    def __init__(self, engine: AsyncLLMEngine):
        self.registry = CollectorRegistry()
        self.ttft = Histogram("kiln_time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("kiln_inter_token_latency_seconds", "Time between two outputs of a request.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("kiln_e2e_request_latency_seconds", "Time from arrival to the last output.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def on_finished(self, output: RequestOutput, seconds: float) -> None:
        self.e2e.observe(seconds)
        self.prompt_tokens.inc(len(output.prompt_token_ids))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
