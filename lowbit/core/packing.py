"""The canonical packed layout of SPEC section 4, in plain tensor ops: container widths, packing and unpacking of
integer codes along the last dimension (low bits first). One place for the reference backend, the packed layers,
conversion and the Triton kernels' launchers.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

CONTAINER_BITS = {2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}  # SPEC section 4: 3 -> 4, 5..7 -> 8


def codes_per_byte(bits: int) -> int:
    return 8 // CONTAINER_BITS[bits]


def packed_width(k: int, bits: int) -> int:
    """Bytes per row of a packed tensor with ``k`` codes per row."""
    per_byte = codes_per_byte(bits)
    return (k + per_byte - 1) // per_byte


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    width = CONTAINER_BITS[bits]
    per_byte = 8 // width
    k = codes.shape[-1]
    padded = packed_width(k, bits) * per_byte
    as_bytes = codes.view(torch.uint8) if codes.dtype == torch.int8 else codes
    if padded != k:
        as_bytes = torch.nn.functional.pad(as_bytes, (0, padded - k))
    # explicit sizes (not -1), so that tensors with no rows reshape too
    fields = as_bytes.reshape(*codes.shape[:-1], padded // per_byte, per_byte).to(torch.int32) & ((1 << width) - 1)
    shifts = torch.arange(0, 8, width, device=codes.device, dtype=torch.int32)
    return (fields << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, k: int, signed: bool) -> Tensor:
    width = CONTAINER_BITS[bits]
    shifts = torch.arange(0, 8, width, device=packed.device, dtype=torch.int32)
    fields = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << width) - 1)
    fields = fields.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // width))[..., :k]
    if signed:  # two's complement in the container: sign-extend from its top bit
        fields = fields - ((fields >> (width - 1)) << width)
        return fields.to(torch.int8)
    return fields.to(torch.uint8)


CODE_DTYPES = (torch.uint8, torch.int8)


def code_dtype(qmin: int) -> torch.dtype:
    """uint8 for an unsigned code range, int8 for a signed one."""
    return torch.uint8 if qmin >= 0 else torch.int8


PANEL_CHANNELS = 16  # output channels per panel block
PANEL_QUAD = 4  # consecutive k per 4-byte group


def gemm_panel(codes: Tensor) -> Tensor:
    """Signed weight codes (N, K) int8 in the panel layout of the CPU integer GEMM (csrc/cpu/packed_panel.h):
    uint8 (ceil(N / 16), ceil(K / 4) * 64), where byte ``(c // 8) * 32 + (c % 8) * 4 + t`` of quad ``q`` of block
    ``p`` is ``codes[16 p + c, 4 q + t]`` (two's complement; 0 past N or K). A run-time form, never saved."""
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise TypeError(f"codes must be a 2-d int8 tensor, got {codes.dtype} of {codes.dim()} dims")
    n, k = codes.shape
    blocks, quads = -(-n // PANEL_CHANNELS), -(-k // PANEL_QUAD)
    padded = torch.nn.functional.pad(codes.view(torch.uint8), (0, quads * PANEL_QUAD - k, 0, blocks * 16 - n))
    # (block, half, channel of 8, quad, t) -> (block, quad, half, channel of 8, t)
    tiles = padded.view(blocks, 2, 8, quads, PANEL_QUAD).permute(0, 3, 1, 2, 4)
    return tiles.reshape(blocks, quads * 64).contiguous()
