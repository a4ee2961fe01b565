"""The built-in models a definition can name (``model = "edu"``), name → factory.

A factory is called as ``factory(spec, context)`` and returns a
:class:`~vfiofs.models.api.DeviceModel`. Any other model is named by its import path,
``model = "package.module:Class"`` (see docs/models.md).
"""

from __future__ import annotations

from typing import Callable

from vfiofs.models.api import DeviceModel
from vfiofs.models.edu import EduDevice
from vfiofs.models.ioat import IoatDevice
from vfiofs.models.uart import Uart16550

ModelFactory = Callable[..., DeviceModel]

#: model name → factory taking ``(spec, context=None)``
BUILTIN_MODELS: dict[str, ModelFactory] = {
    "generic": DeviceModel,  # pure data: BAR memory and declared registers
    "ram": DeviceModel,  # the same, with the [ram] shorthand for one mappable BAR0
    "edu": EduDevice,  # QEMU's edu teaching device
    "uart16550": Uart16550,  # a 16550 UART like Linux's mtty sample, with a host port
    "ioat": IoatDevice,  # an Intel I/OAT DMA engine (Skylake CBDMA), one channel
}
