"""The automatic pipeline (paper Fig. 1b): prompter, then segmentor, over tiles of any size; the model file.
"""
