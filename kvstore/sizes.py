"""Human byte sizes for configuration: ``"8GiB"``, ``"512MiB"``, ``"1.5 GB"``, or a plain number of bytes.

Strict on purpose: a unit is one of ``B``, ``KiB MiB GiB TiB PiB`` (powers of 1024) or ``kB KB MB GB TB PB``
(powers of 1000), the number must give a whole number of bytes, and the ambiguous one-letter forms
(``8G``, ``512m``) are refused with a message that says which to write. (``pydantic.ByteSize`` and
``humanfriendly.parse_size`` both take ``8G`` silently, and would be a dependency for 30 lines.)
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from ._args import integral
from .errors import ConfigError

__all__ = ["parse_size", "format_size"]

_UNITS = {
    "B": 1,
    "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40, "PiB": 1 << 50,
    "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
}
_SIZE = re.compile(r"\s*(?P<num>[0-9][0-9_]*(?:\.[0-9]+)?)\s*(?P<unit>[A-Za-z]*)\s*")
_HINT = "write a number of bytes or a size such as 8GiB, 512MiB, 1.5GB (binary: KiB MiB GiB TiB PiB; decimal: kB MB GB TB PB)"


def parse_size(value: object, where: str = "size") -> int:
    """Bytes from an int (or integral scalar) or a size string; ConfigError naming ``where`` otherwise."""
    n = integral(value)
    if n is not None:
        if n < 0:
            raise ConfigError(f"{where} must be >= 0 bytes, got {n}")
        return n
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a number of bytes or a size string, got {value!r}; {_HINT}")
    m = _SIZE.fullmatch(value)
    if m is None:
        raise ConfigError(f"{where}={value!r} is not a size; {_HINT}")
    unit = m["unit"] or "B"
    if unit not in _UNITS:
        upper = unit.upper().rstrip("B").rstrip("I")
        guess = f" (did you mean {m['num']}{upper}iB or {m['num']}{upper}B?)" if len(upper) == 1 and upper in "KMGTP" else ""
        raise ConfigError(f"{where}={value!r}: unknown unit {unit!r}{guess}; {_HINT}")
    try:
        exact = Decimal(m["num"].replace("_", "")) * _UNITS[unit]
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        raise ConfigError(f"{where}={value!r} is not a size; {_HINT}") from None
    if exact != exact.to_integral_value():
        raise ConfigError(f"{where}={value!r} is not a whole number of bytes ({exact}); use a smaller unit")
    return int(exact)


def format_size(n: int) -> str:
    """``n`` bytes as the largest binary unit that divides it exactly (``"8GiB"``), else ``"1500B"``.
    ``parse_size(format_size(n)) == n`` for every ``n >= 0``."""
    for unit in ("PiB", "TiB", "GiB", "MiB", "KiB"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return f"{n}B"
