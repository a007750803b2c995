from __future__ import annotations

import re

from packager.runtime.metrics import Histogram, Metrics

SAMPLE = re.compile(r'^[a-z_]+(\{([a-z_]+="[^"]*",?)*\})? -?[0-9.e+]+$')


def test_histogram_buckets_are_cumulative() -> None:
    histogram = Histogram((1, 2, 4))
    for value in (0.5, 1, 3, 10):
        histogram.observe(value)
    lines = histogram.render("h")
    assert lines == [
        'h_bucket{le="1"} 2',
        'h_bucket{le="2"} 2',
        'h_bucket{le="4"} 3',
        'h_bucket{le="+Inf"} 4',
        "h_sum 14.5",
        "h_count 4",
    ]


def test_render_is_prometheus_text_with_help_and_type_for_every_metric() -> None:
    metrics = Metrics()
    metrics.request("infer", 200, 0.003)
    metrics.request("infer", 400, 0.001)
    metrics.inference(4, 0.002)
    metrics.count("cache_hits")
    text = metrics.render()
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif not line.startswith("# HELP "):
            assert SAMPLE.match(line), line
    for name in names:
        assert f"# HELP {name} " in text
    assert 'edgepack_requests_total{endpoint="infer",code="200"} 1' in text
    assert "edgepack_errors_total 1" in text
    assert 'edgepack_batch_size_bucket{le="4"} 1' in text
    assert "edgepack_cache_hits_total 1" in text
    rss = next(line for line in text.splitlines() if line.startswith("process_resident"))
    assert int(rss.split()[1]) > 0
    report = metrics.report()
    assert (report["requests"], report["errors"], report["mean_batch_size"]) == (2, 1, 4.0)
