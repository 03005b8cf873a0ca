"""Quality evaluation of dubs.

* :mod:`latentdub.evaluation.syncnet`: lip-sync scores (LSE-C / LSE-D and the AV offset) with
  the classic evaluation SyncNet, following the standard syncnet_python protocol.
* :mod:`latentdub.evaluation.metrics`: fidelity against the original (PSNR / SSIM outside the
  blend region and inside the face box, mouth flicker).

Models come from :mod:`latentdub.models`, their files from :mod:`latentdub.weights`; nothing
here reads weights files itself.
"""
