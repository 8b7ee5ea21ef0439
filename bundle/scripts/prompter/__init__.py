"""The prompter (paper §3.3): one classified point prompt per nucleus.

``net`` the network, ``matching`` the Hungarian matching (Eq. 3), ``loss`` Eq. 4-6, ``decode`` mask-aided
filtering and point NMS, ``tta`` test-time augmentation.
"""
