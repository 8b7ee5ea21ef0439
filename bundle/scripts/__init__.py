"""Custom MONAI components of the PromptNucSeg bundle, imported as ``scripts.*`` from the bundle configs."""
