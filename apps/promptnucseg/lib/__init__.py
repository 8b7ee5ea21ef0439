"""PromptNucSeg MONAI Label app: the bundle's pipeline behind MONAI Label's REST API.

The bundle (``<repo>/bundle``, or ``$PROMPTNUCSEG_BUNDLE_DIR``) is put on ``sys.path`` here so that its code is
imported as ``scripts.*``, the bundle's own convention. MONAI Label removes the app folder from ``sys.path`` once
``main.py`` is loaded, so every module of ``lib`` is imported by ``main.py`` at load time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent.parent
BUNDLE_DIR = Path(os.environ.get("PROMPTNUCSEG_BUNDLE_DIR") or APP_DIR.parent.parent / "bundle").resolve()
DEFAULT_MODEL_PATH = BUNDLE_DIR / "models" / "model.pt"

if not (BUNDLE_DIR / "scripts" / "pipeline" / "promptnucseg.py").is_file():
    raise ImportError(f"PromptNucSeg bundle not found at {BUNDLE_DIR} (set PROMPTNUCSEG_BUNDLE_DIR)")
if str(BUNDLE_DIR) not in sys.path:
    sys.path.insert(0, str(BUNDLE_DIR))
