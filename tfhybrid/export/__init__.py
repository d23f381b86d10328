"""Deployment: verified `.tflite` files, Edge TPU readiness, LiteRT latency (whole, per
operator, and per layer over kept channels for a latency budget), and compact weight files
in the counted block format."""

from tfhybrid.export.compact import CompactReport, load_compact, save_compact
from tfhybrid.export.edgetpu import EdgeTPUReport, Finding, check_edgetpu
from tfhybrid.export.latency_table import measure_latency_table
from tfhybrid.export.op_profile import OpProfile, profile_ops
from tfhybrid.export.tflite import ExportReport, benchmark_tflite, export_tflite

__all__ = [
    "CompactReport",
    "load_compact",
    "save_compact",
    "EdgeTPUReport",
    "ExportReport",
    "Finding",
    "OpProfile",
    "benchmark_tflite",
    "check_edgetpu",
    "export_tflite",
    "measure_latency_table",
    "profile_ops",
]
