"""PromptNucSeg bundle code, imported as ``scripts.*`` from ``bundle/`` (the MONAI model-zoo convention)."""

from scripts.errors import install_for_bundle_cli

install_for_bundle_cli()
