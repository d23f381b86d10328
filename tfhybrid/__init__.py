"""tfhybrid: hybrid structured compression for Keras (tf_keras) models.

The public API, re-exported; see DESIGN.md for the architecture.
"""

from tfhybrid._keras import keras
from tfhybrid.channels import ChannelGroup, Member, channel_groups
from tfhybrid.cost import LayerCost, Profile, profile
from tfhybrid.report import summary
from tfhybrid.surgery import ChannelMask, factorize, prune_channels

__version__ = "0.1.0"

__all__ = [
    "ChannelGroup",
    "ChannelMask",
    "LayerCost",
    "Member",
    "Profile",
    "channel_groups",
    "factorize",
    "keras",
    "profile",
    "prune_channels",
    "summary",
]
