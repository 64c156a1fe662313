"""What runner_mlx reads from mlx-lm beyond its public functions. Checked against mlx-lm 0.32.2.

  model_classes(config)  mlx-lm's own lookup of a config's (Model, ModelArgs) classes, its
                         model_type remappings included (`mlx_lm.utils._get_classes`)
"""

from __future__ import annotations


def model_classes(config: dict) -> "tuple[type, type] | None":
    """The (Model, ModelArgs) classes mlx-lm builds for `config`, or None where it has no module for
    its model_type."""
    from mlx_lm.utils import _get_classes

    try:
        return _get_classes(config)
    except (ValueError, KeyError):
        return None
