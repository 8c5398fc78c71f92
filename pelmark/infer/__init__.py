"""Running a trained detector on X-rays a user holds: ``pelmark predict`` and ``pelmark export``.

Modules:
    images: reading DICOM, PNG, TIFF and 2D NIfTI files with what their headers say.
    preprocess: intensities to the model's convention, the resample to its mm per pixel, exact cameras.
    backends: the heatmap model behind one interface, a PyTorch run folder or an ONNX file.
    predict: landmarks per image, the optional registration to CT landmarks, the batch driver.
    outputs: the CSV, JSON and overlay PNG written per image.
    export: the ONNX export and its check against PyTorch.
"""
