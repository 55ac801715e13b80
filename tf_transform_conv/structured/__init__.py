"""Structured pruning: a smaller dense network without the channels you drop.

- `removal`: `remove_filters(model, keep)` builds the smaller model of plain
  Keras layers; `removal_cost` counts it without building it.
- `dafp`: dependency-aware filter pruning (DAFP): which channels to keep by
  their importance (`dafp_keep`, `dafp_threshold`), and `SparsityTuner`,
  the self-tuning L1 penalty on batch-norm scales that drives them there.
- `knapsack`: `knapsack_removal`, the channels to keep under a parameter, multiply-add
  or latency budget, as a knapsack over their first-order importance.

Which channels go together is `graph.groups.channel_groups` (re-exported
here); the channel scores live in `tf_transform_conv.saliency`.
"""

from tf_transform_conv.graph.groups import ChannelGroup
from tf_transform_conv.graph.groups import channel_groups
from tf_transform_conv.structured.dafp import GammaL1
from tf_transform_conv.structured.dafp import SparsityTuner
from tf_transform_conv.structured.dafp import dafp_keep
from tf_transform_conv.structured.dafp import dafp_sparsity
from tf_transform_conv.structured.dafp import dafp_threshold
from tf_transform_conv.structured.knapsack import GroupCosts
from tf_transform_conv.structured.knapsack import KnapsackRemoval
from tf_transform_conv.structured.knapsack import channel_costs
from tf_transform_conv.structured.knapsack import knapsack_removal
from tf_transform_conv.structured.removal import removal_cost
from tf_transform_conv.structured.removal import remove_filters

__all__ = [
    "ChannelGroup",
    "GammaL1",
    "GroupCosts",
    "KnapsackRemoval",
    "SparsityTuner",
    "channel_costs",
    "channel_groups",
    "dafp_keep",
    "dafp_sparsity",
    "dafp_threshold",
    "knapsack_removal",
    "removal_cost",
    "remove_filters",
]
