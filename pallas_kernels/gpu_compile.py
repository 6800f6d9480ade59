"""Compiles the Pallas kernels to GPU machine code on a machine without a GPU.

JAX lowers a Pallas kernel to a Triton IR module on any machine (`lowering_platforms`); turning
that module into PTX/cubin (CUDA) or AMDGCN/HSACO (ROCm) normally happens inside the GPU plugin.
The `triton` package can do that last step for a named target with no device present (it ships
`ptxas`, `cuobjdump` and `nvdisasm` for CUDA and LLVM's AMDGPU backend for ROCm). This module takes
the Triton module that JAX's lowering builds for one `pallas_call`, compiles it with `triton` for
a target chip and reads the resources off the binary:

  shared memory per program, registers per thread, spilled bytes (local memory / scratch), and
  whether the matrix units are used (Hopper `HGMMA` = wgmma, Ampere `HMMA`, CDNA `v_mfma`).

That catches, before any GPU time is spent, what interpret mode and IR lowering cannot: a tile
that overflows shared memory, registers that spill, a dot that falls off the tensor cores.
The `triton` release need not match the one inside the GPU plugin; its IR parser must accept the
module (tested with jax 0.10.2 and triton 3.6).

    modules = triton_modules(fn, *args, target=TARGETS["sm90"])  # args: arrays or shapes
    report = compile_module(modules[0], TARGETS["sm90"])     # -> CompileReport
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from typing import Any

import jax
from jax._src.pallas.triton import pallas_call_registration


@dataclasses.dataclass(frozen=True)
class Target:
  """A GPU to compile for. shared_limit_bytes: the most shared memory (LDS) one program may use."""
  name: str
  platform: str              # "cuda" | "rocm": the JAX lowering platform
  arch: int | str            # CUDA compute capability (90) or AMDGPU processor ("gfx942")
  device_kind: str           # what jax >= 0.11 reads the lowering's target chip from
  warp_size: int
  shared_limit_bytes: int
  max_registers: int         # per thread: 255 on NVIDIA; 512 VGPRs (arch + acc) per lane on CDNA3
  cards: str


TARGETS = {
    "sm90": Target("sm90", "cuda", 90, "NVIDIA H100", 32, 227 * 1024, 255, "H100, H200"),
    "sm80": Target("sm80", "cuda", 80, "NVIDIA A100", 32, 163 * 1024, 255, "A100"),
    "gfx942": Target("gfx942", "rocm", "gfx942", "gfx942", 64, 64 * 1024, 512, "MI300X, MI325X"),
}


@dataclasses.dataclass(frozen=True)
class TritonModule:
  """The Triton IR of one pallas_call, as JAX lowered it, and its launch options."""
  name: str
  text: str
  num_warps: int
  num_stages: int
  target: str


@dataclasses.dataclass(frozen=True)
class CompileReport:
  name: str
  target: str
  num_warps: int
  num_stages: int
  shared_bytes: int
  registers: int             # per thread (CUDA: REG; ROCm: VGPRs + AGPRs)
  spill_bytes: int           # CUDA: stack + local bytes per thread; ROCm: spilled VGPRs * 4
  matrix_instructions: str   # "HGMMA", "HMMA", "MFMA" or "" when no dot uses the matrix units

  @property
  def fits(self) -> bool:
    return self.shared_bytes <= TARGETS[self.target].shared_limit_bytes


class _Captured(Exception):
  """Raised from inside JAX's Pallas lowering once the Triton module is in hand (no GPU compile)."""

  def __init__(self, text: str):
    super().__init__("captured")
    self.text = text


def outer_equations(jaxpr):
  """Every equation of a jaxpr and of its nested jaxprs (jit, scan, cond, while bodies), the pallas_call equations
  included but not the kernels' own bodies."""
  for eqn in jaxpr.eqns:
    yield eqn
    if eqn.primitive.name == "pallas_call":
      continue
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(inner, "eqns"):
          yield from outer_equations(inner)


def loops_outside_kernels(jaxpr) -> list[str]:
  """The while loops, and scans not fully unrolled (those lower to while loops), in a jaxpr and its nested jaxprs,
  outside its pallas_calls: e.g. ["scan[30]"]. On a GPU each is a loop the host drives, one iteration at a time."""
  return [f"{eqn.primitive.name}[{eqn.params.get('length', '?')}]" for eqn in outer_equations(jaxpr)
          if eqn.primitive.name == "while" or (eqn.primitive.name == "scan" and eqn.params["unroll"] is not True
                                               and eqn.params["unroll"] < eqn.params["length"])]


def _pallas_calls(jaxpr) -> list[Any]:
  """Every pallas_call equation in a (closed) jaxpr, nested jit/scan/cond bodies included."""
  return [eqn for eqn in outer_equations(jaxpr) if eqn.primitive.name == "pallas_call"]


def lowering_device(target: Target):
  """Context in which JAX lowers Pallas Triton kernels for `target` with no GPU present.

  jax >= 0.11 reads the target chip from the abstract mesh's device and refuses to lower a Triton
  kernel without one ("No supported GPU devices found"); jax 0.10 ignores it and assumes sm90.
  """
  device = jax.sharding.AbstractDevice(target.device_kind, 1, target.platform)
  mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,),
                                   abstract_device=device)
  return jax.sharding.use_abstract_mesh(mesh)


def triton_modules(fn, *args, target: Target = TARGETS["sm90"], **kwargs) -> list[TritonModule]:
  """The Triton module of each pallas_call in `jax.jit(fn)(*args, **kwargs)`, in program order.

  args may be arrays or jax.ShapeDtypeStructs. Lowers the function once per pallas_call: JAX's
  lowering is stopped right after it builds each kernel's module, so neither a GPU nor the GPU
  plugin is needed.

  NOTE: this swaps JAX's (private) Triton lowering function for the duration of each lowering, so
  it is not thread safe; it is a test and tooling helper, never on the engine's path.
  """
  lower = pallas_call_registration.lowering.lower_jaxpr_to_triton_module
  modules = []
  with lowering_device(target):
    traced = jax.jit(fn).trace(*args, **kwargs)
    for index, eqn in enumerate(_pallas_calls(traced.jaxpr)):
      seen = 0

      def capture(*a, _index=index, **k):
        nonlocal seen
        result = lower(*a, **k)
        seen += 1
        if seen - 1 == _index:
          raise _Captured(result.module.operation.get_asm(enable_debug_info=False))
        return result

      pallas_call_registration.lowering.lower_jaxpr_to_triton_module = capture
      try:
        traced.lower(lowering_platforms=(target.platform,))
      except _Captured as captured:
        text = captured.text
      else:
        raise RuntimeError(f"pallas_call {index} of {fn} was not lowered for {target.name}")
      finally:
        pallas_call_registration.lowering.lower_jaxpr_to_triton_module = lower
      params = eqn.params["compiler_params"]
      num_stages = params.num_stages if params.num_stages is not None else (
          1 if target.platform == "rocm" else 3)  # JAX's defaults when a kernel names none
      modules.append(TritonModule(
          name=str(eqn.params.get("name") or eqn.params["jaxpr"].debug_info.func_name),
          text=text, num_warps=params.num_warps if params.num_warps is not None else 4,
          num_stages=num_stages, target=target.name))
  return modules


def compile_module(module: TritonModule, target: Target) -> CompileReport:
  """Compiles one module for `target` with the triton package; raises what triton raises."""
  import triton  # noqa: PLC0415  (a test-time dependency; the engine never needs it)
  from triton.backends.compiler import GPUTarget  # noqa: PLC0415

  if module.target != target.name:
    raise ValueError(f"module lowered for {module.target}, not {target.name}")
  gpu = GPUTarget("cuda" if target.platform == "cuda" else "hip", target.arch, target.warp_size)
  options = dict(num_warps=module.num_warps, num_stages=module.num_stages)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, f"{module.name}.ttir")
    text = _ttir_passes(module.text, path, gpu, options)
    with open(path, "w") as f:
      f.write(text)
    kernel = triton.compile(path, target=gpu, options=options)
    if target.platform == "cuda":
      registers, spill_bytes, matrix = _cuda_resources(kernel.asm["cubin"], tmp)
    else:
      registers, spill_bytes, matrix = _amd_resources(kernel.asm["amdgcn"])
  return CompileReport(name=module.name, target=target.name, num_warps=module.num_warps,
                       num_stages=module.num_stages, shared_bytes=kernel.metadata.shared,
                       registers=registers, spill_bytes=spill_bytes, matrix_instructions=matrix)


def _ttir_passes(text: str, path: str, gpu, options: dict) -> str:
  """The module after Triton's own TTIR passes (canonicalize, combine, CSE, loop unrolling), which
  the GPU plugin runs on a Pallas kernel's module first (XLA's Triton pipeline starts with them).

  NOTE: `triton.compile` skips a stage's passes when it is given that stage's IR as a file (for IR
  tests), so a .ttir source would go straight to TTGIR. Without these passes no `acc + dot(p, v)`
  becomes one dot accumulating in place (the combine pass), and every kernel looked to need a second
  accumulator's registers."""
  from triton._C.libtriton import ir  # noqa: PLC0415
  from triton.backends.compiler import Language  # noqa: PLC0415
  from triton.compiler.compiler import make_backend  # noqa: PLC0415

  backend = make_backend(gpu)
  with open(path, "w") as f:
    f.write(text)
  context = ir.context()
  ir.load_dialects(context)
  backend.load_dialects(context)
  stages = {}
  backend.add_stages(stages, backend.parse_options(options), Language.TRITON)
  module = ir.parse_mlir_module(path, context)
  module.context = context  # as triton.compile does (the passes read it)
  return str(stages["ttir"](module, {}))


def _cuda_tool(name: str) -> str:
  import triton  # noqa: PLC0415
  return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cuda_resources(cubin: bytes, tmp: str) -> tuple[int, int, str]:
  """(registers, stack + local bytes, tensor-core instruction) of a cubin, via cuobjdump/nvdisasm."""
  path = os.path.join(tmp, "kernel.cubin")
  with open(path, "wb") as f:
    f.write(cubin)
  usage = subprocess.run([_cuda_tool("cuobjdump"), "-res-usage", path], check=True,
                         capture_output=True, text=True).stdout
  fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
  sass = subprocess.run([_cuda_tool("nvdisasm"), "-c", path], check=True, capture_output=True,
                        text=True).stdout
  matrix = "HGMMA" if "HGMMA" in sass else "HMMA" if "HMMA" in sass else ""
  return int(fields["REG"]), int(fields["STACK"]) + int(fields["LOCAL"]), matrix


def _amd_resources(amdgcn: str) -> tuple[int, int, str]:
  """(VGPRs + AGPRs, spilled VGPR bytes, "MFMA" or "") from the kernel's AMDGCN metadata."""
  def field(key: str) -> int:
    found = re.search(rf"\.{key}:\s+(\d+)", amdgcn)
    return int(found.group(1)) if found else 0
  registers = field("vgpr_count") + field("agpr_count")
  return registers, 4 * field("vgpr_spill_count"), "MFMA" if "v_mfma" in amdgcn else ""


# Head shapes the checks compile: the gpu_check benchmark's, and the models the engine ships for.
HEAD_SHAPES = {          # name: (num_q_heads, num_kv_heads, head_dim, or a latent cache's (Dk, Dv))
    "llama3-8b": (32, 8, 128),
    "smollm2-135m": (9, 3, 64),
    "gemma3-270m": (4, 1, 256),
    "gemma3-4b": (8, 4, 256),  # the smallest Gemma 3 that takes images (kv_limits over its image positions)
    "mha-d128": (16, 16, 128),
    "llama4-scout-tp4": (10, 2, 128),  # Llama 4 Scout (40 q, 8 kv heads of 128) on each of 4 devices
    # DeepSeek-V3 / R1 / Kimi K2 (multi-head latent attention): one RoPE key (64) and one latent
    # (512) per token, shared by every q head: 16 on each of 8 tensor-parallel devices, 128 on one.
    # (V2-Lite has V3-TP8's heads: 16 on one device.)
    "deepseek-v3-tp8": (16, 1, (64, 512)),
    "deepseek-v3": (128, 1, (64, 512)),
}


def engine_kernels(num_q_heads: int, num_kv_heads: int, head_dim: int | tuple[int, int], dtype, *,
                   target: Target = TARGETS["sm90"], page_size: int = 16, num_layers: int = 2,
                   sliding_window: int | None = None, soft_cap: float | None = None,
                   traced_window: bool = False, kv_dtype=None,
                   sinks: bool = False, kv_limits: bool = False,
                   tree_masks: bool = False, attention_chunk: bool = False) -> dict[str, TritonModule]:
  """The Triton modules of the three kernels as the engine calls them (stacked [L, ...] cache,
  traced layer index, default tiles): {"prefill": ragged kernel, "decode": split-KV kernel,
  "write_kv": KV write}. Only shapes are needed, no data. head_dim (Dk, Dv): a latent cache, K
  pages Dk and V pages Dv wide, q Dk + Dv (DeepSeek's MLA). traced_window: the window is a traced
  int32 scalar, as for models that mix windowed and global layers (Gemma 3). kv_dtype: an 8-bit
  cache (int8 / float8_e4m3fn pages with float32 scales, pallas_kernels/kv_quant.py). sinks:
  attention sinks, a [Hq] float32 input (gpt-oss). kv_limits: per-row KV limits, a [T] int32 input
  (Gemma 3's steps with image rows). tree_masks: draft-tree masks, a [T] int32 input (tree speculative
  decoding). attention_chunk: a traced int32 chunk per layer (Llama 4's chunked layers)."""
  import functools  # noqa: PLC0415

  import jax.numpy as jnp  # noqa: PLC0415

  import pallas_kernels  # noqa: PLC0415

  num_tokens, max_seqs, max_pages = 256, 16, 64
  k_dim, v_dim = head_dim if isinstance(head_dim, tuple) else (head_dim, head_dim)
  q_dim = k_dim + v_dim if isinstance(head_dim, tuple) else head_dim
  pages_shape = (num_layers, num_kv_heads, max_seqs * max_pages, page_size)
  from pallas_kernels import kv_quant  # noqa: PLC0415

  storage = dtype if kv_dtype is None else kv_quant.storage_dtype(kv_dtype)
  k_pages, v_pages = (jax.ShapeDtypeStruct((*pages_shape, dim), storage) for dim in (k_dim, v_dim))
  scales = {}
  if kv_dtype is not None:
    scale = jax.ShapeDtypeStruct(pages_shape, jnp.float32)
    scales = dict(k_scales=scale, v_scales=scale)
  q = jax.ShapeDtypeStruct((num_tokens, num_q_heads, q_dim), dtype)
  kv_lens = jax.ShapeDtypeStruct((max_seqs,), jnp.int32)
  page_indices = jax.ShapeDtypeStruct((max_seqs, max_pages), jnp.int32)
  cu_q_lens = jax.ShapeDtypeStruct((max_seqs + 1,), jnp.int32)
  num_seqs = jax.ShapeDtypeStruct((1,), jnp.int32)
  layer = jax.ShapeDtypeStruct((), jnp.int32)
  attend_inputs = dict(scales)
  if sinks:
    attend_inputs["sinks"] = jax.ShapeDtypeStruct((num_q_heads,), jnp.float32)
  if kv_limits:
    attend_inputs["kv_limits"] = jax.ShapeDtypeStruct((num_tokens,), jnp.int32)
  if tree_masks:
    attend_inputs["tree_masks"] = jax.ShapeDtypeStruct((num_tokens,), jnp.int32)
  if attention_chunk:
    attend_inputs["attention_chunk"] = jax.ShapeDtypeStruct((), jnp.int32)
  modules = {}
  for kind, decode_only in (("prefill", False), ("decode", True)):
    attend = functools.partial(pallas_kernels.ragged_paged_attention, sm_scale=q_dim ** -0.5,
                               soft_cap=soft_cap, backend="pallas", decode_only=decode_only)
    if traced_window:
      fn = lambda *xs, window, attend=attend, **kw: attend(*xs, sliding_window=window, **kw)
      extra = dict(window=jax.ShapeDtypeStruct((), jnp.int32))
    else:
      fn, extra = functools.partial(attend, sliding_window=sliding_window), {}
    [modules[kind]] = triton_modules(fn, q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens,
                                     num_seqs, layer=layer, target=target, **extra, **attend_inputs)
  new_k, new_v = (jax.ShapeDtypeStruct((num_tokens, num_kv_heads, dim), dtype) for dim in (k_dim, v_dim))
  slots = jax.ShapeDtypeStruct((num_tokens,), jnp.int32)
  write = functools.partial(pallas_kernels.write_kv, backend="pallas")
  [modules["write_kv"]] = triton_modules(write, k_pages, v_pages, new_k, new_v, slots, layer=layer,
                                         target=target, **scales)
  return modules
