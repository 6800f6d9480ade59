"""Rotary position embeddings as a checkpoint trained them: the inverse frequencies and the attention factor, in
float64 numpy on the host, computed once per model (models/llama.py turns them into cos and sin in the step).

RoPE turns the first rotary_dim dims of each q/k head pair by pair (rotate-half), pair i by inv_freq[i] radians per
position; rotary_dim is head_dim, or a fraction of it (partial rotary embeddings, Phi-4-mini). A checkpoint stretched
past its pretraining context scales those frequencies (`RopeScaling`): as Llama 3 (`llama3`), linearly, by YaRN
(Qwen2.5/Qwen3 long-context configs) or by LongRoPE (Phi-3); YaRN and LongRoPE also multiply cos and sin by an
attention factor. A Llama 3.1+ GGUF divides the frequencies by its `rope_freqs` tensor instead (freq_factors).

The scaling is read from an HF `config.json` (`scaling_from_hf`) or from GGUF metadata (`scaling_from_gguf`,
`longrope_from_gguf`), as transformers and llama.cpp read them. LlamaConfig (models/config.py) holds the fields and
picks those of the global or the windowed layers; this module knows nothing of the rest of the model.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from models.errors import ConfigError

ROPE_TYPES = ("llama3", "linear", "yarn", "longrope")  # RopeScaling.rope_type


@dataclasses.dataclass(frozen=True, slots=True)
class RopeScaling:
    """How a checkpoint stretched RoPE past its pretraining context: Llama 3's frequency-dependent scaling
    (`llama3`), plain `linear` scaling, YaRN (`yarn`: long wavelengths divided by `factor`, short ones kept, a
    ramp between, and cos and sin multiplied by an attention factor) or LongRoPE (`longrope`, Phi-3: a divisor per
    frequency, from one of two lists, and an attention factor)."""

    rope_type: str  # one of ROPE_TYPES
    factor: float
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position: int = 8192  # llama3, yarn, longrope: the pretraining context
    # yarn: pairs turning more than beta_fast times over the original context keep their frequency, those under
    # beta_slow turns are interpolated; `truncate` rounds the ramp's ends out to whole pairs.
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    # yarn, longrope: what cos and sin are multiplied by; None: derived from factor (and yarn's mscale /
    # mscale_all_dim, DeepSeek's pair, where both are set): attention_factor below.
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    # longrope: [rotary_dim // 2] divisors of the inverse frequencies, for short and for long contexts
    # (longrope_factors says which); `factor` only sets the attention factor.
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_scaling.rope_type={self.rope_type!r} is not supported ({', '.join(ROPE_TYPES)})")
        if self.factor <= 0:
            raise ConfigError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.original_max_position <= 0:
            raise ConfigError(f"rope_scaling.original_max_position must be > 0, got {self.original_max_position}")
        if self.attention_factor is not None and self.attention_factor <= 0:
            raise ConfigError(f"rope_scaling.attention_factor must be > 0, got {self.attention_factor}")
        for name in ("short_factor", "long_factor"):
            factors = tuple(float(f) for f in getattr(self, name))  # hashable: the config is a static jit argument
            object.__setattr__(self, name, factors)
            if self.rope_type == "longrope" and not factors:
                raise ConfigError(f"rope_scaling.{name} is required for longrope")
            bad = next((f for f in factors if not 0 < f < math.inf), None)
            if bad is not None:
                raise ConfigError(f"rope_scaling.{name} must be finite and > 0, got {bad}")
        if self.rope_type != "yarn":
            return
        if self.beta_slow <= 0:
            raise ConfigError(f"rope_scaling.beta_slow must be > 0, got {self.beta_slow}")
        if self.beta_fast < self.beta_slow:
            raise ConfigError(f"rope_scaling.beta_fast must be >= beta_slow={self.beta_slow}, got {self.beta_fast}")

    def longrope_factors(self, context_len: int) -> tuple[float, ...]:
        """LongRoPE's divisors for a model that serves up to `context_len` positions: the long factors when that
        exceeds the pretraining context (original_max_position), else the short ones.

        NOTE: chosen once per model, from the context it serves (as llama.cpp does, by its context size), never per
        sequence. transformers picks by the length of the sequence in hand, so a sequence that grows past
        original_max_position switches tables while its cached keys keep the other one's rotation; a paged KV
        cache shared across lengths cannot do that. So a 128k Phi-3 uses its long factors at every length, where
        transformers uses the short ones on sequences up to original_max_position (the two agree past it)."""
        return self.long_factor if context_len > self.original_max_position else self.short_factor


# ---------------------------------------------------------------- the numbers
def rotary_dim(head_dim: int, partial_rotary_factor: float) -> int:
    """The dims of each q/k head RoPE turns, the first ones (as transformers rounds: down)."""
    return int(head_dim * partial_rotary_factor)


def check(head_dim: int, partial_rotary_factor: float, scaling: RopeScaling | None,
          freq_factors: Sequence[float] | None) -> tuple[float, ...] | None:
    """Checks a model's RoPE settings against its head_dim; returns freq_factors as a tuple of floats (hashable: the
    config is a static jit argument), or None."""
    dim = rotary_dim(head_dim, partial_rotary_factor)
    if not 0 < partial_rotary_factor <= 1 or dim % 2 or not dim:
        raise ConfigError(f"partial_rotary_factor={partial_rotary_factor} must be in (0, 1] and leave an even "
                            f"number of rotary dims > 0 (head_dim={head_dim}: {dim})")

    def check_num_pairs(field: str, n: int) -> None:
        """A per-frequency list must have one value per rotated pair."""
        if n != dim // 2:
            partial = f" x partial_rotary_factor={partial_rotary_factor}" if partial_rotary_factor != 1 else ""
            raise ConfigError(f"{field} has {n} values, head_dim={head_dim}{partial} needs {dim // 2}")

    if scaling is not None and scaling.rope_type == "longrope":
        for name in ("short_factor", "long_factor"):
            check_num_pairs(f"rope_scaling.{name}", len(getattr(scaling, name)))
    if freq_factors is None:
        return None
    factors = tuple(float(f) for f in freq_factors)
    check_num_pairs("rope_freq_factors (GGUF tensor 'rope_freqs.weight')", len(factors))
    if not all(0 < f < math.inf for f in factors):
        raise ConfigError(f"rope_freq_factors (GGUF tensor 'rope_freqs.weight') must be finite and > 0, got "
                            f"{next(f for f in factors if not 0 < f < math.inf)}")
    return factors


def inverse_frequencies(theta: float, rotary_dim: int, scaling: RopeScaling | None,
                        freq_factors: Sequence[float] | None, context_len: int) -> np.ndarray:
    """[rotary_dim // 2] float64 inverse frequencies of RoPE base `theta`, scaled as the checkpoint was trained: by
    `scaling`, then divided by `freq_factors` (as llama.cpp divides by rope_freqs). context_len: the positions the
    model serves (LongRoPE's table depends on it: RopeScaling.longrope_factors)."""
    inv_freq = _scaled_inverse_frequencies(theta, rotary_dim, scaling, context_len)
    if freq_factors is None:
        return inv_freq
    return inv_freq / np.asarray(freq_factors, np.float64)


def _scaled_inverse_frequencies(theta: float, dim: int, s: RopeScaling | None, context_len: int) -> np.ndarray:
    """inverse_frequencies before freq_factors."""
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return inv_freq / s.factor
    if s.rope_type == "longrope":
        return inv_freq / np.asarray(s.longrope_factors(context_len), np.float64)
    if s.rope_type == "yarn":
        # Pair i turns original_max_position * inv_freq[i] / 2pi times over the original context; a pair
        # turning more than beta_fast times keeps its frequency, one turning under beta_slow times is divided
        # by `factor`, and a linear ramp over the pair index joins the two (its ends clamped as transformers does).
        def pair_turning(turns):
            return dim * math.log(s.original_max_position / (turns * 2 * math.pi)) / (2 * math.log(theta))

        low, high = pair_turning(s.beta_fast), pair_turning(s.beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        return ramp * inv_freq / s.factor + (1 - ramp) * inv_freq
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
    low_freq_wavelen = s.original_max_position / s.low_freq_factor
    high_freq_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    mid = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return np.where(mid, (1 - smooth) * inv_freq / s.factor + smooth * inv_freq, scaled)


def attention_factor(s: RopeScaling | None) -> float:
    """What RoPE's cos and sin are multiplied by (so q and k both, after rotation): YaRN's or LongRoPE's
    attention factor, 1 otherwise."""
    if s is None or s.rope_type not in ("yarn", "longrope"):
        return 1.0
    if s.attention_factor is not None:
        return s.attention_factor
    if s.rope_type == "longrope":  # sqrt(1 + ln(factor) / ln(original context)), short factors or long
        return 1.0 if s.factor <= 1 else math.sqrt(1 + math.log(s.factor) / math.log(s.original_max_position))

    # NOTE: `and` on purpose: transformers takes the ratio only when both are set and nonzero.
    if s.mscale and s.mscale_all_dim:
        return yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    return yarn_mscale(s.factor)


def yarn_mscale(factor: float, m: float = 1.0) -> float:
    """YaRN's magnitude 0.1 m ln(factor) + 1 (1 where factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def yarn_softmax_scale(qk_dim: int, factor: float | None, mscale_all_dim: float | None) -> float:
    """DeepSeek's softmax scale: qk_dim^-1/2, times YaRN's magnitude at mscale_all_dim squared where the RoPE scaling
    (`factor`) and mscale_all_dim are both given (transformers' yarn_apply_mscale, llama.cpp's deepseek2 graph)."""
    scale = qk_dim**-0.5
    if factor is not None and mscale_all_dim:
        scale *= yarn_mscale(factor, mscale_all_dim) ** 2
    return scale


# ---------------------------------------------------------------- sources
def scaling_from_hf(rs: Mapping[str, Any] | None, source: str, cfg: Mapping[str, Any]) -> RopeScaling | None:
    """An HF `rope_scaling` / `rope_parameters` dict, read as transformers reads it; `cfg` is the whole
    config.json (YaRN's and LongRoPE's defaults come from its max_position_embeddings)."""
    if not rs:
        return None
    rope_type = rs.get("rope_type", rs.get("type"))
    if rope_type in (None, "default"):
        return None
    phi3 = cfg.get("model_type") == "phi3"
    if phi3 and rope_type in ("su", "yarn"):  # transformers reads both as longrope in a Phi-3 config
        rope_type = "longrope"
    types = ROPE_TYPES if phi3 else tuple(t for t in ROPE_TYPES if t != "longrope")  # the one family using LongRoPE
    if rope_type not in types:
        raise ConfigError(f"{source}: rope_scaling type {rope_type!r} is not supported ({', '.join(types)})")
    # transformers: a top-level original_max_position_embeddings wins over the dict's (Phi-3's layout), and both
    # default to max_position_embeddings.
    max_position = cfg.get("max_position_embeddings")
    original = cfg.get("original_max_position_embeddings") or rs.get("original_max_position_embeddings") or max_position
    if rope_type == "llama3":
        return RopeScaling(
            "llama3",
            float(rs["factor"]),
            float(rs.get("low_freq_factor", 1.0)),
            float(rs.get("high_freq_factor", 4.0)),
            int(rs.get("original_max_position_embeddings", 8192)),
        )
    if rope_type == "linear":
        return RopeScaling("linear", float(rs["factor"]))
    # yarn or longrope
    if not original:
        raise ConfigError(f"{source}: {rope_type} rope_scaling needs original_max_position_embeddings")
    factor = rs.get("factor")  # null: the ratio of the two contexts
    if factor is None:
        if not max_position:
            raise ConfigError(f"{source}: {rope_type} rope_scaling needs factor (or max_position_embeddings)")
        factor = max_position / original

    def optional(key):
        return None if rs.get(key) is None else float(rs[key])

    if rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            if not isinstance(rs.get(key), (list, tuple)):
                raise ConfigError(f"{source}: longrope rope_scaling needs {key} (a list of numbers)")
        # factor sets the attention factor only; max_position picks short or long (RopeScaling.longrope_factors)
        return RopeScaling("longrope", float(factor), original_max_position=int(original),
                           short_factor=tuple(rs["short_factor"]), long_factor=tuple(rs["long_factor"]),
                           attention_factor=optional("attention_factor"))
    return RopeScaling(
        "yarn", float(factor), original_max_position=int(original),
        beta_fast=float(rs.get("beta_fast") or 32.0), beta_slow=float(rs.get("beta_slow") or 1.0),  # 0 = unset
        truncate=bool(rs.get("truncate", True)), attention_factor=optional("attention_factor"),
        mscale=optional("mscale"), mscale_all_dim=optional("mscale_all_dim"),
    )


def scaling_from_gguf(meta: Mapping[str, Any], arch: str, source: str) -> RopeScaling | None:
    """`{arch}.rope.scaling.*` as llama.cpp's converter writes it (gguf.Keys.Rope). Llama 3 scaling is no type
    there (a rope_freqs tensor: LlamaConfig.rope_freq_factors), nor is LongRoPE (longrope_from_gguf)."""
    key = f"{arch}.rope.scaling."
    kind = meta.get(key + "type")
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn"):
        raise ConfigError(f"{source}: {key}type={kind!r} is not supported (none, linear, yarn)")
    if key + "factor" not in meta:
        raise ConfigError(f"{source}: missing GGUF field {key + 'factor'!r}")
    factor = float(meta[key + "factor"])
    if kind == "linear":
        return RopeScaling("linear", factor)
    if float(meta.get(key + "yarn_ext_factor", 1.0)) != 1.0:  # llama.cpp's weight of the ramp; transformers has none
        raise ConfigError(f"{source}: {key}yarn_ext_factor={meta[key + 'yarn_ext_factor']} is not supported (1)")
    original = meta.get(key + "original_context_length") or meta.get(f"{arch}.context_length")
    if not original:
        raise ConfigError(f"{source}: missing GGUF field {key + 'original_context_length'!r}")
    # yarn_log_multiplier is HF's mscale_all_dim with mscale 1 (llama.cpp reads it so for these architectures; its
    # DeepSeek-style ones store 0.1 x mscale_all_dim instead). yarn_attn_factor is HF's attention_factor.
    log_mul = float(meta.get(key + "yarn_log_multiplier") or 0.0)
    attention_factor = meta.get(key + "yarn_attn_factor")
    if arch == "olmo2" and attention_factor is None:  # its converter writes HF's attention_factor as attn_factor
        attention_factor = meta.get(key + "attn_factor")
    return RopeScaling(
        "yarn", factor, original_max_position=int(original),
        beta_fast=float(meta.get(key + "yarn_beta_fast") or 32.0),
        beta_slow=float(meta.get(key + "yarn_beta_slow") or 1.0),
        attention_factor=None if attention_factor is None else float(attention_factor),
        mscale=1.0 if log_mul else None, mscale_all_dim=log_mul or None,
    )


def longrope_from_gguf(meta: Mapping[str, Any], arch: str, source: str,
                       longrope_factors: tuple[np.ndarray, np.ndarray], context_len: int) -> RopeScaling:
    """A phi3 GGUF's LongRoPE: its (`rope_factors_short.weight`, `rope_factors_long.weight`) tensors with
    `rope.scaling.original_context_length` and `rope.scaling.attn_factor` (llama.cpp's converter writes LongRoPE so,
    and no rope.scaling.type); the factor is context_len (the file's context_length) over the original context."""
    key = f"{arch}.rope.scaling."
    original = meta.get(key + "original_context_length")
    if not original:
        raise ConfigError(f"{source}: missing GGUF field {key + 'original_context_length'!r}")
    attention_factor = meta.get(key + "attn_factor")
    short, long = (tuple(np.ravel(f).tolist()) for f in longrope_factors)
    return RopeScaling(
        "longrope", context_len / int(original), original_max_position=int(original), short_factor=short,
        long_factor=long, attention_factor=None if attention_factor is None else float(attention_factor))
