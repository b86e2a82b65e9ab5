"""The dtype names the benchmarks' command lines take (--dtype), and the torch dtypes they stand for."""

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
