"""Float matrices laid out once for oneDNN's CPU matmul, for inference.

torch's matmul of bf16 tokens with a bf16 matrix reads the matrix at about a third of this machine's memory bandwidth
when there are few tokens (decoding): 6.7 GB/s against 18-22 GB/s for a plain copy, on one core (AVX-512 BF16). The
same product through oneDNN with the matrix reordered into its blocked layout beforehand runs about twice as fast on 1
to 32 tokens, in fp32 too (benchmarks/vllm_serving.py, its profile). torch itself ships that path (torch.ops.mkldnn,
what torch.compile's CPU code calls for linear layers); this module holds a projection's matrices in it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# oneDNN's fast paths: AVX-512 with BF16 for bf16, and fp32 anywhere oneDNN runs
DTYPES = (torch.bfloat16, torch.float32)


def available(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s matrices can be packed: on the CPU, in a float type oneDNN multiplies well, with torch built
    with oneDNN (and, for bf16, a CPU that has BF16 instructions)."""
    if tensor.device.type != "cpu" or tensor.dtype not in DTYPES or not torch.backends.mkldnn.is_available():
        return False
    return tensor.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedMatrices:
    """Matrices W_i ([out, in] each), reordered for oneDNN: x W_i^T for tokens x [N, in], as F.linear computes it."""

    def __init__(self, weights: Iterable[torch.Tensor]):
        self.weights = [torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), None) for w in weights]
        self.out_features = self.weights[0].shape[0]
        # oneDNN's layout is opaque: the bytes it holds are not a storage to measure, so they are counted here
        self.nbytes = sum(w.numel() for w in self.weights) * torch.finfo(self.dtype).bits // 8

    @property
    def dtype(self) -> torch.dtype:
        return self.weights[0].dtype

    def __call__(self, x: torch.Tensor, index: int = 0) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weights[index], None, "none", [], "")
