"""Serving: KServe v2 / Open Inference Protocol over HTTP, dynamic batching, metrics."""
