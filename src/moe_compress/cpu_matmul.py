"""Float matrices laid out once for the CPU's fastest products, for inference.

PackedMatrices: a matrix every token multiplies (a core, a shared basis). torch's matmul of bf16 tokens with a bf16
matrix reads the matrix at about a third of this machine's memory bandwidth when there are few tokens (decoding):
6.7 GB/s against 18-22 GB/s for a plain copy, on one core (AVX-512 BF16). The same product through oneDNN with the
matrix reordered into its blocked layout beforehand runs about twice as fast on 1 to 32 tokens, in fp32 too
(benchmarks/vllm_serving.py, its profile). torch itself ships that path (torch.ops.mkldnn, what torch.compile's CPU
code calls for linear layers).

ExpertTables: a matrix per expert (the low-rank factors), each multiplying only the few rows routed to its expert.
Decoding then multiplies 8 small matrices a token, one oneDNN call each: at Qwen3-30B-A3B's shape 8 x [768, 586] bf16
took 550-690 us (10-12 GB/s), of which about 13 us a call is oneDNN's own overhead. The same products as one
embedding_bag (each pair's output a sum of its expert's matrix rows, weighted by the pair's input) over the stacked
matrices took 330-350 us, the narrow factors' 2.5-3x less; so for decoding the experts' matrices are held as its
tables, and rows that many pairs share (prefill) are multiplied per expert from the same tables.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

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


class ExpertTables:
    """Per-expert matrices W_e ([E, out, in], as F.linear reads each) for products with the rows routed to each
    expert: stacked as embedding_bag's tables, W_e^T's rows (expert e, input i) at row e * in + i, their columns cut
    in equal slices of at most MAX_WIDTH (embedding_bag read 768-wide rows at 12 GB/s and 384-wide ones at 21, on
    Qwen3-30B-A3B's factors), the last padded with zero columns. The bytes are held once: every product reads these
    tables, a product per expert (prefill) as one batched matmul over the slices."""

    MAX_WIDTH = 512

    def __init__(self, weights: torch.Tensor):
        num_experts, self.out_features, self.in_features = weights.shape
        pieces = -(-self.out_features // self.MAX_WIDTH)
        width = -(-self.out_features // pieces)
        rows = F.pad(weights.detach().mT, (0, pieces * width - self.out_features))  # [E, in, pieces * width]
        # [pieces, E * in, width]: each slice a contiguous table
        self.tables = rows.reshape(num_experts * self.in_features, pieces, width).transpose(0, 1).contiguous()
        self.nbytes = self.tables.nbytes
        self.inputs = torch.arange(self.in_features, device=weights.device)  # a matrix's rows, from its first

    def __call__(self, x: torch.Tensor, index: int = 0) -> torch.Tensor:
        """x W_index^T for rows x [N, in] of one expert, as PackedMatrices computes it."""
        matrix = self.tables[:, index * self.in_features:(index + 1) * self.in_features]  # [pieces, in, width]
        y = torch.matmul(x, matrix)  # [pieces, N, width]
        return y.transpose(0, 1).reshape(x.shape[0], y.shape[0] * y.shape[2])[:, :self.out_features]

    def on_pairs(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """x_s W_{expert_s}^T for each row s of x [S, in] with its own expert: every pair reads its expert's matrix,
        which costs less than a product per expert where few pairs share one (decoding)."""
        width = self.in_features
        rows = (expert.unsqueeze(1) * width + self.inputs).reshape(-1)
        offsets = torch.arange(0, rows.numel(), width, device=x.device)
        weights = x.contiguous().reshape(-1)
        slices = [F.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=weights)
                  for table in self.tables]
        return (slices[0] if len(slices) == 1 else torch.cat(slices, -1))[:, :self.out_features]
