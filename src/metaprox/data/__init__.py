"""Dataset readers for few-shot image classification, returning :class:`LabelledImages`.

Every reader takes its location as an argument; when omitted, the root is ``$METAPROX_DATA`` (see
:func:`data_root`), with one sub-folder per dataset (``omniglot/``, ``miniimagenet/``, ``tieredimagenet/``,
``cifar100/``). Readers check what they find and raise :class:`DatasetLayoutError` naming the file that was
expected and where. Checksums are sha256; downloads are opt-in. Nothing here ever unpickles a file.

- :mod:`.labelled` — the :class:`LabelledImages` container, area resize, image file reading, the data root.
- :mod:`.checksum`, :mod:`.download` — sha256 verification and verified opt-in downloads.
- :mod:`.omniglot` — official PNG folders, the compact ``omniglot28.npz``, Vinyals split lists, download.
- :mod:`.miniimagenet` — Ravi & Larochelle CSV splits + ``images/``, or ``.npz`` arrays.
- :mod:`.image_cache` — decode image files once into a memory-mapped uint8 cache, keyed by the sources.
- :mod:`.tieredimagenet` — class folders + the specific → general class hierarchy.
- :mod:`.cifarfs` — CIFAR-FS and FC100 from the CIFAR-100 *binary* release.
"""

from metaprox.data.checksum import ChecksumError, sha256_file, verify_sha256
from metaprox.data.cifarfs import (
    CIFAR100_COARSE_NAMES,
    CIFAR100_FINE_NAMES,
    CIFAR_FS_SPLITS,
    FC100_SPLITS,
    read_cifar100_binary,
    read_cifar_fs,
    read_fc100,
)
from metaprox.data.download import download_file
from metaprox.data.labelled import DatasetLayoutError, LabelledImages, data_root, read_image, resize_area
from metaprox.data.miniimagenet import load_miniimagenet_npz, read_miniimagenet
from metaprox.data.omniglot import (
    OMNIGLOT28_SHA256,
    download_omniglot,
    load_omniglot_npz,
    read_omniglot_folders,
    read_split_list,
    vinyals_split,
)
from metaprox.data.tieredimagenet import class_hierarchy, load_tieredimagenet_npz, read_tieredimagenet

__all__ = [
    "LabelledImages",
    "DatasetLayoutError",
    "ChecksumError",
    "data_root",
    "read_image",
    "resize_area",
    "sha256_file",
    "verify_sha256",
    "download_file",
    "read_omniglot_folders",
    "load_omniglot_npz",
    "read_split_list",
    "vinyals_split",
    "download_omniglot",
    "OMNIGLOT28_SHA256",
    "read_miniimagenet",
    "load_miniimagenet_npz",
    "class_hierarchy",
    "read_tieredimagenet",
    "load_tieredimagenet_npz",
    "read_cifar100_binary",
    "read_cifar_fs",
    "read_fc100",
    "CIFAR_FS_SPLITS",
    "FC100_SPLITS",
    "CIFAR100_FINE_NAMES",
    "CIFAR100_COARSE_NAMES",
]
