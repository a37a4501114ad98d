"""Cost model: I/O, compute, time and peak memory of one policy on one machine.

Once the block (gpu_batch_size x num_gpu_batches), the flags and the lengths are fixed,
everything the model predicts is *linear* in the nine placement fractions

    wg wc wd   weights on gpu / cpu / disk (share of every layer's bytes)
    cg cc cd   KV cache rows (sequences) of every gpu batch
    hg hc hd   hidden-state rows (activations between layers)

except a few all-or-nothing buffers (`Switched`: e.g. the two working slots of a layer
exist as soon as wg < 1), which the program models with one binary each.
`BlockModel` builds these expressions once; `estimate()` evaluates them at a concrete
policy and the program in `solver.py` optimises over them, so the two never disagree.

The schedule modelled is the engine's zig-zag block schedule. Layers are streamed as
[input embedding, (attention, mlp) x L, output embedding]. While layer j computes for
all its gpu batches, three things run side by side:

    load   (one worker): disk->cpu then cpu->gpu of layer j+1's weights and of the
           cache / hidden rows of the next (layer, batch)
    store  (one worker): gpu->cpu then cpu->disk of the new cache and hidden rows
    compute: matmuls + attention on the compute device, plus host attention for
           the non-gpu cache rows with cpu_cache_compute (the two run one after the other)

so the time of layer j is max(load, store, compute), or their sum with overlap off. A
load is one disk->cpu read followed by its cpu->gpu copy, so the two links of one load
add up; likewise for a store. Prefill runs once; decode runs gen_len - 1 steps over an
average key length of prompt_len + gen_len / 2.

Memory is the peak of each tier during prefill and during decode: resident tensors
(weights, cache, hidden states, split by the fractions) plus the engine's working
buffers, as the engine allocates them (see `EngineConstants`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Mapping, Optional

from flexgen.kvcache import packed_workspace_numel
from flexgen.models.base import ModelArgs
from flexgen.models.registry import cost_figures, layer_specs
from flexgen.optimizer.budgets import TIER_NAMES, check_budgets
from flexgen.optimizer.hardware import GIB, HardwareProfile  # noqa: F401 (GIB re-exported)
from flexgen.placement import split_rows
from flexgen.policy import Policy

VARS = ("wg", "wc", "wd", "cg", "cc", "cd", "hg", "hc", "hd")
LINKS = ("disk->cpu", "cpu->gpu", "gpu->cpu", "cpu->disk")
PHASES = ("prefill", "decode")


class Lin:
    """An affine expression const + sum(coef[v] * v) over the placement fractions."""

    __slots__ = ("const", "coef")

    def __init__(self, const: float = 0.0, coef: Mapping[str, float] | None = None):
        self.const = float(const)
        self.coef = dict(coef) if coef else {}

    @classmethod
    def var(cls, name: str) -> "Lin":
        assert name in VARS, name
        return cls(0.0, {name: 1.0})

    @staticmethod
    def _lift(x) -> "Lin":
        return x if isinstance(x, Lin) else Lin(x)

    def __add__(self, other):
        other = Lin._lift(other)
        coef = dict(self.coef)
        for k, v in other.coef.items():
            coef[k] = coef.get(k, 0.0) + v
        return Lin(self.const + other.const, coef)

    __radd__ = __add__

    def __neg__(self):
        return Lin(-self.const, {k: -v for k, v in self.coef.items()})

    def __sub__(self, other):
        return self + (-Lin._lift(other))

    def __rsub__(self, other):
        return Lin._lift(other) + (-self)

    def __mul__(self, k):
        if isinstance(k, Lin):
            raise TypeError("Lin * Lin is not linear")
        k = float(k)
        return Lin(self.const * k, {v: c * k for v, c in self.coef.items()})

    __rmul__ = __mul__

    def __truediv__(self, k):
        return self * (1.0 / float(k))

    def value(self, x: Mapping[str, float]) -> float:
        return self.const + sum(c * x[v] for v, c in self.coef.items())

    def to_pulp(self, variables: Mapping):
        import pulp
        return pulp.lpSum(c * variables[v] for v, c in self.coef.items() if c) + self.const

    def __repr__(self):
        terms = " + ".join(f"{c:.4g}*{v}" for v, c in self.coef.items() if c)
        return f"Lin({self.const:.4g}{' + ' + terms if terms else ''})"


class Switched:
    """`amount` bytes that exist only while `trigger` (>= 0 on the unit cube) is positive.

    The engine allocates some buffers all-or-nothing: working copies of a layer exist
    as soon as any of it is off the gpu tier, a staging buffer as soon as any of it is
    on disk. In the linear program each trigger gets a binary (see `solver.build_lp`).
    """

    __slots__ = ("key", "amount", "trigger")

    def __init__(self, key: str, amount, trigger: Lin):
        self.key = key                       # triggers with the same key share one binary
        self.amount = Lin._lift(amount)
        self.trigger = trigger

    def on(self, x: Mapping[str, float]) -> bool:
        return self.trigger.value(x) > 1e-9

    def value(self, x: Mapping[str, float]) -> float:
        return self.amount.value(x) if self.on(x) else 0.0


@dataclass(frozen=True)
class EngineConstants:
    """How the engine allocates; change these when the engine changes.

    attn_score_bytes: peak bytes per attention-score element (gbs, heads, s, t) on the
    compute device. 0: `models/opt._attend` calls fused scaled_dot_product_attention,
    which never materialises the scores (memory-efficient kernel on CUDA, flash on CPU).
    A materialised fp32 softmax would cost 4 to 10.
    mask_bytes: bytes per (gbs, s, t) element of the attention mask while attending: the
    mask, its clone with the diagonal set, and the additive bias the kernel makes of it.
    Under grouped-query attention the mask is repeated for each query head of a K/V head
    (models/base.attend), so it counts `CostFigures.query_groups` times.
    """

    weight_slots: int = 2          # working copies of a layer on the compute device: current + next
    max_cache_in_flight: int = 4   # (layer, batch) cache working sets: storing (up to two), computing, prefetching
    attn_score_bytes: float = 0.0
    mask_bytes: float = 5.0
    quant_group: int = 64          # 4-bit groups with an fp16 (scale, min) pair each
    quant_bits: int = 4
    # Page-locked host memory is counted once more by this share: it cannot be swapped or
    # reclaimed, and each buffer is page-locked whole pages at a time (CUDA only).
    pinned_headroom: float = 0.05
    # The largest layer's temporaries (`CostFigures`) are counted once more by this share:
    # the widths are exact for the layer functions, but the allocator rounds blocks up and
    # a kernel may keep a small workspace beside its output.
    working_headroom: float = 0.05


DEFAULT_ENGINE = EngineConstants()


def quantized_bytes(numel: int, engine: EngineConstants = DEFAULT_ENGINE) -> float:
    """Bytes of `numel` values in 4-bit groups with an fp16 (scale, min) per group."""
    groups = math.ceil(numel / engine.quant_group)
    return numel * engine.quant_bits / 8 + groups * 4


def fractions_of(policy: Policy) -> dict[str, float]:
    """The placement fractions the engine achieves for `policy` (whole rows for cache and
    hidden states, split by placement.split_rows as the engine does; weights split at
    64-byte granularity, i.e. as given)."""
    b = policy.gpu_batch_size
    c = split_rows(b, policy.cache_gpu_percent, policy.cache_cpu_percent)
    h = split_rows(b, policy.act_gpu_percent, policy.act_cpu_percent)
    wg, wc = policy.w_gpu_percent / 100, policy.w_cpu_percent / 100
    return dict(wg=wg, wc=wc, wd=max(0.0, 1 - wg - wc), cg=c.gpu / b, cc=c.cpu / b, cd=c.disk / b,
                hg=h.gpu / b, hc=h.cpu / b, hd=h.disk / b)


def original_weight_split(args: ModelArgs, w_gpu_percent: float, w_cpu_percent: float) -> tuple[float, float]:
    """The weight split (gpu %, cpu %) the *original* FlexGen achieved for a policy.

    The original placed whole tensors: in each layer, a tensor went to disk, cpu or gpu
    (in that order of the cumulative percents) by the position of its midpoint in the
    layer's bytes. So `--percent 20 80 ...` on OPT-30B put only the attention out_proj
    on the GPU: 8.2 % of the bytes, not 20 %. This engine honours percents exactly, so a
    policy from the paper is replayed here to compare like with like.
    """
    bounds = (100 - w_gpu_percent - w_cpu_percent, 100 - w_gpu_percent)  # disk | cpu | gpu
    on = {"gpu": 0, "cpu": 0, "disk": 0}
    for spec in layer_specs(args):
        sizes = [e.numel for e in spec.entries]
        total = sum(sizes)
        cum = 0
        for size in sizes:
            cum += size
            mid = (cum - size / 2) / total * 100
            tier = "disk" if mid < bounds[0] else "cpu" if mid < bounds[1] else "gpu"
            on[tier] += size
    total = sum(on.values())
    return 100 * on["gpu"] / total, 100 * on["cpu"] / total


@dataclass(frozen=True)
class LayerCost:
    kind: str
    stored: int           # bytes at rest on every tier (the weight store's layout, 4-bit if compressed)
    slot: int             # bytes of a working slot for it (the layout, 4 KiB aligned)
    full: int             # bytes of its weights dequantized to the compute dtype
    matmul_params: int    # parameters multiplied per row (flops = 2 * rows * matmul_params)
    quantized_numel: int  # values dequantized per load when compress_weight


@functools.lru_cache(maxsize=64)
def layer_costs(args: ModelArgs, compress_weight: bool, dtype: str) -> tuple[LayerCost, ...]:
    """Every streamed layer's sizes, in execution order, from the engine's own layouts."""
    import torch

    from flexgen.layout import make_layout

    try:
        from flexgen.layout import compressible
    except ImportError:  # older engine: every 2-D tensor is compressed
        def compressible(e):
            return len(e.shape) >= 2

    tdtype = getattr(torch, dtype)
    esize = torch.empty((), dtype=tdtype).element_size()
    out = []
    for spec in layer_specs(args):
        lay = make_layout(spec, tdtype, compress_weight)
        mm = 0 if spec.kind == "input" else sum(e.numel for e in spec.entries if len(e.shape) >= 2)
        qn = sum(e.numel for e in spec.entries if compressible(e)) if compress_weight else 0
        out.append(LayerCost(spec.kind, lay.nbytes, lay.file_bytes, spec.numel * esize, mm, qn))
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _layer_table(args: ModelArgs, compress_weight: bool, dtype: str, span: Optional[tuple] = None):
    """Layer sizes, the largest layer, the values dequantized into persistent buffers, and
    the distinct layer steps ((this layer, next layer, how many such steps per pass)).
    span: (start, stop) of a pipeline stage's layers; None = all."""
    layers = layer_costs(args, compress_weight, dtype)
    if span is not None:
        layers = layers[span[0]:span[1]]
    n = len(layers)
    pairs = [(layers[i], layers[(i + 1) % n]) for i in range(n)]
    max_slot = max(l.slot for l in layers)
    # The engine dequantizes into one persistent buffer per (layer kind, tensor), for the
    # compressed tensors only (embeddings stay 16-bit): the largest layer of each kind.
    kinds: dict[str, int] = {}
    for lay in layers:
        kinds[lay.kind] = max(kinds.get(lay.kind, 0), lay.quantized_numel)
    dequant_numel = sum(kinds.values())
    groups: dict[tuple[str, str], list] = {}
    for layer, nxt in pairs:
        g = groups.setdefault((layer.kind, nxt.kind), [layer, nxt, 0])
        g[2] += 1
    steps = tuple((a, b, c) for a, b, c in groups.values())
    return layers, sum(l.stored for l in layers), max_slot, dequant_numel, steps


@dataclass
class Interval:
    """One layer's step (all its gpu batches) in one phase; `count` identical ones per pass."""
    name: str
    count: int
    io: dict[str, Lin]        # bytes per link
    load: Lin                 # seconds of the load worker
    store: Lin                # seconds of the store worker
    gpu: Lin                  # seconds of compute on the compute device
    host: Lin                 # seconds of host attention (cpu_cache_compute)

    @property
    def compute(self) -> Lin:
        return self.gpu + self.host


class BlockModel:
    """The cost and memory expressions for one block, flag set and workload."""

    def __init__(self, args: ModelArgs, prompt_len: int, gen_len: int, gpu_batch_size: int,
                 num_gpu_batches: int, hw: HardwareProfile, *, compress_weight: bool = False,
                 compress_cache: bool = False, cpu_cache_compute: bool = False, overlap: bool = True,
                 pin_weight: bool = True, engine: EngineConstants = DEFAULT_ENGINE,
                 span: Optional[tuple] = None):
        if prompt_len < 1 or gen_len < 1:
            raise ValueError("prompt_len and gen_len must be >= 1")
        self.args, self.hw, self.engine = args, hw, engine
        self.s, self.n = prompt_len, gen_len
        self.b, self.nb = gpu_batch_size, num_gpu_batches
        self.compress_weight, self.compress_cache = compress_weight, compress_cache
        self.cpu_cache_compute, self.overlap, self.pin_weight = cpu_cache_compute, overlap, pin_weight
        # Decode runs a decoder layer's matmuls once for all gpu batches (scheduler.Scheduler.run).
        self.merge_decode = num_gpu_batches > 1
        self.dt = hw.dtype_bytes
        self.fig = cost_figures(args)   # the family's widths: attention, K/V per token (GQA), temporaries
        (self.layers, self.weight_bytes, self.max_slot, self.dequant_numel,
         self._steps) = _layer_table(args, compress_weight, hw.compute_dtype, span)
        self.num_attention = sum(lay.kind == "attention" for lay in self.layers)   # KV-cache layers
        self.decode_steps = gen_len - 1
        self.intervals = {p: self._intervals(p) for p in PHASES}
        self.pinned: dict[str, dict] = {}    # phase -> the cpu components that are page-locked
        self.memory = {p: self._memory(p) for p in PHASES}

    # -- sizes -------------------------------------------------------------------------
    def cache_bytes_per_token(self) -> float:
        """Stored bytes of K and V of one token of one row in one layer."""
        kv = self.fig.kv_width
        if self.compress_cache:
            return 2 * quantized_bytes(kv, self.engine)
        return 2 * kv * self.dt

    @property
    def block_size(self) -> int:
        return self.b * self.nb

    # -- time --------------------------------------------------------------------------
    def _intervals(self, phase: str) -> list[Interval]:
        # Layer steps that cost the same are grouped: (kind of this layer, kind of the next).
        return [self._interval(phase, layer, nxt, count) for (layer, nxt, count) in self._steps]

    def _interval(self, phase: str, layer: LayerCost, nxt: LayerCost, count: int) -> Interval:
        hw, a = self.hw, self.args
        b, nb, dt, h = self.b, self.nb, self.dt, a.hidden_size
        qw, kv = self.fig.q_width, self.fig.kv_width   # attention FLOPs follow q, cache traffic K/V
        V = Lin.var
        prefill = phase == "prefill"
        s_cur = self.s if prefill else 1
        t_att = self.s if prefill else self.s + self.n / 2      # keys attended (decode: average)
        t_load = t_att - 1                                       # cached keys read per decode step
        io = {k: Lin() for k in LINKS}
        gpu, host = Lin(), Lin()

        # Weights of the next layer, once per block. On unified memory a disk read lands in
        # the compute slot itself (weights.py): only the host part is copied.
        io["cpu->gpu"] += (V("wc") + (0 if hw.unified_memory else V("wd"))) * nxt.stored
        io["disk->cpu"] += V("wd") * nxt.stored
        if self.compress_weight:
            gpu += layer.quantized_numel / hw.gpu_dequant_rate

        # Hidden states of every gpu batch: load this layer's input, store its output.
        hid = b * s_cur * h * dt
        if layer.kind != "input":
            io["cpu->gpu"] += nb * hid * (V("hc") + V("hd"))
            io["disk->cpu"] += nb * hid * V("hd")
        if layer.kind != "output":
            io["gpu->cpu"] += nb * hid * (V("hc") + V("hd"))
            io["cpu->disk"] += nb * hid * V("hd")

        # Matmuls: every gpu batch multiplies by the whole layer, reading it from device
        # memory; a decoder layer in decode multiplies all of them at once, after
        # concatenating their inputs (attention itself stays per gpu batch, below).
        rows = b if layer.kind == "output" else b * s_cur
        calls = nb
        if self.merge_decode and not prefill and layer.kind in ("attention", "mlp"):
            calls, rows = 1, nb * b
            gpu += 2 * nb * b * h * dt / hw.gpu_mem_bw
            # The next merged layer needs every batch's output, so hidden states off the gpu
            # tier go out and back between the two with no other batch's compute to hide
            # behind: one round trip per layer on the critical path (on unified memory the
            # copies are in the compute already, below).
            trip = 0 if hw.unified_memory else 1 / hw.gpu_to_cpu_bw + 1 / hw.cpu_to_gpu_bw
            gpu += nb * hid * ((V("hc") + V("hd")) * trip + V("hd") * (1 / hw.disk_write_bw + 1 / hw.disk_read_bw))
        if layer.matmul_params:
            gpu += calls * hw.matmul_time(rows, layer.matmul_params)
        gpu += calls * hw.layer_overhead

        if layer.kind == "attention":
            tok = self.cache_bytes_per_token()
            non_gpu = b * (V("cc") + V("cd"))
            disk_rows = b * V("cd")
            if prefill:
                # K, V of the prompt go to their homes; attention runs on the device.
                io["gpu->cpu"] += nb * non_gpu * self.s * tok
                io["cpu->disk"] += nb * disk_rows * self.s * tok
                gpu += nb * 4 * b * self.s * self.s * qw / hw.gpu_attn_flops_prefill
                if self.compress_cache:   # the prompt's K, V quantized for their homes
                    gpu += nb * 2 * b * self.s * kv / hw.cache_quant_rate
            else:
                io["cpu->disk"] += nb * disk_rows * tok           # the new token's K, V
                io["disk->cpu"] += nb * disk_rows * t_load * tok
                # A 4-bit cache attended on the host is dequantized and attended a tile at a
                # time (kvcache.PackedAttention), at its own measured rate when there is one.
                packed = hw.cpu_packed_attn_rate if self.compress_cache else 0
                if self.cpu_cache_compute:
                    # Non-gpu rows attend on the host: q, k, v of those rows go down and
                    # the attention output comes back; cache rows stay where they are.
                    io["gpu->cpu"] += nb * non_gpu * (qw + 2 * kv) * dt
                    io["cpu->gpu"] += nb * non_gpu * qw * dt
                    dev_rows = b * V("cg")
                    if packed:
                        host += nb * 2 * non_gpu * t_att * kv / packed
                    else:
                        host += nb * 4 * non_gpu * t_att * qw / hw.cpu_attn_flops
                        if self.compress_cache:
                            host += nb * 2 * non_gpu * t_att * kv / hw.cpu_dequant_rate
                else:
                    # (On unified memory disk rows are read into the working buffer directly.)
                    copied = b * V("cc") if hw.unified_memory else non_gpu
                    io["cpu->gpu"] += nb * copied * t_load * tok
                    io["gpu->cpu"] += nb * non_gpu * tok
                    dev_rows = Lin(b)
                if packed and hw.compute_device == "cpu":   # every row attends on the host
                    gpu += nb * 2 * dev_rows * t_att * kv / packed
                else:
                    gpu += nb * 4 * dev_rows * t_att * qw / hw.gpu_attn_flops_decode
                    if self.compress_cache:   # the cache dequantized
                        gpu += nb * 2 * dev_rows * t_att * kv / hw.gpu_dequant_rate
                if self.compress_cache:   # the new position quantized
                    gpu += nb * 2 * b * kv / hw.cache_quant_rate

        copy_in, copy_out = io["cpu->gpu"] / hw.cpu_to_gpu_bw, io["gpu->cpu"] / hw.gpu_to_cpu_bw
        if hw.unified_memory:
            # The "gpu" tier is host memory: copies between tiers draw on the same memory
            # bandwidth as the (memory-bound) compute, so they add to it instead of hiding
            # behind it. Measured on a 2-core host: treating them as overlapped ranked a
            # 67 %-cpu-weights policy first that ran at 0.55 of its prediction.
            gpu += copy_in + copy_out
            # Host attention runs on the same cores as the "gpu" compute: it adds to it too
            # (a bound that overlapped them put a 2-core decode at 52 % of it).
            gpu, host = gpu + host, Lin()
            load = io["disk->cpu"] / hw.disk_read_bw
            store = io["cpu->disk"] / hw.disk_write_bw
        else:
            load = io["disk->cpu"] / hw.disk_read_bw + copy_in
            store = copy_out + io["cpu->disk"] / hw.disk_write_bw
        name = f"{layer.kind}" if count == 1 or layer.kind != "mlp" else f"mlp->{nxt.kind}"
        return Interval(name, count, io, load, store, gpu, host)

    # -- memory ------------------------------------------------------------------------
    def _memory(self, phase: str) -> dict[str, dict[str, Lin | Switched]]:
        """Peak bytes per tier, by component, following the engine's allocations:

        weights   resident shares; two working slots of the largest layer on the device
                  as soon as any weight is off it (weights.PlacedWeights); on CUDA two
                  pinned staging slots in host memory as soon as any weight is on disk;
                  with compression, one dequantized copy of each layer kind's compressed
                  tensors (weights.PlacedWeights reuses them).
        kv cache  resident rows, allocated for prompt + generation (kvcache.KVCache);
                  decode working K/V of (t+1, rows, kv width) for each (layer, batch) in flight,
                  one per cache part not used in place: the non-gpu rows on the device
                  (compressed: every row attending on CUDA); with cpu_cache_compute the disk rows
                  on the host. Compressed rows that attend on the host (every row on a CPU
                  device) have none: their disk rows are read, still packed, into host
                  buffers (kvcache.HostBuffers), and each tier they attend from holds one
                  fp32 tile workspace (kvcache.PackedAttention).
        hidden    per gpu batch, the whole (gbs, s, h) output stays on the device while any
                  of its rows lives there (activations.HiddenSlot keeps a view); host and
                  disk rows go through one host buffer per gpu batch sized for the prompt;
                  while not resident, a loaded input, a prefetched one and one being
                  stored are in flight on the device (before a merged decode layer, every
                  batch's input and the next one).
        pinned    on CUDA, the host memory that is page-locked: host weights (pin_weight),
                  the weight and cache staging buffers, the hidden buffers and host
                  attention's staging (never the host KV cache); counted once more by
                  `pinned_headroom`.
        compute   the largest peak of one layer beyond its input, its output included: the
                  family's `CostFigures` (measured against the engine), for every row of
                  the block at once in a merged decode layer, with its concatenated input; the
                  input layer's two embeddings and their sum; the head's logits. Plus
                  `working_headroom`.
        """
        a, e = self.args, self.engine
        b, nb, dt, h = self.b, self.nb, self.dt, a.hidden_size
        kv, fig = self.fig.kv_width, self.fig
        L, nh, vocab = self.num_attention, a.num_attention_heads, a.vocab_size
        V = Lin.var
        prefill = phase == "prefill"
        s_cur = self.s if prefill else 1
        t_max = self.s + self.n
        tok = self.cache_bytes_per_token()
        row_cache = t_max * tok                      # one row, one layer, stored
        row_work = 2 * t_max * kv * dt               # one row, one layer, K+V working copy
        B = b * nb
        hid = b * s_cur * h * dt                     # hidden of one gpu batch
        cuda = self.hw.compute_device == "cuda"
        # With one gpu batch the scheduler starts the next attention layer's cache load
        # two steps ahead, so working sets storing, computing and loading coexist for any
        # number of gpu batches; and the store worker can still be writing the previous
        # set when the next store is queued: four were measured (tests/
        # test_families_optimizer.py, packed cache buffers), one more than this model assumed.
        in_flight = e.max_cache_in_flight

        gpu: dict[str, Lin | Switched] = {
            "weights": V("wg") * self.weight_bytes,
            "kv cache": V("cg") * (B * L * row_cache),
            # Sized for the prompt in decode too: each slot keeps its prefill output until
            # the first decode step replaces it.
            "hidden": Switched("hg>0", nb * b * self.s * h * dt, V("hg")),
            "hidden buffers": Switched("hg<1", (3 if prefill or not self.merge_decode else max(3, nb + 1)) * hid,
                                       1 - V("hg")),
            "weight slots": Switched("wg<1", e.weight_slots * self.max_slot, 1 - V("wg")),
        }
        cpu: dict[str, Lin | Switched] = {
            "weights": V("wc") * self.weight_bytes,
            "kv cache": V("cc") * (B * L * row_cache),
            "hidden": V("hc") * (nb * b * self.s * h * dt),
            "hidden staging": V("hd") * (nb * b * self.s * h * dt),
        }
        disk: dict[str, Lin | Switched] = {
            "weights": V("wd") * self.weight_bytes,
            "kv cache": V("cd") * (B * L * row_cache),
            # Hidden rows on disk: files sized for the prompt stay allocated.
            "hidden": V("hd") * (nb * b * self.s * h * dt),
        }
        if cuda:
            cpu["weight staging"] = Switched("wd>0", e.weight_slots * self.max_slot, V("wd"))
        if self.compress_weight:
            gpu["dequantized weights"] = Lin(self.dequant_numel * self.dt)
        if prefill:
            # The previous batch's K, V wait for their store; disk rows pass through host memory.
            if self.compress_cache:
                gpu["cache buffers"] = Lin(2 * b * self.s * kv * dt)
            else:
                gpu["cache buffers"] = Switched("cg<1", 2 * b * self.s * kv * dt, 1 - V("cg"))
            cpu["cache staging"] = V("cd") * (b * self.s * kv * dt)
            if cuda and not self.cpu_cache_compute:
                cpu["cache staging"] = cpu["cache staging"] + V("cd") * (b * row_cache)
            # Scores (if materialised), the mask while attending, and every batch's step mask.
            score = b * self.s * self.s * (nh * e.attn_score_bytes + e.mask_bytes * fig.query_groups + nb)
            attn = b * self.s * fig.attn_temp_width * dt + score
            mlp = b * self.s * fig.mlp_temp_width * dt
            inp = 3 * b * self.s * h * dt
        else:
            # One working buffer per cache part that is not used in place (kvcache.KVSlot.begin):
            # the parts away from where their rows attend, and every compressed part attended on CUDA.
            work = in_flight * b * row_work
            # Rows of a compressed cache that attend on the host (all of them on a CPU device,
            # the non-gpu ones with cpu_cache_compute on CUDA) have no working K/V: disk rows
            # are read, still packed, into a host buffer of their stored bytes
            # (kvcache.HostBuffers), others are used in place, and each tier they attend
            # from keeps one workspace of fp32 tiles (kvcache.PackedAttention).
            packed = in_flight * b * row_cache
            tiles = 4 * packed_workspace_numel(t_max, b, kv)
            if self.compress_cache and not cuda:
                if self.cpu_cache_compute:   # gpu-tier rows attend from the gpu tier
                    cpu["cache buffers"] = V("cd") * packed
                    gpu["attention tiles"] = Switched("cg>0", tiles, V("cg"))
                    cpu["attention tiles"] = Switched("cg<1", tiles, 1 - V("cg"))
                else:
                    gpu["cache buffers"] = V("cd") * packed
                    gpu["attention tiles"] = Lin(tiles)
            elif self.cpu_cache_compute:
                if self.compress_cache:   # gpu-tier rows are dequantized on the device
                    gpu["cache buffers"] = V("cg") * work
                cpu["cache buffers"] = V("cd") * (packed if self.compress_cache else work)
            else:
                # On CUDA a compressed part is dequantized into its working buffer on the
                # device (its packed copies there are not tracked).
                gpu["cache buffers"] = Lin(work) if self.compress_cache else (V("cc") + V("cd")) * work
            if cuda and self.cpu_cache_compute:
                # kvcache.HostAttention: an fp32 copy of one group's K/V (when the dtype is
                # narrower; a compressed cache's fp32 tiles instead) and page-locked q, k, v,
                # output and mask of one gpu batch; the buffers that grow with the sequence
                # double, so up to twice their size.
                cpu["host attention"] = (Switched("cg<1", tiles, 1 - V("cg")) if self.compress_cache
                                         else (1 - V("cg")) * (2 * 2 * t_max * b * h * 4 * (dt < 4)))
                cpu["host attention staging"] = Lin(4 * b * h * dt + 2 * b * t_max)
            # Disk rows land in their working buffer (or packed buffer) directly when it is in
            # host memory; bound for a CUDA device, they pass through pinned host memory.
            if cuda and not self.cpu_cache_compute:
                # kvcache.PinnedStaging: one K or V array per load thread.
                cpu["cache staging"] = V("cd") * (b * row_cache)
            score = b * t_max * (nh * e.attn_score_bytes + e.mask_bytes * fig.query_groups + nb)
            # Merged layers: the concatenated input and the temporaries of every row (the
            # scores stay one gpu batch's).
            rows = B if self.merge_decode else b
            extra = h if self.merge_decode else 0
            attn = rows * (fig.attn_temp_width + extra) * dt + score
            mlp = rows * (fig.mlp_temp_width + extra) * dt
            inp = 3 * b * h * dt
        out = b * vocab * (dt + 4 + 8)               # logits, their fp32 copy, sampling
        gpu["compute"] = Lin(max(attn, mlp, out, inp))
        if not prefill:
            # The prompt-sized hidden states are replaced by one-token ones at the first
            # decode step's input layer: only that layer's temporaries meet them, so the
            # peak is max(prompt-sized + input layer, one-token + the largest other layer).
            relief = min(max(max(attn, mlp, out) - inp, 0), nb * b * (self.s - 1) * h * dt)
            gpu["hidden"] = Switched("hg>0", nb * b * self.s * h * dt - relief, V("hg"))
        gpu["compute headroom"] = gpu["compute"] * e.working_headroom
        pinned = {}
        if cuda:
            names = ["weight staging", "hidden", "hidden staging", "host attention staging"]
            names += ["weights"] if self.pin_weight else []
            names += [] if self.cpu_cache_compute else ["cache staging"]
            pinned = {k: cpu[k] for k in names if k in cpu}
            lins = [v for v in pinned.values() if isinstance(v, Lin)]
            cpu["pinned headroom"] = sum(lins, Lin()) * e.pinned_headroom
            for k, v in pinned.items():
                if isinstance(v, Switched):
                    cpu[f"pinned headroom ({k})"] = Switched(v.key, v.amount * e.pinned_headroom, v.trigger)
        self.pinned[phase] = pinned
        return {"gpu": gpu, "cpu": cpu, "disk": disk}

    def memory_terms(self, phase: str, tier: str) -> list:
        return list(self.memory[phase][tier].values())

    def memory_total(self, phase: str, tier: str, x: Mapping[str, float]) -> float:
        return sum(t.value(x) for t in self.memory[phase][tier].values())

    # -- evaluation --------------------------------------------------------------------
    def interval_time(self, iv: Interval, x: Mapping[str, float]) -> tuple[float, str]:
        """Seconds of one interval and the stream that bounds it."""
        parts = {"load": iv.load.value(x), "store": iv.store.value(x), "compute": iv.compute.value(x)}
        which = max(parts, key=parts.get)
        if not self.overlap:
            return sum(parts.values()), which
        return parts[which], which


@dataclass
class Estimate:
    """What the cost model predicts for one policy."""
    model: str
    prompt_len: int
    gen_len: int
    policy: Policy
    hardware: str
    throughput: float                      # generated token/s over prefill + decode
    total_time: float
    prefill_time: float
    decode_time: float
    memory: dict[str, float]               # peak bytes per tier over both phases
    memory_by_phase: dict[str, dict[str, float]]
    memory_breakdown: dict[str, dict[str, dict[str, float]]]  # phase -> tier -> component -> bytes
    io_bytes: dict[str, dict[str, float]]  # phase -> link -> bytes over the whole phase
    io_per_layer: dict[str, dict[str, dict[str, float]]]  # phase -> layer step -> link -> bytes (one step)
    busy_time: dict[str, dict[str, float]]  # phase -> resource -> seconds the resource is busy
    bottleneck: dict[str, str]              # phase -> what bounds it
    bottleneck_share: dict[str, dict[str, float]]  # phase -> resource -> share of the phase's time
    fractions: dict[str, float]             # achieved placement fractions
    pinned_bytes: float = 0.0               # page-locked host bytes (CUDA), within memory["cpu"]
    budgets: dict[str, float] | None = None  # usable bytes per tier, when checked
    shortfalls: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return not self.shortfalls

    @property
    def peak_memory(self) -> dict[str, float]:
        return self.memory

    def to_dict(self) -> dict:
        return {
            "model": self.model, "prompt_len": self.prompt_len, "gen_len": self.gen_len,
            "hardware": self.hardware, "policy": self.policy.to_dict(),
            "throughput": self.throughput, "total_time": self.total_time,
            "prefill_time": self.prefill_time, "decode_time": self.decode_time,
            "memory": self.memory, "memory_by_phase": self.memory_by_phase,
            "memory_breakdown": self.memory_breakdown, "budgets": self.budgets,
            "feasible": self.feasible, "shortfalls": self.shortfalls,
            "io_bytes": self.io_bytes, "io_per_layer": self.io_per_layer, "busy_time": self.busy_time,
            "bottleneck": self.bottleneck, "bottleneck_share": self.bottleneck_share,
            "fractions": self.fractions, "pinned_bytes": self.pinned_bytes,
        }


_LINK_BW = {"disk->cpu": "disk_read_bw", "cpu->gpu": "cpu_to_gpu_bw",
            "gpu->cpu": "gpu_to_cpu_bw", "cpu->disk": "disk_write_bw"}


def evaluate(model: BlockModel, x: Mapping[str, float], policy: Policy) -> Estimate:
    """Evaluate a BlockModel at fractions `x`."""
    hw = model.hw
    times, io_bytes, io_layer, busy, share, bottleneck = {}, {}, {}, {}, {}, {}

    def link_time(iv, link):
        return iv.io[link].value(x) / getattr(hw, _LINK_BW[link])

    for phase in PHASES:
        reps = 1 if phase == "prefill" else model.decode_steps
        total = 0.0
        io_bytes[phase] = {k: 0.0 for k in LINKS}
        io_layer[phase] = {}
        busy[phase] = {k: 0.0 for k in LINKS} | {"compute (gpu)": 0.0, "compute (host)": 0.0}
        attributed: dict[str, float] = {}
        for iv in model.intervals[phase]:
            t, stream = model.interval_time(iv, x)
            t_all = t * iv.count * reps
            total += t_all
            io_layer[phase][iv.name] = {k: iv.io[k].value(x) for k in LINKS}
            for k in LINKS:
                io_bytes[phase][k] += iv.io[k].value(x) * iv.count * reps
                busy[phase][k] += link_time(iv, k) * iv.count * reps
            busy[phase]["compute (gpu)"] += iv.gpu.value(x) * iv.count * reps
            busy[phase]["compute (host)"] += iv.host.value(x) * iv.count * reps
            if stream == "load":
                res = "disk->cpu" if link_time(iv, "disk->cpu") >= link_time(iv, "cpu->gpu") else "cpu->gpu"
            elif stream == "store":
                res = "gpu->cpu" if link_time(iv, "gpu->cpu") >= link_time(iv, "cpu->disk") else "cpu->disk"
            else:
                res = "compute (host)" if iv.host.value(x) > iv.gpu.value(x) else "compute (gpu)"
            attributed[res] = attributed.get(res, 0.0) + t_all
        times[phase] = total
        if total > 0:
            share[phase] = {k: v / total for k, v in sorted(attributed.items(), key=lambda kv: -kv[1])}
            bottleneck[phase] = next(iter(share[phase]))
        else:
            share[phase], bottleneck[phase] = {}, "none"

    mem_phase, breakdown = {}, {}
    for phase in PHASES:
        if phase == "decode" and model.decode_steps == 0:
            continue
        breakdown[phase] = {tier: {k: v.value(x) for k, v in model.memory[phase][tier].items()}
                            for tier in TIER_NAMES}
        mem_phase[phase] = {tier: sum(breakdown[phase][tier].values()) for tier in TIER_NAMES}
    memory = {tier: max(m[tier] for m in mem_phase.values()) for tier in TIER_NAMES}
    pinned = max(sum(v.value(x) for v in model.pinned[p].values()) for p in mem_phase)
    total = times["prefill"] + times["decode"]
    return Estimate(
        model=model.args.name, prompt_len=model.s, gen_len=model.n, policy=policy, hardware=hw.name,
        throughput=model.block_size * model.n / total, total_time=total,
        prefill_time=times["prefill"], decode_time=times["decode"], memory=memory,
        memory_by_phase=mem_phase, memory_breakdown=breakdown, io_bytes=io_bytes,
        io_per_layer=io_layer, busy_time=busy, bottleneck=bottleneck, bottleneck_share=share,
        fractions=dict(x), pinned_bytes=pinned)


def block_model_for(args: ModelArgs, policy: Policy, prompt_len: int, gen_len: int,
                    hw: HardwareProfile, engine: EngineConstants = DEFAULT_ENGINE) -> BlockModel:
    return BlockModel(args, prompt_len, gen_len, policy.gpu_batch_size, policy.num_gpu_batches, hw,
                      compress_weight=policy.compress_weight, compress_cache=policy.compress_cache,
                      cpu_cache_compute=policy.cpu_cache_compute, overlap=policy.overlap,
                      pin_weight=policy.pin_weight, engine=engine)


def estimate(model_args: ModelArgs, policy: Policy, prompt_len: int, gen_len: int,
             hw: HardwareProfile, budgets=None, engine: EngineConstants = DEFAULT_ENGINE) -> Estimate:
    """Predict throughput, time, I/O and peak memory of `policy`.

    `budgets` (a `budgets.Budgets`, optional) fills `Estimate.budgets` and `shortfalls`:
    one sentence per tier whose peak exceeds its usable budget.
    """
    model = block_model_for(model_args, policy, prompt_len, gen_len, hw, engine)
    est = evaluate(model, fractions_of(policy), policy)
    if budgets is not None:
        check_budgets(est, budgets)
    return est
