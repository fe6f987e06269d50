"""Low-VRAM training: block weights that live in pinned CPU memory and stream onto the GPU just before use.

The Linear weights of the swapped blocks stay in page-locked CPU memory for the run. When block ``i`` is about to
run, its weights are already on the way: the copy was issued on a side stream while the block before it ran, and
the compute stream only waits for that copy's event. The order of blocks is learned from the first step (forward
0..N-1, then N-1..0 again when checkpointing recomputes in backward), so every later copy starts one block ahead.

A block's GPU copy is released only when another block is entered. By then everything that used it, the backward
of a recomputed block included, has been queued, and ``record_stream`` keeps the memory until those kernels ran.
That is also why swapping needs gradient checkpointing: without it, the backward of block ``i`` runs long after
the block was released.
"""
from __future__ import annotations

import contextlib

import torch


def _weights(block: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The frozen base tensors of a block's ComfyUI ops (its Linears); adapters (plain torch Linears) stay."""
    found = []
    for module in block.modules():
        if hasattr(module, "comfy_cast_weights"):
            for name in ("weight", "bias"):
                p = getattr(module, name, None)
                if isinstance(p, torch.nn.Parameter) and not p.requires_grad:
                    found.append(p)
    return found


class BlockSwap:
    def __init__(self, blocks: list[torch.nn.Module], whole: list[int], device: torch.device, copy_stream: bool = True):
        """Streams every base weight of the blocks in ``whole``, and in the other blocks those that ComfyUI left
        off the GPU (a partial, low-VRAM load); weights ComfyUI loaded onto the GPU elsewhere stay there. Without
        ``copy_stream`` the copies go on the compute stream (no overlap): a diagnostic for races."""
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda and copy_stream else None
        self.params: dict[int, list[torch.nn.Parameter]] = {}
        self.home: dict[int, list[torch.Tensor]] = {}  # pinned CPU copies, one per parameter
        self.restore_to: list[tuple[torch.nn.Parameter, torch.Tensor | None]] = []  # (param, original CPU tensor or None)
        self.loaded: dict[int, tuple[list[torch.Tensor], object]] = {}  # block -> (device copies, copy-done event)
        self.following: dict[tuple, int] = {}
        self.recent: tuple = (None, None)
        for i, block in enumerate(blocks):
            params = [p for p in _weights(block) if i in whole or p.device != device]
            if not params:
                continue
            homes = []
            for p in params:
                on_device = p.device.type == device.type and p.device.type != "cpu"
                home = torch.empty(p.shape, dtype=p.dtype, pin_memory=self.cuda)
                home.copy_(p.data)
                self.restore_to.append((p, None if on_device else p.data))
                p.data = home  # frees the GPU copy ComfyUI loaded
                homes.append(home)
            self.params[i], self.home[i] = params, homes

    def _fetch(self, i: int) -> None:
        if i in self.loaded or i not in self.params:
            return
        if self.cuda and self.stream is None:
            copies, event = [h.to(self.device, non_blocking=True) for h in self.home[i]], None
        elif self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # memory it reuses is free by then
            with torch.cuda.stream(self.stream):
                copies = [h.to(self.device, non_blocking=True) for h in self.home[i]]
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            copies, event = [h.clone() for h in self.home[i]], None
        self.loaded[i] = (copies, event)

    def _release(self, i: int) -> None:
        self.loaded.pop(i)
        for p, home in zip(self.params[i], self.home[i]):
            p.data = home

    def enter(self, i: int) -> None:
        """Block ``i`` is about to run: make its weights the device copies and start fetching the next block."""
        before, last = self.recent
        if last is not None:
            self.following[(before, last)] = i
        self.recent = (last, i)
        upcoming = self.following.get(self.recent)
        for j in [j for j in self.loaded if j not in (i, upcoming)]:
            self._release(j)
        if i in self.params:
            self._fetch(i)
            copies, event = self.loaded[i]
            if event is not None:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(event)
                for c in copies:
                    c.record_stream(compute)
            for p, c in zip(self.params[i], copies):
                p.data = c
        if upcoming is not None:
            self._fetch(upcoming)

    def restore(self) -> None:
        """Every parameter back where ComfyUI put it: device-loaded ones copied back, the others as they were."""
        for i in list(self.loaded):
            self._release(i)
        for p, original in self.restore_to:
            p.data = original if original is not None else p.data.to(self.device, non_blocking=self.cuda)
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()  # the pinned copies may be freed after this


@contextlib.contextmanager
def block_swap(model: torch.nn.Module, first_blocks: int, device: torch.device, copy_stream: bool = True):
    """Stream the first ``first_blocks`` blocks (execution order: double, then single) and every block weight
    ComfyUI left on the CPU; yields the BlockSwap, or None when there is nothing to stream. Restores on exit."""
    blocks = list(model.double_blocks) + list(model.single_blocks)
    if first_blocks > len(blocks):
        raise ValueError(f"blocks_to_swap is {first_blocks}, but this model has {len(blocks)} blocks; set "
                         f"blocks_to_swap to {len(blocks)} or less")
    off_device = any(p.device != device for b in blocks for p in _weights(b))
    if first_blocks == 0 and not off_device:
        yield None
        return
    swap = BlockSwap(blocks, list(range(first_blocks)), device, copy_stream)
    try:
        yield swap
    finally:
        swap.restore()
