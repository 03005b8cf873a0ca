"""Speaker turns without a model (latentdub.audio.turns): change points, turns and silences.

Synthetic checks use noise of two different spectra (a "voice change" with a known place) with
the speech regions given, so no VAD is involved. The real check concatenates two real voices
from ../shared/media (a man, then a woman) with a known junction.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import butter, sosfilt

from latentdub.audio.activity import SpeechSegments
from latentdub.audio.turns import cluster_voices, mfcc, speaker_turns
from latentdub.media.audio_io import load_audio

SR = 16000


def _coloured(seconds: float, band: tuple[float, float], seed: int) -> np.ndarray:
    sos = butter(4, band, btype="bandpass", fs=SR, output="sos")
    x = sosfilt(sos, np.random.default_rng(seed).standard_normal(round(seconds * SR)))
    return (0.2 * x / np.abs(x).max()).astype(np.float32)


def test_mfcc_shape_and_rate() -> None:
    feats = mfcc(np.zeros(SR, np.float32) + 1e-3)
    assert feats.shape == (1 + (SR - 400) // 160, 19)  # 10 ms hop, 25 ms frames
    assert mfcc(np.zeros(100, np.float32)).shape == (0, 19)


def test_spectral_change_is_found_and_stationary_sound_has_none() -> None:
    wave = np.concatenate([_coloured(3.0, (200, 1500), 1), _coloured(3.0, (1500, 6000), 2)])
    speech = SpeechSegments(((0.0, 6.0),), 6.0)
    turns = speaker_turns(wave, speech=speech)
    assert len(turns.changes_s) == 1 and abs(turns.changes_s[0] - 3.0) <= 0.1
    assert turns.turns[0][0] == 0.0 and turns.turns[-1][1] == 6.0
    assert turns.silences == ()
    steady = speaker_turns(_coloured(6.0, (200, 1500), 3), speech=speech)
    assert steady.changes_s == () and steady.turns == ((0.0, 6.0),)


def test_long_pauses_end_turns_and_are_returned_as_silences() -> None:
    voice = _coloured(2.0, (300, 3000), 4)
    gap = np.zeros(SR, np.float32)
    wave = np.concatenate([voice, gap, voice])
    speech = SpeechSegments(((0.0, 2.0), (3.0, 5.0)), 5.0)
    turns = speaker_turns(wave, speech=speech)
    assert turns.turns == ((0.0, 2.0), (3.0, 5.0))
    assert turns.silences == ((2.0, 3.0),)
    # A 0.3 s breath stays inside the turn.
    breath = np.concatenate([voice, gap[: round(0.3 * SR)], _coloured(2.7, (300, 3000), 5)])
    short = SpeechSegments(((0.0, 2.0), (2.3, 5.0)), 5.0)
    assert speaker_turns(breath, speech=short).turns == ((0.0, 5.0),)


def _voices(media_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    man = load_audio(media_dir / "infinitetalk_hdtf_man_25fps.mp4").to_mono_16k()
    woman = load_audio(media_dir / "retalking_face3_woman_25fps.mp4").to_mono_16k()
    return man, woman


def test_real_voice_change_found_and_silence_returned(media_dir: Path) -> None:
    man, woman = _voices(media_dir)
    junction = 4.5
    wave = np.concatenate([man[: round(junction * SR)], woman[: round(4.5 * SR)]])
    turns = speaker_turns(wave)  # Silero VAD for the speech regions
    assert any(abs(c - junction) <= 0.3 for c in turns.changes_s), turns.changes_s
    starts = [a for a, _ in turns.turns]
    assert any(abs(s - junction) <= 0.3 for s in starts)
    # Turns and silences tile the clip.
    spans = sorted([*turns.turns, *turns.silences])
    assert spans[0][0] == 0.0 and spans[-1][1] == pytest.approx(len(wave) / SR)
    assert all(b[0] >= a[1] - 1e-9 for a, b in itertools.pairwise(spans))
    # Two seconds of digital silence between the voices: a silence, no turn across it.
    gap = np.zeros(2 * SR, np.float32)
    with_gap = np.concatenate([man[: round(junction * SR)], gap, woman[: round(4.5 * SR)]])
    gapped = speaker_turns(with_gap)
    assert any(a <= junction + 0.3 and b >= junction + 1.7 for a, b in gapped.silences)
    assert not any(a < junction + 1.0 < b for a, b in gapped.turns)


def test_changes_inside_one_voice_are_candidates_min_turn_apart(media_dir: Path) -> None:
    """A model-free BIC test also fires on phonetic changes inside one voice (measured: ~1 per
    1.2 s here); what it promises is their spacing, and that the speech is covered."""
    man, _ = _voices(media_dir)
    turns = speaker_turns(man[: 8 * SR], min_turn_s=1.0)
    changes = np.array(turns.changes_s)
    assert (np.diff(changes) >= 0.99).all()
    assert all(any(a <= c <= b for a, b in turns.turns) for c in changes)


def test_clustering_labels_two_real_voices_apart(media_dir: Path) -> None:
    """Man, woman, man, woman (3, 2, 3, 2 s): every turn's voice id follows who speaks there,
    and the turns are joined so that each true segment is one voice."""
    man, woman = _voices(media_dir)
    edges = [0.0, 3.0, 5.0, 8.0, 10.0]
    wave = np.concatenate([man[: 3 * SR], woman[: 2 * SR], man[3 * SR : 6 * SR],
                           woman[2 * SR : 4 * SR]])  # fmt: skip
    turns = speaker_turns(wave, cluster=True)
    assert len(turns.voices) == len(turns.turns) and set(turns.voices) == {0, 1}
    truth = [0, 1, 0, 1]
    for (lo, hi), v in zip(turns.turns, turns.voices, strict=True):
        mid = (lo + hi) / 2
        seg = int(np.searchsorted(edges, mid, side="right")) - 1
        assert v == truth[seg], (turns.turns, turns.voices)
    # Each voice change lies within 0.3 s of a true junction.
    assert all(min(abs(c - e) for e in edges[1:4]) <= 0.3 for c in turns.changes_s)
    assert len(turns.changes_s) == 3


def test_clustering_keeps_one_real_voice_one_voice(media_dir: Path) -> None:
    man, woman = _voices(media_dir)
    for wave in (woman[: 5 * SR], man[: round(4.5 * SR)]):
        turns = speaker_turns(wave, cluster=True)
        assert turns.voices and set(turns.voices) == {0}, (turns.turns, turns.voices)
        assert turns.changes_s == ()
        # Joined: neighbouring turns are separated by a long pause, never by a change.
        assert all(b[0] - a[1] >= 0.5 for a, b in itertools.pairwise(turns.turns))


def test_cluster_voices_on_synthetic_pieces() -> None:
    """Two spectra, pieces alternating: two labels in order of first appearance; a short
    piece joins the cluster it fits; without clustering no voices are reported."""
    a = [mfcc(_coloured(1.0, (200, 1500), s)) for s in (10, 11, 12)]
    b = [mfcc(_coloured(1.0, (1500, 6000), s)) for s in (13, 14)]
    short = mfcc(_coloured(0.2, (1500, 6000), 15))
    labels = cluster_voices([a[0], b[0], a[1], b[1], a[2], short], tau=10.0)
    assert labels == [0, 1, 0, 1, 0, 1]
    assert speaker_turns(_coloured(2.0, (200, 1500), 16),
                         speech=SpeechSegments(((0.0, 2.0),), 2.0)).voices == ()  # fmt: skip
