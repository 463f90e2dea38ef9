"""Production settings with a URLconf that adds a bare view, for benchmarks/webhook_throughput.py.

Everything else (middleware, database options, cache, logging) is production's, so the bare view
and the webhook pay the same framework cost and their ratio measures the webhook's own work.
"""

from config.settings.production import *  # noqa: F403

ROOT_URLCONF = "benchmarks.bench_urls"
