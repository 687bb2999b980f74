"""How a datafile's rows are held at scale (data.read_datafile builds them, AVDataset reads them).

As a list of dicts, AudioSet-2M's rows take ~340 B each, 0.7 GB per process, and every loader
worker copies those pages as reference counts touch them. Held here in a few numpy arrays instead,
which forked workers share: `python bench.py --data_scale 2000000` builds AVDataset over 2 million
generated rows in 8.3 s and holds 218 MB (a list of dicts: 16 s and ~1.5 GB), on the 2-core CPU
machine.
"""

import ctypes
import os
from array import array
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


def split_labels(text):
    """A datafile's labels string "/m/a,/m/b" -> its mids, ["/m/a", "/m/b"]."""
    return [mid.strip() for mid in text.split(",") if mid.strip()]


class PackedStrings(NamedTuple):
    """Strings in one UTF-8 buffer: string i is buffer[offsets[i] : offsets[i + 1]]."""

    buffer: np.ndarray  # (bytes,) uint8
    offsets: np.ndarray  # (n + 1,) int32, or int64 past 2 GB of text


class PackedPaths(NamedTuple):
    """Paths as (folder, name): the few distinct folders once, the folder of each path,
    the names."""

    folders: PackedStrings  # distinct folders, each ending in "/" (or "" for a bare name)
    folder_of: np.ndarray  # (n,) int32 folder of path i
    names: PackedStrings  # the name of each path


def pack_strings(texts):
    """Texts -> PackedStrings."""
    encoded = [text.encode() for text in texts]
    offsets = np.cumsum([0, *map(len, encoded)], dtype=np.int64)
    if offsets[-1] < 2**31:  # int32 offsets up to 2 GB of text
        offsets = offsets.astype(np.int32)
    return PackedStrings(np.frombuffer(b"".join(encoded), np.uint8), offsets)


def unpack_string(packed, i):
    return packed.buffer[packed.offsets[i] : packed.offsets[i + 1]].tobytes().decode()


def pack_paths(paths):
    """Paths -> PackedPaths: split at the last "/", each distinct folder kept once."""
    folders = {}  # folder -> its code, in first-seen order
    folder_of = array("i")
    names = []
    for path in paths:
        folder, slash, name = path.rpartition("/")
        folder_of.append(folders.setdefault(folder + slash, len(folders)))
        names.append(name)
    return PackedPaths(pack_strings(list(folders)), np.array(folder_of, np.int32), pack_strings(names))


def unpack_path(packed, i):
    return unpack_string(packed.folders, packed.folder_of[i]) + unpack_string(packed.names, i)


class Rows(Sequence):
    """A datafile's rows in numpy arrays instead of a list of dicts. rows[i] -> dict(video_id, wav,
    video_path, labels), paths resolved against `root` on demand; the labels as CSR codes into
    `mids`: row i's labels are mids[label_codes[label_offsets[i] : label_offsets[i + 1]]]."""

    FIELDS = ("video_id", "wav", "video_path", "labels")

    def __init__(self, records, root, source):
        try:
            fields = {key: [str(record[key]) for record in records] for key in self.FIELDS}
        except (KeyError, TypeError):
            raise ValueError(f"{source} {first_missing_field(records, self.FIELDS)}") from None
        self.root = root
        self.video_ids = pack_paths(fields["video_id"])
        self.wavs = pack_paths(fields["wav"])
        self.video_paths = pack_paths(fields["video_path"])
        mids = {}  # mid -> its code, in first-seen order
        codes = array("i")
        offsets = array("q", [0])
        for text in fields["labels"]:
            codes.extend(mids.setdefault(mid, len(mids)) for mid in split_labels(text))
            offsets.append(len(codes))
        self.mids = list(mids)  # the distinct mids, in first-seen order
        self.label_codes = np.array(codes, np.int32)  # (labels of all rows,)
        self.label_offsets = np.array(offsets, np.int64)  # (n + 1,)

    def __len__(self):
        return len(self.label_offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):  # a list of row dicts, like a list's
            return [self[j] for j in range(len(self))[i]]
        i = range(len(self))[i]  # negative i; IndexError past the end
        codes = self.label_codes[self.label_offsets[i] : self.label_offsets[i + 1]]
        return dict(
            video_id=unpack_path(self.video_ids, i),
            wav=os.path.normpath(os.path.join(self.root, unpack_path(self.wavs, i))),
            video_path=os.path.normpath(os.path.join(self.root, unpack_path(self.video_paths, i))),
            labels=",".join(self.mids[code] for code in codes),
        )


def first_missing_field(records, fields):
    """'row i: missing field(s) ...' for the first record that lacks one of `fields`."""
    for i, record in enumerate(records):
        missing = [key for key in fields if not (isinstance(record, dict) and (key in record))]
        if missing:
            return f"row {i}: missing field(s) {', '.join(missing)}"
    return "rows must be json objects"


def release_freed_heap():
    """Give the heap pages that parsing freed back to the OS (glibc keeps ~100 MB after
    AudioSet-2M's json)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
