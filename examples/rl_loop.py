#!/usr/bin/env python3
"""A policy-gradient loop in one process: RadixLM generates the rollouts, JAX trains on them, and the new weights go
back to the engine as device arrays (no host round trip, no recompilation). The engine sleeps while the trainer
runs, so the two can share one accelerator.

    .venv/bin/python examples/rl_loop.py --steps 3        # SmolLM2-135M-Instruct, the embedded default

The reward is a stand-in for a real reward model: how often an answer says `--target`. Each step samples
`--samples` answers per prompt, takes REINFORCE with the prompt's mean reward as baseline, and does one SGD step on
the answers' log-probabilities. The samples of one prompt share its prefill through the prefix cache.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from engine.llm import LLM  # noqa: E402
from engine.request import SamplingParams  # noqa: E402
from models import llama  # noqa: E402

PROMPTS = ["Name a color.", "What is your favorite fruit?", "Say something about the sky."]


@functools.partial(jax.jit, static_argnames="cfg")
def reinforce_step(params, cfg, tokens, answer_mask, advantages, lr):
    """One SGD step on -mean(advantage x log p(answer)). tokens [B, T] (prompt, answer, padding), answer_mask [B, T]:
    1 where tokens[b, t] is an answer token; advantages [B]."""

    def loss(p):
        logits = jax.vmap(lambda t: llama.forward_dense(p, cfg, t))(tokens)  # [B, T, V]
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # position t predicts token t + 1
        token_logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        answer_logp = (token_logp * answer_mask[:, 1:]).sum(axis=1)
        return -(advantages * answer_logp).mean()

    value, grads = jax.value_and_grad(loss)(params)
    return jax.tree.map(lambda w, g: w - lr * g, params, grads), value


def run(llm: LLM, params, prompts: list[str], target: str, steps: int, samples: int, max_tokens: int, lr: float,
        log=print) -> list[float]:
    """`steps` rounds of rollouts and training, starting from `params` (the served weights, as device arrays in
    `load_weights`' layout). -> the mean reward of each round's rollouts."""
    cfg = llm.engine.weights.loaded_cfg
    tokenizer = llm.tokenizer
    rewards_by_step = []
    for step in range(steps):
        chats = [[{"role": "user", "content": p}] for p in prompts for _ in range(samples)]
        outs = llm.chat(chats, [SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=1000 * step + i)
                                for i in range(len(chats))])
        rewards = np.array([out.text.lower().count(target) for out in outs], np.float32)
        baseline = rewards.reshape(len(prompts), samples).mean(axis=1).repeat(samples)
        prompt_ids = [tokenizer.encode_chat(chat) for chat in chats]
        assert all(len(ids) == out.prompt_tokens for ids, out in zip(prompt_ids, outs)), "not the prompts served"
        rows = [ids + list(out.token_ids) for ids, out in zip(prompt_ids, outs)]
        width = max(len(r) for r in rows)
        tokens = np.zeros((len(rows), width), np.int32)
        mask = np.zeros((len(rows), width), np.float32)
        for b, (row, out) in enumerate(zip(rows, outs)):
            tokens[b, : len(row)] = row
            mask[b, len(row) - len(out.token_ids) : len(row)] = 1.0
        llm.sleep(2)  # the trainer has the devices; its new weights come back below
        params, loss = reinforce_step(params, cfg, jnp.asarray(tokens), jnp.asarray(mask),
                                      jnp.asarray(rewards - baseline), lr)
        llm.update_weights(params)  # device to device, no recompilation
        llm.wake_up()
        cached = sum(out.cached_tokens for out in outs) / max(sum(out.prompt_tokens for out in outs), 1)
        log(f"step {step + 1}: mean reward {rewards.mean():.3f}, loss {float(loss):.4f}, prompt tokens cached "
            f"{cached:.0%}, weights version {llm.engine.weights_version}")
        rewards_by_step.append(float(rewards.mean()))
    return rewards_by_step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smollm2-135m.yaml")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--samples", type=int, default=4, help="answers per prompt")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--target", default="blue")
    args = ap.parse_args(argv)
    from models.loader import load_weights

    llm = LLM(args.config, **{"cache.num_pages": 512, "model.max_model_len": 256})
    _, host = load_weights(llm.engine.config.model.path, np.float32)
    params = jax.tree.map(jnp.asarray, host)  # the trainer's copy, on the devices
    run(llm, params, PROMPTS, args.target, args.steps, args.samples, args.max_tokens, args.lr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
