"""Audio: Whisper features for the U-Net conditioning (``features``)."""

from latentdub.audio.features import (
    AudioFeatureExtractor,
    feature_indices_at_times,
    frame_feature_indices,
    gather_frame_tokens,
    log_mel_spectrogram,
    num_feature_rows,
    official_num_frames,
    tokens_for_times,
)

__all__ = [
    "AudioFeatureExtractor",
    "feature_indices_at_times",
    "frame_feature_indices",
    "gather_frame_tokens",
    "log_mel_spectrogram",
    "num_feature_rows",
    "official_num_frames",
    "tokens_for_times",
]
