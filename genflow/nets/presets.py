"""Named architectures: a net's defaults, updated by a preset, updated by explicit keyword overrides."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from genflow.errors import config_error


def resolve_hparams(net: str, defaults: Mapping[str, Any], presets: Mapping[str, Mapping[str, Any]],
                    preset: str | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults <- preset <- explicit overrides (None means "not given") for the net called ``net``."""
    hp = dict(defaults)
    if preset is not None:
        if preset not in presets:
            raise config_error(f"unknown {net} preset {preset!r}", "presets name fixed architectures",
                               f"use one of {sorted(presets)} or give the hyperparameters explicitly (preset=null)")
        hp.update(presets[preset])
    unknown = set(overrides) - set(hp)
    if unknown:
        raise config_error(f"unknown {net} hyperparameter(s) {sorted(unknown)}", f"{net} does not take them",
                           f"valid ones: {sorted(hp)}")
    hp.update({k: v for k, v in overrides.items() if v is not None})
    # Hydra hands lists over as ListConfig: keep plain tuples so the net pickles and prints cleanly.
    return {k: (tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v) for k, v in hp.items()}
