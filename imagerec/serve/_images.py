"""Image bytes from a request to RGB pixels: ``imagerec._decode.load_rgb`` for uploads.

The same rules as for files on disk (the pixel limit against decompression bombs, sides at most
50:1, EXIF orientation, transparency on white), plus an allow-list of formats: Pillow is only
asked to parse the formats imagerec reads from disk, so a request cannot reach its rarer parsers.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from .._decode import DEFAULT_MAX_PIXELS, DecodeError, _check_size, to_rgb

# Pillow's names of the formats of imagerec's IMAGE_EXTENSIONS (its JPEG parser also reads MPO)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")


def decode_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode one uploaded image to RGB, with its EXIF orientation applied.

    Args:
        data: the file's bytes.
        max_pixels: refuse images with more pixels than this (a decompression-bomb guard).

    Returns:
        A fully decoded PIL image in mode ``RGB``.

    Raises:
        DecodeError: empty, not an image of an allowed format, truncated or corrupt, too large,
            or too thin (sides over 50:1, which ``imagerec predict`` skips as well).
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise DecodeError(
                        f"{width}x{height} = {width * height:,} pixels is over the server's limit of "
                        f"{max_pixels:,} (a decompression-bomb guard); send a smaller image"
                    )
                _check_size(img.size, max_pixels)  # and too thin, as imagerec predict skips it
                img.load()
                return to_rgb(ImageOps.exif_transpose(img))
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise DecodeError(f"decompression bomb refused by Pillow: {e}") from None
    except UnidentifiedImageError:
        raise DecodeError(f"not an image in one of the accepted formats ({', '.join(ALLOWED_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
        raise DecodeError(f"corrupt or truncated image ({e})") from None
