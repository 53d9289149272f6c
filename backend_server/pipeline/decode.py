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
            image = to_rgb8(image, name)
    except ProtocolError:
        raise
    except Image.DecompressionBombError:
        raise ProtocolError(ErrorCode.IMAGE_TOO_LARGE, f"{name}: more than {limits.MAX_PHOTO_PIXELS} pixels") from None
    except UnidentifiedImageError:
        raise ProtocolError(ErrorCode.BAD_IMAGE, f"{name}: not a readable image (not a JPEG, PNG, WebP, BMP or TIFF "
                            "file, or a damaged one)") from None
    except (OSError, ValueError, SyntaxError) as exc:
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


def to_rgb8(image: Image.Image, name: str) -> Image.Image:
    """Any image Pillow reads -> 8-bit RGB. Transparency goes over white. One-channel images of a
    wider range (16-bit and 32-bit integer, 32-bit float) are scaled from their full range, not
    clipped: `wide_range_scale`. ProtocolError BAD_IMAGE, naming the mode, where no conversion
    is right."""
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(values * (255.0 / wide_range_scale(values, image.mode, name))), 0, 255)
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_IMAGE, f"{name}: images of mode {image.mode} are not supported; "
                            "save the photo as 8-bit RGB (JPEG or PNG)") from None


def wide_range_scale(values: np.ndarray, mode: str, name: str) -> float:
    """The value that means white in a one-channel image of Pillow mode I;16* (65535), I (32-bit
    integers: 255, 65535 or 2^31 - 1, the smallest that holds the data) or F (32-bit floats: 1.0,
    255 or 65535, likewise; so a float image is taken as 0..1 when nothing in it exceeds 1)."""
    if mode.startswith("I;16"):
        return 65535.0
    kind = f"{'32-bit float' if mode == 'F' else '32-bit integer'} image (mode {mode})"
    if not np.isfinite(values).all():
        raise ProtocolError(ErrorCode.BAD_IMAGE, f"{name}: a {kind} with NaN or infinite values; save it as "
                            "8-bit RGB")
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if low < 0:
        raise ProtocolError(ErrorCode.BAD_IMAGE, f"{name}: a {kind} with negative values (down to {low:g}) "
                            "has no known black and white; save it as 8-bit RGB")
    ranges = (1.0, 255.0, 65535.0) if mode == "F" else (255.0, 65535.0, 2.0 ** 31 - 1)
    for scale in ranges:
        if high <= scale:
            return scale
    raise ProtocolError(ErrorCode.BAD_IMAGE, f"{name}: a {kind} with values up to {high:g} has no known white; "
                        "save it as 8-bit RGB")
