"""Calibration and evaluation text: local files under $COMPRESSLAB_DATA_DIR, or the hub."""
