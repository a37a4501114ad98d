"""Pipeline parallelism: N processes (torch.distributed, launched by torchrun), each a
stage holding a contiguous slice of the layer list and running the engine's schedule
over it with its own Policy.

The block's gpu batches are split into groups, one per stage (at most `ngb`). For token
step i, a stage runs group g through its layers in zig-zag order (each layer once per
group, then its gpu batches) and hands each gpu batch's last hidden state to the next
stage with a non-blocking send; the next stage takes it as its first layer's input,
in place of a hidden load. The last stage samples (the scheduler's own head step) and
sends the group's new tokens and done flags back to the first stage, which needs them
for step i + 1 of that group. While stage s + 1 runs group g, stage s runs group g + 1:
with as many groups as stages the ring stays full (docs/ARCHITECTURE.md, "Pipeline").

Messages between a pair of ranks are matched in order, and every stage visits (step,
group) in the same order, so no tags are needed. Per (step, group), a stage tells the
next one whether the group runs (1) or has ended (0); the first stage decides from the
done flags the last stage sent. When every group has ended or the token budget is
spent, all stages leave the loop at the same step; the last stage then broadcasts the
block's tokens, stop state and log-probs, so every rank returns the same results.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from flexgen.errors import FlexGenError
from flexgen.sampling import STOP
from flexgen.scheduler import Block, Scheduler, _Pending, _trim, zigzag_order
from flexgen.stages import micro_batch_groups, split_layers, stage_costs

DEFAULT_TIMEOUT_S = 300.0


def world_size() -> int:
    """Processes in the pipeline: the initialised process group's, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def init_process_group(device: str = "cpu", timeout_s: Optional[float] = None) -> None:
    """Join the process group torchrun describes (MASTER_ADDR, RANK, WORLD_SIZE): nccl on
    CUDA, gloo on the CPU. A peer that dies or stalls makes collective and point-to-point
    calls fail after `timeout_s` ($FLEXGEN_DIST_TIMEOUT, default 300 s) instead of hanging."""
    if dist.is_initialized():
        return
    if timeout_s is None:
        timeout_s = float(os.environ.get("FLEXGEN_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    # torchrun ends the other ranks with SIGTERM when one fails: exit through Python so
    # that `finally` blocks and finalizers remove this stage's run files.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def _exit_on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # a second one ends the process at once
    raise SystemExit(128 + signum)


@contextmanager
def _peer_errors(stage: int, num_stages: int):
    """A failed or silent peer as one clear error (the backend's first line kept)."""
    try:
        yield
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FlexGenError(f"pipeline stage {stage} of {num_stages}: a peer stage failed or did not answer "
                           f"within the timeout ($FLEXGEN_DIST_TIMEOUT): {first}") from e


def load_stage(args, policy, device, dtype, offload_dir, source, progress: bool = False, groups: Optional[int] = None,
               verify_store: bool = False):
    """This process's stage of the pipeline (called by `load_model` under torchrun)."""
    from flexgen.engine import FlexGenModel

    init_process_group(str(device.device))
    r, n = dist.get_rank(), dist.get_world_size()
    shapes = [None] * n
    dist.all_gather_object(shapes, (policy.gpu_batch_size, policy.num_gpu_batches))
    if len(set(shapes)) != 1:
        raise FlexGenError(f"pipeline stages disagree on (gpu_batch_size, num_gpu_batches): {shapes}")
    layers = split_layers(stage_costs(args, dtype, policy.compress_weight), n)[r]
    # Rank 0 converts the checkpoint into the shared weight store once; the others then
    # open it (each reads only its layers).
    if r != 0:
        dist.barrier()
    try:
        model = FlexGenModel(args, policy, device, dtype, offload_dir, source, progress=progress and r == 0,
                             verify_store=verify_store, layers=layers)
    finally:
        if r == 0:
            dist.barrier()
    # Wait until every stage has loaded, so no stage's first receive (and the report's clock)
    # includes a later stage's loading time.
    dist.barrier()
    model.scheduler = StageScheduler(args, model.weights, policy, device, model.io, hook=model._hook,
                                     stage=r, num_stages=n, groups=groups)
    return model


class StageScheduler(Scheduler):
    """The schedule of one pipeline stage: the engine's steps over this stage's layers,
    group by group, with the hand-offs to and from the neighbouring stages."""

    def __init__(self, args, weights, policy, device, io, hook=None, *, stage: int, num_stages: int,
                 groups: Optional[int] = None):
        super().__init__(args, weights, policy, device, io, hook)
        # This stage's KV cache holds its own attention layers, numbered from 0.
        attn = [j for j, s in enumerate(self.specs) if s.kind == "attention"]
        self.attn_index = {j: n for n, j in enumerate(attn)}
        self.stage, self.num_stages = stage, num_stages
        self.first, self.last = stage == 0, stage == num_stages - 1
        self.num_groups = groups or num_stages
        self.comm_device = device.device if device.is_cuda else torch.device("cpu")
        self._flip = 0
        self._sends: list = []

    # -- messages -----------------------------------------------------------------------

    def _send(self, t: torch.Tensor, dst: int) -> None:
        s0 = time.perf_counter()
        with _peer_errors(self.stage, self.num_stages):
            self._sends.append((dist.isend(t.to(self.comm_device).contiguous(), dst), t))
        self._sends = [(w, x) for w, x in self._sends if not w.is_completed()]
        self.hook("pipeline.send", time.perf_counter() - s0)

    def _recv(self, shape, dtype, src: int) -> torch.Tensor:
        w0 = time.perf_counter()
        buf = torch.empty(shape, dtype=dtype, device=self.comm_device)
        with _peer_errors(self.stage, self.num_stages):
            dist.recv(buf, src)
        self.hook("pipeline.recv", time.perf_counter() - w0)
        return buf.to(self.device.device)

    def _go(self, i: int, rows: slice) -> bool:
        """Whether this group runs step i; the first stage decides, the others follow."""
        b = self._block
        if self.first:
            go = True
            if i > 0:
                msg = self._recv((2, rows.stop - rows.start), torch.long, self.num_stages - 1)
                b.output[rows, i - 1] = msg[0]
                b.stopper.done[rows] = msg[1].bool()
                go = not bool(b.stopper.done[rows].all())
        else:
            go = bool(self._recv((1,), torch.long, self.stage - 1)[0])
        if not self.last:
            self._send(torch.tensor([int(go)]), self.stage + 1)
        return go

    # -- the loop -------------------------------------------------------------------------

    def run(self, block: Block, cache, hidden) -> Block:
        gbs, ngb = self.policy.gpu_batch_size, self.policy.num_gpu_batches
        B = gbs * ngb
        block.output = torch.full((B, block.max_new_tokens), self.args.pad_token_id, dtype=torch.long,
                                  device=self.device.device)
        if block.keep_logits:
            block.logits = torch.zeros((B, block.max_new_tokens, self.args.vocab_size), device="cpu")
        self._block, self._cache, self._hidden = block, cache, hidden
        # As Scheduler.run: decode attends without a mask where no row of the gpu batch is padded.
        prompt = block.attention_mask[:, :block.prompt_len].cpu()
        windowed = bool(getattr(self.args, "sliding_window", None))
        self._unpadded = [not windowed and bool(prompt[k * gbs:(k + 1) * gbs].all()) for k in range(ngb)]
        groups = micro_batch_groups(ngb, self.num_groups)
        active = [True] * len(groups)
        pending = _Pending()
        try:
            for i in range(block.max_new_tokens):
                t0 = time.perf_counter()
                self._clocks = []   # compute intervals, read once the step has synchronised
                for g, batches in enumerate(groups):
                    rows = slice(batches.start * gbs, batches.stop * gbs)
                    if not active[g]:
                        continue
                    if not self._go(i, rows):
                        active[g] = False
                        continue
                    self._run_group(i, batches, rows, pending)
                    block.steps_done = i + 1
                self._step_done(i, t0, self._clocks)
                if not any(active):
                    break
            with _peer_errors(self.stage, self.num_stages):
                for w, _ in self._sends:
                    w.wait()
            self._sends = []
        finally:
            self._finish(pending, cache, hidden)
        self._share_results(block)
        return _trim(block)

    def _run_group(self, i: int, batches: range, rows: slice, pending: _Pending) -> None:
        b = self._block
        inputs = {k: self._step_inputs(i, k) for k in batches}
        if self.policy.overlap:
            self._issue_weight(pending, 0)
            self._issue_loads(pending, i, 0, batches[0])
        layer_weights = None
        # Decode merges the group's batches in decoder layers, as Scheduler.run does the block's.
        for step in zigzag_order(self.num_layers, batches, merged=self.merged_in_decode if i > 0 else frozenset()):
            layer_weights = self._run_step(pending, i, step, inputs, layer_weights, self._clocks)
        if not self.last:
            b.attention_mask[rows, b.prompt_len + i] = True
            return
        if batches.stop < self.policy.num_gpu_batches:   # the head checks the last group itself
            self._check_sequences(rows, i)
        if i + 1 < b.max_new_tokens:
            self._send(torch.stack([b.output[rows, i], b.stopper.done[rows].long()]), 0)

    def _layer_input(self, pending: _Pending, i: int, j: int, k: int):
        if j == 0 and not self.first:
            s = self._block.prompt_len if i == 0 else 1
            return self._recv((self.policy.gpu_batch_size, s, self.args.hidden_size), self.weights.dtype,
                              self.stage - 1)
        return super()._layer_input(pending, i, j, k)

    def _layer_output(self, j: int, x) -> None:
        if j == self.num_layers - 1 and not self.last:
            self._send(x, self.stage + 1)

    def _prefetch_cache(self, pending: _Pending, i: int, step, steps: int) -> None:
        """Not in a stage: its groups' steps interleave with the other stages' hand-offs."""

    def _weight_slot(self, j: int) -> int:
        # Consecutive loads alternate between the two working buffers: a stage may hold an
        # odd number of layers, so the layer index's parity would not.
        self._flip ^= 1
        return self._flip

    def _check_sequences(self, rows: slice, i: int) -> None:
        """StopCriteria.check_sequences for one group's rows (the others have not reached step i)."""
        b = self._block
        st = b.stopper
        n = i + 1
        gen = b.output[rows, :n]
        for seq in st.stop:
            if n >= len(seq):
                hit = (gen[:, -len(seq):] == torch.tensor(seq, device=gen.device)).all(dim=1)
                st._end(rows, ~st.done[rows] & hit, n, STOP)
        if st.text_stop is not None:
            active = torch.zeros_like(st.done)
            active[rows] = ~st.done[rows]
            if bool(active.any()):
                hit = st.text_stop(b.output[:, :n].cpu(), active.cpu()).to(st.done.device)
                st._end(rows, active[rows] & hit[rows], n, STOP)

    def _share_results(self, block: Block) -> None:
        """Every rank gets the last stage's tokens, stop state, log-probs and logits."""
        st = block.stopper
        tensors = [block.output, st.done, st.length, st.reason]
        rec = block.recorder
        if rec is not None:
            tensors += [rec.token_logprob, rec.top_ids, rec.top_logprob, rec.prompt_logprob, rec.prompt_top_ids,
                        rec.prompt_top_logprob]
        if block.logits is not None:
            tensors.append(block.logits)
        src = self.num_stages - 1
        for t in tensors:
            buf = t.to(self.comm_device, torch.long if t.dtype == torch.bool else t.dtype)
            with _peer_errors(self.stage, self.num_stages):
                dist.broadcast(buf, src)
            if buf is not t:
                t.copy_(buf)


def measure_link(nbytes: int = 16 << 20, repeats: int = 5) -> tuple[float, float]:
    """(bytes/s, seconds per message) between ranks 0 and 1, by ping-pong: the median half
    round trip of a one-element message, and of `nbytes` less that latency. Every rank
    calls it; ranks past 1 only wait at the barrier."""
    r = dist.get_rank()
    dev = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")

    def half_trip(n: int) -> float:
        buf = torch.zeros(max(1, n // 4), dtype=torch.float32, device=dev)
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            if r == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            elif r == 1:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / 2)
        return sorted(times[1:])[len(times[1:]) // 2]

    latency = half_trip(4)
    big = half_trip(nbytes)
    dist.barrier()
    return nbytes / max(big - latency, 1e-9), latency


# -- reports ------------------------------------------------------------------------------

def stage_figures(model) -> dict:
    """This stage's share of the work: its layers, where its time went, its memory."""
    t = model.stats.timings
    return {
        "stage": dist.get_rank(),
        "layers": [model.layers.start or 0, (model.layers.start or 0) + len(model.weights.layouts)],
        "compute_s": t.get("prefill.compute", 0.0) + t.get("decode.compute", 0.0),
        "io_wait_s": t.get("prefill.wait", 0.0) + t.get("decode.wait", 0.0),
        "recv_wait_s": t.get("pipeline.recv", 0.0),
        "send_s": t.get("pipeline.send", 0.0),
        "total_s": model.stats.total_time,
        "peak_memory_bytes": dict(model.stats.peak_memory),
        "weights_held_bytes": model.placement.weight_bytes(),
        "policy": model.policy.to_dict(),
    }


def gather_report(model, report: dict) -> Optional[dict]:
    """The run's report with every stage's figures under "stages", on rank 0 (None elsewhere).
    Throughput is over the whole pipeline: the generated tokens over rank 0's time, which
    spans the first prefill to the last token handed back."""
    figures = [None] * dist.get_world_size()
    dist.all_gather_object(figures, stage_figures(model))
    if dist.get_rank() != 0:
        return None
    return {**report, "num_stages": len(figures), "stages": figures}


def print_stages(report: dict) -> None:
    from flexgen.cli import _fmt_bytes
    print(f"pipeline of {report['num_stages']} stages (time in s; memory: peak held per tier)")
    print(f"{'stage':<6} {'layers':>8} {'compute':>9} {'I/O wait':>9} {'recv wait':>10} {'send':>7} "
          f"{'gpu':>10} {'cpu':>10} {'disk':>10}")
    for s in report["stages"]:
        mem = s["peak_memory_bytes"]
        print(f"{s['stage']:<6} {s['layers'][0]:>3}-{s['layers'][1] - 1:<4} {s['compute_s']:>9.3f} "
              f"{s['io_wait_s']:>9.3f} {s['recv_wait_s']:>10.3f} {s['send_s']:>7.3f} "
              + " ".join(f"{_fmt_bytes(mem.get(t)):>10}" for t in ("gpu", "cpu", "disk")))
