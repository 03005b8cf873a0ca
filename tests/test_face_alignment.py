"""LatentSync alignment geometry, the one-warp crop, and the seamless paste-back on real frames."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from latentdub.face import (
    Aligner,
    MediaPipeBackend,
    align_matrices,
    geometry,
    paste_back,
    similarity_transform,
)
from latentdub.face.alignment import apply_affine, invert_affine, warp_face
from latentdub.face.paste import blend_region_mask
from latentdub.media.reader import iter_frames, read_image

# Template points in the final square crop, as given in the issue / face_alignment_constants.json.
TEMPLATE_256 = np.array([[58.03, 51.2], [197.97, 51.2], [128.0, 102.4]])

FRAMES = [
    ("infinitetalk_hdtf_man_25fps.mp4", 0),
    ("retalking_face3_woman_25fps.mp4", 30),
    ("sadtalker_wda_katiehill_25fps_mpeg4.mp4", 0),
    ("liveportrait_s32_turned_face_30fps.mp4", 0),  # 1280x720, small turned face
    ("latentsync_demo1_portrait_hevc_25fps.mp4", 0),  # 1080x1920, small face
]


@pytest.fixture(scope="module")
def backend():
    with MediaPipeBackend() as be:
        yield be


@pytest.fixture(scope="module")
def real_faces(
    media_dir: Path, backend: MediaPipeBackend
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, frame, anchors of the largest face) for a few real frames."""
    out = []
    for name, index in FRAMES:
        image = next(iter_frames(media_dir / name, start=index)).image
        faces = backend.detect(image)
        assert faces, f"no face found in {name} frame {index}"
        out.append((name, image, max(faces, key=lambda f: f.size).anchors))
    return out


def test_geometry_matches_official_constants(reference_dir: Path) -> None:
    const = json.loads((reference_dir / "face_alignment_constants.json").read_text())
    for res in (256, 512):
        ref = const["per_resolution"][str(res)]
        geo = geometry(res)
        assert geo.ratio == pytest.approx(ref["ratio"])
        assert [geo.crop_w, geo.crop_h] == ref["warp_output_size_wh"]
        np.testing.assert_allclose(geo.template, ref["template_points_xy"])
        assert geo.scale_x == pytest.approx(ref["scale_x_warp_to_square"])
        assert geo.scale_y == pytest.approx(ref["scale_y_warp_to_square"])
        # Our square-crop template uses OpenCV's pixel-centre convention: within 0.15 px of the
        # constants file, which multiplies without the half-pixel offset.
        np.testing.assert_allclose(
            geo.template_square, ref["template_points_in_final_square_crop_xy"], atol=0.15
        )


def test_similarity_recovers_a_known_transform() -> None:
    rng = np.random.default_rng(0)
    tmpl = geometry(256).template
    for _ in range(20):
        s, th = rng.uniform(0.2, 5.0), rng.uniform(-np.pi, np.pi)
        rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) * s
        t = rng.uniform(-500, 500, 2)
        frame_pts = (tmpl - t) @ np.linalg.inv(rot).T  # points that rot·p + t maps onto tmpl
        m = similarity_transform(frame_pts, tmpl)
        np.testing.assert_allclose(m[:, :2], rot, atol=1e-9)
        np.testing.assert_allclose(m[:, 2], t, atol=1e-7)


def test_similarity_follows_the_official_std_rule() -> None:
    # A triangle that is NOT similar to the template: the official rule takes
    # scale = std(dst) / std(src) (unbiased, over all 6 centred coordinates), not least squares.
    src = np.array([[100.0, 200.0], [180.0, 195.0], [150.0, 260.0]])
    dst = geometry(512).template
    m = similarity_transform(src, dst)
    expected_scale = (dst - dst.mean(0)).std(ddof=1) / (src - src.mean(0)).std(ddof=1)
    assert np.sqrt(np.linalg.det(m[:, :2])) == pytest.approx(expected_scale)
    assert np.linalg.det(m[:, :2]) > 0  # never a reflection
    np.testing.assert_allclose(apply_affine(m, src).mean(0), dst.mean(0))  # centroids match
    batch = similarity_transform(np.stack([src, src + 7.0]), dst)
    np.testing.assert_allclose(batch[0], m)


def test_one_warp_equals_official_warp_then_resize(real_faces) -> None:
    for name, image, anchors in real_faces[:3]:
        for res in (256, 512):
            geo = geometry(res)
            sim = similarity_transform(anchors, geo.template)
            # Official: warp to (crop_w, crop_h) (bilinear, grey fill), then Lanczos resize.
            official = cv2.warpAffine(
                image, sim, (geo.crop_w, geo.crop_h), flags=cv2.INTER_LINEAR, borderValue=(127,) * 3
            )
            official = cv2.resize(official, (res, res), interpolation=cv2.INTER_LANCZOS4)
            ours = warp_face(image, align_matrices(anchors, res), res)
            mse = np.mean((ours[4:-4, 4:-4].astype(np.float64) - official[4:-4, 4:-4]) ** 2)
            psnr = 10 * np.log10(255**2 / mse)
            assert psnr > 40.0, (name, res, psnr)


def test_astronaut_anchors_land_on_the_template(media_dir: Path, backend: MediaPipeBackend) -> None:
    image = read_image(media_dir / "image_skimage_astronaut.png")
    faces = backend.detect(image)
    assert len(faces) == 1
    anchors = faces[0].anchors
    for res, tol in ((256, 2.0), (512, 4.0)):
        landed = apply_affine(align_matrices(anchors, res), anchors)
        dist = np.linalg.norm(landed - TEMPLATE_256 * res / 256, axis=1)
        assert np.all(dist < tol), (res, dist)
    # and the crop really shows the face where the template says: brows above the nose, upright
    crop = warp_face(image, align_matrices(anchors, 256), 256)
    assert crop.shape == (256, 256, 3)


@pytest.mark.parametrize("res", [256, 512])
def test_identity_round_trip_is_seamless(real_faces, res: int) -> None:
    aligner = Aligner(res)
    for name, image, anchors in real_faces:
        matrix = aligner.matrices(anchors[None])[0]
        crop = aligner.warp(image, matrix)
        out = aligner.paste_back(image, crop, matrix)
        weights = blend_region_mask(matrix, image.shape, res)
        inside = weights > 0
        assert inside.sum() > 1000, name
        # Outside the blend region the frame is returned bit for bit.
        assert np.array_equal(out[~inside], image[~inside]), name
        mse = np.mean((out[inside].astype(np.float64) - image[inside]) ** 2)
        psnr = 10 * np.log10(255**2 / max(mse, 1e-12))
        assert psnr >= 40.0, (name, res, psnr)


def test_paste_back_replaces_only_the_lower_face(real_faces) -> None:
    _name, image, anchors = real_faces[0]
    aligner = Aligner(256)
    matrix = aligner.matrices(anchors[None])[0]
    generated = np.zeros((256, 256, 3), np.uint8)
    generated[:] = (0, 255, 0)
    out = aligner.paste_back(image, generated, matrix)
    weights = blend_region_mask(matrix, image.shape, 256)
    full = weights >= 0.999
    assert full.sum() > 5000
    assert np.all(out[full] == (0, 255, 0))
    changed = np.any(out != image, axis=-1)
    assert not np.any(changed & (weights == 0))
    # The changed region is the lower face: it starts below the eyes (the brow anchors).
    rows = np.flatnonzero(changed.any(axis=1))
    assert rows.min() > anchors[:2, 1].max()
    # The same through the module-level function, with an explicit blend mask of zeros: no change.
    same = paste_back(image, generated, matrix, blend_mask=np.zeros((256, 256), np.float32))
    assert np.array_equal(same, image)


def test_warp_batch_and_faces_outside_the_frame(real_faces) -> None:
    aligner = Aligner(256)
    frames = [img for _, img, _ in real_faces[:3]]
    mats = np.stack([aligner.matrices(a[None])[0] for _, _, a in real_faces[:3]])
    batch = aligner.warp_batch(frames, mats)
    assert batch.shape == (3, 256, 256, 3)
    for i in range(3):
        assert np.array_equal(batch[i], aligner.warp(frames[i], mats[i]))
    # A crop lying entirely outside the frame is the official grey fill, and pasting it is a no-op.
    far = mats[0].copy()
    far[:, 2] += 10_000
    grey = aligner.warp(frames[0], far)
    assert np.all(grey == 127)
    assert np.array_equal(aligner.paste_back(frames[0], grey, far), frames[0])
    np.testing.assert_allclose(invert_affine(invert_affine(mats)), mats, atol=1e-9)
