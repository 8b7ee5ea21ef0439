"""Installable environment for the PromptNucSeg MONAI bundle.

One ``pip install -e .`` brings everything a user and the test-suite need, MONAI Label included.
The bundle's own code lives in ``bundle/scripts`` and is imported as ``scripts.*`` from ``bundle/``
(the MONAI model-zoo convention); this package only pins the stack.
"""

from setuptools import setup

INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "monai==1.6.1",
    "fire",
    "segment-anything==1.0",
    "timm",
    "pytorch-ignite==0.5.5",
    "mlflow>=3,<4",
    "monailabel==0.8.5",
    "numpy<2",
    "pydicom<3",
    "pynetdicom<3",
    "dicomweb-client<0.60",
    "nibabel",
    "scipy",
    "scikit-image",
    "tifffile",
    "imagecodecs",
    "shapely>=2",
    "matplotlib",
    "tqdm",
    "pyyaml",
]

TEST_REQUIRES = ["pytest", "pytest-timeout"]

setup(
    name="promptnucseg-monai",
    version="0.1.0",
    description="PromptNucSeg (prompter + fine-tuned Segment Anything) nucleus instance segmentation as a MONAI bundle",
    python_requires=">=3.10,<3.13",
    install_requires=INSTALL_REQUIRES + TEST_REQUIRES,
    packages=[],
)
