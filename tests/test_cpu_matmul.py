"""cpu_matmul's layouts against plain products: the per-expert tables on both their paths."""

import pytest
import torch

from moe_compress.cpu_matmul import ExpertTables


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features", [40, 1100])  # one table; three slices of 367 columns, the last padded
def test_expert_tables_multiply_each_row_by_its_experts_matrix(out_features, dtype):
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(6, out_features, 24, generator=generator).to(dtype)  # [E, out, in]
    x = torch.randn(9, 24, generator=generator).to(dtype)
    expert = torch.tensor([0, 0, 1, 3, 3, 3, 4, 5, 5])
    tables = ExpertTables(weights)
    reference = torch.einsum("si,soi->so", x.double(), weights[expert].double())
    by_pair = tables.on_pairs(x, expert)
    by_expert = torch.cat([tables(x[expert == e], e) for e in range(6)])
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding
    for got in (by_pair, by_expert):
        assert got.shape == (9, out_features) and got.dtype == dtype
        assert ((got.double() - reference).norm() / reference.norm()) < tolerance
    pieces = 1 if out_features <= ExpertTables.MAX_WIDTH else 3
    assert tables.tables.shape == (pieces, 6 * 24, -(-out_features // pieces))
