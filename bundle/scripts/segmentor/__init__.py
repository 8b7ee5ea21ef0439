"""The segmentor (paper §3.2): Segment Anything turning each point prompt into its nucleus's mask.

``net`` the model and its decoding windows, ``build`` variants, registry and SAM checkpoint adaptation,
``conv_encoder`` the convolutional image encoder, ``loss`` Eq. 2, ``prompts`` positive and negative prompts
(Eq. 1 and 7).
"""
