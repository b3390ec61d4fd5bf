"""The buffers of every module a closure runs, saved before its first forward pass and put
back afterwards: what lets a read-only evaluation (``LineSearchOptimizer.preview``,
``alsals.diagnostics.scan_direction``) leave BatchNorm's running statistics as they were
where the optimizer was given no ``buffers=``."""

from __future__ import annotations

from types import TracebackType

import torch
from torch import Tensor, nn

import alsals.closure
from alsals.closure import expanded


class TouchedBuffers:
    """Every buffer of the modules the closure runs, saved before the first forward pass that
    reaches each (and every module below it) and put back by ``restore``.

    A preview or a scan is read-only, but the optimizer protects only the buffers it was
    given (``buffers=``): without them their forward passes in training mode move
    BatchNorm's running statistics. A global forward pre-hook finds the modules whatever the
    closure calls, before their own pre-hooks run (``spectral_norm``'s power iteration
    updates its vectors in one). Every value that differs is copied back (compared, not
    judged by the version counter, which BatchNorm's kernel leaves as it was when it updates
    its running statistics in place); a buffer that a forward pass replaced by a new tensor
    (or filled where it was ``None``) gets the one it had back, but not one swapped in from
    outside the forward pass (``torch.func.functional_call``'s, which it puts back itself).
    Buffers of inference mode are left alone (nothing outside it can change them), and so
    are sparse ones (a graph's adjacency: no layer updates one as BatchNorm updates its
    statistics). Not seen: the buffers of a module whose ``forward`` is called directly
    rather than the module. Off where ``torch.compile`` has run (``active`` is then
    ``False``): a global hook would make compiled models recompile.
    """

    def __init__(self) -> None:
        self.active = not alsals.closure._compiled_anything()
        self._seen: dict[int, nn.Module] = {}  # (holds the modules: their ids stay theirs)
        # (module, name, the buffer as first seen or None, its copy)
        self._saved: list[tuple[nn.Module, str, Tensor | None, Tensor | None]] = []
        self._before: dict[int, dict[str, Tensor | None]] = {}  # a call's buffers, by module
        self._replaced: dict[tuple[int, str], Tensor] = {}  # what a forward pass put there
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> TouchedBuffers:
        if self.active:
            self._handles = [
                nn.modules.module.register_module_forward_pre_hook(self._save),
                nn.modules.module.register_module_forward_hook(self._after),
            ]
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self.restore()

    def _save(self, module: nn.Module, args: object) -> None:
        self._before[id(module)] = dict(module._buffers)
        if id(module) in self._seen:
            return
        for sub in module.modules():
            if id(sub) in self._seen:
                continue
            self._seen[id(sub)] = sub
            for name, buffer in sub._buffers.items():
                if buffer is None:
                    self._saved.append((sub, name, None, None))
                elif buffer.layout == torch.strided and not buffer.is_inference():
                    copy = buffer.detach().clone()
                    self._saved.append((sub, name, buffer, copy))

    def _after(self, module: nn.Module, args: object, output: object) -> None:
        before = self._before.pop(id(module), {})
        for name, buffer in module._buffers.items():
            if name in before and buffer is not before[name] and buffer is not None:
                self._replaced[(id(module), name)] = buffer

    @property
    def buffers(self) -> list[Tensor]:
        """The buffers saved so far (those of the modules the closure has run)."""
        return [b for _, _, b, _ in self._saved if b is not None and not expanded(b)]

    @torch.no_grad()
    def restore(self) -> None:
        for module, name, buffer, saved in self._saved:
            current = module._buffers.get(name)
            if current is not buffer and self._replaced.get((id(module), name)) is current:
                module._buffers[name] = buffer  # (the forward pass's replacement undone)
            if buffer is None or saved is None:
                continue
            if buffer.shape != saved.shape:  # (resized in forward: a lazy observer's)
                buffer.resize_(saved.shape)
            elif expanded(buffer) or torch.equal(buffer, saved):  # (no copy_ may write an
                continue  # expanded buffer, and no forward pass wrote it either)
            buffer.copy_(saved)
