"""`LLM`: the Python API for offline use (research experiments, batch jobs)."""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence as Seq

import numpy as np

from engine import scoring
from engine.config import EngineConfig, load_config
from engine.engine import LLMEngine, RequestOutput
from engine.output import OutputKind
from engine.request import MAX_TOP_LOGPROBS, RequestError, SamplingParams
from engine.tool_calls import ToolChoice


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    e2e_s: float
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # SamplingParams.logprobs = k > 0: per token, the top k
    stop_reason: str | int | None = None
    prompt_logprobs: list[float | None] | None = None  # SamplingParams.prompt_logprobs: per prompt token, [0] None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_ranks: list[int | None] | None = None  # per prompt token, its rank under the logits before it (1: the top)
    tool_calls: list | None = None  # chat with tools: the `engine.tool_calls.ToolCall`s read from the reply (text: the rest)
    # SamplingParams.return_hidden_states: [len(token_ids), hidden] float32, the final hidden state that sampled each
    hidden_states: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Beam:
    """One result of `LLM.beam_search`."""

    token_ids: list[int]
    logprob: float  # cumulative logprob of token_ids given the prompt
    score: float  # logprob / len(token_ids) ** length_penalty: the order of the results
    text: str


class LLM:
    """LLM("configs/smollm2-135m.yaml") or LLM(EngineConfig(...)); overrides as dotted keys.

    >>> llm = LLM("configs/smollm2-135m.yaml")
    >>> llm.chat([[{"role": "user", "content": "What is 2+2?"}]], SamplingParams(temperature=0, max_tokens=20))
    """

    def __init__(self, config: EngineConfig | str | None = None, progress: bool = True, model: tuple | None = None,
                 draft: tuple | None = None, vision: tuple | None = None, **overrides):
        if not isinstance(config, EngineConfig):
            config = load_config(config)
        if overrides:
            config = config.replace(**{k.replace("__", "."): v for k, v in overrides.items()})
        self.engine = LLMEngine(config, progress=progress, model=model, draft=draft, vision=vision)
        self.tokenizer = self.engine.tokenizer

    def default_sampling_params(self) -> SamplingParams:
        """What `generate`, `stream` and `chat` sample with when given no SamplingParams: the checkpoint's recommended
        sampling (`model.generation_config: auto`: its generation_config.json or GGUF metadata), else
        SamplingParams' own defaults."""
        return SamplingParams(**self.engine.sampling_defaults)

    def generate(
        self,
        prompts: Seq[str] | Seq[Seq[int]] | Seq[dict] | str | dict,
        params: SamplingParams | Seq[SamplingParams] | None = None,
        namespace: str | None = None,
        progress: bool = False,
        adapter: str | None = None,
        images: Seq[Seq] | None = None,
    ) -> list[Completion]:
        """Runs every prompt (text, token ids, or vLLM's prompt dicts: {"prompt": text, "multi_modal_data": {"image":
        ...}}, {"prompt_token_ids": ids}, {"prompt_embeds": [tokens, hidden] array}: rows the model reads in place of
        its token embeddings, with model.enable_prompt_embeds) through the continuous batch; results in input order.
        `adapter`: one of the config's lora.adapters (None: the base model). `images` (a model that takes images):
        per prompt, its images in the order of its placeholder tokens (`LLMEngine.add_request`)."""
        prompts = _prompt_list(prompts)
        params_list = _params_list(params, len(prompts), self.default_sampling_params())
        images = list(images) if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
        ids = [self.engine.add_request(p, sp, namespace=namespace, adapter=adapter, output_kind=OutputKind.FINAL,
                                       images=im) for p, sp, im in zip(prompts, params_list, images)]
        finals = self._run(set(ids), progress)
        return [finals[i] for i in ids]

    def stream(
        self,
        prompts: Seq[str] | Seq[Seq[int]] | str,
        params: SamplingParams | Seq[SamplingParams] | None = None,
        namespace: str | None = None,
        adapter: str | None = None,
    ) -> Iterator[tuple[int, RequestOutput]]:
        """Runs the prompts as `generate` does, yielding (prompt index, RequestOutput) as each step ends: an output
        holds what its step added (`delta_text`, `delta_token_ids`: OutputKind.DELTA), and each prompt's last one
        (`finished`) its totals. Leaving the loop early (a break, an exception) aborts the prompts not finished."""
        prompts = _prompt_list(prompts)
        params_list = _params_list(params, len(prompts), self.default_sampling_params())
        index: dict[str, int] = {}
        pending: set[str] = set()
        try:
            for i, (p, sp) in enumerate(zip(prompts, params_list)):
                rid = self.engine.add_request(p, sp, namespace=namespace, adapter=adapter, output_kind=OutputKind.DELTA)
                index[rid] = i
                pending.add(rid)
            while pending:
                for out in self.engine.step():
                    if out.request_id in index:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield index[out.request_id], out
        finally:
            for rid in pending:
                self.engine.abort(rid)

    def chat(
        self,
        conversations: Seq[Seq[dict]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        namespace: str | None = None,
        progress: bool = False,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        adapter: str | None = None,
        chat_template_kwargs: dict | None = None,
        continue_final_message: bool = False,
    ) -> list[Completion]:
        """Applies the model's chat template to each message list, then generates. `tools` / `tool_choice` as in
        OpenAI's chat API (`engine.tool_calls`): the tools reach the template, a named or "required" choice holds
        the reply to the tools' schemas, and calls found in a reply come back in `Completion.tool_calls`.
        `chat_template_kwargs`: variables for the template, e.g. {"enable_thinking": False} (Qwen3).
        `continue_final_message`: each conversation ends with an assistant's message that the model continues (a
        prefilled reply); the completion holds only what it adds."""
        choice = ToolChoice(tools or [], tool_choice)
        kwargs = {**(chat_template_kwargs or {}), **({"tools": tools} if tools else {}),
                  "continue_final_message": continue_final_message}
        prompts, images = [], []
        for messages in conversations:  # (image parts of a model that takes images: engine.multimodal.split_images)
            ids, sources = self.engine.encode_chat(list(messages), **kwargs)
            prompts.append(ids)
            images.append(sources)
        if choice.constraint() is not None:
            params = [dataclasses.replace(p, structured=choice.constrain(p.structured, "structured"))
                      for p in _params_list(params, len(prompts), self.default_sampling_params())]
        outs = self.generate(prompts, params, namespace, progress, adapter, images=images)
        if not choice.active:
            return outs
        replies = []
        for out in outs:
            content, calls = choice.parse(out.text)
            replies.append(dataclasses.replace(out, text=content or "", tool_calls=calls, finish_reason="tool_calls")
                           if calls else out)
        return replies

    def embed(self, prompts: Seq[str] | Seq[Seq[int]] | str, namespace: str | None = None,
              progress: bool = False) -> list[np.ndarray]:
        """One L2-normalized float32 vector per prompt (text or token ids): the final hidden state of the prompt's last
        token (last-token pooling, as Qwen3-Embedding and e5-mistral are trained), through the same continuous batch
        and prefix cache as generation (a shared instruction prefix is computed once)."""
        return [out.embedding for out in self._pooled(prompts, namespace, progress)]

    def token_embeddings(self, prompt: str | Seq[int]) -> np.ndarray:
        """[tokens, hidden]: the rows the model's first layer reads for a prompt's tokens (after Gemma's embedding
        scale): edited, or with other rows around them, a prompt to give as {"prompt_embeds": rows}
        (model.enable_prompt_embeds)."""
        return self.engine.token_embeddings(prompt)

    def _pooled(self, prompts, namespace: str | None, progress: bool) -> list[RequestOutput]:
        """The final outputs of one embedding request per prompt (`embedding`; on a classifier `classification`)."""
        ids = [self.engine.add_request(p, SamplingParams.embedding(), namespace=namespace, output_kind=OutputKind.FINAL)
               for p in _prompt_list(prompts)]
        finals = self._run(set(ids), progress, keep=True)
        return [finals[i] for i in ids]

    def classify(self, prompts: Seq[str] | Seq[Seq[int]] | str, namespace: str | None = None,
                 progress: bool = False) -> list[np.ndarray]:
        """A sequence classifier's (reward model's) logits [num_labels] float32 per prompt: its score head over the
        prompt's last token's final normed state, as transformers' `*ForSequenceClassification` pools an unpadded
        sequence; softmax them for class probabilities (a reward model's one label is its reward). Through the same
        batch and prefix cache as everything else: prompts that share a prefix (one conversation, several replies)
        compute it once."""
        if self.engine.score_head is None:
            raise ValueError(f"{self.engine.config.model.path or 'this model'} is a language model, not a sequence "
                             "classifier (an HF *ForSequenceClassification checkpoint, or "
                             "model.classifier_from_token): nothing to classify with")
        return [out.classification for out in self._pooled(prompts, namespace, progress)]

    def score(self, text_1, text_2, namespace: str | None = None, progress: bool = False) -> list[float]:
        """vLLM's `LLM.score`: one score per pair, one text_1 (a query) against each text_2 (documents) or text_1[i]
        against text_2[i] (a text, or token ids, each). A cross-encoder (a classifier of one label: a reranker's
        checkpoint, or `model.classifier_from_token`) reads each pair as one prompt and gives its relevance in (0, 1);
        the query's tokens are a prefix every pair shares, computed once. Any other model: the cosine similarity of
        the two embeddings (engine.scoring)."""
        pairs = scoring.pairs(_prompt_list(text_1), _prompt_list(text_2))
        if scoring.cross_encodes(self.engine.score_head):
            prompts = [self.engine.pair_format.prompt(a, b) for a, b in pairs]
            return [scoring.relevance(out.classification) for out in self._pooled(prompts, namespace, progress)]
        texts = scoring.distinct(pairs)  # each text embedded once
        return scoring.cosines(pairs, dict(zip(texts, self.embed(list(texts.values()), namespace, progress))))

    def update_weights(self, source, progress: bool = False) -> float:
        """Generates with new weights from now on (RL rollouts between training steps; a fine-tuned checkpoint): a
        checkpoint path, a pytree in `load_weights`' layout, or an HF-named state dict (numpy or JAX arrays). No
        recompilation; the prefix cache starts empty. -> seconds taken (`LLMEngine.update_weights`)."""
        return self.engine.update_weights(source, progress)

    def sleep(self, level: int = 1) -> None:
        """Frees the devices for another job (an RL trainer between rollouts): the KV cache, and the weights (level 1:
        kept in host memory; level 2: dropped, `update_weights` gives new ones) until `wake_up` (`LLMEngine.sleep`)."""
        self.engine.sleep(level)

    def wake_up(self) -> None:
        self.engine.wake_up()

    def load_adapter(self, name: str, path: str) -> None:
        """Serves a PEFT LoRA adapter by `name` from now on (`generate(..., adapter=name)`), in one of
        lora.max_adapters slots, without recompiling (`LLMEngine.load_adapter`)."""
        self.engine.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self.engine.unload_adapter(name)

    def beam_search(
        self,
        prompts: Seq[str] | Seq[Seq[int]] | str,
        beam_width: int = 4,
        max_tokens: int = 16,
        length_penalty: float = 1.0,
        ignore_eos: bool = False,
        namespace: str | None = None,
    ) -> list[list[Beam]]:
        """Beam search: for each prompt, the `beam_width` best continuations by cumulative logprob / length **
        length_penalty, best first. Every live beam of every prompt runs as one request per step (one token, its
        top 2 x beam_width logprobs), in one continuous batch; the beams' shared history comes from the prefix cache
        (each step recomputes at most the tail after the last full page). A beam ends at an end token (kept in its
        tokens, not in its text) or at max_tokens."""
        mode = self.engine.config.model.logprobs_mode
        if mode.endswith("logits"):
            raise RequestError(f"beam search ranks by logprobs; model.logprobs_mode is {mode}")
        if not 1 <= beam_width <= MAX_TOP_LOGPROBS // 2:
            raise RequestError(f"beam_width must be in [1, {MAX_TOP_LOGPROBS // 2}], got {beam_width}")
        prompts = [self.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in _prompt_list(prompts)]
        end_ids = set() if ignore_eos else set(self.tokenizer.stop_ids)
        params = SamplingParams(temperature=0, max_tokens=1, logprobs=2 * beam_width, ignore_eos=True)
        live = [[([], 0.0)] for _ in prompts]  # per prompt: (generated tokens, cumulative logprob)
        done: list[list[tuple[list[int], float]]] = [[] for _ in prompts]
        add = functools.partial(self.engine.add_request, params=params, namespace=namespace,
                                output_kind=OutputKind.FINAL)
        for _ in range(max_tokens):
            requests = {add(prompt + tokens): (i, tokens, logprob)
                        for i, prompt in enumerate(prompts) for tokens, logprob in live[i]}
            if not requests:
                break
            candidates: list[list[tuple[list[int], float]]] = [[] for _ in prompts]
            for rid, out in self._run(set(requests), progress=False).items():
                i, tokens, logprob = requests[rid]
                candidates[i] += [(tokens + [t], logprob + lp) for t, lp in out.top_logprobs[0]]
            for i, cands in enumerate(candidates):
                cands.sort(key=lambda c: -c[1])  # stable: ties keep the order the model ranked them
                live[i] = []
                for tokens, logprob in cands[:beam_width]:
                    (done[i] if tokens[-1] in end_ids else live[i]).append((tokens, logprob))
        results = []
        for finished, running in zip(done, live):
            beams = [Beam(tokens, logprob, logprob / len(tokens) ** length_penalty,
                          self.tokenizer.decode(tokens[:-1] if tokens[-1] in end_ids else tokens))
                     for tokens, logprob in finished + running]
            results.append(sorted(beams, key=lambda b: -b.score)[:beam_width])
        return results

    def _run(self, pending: set[str], progress: bool, keep: bool = False) -> dict:
        """Steps until every request in `pending` has finished: their Completions (keep: the RequestOutputs)."""
        from tqdm import tqdm

        finals: dict = {}
        with tqdm(total=len(pending), desc="generating", unit="req", disable=not progress) as bar:
            while pending - finals.keys():
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        finals[out.request_id] = out if keep else _completion(out)
                        bar.update(1)
        return finals


def _prompt_list(prompts) -> list:
    """One prompt (text, token ids, {"prompt_embeds": array}) or several -> a list of prompts."""
    one = isinstance(prompts, (str, dict)) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))
    return [prompts] if one else list(prompts)


def _params_list(params: SamplingParams | Seq[SamplingParams] | None, n: int,
                 default: SamplingParams) -> list[SamplingParams]:
    """One SamplingParams for every prompt, or one each (ValueError when the counts differ); None: `default`."""
    params_list = list(params) if isinstance(params, (list, tuple)) else [params or default] * n
    if len(params_list) != n:
        raise ValueError(f"{n} prompts but {len(params_list)} sampling params")
    return params_list


def _completion(out: RequestOutput) -> Completion:
    return Completion(
        text=out.text,
        token_ids=out.token_ids,
        finish_reason=out.finish_reason,
        prompt_tokens=out.prompt_tokens,
        cached_tokens=out.cached_tokens,
        ttft_s=out.ttft_s,
        e2e_s=out.e2e_s,
        logprobs=out.logprobs,
        top_logprobs=out.top_logprobs,
        stop_reason=out.stop_reason,
        prompt_logprobs=out.prompt_logprobs,
        prompt_top_logprobs=out.prompt_top_logprobs,
        prompt_ranks=out.prompt_ranks,
        hidden_states=out.hidden_states,
    )
