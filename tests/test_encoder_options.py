"""Encoder preset / encoder choice / opt-in sampler: options, CLI, writer, pipeline and service.

Independent checks: the x264 preset is read back from the "options:" string x264 itself writes
into the bitstream (SEI), and compared with x264's documented preset table; the DPM-Solver++
profile is checked against an exact denoiser whose ODE solution is known in closed form.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from cli_helpers import TEST_CONSENT, TEST_CONSENT_JSON, invoke
from latentdub.errors import InputError
from latentdub.media import encoders
from latentdub.media import writer as writer_mod
from latentdub.media.reader import iter_frames
from latentdub.media.writer import VideoWriter, mux_info, nvenc_options, nvenc_status
from latentdub.options import DubOptions, OptionError

# x264's presets, fastest first, with the subme / me / ref each one sets
# (x264 --fullhelp, "Presets"; medium is x264's defaults).
X264_TABLE = {
    "ultrafast": {"subme": "0", "me": "dia", "ref": "1"},
    "superfast": {"subme": "1", "me": "dia", "ref": "1"},
    "veryfast": {"subme": "2", "me": "hex", "ref": "1"},
    "faster": {"subme": "4", "me": "hex", "ref": "2"},
    "fast": {"subme": "6", "me": "hex", "ref": "2"},
    "medium": {"subme": "7", "me": "hex", "ref": "3"},
    "slow": {"subme": "8", "me": "hex", "ref": "5"},
    "slower": {"subme": "9", "me": "umh", "ref": "8"},
    "veryslow": {"subme": "10", "me": "umh", "ref": "16"},
}


def x264_settings(path: Path) -> dict[str, str]:
    """The encoder settings x264 wrote into the stream's SEI ("... - options: cabac=1 ref=3 ...")."""
    data = path.read_bytes()
    match = re.search(rb"x264 - core \d+.*? - options: ([ -~]+)", data)
    assert match, f"no x264 SEI in {path}"
    return dict(item.split("=", 1) for item in match.group(1).decode().split() if "=" in item)


def frames(count: int = 4, size: tuple[int, int] = (64, 96)) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    return [np.roll(base, 2 * k, axis=1) for k in range(count)]


def encode(path: Path, **kwargs: object) -> VideoWriter:
    images = frames()
    h, w = images[0].shape[:2]
    with VideoWriter(path, width=w, height=h, time_base=Fraction(1, 25), fps=25, **kwargs) as writer:  # type: ignore[arg-type]
        for image in images:
            writer.write(image)
    return writer


@pytest.fixture
def nvenc_unusable() -> None:
    if nvenc_status()[0]:
        pytest.skip("NVENC opens on this machine: the CPU fallback cannot be observed here")


# -- options --------------------------------------------------------------------------------------
def test_defaults_are_the_official_sampler_and_a_preset_sized_to_the_device() -> None:
    opts = DubOptions()
    assert (opts.sampler, opts.steps, opts.preset, opts.encoder) == ("ddim", 20, "auto", "auto")
    assert opts.output_change_warnings() == []
    # auto: fast enough to keep up with a GPU; the better-compressing x264 default elsewhere
    assert opts.for_device("cuda").preset == "veryfast"
    assert opts.for_device("cpu").preset == opts.for_device("mps").preset == "medium"
    assert opts.for_device("cuda").replace(preset="auto") == opts
    assert DubOptions(preset="slow").for_device("cuda").preset == "slow"  # a chosen preset is kept
    for name in ("preset", "encoder", "sampler"):
        assert DubOptions.describe(name)
    assert "CHANGES THE OUTPUT" in DubOptions.describe("sampler")


def test_a_bad_preset_names_every_valid_one_in_speed_order() -> None:
    with pytest.raises(OptionError) as err:
        DubOptions(preset="warp")
    message = str(err.value)
    assert err.value.field == "preset" and message.startswith("preset must be auto or one of") and "'warp'" in message
    assert [w for w in re.findall(r"\w+", message) if w in X264_TABLE] == list(X264_TABLE)  # fastest first
    with pytest.raises(OptionError, match="placebo is not offered"):
        DubOptions(preset="placebo")
    with pytest.raises(OptionError, match="preset must be auto or one of"):
        DubOptions(preset=3)  # type: ignore[arg-type]
    assert DubOptions(preset=" Slow ").preset == "slow"
    with pytest.raises(OptionError, match="encoder must be one of"):
        DubOptions(encoder="qsv")
    with pytest.raises(OptionError, match="sampler must be one of"):
        DubOptions(sampler="euler")


def test_round_trip_with_the_new_fields_and_sampler_step_defaults() -> None:
    opts = DubOptions(preset="slow", encoder="x264", sampler="dpm++", crf=20)
    data = opts.to_dict()
    assert {k: data[k] for k in ("preset", "encoder", "sampler", "steps")} == {
        "preset": "slow", "encoder": "x264", "sampler": "dpm++", "steps": 10,
    }
    assert DubOptions.from_dict(data) == opts
    assert DubOptions.from_dict(DubOptions().to_dict()) == DubOptions()
    # steps follow the sampler only when not given
    assert DubOptions(sampler="dpm++", steps=20).steps == 20
    assert DubOptions().replace(sampler="dpm++").steps == 10
    assert DubOptions(sampler="dpm++").replace(sampler="ddim").steps == 20
    assert DubOptions(steps=7).replace(sampler="dpm++").steps == 7
    assert DubOptions.resolve({"sampler": "dpm++"}, {}).steps == 10
    warning = DubOptions(sampler="dpm++").output_change_warnings()
    assert len(warning) == 1 and "changes the output" in warning[0] and "dpm++" in warning[0]


# -- the preset reaches x264 ---------------------------------------------------------------------
@pytest.mark.parametrize("preset", list(X264_TABLE))
def test_the_preset_reaches_x264(preset: str, tmp_path: Path) -> None:
    writer = encode(tmp_path / "out.mp4", preset=DubOptions(preset=preset).preset, crf=23)
    settings = x264_settings(tmp_path / "out.mp4")
    assert writer.codec_name == "libx264"
    assert {k: settings[k] for k in X264_TABLE[preset]} == X264_TABLE[preset]
    assert settings["crf"] == "23.0" and settings["mbtree"] == "0"


# -- encoder choice ------------------------------------------------------------------------------
def test_auto_falls_back_to_x264_with_one_log_line(
    nvenc_unusable: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="latentdub.media.encoders")
    writer = encode(tmp_path / "out.mp4", encoder="auto", preset="ultrafast")
    lines = [r.getMessage() for r in caplog.records if "encoder auto" in r.getMessage()]
    assert len(lines) == 1 and "libx264" in lines[0] and "h264_nvenc" in lines[0]
    assert nvenc_status()[1] in lines[0]  # the reason is said
    assert writer.codec_name == "libx264" and "subme" in x264_settings(tmp_path / "out.mp4")


def test_explicit_nvenc_fails_clearly_and_leaves_nothing(nvenc_unusable: None, tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        encode(tmp_path / "out.mp4", encoder="nvenc")
    message = str(err.value)
    assert "nvenc" in message and "NVENC is not usable here" in message and "x264" in message
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="Unknown video encoder"):
        encode(tmp_path / "out.mp4", encoder="vaapi")


def test_the_probe_runs_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def probe() -> tuple[bool, str]:
        calls.append(1)
        return False, "probe says no"

    monkeypatch.setattr(encoders, "_probe_nvenc", probe)
    writer_mod._reset_nvenc_probe()
    try:
        assert nvenc_status() == (False, "probe says no") == nvenc_status()
        assert writer_mod.resolve_encoder("auto") == "libx264" and len(calls) == 1
    finally:
        writer_mod._reset_nvenc_probe()


def test_the_probe_opens_and_encodes_for_real() -> None:
    """The probe's code path is the same for any encoder: a working one (x264) says yes."""
    assert writer_mod._try_encoder("libx264", {"preset": "ultrafast"}) == (True, "")
    ok, why = writer_mod._try_encoder("libx264", {"preset": "nonsense"})
    assert not ok and why.startswith("libx264 could not be opened")


def test_nvenc_that_probes_fine_but_refuses_the_stream(
    nvenc_unusable: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The probe said yes but the real stream cannot open: auto restarts the file with x264."""
    monkeypatch.setattr(encoders, "_nvenc_probe", (True, ""))
    caplog.set_level(logging.INFO, logger="latentdub.media.writer")
    writer = encode(tmp_path / "auto.mp4", encoder="auto", preset="ultrafast")
    assert writer.codec_name == "libx264" and any("refused" in r.getMessage() for r in caplog.records)
    info = mux_info(tmp_path / "auto.mp4")
    assert info.num_frames == 4 and info.video_codec == "h264"
    with pytest.raises(InputError, match="encoder nvenc could not encode"):
        encode(tmp_path / "nvenc.mp4", encoder="nvenc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.mp4"]


def test_nvenc_settings_follow_the_x264_ones() -> None:
    levels = [int(nvenc_options(18, p)["preset"].removeprefix("p")) for p in X264_TABLE]
    assert levels[0] == 1 and levels[-1] == 7 and levels == sorted(levels) and set(levels) == set(range(1, 8))
    assert nvenc_options(23, "medium")["cq"] == "23" and nvenc_options(23, "medium")["rc"] == "vbr"
    assert nvenc_options(0, "medium")["tune"] == "lossless" and "cq" not in nvenc_options(0, "medium")


# -- the opt-in sampler --------------------------------------------------------------------------
def test_dpm_solver_shares_the_noise_schedule_and_solves_exactly_for_known_data() -> None:
    from latentdub.models.scheduler import build_scheduler, scheduler_for

    ddim = build_scheduler()
    dpm = scheduler_for("dpm++", ddim)
    # A fresh instance per dub, whatever the sampler: set_timesteps writes into it.
    again = scheduler_for("ddim", ddim)
    assert again is not ddim and dict(again.config) == dict(ddim.config)
    assert scheduler_for("dpm++", ddim) is not dpm
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD "scaled_linear"
    assert torch.allclose(dpm.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), atol=1e-6)
    dpm.set_timesteps(10)
    assert dpm.timesteps.tolist() == list(range(999, 0, -100))  # "trailing": starts at the noisiest step

    # Data that is one fixed tensor c: the exact noise prediction is (x - √ᾱ c)/√(1-ᾱ), and every
    # correct solver of the probability-flow ODE must end on c.
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(1, 4, 2, 8, 8, generator=gen)
    x = torch.randn(1, 4, 2, 8, 8, generator=gen) * dpm.init_noise_sigma
    abar = dpm.alphas_cumprod
    for t in dpm.timesteps:
        eps = (x - abar[t].sqrt() * c) / (1 - abar[t]).sqrt()
        x = dpm.step(eps, t, dpm.scale_model_input(x, t)).prev_sample
    assert torch.allclose(x, c, atol=1e-4)


@pytest.fixture(scope="module")
def pipe(tiny_weights: Path):  # type: ignore[no-untyped-def]
    from latentdub import LipSyncPipeline

    return LipSyncPipeline.from_pretrained(tiny_weights, device="cpu")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: on a shared, oversubscribed machine two spinning threads are ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_dpm_profile_dubs_with_a_warning_and_differs_from_ddim(  # type: ignore[no-untyped-def]
    pipe, media_dir: Path, tmp_path: Path, one_thread: None
) -> None:
    data, rate = sf.read(str(media_dir / "audio_musetalk_eng_60s_16k.wav"), dtype="float32", always_2d=True)
    sf.write(str(tmp_path / "a.wav"), data[: int(0.6 * rate)], rate)
    video = media_dir / "retalking_face3_woman_25fps.mp4"
    # guidance 1 (no CFG branch) halves the U-Net work; it does not touch the sampler.
    fast = pipe(video, tmp_path / "a.wav", tmp_path / "dpm.mp4", sampler="dpm++", preset="ultrafast", guidance=1.0,
                consent=TEST_CONSENT)
    assert fast.options["sampler"] == "dpm++" and fast.options["steps"] == 10 and fast.options["preset"] == "ultrafast"
    assert any("changes the output" in w and "dpm++" in w for w in fast.warnings)
    assert x264_settings(tmp_path / "dpm.mp4")["subme"] == "0"  # the option reached the encoder
    # Same step count, official sampler, default preset: no such warning, and other pixels.
    ref = pipe(video, tmp_path / "a.wav", tmp_path / "ddim.mp4", steps=10, guidance=1.0, consent=TEST_CONSENT)
    assert ref.options["sampler"] == "ddim" and not any("changes the output" in w for w in ref.warnings)
    # preset auto on the CPU: the report and the bitstream both say medium
    assert ref.options["preset"] == "medium" and x264_settings(tmp_path / "ddim.mp4")["subme"] == X264_TABLE["medium"]["subme"]
    # encoder auto on a machine without NVENC: the result names x264, as the file's stream does
    with av.open(str(tmp_path / "ddim.mp4")) as probe:
        written = probe.streams.video[0].codec_context.name
    assert ref.encoder == "libx264" and written == "h264" and ref.to_dict()["encoder"] == "libx264"
    a = np.stack([f.image for f in iter_frames(tmp_path / "dpm.mp4")]).astype(np.int16)
    b = np.stack([f.image for f in iter_frames(tmp_path / "ddim.mp4")]).astype(np.int16)
    assert a.shape == b.shape and fast.dubbed_frames == ref.dubbed_frames > 0
    assert np.abs(a - b).max() > 20  # the sampler really ran: the mouths differ


def test_the_library_refuses_explicit_nvenc_before_any_work(  # type: ignore[no-untyped-def]
    nvenc_unusable: None, pipe, media_dir: Path, tmp_path: Path
) -> None:
    events: list[object] = []
    with pytest.raises(InputError, match="nvenc"):
        pipe(media_dir / "retalking_face3_woman_25fps.mp4", media_dir / "audio_retalking_1_44k.wav",
             tmp_path / "out.mp4", encoder="nvenc", consent=TEST_CONSENT, progress=events.append)
    assert events == [] and list(tmp_path.iterdir()) == []


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_flags(nvenc_unusable: None, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["dub", "--consent", TEST_CONSENT_JSON, str(tmp_path / "none.mp4"), str(tmp_path / "none.wav"),
            "-o", str(tmp_path / "o.mp4")]
    code, _, err = invoke([*base, "--preset", "warp"], monkeypatch, capsys)
    assert code == 2 and "error: --preset must be auto or one of" in err and "veryslow" in err
    code, _, err = invoke([*base, "--sampler", "euler"], monkeypatch, capsys)
    assert code == 2 and "error: --sampler must be one of" in err
    # nvenc is refused before the (missing) inputs are even looked at
    code, _, err = invoke([*base, "--encoder", "nvenc"], monkeypatch, capsys)
    assert code == 2 and "error:" in err and "nvenc" in err and "none.mp4" not in err
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = invoke(["dub", "--help"], monkeypatch, capsys)
    flat = " ".join(out.split())
    assert code == 0 and "--preset" in flat and "--encoder" in flat and "CHANGES THE OUTPUT" in flat


# -- service --------------------------------------------------------------------------------------
def test_service_takes_the_new_options(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("multipart")
    from fastapi.testclient import TestClient

    from latentdub.options import DubOptions
    from latentdub.service.app import create_app
    from latentdub.service.routes import ApiError, parse_options
    from latentdub.service.settings import ServiceSettings

    assert parse_options(DubOptions, {"sampler": "dpm++", "preset": "fast"}).steps == 10
    with pytest.raises(ApiError) as err:
        parse_options(DubOptions, {"preset": "warp"})
    assert err.value.field == "preset" and "veryslow" in err.value.message
    with TestClient(create_app(ServiceSettings(data_dir=tmp_path / "data", auth_enabled=False))) as client:
        spec = client.get("/openapi.json").json()
        form = next(iter(spec["components"]["schemas"][k] for k in spec["components"]["schemas"] if "jobs" in k))
        assert {"preset", "encoder", "sampler"} <= set(form["properties"])
        # The page builds its controls from this published schema (app.js).
        preset = client.get("/api/v1/info").json()["options"]["properties"]["preset"]
    assert preset["enum"] == ["auto", *X264_TABLE] and preset["default"] == "auto"
