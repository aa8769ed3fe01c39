"""``Engine``: continuous batching over a ``DecodeRunner`` — requests join and leave at any step.

Why continuous batching: a static batch runs as long as its longest request and leaves the slots of the
finished ones idle. Here every ``step()`` first admits waiting requests into free slots (prefilled together, which
yields their first token), then decodes every request that was already running in one ``runner.decode`` call
(one token each), whose tokens are read back in the next step, while the device runs that step's decode (see
``_step``). A request that finishes (a stop token, or ``max_new_tokens``) gives its slot and KV pages back
at once; a waiting one takes them in the next step.

Pages: a request is admitted (first come, first served) only when the free pages cover its whole life — prompt
plus ``max_new_tokens`` — on top of what the running requests may still take, so an admitted request normally
runs to the end and a waiting one waits until pages are freed. Should a running request still be unable to grow
(and no other running request can grow and later free pages), that request alone fails, with an error naming
it; the others' caches are never touched. Requests that could never fit are refused by ``add_request``.

Sampling (greedy, temperature, top-p, per-request seeds) lives in ``cohere_fx.runtime.sampling``. One thread
drives an engine: ``step()`` directly, or ``generate()`` / ``stream()``, which call it for you.
"""
import dataclasses
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from cohere_fx.runtime.paged_cache import to_device
from cohere_fx.runtime.sampling import SamplingParams, make_generator, sample_tokens


@dataclass(frozen=True)
class RequestOutput:
    """What one request produced in one step: its new ``token``, or, when it failed, ``error`` (token None)."""

    request_id: int
    token: int | None
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "error" once finished
    error: str | None = None


class RequestError(RuntimeError):
    """A request failed (``generate`` / ``stream``); ``request_id`` names it."""

    def __init__(self, message: str, request_id: int):
        super().__init__(message)
        self.request_id = request_id


@dataclass
class _Request:
    id: int
    prompt: torch.Tensor  # int64 [T] on the CPU
    params: SamplingParams  # stop_token_ids resolved
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    pending: int = 0  # tokens sampled on the device and not read back yet

    @property
    def to_feed(self) -> int:
        """Tokens the cache will still take: every generated token but the last is fed back."""
        return self.params.max_new_tokens - len(self.output_ids)


def _eos_ids(model) -> tuple[int, ...]:
    """The model's eos token(s), as HF ``generate`` stops on them: generation config first, then model config."""
    if model is None:
        return ()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return ()
    return (eos,) if isinstance(eos, int) else tuple(eos)


class Engine:
    """Continuous-batching generation over one ``DecodeRunner`` (slots = concurrent requests).

    ``Engine(model, max_batch=16, max_seq_len=4096, ...)`` builds a ``DecodeRunner`` with those arguments;
    ``Engine(runner)`` uses an existing, empty one. ``stop_token_ids`` is the default of requests whose
    ``SamplingParams.stop_token_ids`` is None; by default the model's eos token(s).
    """

    def __init__(self, runner_or_model, *, stop_token_ids: Sequence[int] | None = None, **runner_kwargs):
        if isinstance(runner_or_model, torch.nn.Module):
            from cohere_fx.runtime.decode_runner import DecodeRunner

            model, runner = runner_or_model, DecodeRunner(runner_or_model, **runner_kwargs)
        else:
            if runner_kwargs:
                raise TypeError(f"runner arguments {sorted(runner_kwargs)} are for Engine(model, ...); "
                                "this engine was given a runner")
            runner = runner_or_model
            model = getattr(runner, "model", None)
        busy = [slot for slot in range(runner.max_batch) if runner.length(slot)]
        if busy:
            raise ValueError(f"the runner's slots {busy} already hold sequences; the engine needs an empty runner")
        self.runner = runner
        self.stop_token_ids = _eos_ids(model) if stop_token_ids is None else tuple(stop_token_ids)
        self.max_request_tokens = self._longest_fitting_sequence()
        self._next_id = 0
        self._waiting: deque[_Request] = deque()
        self._running: dict[int, _Request] = {}  # slot -> request, in admission order
        self._free_slots = list(range(runner.max_batch))
        self._undelivered: list[RequestOutput] = []  # outputs made while generate/stream drove the engine
        self._last = torch.zeros(runner.max_batch, dtype=torch.long, device=runner.device)  # slot -> last token
        # the decode launched last step: its requests, their tokens (host copy in flight on CUDA), the copy's event
        self._in_flight: tuple[list[_Request], torch.Tensor, torch.cuda.Event | None] | None = None

    def _longest_fitting_sequence(self) -> int:
        """The most tokens one sequence can cache when it has every page (the runner is empty now)."""
        capacity, lo, hi = self.runner.free_blocks(), 0, self.runner.max_seq_len
        while lo < hi:  # blocks_needed grows with the token count: binary search
            mid = (lo + hi + 1) // 2
            if self.runner.blocks_needed(0, mid) <= capacity:
                lo = mid
            else:
                hi = mid - 1
        return lo

    # ---- requests in -----------------------------------------------------------------------------------------
    def add_request(self, prompt_ids, params: SamplingParams | None = None) -> int:
        """Queue a prompt (a sequence of token ids or an int tensor [T]); returns its request id.

        ValueError, naming the request, for an empty or out-of-vocabulary prompt, or one that with
        ``max_new_tokens`` exceeds the runner's ``max_seq_len`` or could never fit in the KV pages."""
        request_id = self._next_id
        self._next_id += 1
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"request {request_id}: params must be SamplingParams, got {type(params).__name__}")
        prompt = torch.as_tensor(prompt_ids).cpu()
        if prompt.dim() != 1 or prompt.numel() == 0 or prompt.is_floating_point() or prompt.is_complex() \
                or prompt.dtype == torch.bool:
            raise ValueError(f"request {request_id}: the prompt must be a non-empty 1-D sequence of token ids, "
                             f"got shape {tuple(prompt.shape)} of {prompt.dtype}")
        vocab = self.runner.vocab_size
        if prompt.min() < 0 or prompt.max() >= vocab:
            raise ValueError(f"request {request_id}: token ids must be in [0, {vocab}), got "
                             f"{prompt.min().item()}..{prompt.max().item()}")
        length, new = prompt.numel(), params.max_new_tokens
        if length + new > self.runner.max_seq_len:
            raise ValueError(f"request {request_id}: prompt of {length} tokens + max_new_tokens={new} exceeds the "
                             f"runner's max_seq_len={self.runner.max_seq_len}")
        if length + new - 1 > self.max_request_tokens:
            raise ValueError(f"request {request_id}: caching {length + new - 1} tokens needs more KV pages than the "
                             f"runner has (one sequence fits at most {self.max_request_tokens} tokens: raise "
                             "num_blocks)")
        if params.stop_token_ids is None:
            params = dataclasses.replace(params, stop_token_ids=self.stop_token_ids)
        seed = params.seed if params.seed is not None else int(torch.randint(2 ** 63 - 1, ()).item())
        self._waiting.append(_Request(request_id, prompt.long(), params, make_generator(seed)))
        return request_id

    def abort(self, request_id: int) -> bool:
        """Drop a waiting or running request (its slot and pages are freed); False if it is not in the engine."""
        for request in self._waiting:
            if request.id == request_id:
                self._waiting.remove(request)
                return True
        for request in self._running.values():
            if request.id == request_id:
                self._release(request)
                return True
        return False

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def idle(self) -> bool:
        """Nothing waiting, running or left to deliver: ``step()`` would return []."""
        in_flight = self._in_flight is not None and any(r.slot is not None for r in self._in_flight[0])
        return not (self._waiting or self._running or self._undelivered or in_flight)

    # ---- one step --------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Admit what fits, decode every request that was running: one output per request that moved."""
        outputs, self._undelivered = self._undelivered + self._step(), []
        return outputs

    def _step(self) -> list[RequestOutput]:
        """Admit, launch this step's decode, then read the tokens of the decode launched by the step before.

        Why one step late: reading tokens back waits for the device. Read right after the decode that makes them,
        the device would idle through the host work of the next step (bookkeeping, sampling setup, launches);
        read after the next decode is launched, that host work overlaps it. The next decode's input tokens never
        leave the device (``_last``). The cost: a request that stops on a token is known to have stopped one
        decode later, and that decode's token for it is dropped."""
        outputs: list[RequestOutput] = []
        running = list(self._running.values())
        self._admit(outputs)
        launched = self._launch(running, outputs)
        self._collect(outputs)
        self._in_flight = launched
        return outputs

    def _admit(self, outputs: list[RequestOutput]) -> None:
        if not (self._waiting and self._free_slots):
            return
        runner = self.runner
        reserved = sum(runner.blocks_needed(r.slot, r.to_feed) for r in self._running.values() if r.to_feed > 0)
        admitted = []
        while self._waiting and self._free_slots:
            request, slot = self._waiting[0], min(self._free_slots)
            life = request.prompt.numel() + request.params.max_new_tokens - 1
            need = runner.blocks_needed(slot, life)
            if need + reserved > runner.free_blocks():
                break  # first come, first served: it (and those behind it) wait for pages to be freed
            self._waiting.popleft()
            self._free_slots.remove(slot)
            request.slot = slot
            self._running[slot] = request
            admitted.append(request)
            reserved += need  # its prompt's pages too: the prefill below has not taken them yet
        if not admitted:
            return
        logits = runner.prefill_batch([r.slot for r in admitted], [r.prompt.to(runner.device) for r in admitted])
        tokens = sample_tokens(logits, [r.params for r in admitted], [r.generator for r in admitted])
        self._last[to_device([r.slot for r in admitted], runner.device)] = tokens
        for request, token in zip(admitted, tokens.tolist()):
            self._emit(request, token, outputs)

    def _launch(self, requests: list[_Request], outputs: list[RequestOutput]):
        """Decode one token for each request still running and short of ``max_new_tokens`` (counting tokens in
        flight); (requests, their sampled tokens, the event of their copy to the host on CUDA), or None if nothing
        was launched."""
        runner = self.runner
        while True:
            requests = [r for r in requests
                        if r.slot is not None and len(r.output_ids) + r.pending < r.params.max_new_tokens]
            grow, stalled, left = [], [], runner.free_blocks()
            for request in requests:
                need = runner.blocks_needed(request.slot, 1)
                (grow if need <= left else stalled).append(request)
                left -= need if need <= left else 0
            if grow or not stalled:
                break
            if self._in_flight is not None:  # its tokens may finish requests and free pages: read them first
                self._collect(outputs)
                continue
            # Nothing can grow, so nothing will finish and free pages: fail the newest stalled request.
            victim = stalled[-1]
            requests = [r for r in requests if r is not victim]
            self._fail(victim, f"request {victim.id} failed after {len(victim.output_ids)} token(s): its sequence "
                               f"({runner.length(victim.slot)} tokens cached) needs "
                               f"{runner.blocks_needed(victim.slot, 1)} more KV page(s), {runner.free_blocks()} are "
                               "free and no other running request can free any (raise num_blocks)", outputs)
        if not grow:
            return None
        slots = to_device([r.slot for r in grow], runner.device)
        logits = runner.decode([r.slot for r in grow], self._last[slots])
        tokens = sample_tokens(logits, [r.params for r in grow], [r.generator for r in grow])
        self._last[slots] = tokens
        for request in grow:
            request.pending += 1
        if tokens.device.type != "cuda":
            return grow, tokens, None
        # Copied to the host now, behind this decode and ahead of the next: read after the next decode is
        # launched, a plain .tolist() would queue behind that decode and wait for it.
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return grow, host, copied

    def _collect(self, outputs: list[RequestOutput]) -> None:
        """Emit the tokens of the decode in flight; those of requests that ended since (a stop token read in
        between, an abort, a failure) are dropped."""
        if self._in_flight is None:
            return
        requests, tokens, copied = self._in_flight
        self._in_flight = None
        if copied is not None:
            copied.synchronize()
        for request, token in zip(requests, tokens.tolist()):
            request.pending -= 1
            if request.slot is not None:
                self._emit(request, token, outputs)

    def _emit(self, request: _Request, token: int, outputs: list[RequestOutput]) -> None:
        request.output_ids.append(token)
        reason = ("stop" if token in request.params.stop_token_ids else
                  "length" if len(request.output_ids) == request.params.max_new_tokens else None)
        if reason:
            self._release(request)
        outputs.append(RequestOutput(request.id, token, reason is not None, reason))

    def _fail(self, request: _Request, error: str, outputs: list[RequestOutput]) -> None:
        self._release(request)
        outputs.append(RequestOutput(request.id, None, True, "error", error))

    def _release(self, request: _Request) -> None:
        self.runner.free(request.slot)
        del self._running[request.slot]
        self._free_slots.append(request.slot)
        request.slot = None

    # ---- driving it ------------------------------------------------------------------------------------------
    def _outputs_of(self, request_ids: set[int]) -> Iterator[RequestOutput]:
        """Steps until the requests finish, yielding their outputs; other requests' outputs wait for ``step()``."""
        unfinished = set(request_ids)
        while unfinished:
            outputs = self._step()
            self._undelivered += [o for o in outputs if o.request_id not in request_ids]
            for output in outputs:
                if output.request_id in request_ids:
                    if output.finished:
                        unfinished.discard(output.request_id)
                    yield output

    def generate(self, prompts: Sequence, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[list[int]]:
        """The generated tokens of each prompt (stop token included), run to completion with continuous batching.

        ``params``: one SamplingParams for all prompts or one per prompt. RequestError if a request failed."""
        per_prompt = params if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} SamplingParams")
        ids = []
        try:
            for prompt, p in zip(prompts, per_prompt):
                ids.append(self.add_request(prompt, p))
        except Exception:
            for request_id in ids:
                self.abort(request_id)
            raise
        tokens, errors = {i: [] for i in ids}, []
        for output in self._outputs_of(set(ids)):
            if output.error:
                errors.append(output)
            else:
                tokens[output.request_id].append(output.token)
        if errors:
            raise RequestError("; ".join(e.error for e in errors), errors[0].request_id)
        return [tokens[i] for i in ids]

    def stream(self, prompt_ids, params: SamplingParams | None = None) -> Iterator[int]:
        """Queue a prompt now (errors as ``add_request``) and yield its tokens as they are produced; requests
        added with ``add_request`` run alongside. Closing the iterator early aborts the request."""
        request_id = self.add_request(prompt_ids, params)

        def tokens():
            try:
                for output in self._outputs_of({request_id}):
                    if output.error:
                        raise RequestError(output.error, request_id)
                    yield output.token
            finally:
                self.abort(request_id)

        return tokens()
