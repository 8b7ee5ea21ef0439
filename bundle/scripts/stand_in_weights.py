"""Random weights in the official file layouts, for tests and GPU checks on machines without the real files.

- ``sam_vit_b.pth`` (``sam_vit_l.pth``, ``sam_vit_h.pth``): segment_anything's ``sam_model_registry[variant]()``
  state dict, as ``sam_vit_b_01ec64.pth`` holds it (1024 px input, 64 x 64 position table);
- ``convnext_small.pth``: a timm ConvNeXt-S ImageNet classifier's state dict (``stem.0.weight``,
  ``stages.0.blocks.0.conv_dw.weight``, ..., ``head.fc.weight``), as ``torch.save`` writes it;
- ``model.safetensors``: the same tensors as the Hugging Face hub's ``timm/convnext_small.fb_in1k`` file.

The bundle reads them through ``--sam_checkpoint`` and ``--backbone_weights`` exactly as it reads the real ones;
nothing is downloaded. ``python -m scripts.stand_in_weights OUT [--sam_variant vit_b]`` writes them into OUT.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

SAM_VARIANTS = ("vit_b", "vit_l", "vit_h")
"""segment_anything's checkpoint variants."""


def write_stand_in_weights(folder: str | Path, sam_variant: str = "vit_b", seed: int = 0) -> dict[str, Path]:
    """Write random SAM and ConvNeXt-S weights in the official layouts into ``folder``; returns their paths by role
    (``sam``, ``convnext``, ``convnext_hub``)."""
    import timm
    from safetensors.torch import save_file
    from segment_anything import sam_model_registry

    if sam_variant not in SAM_VARIANTS:
        raise ValueError(f"sam_variant must be one of {SAM_VARIANTS}, got {sam_variant!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    paths = {"sam": folder / f"sam_{sam_variant}.pth", "convnext": folder / "convnext_small.pth",
             "convnext_hub": folder / "model.safetensors"}
    torch.save(sam_model_registry[sam_variant]().state_dict(), paths["sam"])
    convnext = timm.create_model("convnext_small", pretrained=False).state_dict()
    torch.save(convnext, paths["convnext"])
    save_file({key: value.contiguous() for key, value in convnext.items()}, paths["convnext_hub"])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="folder to write the weight files into (created)")
    parser.add_argument("--sam_variant", default="vit_b", choices=SAM_VARIANTS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for role, path in write_stand_in_weights(args.output_dir, args.sam_variant, args.seed).items():
        print(f"{role}: {path}")


if __name__ == "__main__":
    main()
