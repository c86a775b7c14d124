"""Hand-written references the tests compare against (independent of geonorm_fx's implementation)."""
from __future__ import annotations

import math

import torch


def reference_geodesic(x, s, decay=1.0, clamp=math.pi / 4, scale=1.0, bias=0.0):
    """GEONORM.md section 2 written out in float64, token by token in vector form."""
    xd, sd = x.double(), s.double()
    radius = xd.norm(dim=-1, keepdim=True)
    unit = xd / radius
    v = sd - (sd * unit).sum(-1, keepdim=True) * unit
    vn = v.norm(dim=-1, keepdim=True)
    theta = torch.clamp(vn / radius, max=clamp)
    theta = ((scale * theta + bias) * decay).clamp(-clamp, clamp)
    out = torch.cos(theta) * xd + torch.sin(theta) * radius * v / vn
    return out.to(torch.result_type(x, s))


def angle(a, b):
    a, b = a.double(), b.double()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return torch.arccos(cos.clamp(-1, 1))
