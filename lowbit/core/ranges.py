"""Integer ranges of the quantizers (SPEC section 1)."""


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """(Qn, Qp) of SPEC section 1."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1
