"""Timing and benchmarking of Runners."""
