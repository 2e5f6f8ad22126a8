"""Imaging: a DICOM frame → the paper's preprocessed image (``preprocess``), written as PNG (``png``)."""
