"""MAC and parameter counting: static, and per-sample for channel-skipping (dynamic) models."""

from .counter import ChannelActivity, LayerShape, count_macs, count_params, dynamic_macs, layer_shapes

__all__ = ["ChannelActivity", "LayerShape", "count_macs", "count_params", "dynamic_macs", "layer_shapes"]
