"""A verl platform for CPU ranks: device ``cpu``, collectives on gloo, placed on Ray ``GPU`` slots.

verl 0.9.1 resolves every device question through ``verl.plugin.platform`` (device name, torch
device module, communication backend, Ray resources). Its built-in platforms are CUDA, NPU and
ROCm, and with no accelerator it falls back to "nvidia"; registering this class under the name
``cpu`` and selecting it (``VERL_PLATFORM=cpu`` or ``set_platform``) points those questions at
the CPU. No verl file is edited.

Placement is verl's GPU placement, unchanged: the platform names Ray's ``GPU`` resource, so
verl's placement groups have bundles ``{"CPU": 3, "GPU": 1}``
(``verl/single_controller/ray/base.py:144-149``, ``max_colocate_count=3`` of
``ResourcePoolManager``) and each worker asks ``num_gpus=1/3`` (``base.py:629``, ``:405``), which
Ray turns into 1 CPU held for the worker's lifetime (``ray/actor.py:2053-2056``). The test cluster
advertises *logical* GPUs (``num_gpus`` of ``ray.init`` / the cluster's nodes); nothing runs on a
GPU (the device is ``cpu``; Ray's ``CUDA_VISIBLE_DEVICES`` means nothing to a CPU torch).
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Any, Optional

import torch

from verl.plugin.platform.platform_base import PlatformBase

NAME = "cpu"


def _cpu_device_module() -> types.ModuleType:
    """``torch.cpu`` plus the allocator/seed calls verl makes on ``torch.<device>`` (no-ops or
    zeros on the CPU: there is no device allocator to query)."""
    mod = types.ModuleType("ta_opd_cpu_device")
    for name in dir(torch.cpu):
        if not name.startswith("_"):
            setattr(mod, name, getattr(torch.cpu, name))
    zero = lambda *a, **k: 0  # noqa: E731
    none = lambda *a, **k: None  # noqa: E731
    for name in ("max_memory_allocated", "max_memory_reserved", "memory_allocated", "memory_reserved"):
        setattr(mod, name, zero)
    for name in ("empty_cache", "reset_peak_memory_stats", "set_device", "ipc_collect", "synchronize"):
        setattr(mod, name, none)
    mod.manual_seed = torch.manual_seed
    mod.manual_seed_all = torch.manual_seed
    mod.is_available = lambda: True
    mod.device_count = lambda: 1
    mod.current_device = lambda: "cpu"
    mod.mem_get_info = lambda *a, **k: (0, 0)
    mod.get_device_name = lambda *a, **k: "CPU"  # verl's MFU table knows no CPU: promised FLOPs = inf
    mod.get_rng_state = torch.get_rng_state
    mod.set_rng_state = torch.set_rng_state
    return mod


class PlatformCPU(PlatformBase):
    _module = None

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self):
        if PlatformCPU._module is None:
            PlatformCPU._module = _cpu_device_module()
        return PlatformCPU._module

    def is_available(self) -> bool:
        return True

    def current_device(self):
        # verl moves tensors with ``.to(get_device_id())`` and builds ``torch.device(get_device_id())``:
        # the string "cpu" is valid in both places (an int would mean cuda:<int>)
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: Optional[int] = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "TA_OPD_CPU_VISIBLE_DEVICES"  # nothing to hide on a CPU

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        # verl's placement as on a GPU cluster: bundles {"CPU": 3, "GPU": 1} on logical GPUs
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}  # as verl's CUDA platform (platform_cuda.py:130-131)

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None
