"""Measurement and reporting: op and model benchmarks, FLOPs, ablation reports."""
