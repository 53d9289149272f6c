"""Stage 1, decode: encoded photo bytes -> RGB uint8 array, EXIF-upright, long side capped."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shared_protocol import ErrorCode, ProtocolError, limits

DEFAULT_MAX_SIDE = 2048   # pixels; longer photos are downscaled to this long side

Image.MAX_IMAGE_PIXELS = limits.MAX_PHOTO_PIXELS


@dataclass(frozen=True)
class PhotoInfo:
    """What is known of a decoded photo without its pixels. scale: decoded pixels per original
    pixel (<= 1)."""

    name: str
    size: tuple[int, int]            # (width, height) of the decoded pixels
    original_size: tuple[int, int]   # (width, height) after EXIF rotation, before downscaling
    scale: float

    def info(self) -> PhotoInfo:
        """This photo's facts alone (a Photo without its pixels, e.g. to send to another process)."""
        return PhotoInfo(self.name, self.size, self.original_size, self.scale)


@dataclass(frozen=True)
class Photo(PhotoInfo):
    """A decoded photo. rgb: (H, W, 3) uint8, sRGB, photo pixels (x right, y down)."""

    rgb: np.ndarray


def decode_photo(data: bytes, name: str, max_side: int = DEFAULT_MAX_SIDE) -> Photo:
    """JPEG, PNG, WebP, BMP or TIFF bytes -> Photo. Raises ProtocolError naming the file on bad input."""
    if len(data) > limits.MAX_PHOTO_BYTES:
        raise ProtocolError(ErrorCode.IMAGE_TOO_LARGE,
                            f"{name}: {len(data)} bytes, over the limit of {limits.MAX_PHOTO_BYTES}")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image: Image.Image = opened
            if opened.format not in ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "MPO"):
                raise ProtocolError(ErrorCode.BAD_IMAGE, f"{name}: {opened.format} images are not "
                                    "supported; use JPEG, PNG, WebP, BMP or TIFF")
            width, height = image.size
            if width * height > limits.MAX_PHOTO_PIXELS:
                raise ProtocolError(ErrorCode.IMAGE_TOO_LARGE, f"{name}: {width}x{height} pixels, over "
                                    f"the limit of {limits.MAX_PHOTO_PIXELS}")
            orientation = image.getexif().get(0x0112, 1)
            original_size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
            opened.draft("RGB", (max_side, max_side))      # JPEG: decode at reduced size when possible
            image = ImageOps.exif_transpose(opened)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, rgba)
            image = image.convert("RGB")
    except ProtocolError:
        raise
    except Image.DecompressionBombError:
        raise ProtocolError(ErrorCode.IMAGE_TOO_LARGE, f"{name}: more than {limits.MAX_PHOTO_PIXELS} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ProtocolError(ErrorCode.BAD_IMAGE, f"{name}: not a readable image ({exc})") from None
    if min(width, height) < limits.MIN_PHOTO_SIDE:
        raise ProtocolError(ErrorCode.IMAGE_TOO_SMALL, f"{name}: {width}x{height} pixels; a photo needs "
                            f"at least {limits.MIN_PHOTO_SIDE} pixels on each side")
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)),
                             Image.Resampling.LANCZOS)
    scale = image.size[0] / original_size[0]
    rgb = np.asarray(image, dtype=np.uint8)
    return Photo(name=name, size=(rgb.shape[1], rgb.shape[0]), original_size=original_size, scale=scale, rgb=rgb)
