"""File outputs: label maps, GeoJSON, CSV and overlays, nucleus measurements, whole-slide reading and writing,
and the one atomic-write helper.
"""
