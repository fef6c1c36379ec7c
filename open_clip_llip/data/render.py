"""Render a scene to an RGB image: antialiased shapes on a lightly shaded grey background.

Shapes are drawn at ``SUPERSAMPLE`` times the output size and box-filtered down, which
antialiases their edges. Rendering is a pure function of the scene and the image size.
"""
import io

import numpy as np
from PIL import Image, ImageDraw

from .scenes import COLOURS, EXTENT, GRID, Scene, SceneObject

SUPERSAMPLE = 4


def _background(scene: Scene, size: int) -> Image.Image:
    """The background grey level plus its linear gradient, [size, size, 3] uint8."""
    ramp = np.linspace(-1., 1., size)
    grey = scene.background + scene.gradient[0] * ramp[None, :] + scene.gradient[1] * ramp[:, None]
    grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject, cell: float):
    fill = tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(COLOURS[obj.colour], obj.tint))
    cx = (obj.column + 0.5 + obj.offset[0]) * cell
    cy = (obj.row + 0.5 + obj.offset[1]) * cell
    r = EXTENT[obj.size] * cell / 2  # half the object's extent
    if obj.shape == 'circle':
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == 'square':
        s = 0.85 * r  # a square of the circle's area would look bigger
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif obj.shape == 'triangle':
        draw.polygon(((cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)), fill=fill)
    elif obj.shape == 'cross':
        arm = r / 3  # half the width of an arm
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
    else:
        raise ValueError(f'unknown shape {obj.shape!r}')


def render(scene: Scene, image_size: int = 32) -> Image.Image:
    """The scene as an RGB image of ``image_size`` × ``image_size`` pixels."""
    canvas = _background(scene, image_size * SUPERSAMPLE)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        _draw(draw, obj, image_size * SUPERSAMPLE / GRID)
    return canvas.reduce(SUPERSAMPLE)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return buffer.getvalue()
