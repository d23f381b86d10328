"""Deployment: verified `.tflite` files, Edge TPU readiness, LiteRT latency."""

from tfhybrid.export.edgetpu import EdgeTPUReport, Finding, check_edgetpu
from tfhybrid.export.tflite import ExportReport, benchmark_tflite, export_tflite

__all__ = [
    "EdgeTPUReport",
    "ExportReport",
    "Finding",
    "benchmark_tflite",
    "check_edgetpu",
    "export_tflite",
]
