"""The one difference across the supported transformers range (5.17 to 6) that dama meets: activation checkpointing.

Later 5.x releases call it `activation_checkpointing` (TrainingArguments fields `activation_checkpointing` and
`activation_checkpointing_kwargs`, model method `activation_checkpointing_enable`) and keep the older
`gradient_checkpointing*` names as deprecated aliases until 6; earlier ones, 5.17 among them, know only the older
names. dama's configs and code use the newer names on every release: ActivationCheckpointingFields adds them where
TrainingArguments lacks them and hands their values on to the older fields (DamaPolicy answers to both method
names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

HAS_ACTIVATION_CHECKPOINTING = "activation_checkpointing" in TrainingArguments.__dataclass_fields__

if HAS_ACTIVATION_CHECKPOINTING:

    @dataclass
    class ActivationCheckpointingFields:
        """Nothing to add: this TrainingArguments has the fields itself."""

else:

    @dataclass
    class ActivationCheckpointingFields:
        """activation_checkpointing(_kwargs) for a TrainingArguments that knows only gradient_checkpointing(_kwargs);
        mix in before TrainingArguments."""

        activation_checkpointing: bool = field(
            default=False,
            metadata={"help": "Recompute each decoder layer's activations in the backward instead of keeping them."},
        )
        activation_checkpointing_kwargs: dict[str, Any] | str | None = field(
            default=None,
            metadata={"help": "every_n_layers, offload, and keywords for torch.utils.checkpoint.checkpoint."},
        )

        def __post_init__(self) -> None:
            if self.activation_checkpointing:
                self.gradient_checkpointing = True
            if self.activation_checkpointing_kwargs is not None:
                self.gradient_checkpointing_kwargs = self.activation_checkpointing_kwargs
            super().__post_init__()
            self.activation_checkpointing = bool(self.gradient_checkpointing)
            self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs

