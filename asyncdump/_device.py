"""Staging of CUDA batches: convert on the GPU, copy without a host sync, hand on when done.

    CUDA tensor   converted on its device to uint8 (or uint16) HWC in the encoder's channel
                  order (RGB for fpng, BGR for OpenCV), then ``copy_(non_blocking=True)`` into
                  the page-locked buffer, and an event recorded on the current stream.
    CopyWaiter    one thread that sleeps on each copy's event, then hands the staged part on
                  to the collector; it starts with the first CUDA batch a sink sees.

Like ``_staging``, it never imports torch itself before a CUDA tensor has arrived.
"""

from __future__ import annotations

import math
import queue
import threading
import warnings
from collections.abc import Callable
from typing import Any

from ._buffer import SharedBuffer
from ._staging import Batch, Conversion, torch_module


class DeviceStager:
    """Converts CUDA batches on their device and copies them into the pinned buffer.

    Caches mean/std as device tensors per device (creating them synchronises once).
    """

    def __init__(self, conversion: Conversion):
        self.conversion = conversion
        self._affine: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._orders: dict[tuple[str, int], Any] = {}  # BGR(A) channel index per device

    def stage(self, batch: Batch, start: int, stop: int, buffer: SharedBuffer, offset: int,
              rgb: bool) -> tuple[Any, Any]:
        """Convert images ``start:stop`` and start their copy to ``offset`` of the buffer.

        Returns the converted tensor (keep it alive until the copy is done) and the event that
        completes the copy.
        """
        torch = torch_module()
        converted = self.to_hwc(batch, start, stop, rgb=rgb)
        self._pin_once(buffer, converted.device)
        destination = buffer.torch_view(offset, (stop - start) * batch.image_bytes)
        destination.view(converted.dtype).view(converted.shape).copy_(converted, non_blocking=True)
        event = torch.cuda.Event(blocking=True)  # a blocking event: waiting on it sleeps
        event.record(torch.cuda.current_stream(converted.device))
        return converted, event

    @staticmethod
    def _pin_once(buffer: SharedBuffer, device: Any) -> None:
        if buffer.is_pinned:
            return
        torch = torch_module()
        with torch.cuda.device(device):
            try:
                buffer.pin_for_cuda()
            except RuntimeError as exc:
                warnings.warn(f"{exc}; GPU copies into the buffer will be synchronous",
                              RuntimeWarning, stacklevel=5)

    def to_hwc(self, batch: Batch, start: int, stop: int, rgb: bool) -> Any:
        """Images ``start:stop`` as a contiguous uint8 NHWC tensor (uint16 for 16-bit input) in
        the encoder's order: RGB(A) for fpng (``rgb``), BGR(A) for OpenCV. One permute-copy."""
        torch = torch_module()
        x = batch.source[start:stop]
        if x.dtype.is_floating_point:
            x = x.float()
            if self.conversion.std is not None:
                std, mean = self._device_affine(x.device, batch.channels)
                x = x * std + mean
            # NaN -> -inf before the first clamp: NaN ends as 0 whatever a clamp does with NaN
            x = torch.nan_to_num(x, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
            lo, hi = self.conversion.value_range
            if (lo, hi) != (0.0, 1.0):
                x = x.clamp_(lo, hi).sub_(lo).div_(max(hi - lo, 1e-5))
            x = x.mul_(255.0).add_(0.5).clamp_(0.0, 255.0).to(torch.uint8)
        elif x.dtype == torch.bool:
            x = x.to(torch.uint8).mul_(255)
        hwc = x.permute(0, 2, 3, 1)
        if rgb or batch.channels == 1:
            return hwc.contiguous()
        order = self._bgr_index(x.device, batch.channels)
        return hwc.index_select(3, order).contiguous()  # one gather: layout and order at once

    def _bgr_index(self, device: Any, channels: int) -> Any:
        key = (str(device), channels)
        if key not in self._orders:
            torch = torch_module()
            order = [2, 1, 0] if channels == 3 else [2, 1, 0, 3]
            self._orders[key] = torch.tensor(order, device=device)
        return self._orders[key]

    def _device_affine(self, device: Any, channels: int) -> tuple[Any, Any]:
        key = (str(device), channels)
        if key not in self._affine:
            torch = torch_module()
            rule = self.conversion.for_channels(channels)
            shape = (1, channels, 1, 1)
            self._affine[key] = (
                torch.tensor(rule.std, dtype=torch.float32, device=device).view(shape),
                torch.tensor(rule.mean, dtype=torch.float32, device=device).view(shape),
            )
        return self._affine[key]


class CopyWaiter:
    """A thread that waits for each device-to-host copy, then calls ``hand_on(jobs)``.

    A failed copy calls ``on_error`` (nothing staged after it can be trusted); its jobs are
    still handed on, so the collector fails them rather than losing them.
    """

    def __init__(self, hand_on: Callable[[list[Any]], None],
                 on_error: Callable[[BaseException], None]):
        self._hand_on = hand_on
        self._on_error = on_error
        self._copies: queue.Queue[tuple[list[Any], Any, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="asyncdump-events", daemon=True)
        self._thread.start()

    def put(self, jobs: list[Any], event: Any, keepalive: Any) -> None:
        """Hand ``jobs`` on once ``event`` has completed; ``keepalive`` is the copy's source."""
        self._copies.put((jobs, event, keepalive))

    def close(self) -> None:
        """Hand on every copy already put, then end the thread."""
        self._copies.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._copies.get()
            if item is None:
                return
            jobs, event, _keepalive = item
            try:
                event.synchronize()  # a blocking event: this thread sleeps, the GIL is released
            except BaseException as exc:
                self._on_error(exc)
            del item, _keepalive  # the source tensor may be freed now
            self._hand_on(jobs)
