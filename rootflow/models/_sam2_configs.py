"""The SAM2.1 variants RootSAM can be built from: sam2's own hydra configs plus overrides.

We never copy or re-implement SAM2: every variant is ``(sam2 config file, hydra overrides)``
and :func:`compose_sam2` instantiates it with the ``sam2`` package's own classes. The ``test``
variant is the hiera-tiny config shrunk (image 256 px, a 5-block Hiera of width 16, one memory
attention layer) so tests and the CPU demo build and run it in well under a second; its prompt
encoder and mask decoder have exactly the shapes of the real ones (``d_model`` 256), so
decoder code paths and checkpoint formats are the same. ``micro`` (image 128 px, prompt
encoder / mask decoder of width 64) exists only so tests can *train* a small decoder in seconds
(behaviour tests of corrective clicks); it has none of SAM2.1's shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class SAM2Variant:
    """One buildable SAM2.1 model.

    Attributes:
        name: our short name (``hiera_tiny`` ...), recorded in RootSAM checkpoints.
        config: sam2 hydra config name (relative to the installed ``sam2`` package).
        overrides: hydra overrides applied on top of ``config``.
        checkpoint_file: file name of Meta's released weights for this variant (for docs and
            error messages only: rootflow never downloads it).
        image_size: the model's input side in pixels (tiles are this size).
    """

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    checkpoint_file: str | None = None
    image_size: int = 1024


_T = "configs/sam2.1/sam2.1_hiera_t.yaml"

VARIANTS: dict[str, SAM2Variant] = {
    v.name: v
    for v in (
        SAM2Variant("hiera_tiny", _T, checkpoint_file="sam2.1_hiera_tiny.pt"),
        SAM2Variant("hiera_small", "configs/sam2.1/sam2.1_hiera_s.yaml",
                    checkpoint_file="sam2.1_hiera_small.pt"),
        SAM2Variant("hiera_base_plus", "configs/sam2.1/sam2.1_hiera_b+.yaml",
                    checkpoint_file="sam2.1_hiera_base_plus.pt"),
        SAM2Variant("hiera_large", "configs/sam2.1/sam2.1_hiera_l.yaml",
                    checkpoint_file="sam2.1_hiera_large.pt"),
        SAM2Variant(
            "test",
            _T,
            overrides=(
                "++model.image_size=256",
                "++model.image_encoder.trunk.embed_dim=16",
                "++model.image_encoder.trunk.num_heads=1",
                "++model.image_encoder.trunk.stages=[1,1,2,1]",
                "++model.image_encoder.trunk.global_att_blocks=[3]",
                "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
                "++model.memory_attention.num_layers=1",
                "++model.memory_attention.layer.dim_feedforward=256",
                "++model.memory_attention.layer.self_attention.feat_sizes=[16,16]",
                "++model.memory_attention.layer.cross_attention.feat_sizes=[16,16]",
            ),
            image_size=256,
        ),
        SAM2Variant(
            "micro",
            _T,
            overrides=(
                "++model.image_size=128",
                "++model.image_encoder.trunk.embed_dim=16",
                "++model.image_encoder.trunk.num_heads=1",
                "++model.image_encoder.trunk.stages=[1,1,2,1]",
                "++model.image_encoder.trunk.global_att_blocks=[3]",
                "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
                "++model.image_encoder.neck.d_model=64",
                "++model.image_encoder.neck.position_encoding.num_pos_feats=64",
                "++model.memory_attention.d_model=64",
                "++model.memory_attention.num_layers=1",
                "++model.memory_attention.layer.d_model=64",
                "++model.memory_attention.layer.dim_feedforward=128",
                "++model.memory_attention.layer.self_attention.embedding_dim=64",
                "++model.memory_attention.layer.cross_attention.embedding_dim=64",
                "++model.memory_attention.layer.self_attention.feat_sizes=[8,8]",
                "++model.memory_attention.layer.cross_attention.feat_sizes=[8,8]",
                "++model.memory_encoder.in_dim=64",
                "++model.memory_encoder.mask_downsampler.embed_dim=64",
                "++model.memory_encoder.fuser.layer.dim=64",
            ),
            image_size=128,
        ),
    )
}

ALIASES = {"t": "hiera_tiny", "tiny": "hiera_tiny", "s": "hiera_small", "small": "hiera_small",
           "b+": "hiera_base_plus", "base_plus": "hiera_base_plus", "l": "hiera_large",
           "large": "hiera_large"}


def get_variant(name: str) -> SAM2Variant:
    """Variant by name or alias (``t``, ``s``, ``b+``, ``l``); unknown names list the valid ones."""
    key = ALIASES.get(name, name)
    try:
        return VARIANTS[key]
    except KeyError:
        raise KeyError(f"unknown SAM2.1 variant {name!r}; valid: {sorted(VARIANTS)} "
                       f"(aliases {sorted(ALIASES)})") from None


def compose_sam2(variant: SAM2Variant, extra_overrides: tuple[str, ...] = ()) -> Any:
    """Instantiate the ``SAM2Base`` of ``variant`` with random weights (sam2's classes, no I/O).

    ``Hiera(weights_path=None)`` and no checkpoint: nothing is read or downloaded here.
    """
    import sam2  # noqa: F401  (initialises sam2's hydra config module on import)
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose(config_name=variant.config, overrides=[*variant.overrides, *extra_overrides])
    OmegaConf.resolve(cfg)
    got = int(cfg.model.image_size)
    if got != variant.image_size:
        raise ValueError(f"variant {variant.name}: config gives image_size {got}, "
                         f"expected {variant.image_size}")
    return instantiate(cfg.model, _recursive_=True)
