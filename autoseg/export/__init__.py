"""Leaving the run folder: the model bundle (ONNX, DICOM-SEG and the HTML report to come)."""
