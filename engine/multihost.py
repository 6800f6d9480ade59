"""One replica over several hosts: process 0 schedules and serves; every process runs the same step.

`jax.distributed.initialize` joins the processes into one global device list, so the tensor-parallel
mesh spans hosts and XLA's collectives cross them. Only process 0 has a scheduler: before each step
it broadcasts a small header (which compiled variant to run) and then the step's host arrays; the
other processes (`follow`) receive them and call the same jitted functions, so every collective
has all its participants. A STOP header ends the followers.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from engine.config import ParallelConfig

OP_STOP, OP_STEP, OP_ROLLBACK = 0, 1, 2
# op, token bucket, num_rows, use_penalties, use_filters, num_top, copies bucket (0: none), greedy_only, use_mask,
# prompt logprobs wanted, their top k, logit-bias entries per row (0: none), the attention kernel (decode_only 1 or
# 0; -1: None), recurrent-state copies (1: [2, max_running] of them; 0: none)
_HEADER_LEN = 14


_joined = False  # jax.distributed can be initialized once per process


def initialize(cfg: ParallelConfig) -> None:
    """Joins this process to the others of its replica (no-op for one process, or when already joined)."""
    global _joined
    if cfg.num_processes == 1 or _joined:
        return
    import jax

    if cfg.coordinator_address is None:
        raise ValueError("parallel.coordinator_address (host:port of process 0) is required when parallel.num_processes > 1")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices' collectives across processes
    jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    _joined = True


def is_leader() -> bool:
    import jax

    return jax.process_index() == 0


def _broadcast(tree):
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(tree)


class Followers:
    """The leader's side: announce each step to the other processes."""

    def lead(self, step):
        header = np.array([OP_STEP, step.inputs.tokens.shape[0], step.num_rows, step.use_penalties, step.use_filters,
                           step.num_top, 0 if step.copies is None else step.copies[0].shape[0], step.greedy_only,
                           step.use_mask, step.prompt_targets is not None, step.prompt_top,
                           0 if step.sampling.bias_ids is None else step.sampling.bias_ids.shape[1],
                           -1 if step.decode_kernel is None else int(step.decode_kernel),
                           step.state_copies is not None], np.int32)
        _broadcast(header)
        inputs, sampling, copies, targets, state_copies = _broadcast(
            (step.inputs, step.sampling, step.copies, step.prompt_targets, step.state_copies))
        return dataclasses.replace(step, inputs=inputs, sampling=sampling, copies=copies, prompt_targets=targets,
                                   state_copies=state_copies)

    def rollback(self, pairs: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Recurrent-state copies the engine makes between steps (speculative decoding's rollbacks), [2, max_running]."""
        _broadcast(np.array([OP_ROLLBACK] + [0] * (_HEADER_LEN - 1), np.int32))
        return _broadcast(pairs)

    def stop(self) -> None:
        _broadcast(np.array([OP_STOP] + [0] * (_HEADER_LEN - 1), np.int32))


def follow(runner) -> None:
    """A follower's loop: run every step the leader announces, until it says stop."""
    from engine import sampler, structured
    from engine.runner import StepArrays

    while True:
        header = np.asarray(_broadcast(np.zeros(_HEADER_LEN, np.int32)))
        (op, num_tokens, num_rows, use_penalties, use_filters, num_top, num_copies, greedy_only, use_mask, use_prompt,
         prompt_top, num_bias, decode_kernel, state_copies) = (int(x) for x in header)
        if op == OP_STOP:
            return
        empty_state_copies = (np.zeros(runner.max_seqs, np.int32), np.zeros(runner.max_seqs, np.int32))
        if op == OP_ROLLBACK:
            runner.copy_states(_broadcast(empty_state_copies))
            continue
        template = (
            runner._pack_padding(num_tokens),
            sampler.build_inputs([], num_rows, runner.cfg.vocab_size, bool(use_penalties),
                                 np.zeros((num_rows, structured.mask_words(runner.cfg.vocab_size)), np.int32)
                                 if use_mask else None,
                                 num_bias=num_bias),
            (np.zeros(num_copies, np.int32), np.zeros(num_copies, np.int32)) if num_copies else None,
            np.zeros(num_tokens, np.int32) if use_prompt else None,
            empty_state_copies if state_copies else None,
        )
        inputs, sampling, copies, targets, states = _broadcast(template)
        runner.execute(StepArrays(inputs, sampling, copies, num_rows, bool(use_penalties), bool(use_filters), num_top,
                                  bool(greedy_only), bool(use_mask), targets, prompt_top,
                                  decode_kernel=None if decode_kernel < 0 else bool(decode_kernel),
                                  state_copies=states))
