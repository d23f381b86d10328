"""tfhybrid: hybrid structured compression for Keras (tf_keras) models.

The public API, re-exported; docs/architecture.md describes the architecture.
"""

from tfhybrid import _startup  # noqa: F401  (first: quiets TensorFlow for the command line)
from tfhybrid._keras import keras
from tfhybrid.api import custom_object_scope, hybrid_compress, strip
from tfhybrid.budget import Budget
from tfhybrid.channels import ChannelGroup, Member, channel_groups, register_layer
from tfhybrid.cost import LayerCost, Profile, profile
from tfhybrid.export import (
    CompactReport,
    EdgeTPUReport,
    ExportReport,
    OpProfile,
    benchmark_tflite,
    check_edgetpu,
    export_tflite,
    load_compact,
    measure_latency_table,
    profile_ops,
    save_compact,
)
from tfhybrid.latency import LatencyTable
from tfhybrid.report import summary
from tfhybrid.schedules import ExponentialDecay, LinearRamp
from tfhybrid.surgery import ChannelMask, factorize, prune_channels
from tfhybrid.techniques.base import Technique, register_technique
from tfhybrid.techniques.cluster import Cluster
from tfhybrid.techniques.compressions import Binarize, LowRank, Prune, Quantize, Ternarize
from tfhybrid.techniques.df import DF
from tfhybrid.techniques.dhp import DHP
from tfhybrid.techniques.lc import LC
from tfhybrid.techniques.lowrank_sparse import LowRankSparse
from tfhybrid.techniques.sparse import Sparse
from tfhybrid.techniques.unify import Unify
from tfhybrid.tfmot import quantize_aware
from tfhybrid.training.callbacks import CompressionLogger, CompressionScheduler
from tfhybrid.training.model import CompressionModel

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "CompressionLogger",
    "CompressionScheduler",
    "CompressionModel",
    "Cluster",
    "DF",
    "DHP",
    "LC",
    "Binarize",
    "LowRank",
    "Prune",
    "Quantize",
    "Ternarize",
    "LowRankSparse",
    "Sparse",
    "Unify",
    "Technique",
    "register_technique",
    "custom_object_scope",
    "hybrid_compress",
    "strip",
    "ChannelGroup",
    "CompactReport",
    "EdgeTPUReport",
    "ExportReport",
    "OpProfile",
    "benchmark_tflite",
    "check_edgetpu",
    "export_tflite",
    "load_compact",
    "LatencyTable",
    "measure_latency_table",
    "profile_ops",
    "save_compact",
    "quantize_aware",
    "ChannelMask",
    "ExponentialDecay",
    "LinearRamp",
    "LayerCost",
    "Member",
    "Profile",
    "channel_groups",
    "register_layer",
    "factorize",
    "keras",
    "profile",
    "prune_channels",
    "summary",
]
