"""Measured GPU energy of a block of work, from NVML's per-board energy counters.

    with EnergyMeter() as meter:
        run_the_dump()
    meter.joules            # float, or None where no NVML-capable GPU is present
    meter.as_attributes()   # what the store writer records in the store's attributes

NVML counts a whole board's energy since the driver loaded (millijoules; Volta and newer), so the
reading includes anything else running on the same GPUs; ranks sharing a GPU would count it twice.
"""

from __future__ import annotations

from typing import Any


class EnergyMeter:
    """Context manager: energy used by the GPUs this process sees, between enter and exit.

    `devices` are torch CUDA indices (default: every visible device); they are matched to NVML
    boards by UUID, so `CUDA_VISIBLE_DEVICES` is respected."""

    def __init__(self, devices: list[int] | None = None) -> None:
        self.devices = devices
        self.joules: float | None = None
        self.reason = "not measured yet"
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._start_mj: list[int] = []

    def __enter__(self) -> "EnergyMeter":
        import torch

        if not torch.cuda.is_available():
            self.reason = "no CUDA GPU"
            return self
        try:
            import pynvml  # distribution nvidia-ml-py (extra "gpu")
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (pip install 'opt-microscope[gpu]')"
            return self
        try:
            pynvml.nvmlInit()
            devices = self.devices if self.devices is not None else list(range(torch.cuda.device_count()))
            uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in devices]
            self._handles = [pynvml.nvmlDeviceGetHandleByUUID(u if u.startswith("GPU-") else f"GPU-{u}")
                             for u in uuids]
            self._start_mj = [pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]
            self._nvml = pynvml
        except pynvml.NVMLError as exc:
            self.reason = f"NVML cannot report energy here: {exc}"
            self._nvml = None
        return self

    def __exit__(self, *exc_info) -> None:
        if self._nvml is None:
            return
        try:
            end_mj = [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]
            self.joules = sum(e - s for e, s in zip(end_mj, self._start_mj)) / 1000.0
            self.reason = "measured"
        except self._nvml.NVMLError as exc:
            self.reason = f"NVML stopped reporting energy: {exc}"
        finally:
            self._nvml.nvmlShutdown()

    @property
    def kwh(self) -> float | None:
        """Energy in kWh (1 kWh = 3.6e6 J), or None when not measured."""
        return None if self.joules is None else self.joules / 3.6e6

    def as_attributes(self) -> dict[str, Any]:
        """Store attributes: energy in joules (None when unmeasured), its source and the GPU count."""
        return {"energy_joules": self.joules, "energy_source": "nvml" if self.joules is not None else self.reason,
                "energy_gpus": len(self._handles)}
