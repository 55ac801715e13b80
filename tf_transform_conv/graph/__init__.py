"""A model's graph: walking it, rewriting it, and which of its channels are the same.

- `nodes`: whether a model has a graph (`is_graph_model`,
  `check_graph_model`) and its layer calls in running order (`graph_nodes`).
- `rewrite`: cloning a model with some layers replaced (`rewrite_model`) and
  resolving a verb's `layers` argument (`select_layers`).
- `channels`: `ChannelGraph`, the one analysis of which channels of a model's
  tensors correspond (through channel-wise layers, residual additions,
  concatenation and channel padding).
- `groups`: the channels structured removal removes together
  (`channel_groups`, `ChannelGroup`), built on `ChannelGraph`; DAFP, the
  knapsack and the saliencies read them.
"""

from tf_transform_conv.graph.channels import ChannelGraph
from tf_transform_conv.graph.groups import ChannelGroup
from tf_transform_conv.graph.groups import channel_groups
from tf_transform_conv.graph.nodes import check_graph_model
from tf_transform_conv.graph.nodes import graph_nodes
from tf_transform_conv.graph.nodes import is_graph_model
from tf_transform_conv.graph.rewrite import rewrite_model
from tf_transform_conv.graph.rewrite import select_layers

__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "channel_groups",
    "check_graph_model",
    "graph_nodes",
    "is_graph_model",
    "rewrite_model",
    "select_layers",
]
