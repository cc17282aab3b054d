"""Latency: measuring a network on the device and per-conv latency tables for latency-targeted search."""
