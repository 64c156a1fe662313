"""runner's pipeline split for Llama-family models in mlx-lm (llama, mistral, qwen2).

mlx-lm 0.32 pipelines only a few architectures, and only evenly. Here rank r runs the contiguous
layers [start, stop) given to it (sized by each host's memory, see `runner_mlx.split`):

    rank 0: embed -> layers [0, a)  --send h-->
    rank 1:          recv h -> layers [a, b)  --send h--> ...
    last rank:                          recv h -> layers [.., n)
    every rank: all_gather(h), keep the last rank's rows -> final norm -> head -> logits

Every rank ends with the same logits, so `mlx_lm.stream_generate` runs unchanged on every rank and
samples the same token (same seed). The stage wraps mlx-lm's own Model and layers.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from runner.words import counted


class PipelineStage(nn.Module):
    def __init__(self, model: nn.Module, group, start: int, stop: int):
        super().__init__()
        self.model = model              # mlx-lm's Model: .model.embed_tokens/.layers/.norm, .lm_head
        self.group = group
        self.start, self.stop = start, stop

    @property
    def layers(self):
        return self.model.model.layers[self.start:self.stop]

    def make_cache(self):
        return [KVCache() for _ in self.layers]

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None):
        inner = self.model.model
        rank, size = self.group.rank(), self.group.size()
        h = inner.embed_tokens(inputs)
        layers = self.layers
        if cache is None:
            cache = [None] * len(layers)
        mask = create_attention_mask(h, cache[0])
        if rank > 0:
            h = mx.distributed.recv_like(h, rank - 1, group=self.group)
        for layer, layer_cache in zip(layers, cache):
            h = layer(h, mask, cache=layer_cache)
        if rank < size - 1:
            h = mx.distributed.send(h, rank + 1, group=self.group)
            if cache[-1] is not None:   # prefill evaluates only the caches: keep the send in their graph
                cache[-1].keys = mx.depends(cache[-1].keys, h)
        batch = h.shape[0]
        h = mx.distributed.all_gather(h, group=self.group)[-batch:]   # the last rank's rows
        h = inner.norm(h)
        if getattr(self.model.args, "tie_word_embeddings", False):
            return inner.embed_tokens.as_linear(h)
        return self.model.lm_head(h)


def drop_other_layers(model: nn.Module, start: int, stop: int) -> None:
    """Forget the layers another rank runs before their weights are read (the model is lazy)."""
    layers = model.model.layers
    if stop > len(layers) or not 0 <= start < stop:
        raise ValueError(f"layer range {start}-{stop} does not fit a model of {counted(len(layers), 'layer')}")
    for index in range(len(layers)):
        if not start <= index < stop:
            layers[index] = None
