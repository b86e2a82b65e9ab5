"""DamaPolicy, the module that turns a preference batch into sequence log-probs.

DamaPolicy.forward(batch) -> (S,) runs the vision tower once per pair, the language model over the batch's layout
(prefix-shared or packed: one row, varlen attention; padded: (S, T) with a mask), takes the last hidden states at
the supervised positions only and scores them with the fused head, which never builds the (tokens x vocab) logits.

The head is a module of its own that shares the lm_head's Parameters: engines that hook modules (DeepSpeed ZeRO-3
gathers a module's partitioned weights around its forward, and again before its backward) then gather the head's
weight exactly when the fused kernels use it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

import dama_kernels
from dama.model.attention import IMPLS as ATTENTION_IMPLS
from dama.model.attention import use_packed_attention
from dama.options import HEADS

from ..data.batch import PackedBatch, PreferenceBatch, PrefixSharedBatch


class SequenceLogpsHead(nn.Module):
    """The lm_head as a scorer: sums of label log-probs per sequence from hidden states, without logits.

    Shares the Parameters of `lm_head` (no copy). forward(hidden (M, H), target_ids (M,), seq_ids (M,), num_seqs)
    -> (S,) fp32. grad_filter_eps: the backward's gradient filter (dama_kernels.grad_filter; None: the dtype's
    default, 0: off). skip_filtered_tiles: whether the Triton backward's products skip the filtered tiles or stay
    dense (cuBLAS); off until a caller that counts the filtered tiles (DamaTrainer) finds enough of them.
    """

    def __init__(self, lm_head: nn.Linear, impl: str = "auto", grad_filter_eps: float | None = None) -> None:
        super().__init__()
        self.weight = lm_head.weight
        self.bias = lm_head.bias
        self.impl = impl
        self.grad_filter_eps = grad_filter_eps
        self.skip_filtered_tiles = False

    def forward(self, hidden: torch.Tensor, target_ids: torch.Tensor, seq_ids: torch.Tensor,
                num_seqs: int) -> torch.Tensor:
        # The rows are the supervised ones already: no search for ignored labels (a host sync on a GPU).
        return dama_kernels.sequence_logps(hidden, self.weight, target_ids, seq_ids, num_seqs, bias=self.bias,
                                           impl=self.impl, grad_filter_eps=self.grad_filter_eps,
                                           gather_supervised=False, skip_filtered_tiles=self.skip_filtered_tiles)

    def token_logps(self, hidden: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """Per-token log-probs (M,) fp32 of the same head, for passes that store them (reference precompute)."""
        return dama_kernels.token_logps(hidden, self.weight, target_ids, bias=self.bias, impl=self.impl,
                                        gather_supervised=False)


class DamaPolicy(nn.Module):
    """LLaVA + the fused head. forward(batch) -> policy log-probs (S,) fp32.

    head="fused" scores only supervised positions from hidden states; head="full_logits" runs the model's lm_head
    over every position, log-softmax and gather (the usual DPO trainer, kept as the baseline it is measured against).
    The log-probs are sums over each response, or means when average_logps. attention_impl picks the packed
    attention's implementation (dama.model.attention.IMPLS; "flash_attn" asks for flash-attn's kernel);
    grad_filter_eps the fused head's gradient filter (dama_kernels.grad_filter).
    Neither this wiring nor the packed attention reads a device value back to the host: the batch carries its bounds
    and longest segments as the collator computed them on the CPU. (transformers' LLaVA checks once per forward that
    the image tokens match the features, a sync that TRANSFORMERS_DISABLE_TORCH_CHECK=1 switches off.)
    """

    def __init__(self, llava: LlavaForConditionalGeneration, *, head: str = "fused", impl: str = "auto",
                 average_logps: bool = False, packed_attention: bool = True, attention_impl: str = "auto",
                 grad_filter_eps: float | None = None) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.llava = llava
        self.head = SequenceLogpsHead(llava.lm_head, impl, grad_filter_eps)
        self.head_kind = head
        self.average_logps = average_logps
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
        self.attention_impl = attention_impl
        if packed_attention:
            use_packed_attention(llava)

    @property
    def config(self):
        """The LLaVA's config: engines read sizes from it (DeepSpeed fills its "auto" bucket sizes this way)."""
        return self.llava.config

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute the LLaVA's layer activations in the backward; the Trainer calls this with these arguments when
        `activation_checkpointing` is on, and they go to LlavaForConditionalGeneration's method of the same name
        (`gradient_checkpointing_enable` in transformers releases before the rename, 5.17 among them)."""
        if hasattr(self.llava, "activation_checkpointing_enable"):
            self.llava.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs,
                                                       every_n_layers=every_n_layers, offload=offload)
        else:
            self.llava.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs,
                                                     every_n_layers=every_n_layers, offload=offload)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None,
                                      every_n_layers: int = 1, offload: bool = False) -> None:
        """activation_checkpointing_enable under the name transformers releases before the rename call."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers, offload)

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(getattr(module, "gradient_checkpointing", False) for module in self.llava.modules())

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    def forward(self, batch: PreferenceBatch) -> torch.Tensor:
        if self.head_kind == "fused":
            logps = self.head(self.supervised_hidden_states(batch), batch.supervised_target_ids,
                              batch.supervised_seq_ids, batch.num_seqs)
        else:
            hidden = self._last_hidden_states(batch)
            logits = self.llava.lm_head(hidden.reshape(-1, hidden.shape[-1])).float()  # (N, V): what fused avoids
            token_logps = logits.log_softmax(-1).index_select(0, batch.supervised_positions)
            token_logps = token_logps.gather(1, batch.supervised_target_ids.unsqueeze(1)).squeeze(1)
            logps = dama_kernels.sum_per_sequence(token_logps, batch.supervised_seq_ids, batch.num_seqs)
        if self.average_logps:
            logps = logps / batch.supervised_counts.clamp(min=1).to(logps.dtype)
        return logps

    def supervised_hidden_states(self, batch: PreferenceBatch) -> torch.Tensor:
        """Last hidden states (M, H) at the batch's supervised positions: the only rows the head scores."""
        hidden = self._last_hidden_states(batch)  # (1, N, H) packed or (S, T, H) padded
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.supervised_positions)

    def _last_hidden_states(self, batch: PreferenceBatch) -> torch.Tensor:
        backbone = self.llava.model
        # Each pair's image once through the vision tower; image slot k then shows image image_index[k].
        vision_dtype = next(backbone.vision_tower.parameters()).dtype
        image_outputs = backbone.get_image_features(pixel_values=batch.pixel_values.to(vision_dtype), return_dict=True)
        # A list of P (T_img, H) features; slot k shows image image_index[k], gathered on the device (no host copy of
        # the index).
        features = torch.stack(image_outputs.pooler_output).index_select(0, batch.image_index)  # (I, T_img, H)
        slots = features.flatten(0, 1)  # (I * T_img, H)
        inputs = batch.model_inputs()
        # The image features go into the token embeddings here rather than through the LLaVA's forward, whose way of
        # taking precomputed features differs across transformers releases (5.17 has none).
        input_ids = inputs.pop("input_ids")
        embeds = backbone.get_input_embeddings()(input_ids)
        # The collator checked once per batch, on the host, that every image slot has its features; transformers'
        # own placeholder check would count the tokens on the device and wait for it.
        image_tokens = (input_ids == self.llava.config.image_token_id).unsqueeze(-1)  # (B, T, 1)
        embeds = embeds.masked_scatter(image_tokens, slots.to(embeds.device, embeds.dtype))
        attention = self.llava.config.text_config._attn_implementation
        if isinstance(batch, PackedBatch) and attention not in ("dama_packed", "flash_attention_2"):
            raise ValueError("a packed batch needs packed attention: build DamaPolicy with packed_attention=True")
        if isinstance(batch, PrefixSharedBatch) and attention != "dama_packed":
            raise ValueError(f"a prefix-shared batch needs dama_packed attention (its responses read the prompt's "
                             f"keys through key_index), not {attention!r}: build DamaPolicy with packed_attention=True")
        if isinstance(batch, PackedBatch | PrefixSharedBatch):
            inputs["packed_attention_impl"] = self.attention_impl
        outputs = backbone(inputs_embeds=embeds, **inputs)
        return outputs.last_hidden_state
