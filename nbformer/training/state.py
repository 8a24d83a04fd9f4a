"""Flat parameter and gradient buffers (llm.c style) and the executor of one training step.

All parameters live in one float32 vector, gradients in another of the same layout, so the
optimizer is a single fused kernel over contiguous memory and checkpoints are one copy.
"""
from __future__ import annotations

import numpy as np

from .. import ops
from ..config import ModelConfig
from ..devices import get_device
from ..errors import InputError
from ..executor import Executor
from ..graph.build import build_train
from ..weights.params import flat_layout, param_shapes
from ..weights.positions import position_table


class FlatBuffers:
    """params / grads: (n,) float32 on a device; views[name] and grad_views[name] are shaped windows
    into them. On CUDA both buffers live in device memory: parameters are uploaded once, gradients
    written there by the backward graph, and only checkpoints and grads() copy back."""

    def __init__(self, cfg: ModelConfig, params: dict | None = None, device="cpu"):
        self.cfg, self.dev = cfg, get_device(device)
        self.shapes = param_shapes(cfg)
        self.offsets, n = flat_layout(self.shapes)
        self.n = n
        self.params = self.dev.zeros(n, np.float32)
        self.grads = self.dev.zeros(n, np.float32)
        self.views = {k: self._view(self.params, k) for k in self.shapes}
        self.grad_views = {k: self._view(self.grads, k) for k in self.shapes}
        if params is not None:
            self.load(params)
        self.consts = {}
        if cfg.sinusoidal:
            self.consts["pos_emb"] = self.dev.upload(position_table(cfg))

    @staticmethod
    def plan_bytes(cfg: ModelConfig) -> int:
        """Bytes of one flat buffer (parameters, or gradients, or one Adam moment)."""
        return 4 * flat_layout(param_shapes(cfg))[1]

    def _view(self, buf, name):
        off, size = self.offsets[name]
        return self.dev.view(buf, off, self.shapes[name])

    @property
    def num_parameters(self) -> int:
        return sum(size for _, size in self.offsets.values())

    def _pack(self, arrays: dict) -> np.ndarray:
        host = np.zeros(self.n, dtype=np.float32)
        for k, (off, size) in self.offsets.items():
            host[off: off + size] = np.asarray(arrays[k], dtype=np.float32).reshape(-1)
        return host

    def _unpack(self, flat_host: np.ndarray) -> dict:
        return {k: flat_host[off: off + size].reshape(self.shapes[k]).copy() for k, (off, size) in self.offsets.items()}

    def load(self, params: dict):
        if self.dev.kind == "cpu":
            for k, v in self.views.items():
                v[...] = params[k]
        else:
            self.dev.copy_in(self.params, self._pack(params))

    def state_dict(self) -> dict:
        """name -> host copy of each parameter."""
        if self.dev.kind == "cpu":
            return {k: v.copy() for k, v in self.views.items()}
        return self._unpack(self.dev.download(self.params))

    def grad_dict(self) -> dict:
        """name -> host copy of each gradient (one copy of the flat buffer on CUDA)."""
        if self.dev.kind == "cpu":
            return {k: v.copy() for k, v in self.grad_views.items()}
        return self._unpack(self.dev.download(self.grads))

    def zero_grads(self, names):
        """Gradients of parameters the graph never writes (e.g. positions past T) are zero."""
        for k in names:
            v = self.grad_views[k]
            if self.dev.kind == "cpu":
                v[...] = 0.0
            else:
                self.dev.copy_in(v, np.zeros(v.shape, np.float32))


class StepRunner:
    """Forward + loss + backward executors for one (B, T), bound to FlatBuffers.

    run_lm(ids, targets, mask) -> mean loss; gradients land in flat.grads.
    """

    def __init__(self, flat: FlatBuffers, B: int, T: int, loss: str = "lm", dropout: float = 0.0,
                 attn_dropout: float | None = None, label_smoothing: float = 0.0, ignore_index: int = -100,
                 backward: bool = True, S: int | None = None):
        """Encoder-decoders: S is the source length, T the decoder length; run_lm then takes src."""
        self.flat, self.B, self.T, self.S, self.loss = flat, B, T, S, loss
        self.ignore_index = ignore_index
        self.graph, self.grad_names = build_train(flat.cfg, B, T, loss=loss, dropout=dropout,
                                                  attn_dropout=attn_dropout, label_smoothing=label_smoothing,
                                                  ignore_index=ignore_index, backward=backward, S=S)
        bound = dict(flat.views)
        bound.update(flat.consts)
        for p, gname in self.grad_names.items():
            bound[gname] = flat.grad_views[p]
        self.untouched = [p for p in flat.shapes if p not in self.grad_names]  # get zero gradients
        self.executor = Executor(self.graph, bound, flat.dev)
        self.needs_seed = "dropout_seed" in self.graph.inputs
        self._mean_loss = ops.get("mean_loss", flat.dev.kind)

    def _inputs(self, ids, mask, type_ids=None, seed: int = 0) -> dict:
        B, T = ids.shape
        inputs = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64),
                  "key_mask": np.ascontiguousarray(mask, dtype=np.uint8)}
        cfg = self.flat.cfg
        if cfg.positions != "none":
            inputs["position_ids"] = np.ascontiguousarray(np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)))
        if cfg.type_vocab_size:
            inputs["token_type_ids"] = (np.zeros((B, T), np.int64) if type_ids is None
                                        else np.ascontiguousarray(type_ids, dtype=np.int64))
        if self.needs_seed:
            inputs["dropout_seed"] = np.array([seed], dtype=np.int64)
        return inputs

    def run_lm(self, ids, targets, mask=None, seed: int = 0, src_ids=None, src_mask=None) -> tuple:
        """-> (mean loss over non-ignored targets, number of those targets).
        Encoder-decoders: ids is the decoder input, src_ids/src_mask (B, S) the source."""
        inputs, n_valid = self._lm_inputs(ids, targets, mask, seed, src_ids, src_mask)
        losses = self.executor.run(inputs, copy_outputs=False, outputs=["losses"])["losses"]
        return float(np.sum(losses, dtype=np.float64) / max(n_valid, 1)), n_valid

    def run_lm_into(self, stats, slot: int, ids, targets, mask=None, seed: int = 0, src_ids=None,
                    src_mask=None) -> int:
        """run_lm with the mean loss left on the device in stats[slot, 0] (float64 (K, 2) array of the
        flat buffers' device): a step that reads nothing back. -> the number of non-ignored targets."""
        inputs, n_valid = self._lm_inputs(ids, targets, mask, seed, src_ids, src_mask)
        losses = self.executor.run(inputs, outputs=["losses"], on_device=True)["losses"]
        self._mean_loss(stats=stats, slot=slot, losses=losses, count=n_valid)
        return n_valid

    def _lm_inputs(self, ids, targets, mask, seed, src_ids, src_mask) -> tuple:
        if mask is None:
            mask = np.ones(ids.shape, np.uint8)
        targets = np.ascontiguousarray(targets, dtype=np.int64)
        valid = targets != self.ignore_index
        n_valid = int(valid.sum())
        bad = valid & ((targets < 0) | (targets >= self.flat.cfg.vocab_size))
        if bad.any():
            raise InputError(f"labels: value {int(targets[bad][0])} is outside [0, {self.flat.cfg.vocab_size}) "
                             f"and is not the ignore index {self.ignore_index}")
        inputs = self._inputs(ids, mask, seed=seed)
        if self.S is not None:
            if src_ids is None:
                raise InputError("run_lm: an encoder-decoder step needs src_ids")
            B, S = src_ids.shape
            inputs["src_ids"] = np.ascontiguousarray(src_ids, dtype=np.int64)
            inputs["src_mask"] = np.ascontiguousarray(np.ones((B, S), np.uint8) if src_mask is None else src_mask,
                                                      dtype=np.uint8)
            if self.flat.cfg.positions != "none":
                inputs["src_pos"] = np.ascontiguousarray(np.broadcast_to(np.arange(S, dtype=np.int64), (B, S)))
        inputs["targets"] = targets
        inputs["loss_scale"] = np.array([1.0 / max(n_valid, 1)], dtype=np.float32)
        self.flat.zero_grads(self.untouched)
        return inputs, n_valid

    def run_vjp(self, ids, grad_output, mask=None, type_ids=None) -> np.ndarray:
        """Gradients of sum(output * grad_output) w.r.t. the parameters; returns the output."""
        if mask is None:
            mask = np.ones(ids.shape, np.uint8)
        inputs = self._inputs(ids, mask, type_ids)
        inputs["grad_output"] = np.ascontiguousarray(grad_output, dtype=np.float32)
        self.flat.zero_grads(self.untouched)
        return self.executor.run(inputs)[self.graph.outputs[0]]
