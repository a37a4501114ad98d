"""The batch-generation API: `load_model(...)` and `FlexGenModel.generate(...)`."""

from __future__ import annotations

import os
import shutil
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from flexgen import offload, preflight
from flexgen.activations import HiddenSlot
from flexgen.checkpoint import CheckpointSource, DummySource, resolve_source
from flexgen.device import DTYPES, ComputeDevice, default_dtype
from flexgen.diskio import ReadPriority
from flexgen.errors import FlexGenError
from flexgen.iopool import IOPool
from flexgen.kvcache import KVCache
from flexgen.layout import model_layouts
from flexgen.memory import MemoryTracker, process_peak_rss
from flexgen.placement import Placement, plan
from flexgen.policy import Policy
from flexgen.sampling import LogprobRecorder, SampleConfig, StopCriteria, UniformSampler
from flexgen.scheduler import Block, Scheduler
from flexgen.weights import PlacedWeights
from flexgen.weightstore import WeightStore


def default_offload_dir() -> Path:
    """$FLEXGEN_OFFLOAD_DIR, else ~/.cache/flexgen (the weight store lives under weights/)."""
    env = os.environ.get("FLEXGEN_OFFLOAD_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "flexgen"


@dataclass
class GenerationStats:
    """Figures of the last `generate` call. Times in seconds, memory in bytes."""
    prefill_time: float = 0.0
    decode_time: float = 0.0
    num_sequences: int = 0
    prompt_tokens: int = 0        # prompt tokens processed (padding included)
    generated_tokens: int = 0     # sequences x new tokens (block padding excluded)
    timings: dict = field(default_factory=lambda: defaultdict(float))
    peak_memory: dict = field(default_factory=dict)     # tier -> bytes held by the engine
    held_memory: dict = field(default_factory=dict)     # tier -> bytes at the start (weights)
    cache_bytes: dict = field(default_factory=dict)     # tier -> bytes of one block's KV cache
    process_peak_rss: int = 0
    cuda_peak_allocated: Optional[int] = None
    cuda_peak_reserved: Optional[int] = None      # what --gpu-mem caps (allocator blocks)
    direct_io: Optional[bool] = None
    disk_read_bytes: int = 0      # weights, KV cache and activations read from disk
    decode_disk_read_bytes: int = 0   # the part of disk_read_bytes read during decode steps
    disk_write_bytes: int = 0

    @property
    def total_time(self) -> float:
        return self.prefill_time + self.decode_time

    @property
    def throughput(self) -> float:
        """Generated tokens / (prefill + decode time), the paper's figure."""
        return self.generated_tokens / self.total_time if self.total_time else 0.0


class FlexGenModel:
    """A model of any supported family placed across gpu / cpu / disk by a Policy. Create with `load_model`."""

    def __init__(self, args, policy: Policy, device: ComputeDevice, dtype: torch.dtype,
                 offload_dir: Path, source, progress: bool = True, verify_store: bool = False,
                 layers: Optional[slice] = None):
        self.args, self.policy, self.device, self.dtype = args, policy, device, dtype
        # A pipeline stage holds a contiguous slice of the layer list (flexgen/pipeline.py).
        self.layers = layers or slice(None)
        self.offload_dir = offload_dir
        self.progress = progress
        self._bar, self._bar_rows = None, 0
        self._disk_read = None         # () -> bytes read from disk so far by the running block
        self._decode_read_from = None  # that count when the block's prefill ended
        self.tracker = MemoryTracker()
        self.stats = GenerationStats()
        self.io = IOPool()
        self.read_priority = ReadPriority()   # cache and hidden reads go ahead of weight reads
        self.store = None
        try:
            offload_dir.mkdir(parents=True, exist_ok=True)
            offload.remove_stale_runs(offload_dir)  # left by runs that were killed (SIGKILL, OOM)
            self.run_dir = offload.make_run_dir(offload_dir)
        except OSError as e:
            raise FlexGenError(f"offload directory {offload_dir} is not writable: {e.strerror}") from None
        # Run files (dummy disk weights, KV cache, activations) go with the run, also on
        # Ctrl-C or an error; the finalizer covers a model that is never closed.
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.run_dir, True)
        try:
            layouts = model_layouts(args, dtype, policy.compress_weight)[self.layers]
            self.num_attention = sum(lay.spec.kind == "attention" for lay in layouts)
            self.placement: Placement = plan([lay.nbytes for lay in layouts], policy)
            store = None
            if isinstance(source, CheckpointSource):
                store = self.store = WeightStore.open_or_build(source, dtype, policy.compress_weight,
                                                               offload_dir, progress)
                source.close()
                if verify_store:
                    store.verify()
            from tqdm import tqdm
            with tqdm(total=len(layouts), desc="placing weights", unit="layer",
                      disable=None if progress else True, leave=False) as bar:
                self.weights = PlacedWeights(
                    layouts, self.placement.weights, device, dtype, self.tracker,
                    store=_StoreSlice(store, self.layers.start) if store is not None and self.layers.start else store,
                    dummy=source if isinstance(source, DummySource) else None, run_dir=self.run_dir,
                    pin=policy.pin_weight, progress=bar, read_priority=self.read_priority)
            self.store_dir = store.dir if store is not None else None
        except BaseException:
            self.close()
            raise
        self.scheduler = Scheduler(args, self.weights, policy, device, self.io, hook=self._hook)

    # -- generation -------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0,
                 eos_token_id: Union[int, Sequence[int], None] = None,
                 stop: Optional[Sequence[Sequence[int]]] = None,
                 pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, output_logits: bool = False):
        """Like Hugging Face `generate` for decoder-only models.

        input_ids: (n, P) left-padded prompts, any n (split into blocks of
        gpu_batch_size x num_gpu_batches; the last block is padded and trimmed).
        eos_token_id: None = the model's EOS; [] = never stop early. stop: token-id
        sequences that end a row. Returns (n, P + new) token ids; rows that ended early
        are filled with pad_token_id, and generation stops when every row has ended.
        With output_logits=True returns (sequences, logits (n, new, vocab) float32).
        """
        if getattr(self, "weights", None) is None:
            raise FlexGenError("this model is closed; load it again with load_model")
        input_ids = torch.as_tensor(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = torch.as_tensor(attention_mask)
        self._check_inputs(input_ids, attention_mask, max_new_tokens)
        n = input_ids.shape[0]
        params = SampleConfig(do_sample, temperature, top_p, top_k)
        eos = list(self.args.eos_token_ids) if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        pad = self.args.pad_token_id if pad_token_id is None else pad_token_id

        B = self.policy.block_size
        self.begin_stats()
        outputs, logits = [], []
        self._bar = _progress_bar(n * max_new_tokens, self.progress)
        for start in range(0, n, B):
            real = min(B, n - start)
            stopper = StopCriteria(B, eos, stop or [], pad, self.device.device)
            block = self.generate_block(input_ids[start:start + B], attention_mask[start:start + B], max_new_tokens,
                                        sampler=UniformSampler(params, generator), stopper=stopper,
                                        keep_logits=output_logits)
            outputs.append(block.output[:real])
            if output_logits:
                logits.append(block.logits[:real])
        self._bar.close()
        self._bar = None
        self.end_stats()
        width = max(o.shape[1] for o in outputs)
        new = torch.full((n, width), pad, dtype=torch.long)
        row = 0
        for o in outputs:
            new[row:row + o.shape[0], :o.shape[1]] = o.cpu()
            row += o.shape[0]
        sequences = torch.cat([input_ids.long(), new], dim=1)
        if not output_logits:
            return sequences
        all_logits = torch.zeros((n, width, self.args.vocab_size))
        row = 0
        for lg in logits:
            all_logits[row:row + lg.shape[0], :lg.shape[1]] = lg
            row += lg.shape[0]
        return sequences, all_logits

    def begin_stats(self) -> None:
        """Start the figures of a generation call (`stats`); `end_stats` closes them."""
        self.stats = GenerationStats()
        self.tracker.reset_peaks()
        self.stats.held_memory = {t.value: v for t, v in self.tracker.current.items()}
        if self.device.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device.device)

    def end_stats(self) -> None:
        self._collect_memory()

    def generate_block(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *,
                       sampler, stopper: StopCriteria, recorder: Optional[LogprobRecorder] = None,
                       forced: Optional[torch.Tensor] = None, keep_logits: bool = False) -> Block:
        """Run one block of at most gbs x ngb left-padded rows (P tokens each).

        sampler, stopper and recorder are sized for the full block: rows past the real
        ones are padding (copies of the first row) and are marked done here. Returns the
        Block: output (B, steps), and the stopper's lengths and reasons per row.
        """
        if getattr(self, "weights", None) is None:
            raise FlexGenError("this model is closed; load it again with load_model")
        B = self.policy.block_size
        dev = self.device.device
        real, P = input_ids.shape
        if not 1 <= real <= B:
            raise FlexGenError(f"a block holds 1..{B} rows, got {real}")
        ids = input_ids.to(dev)
        mask = attention_mask.to(dev).bool()
        if real < B:  # pad the block with copies of its first row; callers trim them
            ids = torch.cat([ids, ids[:1].expand(B - real, -1)])
            mask = torch.cat([mask, mask[:1].expand(B - real, -1)])
        full_mask = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=dev)
        full_mask[:, :P] = mask
        block = Block(ids, full_mask, P, max_new_tokens, sampler=sampler, stopper=stopper, recorder=recorder,
                      keep_logits=keep_logits)
        if forced is not None:
            forced = forced.to(dev)
            block.forced = torch.cat([forced, forced[:1].expand(B - real, -1)]) if real < B else forced
        stopper.done[real:] = True   # padding rows never hold generation back
        self._bar_rows = real
        self._run_block(block)
        self.stats.generated_tokens += real * block.steps_done
        self.stats.prompt_tokens += real * P
        self.stats.num_sequences += real
        return block

    def score(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
              prompt_len: int = 1) -> torch.Tensor:
        """Log-probabilities of each token after the first `prompt_len`, given its prefix.

        Runs prefill on the first `prompt_len` tokens, then feeds the remaining ones one
        decode step at a time (teacher forcing), so the KV cache path, compression
        included, is exactly the one generation uses. Only the needed log-probabilities
        are gathered at each step (never the whole vocabulary's logits of a block).
        input_ids (n, L), left-padded in the prompt part. Returns (n, L - prompt_len) float32.
        """
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() != 2:
            raise FlexGenError(f"input_ids must be (batch, length), got {tuple(input_ids.shape)}")
        n, L = input_ids.shape
        if not 1 <= prompt_len < L:
            raise FlexGenError(f"prompt_len must be within [1, {L}), got {prompt_len}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = torch.as_tensor(attention_mask)
        G = L - prompt_len
        self._check_inputs(input_ids[:, :prompt_len], attention_mask[:, :prompt_len], G)
        B = self.policy.block_size
        out = torch.empty((n, G))
        self.begin_stats()
        for start in range(0, n, B):
            real = min(B, n - start)
            recorder = LogprobRecorder(B, G)
            self.generate_block(input_ids[start:start + B, :prompt_len], attention_mask[start:start + B, :prompt_len],
                                G, sampler=None, stopper=StopCriteria(B, [], [], self.args.pad_token_id,
                                                                      self.device.device),
                                recorder=recorder, forced=input_ids[start:start + B, prompt_len:])
            out[start:start + real] = recorder.token_logprob[:real]
        self.end_stats()
        return out

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> None:
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise FlexGenError("input_ids must be (batch, prompt_len) with batch >= 1 and prompt_len >= 1, "
                               f"got {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise FlexGenError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        P = input_ids.shape[1]
        if max_new_tokens < 1:
            raise FlexGenError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if P + max_new_tokens > self.args.max_position_embeddings:
            raise FlexGenError(f"prompt ({P}) + new tokens ({max_new_tokens}) exceed the model's "
                               f"{self.args.max_position_embeddings} positions")
        if attention_mask.shape != input_ids.shape:
            raise FlexGenError("attention_mask must have the shape of input_ids")
        # Padding after a row's tokens would sit between its prompt and its new tokens.
        m = attention_mask.bool()
        right = (~m[:, 1:] & m[:, :-1]).any(dim=1) | ~m.any(dim=1)
        if bool(right.any()):
            row = int(right.nonzero()[0])
            raise FlexGenError(f"prompts must be left-padded (padding before the tokens, as with a tokenizer's "
                               f"padding_side='left'); row {row} of attention_mask has padding after its tokens "
                               "or no tokens at all")
        if int(input_ids.max()) >= self.args.vocab_size or int(input_ids.min()) < 0:
            raise FlexGenError(f"token ids must be within [0, {self.args.vocab_size})")

    def _run_block(self, block: Block):
        p = self.policy
        max_len = block.prompt_len + block.max_new_tokens
        cache = hidden = None
        try:
            cache = KVCache(self.num_attention, p.num_gpu_batches, self.placement.cache, max_len,
                            self.args.kv_width, self.dtype, self.device, self.tracker, self.run_dir,
                            compress=p.compress_cache, cpu_cache_compute=p.cpu_cache_compute,
                            read_priority=self.read_priority)
            self.stats.cache_bytes = {t.value: n for t, n in cache.held.items()}
            row_bytes = block.prompt_len * self.args.hidden_size * torch.empty((), dtype=self.dtype).element_size()
            hidden = [HiddenSlot(self.placement.act, row_bytes, self.device, self.tracker,
                                 self.run_dir / f"hidden_{k}.bin", self.read_priority)
                      for k in range(p.num_gpu_batches)]
            files = cache.files + [h.file for h in hidden if h.file is not None]

            def disk_read() -> int:
                return self.weights.disk_bytes()[0] + sum(f.bytes_read for f in files)
            read0 = disk_read()
            self._disk_read, self._decode_read_from = disk_read, None
            self.scheduler.run(block, cache, hidden)
            self.stats.direct_io = _merge_direct(self.weights.direct_io, cache.direct_io)
            read1 = disk_read()
            self.stats.disk_read_bytes += read1 - read0
            if self._decode_read_from is not None:
                self.stats.decode_disk_read_bytes += read1 - self._decode_read_from
            self.stats.disk_write_bytes += sum(f.bytes_written for f in files)
        finally:
            self._disk_read = None
            if hidden:
                for h in hidden:
                    h.close()
            if cache is not None:
                cache.close()

    def _hook(self, name: str, seconds: float) -> None:
        self.stats.timings[name] += seconds
        if name == "prefill" and self._disk_read is not None:
            self._decode_read_from = self._disk_read()
        if name == "prefill":
            self.stats.prefill_time += seconds
        elif name == "decode":
            self.stats.decode_time += seconds
        if name in ("prefill", "decode") and self._bar is not None:
            self._bar.update(self._bar_rows)

    def _collect_memory(self):
        self.stats.peak_memory = self.tracker.report()
        self.stats.process_peak_rss = process_peak_rss()
        if self.device.is_cuda:
            self.stats.cuda_peak_allocated = torch.cuda.max_memory_allocated(self.device.device)
            self.stats.cuda_peak_reserved = torch.cuda.max_memory_reserved(self.device.device)

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Release memory and remove this run's offload files (the weight store stays)."""
        if getattr(self, "weights", None) is not None:
            self.weights.close()
            self.weights = None
        if getattr(self, "io", None) is not None:
            self.io.shutdown()
            self.io = None
        if getattr(self, "store", None) is not None:
            self.store.release()
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _StoreSlice:
    """The weight store seen from a pipeline stage whose layers start at `first`."""

    def __init__(self, store: WeightStore, first: int):
        self.store, self.first, self.dir = store, first, store.dir

    def layer_path(self, idx: int) -> Path:
        return self.store.layer_path(self.first + idx)

    def check_range(self, idx: int, *args):
        return self.store.check_range(self.first + idx, *args)

    def __getattr__(self, name):   # what is not per layer is the store's
        return getattr(self.store, name)


def _progress_bar(total: int, progress: bool):
    """Generated tokens over all blocks, with rate and ETA; on a terminal only (tqdm's None)."""
    from tqdm import tqdm
    return tqdm(total=total, unit="tok", desc="generating", leave=False, disable=None if progress else True)


def _merge_direct(*flags):
    known = [f for f in flags if f is not None]
    return all(known) if known else None


def load_model(model: str, policy: Optional[Policy] = None, *, device=None, dtype=None, offload_dir=None,
               dummy: bool = False, seed: int = 0, progress: bool = False, gpu_mem: Optional[float] = None,
               prompt_len: int = 1, gen_len: int = 1, verify_store: bool = False) -> FlexGenModel:
    """Place a model (OPT, LLaMA, Mistral, Qwen2: see models/registry.py) for generation.

    model: a named size (opt-1.3b, llama-3-8b, ..., with dummy=True), a Hugging Face checkpoint directory,
    or a Hugging Face id already in the local cache. device: "cuda" or "cpu" (default:
    cuda when available). dtype: default fp16 on CUDA, bf16 on a CPU that supports it,
    else fp32. offload_dir: where the weight store and run files go (default
    $FLEXGEN_OFFLOAD_DIR or ~/.cache/flexgen). gpu_mem: bytes of CUDA memory the run may
    reserve (a larger card is capped to it). prompt_len, gen_len: the longest run planned;
    memory (host, device, disk) is checked for them before anything is placed.
    verify_store: check every checksum of the weight store first (each array is always
    checked when it is first read).
    """
    policy = policy or Policy()
    dev = ComputeDevice(device)
    dev.limit_memory(gpu_mem)
    if isinstance(dtype, str):
        try:
            dtype = DTYPES[dtype]
        except KeyError:
            raise FlexGenError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None
    dtype = dtype or default_dtype(dev.device)
    if dtype == torch.float16 and not dev.is_cuda:
        raise FlexGenError("float16 compute on the CPU is about 1000x slower than bfloat16; use bfloat16 or float32")
    source = resolve_source(model, dummy, seed)
    if prompt_len + gen_len > source.args.max_position_embeddings:
        raise FlexGenError(f"prompt ({prompt_len}) + new tokens ({gen_len}) exceed the model's "
                           f"{source.args.max_position_embeddings} positions")
    root = Path(offload_dir).expanduser() if offload_dir else default_offload_dir()
    from flexgen import pipeline
    if pipeline.world_size() > 1:  # under torchrun: this process is one stage of a pipeline
        # (no whole-model preflight: a stage holds only its slice of the layers)
        return pipeline.load_stage(source.args, policy, dev, dtype, root, source, progress=progress,
                                   verify_store=verify_store)
    store_bytes = None
    if isinstance(source, CheckpointSource):
        key = WeightStore.key(source, dtype, policy.compress_weight)
        built = (root / "weights" / key / "manifest.json").is_file()
        store_bytes = 0 if built else sum(lay.file_bytes for lay in model_layouts(source.args, dtype,
                                                                                  policy.compress_weight))
    preflight.check(source.args, policy, prompt_len, gen_len, dev, dtype, root, store_bytes)
    return FlexGenModel(source.args, policy, dev, dtype, root, source, progress=progress,
                        verify_store=verify_store)


__all__ = ["FlexGenModel", "GenerationStats", "load_model", "default_offload_dir"]
