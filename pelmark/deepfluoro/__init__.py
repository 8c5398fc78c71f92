"""Real fluoroscopy from the DeepFluoro dataset.

Modules:
    layout: reading and checking the documented full-resolution HDF5 layout.
    convert: DeepFluoro's camera, pose and landmark conventions -> pelmark's, and the proof.
    importer: ``pelmark import-deepfluoro``: CTs + landmarks + manifest, and the X-ray store.
    pnp: PnP + RANSAC registration from detected landmarks, with rotation, translation
        and target registration errors and the success rate.
"""
