"""Audio from a stock image pipeline: draw a log-mel spectrogram, then invert it.

``SpectrogramDecoder`` (backend ``spectrogram_sd``) is the ``stable_diffusion`` decoder
whose images are log-mel spectrograms (rows: mel bins, low frequencies at the bottom;
columns: time frames; the grey value repeated over RGB). ``_outputs`` turns each image
back into a waveform with torchaudio's ``InverseMelScale`` (least squares) and
``GriffinLim`` (phase recovery). This replaces a neural vocoder: simpler, no weights,
good enough for tones, audibly phasey for anything richer.

The spectrogram's parameters (``MelSpectrogramSpec``) travel with the pipeline as
``spectrogram.json`` in its directory; ``DecoderConfig.options["spectrogram"]`` overrides
them (and is required for a directory without that file).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .decoders import StableDiffusionDecoder
from .media import AudioOutput

SPECTROGRAM_FILE = "spectrogram.json"


@dataclass(frozen=True)
class MelSpectrogramSpec:
    """A log-mel spectrogram mapped to [0, 1]: ``(log10(mel power) - log_min) / (log_max - log_min)``.

    With the defaults 1 s at 16 kHz is 64 frames of 16 mel bins: a 16x64 image (as many
    pixels as the toy world's 32x32 images). A 512-sample window keeps beeps apart after
    Griffin-Lim; 1024 smeared gaps and made pure tones beat (beep counts fell to ~0.75 on
    clean round trips, against 1.0 here).
    """

    sample_rate: int = 16000
    n_fft: int = 512
    hop_length: int = 252
    n_mels: int = 16
    f_min: float = 0.0
    f_max: float = 4000.0
    log_min: float = -3.0
    log_max: float = 5.0
    griffin_lim_iters: int = 32

    @classmethod
    def from_dict(cls, data: dict) -> "MelSpectrogramSpec":
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise KeyError(f"unknown spectrogram key(s) {unknown}; valid keys are {sorted(cls.__dataclass_fields__)}")
        return cls(**data)

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / SPECTROGRAM_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    def frames(self, num_samples: int) -> int:
        return num_samples // self.hop_length + 1  # centred STFT

    def num_samples(self, frames: int) -> int:
        return (frames - 1) * self.hop_length

    def _mel(self):
        import torchaudio

        return torchaudio.transforms.MelSpectrogram(
            sample_rate=self.sample_rate, n_fft=self.n_fft, hop_length=self.hop_length, n_mels=self.n_mels,
            f_min=self.f_min, f_max=self.f_max, power=2.0,
        )

    @torch.no_grad()
    def to_image(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(B, S) waveforms -> (B, n_mels, frames) in [0, 1], low frequencies in the last row."""
        mel = self._mel()(waveforms.float())  # (B, n_mels, frames)
        x = (torch.log10(mel + 10.0 ** self.log_min) - self.log_min) / (self.log_max - self.log_min)
        return x.clamp(0.0, 1.0).flip(1)

    @torch.no_grad()
    def to_waveform(self, images: torch.Tensor, num_samples: Optional[int] = None) -> torch.Tensor:
        """(B, n_mels, frames) or (B, n_mels, frames, C) images in [0, 1] -> (B, S) waveforms.

        Channels are averaged. Phase comes from Griffin-Lim started from zero phase
        (``rand_init=False``), so the result is deterministic.
        """
        import torchaudio

        x = images.float()
        if x.ndim == 4:
            x = x.mean(-1)  # (B, H, W, C) -> (B, H, W)
        if x.shape[1] != self.n_mels:
            raise ValueError(f"spectrogram images need {self.n_mels} rows (mel bins), got shape {tuple(images.shape)}; "
                             f"generate at height={self.n_mels}")
        log_mel = x.flip(1).clamp(0.0, 1.0) * (self.log_max - self.log_min) + self.log_min
        mel = (10.0 ** log_mel - 10.0 ** self.log_min).clamp(min=0.0)  # (B, n_mels, frames) power
        n_stft = self.n_fft // 2 + 1
        inverse = torchaudio.transforms.InverseMelScale(
            n_stft=n_stft, n_mels=self.n_mels, sample_rate=self.sample_rate, f_min=self.f_min, f_max=self.f_max
        )
        power = inverse(mel)  # (B, n_stft, frames), least squares, clamped at 0
        natural = self.num_samples(x.shape[-1])
        griffin_lim = torchaudio.transforms.GriffinLim(
            n_fft=self.n_fft, hop_length=self.hop_length, power=2.0, n_iter=self.griffin_lim_iters,
            length=natural, rand_init=False,
        )
        wave = griffin_lim(power).clamp(-1.0, 1.0)  # (B, natural)
        if num_samples is None or num_samples == natural:
            return wave
        if num_samples < natural:
            return wave[:, :num_samples]
        return torch.nn.functional.pad(wave, (0, num_samples - natural))  # silence after the image ends


@dataclass
class SpectrogramAudioOutput(AudioOutput):
    """``AudioOutput`` that also keeps the generated spectrogram image ``(n_mels, frames, 3)`` in [0, 1]."""

    spectrogram: Optional[np.ndarray] = None


class SpectrogramDecoder(StableDiffusionDecoder):
    """``diffusers.StableDiffusionPipeline`` drawing log-mel spectrograms, inverted to audio.

    Conditioning, targets and the pipeline call are exactly the ``stable_diffusion``
    decoder's; only ``_outputs`` differs. ``audio_length_in_s`` trims or pads the
    Griffin-Lim output (default: the image's own length, ``(frames - 1) * hop``).
    """

    modality = "audio"
    backend = "spectrogram_sd"
    defaults = {**StableDiffusionDecoder.defaults, "audio_length_in_s": None}
    load_options = StableDiffusionDecoder.load_options + ("spectrogram",)

    @property
    def spectrogram(self) -> MelSpectrogramSpec:
        """The spectrogram parameters: ``options["spectrogram"]`` over ``<source>/spectrogram.json``."""
        data: dict[str, Any] = {}
        source = self.config.source
        if source is not None and (Path(source) / SPECTROGRAM_FILE).is_file():
            data.update(json.loads((Path(source) / SPECTROGRAM_FILE).read_text()))
        elif "spectrogram" not in self.options and self.config.init == "pretrained":
            raise FileNotFoundError(
                f"decoder source {source!r} has no {SPECTROGRAM_FILE}; write one with "
                f"MelSpectrogramSpec(...).save(source) or set options['spectrogram']"
            )
        data.update(self.options.get("spectrogram", {}))
        return MelSpectrogramSpec.from_dict(data)

    def _call_kwargs(self, opts):
        # Default size: n_mels rows by one second of frames (the pipeline's own default,
        # sample_size * vae_scale_factor, assumes a square sample_size).
        spec = self.spectrogram
        height = opts["height"] or spec.n_mels
        width = opts["width"] or spec.frames(spec.sample_rate)
        # "np": float images in [0, 1], no uint8 rounding before the inversion.
        return {**super()._call_kwargs(opts), "height": height, "width": width, "output_type": "np"}

    def to_waveform(self, images: np.ndarray, audio_length_in_s: Optional[float] = None) -> np.ndarray:
        """(B, n_mels, frames, 3) images in [0, 1] -> (B, S) float32 waveforms."""
        spec = self.spectrogram
        length = None if audio_length_in_s is None else int(round(audio_length_in_s * spec.sample_rate))
        return spec.to_waveform(torch.from_numpy(np.asarray(images)), length).numpy().astype(np.float32)

    def _outputs(self, result, opts):
        images = np.asarray(result.images)  # (B, H, W, 3)
        waves = self.to_waveform(images, opts["audio_length_in_s"])
        rate = self.spectrogram.sample_rate
        return [SpectrogramAudioOutput(w, rate, spectrogram=im) for w, im in zip(waves, images)]
