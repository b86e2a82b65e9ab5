"""Ahead-of-time compile of every Triton kernel we ship, for real GPU targets, on a machine without a GPU.

Triton compiles for a named target (`GPUTarget("cuda", 90, 32)`) with no driver: its own ptxas turns the PTX into a
cubin. Each check builds the launch exactly as the launcher would (the launchers' `*_launch` functions, called on
tensors of the meta device at a LLaVA-1.5-7B head shape), specialises the arguments the way Triton's runtime does at a
launch (integers equal to 1 become constants, 16-byte aligned pointers and multiples of 16 are marked divisible), and
compiles it with the launch's num_warps / num_stages for each target. The specialisation matters: with unit strides
known, the forward kernel's loads vectorise and its pipeline keeps three times the shared memory it would otherwise.

What is checked per (kernel, target, precision, variant):
  - it compiles;
  - shared memory (Triton's dynamic allocation plus the cubin's static shared memory) fits the target's opt-in limit;
  - registers per thread x threads per block fit the register file (read from the cubin with the cuobjdump Triton
    ships; reported as unread when there is none);
  - tensor cores where they are due: `mma` in the PTX of 16-bit and TF32 log-prob kernels, `wgmma` on sm_90.
Spilled registers (the cubin's stack frame) are reported, not judged: they cost speed, not correctness.

Precisions: fp16 / bf16 (16-bit tiles), fp32 (IEEE products, torch.get_float32_matmul_precision() "highest") and
tf32x3 (fp32 tiles, precision "high" or "medium": three TF32 tensor-core products per fp32 product). The DAMA loss
kernels receive fp32 log-probs whatever their dtype (dama_sigmoid_loss casts them), so their rows for every precision
are the same compile. Variants: the log-prob kernels with and without a bias (the backward computing every gradient),
and the d_logits kernel with gradient filtering (no bias, as LLaVA's head); the filtered backward's two products over
kept tiles, d_weight's for the first chunk, for a later one (adding into d_weight in the weight's dtype) and adding
into an fp32 accumulator; the loss backward with and without a gradient for the per-pair losses.

Compiling needs the real triton.jit functions: import this module with TRITON_INTERPRET unset (the interpreter swaps
them for Python stand-ins). `dama selftest --compile-only` takes care of that.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton

from .dama_loss_triton import dama_loss_bwd_launch, dama_loss_fwd_launch
from .launch_config import (
    KeptProductBlocks,
    KernelLaunch,
    LinearLogprobBlocks,
    float32_matmul_precision,
    kept_product_blocks,
    linear_logprob_blocks,
    target_limits,
)
from .linear_logprob_backward import (
    TileFilter,
    backward_chunk_rows,
    d_logits_grid,
    linear_logprob_d_logits_launch,
)
from .linear_logprob_forward import _linear_logprob_fwd_kernel, linear_logprob_fwd_launch
from .linear_logprob_kept_tiles import d_hidden_kept_launch, d_weight_kept_launch

TARGETS = {"sm_80": (8, 0), "sm_86": (8, 6), "sm_89": (8, 9), "sm_90": (9, 0)}
# name -> (dtype of hidden states and weight, torch.get_float32_matmul_precision() at the launch)
PRECISIONS = {
    "fp32": (torch.float32, "highest"),
    "tf32x3": (torch.float32, "high"),
    "bf16": (torch.bfloat16, "highest"),
    "fp16": (torch.float16, "highest"),
}
VARIANTS = {
    "linear_logprob_fwd": ("bias", "no bias"),
    "linear_logprob_d_logits": ("bias", "no bias", "no bias, filtered"),
    "linear_logprob_d_hidden_kept": ("-",),
    "linear_logprob_d_weight_kept": ("first chunk", "accumulate", "accumulate in fp32"),
    "dama_loss_fwd": ("-",),
    "dama_loss_bwd": ("grad losses", "no grad losses"),
}
KERNELS = tuple(VARIANTS)
# LLaVA-1.5-7B's head: 4 pairs of 150-token responses, H 4096, V 32064.
NUM_TOKENS, HIDDEN_SIZE, VOCAB_SIZE, NUM_PAIRS = 1200, 4096, 32064, 4
IGNORE_INDEX = -100
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
                torch.int64: "i64"}
# The threshold a filtered variant is built with: a runtime argument, so any value > 0 gives the same kernel.
FILTER_EPS = 2.0**-12


@dataclass(frozen=True)
class CompileSpec:
    kernel: str
    target: str
    precision: str
    variant: str


@dataclass
class CompileRecord:
    """The result of one compile. status: "ok", "failed" (reason says what) or "skipped" (this Triton cannot build
    for the target). Sizes in bytes; None where not read."""

    kernel: str
    target: str
    precision: str
    variant: str
    blocks: str
    status: str = "ok"
    reason: str = ""
    shared_bytes: int | None = None
    shared_limit_bytes: int = 0
    registers: int | None = None
    stack_bytes: int | None = None
    threads: int = 0
    tensor_cores: str = "none"
    needs_tensor_cores: str = "none"
    seconds: float = 0.0


def all_specs(targets: list[str]) -> list[CompileSpec]:
    return [
        CompileSpec(kernel, target, precision, variant)
        for target in targets
        for kernel, variants in VARIANTS.items()
        for precision in PRECISIONS
        for variant in variants
    ]


# The filtered backward's products, by kernel name.
KEPT_PRODUCT_KERNELS = {"linear_logprob_d_hidden_kept": "d_hidden", "linear_logprob_d_weight_kept": "d_weight"}


def logprob_blocks(spec: CompileSpec) -> LinearLogprobBlocks:
    """Blocks of the forward or of the d_logits kernel; for the products, the d_logits tiles they read."""
    kind = "forward" if spec.kernel == "linear_logprob_fwd" else "backward"
    return linear_logprob_blocks(kind, TARGETS[spec.target], PRECISIONS[spec.precision][0])


def kept_blocks(spec: CompileSpec) -> KeptProductBlocks:
    """Blocks of a filtered backward's product (spec.kernel in KEPT_PRODUCT_KERNELS)."""
    map_blocks = logprob_blocks(spec)
    return kept_product_blocks(KEPT_PRODUCT_KERNELS[spec.kernel], PRECISIONS[spec.precision][0],
                               (map_blocks.block_n, map_blocks.block_v))


def build_launch(spec: CompileSpec) -> KernelLaunch:
    """The launch the launcher would make for this spec, on meta tensors (nothing is allocated or run)."""
    dtype, fp32_precision = PRECISIONS[spec.precision]

    def empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")

    with float32_matmul_precision(fp32_precision):
        if spec.kernel.startswith("linear_logprob"):
            hidden = empty(NUM_TOKENS, HIDDEN_SIZE, dtype=dtype)
            weight = empty(VOCAB_SIZE, HIDDEN_SIZE, dtype=dtype)
            bias = empty(VOCAB_SIZE, dtype=dtype) if spec.variant == "bias" else None
            labels = empty(NUM_TOKENS, dtype=torch.int64)
            blocks = logprob_blocks(spec)
            if spec.kernel == "linear_logprob_fwd":
                return linear_logprob_fwd_launch(hidden, weight, labels, bias, blocks)[0]
            # The backward launches the d_logits kernel on one chunk of rows at a time (here one chunk of them all).
            rows = min(NUM_TOKENS, backward_chunk_rows(VOCAB_SIZE, dtype))
            if spec.kernel in KEPT_PRODUCT_KERNELS:
                return kept_product_launch(spec, empty(rows, VOCAB_SIZE, dtype=dtype), hidden[:rows], weight, blocks)
            tile_filter = None
            if spec.variant.endswith("filtered"):  # as the backward filters: words in order of mean logit
                tile_skipped = empty(*d_logits_grid(rows, VOCAB_SIZE, blocks), dtype=torch.int32)
                tile_filter = TileFilter(FILTER_EPS, tile_skipped, empty(VOCAB_SIZE, dtype=torch.int32))
            return linear_logprob_d_logits_launch(
                empty(rows, VOCAB_SIZE, dtype=dtype), hidden[:rows], weight, labels[:rows], bias, empty(rows),
                empty(rows), empty(rows), IGNORE_INDEX, blocks, tile_filter,
            )
        # dama_sigmoid_loss hands the loss kernels fp32 tensors whatever the log-probs' dtype.
        pairs = [empty(NUM_PAIRS, dtype=dtype).to(torch.float32) for _ in range(7)]
        if spec.kernel == "dama_loss_fwd":
            return dama_loss_fwd_launch(*pairs)[0]
        grad_losses = empty(NUM_PAIRS) if spec.variant == "grad losses" else None
        return dama_loss_bwd_launch(empty(), grad_losses, pairs[6], empty(), empty(NUM_PAIRS))[0]


def kept_product_launch(
    spec: CompileSpec,
    d_logits: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    map_blocks: LinearLogprobBlocks,
) -> KernelLaunch:
    """The launch of a filtered backward's product for one chunk (tensors on the meta device)."""
    map_tile = (map_blocks.block_n, map_blocks.block_v)
    row_tiles, vocab_tiles = d_logits_grid(d_logits.shape[0], d_logits.shape[1], map_blocks)

    def tile_list(length: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.empty((length, width), dtype=torch.int32, device="meta"),
                torch.empty(length, dtype=torch.int32, device="meta"))

    vocab_order = torch.empty(d_logits.shape[1], dtype=torch.int32, device="meta")  # as the backward sorts it
    if spec.kernel == "linear_logprob_d_hidden_kept":
        return d_hidden_kept_launch(torch.empty_like(hidden), d_logits, weight, *tile_list(row_tiles, vocab_tiles),
                                    map_tile, kept_blocks(spec), vocab_order)
    d_weight_dtype = torch.float32 if spec.variant == "accumulate in fp32" else weight.dtype
    d_weight = torch.empty(weight.shape, dtype=d_weight_dtype, device="meta")
    return d_weight_kept_launch(d_weight, d_logits, hidden, *tile_list(vocab_tiles, row_tiles), map_tile,
                                kept_blocks(spec), spec.variant != "first chunk", vocab_order)


def specialise(launch: KernelLaunch, backend) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for triton.compiler.ASTSource, as Triton's runtime would specialise the launch.

    Tensors are taken as 16-byte aligned (fresh allocations are); an int equal to 1 becomes a constant and a multiple
    of 16 is marked divisible, unless the kernel opts out for that parameter.
    """
    signature, constexprs, attrs = {}, {}, {}
    divisible = backend.parse_attr("D")
    for index, param in enumerate(launch.kernel.params):
        name, value = param.name, launch.arguments[param.name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
            attrs[(index,)] = divisible
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif isinstance(value, int):
            if value == 1 and not param.do_not_specialize:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(index,)] = divisible
        else:
            raise TypeError(f"{launch.kernel.__name__}: no specialisation rule for {name}={value!r}")
    return signature, constexprs, attrs


def _cuobjdump() -> str | None:
    with contextlib.suppress(ImportError, AttributeError, RuntimeError):
        from triton import knobs

        path = knobs.nvidia.cuobjdump.path
        if path and Path(path).exists():
            return path
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK and SHARED (static) of the cubin's kernel, from `cuobjdump -res-usage`; {} when it cannot be read."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        done = subprocess.run([tool, "-res-usage", file.name], capture_output=True, text=True)
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED):(\d+)", done.stdout)}


def _blocks_text(launch: KernelLaunch) -> str:
    args, options = launch.arguments, launch.options
    warps, stages = options.get("num_warps", 4), options.get("num_stages", 3)
    if "BLOCK_N" in args:
        return f"{args['BLOCK_N']}x{args['BLOCK_V']}x{args['BLOCK_H']} w{warps} s{stages}"
    if "BLOCK_OUT" in args:
        return f"{args['BLOCK_OUT']}x{args['BLOCK_HIDDEN']}x{args['BLOCK_K']} w{warps} s{stages}"
    return f"{args['BLOCK']} w{warps} s{stages}"


def _cannot_target(error: Exception) -> bool:
    """True for errors that say this Triton / ptxas cannot build for the target at all (a skip, not a failure)."""
    text = str(error).lower()
    return bool(re.search(r"(unsupported|not supported|unknown|invalid).{0,40}(arch|target|gpu|sm_\d+)", text))


def _error_text(error: Exception) -> str:
    """One line: where Triton's compile error points, and its root cause (compile errors chain one per call)."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
    text = f"{type(error).__name__}: {lines[0]}"
    if root is not error:
        return f"{text} ... {type(root).__name__}: {str(root).strip()[:300]}"
    return text + (f" ... {lines[-1][:300]}" if len(lines) > 1 else "")


def compile_one(spec: CompileSpec) -> CompileRecord:
    """Compile one spec for its target and judge the result."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    major, minor = TARGETS[spec.target]
    target = GPUTarget("cuda", 10 * major + minor, 32)
    launch = build_launch(spec)
    limits = target_limits((major, minor))
    options = {"num_warps": 4, "num_stages": 3, **launch.options}
    record = CompileRecord(
        kernel=spec.kernel, target=spec.target, precision=spec.precision, variant=spec.variant,
        blocks=_blocks_text(launch), shared_limit_bytes=limits.shared_memory_bytes, threads=32 * options["num_warps"],
    )
    tiles_are_matmuls = spec.kernel.startswith("linear_logprob") and spec.precision != "fp32"
    if tiles_are_matmuls:
        record.needs_tensor_cores = "wgmma" if major >= 9 else "mma"
    started = time.perf_counter()
    try:
        signature, constexprs, attrs = specialise(launch, make_backend(target))
        source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=target, options=options)
    except Exception as error:  # a kernel that does not build is the finding, reported with its reason
        record.status = "skipped" if _cannot_target(error) else "failed"
        record.reason = _error_text(error)
        return record
    finally:
        record.seconds = time.perf_counter() - started

    usage = resource_usage(compiled.asm["cubin"])
    record.shared_bytes = compiled.metadata.shared + usage.get("SHARED", 0)
    record.registers, record.stack_bytes = usage.get("REG"), usage.get("STACK")
    ptx = compiled.asm["ptx"]
    record.tensor_cores = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else "none"

    problems = []
    if record.shared_bytes > limits.shared_memory_bytes:
        problems.append(f"shared memory {record.shared_bytes} B > {limits.shared_memory_bytes} B")
    if record.registers is not None and (
        record.registers > limits.registers_per_thread
        or record.registers * record.threads > limits.registers_per_block
    ):
        problems.append(f"{record.registers} registers x {record.threads} threads exceed the register file")
    if record.needs_tensor_cores != "none" and record.tensor_cores != record.needs_tensor_cores:
        problems.append(f"expected {record.needs_tensor_cores} tensor-core instructions, found {record.tensor_cores}")
    if problems:
        record.status, record.reason = "failed", "; ".join(problems)
    return record


def kernels_are_compilable() -> bool:
    """False under TRITON_INTERPRET=1, where the kernels were built as interpreter stand-ins."""
    return isinstance(_linear_logprob_fwd_kernel, triton.runtime.JITFunction)


def compile_targets(targets: list[str], jobs: int | None = None) -> list[dict]:
    """Compile every kernel x precision x variant for each target (names from TARGETS), `jobs` processes at a time.

    Returns one CompileRecord (as a dict) per spec, in a stable order.
    """
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
    if not kernels_are_compilable():
        raise RuntimeError("the kernels were built for the Triton interpreter: compile with TRITON_INTERPRET unset")
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError as error:
        reason = f"this Triton has no NVIDIA backend ({error})"
        return [asdict(CompileRecord(s.kernel, s.target, s.precision, s.variant, blocks="-", status="skipped",
                                     reason=reason)) for s in all_specs(targets)]
    specs = all_specs(targets)
    # Longest compiles first (fp32 backward), so that no worker is left with a long one at the end.
    order = sorted(range(len(specs)), key=lambda i: (specs[i].kernel != "linear_logprob_d_logits",
                                                     specs[i].precision != "fp32"))
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(specs)))
    # Spawned workers start clean: no CUDA state and no thread pools inherited from this process.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = dict(zip(order, pool.map(compile_one, [specs[i] for i in order]), strict=True))
    return [asdict(done[i]) for i in range(len(specs))]
