"""The store: the Zarr v3 group that carries images and their ground truth between every stage.

Its layout is a public interface (see the README's "The store"). This package
is the only code that knows it:

* :mod:`pelmark.store.schema`: the format mark, the arrays (:class:`StoreLayout`),
  the split codes (:class:`Split`) and the conventions the attributes declare.
* :mod:`pelmark.store.reader`: :func:`open_store`, :class:`StoreReader` (camera,
  landmark names, subjects) and :func:`finished_rows`, the one row selection
  that training, evaluation and the previews share; :func:`check_complete`.
* :mod:`pelmark.store.writer`: :func:`create_store`, :func:`write_subject`,
  :func:`store_attributes` (attributes, :func:`fingerprint`, provenance),
  :func:`check_compatible` for a resume, :class:`StoreLock`; ``pelmark synth``
  and ``pelmark import-deepfluoro`` both write through it.
"""

from pelmark.store.reader import (
    StoreReader,
    check_complete,
    done_subjects,
    finished_rows,
    is_pelmark_store,
    layout_of,
    missing_parts,
    open_store,
)
from pelmark.store.schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_NORMALISATION,
    PIXEL_CONVENTION,
    POSE_CONVENTION,
    WORLD_FRAME,
    Split,
    StoreLayout,
)
from pelmark.store.writer import (
    FINGERPRINT_SUBJECT_KEYS,
    LOCK_NAME,
    StoreLock,
    check_compatible,
    create_store,
    fingerprint,
    format_attributes,
    landmarks_digest,
    mark_finished,
    remove_store,
    store_attributes,
    subject_record,
    write_subject,
)

__all__ = [
    "FINGERPRINT_SUBJECT_KEYS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IMAGE_NORMALISATION",
    "LOCK_NAME",
    "PIXEL_CONVENTION",
    "POSE_CONVENTION",
    "WORLD_FRAME",
    "Split",
    "StoreLayout",
    "StoreLock",
    "StoreReader",
    "check_compatible",
    "check_complete",
    "create_store",
    "done_subjects",
    "finished_rows",
    "fingerprint",
    "format_attributes",
    "is_pelmark_store",
    "landmarks_digest",
    "layout_of",
    "mark_finished",
    "missing_parts",
    "open_store",
    "remove_store",
    "store_attributes",
    "subject_record",
    "write_subject",
]
