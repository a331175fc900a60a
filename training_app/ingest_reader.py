"""Read an uploaded dataset file as numbered lines of text.

The reader undoes gzip compression, honours a UTF-8, UTF-16 or UTF-32 byte order mark,
detects the encoding of a file that is not UTF-8, and ends lines at CRLF, LF or a lone CR.
It reads a fixed-size chunk at a time, so its memory use depends neither on the size of the
file nor on its line endings. Like the rest of the ingest modules it imports nothing from
Django.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import logging
import re
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .ingest_problems import ProblemList

logger = logging.getLogger(__name__)

# Bytes read (after decompression) per step.
CHUNK_BYTES = 256 * 1024

# Maximum length of a physical line, in characters. A longer line is reported and skipped
# without being held in memory. 1,024 GPT-2 tokens rarely take more than 20,000 characters,
# so this only stops a file whose line endings are missing or not recognized.
MAX_LINE_CHARS = 4 * 1024 * 1024

# Bytes from the start of the file that encoding detection looks at, besides the chunk that
# contains the first byte that is not UTF-8.
DETECTION_HEAD_BYTES = 512 * 1024

# Encodings that a file may be converted from, most common first. Detection is restricted to
# these, because on short or mostly-ASCII files charset-normalizer's unrestricted guess is
# often an exotic code page (mac_latin2 for French, johab for German).
CONVERTIBLE_ENCODINGS = (
    "cp1252",
    "gb18030",
    "big5",
    "cp932",
    "shift_jis",
    "euc_jis_2004",
    "euc_jp",
    "cp949",
    "euc_kr",
    "cp1251",
    "koi8_r",
    "cp1250",
    "cp1253",
    "cp1254",
    "cp1255",
    "cp1256",
    "cp1257",
    "cp1258",
    "cp874",
)

# Chaos is charset-normalizer's percentage of implausible characters in the decoded text.
# Convertible candidates within DETECTION_TIE_MARGIN points of the lowest chaos count as
# equally likely, and the one whose text reads most like a language wins (coherence), then
# the one listed first above. A candidate more than DETECTION_ACCEPT_MARGIN points worse
# than the best unrestricted guess is not trusted, and the file is rejected with that guess.
DETECTION_TIE_MARGIN = 1.0
DETECTION_ACCEPT_MARGIN = 5.0

UTF8 = "utf-8"
UTF8_SIG = "utf-8-sig"
UTF16 = "utf-16"
UTF32 = "utf-32"

# Each byte that the decoder cannot decode becomes the lone surrogate U+DC00 + byte. No decoder
# produces lone surrogates from valid input, so they mark bad bytes without ambiguity, and
# unlike Python's "surrogateescape" this also covers bytes below 0x80 (bad UTF-16 pairs).
_ESCAPE_HANDLER = "loraweb-ingest-escape"
_ESCAPED = re.compile("[\udc00-\udcff]")
_ESCAPED_RUN = re.compile("[\udc00-\udcff]+")
_NON_ASCII = re.compile("[^\x00-\x7f\udc00-\udcff]")


def _escape_undecodable(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeDecodeError):
        raise error
    bad = error.object[error.start : error.end]
    return "".join(chr(0xDC00 + byte) for byte in bad), error.end


codecs.register_error(_ESCAPE_HANDLER, _escape_undecodable)


@dataclass(frozen=True)
class Line:
    number: int
    text: str
    # False when the line had an encoding problem, a NUL byte, a byte order mark or was too
    # long. That problem is already reported, and `text` contains U+FFFD in place of bad bytes.
    clean: bool


class EncodingSwitch(Exception):
    """Raised when the file turns out not to be UTF-8 and must be read again in `encoding`."""

    def __init__(self, encoding: str) -> None:
        super().__init__(encoding)
        self.encoding = encoding


class _HashingReader:
    """Binary reader that hashes and counts every byte read through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(CHUNK_BYTES):
            pass


class LineReader:
    """Iterate over the decoded physical lines of a file, hashing its bytes in the same pass.

    `sha256` and `size_bytes` describe the file as stored (compressed, BOM included) and are
    set once iteration has finished. With `encoding=None` the reader decides the encoding
    from the byte order mark, else UTF-8, and raises EncodingSwitch when the bytes show that
    the file is in another encoding that it can convert. Problems with bytes and compression
    go to `problems`, and problems that make the rest of the file unreadable raise
    DatasetInvalid.
    """

    def __init__(
        self,
        path: Path,
        problems: ProblemList,
        *,
        compressed: bool,
        encoding: str | None = None,
        max_decompressed_bytes: int | None = None,
    ) -> None:
        self.path = path
        self.problems = problems
        self.compressed = compressed
        self.max_decompressed_bytes = max_decompressed_bytes
        # The encoding as the user should see it: "utf-8-sig" for UTF-8 with a BOM, "utf-16"
        # and "utf-32" for files with those BOMs, else the detected codec's Python name.
        self.encoding = encoding or UTF8
        self.encoding_detected = encoding is not None
        self.has_content = False
        self.sha256 = ""
        self.size_bytes = 0
        self.decompressed_bytes = 0

        self._utf8_settled = False
        self._head = bytearray()
        self._chunk = b""
        self._chunk_index = -1
        self._lines_done = 0

    def __iter__(self) -> Generator[Line, None, None]:
        with self.path.open("rb") as raw_file:
            hashing = _HashingReader(raw_file)
            if self.compressed:
                stream: BinaryIO = gzip.GzipFile(fileobj=hashing, mode="rb")  # type: ignore[arg-type]
            else:
                stream = hashing  # type: ignore[assignment]

            yield from self._read_lines(stream)

            # Hash the bytes after the end of the gzip stream too, so sha256 covers the file.
            hashing.drain()
            self.sha256 = hashing.digest.hexdigest()
            self.size_bytes = hashing.size

    def _read_lines(self, stream: BinaryIO) -> Iterator[Line]:
        decoder: codecs.IncrementalDecoder | None = None
        splitter = _LineSplitter()

        for raw in self._raw_chunks(stream):
            if decoder is None:
                decoder = self._start_decoder(raw)
            for text in splitter.feed(decoder.decode(raw)):
                yield self._check(text)

        if decoder is not None:
            for text in splitter.feed(decoder.decode(b"", final=True)):
                yield self._check(text)
        for text in splitter.finish():
            yield self._check(text)

    def _raw_chunks(self, stream: BinaryIO) -> Iterator[bytes]:
        while True:
            try:
                raw = stream.read(CHUNK_BYTES)
            except (gzip.BadGzipFile, EOFError, zlib.error) as error:
                # Nothing after damaged gzip data can be trusted, so reading stops here.
                self.problems.add(
                    "invalid_gzip", self._lines_done + 1, error=str(error) or type(error).__name__
                )
                raise self.problems.error() from None
            if not raw:
                return

            self.decompressed_bytes += len(raw)
            limit = self.max_decompressed_bytes
            if limit is not None and self.decompressed_bytes > limit:
                self.problems.add("decompressed_too_large", None, limit=limit)
                raise self.problems.error()

            self._chunk = raw
            self._chunk_index += 1
            if len(self._head) < DETECTION_HEAD_BYTES:
                self._head += raw[: DETECTION_HEAD_BYTES - len(self._head)]
            yield raw

    def _start_decoder(self, first: bytes) -> codecs.IncrementalDecoder:
        if not self.encoding_detected:
            self.encoding = self._encoding_from_start(first)
        return codecs.getincrementaldecoder(self.encoding)(errors=_ESCAPE_HANDLER)

    def _encoding_from_start(self, first: bytes) -> str:
        # UTF-32 first: its little-endian BOM begins with the UTF-16 one.
        if first.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
            return UTF32
        if first.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return UTF16
        if first.startswith(codecs.BOM_UTF8):
            return UTF8_SIG

        # Without a BOM, UTF-16 text in Latin script decodes as UTF-8 with a NUL byte after
        # every character, so one problem for the file is clearer than one per line.
        if _looks_like_utf16_without_bom(first):
            self.problems.add("utf16_encoding", 1)
            raise self.problems.error()
        return UTF8

    def _check(self, piece: str | None) -> Line:
        self._lines_done += 1
        number = self._lines_done

        if piece is None:
            self.has_content = True
            self.problems.add("line_too_long", number, limit=MAX_LINE_CHARS)
            return Line(number, "", clean=False)

        escaped = None if piece.isascii() else _ESCAPED.search(piece)
        if escaped is not None:
            column = escaped.start() + 1
            byte = f"0x{ord(escaped.group()) - 0xDC00:02X}"
            self._report_bad_byte(number, column, byte)
            return self._note_content(Line(number, _ESCAPED.sub("\ufffd", piece), clean=False))

        if "\x00" in piece:
            self.problems.add("nul_byte", number)
            return self._note_content(Line(number, piece.replace("\x00", "\ufffd"), clean=False))

        # The decoder has already removed the BOM at the start of the file, so any U+FEFF left
        # is inside the text.
        bom_at = piece.find("\ufeff")
        if bom_at >= 0:
            self.problems.add("bom_in_middle", number, column=bom_at + 1)
            return self._note_content(Line(number, piece.replace("\ufeff", ""), clean=False))

        return self._note_content(Line(number, piece, clean=True))

    def _note_content(self, line: Line) -> Line:
        if not self.has_content and line.text.strip():
            self.has_content = True
        return line

    def _report_bad_byte(self, number: int, column: int, byte: str) -> None:
        if self.encoding == UTF8 and not self._utf8_settled:
            self._decide_encoding(number, column, byte)

        if self.encoding in (UTF8, UTF8_SIG):
            self.problems.add("invalid_encoding", number, column=column, byte=byte)
        else:
            self.problems.add(
                "decode_error", number, column=column, byte=byte, encoding=self.encoding
            )

    def _decide_encoding(self, number: int, column: int, byte: str) -> None:
        """Decide, at the first bad byte of a file read as UTF-8, what the file really is.

        Returns when the file is damaged UTF-8, so the bad bytes are reported line by line.
        Raises EncodingSwitch when it is in a convertible encoding, and DatasetInvalid with
        one problem for the file when it is in any other encoding.
        """
        self._utf8_settled = True
        sample = bytes(self._head)
        if self._chunk_index * CHUNK_BYTES >= DETECTION_HEAD_BYTES:
            sample += self._chunk

        if _looks_like_damaged_utf8(sample):
            return

        convertible, best = detect_encoding(sample)
        if convertible is not None:
            logger.info("Reading %s again as %s (detected)", self.path.name, convertible)
            raise EncodingSwitch(convertible)

        if best is None:
            self.problems.add("unknown_encoding", number, column=column, byte=byte)
        else:
            self.problems.add(
                "unsupported_encoding", number, column=column, byte=byte, encoding=best
            )
        raise self.problems.error()


class _LineSplitter:
    """Split decoded text chunks into lines at CRLF, LF and lone CR.

    Yields each complete line without its line ending, or None for a line longer than
    MAX_LINE_CHARS, whose text is dropped as it arrives.
    """

    def __init__(self) -> None:
        self.pending: list[str] = []
        self.pending_chars = 0
        self.overlong = False
        # A CR at the end of a chunk may be the first half of a CRLF split between chunks.
        self.carried_cr = False

    def feed(self, text: str) -> Iterator[str | None]:
        if self.carried_cr:
            text = "\r" + text
            self.carried_cr = False
        if text.endswith("\r"):
            text = text[:-1]
            self.carried_cr = True
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")

        pieces = text.split("\n")
        for piece in pieces[:-1]:
            self._extend(piece)
            yield self._take()
        self._extend(pieces[-1])

    def finish(self) -> Iterator[str | None]:
        if self.carried_cr:
            self.carried_cr = False
            yield self._take()
        if self.pending or self.overlong:
            yield self._take()

    def _extend(self, piece: str) -> None:
        if self.overlong or not piece:
            return
        self.pending_chars += len(piece)
        if self.pending_chars > MAX_LINE_CHARS:
            self.overlong = True
            self.pending = []
        else:
            self.pending.append(piece)

    def _take(self) -> str | None:
        line = None if self.overlong else "".join(self.pending)
        self.pending = []
        self.pending_chars = 0
        self.overlong = False
        return line


def _looks_like_utf16_without_bom(start: bytes) -> bool:
    sample = start[:4096]
    half = len(sample) // 2
    if half < 4:
        return False

    even_nuls = sample[0::2].count(0)
    odd_nuls = sample[1::2].count(0)
    return max(even_nuls, odd_nuls) >= 0.4 * half and min(even_nuls, odd_nuls) <= 0.1 * half


def _looks_like_damaged_utf8(sample: bytes) -> bool:
    """Tell UTF-8 with a few bad bytes from text in another encoding.

    In UTF-8 text with damage, valid multi-byte characters outweigh the bad bytes. In text
    in a legacy encoding, most bytes above 0x7F are invalid UTF-8, and the few that decode
    do so by accident. A multi-byte sequence cut short (lead byte and continuation bytes,
    then the end of a line) counts as UTF-8, because it is typical of a truncated file.
    """
    text = sample.decode(UTF8, errors=_ESCAPE_HANDLER)
    valid_bytes = sum(len(char.encode(UTF8)) for char in _NON_ASCII.findall(text))
    invalid_bytes = 0

    for run in _ESCAPED_RUN.finditer(text):
        raw = bytes(ord(char) - 0xDC00 for char in run.group())
        if _is_cut_utf8_sequence(raw):
            valid_bytes += len(raw)
        else:
            invalid_bytes += len(raw)
    return valid_bytes >= invalid_bytes


def _is_cut_utf8_sequence(raw: bytes) -> bool:
    if len(raw) < 2 or not 0xC2 <= raw[0] <= 0xF4:
        return False
    if raw[0] < 0xE0:
        expected = 2
    elif raw[0] < 0xF0:
        expected = 3
    else:
        expected = 4
    return len(raw) < expected and all(0x80 <= byte <= 0xBF for byte in raw[1:])


def detect_encoding(sample: bytes) -> tuple[str | None, str | None]:
    """Return (encoding to convert from, best unrestricted guess) for bytes that are not UTF-8.

    The first is None when no convertible encoding fits well enough, and the second is None
    when charset-normalizer finds no encoding at all. NOTE: encodings that differ in a few
    letters only (cp1252 and cp1254 for Turkish, for example) often tie, so the note shown
    with a converted dataset tells the user to check the preview.
    """
    from charset_normalizer import from_bytes

    overall = from_bytes(sample).best()
    guess = overall.encoding if overall is not None else None
    candidates = list(from_bytes(sample, cp_isolation=list(CONVERTIBLE_ENCODINGS)))
    if not candidates:
        return None, guess

    lowest = min(match.percent_chaos for match in candidates)
    tied = [match for match in candidates if match.percent_chaos <= lowest + DETECTION_TIE_MARGIN]
    chosen = min(
        tied,
        key=lambda match: (-match.percent_coherence, _preference(match.encoding)),
    )
    if overall is not None and chosen.percent_chaos > overall.percent_chaos + DETECTION_ACCEPT_MARGIN:
        return None, guess
    return chosen.encoding, guess or chosen.encoding


def _preference(encoding: str) -> int:
    if encoding in CONVERTIBLE_ENCODINGS:
        return CONVERTIBLE_ENCODINGS.index(encoding)
    return len(CONVERTIBLE_ENCODINGS)
