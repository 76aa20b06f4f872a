"""A CPU-only model actor for a local NDIF 0.1.2 server.

The stock actor (``ndif.services.ray.deployments.modeling.base.ModelActor``)
assumes CUDA: it pins a GPU, caps per-process CUDA memory, dispatches the
weights onto ``cuda:N``, calls ``torch.cuda.synchronize()`` after every request
and refuses to start unless every tensor sits on a CUDA device. On a CPU-only
torch build each of those raises.

This subclass keeps everything else (request handling, timeouts, result upload,
status responses) and only replaces the device-specific parts:

* the GPU allocation the controller injects (it believes in one fake GPU, see
  ``up.sh``: ``--num-gpus=1`` and a ``cuda_memory_bytes`` resource) is ignored;
* the weights load on CPU in the deployment's dtype (float32 here);
* no CUDA calls on cleanup; HOT<->WARM parking is disabled (``CACHEABLE``).

Selected by ``NDIF_MODEL_IMPORT_PATH=ndif_cpu_actor.CPUModelActor`` on the Ray
head / controller and by ``actor_class`` in ``models.yaml``. The module must be
importable by Ray workers: ``up.sh`` puts this directory on ``PYTHONPATH``
before ``ray start``.
"""

import gc
import logging
import os
import time
from typing import Any

import ray
import torch
from ndif.common.metrics import ModelLoadTimeMetric
from ndif.common.telemetry import elapsed_ms
from ndif.services.ray.deployments.modeling.base import BaseModelDeployment

logger = logging.getLogger("ndif.modeling")


class CPUModelDeployment(BaseModelDeployment):
    """``BaseModelDeployment`` with the weights on CPU."""

    # Parking (HOT->WARM) means "move the weights to CPU": meaningless here.
    # False makes the controller evict a replica outright instead.
    CACHEABLE: bool = False

    def __init__(
        self,
        model_key: str,
        execution_timeout: float | None = None,
        gpu_mem_bytes_by_id: dict[int, int] | None = None,
        dtype: str = "float32",
        **kwargs: Any,
    ) -> None:
        # Keep what the controller assigned for reference only; the base class
        # gets an empty map so none of its per-GPU helpers touch torch.cuda.
        self.assigned_gpu_mem_bytes_by_id = dict(gpu_mem_bytes_by_id or {})
        threads = os.environ.get("NDIF_CPU_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        super().__init__(
            model_key,
            execution_timeout=execution_timeout,
            gpu_mem_bytes_by_id={},
            dtype=dtype,
            **kwargs,
        )

    def load_from_disk(self):
        from nnsight.modeling.huggingface import HuggingFaceModel

        started_at = time.time()
        model = HuggingFaceModel.from_model_key(
            self.model_key,
            dispatch=True,
            dtype=self.dtype_name,
            **self.kwargs,
        )
        model._module.requires_grad_(False)
        model._module.eval()
        logger.info(f"Loaded {self.model_key} on CPU ({self.dtype_name})")
        ModelLoadTimeMetric.update(
            model_key=self.model_key,
            duration_ms=elapsed_ms(started_at),
            load_type="initial",
            num_gpus=0,
        )
        return model

    async def to_cache(self) -> None:
        # Already on CPU. Only stop whatever is running, like the base class.
        from ndif.services.ray.deployments.modeling.base import KILL_REASON_PREEMPTED

        await self.cancel(KILL_REASON_PREEMPTED)
        self.cached = True

    def from_cache(self, gpu_mem_bytes_by_id: dict[int, int]) -> None:
        self.assigned_gpu_mem_bytes_by_id = dict(gpu_mem_bytes_by_id or {})
        self.cached = False

    def cleanup(self) -> None:
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()


@ray.remote(num_cpus=1, max_restarts=-1)
class CPUModelActor(CPUModelDeployment):
    """The Ray actor class the controller deploys (see module docstring)."""

    pass
