"""Block inputs that wait in host memory between a training step's forward and its backward.

With each block recomputed in backward, what a step keeps on the GPU through its forward is mostly the blocks'
inputs: at 1024x1024 with 512 text tokens 4,608 tokens x 3,072 x bf16 = 28 MB a block, 1.6 GB for Flux's 57.
Each input is used twice: by its block's forward, and by that block's backward, which recomputes the block from
it. In between, its bytes go to page-locked host memory and its GPU memory is freed; the tensor object stays,
with a storage of size 0, in the autograd graph that saved it.

- Forward: once block ``i`` is queued, a side stream copies its inputs out (after the compute stream's work so
  far). Their GPU memory is released at the next block, once the compute stream has waited for that copy; by then
  it has run, overlapped with block ``i + 1``.
- Backward: a pre-hook on the block's backward node waits for the copy back of block ``i``'s inputs and starts
  the copy of the block before it, so each copy overlaps the backward of the block after it.

All memory is allocated and freed on the compute stream, and the side stream only ever waits for events: no
``record_stream``, whose frees a CUDA graph capture defers to its end (core.step_graphs captures whole steps,
these copies included; the page-locked buffers are kept for the session, so their addresses hold).

Copies go through the storage (a uint8 view of it) and never through the saved tensor, so autograd's version
counter of the saved tensor is untouched. The last blocks' inputs stay on the GPU: backward needs them first.
On the CPU (tests) the same steps run synchronously, without streams.
"""
from __future__ import annotations

import contextlib

import torch


def _bytes_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class _Parked:
    def __init__(self, tensors: list[torch.Tensor], hosts: list[torch.Tensor]):
        self.tensors = tensors
        self.hosts = hosts
        self.out = None  # event of the copy out (CUDA)
        self.back = None  # event of the copy back (CUDA), or True once copied back synchronously


class BlockInputOffload:
    KEEP_LAST = 1  # blocks whose inputs stay on the device: the last block's backward comes first

    def __init__(self, device: torch.device, blocks: int):
        """``blocks``: blocks per forward."""
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.offloaded_below = blocks - self.KEEP_LAST
        # page-locked buffers per block and input size, reused across steps and never replaced: a captured step
        # (core.step_graphs) copies into these very addresses whatever steps of other sizes ran in between
        self.hosts: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self.parked: dict[int, _Parked] = {}
        self.copying: list[_Parked] = []  # copied out (or being copied), GPU memory not yet released

    def _side_stream(self):
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def _side_waits_for_compute(self) -> None:
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def _compute_waits_for(self, event) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(event)

    def park(self, index: int, inputs: tuple[torch.Tensor, ...], outputs: tuple[torch.Tensor, ...]) -> None:
        """Block ``index`` has been queued on ``inputs`` and produced ``outputs``: move its inputs out until its
        backward begins."""
        if index == 0:  # a new forward: whatever an abandoned one left is garbage
            self.parked.clear()
            self.copying.clear()
        self._release_copied()
        grad_fn = next((o.grad_fn for o in outputs if o.grad_fn is not None), None)
        if grad_fn is None:
            return
        # every block's backward fetches ahead, also the kept last ones: the first parked block is then back in time
        grad_fn.register_prehook(lambda grad_outputs: self._before_backward(index))
        if index >= self.offloaded_below:
            return
        storages, seen = [], set()
        for t in inputs:
            s = t.untyped_storage()
            if s.data_ptr() == 0 or s.data_ptr() in seen or not s.resizable():
                continue
            seen.add(s.data_ptr())
            storages.append((t, s))
        if not storages:
            return
        key = (index, *(s.nbytes() for _, s in storages))
        hosts = self.hosts.get(key)
        if hosts is None:
            hosts = [torch.empty(s.nbytes(), dtype=torch.uint8, pin_memory=self.cuda) for _, s in storages]
            self.hosts[key] = hosts
        parked = _Parked([t for t, _ in storages], hosts)
        self._side_waits_for_compute()
        with self._side_stream():
            for (_, s), host in zip(storages, hosts):
                host.copy_(_bytes_view(s), non_blocking=self.cuda)
            if self.cuda:
                parked.out = torch.cuda.Event()
                parked.out.record(self.stream)
        self.parked[index] = parked
        self.copying.append(parked)

    def _release_copied(self) -> None:
        for parked in self.copying:
            self._compute_waits_for(parked.out)
            for t in parked.tensors:
                t.untyped_storage().resize_(0)
        self.copying.clear()

    def _fetch(self, index: int) -> None:
        parked = self.parked[index]
        if parked.back is not None:
            return
        for t, host in zip(parked.tensors, parked.hosts):
            t.untyped_storage().resize_(host.numel())  # allocated on the compute stream, which frees it after use
        self._side_waits_for_compute()  # the memory may be what compute-stream work queued so far still uses
        with self._side_stream():
            for t, host in zip(parked.tensors, parked.hosts):
                _bytes_view(t.untyped_storage()).copy_(host, non_blocking=self.cuda)
            parked.back = torch.cuda.Event() if self.cuda else True
            if self.cuda:
                parked.back.record(self.stream)

    def _before_backward(self, index: int) -> None:
        self._release_copied()
        if index in self.parked:
            self._fetch(index)
            self._compute_waits_for(self.parked.pop(index).back)
        earlier = [i for i in self.parked if i < index]
        if earlier:
            self._fetch(max(earlier))
