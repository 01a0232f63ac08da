"""The canonical, ordered class vocabulary and the folder-name aliases public datasets use.

Class order is fixed here once: a model's output index i always means ``CANONICAL_CLASSES``
filtered to the recipe's classes, in this order, whatever order folders were listed in.
"""

from __future__ import annotations

import re

COVID = "COVID"
NORMAL = "Normal"
VIRAL_PNEUMONIA = "Viral Pneumonia"
LUNG_OPACITY = "Lung Opacity"

CANONICAL_CLASSES: tuple[str, ...] = (COVID, NORMAL, VIRAL_PNEUMONIA, LUNG_OPACITY)

# Keys are folder names with case and every non-alphanumeric character removed.
# "pneumonia" alone is deliberately absent: in the Kermany pediatric set it means
# bacterial + viral, so mapping it to Viral Pneumonia would silently merge classes.
_ALIASES: dict[str, str] = {
    "covid": COVID,
    "covid19": COVID,
    "cov19": COVID,
    "covid2019": COVID,
    "sarscov2": COVID,
    "covidpositive": COVID,
    "normal": NORMAL,
    "healthy": NORMAL,
    "viralpneumonia": VIRAL_PNEUMONIA,
    "pneumoniaviral": VIRAL_PNEUMONIA,
    "viral": VIRAL_PNEUMONIA,
    "lungopacity": LUNG_OPACITY,
    "opacity": LUNG_OPACITY,
}


def canonical_class(folder_name: str) -> str | None:
    """Map a folder name such as ``COVID-19`` or ``NORMAL`` to its canonical class, or None."""
    key = re.sub(r"[^a-z0-9]", "", folder_name.lower())
    return _ALIASES.get(key)


def ordered(classes) -> tuple[str, ...]:
    """Canonical names of ``classes`` (aliases allowed) in canonical order; unknown names raise."""
    from .errors import ConfigError

    wanted = set()
    for name in classes:
        canon = canonical_class(name)
        if canon is None:
            raise ConfigError(
                f"Unknown class {name!r}. Known classes: {', '.join(CANONICAL_CLASSES)}."
            )
        wanted.add(canon)
    return tuple(c for c in CANONICAL_CLASSES if c in wanted)
