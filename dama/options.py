"""The option groups the commands share, and every allowed-values set and bound, each written once.

A value set is a `Literal` type; its tuple (`OVERLONG_POLICIES`, ...) is read from the type, so the dataclass field,
the command line's choices (HfArgumentParser reads the `Literal`), the checks and the help all use one definition.
Each group documents its fields in their `help` (what `--help` and README's config table print) and checks itself in
`__post_init__`, raising DamaError. A command's options are its groups combined in one dataclass (precompute-ref:
`PassOptions`, `RowOptions`, `EncodingOptions`, `LlavaOptions` and its batching); `encoding` hands a group on whole.
`dama.option_loader` reads them from a YAML file and the command line.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Literal, get_args

from dama.errors import DamaError

Overlong = Literal["error", "skip"]
BadRowPolicy = Literal["error", "skip"]
ImageAspectRatio = Literal["crop", "pad"]
Layout = Literal["prefix_shared", "packed", "padded"]
DtypeName = Literal["float32", "bfloat16", "float16"]
Head = Literal["fused", "full_logits"]
Attention = Literal["packed", "sdpa", "eager"]
PackedAttentionImpl = Literal["auto", "varlen", "flash_attn", "segments"]
Reference = Literal["precomputed", "online"]

OVERLONG_POLICIES: tuple[str, ...] = get_args(Overlong)
BAD_ROW_POLICIES: tuple[str, ...] = get_args(BadRowPolicy)
IMAGE_ASPECT_RATIOS: tuple[str, ...] = get_args(ImageAspectRatio)
LAYOUTS: tuple[str, ...] = get_args(Layout)
DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)
HEADS: tuple[str, ...] = get_args(Head)
ATTENTIONS: tuple[str, ...] = get_args(Attention)
PACKED_ATTENTION_IMPLS: tuple[str, ...] = get_args(PackedAttentionImpl)
REFERENCES: tuple[str, ...] = get_args(Reference)
# A sequence holds at least one prompt token and one response token.
MIN_MAX_LENGTH = 2

# LLaVA's `vicuna_v1` conversation, the one LLaVA-1.5 was instruction-tuned with and the DAMA authors trained with.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """DamaError unless `value` is one of `choices`."""
    if value not in choices:
        raise DamaError(f"{name} must be one of {choices}, got {value!r}")


def check_at_least(name: str, value: int | float | None, least: int | float, optional: bool = False) -> None:
    """DamaError unless `value` >= `least` (None passes when `optional`)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= least:
        raise DamaError(f"{name} must be at least {least}, got {value!r}")


def group_values(group: type, options: object) -> dict[str, object]:
    """The values of `group`'s fields on `options` (an instance of a dataclass that includes the group)."""
    return {f.name: getattr(options, f.name) for f in fields(group) if f.init}


def option_field(group: type, name: str) -> Field:
    """The dataclass field `name` of `group` (to declare it again with a narrower type, keeping its help)."""
    return {f.name: f for f in fields(group)}[name]


def default_device() -> str:
    """cuda when this machine has a CUDA GPU, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class EncodingOptions:
    """How a pair becomes the tokens and pixels the model sees; training and precompute-ref must agree on it."""

    max_length: int = field(
        default=2048,
        metadata={"help": "Most tokens of one sequence (prompt + image tokens + response); a pair is never truncated, "
                  "see overlong. precompute-ref must use training's."},
    )
    overlong: Overlong = field(
        default="error",
        metadata={"help": "A pair longer than max_length: stop with an error naming it, or skip it (counted, logged "
                  "and listed: in output_dir/skipped_rows.json in training, in the metadata of precompute-ref)."},
    )
    image_aspect_ratio: ImageAspectRatio = field(
        default="crop",
        metadata={"help": "Image preprocessing: 'crop' resizes the shortest side and centre-crops (CLIP's, the DAMA "
                  "authors' trainer); 'pad' first expands the image to a square of the processor's mean colour "
                  "(LLaVA-1.5's instruction tuning). precompute-ref must use the same setting."},
    )
    system_prompt: str = field(
        default=VICUNA_V1_SYSTEM,
        metadata={"help": "System text of the conversation template \"{system} USER: <image>\\n{question} "
                  "ASSISTANT: {answer}</s>\". Default: LLaVA-1.5's vicuna v1 wording (its instruction tuning and the "
                  "DAMA authors' trainer); set it for checkpoints tuned with another. precompute-ref must use the "
                  "same (--system-prompt)."},
    )
    layout: Layout = field(
        default="prefix_shared",
        metadata={"help": "Micro-batch layout: 'prefix_shared' puts each pair in one row as [prompt | chosen | "
                  "rejected], so the image and prompt tokens go through the language model once per pair (exact: "
                  "each response attends to the prompt and itself only); 'packed' puts the 2P sequences in one row "
                  "without padding; 'padded' pads chosen and rejected to one length (the usual layout, a baseline; "
                  "training only). precompute-ref's log-probs agree across layouts up to float rounding."},
    )

    def __post_init__(self) -> None:
        self.check_encoding_options()

    def check_encoding_options(self) -> None:
        """DamaError naming the first invalid encoding option and its allowed values."""
        check_at_least("max_length", self.max_length, MIN_MAX_LENGTH)
        check_choice("overlong", self.overlong, OVERLONG_POLICIES)
        check_choice("image_aspect_ratio", self.image_aspect_ratio, IMAGE_ASPECT_RATIOS)
        check_choice("layout", self.layout, LAYOUTS)
        if not isinstance(self.system_prompt, str):
            raise DamaError(f"system_prompt must be text, got {self.system_prompt!r}")

    @property
    def encoding(self) -> EncodingOptions:
        """This group alone (from a command's options that include it)."""
        return EncodingOptions(**group_values(EncodingOptions, self))


@dataclass
class PassOptions:
    """What a pass over a dataset reads and writes (`dama hardness`, `precompute-ref`, `generate`, `make-pairs`)."""

    input: str | None = field(
        default=None,
        metadata={"help": "The rows to read: an RLAIF-V .parquet file or folder of shards, or a .json list (generate "
                  "and make-pairs also read a .jsonl of {image, question})."},
    )
    output: str | None = field(
        default=None,
        metadata={"help": "The file to write: .parquet or .json like the input (generate: .jsonl; make-pairs: "
                  ".parquet)."},
    )
    image_folder: str | None = field(
        default=None,
        metadata={"help": "Folder that relative image paths are resolved under (default: the input's folder, or the "
                  "input folder of shards)."},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace an output that holds another run's results (otherwise refused; rerunning a "
                  "finished run with the same input and settings reports it complete and does nothing)."},
    )
    limit: int | None = field(default=None, metadata={"help": "Read only the first N rows (for a trial run)."})
    device: str = field(
        default_factory=default_device,
        metadata={"help": "Torch device for the model: cpu, cuda or cuda:N (default: cuda when available, else cpu)."},
    )

    def __post_init__(self) -> None:
        self.check_pass_options()

    def check_pass_options(self) -> None:
        """DamaError for a missing input or output or a negative limit (the files are checked when the pass starts)."""
        for name in ("input", "output"):
            if not getattr(self, name):
                raise DamaError(f"--{name} is required")
        check_at_least("limit", self.limit, 0, optional=True)


@dataclass
class LlavaOptions:
    """The LLaVA a pass runs (precompute-ref's reference, generate's and make-pairs' answering model); combined with
    PassOptions, whose device it runs on."""

    model: str | None = field(
        default=None,
        metadata={"help": "Local folder of a saved LLaVA and its processor (no downloads): precompute-ref's reference "
                  "model; for generate the output_dir of `dama train`, a checkpoint-N folder, or the starting model; "
                  "for make-pairs the model whose answers are paired (the one you will train)."},
    )
    dtype: DtypeName | None = field(
        default=None,
        metadata={"help": "Model dtype (default: bfloat16 on CUDA, float32 on the CPU); for precompute-ref the dtype "
                  "training runs in, so that the policy reproduces these log-probs at step 0."},
    )

    def __post_init__(self) -> None:
        self.check_llava_options()

    def check_llava_options(self) -> None:
        if not self.model:
            raise DamaError("--model is required: the local folder of a saved LLaVA")
        if self.dtype is not None:
            check_choice("dtype", self.dtype, DTYPE_NAMES)

    @property
    def resolved_dtype(self) -> str:
        """The model dtype: the one given, else bfloat16 on CUDA (the training recipes') and float32 elsewhere."""
        if self.dtype is None:
            import torch

            return "bfloat16" if torch.device(self.device).type == "cuda" else "float32"
        return self.dtype


@dataclass
class RowOptions:
    """Which rows a pass keeps, and how it treats a bad one (hardness, precompute-ref, generate, make-pairs)."""

    select: list[str] = field(
        default_factory=list,
        metadata={"action": "append", "metavar": "KEY=VALUE",
                  "help": "Score and write only the rows meeting this condition (repeatable, all must hold): "
                  "COLUMN=VALUE, COLUMN.FIELD=VALUE for a JSON column such as origin_split, or ~ instead of = for "
                  "'contains, ignoring case'; e.g. --select origin_split.model~llava. A condition no row meets "
                  "lists the values found."},
    )
    on_bad_row: BadRowPolicy = field(
        default="error",
        metadata={"help": "A bad row (missing, corrupt or over-large image, empty or missing response, non-finite "
                  "hardness or reference log-probs), found by checking every row before the work starts: stop with "
                  "an error naming it, or skip it (counted by reason, and listed). Rows an earlier step skipped are "
                  "always skipped."},
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Folder for the datasets library's cache of a parquet input (default: the library's own)."},
    )

    def __post_init__(self) -> None:
        self.check_row_options()

    def check_row_options(self) -> None:
        # The command line gives one list per --select (argparse's append of nargs="+"); the conditions are their union.
        self.select = [condition for item in self.select
                       for condition in ([item] if isinstance(item, str) else item)]
        check_choice("on_bad_row", self.on_bad_row, BAD_ROW_POLICIES)
