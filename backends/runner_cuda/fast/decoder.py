"""A decode loop without per-token Python overhead, for Llama-family models loaded by transformers.

`FastDecoder` keeps a static KV cache (one preallocated tensor pair per layer) and runs the
model's own modules (embedding, norms, projections, MLP, head) in one explicit forward. Because
every tensor of a decode step has a fixed address, the step is captured once in a CUDA graph and
then replayed per token: one launch instead of ~1,000 Python-dispatched kernels. The attention
length is static within a graph, so graphs are captured per length bucket (256, 512, 1024, ...):
a step at position p attends over the smallest bucket that holds p + 1 positions, masked.

The elementwise pieces of a step (residual add + RMSNorm, RoPE on q and k, SiLU × up) are
fused by torch.compile, and for BF16 models q/k/v and gate/up become one GEMV each (the modules'
weights turned into views of one tensor: no extra memory). Those GEMVs and o and down run runner's
batch-1 Triton GEMV (`gemv.py`) where a sweep at load found it faster than cuBLAS for the shape
(`gemv=False`: cuBLAS throughout). With bitsandbytes NF4 weights, the
projections of a decode step run runner's own batch-1 kernels (`nf4_cuda.py`, reading bitsandbytes'
packed weights and double-quant state as they are; q/k/v and gate/up one launch each; by default on
the tensor cores, with the RMSNorms, residual adds and SiLU x up inside those launches), or
bitsandbytes' own with `nf4_kernel="bitsandbytes"` (`--kernel bitsandbytes`). The lm_head runs
the faster of the Triton GEMV and cuBLAS for its shape. A step ends with its greedy pick
(`pick.py`): the id where the next step reads its token (fed back in place), in pinned host memory
at its position, and the position moved on, so that a session decoding greedily a step ahead runs
graph after graph with nothing in between. Prefill keeps
bitsandbytes' (or torch's) own path, eagerly, `prefill_chunk` tokens at a time (budget.PREFILL_CHUNK,
what the Plan counts activations for), the lm_head for the last position only.

A model whose layers are split over several GPUs (accelerate's device map) runs as segments: each
contiguous run of layers on one device (with the embedding before it or the head after it, where
they sit there) is a segment with its own static input, its own CUDA graph per length bucket and its
layers' KV cache on its device; a step replays the segments in order and copies the hidden state
(one row) to the next device between them. `split_at` adds segment boundaries on one device, so
that the split runs (and is tested) without several GPUs.

    decoder = FastDecoder(model, max_len=4096)
    logits = decoder.prefill(prompt_ids)          # float32 [vocab], next-token logits
    logits = decoder.step(token_id)               # one token at the next position
    logits = decoder.step(decoder.last_pick)      # the id it picked greedily, read in place
    decoder.trim(n)                               # keep the first n positions (the next turn's prefix)
    logits = decoder.prefill(more_ids)            # appended after them

`kv_bits` (8 or 4, `--kv-bits`) stores the static cache quantized in the ordinary loop's format
(static_cache.QuantizedLayer: codes plus a scale and a bias per 64 values; quantized as written,
by one Triton launch a layer in a step; the split-KV attention dequantizes the codes it reads in
registers), so that a reply gives the ordinary loop's numbers with a quantized cache.

A decode step's attention is split over the cache, one thread block per part of each KV head's
positions (`attention.py`, flash-decoding in Triton), so that it does not slow down with length
(torch's SDPA put one thread block on each KV head's whole cache). On CPU (tests) the same forward
runs eagerly, without graphs, with SDPA.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Sequence

from runner.budget import PREFILL_CHUNK
from runner_cuda.fast.attention import attention_takes
from runner_cuda.fast.nf4 import nf4_weight_of
from runner_cuda.fast.static_cache import static_layer
from runner_cuda.plan_rules import FAST_PATH_MODEL_TYPES

if TYPE_CHECKING:
    import torch

FIRST_BUCKET = 256
# projection types whose forward runs inside a CUDA graph (no host synchronisation): plain
# Linear and bitsandbytes' 4-bit Linear; LLM.int8 and FP8 layers keep the ordinary loop
GRAPH_SAFE_LINEARS = ("Linear", "Linear4bit", "LinearNF4", "LinearFP4")
# where a step's RoPE and cache write run: in one Triton launch (kv_kernels.rope_and_write), apart
# (torch's operations), or in q/k/v's NF4Mma launch (its tiles hold RoPE's pairs: no launch of their own)
ROPE_PLACES = ("write", "apart", "qkv")
# The NF4 decode GEMV (LoadRequest.kernel, `--kernel`). "cuda" (default): nf4_cuda.NF4Mma, runner's
# tensor-core kernel with each layer's RMSNorms, residual adds and SiLU x up inside it, where it takes
# every projection (else "cuda-simt"); "cuda-simt": nf4_cuda.NF4Gemv, float32 products, q/k/v and
# gate/up one launch each; "cuda-bnb-rounding": that kernel rounding as bitsandbytes' does (bf16
# weights and products); "bitsandbytes": the modules' own batch-1 kernel
NF4_KERNELS = {"cuda": "float32", "cuda-simt": "float32", "cuda-bnb-rounding": "bitsandbytes", "bitsandbytes": None}   # -> rounding


class Unsupported(Exception):
    """The fast path does not handle this model; the caller keeps the ordinary loop."""


def _check_supported(model, max_len: int) -> None:
    """Raise Unsupported for a model the fast path does not run (the caller keeps the ordinary loop)."""
    import torch

    config = model.config
    if config.model_type not in FAST_PATH_MODEL_TYPES:
        raise Unsupported(f"model type {config.model_type!r} (fast path knows {', '.join(FAST_PATH_MODEL_TYPES)})")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) and max_len > config.sliding_window:
        raise Unsupported("sliding-window attention beyond the window")
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if len({d.type for d in devices}) != 1 or devices & {torch.device("meta")}:
        raise Unsupported(f"model spread over {', '.join(sorted(map(str, devices)))} (offloaded)")
    for layer in model.model.layers:
        for module in _projections(layer):
            kind = type(module).__name__
            if kind not in GRAPH_SAFE_LINEARS:
                raise Unsupported(f"{kind} projections (the fast path captures {', '.join(GRAPH_SAFE_LINEARS)})")


class FastDecoder:
    def __init__(self, model, max_len: int, *, use_graphs: bool | None = None, nf4_kernel: str | None = None,
                 compile_ops: bool | None = None, fuse_dense: bool | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 split_at: Sequence[int] = (), split_kv: bool | None = None, kv_bits: int | None = None,
                 gemv: bool | None = None, rope: str | None = None):
        import torch

        from runner.budget import KV_BITS, KV_GROUP_SIZE

        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1 token, not {prefill_chunk}")
        if kv_bits is not None and kv_bits not in KV_BITS:
            raise ValueError(f"kv_bits must be {' or '.join(map(str, KV_BITS))}, not {kv_bits}")
        self.prefill_chunk = prefill_chunk

        config = model.config
        _check_supported(model, max_len)
        self.model = model
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.head = model.lm_head
        if _device_of(self.norm) != _device_of(self.head):
            raise Unsupported("the final norm and the lm_head on different devices")
        self.segments = _segments(_device_of(self.embed), [_device_of(l) for l in self.layers], _device_of(self.head),
                                  split_at)
        self.device = self.segments[0].device          # where the token goes in
        self.devices = list(dict.fromkeys(segment.device for segment in self.segments))
        self.dtype = self.embed.weight.dtype
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = getattr(self.layers[0].self_attn, "scaling", self.head_dim**-0.5)
        if kv_bits is not None and self.head_dim % KV_GROUP_SIZE:
            raise Unsupported(f"a quantized KV cache with head size {self.head_dim} (groups of {KV_GROUP_SIZE})")
        self.kv_bits = kv_bits
        self.max_len = int(max_len)
        on_cuda = self.device.type == "cuda"
        self.use_graphs = on_cuda if use_graphs is None else use_graphs
        # a decode step's attention split over the cache (attention.py, Triton: CUDA, bf16 or fp16
        # caches, where its products are those of SDPA, and a power-of-two head dim), else SDPA
        if split_kv is None:
            split_kv = on_cuda and self.dtype in (torch.bfloat16, torch.float16) and attention_takes(self.head_dim)
        self.split_kv = split_kv
        # where a step's RoPE and cache write run (ROPE_PLACES): with the split-KV kernels (Triton) and a
        # plain bf16 cache, in q/k/v's fused NF4 launch where it takes them ("qkv"), else in one launch
        # ("write"); "apart" elsewhere, and for bench ablations
        fits = split_kv and kv_bits is None and self.dtype == torch.bfloat16
        self.rope = rope or ("qkv" if fits else "apart")
        if self.rope not in ROPE_PLACES or (self.rope != "apart" and not fits):
            raise ValueError(f"rope {self.rope!r}: one of {', '.join(ROPE_PLACES)}; all but apart with split-KV "
                             "attention over a plain bf16 cache")
        # NF4 decode GEMV: bitsandbytes' own batch-1 kernel (it reads the packed weights and the
        # double-quant state itself), or the Triton kernel of nf4.py in one of its modes
        self.nf4_kernel = nf4_kernel or "cuda"
        if self.nf4_kernel not in NF4_KERNELS:
            raise ValueError(f"nf4 kernel {self.nf4_kernel!r}: one of {', '.join(NF4_KERNELS)}")
        # per layer, runner's GEMV for q/k/v, o, gate/up and down (one launch per group), where
        # every layer's projections are NF4 weights the chosen kernel reads; else None
        self.nf4_fused = False     # the calls hold the norms, residual adds and SiLU x up (NF4Mma)
        self.nf4 = self._nf4_calls() if self.nf4_kernel != "bitsandbytes" else None
        if self.nf4 is None:
            self.nf4_kernel = "bitsandbytes"      # what runs: the modules' own kernel
        if self.rope == "qkv" and not (self.nf4_fused and self.nf4[0]["qkv"].rope):
            self.rope = "write"       # the fused kernels do not take this model, or not its heads
        if rope == "qkv" and self.rope != "qkv":
            raise ValueError("rope 'qkv' runs in runner's fused NF4 kernels (NF4Mma), which do not take this model")

        with torch.no_grad():
            self._allocate(inner.rotary_emb, config)
        self.eps = _norm_eps(self.norm)
        if config.hidden_act != "silu" or any(_norm_eps(n) != self.eps for l in self.layers for n in (l.input_layernorm, l.post_attention_layernorm)):
            raise Unsupported("activation other than SiLU or mixed norm epsilons")
        self.ops = FusedOps(compiled=on_cuda if compile_ops is None else compile_ops)
        self.qkv, self.gate_up = self._fused_dense(on_cuda if fuse_dense is None else fuse_dense)
        # BF16/FP16 decode projections: per layer {"qkv", "o", "gate_up", "down"} -> gemv.Projection
        # (None: F.linear). gemv None: on CUDA each shape's fastest of runner's Triton GEMV and cuBLAS,
        # timed at load; True: the Triton GEMV at its default configuration (tests); False: cuBLAS
        self.gemv = self._gemv_calls(on_cuda if gemv is None else gemv, sweep=gemv is None)
        # the lm_head in a graphed step: on CUDA (gemv None) the faster of the Triton GEMV and cuBLAS for its
        # shape, as for the projections; else the module
        self.head_call = self._head_call() if on_cuda and gemv is None else self.head
        self.length = 0        # positions filled in the cache
        self.pools: dict = {}  # one CUDA graph memory pool per device

    def _allocate(self, rotary_emb, config) -> None:
        """The static cache and every tensor a graphed step reads or writes: fixed addresses."""
        import torch

        # exactly the positions the plan counts (budget.kv_cache_bytes); the last bucket ends there
        capacity = self.max_len
        # each layer's K and V on its layer's device, in the compute dtype or quantized
        self.cache = [static_layer(self.kv_heads, capacity, self.head_dim, self.dtype, _device_of(l), self.kv_bits,
                                   kernels=self.split_kv) for l in self.layers]
        rotary = _device_of(rotary_emb)
        probe = torch.empty(0, dtype=self.dtype, device=rotary)
        cos, sin = rotary_emb(probe, torch.arange(capacity, device=rotary)[None])
        # per device: RoPE tables [max_len, head_dim], positions, and the step's position (filled from the
        # host where it jumps; the head's device's moved on by each step's pick)
        self.tables = {device: _Tables(cos[0].to(device), sin[0].to(device), torch.arange(capacity, device=device),
                                       torch.zeros(1, dtype=torch.long, device=device)) for device in self.devices}
        # the inputs and output of a graphed step: fixed addresses, refilled per token
        self.token = torch.zeros(1, dtype=torch.long, device=self.device)
        # the id a step picks greedily (pick.py): the next step's token in place where the head is on its device
        head_device = _device_of(self.head)
        self.picked = self.token if head_device == self.device else torch.zeros(1, dtype=torch.long, device=head_device)
        self.last_pick = None                     # `picked` after a step; None after a prefill
        # each step's id also in host memory at its position (pinned on CUDA: the device writes it there)
        self.picked_ids = torch.zeros(self.max_len, dtype=torch.long, pin_memory=head_device.type == "cuda")
        self._positions_at: dict = {}             # device -> its step position once the queued work has run
        self.logits = torch.zeros(config.vocab_size, dtype=torch.float32, device=_device_of(self.head))
        for segment, following in zip(self.segments, self.segments[1:]):
            segment.output = torch.zeros(1, config.hidden_size, dtype=self.dtype, device=segment.device)
            following.input = torch.zeros(1, config.hidden_size, dtype=self.dtype, device=following.device)
        self.segments[-1].output = self.logits

    def _fused_dense(self, wanted: bool):
        """BF16 (plain Linear) q/k/v and gate/up: one weight each, the modules' weights views into
        it (no extra memory): one GEMV instead of three (two), and small GEMVs run below bandwidth.
        Plain weights only: torchao's FP8 keeps nn.Linear but its weight is a tensor subclass.
        (None, None) where it does not apply."""
        import torch

        if not wanted or not all(_plain_linear(m) for layer in self.layers for m in _projections(layer)):
            return None, None
        with torch.no_grad():
            qkv = [_fuse_rows([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]) for l in self.layers]
            gate_up = [_fuse_rows([l.mlp.gate_proj, l.mlp.up_proj]) for l in self.layers]
        return qkv, gate_up

    def _gemv_calls(self, wanted: bool, sweep: bool) -> "list[dict] | None":
        """Per layer, the decode step's four projections as gemv.Projections over the fused q/k/v and
        gate/up weights and o's and down's own, where all are plain Linears the kernel reads (BF16 or
        FP16, q/k/v and gate/up fused); else None. `sweep`: each group's configuration (or cuBLAS)
        timed on its layers' weights; else the kernel's default configuration throughout."""
        import torch

        if not wanted or self.qkv is None:
            return None
        from runner_cuda.fast import gemv

        layers = [{"qkv": self.qkv[index], "o": (layer.self_attn.o_proj.weight, layer.self_attn.o_proj.bias),
                   "gate_up": self.gate_up[index], "down": (layer.mlp.down_proj.weight, layer.mlp.down_proj.bias)}
                  for index, layer in enumerate(self.layers)]
        if not all(gemv.takes(weight, self.dtype) for layer in layers for weight, _ in layer.values()):
            return None
        with torch.no_grad():
            return gemv.projections(layers, sweep=sweep, stream_of=_capture_stream)

    def _head_call(self):
        """The lm_head as a gemv.Projection (its shape's fastest of the Triton GEMV and cuBLAS) where
        it is a plain BF16/FP16 Linear; else the module."""
        import torch

        from runner_cuda.fast import gemv

        weight = self.head.weight
        if not _plain_linear(self.head) or not gemv.takes(weight, self.dtype):
            return self.head
        with torch.no_grad():
            return gemv.projections([{"head": (weight, self.head.bias)}], sweep=True, stream_of=_capture_stream)[0]["head"]

    @property
    def gemv_choice(self) -> "dict[str, str]":
        """Group -> what runs it in layer 0's decode step: "cublas" or the Triton GEMV's configuration;
        "head" too where the lm_head runs through the sweep's choice."""
        from runner_cuda.fast.gemv import Projection, name_of

        choice = {group: name_of(call.config) for group, call in self.gemv[0].items()} if self.gemv else {}
        if isinstance(self.head_call, Projection):
            choice["head"] = name_of(self.head_call.config)
        return choice

    # ---- public -------------------------------------------------------------------------------

    @property
    def keys(self) -> "list[torch.Tensor]":
        """The tensors holding K, every layer's (one each, or codes, scales and biases)."""
        return [tensor for layer in self.cache for tensor in layer.tensors[:len(layer.tensors) // 2]]

    @property
    def values(self) -> "list[torch.Tensor]":
        return [tensor for layer in self.cache for tensor in layer.tensors[len(layer.tensors) // 2:]]

    def prefill(self, token_ids: Sequence[int]) -> "torch.Tensor":
        """Append a prompt's tokens after the cached positions (from position 0 after `reset`),
        `prefill_chunk` tokens at a time; float32 logits of the next token."""
        import torch

        count, first = len(token_ids), self.length
        if count == 0 or first + count >= self.max_len:
            raise ValueError(f"prompt of {count} tokens after {first} does not fit a cache of {self.max_len}")
        with torch.no_grad():
            ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
            for start in range(0, count, self.prefill_chunk):
                hidden = self._prefill_forward(ids[start:start + self.prefill_chunk], first + start)
            last = hidden[-1:].to(self.logits.device)
            with _on(self.logits.device):
                self.logits.copy_(self.head(self.norm(last))[0].float())
        self.length = first + count
        self.last_pick = None
        return self.logits

    def step(self, token: "int | torch.Tensor") -> "torch.Tensor":
        """Append one token at the next position; float32 logits of the token after it. The
        returned tensor is reused by the next call: read or copy it first."""
        import torch

        if self.length >= self.max_len:
            raise ValueError(f"the cache of {self.max_len} positions is full")
        with torch.no_grad():
            span = self._bucket(self.length + 1)
            token = torch.as_tensor(token, device=self.device).reshape(1)
            self._feed(token)
            if self.use_graphs and any(span not in segment.graphs for segment in self.segments):
                # a capture runs its segment on the inputs there first (writing K/V at this position, as
                # the replay then does again), and its picks move them on: fed again after
                token = token.clone()
                self._positions_at.clear()
                for segment in self.segments:
                    self._graph(segment, span)
                self._feed(token)
            graphs = [segment.graphs[span] for segment in self.segments] if self.use_graphs else None
            for index, segment in enumerate(self.segments):
                if segment.input is not None:       # the hidden state from the segment before (another device)
                    segment.input.copy_(self.segments[index - 1].output)
                with _on(segment.device):
                    if graphs is not None:
                        graphs[index].replay()
                    else:
                        self._run_segment(span, segment)
        self._positions_at[self.segments[-1].device] = self.length + 1     # the pick moved it on
        self.length += 1
        self.last_pick = self.picked
        return self.logits

    def _feed(self, token: "torch.Tensor") -> None:
        """The step's inputs: the token (unless it is the id the last step picked in place) and each
        device's position, where it does not hold the cache's length already."""
        if token.data_ptr() != self.token.data_ptr():
            self.token.copy_(token)
        for device, tables in self.tables.items():
            if self._positions_at.get(device) != self.length:
                tables.position.fill_(self.length)
                self._positions_at[device] = self.length

    def warm_up(self) -> None:
        """Compile the fused ops and capture the first graph now rather than in the first reply."""
        self.reset()
        self.prefill([0])
        self.step(0)
        self.reset()

    def reset(self) -> None:
        """Forget the cached positions (the next call must be `prefill`)."""
        self.length = 0
        self.last_pick = None

    def trim(self, length: int) -> None:
        """Keep the first `length` cached positions: the next token goes at `length`, and the
        attention masks hide whatever is left beyond it until it is overwritten."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot keep {length} positions of {self.length}")
        self.length = length
        self.last_pick = None

    # ---- the forward ------------------------------------------------------------------------

    def _nf4_calls(self) -> "list[dict] | None":
        """{"qkv", "o", "gate_up", "down"} -> a call x -> outputs, per layer (nf4_cuda.NF4Gemv);
        None if some projection is not an NF4 weight that kernel reads."""
        if self.nf4_kernel == "cuda":
            fused = self._nf4_fused_calls()
            if fused is not None:
                self.nf4_fused = True
                return fused
            self.nf4_kernel = "cuda-simt"
        groups = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
                  "down": ("down_proj",)}
        calls = []
        for layer in self.layers:
            with _on(_device_of(layer)):       # each kernel is compiled and loaded for its layer's GPU
                layer_calls = self._nf4_simt_layer(layer, groups)
            if layer_calls is None:
                return None
            calls.append(layer_calls)
        return calls

    def _nf4_simt_layer(self, layer, groups: dict) -> "dict | None":
        from runner_cuda.fast import nf4_cuda

        modules = {name: getattr(layer.self_attn, name, None) or getattr(layer.mlp, name) for name in
                   ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
        layer_calls = {}
        for group, names in groups.items():
            weights = [nf4_weight_of(modules[name]) for name in names]
            if any(w is None for w in weights):
                return None
            call = nf4_cuda.NF4Gemv.for_weights(weights, rounding=NF4_KERNELS[self.nf4_kernel], x_dtype=self.dtype)
            if call is None:
                return None
            layer_calls[group] = call
        return layer_calls

    def _nf4_fused_calls(self) -> "list[dict] | None":
        """Per layer, NF4Mma calls: "qkv" (RMSNorm inside), "o" and "down" (adding into the residual
        stream), "gate_up" (RMSNorm inside, SiLU(gate) x up out); None where it does not take them all."""
        calls = []
        for layer in self.layers:
            weights = {name: nf4_weight_of(module) for name, module in zip(
                ("q", "k", "v", "o", "gate", "up", "down"), _projections(layer))}
            if any(w is None for w in weights.values()):
                return None
            with _on(_device_of(layer)):       # each kernel is compiled and loaded for its layer's GPU
                layer_calls = self._nf4_fused_layer(layer, weights)
            if any(call is None for call in layer_calls.values()):
                return None
            calls.append(layer_calls)
        return calls

    def _nf4_fused_layer(self, layer, weights: dict) -> dict:
        from runner_cuda.fast.nf4_cuda import NF4Mma, rope_fits

        qkv = [weights["q"], weights["k"], weights["v"]]
        rope = self.head_dim if self.rope == "qkv" and rope_fits(qkv, self.head_dim) else 0
        return {
            "qkv": NF4Mma.for_weights(qkv, norm=layer.input_layernorm.weight,
                                      eps=_norm_eps(layer.input_layernorm), x_dtype=self.dtype, rope=rope),
            "o": NF4Mma.for_weights([weights["o"]], residual=True, x_dtype=self.dtype),
            "gate_up": NF4Mma.for_weights([weights["gate"], weights["up"]], glu=True,
                                          norm=layer.post_attention_layernorm.weight,
                                          eps=_norm_eps(layer.post_attention_layernorm), x_dtype=self.dtype),
            "down": NF4Mma.for_weights([weights["down"]], residual=True, x_dtype=self.dtype),
        }

    def _project(self, index: int, group: str, module, x):
        """o_proj or down_proj of layer `index`: runner's NF4 kernel or BF16 GEMV where it runs, else
        the module."""
        if self.nf4 is not None:
            return self.nf4[index][group](x)
        return self.gemv[index][group](x) if self.gemv is not None else module(x)

    def _dense(self, index: int, group: str, x):
        """The fused q/k/v or gate/up of layer `index`: the chosen GEMV, else cuBLAS."""
        import torch

        if self.gemv is not None:
            return self.gemv[index][group](x)
        return torch.nn.functional.linear(x, *getattr(self, group)[index])

    def _decode_forward(self, span: int, segment: "_Segment | None" = None) -> "torch.Tensor":
        """One token at the step's position through `segment` (default: the first; the whole model
        when it is on one device), attending over the first `span` cache positions: its hidden state
        [1, hidden] for the next segment, or the head's output [1, vocab] from the last. The residual add and
        the next RMSNorm are one fused step, as are RoPE on q and k, and the MLP's SiLU × up (fused
        by torch.compile on CUDA: ~15 kernels a layer instead of ~45); with the split-KV kernels over a
        plain bf16 cache, RoPE and the cache write are one Triton launch."""
        import torch

        segment = segment or self.segments[0]
        ops = self.ops
        tables = self.tables[segment.device]
        if self.rope == "apart":            # ("write" reads the tables' row at the position itself)
            cos = tables.cos.index_select(0, tables.position)             # [1, head_dim]
            sin = tables.sin.index_select(0, tables.position)
        visible = None if self.split_kv else (tables.positions[:span] <= tables.position).view(1, 1, 1, span)
        rep = self.heads // self.kv_heads
        # [1, hidden]; the static input of a later segment is updated in place by the fused NF4 kernels
        hidden = self.embed(self.token) if segment.input is None else segment.input
        fused = self.nf4_fused        # runner's NF4 kernels do the norms, residual adds and SiLU x up
        layers = segment.layers
        x = None if fused or not layers else ops.rms_norm(hidden, self.layers[layers[0]].input_layernorm.weight, self.eps)
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for index in layers:
            layer, cache = self.layers[index], self.cache[index]
            attn, mlp = layer.self_attn, layer.mlp
            if fused and self.rope == "qkv":     # q comes back rotated, k and v are in the cache
                rope = (tables.cos, tables.sin, tables.position, cache.keys, cache.values)
                q = self.nf4[index]["qkv"](hidden, rope=rope)[..., :q_size]
            elif fused:
                q, k, v = self.nf4[index]["qkv"](hidden).split([q_size, kv_size, kv_size], dim=-1)
            elif self.qkv is not None:
                q, k, v = self._dense(index, "qkv", x).split([q_size, kv_size, kv_size], dim=-1)
            elif self.nf4 is not None:
                q, k, v = self.nf4[index]["qkv"](x).split([q_size, kv_size, kv_size], dim=-1)
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            if self.rope == "write":
                from runner_cuda.fast.kv_kernels import rope_and_write

                q = rope_and_write(q, k, v, tables.cos, tables.sin, cache.keys, cache.values, tables.position)
            elif self.rope == "apart":
                q, k = ops.rope(q.view(self.heads, self.head_dim), k.view(self.kv_heads, self.head_dim), cos, sin)
                cache.write_at(tables.position, k[:, None], v.view(self.kv_heads, 1, self.head_dim))
            # grouped-query attention as `rep` queries per KV head: no K/V repeat
            if self.split_kv:           # reads a quantized cache as stored (no dequantized copy)
                out = cache.attend(q.reshape(self.kv_heads, rep, self.head_dim), tables.position, span,
                                   self.scaling).view(1, self.heads * self.head_dim)
            else:
                keys, values = cache.read(span)
                out = torch.nn.functional.scaled_dot_product_attention(
                    q.view(1, self.kv_heads, rep, self.head_dim), keys[None], values[None],
                    attn_mask=visible, scale=self.scaling,
                ).reshape(1, self.heads * self.head_dim)
            if fused:                 # hidden += o(out); hidden += down(SiLU(gate) x up of RMSNorm(hidden))
                self.nf4[index]["o"](out, out=hidden)
                self.nf4[index]["down"](self.nf4[index]["gate_up"](hidden), out=hidden)
                continue
            hidden, x = ops.add_rms_norm(hidden, self._project(index, "o", attn.o_proj, out),
                                         layer.post_attention_layernorm.weight, self.eps)
            if self.gate_up is not None:
                gate, up = self._dense(index, "gate_up", x).chunk(2, dim=-1)
            elif self.nf4 is not None:
                gate, up = self.nf4[index]["gate_up"](x).chunk(2, dim=-1)
            else:
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            down = self._project(index, "down", mlp.down_proj, ops.silu_mul(gate, up))
            # the next RMSNorm with the add where its weight is here; at the segment's end the next
            # segment (on its own device) starts with it
            after = (self.layers[index + 1].input_layernorm if index + 1 in layers
                     else self.norm if segment.head else None)
            if after is None:
                hidden, x = hidden + down, None
            else:
                hidden, x = ops.add_rms_norm(hidden, down, after.weight, self.eps)
        if not segment.head:
            return hidden
        if x is None:
            x = ops.rms_norm(hidden, self.norm.weight, self.eps)
        return self.head_call(x)[0]

    def _prefill_forward(self, ids: "torch.Tensor", start: int = 0) -> "torch.Tensor":
        """Prompt tokens at positions start, start + 1, ... in one pass (bitsandbytes' or torch's own
        linears), writing their K/V into the cache; causal attention over the cache up to them. The
        hidden state moves to each layer's device where the layers change device."""
        count = ids.numel()
        end = start + count
        hidden = self.embed(ids)                                              # [T, hidden]
        for layer, cache in zip(self.layers, self.cache):
            hidden = hidden.to(cache.device)
            tables = self.tables[cache.device]
            cos, sin = tables.cos[start:end, None], tables.sin[start:end, None]      # [T, 1, head_dim]
            attn = layer.self_attn
            with _on(cache.device):     # runner's and bitsandbytes' kernels launch on the current device
                x = layer.input_layernorm(hidden)
                q = attn.q_proj(x).view(count, self.heads, self.head_dim)
                k = attn.k_proj(x).view(count, self.kv_heads, self.head_dim)
                v = attn.v_proj(x).view(count, self.kv_heads, self.head_dim)
                q, k = _rope(q, cos, sin), _rope(k, cos, sin)
                cache.write(start, k.transpose(0, 1), v.transpose(0, 1))
                keys, values = cache.read(end)
                out = self._prefill_attention(q, keys, values, start, end)
                hidden = hidden + attn.o_proj(out.transpose(0, 1).reshape(count, self.heads * self.head_dim))
                mlp = layer.mlp
                x = layer.post_attention_layernorm(hidden)
                hidden = hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        return hidden

    def _prefill_attention(self, q, keys, values, start: int, end: int) -> "torch.Tensor":
        """Causal attention of a chunk's queries q [T, heads, head_dim] at positions start..end-1
        over the cache's first `end` positions; [heads, T, head_dim]. The first chunk repeats its
        few K/V per query head (plain causal). A later one sees every earlier position (the causal
        mask aligned to the lower right, never materialized on the GPU) and reads the cache as it
        is: one attention per query head of each KV group, so a long context needs no
        [heads, end, head_dim] copy of K and V (8 GB a layer for the 405B at 122k tokens)."""
        import torch

        count = q.shape[0]
        rep = self.heads // self.kv_heads
        if start == 0:
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                keys[:, :end].repeat_interleave(rep, dim=0)[None],
                values[:, :end].repeat_interleave(rep, dim=0)[None],
                is_causal=True,
                scale=self.scaling,
            )[0]
        from torch.nn.attention.bias import causal_lower_right

        # query head g * rep + r reads KV head g
        grouped = q.view(count, self.kv_heads, rep, self.head_dim)
        out = torch.empty(self.kv_heads, rep, count, self.head_dim, dtype=q.dtype, device=q.device)
        mask = causal_lower_right(count, end)
        for r in range(rep):
            out[:, r] = torch.nn.functional.scaled_dot_product_attention(
                grouped[:, :, r].transpose(0, 1)[None], keys[None, :, :end], values[None, :, :end],
                attn_mask=mask, scale=self.scaling,
            )[0]
        return out.view(self.heads, count, self.head_dim)

    # ---- graphs -------------------------------------------------------------------------------

    def _bucket(self, needed: int) -> int:
        span = FIRST_BUCKET
        while span < needed:
            span *= 2
        return min(span, self.max_len)

    def _run_segment(self, span: int, segment: "_Segment") -> None:
        """`segment`'s part of a decode step into its output; the last segment's ends with the greedy
        pick (pick.py): the float32 logits, the id into `picked`, its device's position + 1."""
        import torch

        out = self._decode_forward(span, segment)
        if not segment.head:
            segment.output.copy_(out)
            return
        position = self.tables[segment.device].position
        if out.is_cuda:
            from runner_cuda.fast.pick import greedy_into

            greedy_into(out, self.logits, self.picked, position, self.picked_ids)
        else:                   # the same with torch's operations
            self.logits.copy_(out)
            self.picked.copy_(torch.argmax(self.logits).reshape(1))
            self.picked_ids.index_copy_(0, position, self.picked)
            position.add_(1)

    def _graph(self, segment: "_Segment", span: int):
        """The CUDA graph of `segment`'s part of a decode step over `span` positions, captured on
        first use on its device. The warm-up runs write the current token's K/V at the current
        position, as the replay will."""
        import torch

        graph = segment.graphs.get(span)
        if graph is not None:
            return graph
        device = segment.device
        with torch.cuda.device(device):
            if device not in self.pools:
                self.pools[device] = torch.cuda.graph_pool_handle()
            side = _capture_stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):      # compiles Triton kernels, warms cuBLAS outside the capture
                    self._run_segment(span, segment)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pools[device], stream=side):
                self._run_segment(span, segment)
        segment.graphs[span] = graph
        return graph


class _Tables:
    """One device's RoPE tables, positions and the step's position (a filled-in static input)."""

    def __init__(self, cos, sin, positions, position):
        self.cos, self.sin, self.positions, self.position = cos, sin, positions, position


class _Segment:
    """A run of decoder layers on one device, with the embedding before them (`input` None: the step
    starts here from the token) or a static input filled from the segment before, and the final norm
    and lm_head after them (`head`). `output`: its static hidden state for the next segment, or the
    decoder's logits. `graphs`: span -> its CUDA graph."""

    def __init__(self, device, layers: list[int], head: bool):
        self.device, self.layers, self.head = device, layers, head
        self.input = None
        self.output = None
        self.graphs: dict[int, object] = {}


def _segments(embed_device, layer_devices: list, head_device, split_at: Sequence[int] = ()) -> list[_Segment]:
    """The decode step's segments: a new one wherever the device changes along embedding, layers,
    head, and before each layer index in `split_at`."""
    stages = [("embed", embed_device)] + [(index, device) for index, device in enumerate(layer_devices)]
    stages.append(("head", head_device))
    segments: list[_Segment] = []
    for stage, device in stages:
        if not segments or segments[-1].device != device or stage in split_at:
            segments.append(_Segment(device, [], False))
        if stage == "head":
            segments[-1].head = True
        elif stage != "embed":
            segments[-1].layers.append(stage)
    return segments


def _device_of(module):
    """The device of a module's first parameter or buffer."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    raise Unsupported(f"{type(module).__name__} holds no tensor to place it by")


def _on(device):
    """The device's CUDA context for what launches on the current device (NVRTC kernels, graph
    replay); nothing on the CPU."""
    import torch

    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


_CAPTURE_STREAMS: dict = {}


def _capture_stream(device):
    """The one side stream per GPU on which every decoder warms up and captures its graphs. cuBLAS
    keeps a 32 MiB workspace for each stream it ran on, for the life of the process: a new stream
    per graph left 32 MiB behind each time (a session closed, the next loaded)."""
    import torch

    key = str(device)
    if key not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[key] = torch.cuda.Stream(device=device)
    return _CAPTURE_STREAMS[key]


def _rope(x, cos, sin):
    """Rotary embedding as transformers' Llama applies it (rotate_half convention)."""
    import torch

    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _plain_linear(module) -> bool:
    """An nn.Linear holding a plain tensor (torchao's FP8 keeps nn.Linear with a tensor subclass)."""
    import torch

    return type(module) is torch.nn.Linear and type(module.weight.data) is torch.Tensor


def _projections(layer):
    attn, mlp = layer.self_attn, layer.mlp
    return (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)


def _fuse_rows(linears):
    """One [sum of outputs, in] weight (and bias) holding `linears`' weights; each module's
    weight becomes a view into it, so the old tensors are freed and memory stays the same."""
    import torch

    weight = torch.cat([m.weight.data for m in linears])
    bias = torch.cat([m.bias.data for m in linears]) if linears[0].bias is not None else None
    start = 0
    for module in linears:
        rows = module.weight.shape[0]
        module.weight.data = weight[start:start + rows]
        if bias is not None:
            module.bias.data = bias[start:start + rows]
        start += rows
    return weight, bias


def _norm_eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _rms_norm(x, weight, eps: float):
    """transformers' LlamaRMSNorm: float32 statistics, cast back, then the weight."""
    import torch

    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def _add_rms_norm(hidden, delta, weight, eps: float):
    hidden = hidden + delta
    return hidden, _rms_norm(hidden, weight, eps)


def _rope_qk(q, k, cos, sin):
    return _rope(q, cos, sin), _rope(k, cos, sin)


def _silu_mul(gate, up):
    import torch

    return torch.nn.functional.silu(gate) * up


class FusedOps:
    """The elementwise pieces of a decode step. `compiled`: each is fused into one kernel by
    torch.compile (compiled once, on first use, for the shapes of a decode step), keeping
    eager's bf16 rounding points (emulate_precision_casts); else plain torch."""

    def __init__(self, compiled: bool):
        self.compiled = compiled
        if compiled:
            import torch

            def compile(fn):
                return torch.compile(fn, dynamic=False, fullgraph=True, options={"emulate_precision_casts": True})
        else:
            def compile(fn):
                return fn
        self.rms_norm = compile(_rms_norm)
        self.add_rms_norm = compile(_add_rms_norm)
        self.rope = compile(_rope_qk)
        self.silu_mul = compile(_silu_mul)
