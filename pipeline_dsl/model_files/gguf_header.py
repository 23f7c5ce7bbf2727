"""The GGUF header (magic, version, metadata, tensor infos) read with `struct` over an mmap.

    header = read_gguf_header("m.gguf")          # every length and offset checked
    header.metadata["llama.block_count"]; header.tensors[0].shape

Every count and length is compared with the bytes left in the file *before* anything is
allocated or looped over, so a header that claims 2**62 entries, a string longer than the
file or a tensor whose data runs past the end is a `ModelFileProblem` at once. Tensor
data is never read. Layout: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field

from .problem import ModelFileProblem

GGUF_MAGIC, GGUF_VERSIONS = b"GGUF", (2, 3)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
VALUE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32",
                7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}
INT_TYPES, FLOAT_TYPES = {0, 1, 2, 3, 4, 5, 10, 11}, {6, 12}
_MIN_VALUE = {**{t: struct.calcsize("<" + c) for t, c in _SCALARS.items()}, _STRING: 8, _ARRAY: 12}
_U64 = struct.Struct("<Q")
_MIN_KV = 8 + 4 + 1            # key length, value type, the smallest value
_MIN_TENSOR = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
_MAX_ARRAY_DEPTH = 4
_MAX_DIMS = 4                  # GGML_MAX_DIMS

# GGML tensor types: id -> (name, weights per block, bytes per block); gguf.constants.GGML_QUANT_SIZES
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
# the types gguf.quants can turn into float32 (the others hold integers or are scratch formats)
DEQUANTIZABLE = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                 "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S",
                 "IQ4_XS", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4"}


@dataclass(frozen=True)
class GGUFArray:
    """An array value not decoded (read_gguf_header(arrays=False)): its element type and length."""

    element: str
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    dims: tuple          # GGUF order: dims[0] is the row length (the numpy shape reversed)
    type: int            # a GGML_TYPES id
    offset: int          # of its data, from the start of the data section
    nbytes: int

    @property
    def shape(self) -> tuple:
        return tuple(reversed(self.dims))

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type][0]


@dataclass(frozen=True)
class GGUFHeader:
    path: str
    version: int
    metadata: dict                 # key -> value; arrays as lists (GGUFArray when not decoded)
    types: dict                    # key -> "uint32", "string", "array[string]", …
    unreadable: dict = field(default_factory=dict)  # key -> why its value cannot be read
    tensors: tuple = ()            # GGUFTensorInfo, in file order
    data_offset: int = 0           # where the tensor data starts
    file_size: int = 0


def read_gguf_header(path, *, arrays: bool = True) -> GGUFHeader:
    """Parse and bound-check everything before the tensor data; arrays=False leaves array
    values undecoded (GGUFArray), which is all a check needs."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ModelFileProblem(path, "the file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _GGUFParser(path, buf, size, arrays).parse()
    except OSError as e:
        raise ModelFileProblem(path, f"cannot read the file ({e.strerror or e})") from e


class _GGUFParser:
    def __init__(self, path: str, buf, size: int, arrays: bool):
        self.path, self.buf, self.size, self.arrays = path, buf, size, arrays
        self.pos, self.bad = 0, None   # bad: why the value being read cannot be decoded

    def fail(self, problem: str):
        raise ModelFileProblem(self.path, problem)

    def take(self, n: int, what: str) -> int:
        """Claim the next n bytes (start offset); a claim past the end is the file's fault."""
        if n > self.size - self.pos:
            self.fail(f"{what} (byte {self.pos}, {n} bytes) runs past the end of the file at byte "
                      f"{self.size}: the file is truncated or corrupt")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, code: str, what: str):
        fmt = "<" + code
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def raw_string(self, what: str) -> bytes:
        n = self.scalar("Q", f"the length of {what}")
        start = self.take(n, what)
        return self.buf[start:start + n]

    def name(self, what: str) -> str:
        raw = self.raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{what} is not UTF-8 text ({e.reason} at byte {e.start})")

    def text(self, raw: bytes, element: str = ""):
        """A metadata string; one that is not UTF-8 marks the value being read unreadable."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.bad = self.bad or f"{element + ' is ' if element else ''}not UTF-8 ({e.reason} at byte {e.start})"
            return None

    def parse(self) -> GGUFHeader:
        head = self.buf[:4]
        if len(head) < 4 and GGUF_MAGIC.startswith(head):
            self.fail(f"truncated: the file ends at byte {self.size}, inside the GGUF magic")
        if head != GGUF_MAGIC:
            # the bytes themselves are not shown: a diagnostic never quotes a file that is not agp's
            self.fail(f"not a GGUF file: its first 4 bytes are not {GGUF_MAGIC!r}")
        self.pos = 4
        version = self.scalar("I", "the GGUF version")
        if version not in GGUF_VERSIONS:
            if version & 0xFFFF == 0 and int.from_bytes(version.to_bytes(4, "little"), "big") in GGUF_VERSIONS:
                self.fail("a big-endian GGUF file: this engine reads little-endian GGUF files")
            self.fail(f"GGUF version {version} is not supported (versions 2 and 3 are)")
        n_tensors = self.scalar("Q", "the tensor count")
        n_kv = self.scalar("Q", "the metadata count")
        left = self.size - self.pos
        if n_kv * _MIN_KV > left:
            self.fail(f"the header claims {n_kv} metadata entries, more than a file of {self.size} bytes "
                      f"can hold: the file is truncated or corrupt")
        if n_tensors * _MIN_TENSOR > left - n_kv * _MIN_KV:
            self.fail(f"the header claims {n_tensors} tensors, more than a file of {self.size} bytes "
                      f"can hold: the file is truncated or corrupt")

        meta, types, unreadable = {}, {}, {}
        for i in range(n_kv):
            key = self.name(f"the key of metadata entry {i}")
            vtype = self.scalar("I", f"the type of metadata {key!r}")
            self.bad = None
            value, tname = self.value(vtype, key, 0)
            if key in types:
                self.fail(f"metadata {key!r} appears twice")
            types[key] = tname
            if self.bad:
                unreadable[key] = self.bad
            else:
                meta[key] = value

        alignment = meta.get("general.alignment", 32)
        if "general.alignment" in types and (types["general.alignment"] != "uint32" or alignment <= 0
                                             or alignment & (alignment - 1)):
            self.fail(f"metadata 'general.alignment' must be a power of two (uint32), not {alignment!r}")

        tensors, names = [], set()
        for i in range(n_tensors):
            t = self.tensor_info(i, alignment)
            if t.name in names:
                self.fail(f"tensor {t.name!r} appears twice")
            names.add(t.name)
            tensors.append(t)
        data_offset = -(-self.pos // alignment) * alignment
        for t in tensors:
            start = data_offset + t.offset
            if start + t.nbytes > self.size:
                self.fail(f"the data of tensor {t.name!r} (bytes {start}-{start + t.nbytes}) runs past the "
                          f"end of the file at byte {self.size}: the file is truncated")
        return GGUFHeader(self.path, version, meta, types, unreadable, tuple(tensors), data_offset, self.size)

    def value(self, vtype: int, key: str, depth: int):
        """(value, type name) of one metadata value at self.pos."""
        what = f"the value of metadata {key!r}"
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what), VALUE_NAMES[vtype]
        if vtype == _STRING:
            return self.text(self.raw_string(what)), "string"
        if vtype != _ARRAY:
            self.fail(f"metadata {key!r} has unknown value type {vtype}")
        if depth >= _MAX_ARRAY_DEPTH:
            self.fail(f"metadata {key!r} nests arrays more than {_MAX_ARRAY_DEPTH} deep")
        etype = self.scalar("I", f"the element type of metadata {key!r}")
        n = self.scalar("Q", f"the length of metadata {key!r}")
        if etype not in _MIN_VALUE:
            self.fail(f"metadata {key!r} is an array of unknown value type {etype}")
        if n * _MIN_VALUE[etype] > self.size - self.pos:
            self.fail(f"metadata {key!r} claims {n} elements at byte {self.pos}, more than the rest of the "
                      f"file can hold: the file is truncated or corrupt")
        tname = f"array[{VALUE_NAMES[etype]}]"
        if etype in _SCALARS:
            code = _SCALARS[etype]
            start = self.take(n * struct.calcsize("<" + code), what)
            if not self.arrays:
                return GGUFArray(VALUE_NAMES[etype], n), tname
            return list(struct.unpack_from(f"<{n}{code}", self.buf, start)), tname
        if etype == _STRING:
            items = self.strings(n, key)
        else:
            items = [self.value(_ARRAY, key, depth + 1)[0] for _ in range(n)]
        return (items if self.arrays else GGUFArray(VALUE_NAMES[etype], n)), tname

    def strings(self, n: int, key: str) -> list:
        """The n strings of an array at self.pos (a tokenizer's vocabulary and merges: ~10^5 of
        them, read in one tight loop; an element that runs past the end or is not UTF-8 is
        reported by raw_string / text, as one at a time would be)."""
        buf, size, pos, arrays = self.buf, self.size, self.pos, self.arrays
        length = _U64.unpack_from
        items = []
        for j in range(n):
            if size - pos >= 8:
                (m,) = length(buf, pos)
                if m <= size - pos - 8:
                    raw = buf[pos + 8:pos + 8 + m]
                    pos += 8 + m
                    if arrays:
                        try:
                            items.append(raw.decode("utf-8"))
                        except UnicodeDecodeError:
                            items.append(self.text(raw, f"element {j}"))
                    continue
            self.pos = pos              # the file's fault: the slow path names the element and the byte
            self.raw_string(f"element {j} of metadata {key!r}")
        self.pos = pos
        return items

    def tensor_info(self, i: int, alignment: int) -> GGUFTensorInfo:
        name = self.name(f"the name of tensor {i}")
        n_dims = self.scalar("I", f"the dimension count of tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            self.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS} expected)")
        dims = struct.unpack_from(f"<{n_dims}Q", self.buf, self.take(8 * n_dims, f"the shape of tensor {name!r}"))
        ttype = self.scalar("I", f"the type of tensor {name!r}")
        offset = self.scalar("Q", f"the data offset of tensor {name!r}")
        if ttype not in GGML_TYPES:
            self.fail(f"tensor {name!r} has unknown type {ttype} (not a GGML tensor type)")
        tname, block, block_bytes = GGML_TYPES[ttype]
        if min(dims) < 1 or dims[0] % block:
            self.fail(f"tensor {name!r} has shape {list(dims)}, impossible for type {tname} "
                      f"(rows of a multiple of {block} weights)")
        if offset % alignment:
            self.fail(f"tensor {name!r} starts at offset {offset}, not a multiple of the alignment {alignment}")
        nbytes = math.prod(dims) // block * block_bytes
        return GGUFTensorInfo(name, tuple(dims), ttype, offset, nbytes)
