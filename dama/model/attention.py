"""Attention over packed sequences ("varlen"): several sequences in one row, each attending only to itself.

A packed row holds S sequences end to end; `cu_seqlens` (S + 1,) int32 marks their bounds (sequence k is tokens
[cu_seqlens[k], cu_seqlens[k + 1])). Two implementations, chosen per call:
- flash-attn's `flash_attn_varlen_func`, when flash-attn is importable, the tensors are on CUDA and in fp16/bf16:
  one kernel over the whole row, no padding, no N x N mask, grouped-query attention handled natively;
- an exact fallback everywhere else: PyTorch's scaled_dot_product_attention on each sequence's slice, key/value
  heads repeated for grouped-query attention. Differentiable; costs one call per sequence.
flash-attn is imported on first use only: it needs CUDA to install, and this module must import without it.

transformers integration: `register_packed_attention()` registers `packed_attention_forward` under the name
"dama_packed" with transformers' AttentionInterface; `use_packed_attention(model)` also switches the language
model to it (a LLaVA's vision tower keeps its own attention: its images are not packed). transformers' Llama decoder
layers hand their forward's extra keyword arguments to the attention function, so the packed bounds travel as
transformers' own varlen keywords, as `PackedBatch.model_inputs()` writes them:
    model(input_ids=..., position_ids=..., cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m,
          use_cache=False)
Without cu_seq_lens_q the bounds are read from position_ids (a sequence starts where the position does not grow
by one), and without those each batch row is one sequence. "dama_packed" also registers a mask function, which
refuses a padding mask: packed attention takes no padding, and transformers would otherwise drop the mask unseen.
No KV cache: this is for training (and scoring), where the keys are the queries' own tokens.
"""

from __future__ import annotations

import functools
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

ATTENTION_NAME = "dama_packed"
IMPLS = ("auto", "flash", "torch")
FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _flash_varlen():
    """flash_attn_varlen_func, or None when flash-attn is not installed (it is an optional GPU extra)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _resolve_impl(impl: str, query: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    usable = _flash_varlen() is not None and query.is_cuda and query.dtype in FLASH_DTYPES
    if impl == "flash" and not usable:
        raise ValueError(
            "impl='flash' needs flash-attn installed and CUDA fp16/bf16 tensors, got "
            f"{query.device} {query.dtype} with flash-attn {'present' if _flash_varlen() else 'absent'}; use 'auto'"
        )
    if impl == "auto":
        return "flash" if usable else "torch"
    return impl


def _check_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be (S + 1,) with S >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != num_tokens or any(b <= a for a, b in pairwise(bounds)):
        raise ValueError(
            f"cu_seqlens must rise strictly from 0 to the {num_tokens} packed tokens, got {bounds[:6]}"
            f"{' ...' if len(bounds) > 6 else ''}; build it with PackedCollator"
        )


def packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    causal: bool = True,
    impl: str = "auto",
) -> torch.Tensor:
    """Attention of each packed sequence with itself only.

    Value: for each k, softmax(q_k k_k^T * scaling + causal mask) v_k on the slice of sequence k, with the key/value
    heads of grouped-query attention shared by num_heads / num_kv_heads query heads each (head h reads kv head
    h // groups, as transformers' repeat_kv does).

    Shapes:
        query (N, Hq, D); key, value (N, Hkv, D) with Hq a multiple of Hkv; cu_seqlens (S + 1,) integer, from 0 to N
        -> (N, Hq, D), the dtype of query.
    max_seqlen: the longest sequence (computed when None). scaling defaults to D ** -0.5. impl: "auto" (flash-attn
    when usable, else "torch"), "flash", "torch".
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
    _check_cu_seqlens(cu_seqlens, query.shape[0])
    impl = _resolve_impl(impl, query)
    if impl == "flash":
        cu_seqlens = cu_seqlens.to(device=query.device, dtype=torch.int32)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return _flash_varlen()(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                               dropout_p=dropout, softmax_scale=scaling, causal=causal)

    groups = num_heads // num_kv_heads
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    # (1, heads, N, D): sdpa attends over the second-to-last axis. The batch axis matters: with 4-D inputs the CPU
    # takes its flash kernel, with 3-D the math one, which keeps a heads x L x L probability tensor for the backward
    # (fwd + bwd of one causal (4 heads, 800, 64) sequence on 2 idle cores: 0.026 s -> 0.011 s).
    query, key, value = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    bounds = cu_seqlens.tolist()
    outputs = [
        F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
            dropout_p=dropout, is_causal=causal, scale=scaling,
        )
        for start, end in pairwise(bounds)
    ]
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
    packed stream; its bounds come from cu_seq_lens_q, else position_ids, else the rows (module docstring).
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
    if cu_seqlens is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and position_ids.shape[-1] == length:
            cu_seqlens = cu_seqlens_from_position_ids(position_ids.expand(batch, -1))
        else:
            cu_seqlens = torch.arange(0, batch * length + 1, length, dtype=torch.int32)
        max_seqlen = None
    elif cu_seqlens_k is not None and cu_seqlens_k is not cu_seqlens and not torch.equal(cu_seqlens_k, cu_seqlens):
        raise ValueError(f"{ATTENTION_NAME} attention is self-attention: cu_seq_lens_k must equal cu_seq_lens_q")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # (B, H, T, D) -> (B * T, H, D): one stream of tokens.
    flat = [t.transpose(1, 2).reshape(batch * length, t.shape[1], head_dim) for t in (query, key, value)]
    output = packed_attention(*flat, cu_seqlens, max_seqlen, scaling=scaling, dropout=dropout, causal=causal)
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
