"""Attention over packed sequences ("varlen"): several segments in one row, each attending only to its own keys.

A packed row holds S query segments end to end; `cu_seqlens` (S + 1,) int32 marks their bounds (segment k is tokens
[cu_seqlens[k], cu_seqlens[k + 1])). By default each segment attends to itself (the packed layout: one segment per
sequence). With a key index, segment k attends instead to the row's tokens key_index[cu_seqlens_k[k]:cu_seqlens_k[k +
1]], in that order: the prefix_shared layout uses this to let a pair's rejected response see the pair's prompt and its
own earlier tokens, but not the chosen response laid out between them. Causal masking is aligned bottom right: with
Lq queries over Lk >= Lq keys, query i sees keys 0 .. i + Lk - Lq (all the prompt's keys, then its own segment's
causally). Three implementations (`impl`):
- "varlen": PyTorch's own FlashAttention-2 varlen kernel, `torch.nn.attention.varlen.varlen_attn` (PyTorch >= 2.10),
  on CUDA fp16/bf16 tensors without dropout; "auto" takes it wherever it applies. One kernel over the whole row: no
  padding, no N x N mask. Its causal switch moved between releases (`is_causal=True` in 2.10-2.11, `window_size=(-1,
  0)` from 2.12), so the call is built from the installed function's signature. Its causal mask is aligned bottom
  right when a segment has fewer queries than keys: varlen_attn runs ATen's copy of FlashAttention-2, whose mask
  keeps key j for query i where j < i + 1 + Lk - Lq with each segment's own Lq and Lk (flash_attn/mask.h; flash-attn's
  README states the same since 2.1), and causal is its window (-1, 0) (flash_api.cpp, set_params_fprop).
- "flash_attn": flash-attn's `flash_attn_varlen_func`, the same kernel from the flash-attn package, when it is
  installed and asked for (it has no wheels on the package index; it is imported on first use only).
- "segments": exact everywhere: PyTorch's scaled_dot_product_attention on each segment's slice (a causal one, or,
  where a segment has more keys than queries, one with that segment's (Lq, Lk) bottom-right mask), key/value heads
  repeated for grouped-query attention. Differentiable; one call per segment; the CPU path.
With a key index, the kernels read the keys of every segment gathered into one stream first, which is what their
cu_seqlens_k indexes. Grouped-query attention: the kernels take fewer key/value heads natively.

Host syncs. On a GPU every value check of the bounds would copy them to the host in every layer. The kernel paths
therefore check shapes and dtypes only and take the longest segments as Python ints; the values are checked once per
batch on the CPU, where the collators build them (`check_packed_segments`). The "segments" path needs the bounds on
the host anyway and checks them there.

transformers integration: `register_packed_attention()` registers `packed_attention_forward` under the name
"dama_packed" with transformers' AttentionInterface; `use_packed_attention(model)` also switches the language
model to it (a LLaVA's vision tower keeps its own attention: its images are not packed). transformers' Llama decoder
layers hand their forward's extra keyword arguments to the attention function, so the packed bounds travel as
transformers' own varlen keywords, as `PackedBatch.model_inputs()` writes them:
    model(input_ids=..., position_ids=..., cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m,
          use_cache=False)
and a key index as one more keyword, `key_index` (then cu_seq_lens_k bounds the gathered keys), as
`PrefixSharedBatch.model_inputs()` writes it; the keyword `packed_attention_impl` picks the implementation ("auto"
when absent).
Without cu_seq_lens_q the bounds are read from position_ids (a sequence starts where the position does not grow
by one), and without those each batch row is one sequence. "dama_packed" also registers a mask function, which
refuses a padding mask: packed attention takes no padding, and transformers would otherwise drop the mask unseen.
No KV cache: this is for training (and scoring), where all keys are computed in the same forward as the queries.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from dama.options import PACKED_ATTENTION_IMPLS

ATTENTION_NAME = "dama_packed"
IMPLS = PACKED_ATTENTION_IMPLS
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _flash_varlen():
    """flash_attn_varlen_func, or None when flash-attn is not installed (it is an optional GPU extra)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen():
    """torch.nn.attention.varlen.varlen_attn, or None before PyTorch 2.10."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _varlen_call_form(function: Callable) -> tuple[dict[str, Any], bool]:
    """(the causal keyword argument, whether it takes enable_gqa) of a varlen_attn, read from its signature."""
    parameters = inspect.signature(function).parameters
    if "window_size" in parameters:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in parameters:
        causal = {"is_causal": True}
    else:
        raise ValueError("this torch's varlen_attn takes neither window_size nor is_causal, so it cannot mask "
                         "causally; use impl='segments' or another torch release")
    return causal, "enable_gqa" in parameters


def _resolve_impl(impl: str, query: torch.Tensor, dropout: float) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    kernel_inputs = query.is_cuda and query.dtype in KERNEL_DTYPES
    if impl == "varlen" and not (_torch_varlen() is not None and kernel_inputs and dropout == 0.0):
        raise ValueError(
            "impl='varlen' needs torch >= 2.10 (torch.nn.attention.varlen), CUDA fp16/bf16 tensors and no dropout, "
            f"got torch {torch.__version__}, {query.device} {query.dtype}, dropout {dropout}; use 'auto'"
        )
    if impl == "flash_attn" and not (_flash_varlen() is not None and kernel_inputs):
        raise ValueError(
            "impl='flash_attn' needs flash-attn installed and CUDA fp16/bf16 tensors, got "
            f"{query.device} {query.dtype} with flash-attn {'present' if _flash_varlen() else 'absent'}; use 'auto'"
        )
    if impl == "auto":
        return "varlen" if _torch_varlen() is not None and kernel_inputs and dropout == 0.0 else "segments"
    return impl


def _check_index_tensor(tensor: torch.Tensor, name: str, device: torch.device) -> None:
    """Shape, dtype and device of a bound or index tensor (no look at its values: that would sync a GPU)."""
    if tensor.dim() != 1 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor, got {tuple(tensor.shape)} {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the attention inputs on {device}; move the batch with "
                         "batch.to(device)")


def _check_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int, name: str = "cu_seqlens") -> list[int]:
    """The bounds as Python ints, after checking that they rise strictly from 0 to num_tokens."""
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"{name} must be (S + 1,) with S >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {cu_seqlens.dtype}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != num_tokens or any(b <= a for a, b in pairwise(bounds)):
        raise ValueError(
            f"{name} must rise strictly from 0 to the {num_tokens} packed tokens, got {bounds[:6]}"
            f"{' ...' if len(bounds) > 6 else ''}; build it with PackedCollator or PrefixSharedCollator"
        )
    return bounds


def check_packed_segments(cu_seqlens: torch.Tensor, num_tokens: int, *, key_index: torch.Tensor | None = None,
                          cu_seqlens_k: torch.Tensor | None = None,
                          causal: bool = True) -> tuple[list[int], list[int]]:
    """Checks the values of a row's attention segments; returns (query bounds, key bounds) as Python ints.

    Reads every value, so on a GPU it waits for the device: the collators call it once per batch on the CPU, and
    the "segments" path calls it on whatever device the bounds are. Shapes as in `packed_attention`.
    """
    bounds = _check_cu_seqlens(cu_seqlens, num_tokens)
    if key_index is None:
        if cu_seqlens_k is not None and cu_seqlens_k is not cu_seqlens and not torch.equal(
                cu_seqlens_k.to(cu_seqlens.device), cu_seqlens):
            raise ValueError("without a key_index each segment attends to itself: cu_seqlens_k must equal cu_seqlens")
        return bounds, bounds
    if cu_seqlens_k is None:
        raise ValueError("a key_index needs cu_seqlens_k, the bounds of each segment's keys within it")
    if key_index.dim() != 1 or key_index.dtype.is_floating_point or key_index.dtype == torch.bool:
        raise ValueError(f"key_index must be a 1-D integer tensor, got {tuple(key_index.shape)} {key_index.dtype}")
    key_bounds = _check_cu_seqlens(cu_seqlens_k, key_index.shape[0], "cu_seqlens_k")
    if len(key_bounds) != len(bounds):
        raise ValueError(f"cu_seqlens_k bounds {len(key_bounds) - 1} key segments for "
                         f"{len(bounds) - 1} query segments; give one key segment per query segment")
    low, high = torch.aminmax(key_index)
    if int(low) < 0 or int(high) >= num_tokens:
        raise ValueError(f"key_index must point into the {num_tokens} tokens of the row, got values "
                         f"{int(low)} .. {int(high)}")
    if causal and any(kb - ka < qb - qa for (qa, qb), (ka, kb) in zip(pairwise(bounds), pairwise(key_bounds),
                                                                      strict=True)):
        raise ValueError("causal attention aligned bottom right needs at least as many keys as queries in every "
                         "segment; a query before the first key would see nothing")
    return bounds, key_bounds


def packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    *,
    key_index: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    causal: bool = True,
    impl: str = "auto",
) -> torch.Tensor:
    """Attention of each packed segment over its keys: its own tokens, or those a key index names.

    Value: for each segment k, softmax(q_k K_k^T * scaling + causal mask) V_k, where q_k are the row's tokens
    [cu_seqlens[k], cu_seqlens[k + 1]) and K_k, V_k the same tokens' keys and values, or, with key_index, those of the
    row's tokens key_index[cu_seqlens_k[k]:cu_seqlens_k[k + 1]]. The causal mask is aligned bottom right: of Lq
    queries over Lk keys, query i sees keys j <= i + Lk - Lq (Lk = Lq: the usual causal mask). Grouped-query
    attention: head h reads key/value head h // (Hq / Hkv), as transformers' repeat_kv does.

    Shapes:
        query (N, Hq, D); key, value (N, Hkv, D) with Hq a multiple of Hkv; cu_seqlens (S + 1,) integer, from 0 to N;
        key_index (K,) integer in [0, N) and cu_seqlens_k (S + 1,) integer, from 0 to K, both or neither
        -> (N, Hq, D), the dtype of query.
    max_seqlen, max_seqlen_k: the longest query and key segment, Python ints (computed when None, which on a GPU
    waits for the device: the collators give them). scaling defaults to D ** -0.5.
    impl: "auto" (PyTorch's varlen kernel where it applies, else "segments"), "varlen", "flash_attn", "segments".
    The kernel paths check shapes and dtypes only; `check_packed_segments` checks the values (module docstring).
    """
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
        raise ValueError(f"query, key, value must be (N, heads, D), got {tuple(query.shape)}, {tuple(key.shape)}, "
                         f"{tuple(value.shape)}")
    if key.shape != value.shape or key.shape[0] != query.shape[0] or key.shape[2] != query.shape[2]:
        raise ValueError(f"key and value must be (N, Hkv, D) like query's N and D, got query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}, value {tuple(value.shape)}")
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"the {num_heads} query heads must be a multiple of the {num_kv_heads} key/value heads")
    if key_index is not None and cu_seqlens_k is None:
        raise ValueError("a key_index needs cu_seqlens_k, the bounds of each segment's keys within it")
    impl = _resolve_impl(impl, query, dropout)
    if impl == "segments":
        bounds, key_bounds = check_packed_segments(cu_seqlens, query.shape[0], key_index=key_index,
                                                   cu_seqlens_k=cu_seqlens_k, causal=causal)
        if key_index is not None:
            key, value = key.index_select(0, key_index), value.index_select(0, key_index)
        return _segments_attention(query, key, value, bounds, key_bounds, scaling, dropout, causal)

    for name, tensor in (("cu_seqlens", cu_seqlens), ("cu_seqlens_k", cu_seqlens_k), ("key_index", key_index)):
        if tensor is not None:
            _check_index_tensor(tensor, name, query.device)
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be (S + 1,) with S >= 1, got shape {tuple(cu_seqlens.shape)}")
    cu_seqlens_q = cu_seqlens.to(torch.int32)
    if key_index is None:
        if cu_seqlens_k is not None and cu_seqlens_k is not cu_seqlens and cu_seqlens_k.shape != cu_seqlens.shape:
            raise ValueError("without a key_index each segment attends to itself: cu_seqlens_k must equal cu_seqlens")
        cu_seqlens_k, max_seqlen_k = cu_seqlens_q, max_seqlen
    else:
        if cu_seqlens_k.shape != cu_seqlens.shape:
            raise ValueError(f"cu_seqlens_k bounds {cu_seqlens_k.shape[0] - 1} key segments for "
                             f"{cu_seqlens.shape[0] - 1} query segments; give one key segment per query segment")
        cu_seqlens_k = cu_seqlens_k.to(torch.int32)
        # One stream of every segment's keys, in segment order: what the kernels' cu_seqlens_k indexes. The backward
        # of the gather sums the gradients of a key that several segments read (a shared prompt's keys).
        key, value = key.index_select(0, key_index), value.index_select(0, key_index)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    if max_seqlen_k is None:
        max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    if impl == "flash_attn":
        return _flash_varlen()(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen, max_seqlen_k,
                               dropout_p=dropout, softmax_scale=scaling, causal=causal)
    varlen_attn = _torch_varlen()
    causal_form, takes_gqa = _varlen_call_form(varlen_attn)
    options = dict(causal_form) if causal else {}
    if num_heads != num_kv_heads:
        if takes_gqa:
            options["enable_gqa"] = True
        else:
            key = key.repeat_interleave(num_heads // num_kv_heads, dim=1)
            value = value.repeat_interleave(num_heads // num_kv_heads, dim=1)
    return varlen_attn(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen, max_seqlen_k, scale=scaling,
                       **options)


def _segments_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int],
                        key_bounds: list[int], scaling: float | None, dropout: float, causal: bool) -> torch.Tensor:
    """The exact path: one sdpa call per segment. query (N, Hq, D); key, value (K, Hkv, D) gathered -> (N, Hq, D)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    # (1, heads, N, D): sdpa attends over the second-to-last axis. The batch axis matters: with 4-D inputs the CPU
    # takes its flash kernel, with 3-D the math one, which keeps a heads x L x L probability tensor for the backward
    # (fwd + bwd of one causal (4 heads, 800, 64) sequence on 2 idle cores: 0.026 s -> 0.011 s).
    query, key, value = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    outputs = []
    for (start, end), (key_start, key_end) in zip(pairwise(bounds), pairwise(key_bounds), strict=True):
        num_queries, num_keys = end - start, key_end - key_start
        mask = None
        if causal and num_keys > num_queries:
            # sdpa's is_causal aligns top left; this segment's mask is (Lq, Lk), never one over the whole row.
            mask = torch.ones(num_queries, num_keys, dtype=torch.bool, device=query.device).tril(num_keys - num_queries)
        outputs.append(F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, key_start:key_end], value[:, :, key_start:key_end], attn_mask=mask,
            dropout_p=dropout, is_causal=causal and mask is None, scale=scaling,
        ))
    return torch.cat(outputs, dim=2).squeeze(0).transpose(0, 1)  # (N, Hq, D)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) positions -> (S + 1,) int32 bounds over the B * T flattened tokens.

    A sequence starts at every row start and wherever the position does not grow by exactly one.
    """
    flat = position_ids.reshape(position_ids.shape[0], -1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[:, 1:] = flat[:, 1:] != flat[:, :-1] + 1
    start_index = starts.reshape(-1).nonzero().squeeze(1)
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([start_index, end]).to(torch.int32)


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface around `packed_attention`.

    Shapes: query (B, Hq, T, D), key and value (B, Hkv, T, D) -> ((B, T, Hq, D), None). The B * T tokens are one
    packed stream; its bounds come from cu_seq_lens_q, else position_ids, else the rows (module docstring). With the
    keyword key_index (K,), segment k attends to the tokens key_index[cu_seq_lens_k[k]:cu_seq_lens_k[k + 1]].
    """
    if attention_mask is not None:
        raise ValueError(
            f"{ATTENTION_NAME} attention takes packed batches without an attention mask (they have no padding); "
            "pass cu_seq_lens_q/k as PackedBatch.model_inputs() does, or use 'sdpa' for padded batches"
        )
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise ValueError(f"{ATTENTION_NAME} attention supports neither sliding windows nor softcapping")
    batch, num_heads, length, head_dim = query.shape
    if key.shape[2] != length:
        raise ValueError(
            f"{ATTENTION_NAME} attention needs keys for exactly the query tokens ({length}), got {key.shape[2]}: "
            "there is no KV cache in packed training; call the model with use_cache=False"
        )
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    max_seqlen = kwargs.get("max_length_q")
    cu_seqlens_k = kwargs.get("cu_seq_lens_k")
    key_index = kwargs.get("key_index")
    if key_index is not None:
        if cu_seqlens is None or cu_seqlens_k is None:
            raise ValueError(f"{ATTENTION_NAME} attention with a key_index needs cu_seq_lens_q and cu_seq_lens_k; "
                             "pass PrefixSharedBatch.model_inputs()")
        key_segments = {"key_index": key_index, "cu_seqlens_k": cu_seqlens_k,
                        "max_seqlen_k": kwargs.get("max_length_k")}
    else:
        key_segments = {}
        if cu_seqlens is None:
            position_ids = kwargs.get("position_ids")
            if position_ids is not None and position_ids.shape[-1] == length:
                cu_seqlens = cu_seqlens_from_position_ids(position_ids.expand(batch, -1))
            else:
                cu_seqlens = torch.arange(0, batch * length + 1, length, dtype=torch.int32, device=query.device)
            max_seqlen = None
        else:
            # Passed on to packed_attention, which checks it against cu_seq_lens_q.
            key_segments = {"cu_seqlens_k": cu_seqlens_k}
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # (B, H, T, D) -> (B * T, H, D): one stream of tokens.
    flat = [t.transpose(1, 2).reshape(batch * length, t.shape[1], head_dim) for t in (query, key, value)]
    output = packed_attention(*flat, cu_seqlens, max_seqlen, **key_segments, scaling=scaling, dropout=dropout,
                              causal=causal, impl=kwargs.get("packed_attention_impl") or "auto")
    return output.reshape(batch, length, num_heads, head_dim), None


def _refuse_padding_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> None:
    """The mask function of "dama_packed": no mask is built (the attention reads the bounds), and padding is refused."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            f"{ATTENTION_NAME} attention got a padding mask; packed batches have no padding. Use PackedCollator "
            "and PackedBatch.model_inputs(), or 'sdpa'/'eager' attention for padded batches."
        )
    return None


def register_packed_attention() -> str:
    """Registers "dama_packed" with transformers (idempotent); returns the name for `attn_implementation`."""
    AttentionInterface.register(ATTENTION_NAME, packed_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, _refuse_padding_mask)
    return ATTENTION_NAME


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switches the language model of `model` (a LLaVA or a causal LM) to "dama_packed" attention.

    A LLaVA's vision tower keeps its attention implementation: each image is one unpadded sequence already.
    """
    register_packed_attention()
    if "text_config" in getattr(model.config, "sub_configs", {}):
        model.set_attn_implementation({"text_config": ATTENTION_NAME})
    else:
        model.set_attn_implementation(ATTENTION_NAME)
