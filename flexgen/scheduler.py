"""The zig-zag block schedule.

For token step i, layer j, gpu batch k, the named steps are: load weight (once per layer
and block), load cache, load hidden, compute, store cache, store hidden. Sequential
execution runs each step and waits for it. Overlapped execution runs the same steps in
another order: at the start of layer j the weights of the next layer are requested;
before computing (j, k) the cache and hidden of the next (j, k) are requested; stores of
(j, k) run while the next step computes. Loads and stores run on the I/O pool; every
dependency is an explicit future (a load of a slot waits for the last store to it), and
on CUDA a mark on the compute stream guards buffers the compute may still read, and the
compute stream waits on each load's event (ComputeDevice.io_task): no host sync per layer.
A step that moves no bytes runs inline, on no stream of its own.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from flexgen.activations import HiddenSlot
from flexgen.device import ComputeDevice
from flexgen.iopool import IOPool, done_future
from flexgen.kvcache import KVCache
from flexgen.models.registry import family_of
from flexgen.policy import Policy
from flexgen.sampling import LogprobRecorder, StopCriteria
from flexgen.weights import PlacedWeights

TimingHook = Callable[[str, float], None]

# What the timings name: "{phase}.wait.{kind}" (compute waited for it) and "{phase}.io.{kind}"
# (an I/O thread was busy with it).
WAIT_KINDS = ("weights", "cache", "hidden", "stores")
IO_KINDS = ("load_weights", "load_cache", "store_cache", "load_hidden", "store_hidden")

# Stores waiting behind a slow disk keep their tensors alive (a prefill's K and V: tens of
# MB per (layer, gpu batch)): unbounded, memory grows for as long as the disk lags behind
# compute. Past this many stores in flight, compute waits for the oldest.
MAX_PENDING_STORES = 4


@dataclass
class Block:
    """One block: gbs x ngb rows of left-padded prompts, and what decides their tokens."""
    input_ids: torch.Tensor        # (B, P) on the compute device
    attention_mask: torch.Tensor   # (B, P + G) bool; the generated part is filled in as we go
    prompt_len: int
    max_new_tokens: int
    sampler: Callable = None       # (rows: slice, logits (r, vocab) fp32) -> tokens (r,)
    stopper: StopCriteria = None
    recorder: Optional[LogprobRecorder] = None   # log-probs gathered per step
    output: torch.Tensor = None    # (B, G) generated tokens
    keep_logits: bool = False
    forced: torch.Tensor = None    # (B, G) tokens to feed instead of sampling (teacher forcing)
    logits: torch.Tensor = None    # (B, G, vocab) float32 when keep_logits
    steps_done: int = 0


@dataclass
class _StepInputs:
    ids: torch.Tensor          # (gbs, s)
    positions: torch.Tensor    # (gbs, s)
    mask: Optional[torch.Tensor]  # (gbs, s, t + s) bool; None: every position visible


@dataclass
class _Pending:
    weights: dict = field(default_factory=dict)   # layer -> Future[LoadedLayer]
    cache: dict = field(default_factory=dict)     # (layer, batch) -> Future[KVWork]
    hidden: dict = field(default_factory=dict)    # (layer, batch) -> Future[Tensor]


@dataclass(frozen=True)
class ZigzagStep:
    """One (layer, gpu batches) computation of a token step, and what to fetch around it."""
    layer: int
    batches: tuple[int, ...]   # one gpu batch, or every batch of the block at once (a merged layer)
    first: bool            # first step of the layer: its weights are taken here, once for all batches
    next_weight: int       # the layer whose weights to request here when overlapping (0 after the last)
    ahead: tuple[tuple[int, int, tuple[int, ...]], ...]   # the next two (token steps on, layer, batches)

    @property
    def next(self) -> Optional[tuple[int, tuple[int, ...]]]:
        """The (layer, batches) computed after this one in the same token step, if any."""
        steps, j, ks = self.ahead[0]
        return (j, ks) if steps == 0 else None


def zigzag_order(num_layers: int, batches: range, merged: frozenset = frozenset()) -> list[ZigzagStep]:
    """The order of one token step: layer by layer, and within a layer every gpu batch,
    so a layer's weights are loaded once for the whole block rather than once per batch.
    A layer in `merged` computes every batch in one step. The positions ahead of the last
    steps run on into the next token step, taken to start the same way."""
    positions = []
    for j in range(num_layers):
        if j in merged and len(batches) > 1:
            positions.append((j, tuple(batches)))
        else:
            positions.extend((j, (k,)) for k in batches)
    n_pos = len(positions)
    return [ZigzagStep(j, ks, ks[0] == batches[0], (j + 1) % num_layers,
                       tuple(((n + d) // n_pos, *positions[(n + d) % n_pos]) for d in (1, 2)))
            for n, (j, ks) in enumerate(positions)]


class Scheduler:
    def __init__(self, args, weights: PlacedWeights, policy: Policy, device: ComputeDevice,
                 io: IOPool, hook: Optional[TimingHook] = None):
        self.args, self.weights, self.policy, self.device, self.io = args, weights, policy, device, io
        self.hook = hook or (lambda name, seconds: None)
        self.family = family_of(args)   # the model's pure layer functions
        self.specs = [lay.spec for lay in weights.layouts]
        self.num_layers = len(self.specs)
        self.attn_index = {j: s.block for j, s in enumerate(self.specs) if s.kind == "attention"}
        self.merged_in_decode = frozenset(j for j, s in enumerate(self.specs) if s.kind in ("attention", "mlp"))
        # Host seconds the I/O threads spent in each kind of load / store since the last
        # step ended (added from several threads: under a lock).
        self._io_busy: dict[str, float] = defaultdict(float)
        self._io_lock = threading.Lock()
        self._stores_in_flight: deque = deque()   # futures of stores on the I/O pool, oldest first

    # -- public -----------------------------------------------------------------------

    def run(self, block: Block, cache: KVCache, hidden: list[HiddenSlot]) -> Block:
        gbs, ngb = self.policy.gpu_batch_size, self.policy.num_gpu_batches
        block.output = torch.full((gbs * ngb, block.max_new_tokens), self.args.pad_token_id, dtype=torch.long,
                                  device=self.device.device)
        if block.keep_logits:
            block.logits = torch.zeros((gbs * ngb, block.max_new_tokens, self.args.vocab_size), device="cpu")
        self._block, self._cache, self._hidden = block, cache, hidden
        stopper = block.stopper
        # Decode attends without a mask where no row of the gpu batch is padded: a boolean
        # mask rules out the flash kernel. Generated positions are always visible.
        # (A sliding window masks old positions itself: it keeps the mask.)
        prompt = block.attention_mask[:, :block.prompt_len].cpu()
        windowed = bool(getattr(self.args, "sliding_window", None))
        self._unpadded = [not windowed and bool(prompt[k * gbs:(k + 1) * gbs].all()) for k in range(ngb)]
        pending = _Pending()
        overlap = self.policy.overlap
        # Decode runs each decoder layer's matmuls once for the whole block: their input is
        # one token per row (gbs x ngb rows are a few MB), while a matmul of 4 x 128 rows
        # took 1.5x the time of one of 512 here (benchmarks/RESULTS.md). Attention itself
        # stays per gpu batch, over that batch's cache (_attention_merged).
        # Both orders start with layer 0 (the input embedding, never merged) batch by batch,
        # so the prefill's last steps may look ahead into the decode's first.
        orders = (zigzag_order(self.num_layers, range(ngb)),
                  zigzag_order(self.num_layers, range(ngb), merged=self.merged_in_decode))
        try:
            for i in range(block.max_new_tokens):
                t0 = time.perf_counter()
                clocks = []   # compute intervals, read once the step has synchronised
                inputs = [self._step_inputs(i, k) for k in range(ngb)]
                layer_weights = None
                if overlap and i == 0:
                    self._issue_weight(pending, 0)
                    self._issue_loads(pending, i, 0, 0)
                for step in orders[i > 0]:
                    layer_weights = self._run_step(pending, i, step, inputs, layer_weights, clocks)
                block.steps_done = i + 1
                if i + 1 < block.max_new_tokens and not stopper.all_done and overlap:
                    self._issue_loads(pending, i + 1, 0, 0)
                self._step_done(i, t0, clocks)
                if stopper.all_done:
                    break
        finally:
            self._finish(pending, cache, hidden)
        return _trim(block)

    def _run_step(self, pending: _Pending, i: int, step: ZigzagStep, inputs, layer_weights, clocks: list):
        """One step of the zig-zag order: request what comes next, wait for this step's
        inputs, compute, store. Returns the layer's weights (taken at its first step)."""
        j, ks, nxt = step.layer, step.batches, step.next
        overlap = self.policy.overlap
        merged_attention = len(ks) > 1 and self.specs[j].kind == "attention"
        # Of a merged step's caches only the first is loaded ahead: the step loads the
        # others one gpu batch ahead itself (_attention_merged).
        if overlap:
            if step.first:
                self._issue_weight(pending, step.next_weight)
            # A hidden input this step writes (with one gpu batch, or around a merged layer)
            # is loaded after its store; the rest, and the cache, now.
            if nxt is not None:
                for n, k in enumerate(nxt[1]):
                    self._issue_loads(pending, i, nxt[0], k, cache=n == 0, hidden=k not in ks)
            if not merged_attention:
                self._prefetch_cache(pending, i, step, self._block.max_new_tokens)
        else:
            if step.first:
                self._issue_weight(pending, j)
            for n, k in enumerate(ks):
                self._issue_loads(pending, i, j, k, cache=n == 0)
        if step.first:
            layer_weights = self._wait_weights(pending, j, i)
        kv = self._wait(pending.cache.pop((j, ks[0]), None), i, "cache") if len(ks) == 1 else None
        xs = [self._layer_input(pending, i, j, k) for k in ks]
        if merged_attention:   # it waits for caches in between: it clocks its compute itself
            xs = self._attention_merged(pending, i, step, layer_weights, inputs, xs, clocks)
        else:
            c0 = self.device.clock()
            if len(ks) == 1:
                xs = [self._compute(i, j, ks[0], layer_weights, inputs[ks[0]], xs[0], kv)]
            else:
                xs = self.family.mlp(layer_weights, torch.cat(xs), self.args).split(self.policy.gpu_batch_size)
            clocks.append((c0, self.device.clock()))
        for x in xs:
            self._layer_output(j, x)
        stores = [f for k, x in zip(ks, xs) for f in self._issue_stores(i, j, k, x, kv)]
        if not overlap:
            for f in stores:
                f.result()
        elif nxt is not None:
            for k in nxt[1]:
                if k in ks:
                    self._issue_loads(pending, i, nxt[0], k, cache=False)
        return layer_weights

    def _attention_merged(self, pending: _Pending, i: int, step: ZigzagStep, w, inputs, xs, clocks: list):
        """A decode attention layer over every gpu batch of the step: the projections once
        for all rows; attention gpu batch by gpu batch over its KV cache, loaded one batch
        ahead and stored when done, as in unmerged steps; the output projection once.
        Returns each gpu batch's output."""
        j, ks = step.layer, step.batches
        gbs, overlap = self.policy.gpu_batch_size, self.policy.overlap
        c0 = self.device.clock()
        x = torch.cat(xs)
        positions = torch.cat([inputs[k].positions for k in ks])
        q, key, value = self.family.attention_in(w, x, positions, self.args)
        attn = torch.empty_like(q)
        for n, k in enumerate(ks):
            clocks.append((c0, self.device.clock()))
            if not overlap:
                if n > 0:
                    self._issue_loads(pending, i, j, k, hidden=False)
            elif n + 1 < len(ks):
                self._issue_loads(pending, i, j, ks[n + 1], hidden=False)
            else:   # as an unmerged step of the layer's last batch would
                self._prefetch_cache(pending, i, step, self._block.max_new_tokens)
            kv = self._wait(pending.cache.pop((j, k)), i, "cache")
            c0 = self.device.clock()
            rows = slice(n * gbs, (n + 1) * gbs)
            attn[rows] = self.family.attention_core(q[rows], key[rows], value[rows], inputs[k].mask, kv, self.args)
            stores = self._issue_stores(i, j, k, None, kv, hidden=False)
            if not overlap:
                for f in stores:
                    f.result()
        out = self.family.attention_out(w, x, attn, self.args)
        clocks.append((c0, self.device.clock()))
        return out.split(gbs)

    def _layer_input(self, pending: _Pending, i: int, j: int, k: int):
        """The hidden input of layer j for gpu batch k (None for the input layer)."""
        return self._wait(pending.hidden.pop((j, k), None), i, "hidden")

    def _layer_output(self, j: int, x) -> None:
        """Called with each gpu batch's output of layer j, in batch order (a pipeline stage
        hands its last layer's on)."""

    def _step_done(self, i: int, t0: float, clocks: list) -> None:
        """End of a token step: one sync, then its wall and compute time to the hook."""
        self.device.synchronize()
        phase = "prefill" if i == 0 else "decode"
        self.hook(phase, time.perf_counter() - t0)
        self.hook(phase + ".compute", sum(self.device.elapsed(a, b) for a, b in clocks))
        self._flush_io(phase)

    def _flush_io(self, phase: str) -> None:
        """I/O busy time to the hook, under the phase that was running when it was spent."""
        with self._io_lock:
            busy, self._io_busy = self._io_busy, defaultdict(float)
        for kind, seconds in busy.items():
            self.hook(f"{phase}.io.{kind}", seconds)

    def _timed(self, kind: str, fn):
        """fn, adding the host time it takes to the I/O busy time of `kind`."""
        def run(*args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                seconds = time.perf_counter() - t0
                with self._io_lock:
                    self._io_busy[kind] += seconds
        return run

    def _finish(self, pending: _Pending, cache: KVCache, hidden: list[HiddenSlot]) -> None:
        """Wait for every load and store still in flight (also after an error or early stop)."""
        self._drain(pending)
        for slot in [*hidden, *cache.slots.values()]:
            if slot.last_store is not None:
                slot.last_store.result()
        self._stores_in_flight.clear()
        self._flush_io("decode" if self._block.steps_done > 1 else "prefill")

    # -- inputs -----------------------------------------------------------------------

    def _step_inputs(self, i: int, k: int) -> _StepInputs:
        b = self._block
        gbs = self.policy.gpu_batch_size
        rows = slice(k * gbs, (k + 1) * gbs)
        P = b.prompt_len
        mask = b.attention_mask[rows]
        if i == 0:
            m = mask[:, :P]
            positions = (m.long().cumsum(1) * m - 1)   # as HF: padding gets -1
            causal = torch.ones(P, P, dtype=torch.bool, device=m.device).tril()
            eye = torch.eye(P, dtype=torch.bool, device=m.device)
            # Padding positions see themselves so their (unused) attention stays finite;
            # real positions see themselves anyway. Decode masks always include the new token.
            return _StepInputs(b.input_ids[rows], positions, (causal[None] & m[:, None, :]) | eye)
        t = P + i - 1
        m = mask[:, :t + 1]
        if self._unpadded[k]:
            positions = torch.full((gbs, 1), t, dtype=torch.long, device=m.device)
            return _StepInputs(b.output[rows, i - 1:i], positions, None)
        positions = m.long().sum(1, keepdim=True) - 1
        return _StepInputs(b.output[rows, i - 1:i], positions, m[:, None, :])

    # -- issuing loads and stores ---------------------------------------------------------

    def _submit(self, inline: bool, kind: str, fn, *args, after=None, store: bool = False, prev=None):
        """Run fn on the I/O pool, or here when it moves no bytes (a thread hop costs more,
        and so would entering a side stream). The future holds (result, ready event).
        `kind` names the work in the I/O busy times; `prev`: a future (the slot's last
        store) to wait for first, outside the busy time.

        Stores wait for their copies on their own worker (the host may need the bytes:
        a disk write, the next load of the slot); loads hand compute an event instead."""
        if inline:
            return done_future((_after(prev, fn)(*args), None))
        return self.io.submit(self.device.io_task(_after(prev, self._timed(kind, fn)), after, sync=store),
                              *args, store=store, weights=kind == "load_weights")

    def _issue_weight(self, pending: _Pending, j: int) -> None:
        if j not in pending.weights:
            inline = self.weights.resident(j)
            after = None if inline else self.device.mark()
            turn = self.weights.read_turn(j)   # disk reads go in the order loads are issued
            f = self._submit(inline, "load_weights", self.weights.load, j, self._weight_slot(j), turn, after=after)
            f.add_done_callback(lambda _: self.weights.release_turn(turn))   # also if it failed
            pending.weights[j] = f

    def _weight_slot(self, j: int) -> int:
        """Which of the two working buffers layer j's load fills (consecutive layers differ)."""
        return j % 2

    def _issue_loads(self, pending: _Pending, i: int, j: int, k: int, cache: bool = True,
                     hidden: bool = True) -> None:
        if cache and self.specs[j].kind == "attention" and (j, k) not in pending.cache:
            slot = self._cache.slot(self.attn_index[j], k)
            t, s = (0, self._block.prompt_len) if i == 0 else (self._block.prompt_len + i - 1, 1)
            pending.cache[(j, k)] = self._submit(slot.resident, "load_cache", slot.begin, t, s, prev=slot.last_store)
        if hidden and j > 0 and (j, k) not in pending.hidden:
            slot = self._hidden[k]
            # The load may read gpu rows that compute wrote: after a mark taken now.
            after = None if slot.resident else self.device.mark()
            pending.hidden[(j, k)] = self._submit(slot.resident, "load_hidden", slot.load, after=after,
                                                  prev=slot.last_store)

    def _prefetch_cache(self, pending: _Pending, i: int, step: ZigzagStep, steps: int) -> None:
        """When the next position has no cache to load (an MLP layer, or the next token's
        input embedding), start the cache load of the position after it now, so that a
        read from disk overlaps two compute steps instead of one short MLP step (the
        cache load was the longest wait with one gpu batch)."""
        (d1, j1, _), (d2, j2, ks2) = step.ahead
        if i + d1 >= steps or self.specs[j1].kind == "attention":
            return
        if i + d2 < steps and self.specs[j2].kind == "attention":
            self._issue_loads(pending, i + d2, j2, ks2[0], hidden=False)   # a merged step loads the rest

    def _issue_stores(self, i: int, j: int, k: int, x, kv, hidden: bool = True) -> list:
        stores = []
        if kv is not None:
            slot = self._cache.slot(self.attn_index[j], k)
            stores.append((slot, "store_cache", slot.end, kv))
        if hidden and j < self.num_layers - 1:
            slot = self._hidden[k]
            stores.append((slot, "store_hidden", slot.store, x))
        after = None if all(s.resident for s, _, _, _ in stores) else self.device.mark()
        for slot, kind, fn, value in stores:
            slot.last_store = self._submit(slot.resident, kind, fn, value, after=after, store=True)
            if not slot.resident:
                self._stores_in_flight.append(slot.last_store)
        pending = self._stores_in_flight
        while pending and pending[0].done():
            pending.popleft()
        while len(pending) > MAX_PENDING_STORES:
            self._wait(pending.popleft(), i, "stores")
        return [slot.last_store for slot, _, _, _ in stores]

    def _wait(self, fut, i: int, kind: str):
        """The result of a load (or a store), counting the time compute waited for it
        (in total and by `kind`: weights, cache, hidden or stores)."""
        if fut is None:
            return None
        w0 = time.perf_counter()
        out, ready = fut.result()
        self.device.wait(ready)
        waited = time.perf_counter() - w0
        phase = "prefill" if i == 0 else "decode"
        self.hook(phase + ".wait", waited)
        self.hook(f"{phase}.wait.{kind}", waited)
        return out

    def _wait_weights(self, pending: _Pending, j: int, i: int):
        loaded = self._wait(pending.weights.pop(j), i, "weights")
        return self.weights.weights(loaded)

    def _drain(self, pending: _Pending) -> None:
        """Wait for loads issued but never used (an early stop or an error), releasing
        the working buffers of cache loads so the memory tracker stays exact."""
        for group in (pending.weights, pending.cache, pending.hidden):
            for fut in group.values():
                try:
                    out, _ = fut.result()
                except Exception:
                    continue
                if group is pending.cache:
                    out.slot.discard(out)
            group.clear()

    # -- compute ----------------------------------------------------------------------

    def _compute(self, i, j, k, w, inp: _StepInputs, x, kv):
        kind = self.specs[j].kind
        if kind == "input":
            return self.family.input_embed(w, inp.ids, inp.positions, self.args)
        if kind == "attention":
            return self.family.self_attention(w, x, inp.mask, inp.positions, kv, self.args)
        if kind == "mlp":
            return self.family.mlp(w, x, self.args)
        return self._head(i, k, w, inp, x)

    def _head(self, i, k, w, inp: _StepInputs, x) -> None:
        """Token bookkeeping after the output layer: choose (or force) the next tokens,
        record log-probs, extend the mask, and end rows."""
        gbs = self.policy.gpu_batch_size
        rows = slice(k * gbs, (k + 1) * gbs)
        b = self._block
        logits = self.family.output_embed(w, x[:, -1], self.args)
        if i == 0 and b.recorder is not None and b.recorder.prompt:
            self._prompt_logprobs(rows, w, inp.ids, x)
        if b.forced is not None:
            tokens = b.forced[rows, i]
        else:
            tokens = b.stopper.apply(rows, i, b.sampler(rows, logits))
        if b.keep_logits:
            b.logits[rows, i] = logits.cpu()
        if b.recorder is not None:
            b.recorder.record(rows, i, logits, tokens)
        b.output[rows, i] = tokens
        b.attention_mask[rows, b.prompt_len + i] = True
        if k == self.policy.num_gpu_batches - 1:
            b.stopper.check_sequences(b.output[:, :i + 1])
        return None

    def _prompt_logprobs(self, rows: slice, w, ids: torch.Tensor, x: torch.Tensor) -> None:
        """Logits of every prompt position, a few positions at a time: a whole
        (rows, prompt, vocab) fp32 tensor would be gigabytes for real batches."""
        r, P, _ = x.shape
        step = max(1, (64 << 20) // (4 * r * self.args.vocab_size))
        for c0 in range(0, P - 1, step):
            c1 = min(P - 1, c0 + step)
            self._block.recorder.record_prompt(rows, c0, self.family.output_embed(w, x[:, c0:c1], self.args),
                                              ids[:, c0 + 1:c1 + 1])


def _trim(block: Block) -> Block:
    """Drop the columns of steps never run (every row stopped early)."""
    block.output = block.output[:, :block.steps_done]
    if block.logits is not None:
        block.logits = block.logits[:, :block.steps_done]
    return block


def _after(prev, fn):
    """fn, run once the future `prev` (the slot's last store) has finished."""
    if prev is None:
        return fn

    def run(*args):
        prev.result()
        return fn(*args)
    return run


__all__ = ["Block", "Scheduler", "ZigzagStep", "zigzag_order"]
