"""AdapterFusion (adapters 1.3.0 `BertFusion`, eval mode) at one bottleneck location: attention
of a query over the up-projections of the fused adapters (the composition around it, which
adapter's pre-processing makes the query and the residual, is methods/compose.py).

Reference for one token, with q [H], ups [M, H] (adapter k's scaled up-projection), residual [H]:
    values = ups + residual  if residual_before  else ups     (the library adds the residual in
    keys   = values                                            place: the keys see it too)
    q' = W_q q + b_q;  K = keys W_k^T + b_k;  V = values W_v^T  if value_before_softmax else values
    p  = softmax(K q')                                          (temperature refused at upload)
    out = p V;  out = W_v out  if value and not value_before_softmax
    out = out + residual  unless residual_before
Projections the config switches off are identities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..adapters import Fusion, FusionLayer


def fuse(fusion: Fusion, layer: FusionLayer, query: Tensor, ups: Tensor, residual: Tensor) -> Tensor:
    """query [n, H], ups [n, M, H], residual [n, H] -> [n, H]."""
    values = ups + residual[:, None, :] if fusion.residual_before else ups
    q = F.linear(query, *layer.query) if layer.query is not None else query
    k = F.linear(values, *layer.key) if layer.key is not None else values  # [n, M, H]
    v = values
    if layer.value is not None and fusion.value_before_softmax:
        v = F.linear(values, layer.value)
    probs = torch.softmax(torch.einsum("nmh,nh->nm", k, q), dim=-1)  # [n, M]
    out = torch.einsum("nm,nmh->nh", probs, v)
    if layer.value is not None and not fusion.value_before_softmax:
        out = F.linear(out, layer.value)
    return out if fusion.residual_before else out + residual
