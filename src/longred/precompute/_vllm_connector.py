"""The KV connector that hands vLLM's extracted hidden states to the precompute job (one file per request).

vLLM imports this module in its worker processes (``kv_connector_module_path``); nothing else of longred
runs there. It is vLLM's ``ExampleHiddenStatesConnector`` (the ``extract_hidden_states`` method keeps
the requested layers in a cache-only layer; the connector copies a finished request's slots to a
safetensors file with the prompt's token ids) with one change: on a CPU engine the example's
asynchronous copy (a CUDA stream into pinned memory) fails (``pin_memory=True requires a CUDA
backend``), so the copy and the write are done synchronously there. On CUDA the example's own path runs.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    PendingSave,
    extract_from_kv_cache,
)

__all__ = ["HiddenStatesConnector"]


class _Written:
    """Stands for the example's copy-done CUDA event: the synchronous write has already finished."""

    @staticmethod
    def query() -> bool:
        return True


class HiddenStatesConnector(ExampleHiddenStatesConnector):
    """``ExampleHiddenStatesConnector`` with a synchronous copy and write on CPU engines."""

    def _submit_async_write(self, pending: PendingSave) -> None:
        if self._kv_cache is not None and self._kv_cache.device.type != "cpu":
            super()._submit_async_write(pending)
            return
        if not self._is_tp_rank_zero:
            return
        blocks_N1 = torch.tensor(pending.block_ids, dtype=torch.long).reshape(-1, 1)
        slots = (torch.arange(self._block_size).reshape(1, -1) + blocks_N1 * self._block_size).flatten()
        states_TSD = extract_from_kv_cache(self._kv_cache, slots, pending.token_ids.shape[0]).clone()
        os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
        try:
            save_file({"hidden_states": states_TSD, "token_ids": pending.token_ids.clone()}, pending.filename)
        finally:
            lock_fd = self._lock_fds.pop(pending.req_id, None)
            if lock_fd is not None:
                os.close(lock_fd)  # releases the reader's wait (load_hidden_states)
        self._req_copy_events[pending.req_id] = _Written()
