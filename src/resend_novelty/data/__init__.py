"""Input data: image files, list files, class folders, and the domain-shift styles.

- :mod:`.errors`: :class:`DataError`, the error of bad input data (names the file and line);
- :mod:`.records`: :class:`ImageRecord`, one labelled image;
- :mod:`.images`: :data:`IMAGE_EXTENSIONS` and :func:`load_image` (decoding as RGB);
- :mod:`.lists`: official list files (:func:`read_list_file`, :func:`resolve_list_path`);
- :mod:`.folders`: class folders and image folders (:func:`scan_class_folders`,
  :func:`list_images`), all by one walker (:func:`walk_images`) that reports what it skips;
- :mod:`.dataset`: :class:`ImageDataset`, a map-style dataset over records;
- :mod:`.augment`: domain-shift renderings of photos (:class:`DomainShiftView`, :func:`stylise`);
- :mod:`.reference`: the reference set of pretraining (:func:`reference_records`,
  :func:`split_validation`, :data:`STYLE_ORDER`).
"""

from .augment import AUGMENT_VERSION, STYLES, DomainShiftView, stylise
from .dataset import ImageDataset
from .errors import DataError, printable
from .folders import (Skipped, SkippedFilesWarning, list_images, scan_class_folders, walk_images,
                      warn_skipped)
from .images import IMAGE_EXTENSIONS, load_image
from .lists import read_list_file, resolve_list_path
from .records import ImageRecord
from .reference import STYLE_ORDER, natural_key, reference_records, split_validation

__all__ = [
    "DataError", "ImageRecord", "IMAGE_EXTENSIONS", "load_image", "read_list_file",
    "resolve_list_path", "scan_class_folders", "list_images", "ImageDataset", "DomainShiftView",
    "STYLES", "AUGMENT_VERSION", "stylise", "STYLE_ORDER", "natural_key", "reference_records",
    "split_validation", "printable", "walk_images", "warn_skipped", "Skipped", "SkippedFilesWarning",
]
